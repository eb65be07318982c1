"""Signed (S8S8) against unsigned (U8S8) INT8 activations: what ONNX Runtime makes of each on this CPU.

    python benchmarks/int8_activation_types.py --run benchmarks/results/cpu/resnet8

Quantizes the run's model.onnx both ways with the export recipe (QDQ, per-channel int8 weights, 512
calibration images), counts the convolutions ONNX Runtime's CPU graph optimizer turns into QLinearConv
(the rest stay float Conv between Dequantize and Quantize), and times batch 64 against FP32 (p50 of
--runs calls after a warm-up). This is why the export defaults to uint8 activations.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization.shape_inference import quant_pre_process

from resnet_edge.bench import describe_machine
from resnet_edge.data import load_split, to_pixels
from resnet_edge.quantize import QuantizationConfig, _quantize, calibration_images


def measure(path: Path, x: np.ndarray, runs: int, work: Path) -> dict:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(work / f"{path.stem}.optimized.onnx")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(20):
        session.run(None, {"pixels": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {"pixels": x})
        times.append(time.perf_counter() - t0)
    ops = collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)
    return {"p50_ms": float(np.median(times) * 1e3), "QLinearConv": ops.get("QLinearConv", 0), "Conv": ops.get("Conv", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    train_images, _ = load_split(None, "train")
    x = np.ascontiguousarray(to_pixels(load_split(None, "test")[0][:args.batch_size]))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        quant_pre_process(str(args.run / "model.onnx"), str(pre), skip_symbolic_shape=True)
        results["fp32"] = measure(args.run / "model.onnx", x, args.runs, work)
        for act in ("uint8", "int8"):
            config = QuantizationConfig(activation_type=act)
            q = work / f"{act}.onnx"
            _quantize(pre, q, calibration_images(train_images, config.calibration_size, config.seed), config, [], None)
            results[act] = measure(q, x, args.runs, work)
    for name, r in results.items():
        speed = results["fp32"]["p50_ms"] / r["p50_ms"]
        print(f"{name:6s} p50 {r['p50_ms']:7.3f} ms ({speed:.2f}x FP32)  QLinearConv {r['QLinearConv']}, float Conv {r['Conv']}")
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "batch_size": args.batch_size, "results": results,
                                        "machine": describe_machine(None, include_torch=False)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
