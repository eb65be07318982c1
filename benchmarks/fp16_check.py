"""FP16 against FP32 on this machine: the export's checks (accuracy, agreement, max |diff|) and speed.

    python benchmarks/fp16_check.py --run exported/resnet8 [--provider cpu|cuda]

Converts the run's model.onnx the way `export --fp16` does (resnet_edge/export/fp16.py: float16 weights and
compute, float32 in and out), evaluates both on the 10,000 test images, and times batch 1 and
--batch-size (p50 of --runs calls after a warm-up; the two models interleaved round by round; median
of --rounds). On the CPU provider FP16 is expected to be slower (few tuned float16 kernels): it is the
GPU's variant, and this measures what it costs on a CPU. Torch-free.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from timing import p50_ms

from resnet_edge.core.mnist import load_test_split
from resnet_edge.export.fp16 import write_fp16
from resnet_edge.core.machine import machine
from resnet_edge.inference.runtime import create_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    images, labels = load_test_split()
    with tempfile.TemporaryDirectory() as tmp:
        fp16_path = Path(tmp) / "model.fp16.onnx"
        check = write_fp16(args.run / "model.onnx", fp16_path, images, labels.astype(np.int64), {})
        sessions = {"fp32": create_session(args.run / "model.onnx", args.provider),
                    "fp16": create_session(fp16_path, args.provider)}
        timings: dict[str, dict[int, list[float]]] = {v: {1: [], args.batch_size: []} for v in sessions}
        for _ in range(args.rounds):
            for bs in (1, args.batch_size):
                x = np.ascontiguousarray(images[:bs])
                for v, s in sessions.items():
                    timings[v][bs].append(p50_ms(s, x, args.runs))
        sizes = {"fp32": (args.run / "model.onnx").stat().st_size, "fp16": fp16_path.stat().st_size}
    p50 = {v: {bs: float(np.median(t)) for bs, t in per.items()} for v, per in timings.items()}
    result = {
        "run": str(args.run), "provider": args.provider, "machine": machine(gpu=args.provider != "cpu"),
        "check": {k: v for k, v in vars(check).items()}, "bytes": sizes,
        "p50_ms": p50, "rounds": timings,
        "fp16_vs_fp32": {bs: p50["fp32"][bs] / p50["fp16"][bs] for bs in p50["fp32"]},
    }
    print(f"{machine(gpu=args.provider != 'cpu')['cpu']} / {args.provider}")
    print(f"FP32 {100 * check.fp32_accuracy:.2f} %  FP16 {100 * check.test_accuracy:.2f} %  agreement "
          f"{100 * check.top1_agreement:.2f} %  max |diff| {check.max_abs_diff:.2e}  size {sizes['fp16'] / sizes['fp32']:.0%}")
    for bs in p50["fp32"]:
        print(f"batch {bs}: FP32 {p50['fp32'][bs]:.3f} ms, FP16 {p50['fp16'][bs]:.3f} ms -> "
              f"FP16 {result['fp16_vs_fp32'][bs]:.2f}x FP32")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
