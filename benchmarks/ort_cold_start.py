"""Cold start of the ONNX and ORT-format models: process start to first answer, side by side.

    resnet-edge package --run exported/resnet8
    python benchmarks/ort_cold_start.py --deploy exported/resnet8/deploy

Each measurement starts a fresh Python process that imports onnxruntime, opens one model and answers one
image; the parent times it from spawn to the answer on stdout. The models are interleaved round by
round, medians reported, with the session-creation time the child measures itself (the part a minimal
ONNX Runtime build would change; the import and interpreter start are the same for all).
Writes benchmarks/results/cpu/ort_cold_start-<arch>.json (or --out).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import sys, time
t0 = time.perf_counter()
import numpy as np, onnxruntime as ort
t1 = time.perf_counter()
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
t2 = time.perf_counter()
y = s.run(None, {"pixels": np.zeros((1, 1, 28, 28), np.float32)})[0]
t3 = time.perf_counter()
print(int(y.argmax()), (t2 - t1) * 1e3, (t3 - t2) * 1e3, (t1 - t0) * 1e3, flush=True)
"""


def once(model: Path) -> dict[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(model)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    total = (time.perf_counter() - t0) * 1e3
    proc.wait()
    _, session_ms, first_run_ms, import_ms = map(float, line.split())
    return {"process_to_answer_ms": total, "session_ms": session_ms, "first_run_ms": first_run_ms, "import_ms": import_ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deploy", type=Path, required=True, help="a `resnet-edge package` folder")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    from resnet_edge.core.machine import machine

    triton = args.deploy / "triton"
    models = {}
    for model_dir in sorted(p for p in triton.iterdir() if p.is_dir()):
        variant = "int8" if model_dir.name.endswith("_int8") else "fp32"
        models[f"{variant} .onnx"] = model_dir / "1" / "model.onnx"
        models[f"{variant} .ort"] = args.deploy / "ort" / f"model.{variant}.ort"
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    for _ in range(args.rounds):
        for name, path in models.items():
            runs[name].append(once(path))
    summary = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    for name, s in summary.items():
        print(f"{name:10s} process to answer {s['process_to_answer_ms']:7.1f} ms (import {s['import_ms']:.1f}, "
              f"session {s['session_ms']:.1f}, first run {s['first_run_ms']:.2f})")
    arch = next(iter(triton.iterdir())).name.removesuffix("_int8")
    out = args.out or ROOT / "benchmarks" / "results" / "cpu" / f"ort_cold_start-{arch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"deploy": str(args.deploy), "rounds": args.rounds, "median": summary, "runs": runs,
                               "machine": machine(gpu=False)}, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
