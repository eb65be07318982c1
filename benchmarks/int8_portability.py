"""Does an INT8 model give the same answers on a CPU without VNNI? Measured, not assumed.

For each INT8 scheme (int8.SCHEMES), the run's model.onnx is quantized with our own pipeline and the
guard switched off (no layer kept in float, so the raw scheme is judged), then every model is evaluated
on the 10,000 test images twice: natively on this CPU, and under QEMU's user-mode emulator with a CPU
model that has no VNNI (default Haswell: AVX2 + FMA, no AVX-512, no VNNI), where ONNX Runtime's own
CPU dispatch picks its AVX2 uint8 x int8 kernel (VPMADDUBSW, saturating int16 pair sums). QEMU runs the
same binaries and wheels, so only the CPU's instruction set changes. Timings under emulation mean
nothing and are not reported; accuracy and agreement are exact. FP32 is evaluated natively only.

    apt-get install qemu-user        # Debian/Ubuntu; QEMU >= 7.2 emulates AVX2
    python benchmarks/int8_portability.py --run exported/resnet8

Writes benchmarks/results/cpu/int8_portability-<arch>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def predictions(model: Path, limit: int) -> np.ndarray:
    from resnet_edge.core.mnist import load_test_split
    from resnet_edge.inference.runtime import create_session, evaluate_session

    images, labels = load_test_split()
    return evaluate_session(create_session(model, "cpu"), images[:limit], labels[:limit]).predictions


def run_worker(model: Path, out: Path, emulate: str | None, limit: int) -> float:
    cmd = [sys.executable, __file__, "--worker", str(model), str(out), "--images", str(limit)]
    if emulate:
        cmd = ["qemu-x86_64", "-cpu", emulate] + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"worker failed ({' '.join(cmd[:4])} ...): {last}")
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("exported/resnet8"))
    parser.add_argument("--emulate", default="Haswell", help="QEMU CPU model without VNNI (qemu-x86_64 -cpu help)")
    parser.add_argument("--schemes", default="portable,vnni")
    parser.add_argument("--images", type=int, default=10000,
                        help="test images evaluated (emulation runs ~100x slower than the CPU itself)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        np.save(args.worker[1], predictions(args.worker[0], args.images))
        return
    import platform

    if platform.machine() != "x86_64":
        raise SystemExit("runs this machine's x86_64 Python under qemu-x86_64: needs an x86_64 host")
    if shutil.which("qemu-x86_64") is None:
        raise SystemExit("needs qemu-x86_64 (apt-get install qemu-user)")

    from resnet_edge.core.contract import to_pixels
    from resnet_edge.core.mnist import load_dataset
    from resnet_edge.core.machine import cpu_info, machine
    from resnet_edge.export.quantize import QuantizationConfig, quantize_model

    cpu = cpu_info()
    if not cpu.int8_dot_product:
        print(f"note: this CPU ({cpu.describe()}) has no VNNI itself; 'native' is then a non-VNNI figure too")
    dataset = load_dataset()
    labels = dataset.test_labels.astype(np.int64)
    n = min(args.images, len(labels))
    fp32 = args.run / "model.onnx"
    result = {"run": str(args.run), "machine": machine(gpu=False), "emulated_cpu": args.emulate, "test_images": n,
              "emulator": subprocess.run(["qemu-x86_64", "--version"], capture_output=True, text=True).stdout.split("\n")[0],
              "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        models = {"fp32": fp32}
        for name in args.schemes.split(","):
            path = Path(tmp) / f"{name}.onnx"
            q = quantize_model(fp32, path, dataset.train_images, to_pixels(dataset.test_images), labels,
                               QuantizationConfig(scheme=name, max_accuracy_drop=100.0, min_agreement=0))
            result["models"][name] = {"max_abs_weight": q.max_abs_weight, "saturation_free": q.saturation_free}
            models[name] = path
        preds = {}
        for name, path in models.items():
            # FP32 is not in question (no integer kernels) and its float math is very slow to emulate.
            for where, emulate in (("native", None),) + ((("emulated", args.emulate),) if name != "fp32" else ()):
                out = Path(tmp) / f"{name}-{where}.npy"
                seconds = run_worker(path, out, emulate, n)
                preds[name, where] = np.load(out)
                print(f"{name:>8} {where:>8}: {100 * (preds[name, where] == labels[:n]).mean():.2f} % ({seconds:.0f} s)",
                      flush=True)
        for name in models:
            entry = result["models"].setdefault(name, {})
            for where in ("native", "emulated"):
                if (name, where) not in preds:
                    continue
                p = preds[name, where]
                entry[f"{where}_accuracy"] = float((p == labels[:n]).mean())
                entry[f"{where}_agreement_with_fp32"] = float((p == preds["fp32", "native"]).mean())
            if (name, "emulated") in preds:
                entry["native_vs_emulated_agreement"] = float((preds[name, "native"] == preds[name, "emulated"]).mean())
    out = args.out or ROOT / "benchmarks" / "results" / "cpu" / f"int8_portability-{args.run.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"native: {cpu.describe()}\nemulated: {args.emulate} under {result['emulator']}\n-> {out}")
    for name, e in result["models"].items():
        if "emulated_accuracy" not in e:
            print(f"{name:>8}: native {100 * e['native_accuracy']:.2f} %")
            continue
        print(f"{name:>8}: native {100 * e['native_accuracy']:.2f} %, {args.emulate} {100 * e['emulated_accuracy']:.2f} %, "
              f"same answers {100 * e['native_vs_emulated_agreement']:.2f} %"
              + (f", max |w| {e['max_abs_weight']}" if e.get("max_abs_weight") is not None else ""))


if __name__ == "__main__":
    main()
