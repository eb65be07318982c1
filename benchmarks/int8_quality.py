"""INT8 quality beyond MNIST (issue 21): for each case, `export --quantize` with the search (the default)
against the earlier default (minmax, no search: the float-fallback guard alone) and each calibration
method alone: accuracy drop, top-1 agreement with FP32, nodes kept in float, the calibration chosen,
export seconds, and INT8/FP32 throughput at batch 1 and 64 (ONNX Runtime, CPU provider, the two
models timed in alternating slices so that drift hits both alike; medians of the slices).

    python benchmarks/int8_quality.py --out benchmarks/results/cpu/int8_quality-<cpu>.json

Cases: MNIST and the harder datasets of benchmarks/hard_mnist.py (noisy, inverted, blobs), each a
resnet8 trained for 1 epoch with the default recipe (a brief training leaves the widest activation
ranges); --archs adds others. Runs are kept under --work (default /tmp/int8-quality) and reused.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from hard_mnist import write_dataset  # noqa: E402

from resnet_edge.core.machine import machine  # noqa: E402

VARIANTS = {  # name -> export options
    "default (search)": [],
    "before: minmax, no search": ["--no-search", "--calibration-method", "minmax"],
    "percentile alone": ["--no-search", "--calibration-method", "percentile"],
    "entropy alone": ["--no-search", "--calibration-method", "entropy"],
}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet_edge", *args], capture_output=True, text=True)


def _throughput(fp32: Path, int8: Path, batch: int, slices: int, slice_s: float) -> dict[str, float]:
    """Images/s of both models at ``batch``, timed in alternating slices; the ratio of the medians."""
    import onnxruntime as ort

    x = np.random.default_rng(0).random((batch, 1, 28, 28), dtype=np.float32)
    sessions = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        options = ort.SessionOptions()
        options.log_severity_level = 3
        sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(5):
            sessions[name].run(None, {"pixels": x})
    rates: dict[str, list[float]] = {"fp32": [], "int8": []}
    for i in range(slices):
        for name in (("fp32", "int8") if i % 2 == 0 else ("int8", "fp32")):
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < slice_s:
                sessions[name].run(None, {"pixels": x})
                n += batch
            rates[name].append(n / (time.perf_counter() - t0))
    per_slice = [i / f for i, f in zip(rates["int8"], rates["fp32"])]
    return {"fp32_images_per_second": float(np.median(rates["fp32"])),
            "int8_images_per_second": float(np.median(rates["int8"])),
            "int8_vs_fp32": float(np.median(per_slice)),
            "int8_vs_fp32_range": [float(min(per_slice)), float(max(per_slice))]}


def run_case(case: str, arch: str, work: Path, slices: int, slice_s: float, train_limit: int | None = None) -> dict[str, Any]:
    data_dir = None
    if case != "mnist":
        data_dir = work / f"data-{case}"
        if not data_dir.exists():
            write_dataset(case, data_dir)
    run = work / f"{case}-{arch}"
    if not (run / "checkpoint.pt").exists():
        args = ["train", "--arch", arch, "--epochs", "1", "--run", str(run), "--quiet"]
        if train_limit:
            args += ["--train-limit", str(train_limit)]
        if data_dir is not None:
            args += ["--data-dir", str(data_dir)]
        proc = _cli(*args)
        if proc.returncode:
            raise SystemExit(proc.stderr)
    rows = []
    for name, options in VARIANTS.items():
        copy = work / f"{case}-{arch}-export"
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        for f in ("checkpoint.pt", "train.json"):
            shutil.copy(run / f, copy / f)
        t0 = time.perf_counter()
        proc = _cli("export", "--run", str(copy), "--quantize", "--quiet", *options)
        seconds = time.perf_counter() - t0
        row: dict[str, Any] = {"variant": name, "options": options, "export_seconds": seconds}
        if proc.returncode:
            row["error"] = proc.stderr.strip().splitlines()[-1]
        else:
            report = json.loads((copy / "export.json").read_text())
            q = report["int8"]
            row.update(fp32_accuracy=report["fp32"]["test_accuracy"], int8_accuracy=q["test_accuracy"],
                       accuracy_drop_points=q["accuracy_drop_points"], top1_agreement=q["top1_agreement"],
                       float_nodes=len(q["float_nodes"]), calibration=q.get("calibration", options[-1] if options else ""),
                       weights=q.get("weights"), saturation_free=q.get("saturation_free"),
                       candidates=q.get("candidates", []))
            for batch in (1, 64):
                row[f"batch_{batch}"] = _throughput(copy / "model.onnx", copy / "model.int8.onnx", batch, slices, slice_s)
        rows.append(row)
        print(f"{case:8s} {arch:8s} {name:28s} " + (row.get("error") or
              f"drop {row['accuracy_drop_points']:+.2f} pt, agreement {100 * row['top1_agreement']:.2f} %, "
              f"{row['float_nodes']} float nodes, {row['calibration']}, INT8/FP32 "
              f"{row['batch_1']['int8_vs_fp32']:.2f}x (b1) {row['batch_64']['int8_vs_fp32']:.2f}x (b64), "
              f"export {seconds:.0f} s"), flush=True)
    return {"case": case, "arch": arch, "train_limit": train_limit, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="mnist,noisy,inverted,blobs")
    parser.add_argument("--archs", default="resnet8")
    parser.add_argument("--work", type=Path, default=Path("/tmp/int8-quality"))
    parser.add_argument("--train-limit", type=int, default=None, help="train on the first N images only (for the larger archs on 2 cores)")
    parser.add_argument("--slices", type=int, default=10, help="alternating timing slices per model and batch size")
    parser.add_argument("--slice-seconds", type=float, default=0.3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = [run_case(case, arch, args.work, args.slices, args.slice_seconds, args.train_limit)
               for arch in args.archs.split(",") for case in args.cases.split(",")]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine(), "cases": results,
                                    "settings": {"slices": args.slices, "slice_seconds": args.slice_seconds}}, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
