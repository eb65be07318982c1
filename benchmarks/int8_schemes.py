"""The INT8 schemes (portable, vnni, s8s8) side by side on this CPU: accuracy, fusion, speed.

    python benchmarks/int8_schemes.py --run benchmarks/results/cpu/resnet8

Quantizes the run's model.onnx with each scheme of resnet_edge/core/int8.py and the export recipe (QDQ,
per-channel int8 weights, 512 calibration images, no layer kept in float), evaluates each on the
10,000 test images, counts the convolutions ONNX Runtime's CPU graph optimizer turns into QLinearConv
(the rest stay float Conv between Dequantize and Quantize), and times batch 1 and --batch-size against
FP32 (p50 of --runs calls after a warm-up, the variants interleaved round by round, median of
--rounds). Accuracy here is this CPU's: see int8_portability.py for a CPU without VNNI.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.quantization.shape_inference import quant_pre_process

from timing import p50_ms

from resnet_edge.bench.runner import float_convolutions
from resnet_edge.core.config import QuantizationConfig
from resnet_edge.core.contract import to_pixels
from resnet_edge.core.mnist import load_split
from resnet_edge.core.int8 import SCHEMES
from resnet_edge.core.machine import machine
from resnet_edge.export.calibration import calibration_images
from resnet_edge.export.weights import _quantize
from resnet_edge.inference.runtime import create_session, evaluate_session


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", type=Path, required=True)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    train_images, _ = load_split(None, "train")
    test_images, test_labels = load_split(None, "test")
    test_pixels, labels = to_pixels(test_images), test_labels.astype(np.int64)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        quant_pre_process(str(args.run / "model.onnx"), str(pre), skip_symbolic_shape=True)
        paths = {"fp32": args.run / "model.onnx"}
        for name in SCHEMES:
            config = QuantizationConfig(scheme=name)
            paths[name] = work / f"{name}.onnx"
            _quantize(pre, paths[name], calibration_images(train_images, config.calibration_size, config.seed), config, [], None)
        sessions = {name: create_session(p, "cpu") for name, p in paths.items()}
        for name, path in paths.items():
            r = evaluate_session(sessions[name], test_pixels, labels)
            convs = float_convolutions(path)  # the count bench reports, after ONNX Runtime's CPU fusions
            results[name] = {"test_accuracy": r.accuracy, "QLinearConv": convs["int8"], "Conv": convs["float"],
                             "p50_ms": {}}
        for bs in sorted({1, args.batch_size}):
            x = np.ascontiguousarray(test_pixels[:bs])
            rounds = {name: [] for name in paths}
            for _ in range(args.rounds):  # interleaved, so drift on a shared machine hits every variant alike
                for name in paths:
                    rounds[name].append(p50_ms(sessions[name], x, args.runs))
            for name in paths:
                results[name]["p50_ms"][str(bs)] = float(np.median(rounds[name]))
    for name, r in results.items():
        speeds = ", ".join(f"batch {bs}: {r['p50_ms'][bs]:.3f} ms ({results['fp32']['p50_ms'][bs] / r['p50_ms'][bs]:.2f}x FP32)"
                           for bs in r["p50_ms"])
        print(f"{name:8s} {100 * r['test_accuracy']:.2f} %  {speeds}  QLinearConv {r['QLinearConv']}, float Conv {r['Conv']}")
    if args.out:
        args.out.write_text(json.dumps({"run": str(args.run), "batch_size": args.batch_size, "results": results,
                                        "machine": machine(gpu=False)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
