"""FP16: the low-precision variant for GPUs (model.fp16.onnx), checked against the FP32 model it comes from.

Weights and compute in float16, the graph's input and output still float32 (``keep_io_types``), so the
contract does not change: a client sends and gets float32. The conversion is ONNX Runtime's own
(``onnxruntime.transformers.float16``), whose default block list keeps the operators that have no
float16 kernels in float32. The FP16 model is kept only when it agrees with FP32 on the whole test set:
top-1 the same on at least ``MIN_TOP1_AGREEMENT`` of the images and at most ``MAX_ACCURACY_DROP``
points of accuracy lost; max |logit difference| is reported. The check runs on the CPU provider, whose
float16 kernels are correct but slow: FP16 pays off on GPUs (tensor cores), rarely on CPUs. Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from resnet_edge.core.contract import FP16_MODEL, INPUT_NAME, OUTPUT_NAME
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import atomic_path

MIN_TOP1_AGREEMENT = 0.999  # of the test images: FP16 and FP32 give the same digit
MAX_ACCURACY_DROP = 0.05  # points of test accuracy FP16 may lose against FP32


@dataclass
class Fp16Result:
    test_accuracy: float
    fp32_accuracy: float
    accuracy_drop_points: float
    top1_agreement: float
    max_abs_diff: float
    images_per_second_cpu: float
    converted_nodes: int
    float32_nodes: list[str]


def convert(fp32_path: Path, metadata: dict[str, str]) -> onnx.ModelProto:
    """model.onnx -> an FP16 ModelProto with float32 input and output."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto = onnx.load(str(fp32_path))
    fp16 = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=False)
    del fp16.metadata_props[:]
    onnx.helper.set_model_props(fp16, {**metadata, "precision": "fp16"})
    return fp16


def _logits(session, images: np.ndarray, batch_size: int = 500) -> tuple[np.ndarray, float]:
    t0 = time.perf_counter()
    out = [
        session.run([OUTPUT_NAME], {INPUT_NAME: images[i : i + batch_size]})[0]
        for i in range(0, len(images), batch_size)
    ]
    return np.concatenate(out), len(images) / (time.perf_counter() - t0)


def write_fp16(
    fp32_path: Path, out_path: Path, images: np.ndarray, labels: np.ndarray, metadata: dict[str, str]
) -> Fp16Result:
    """Convert, check the contract and the agreement with FP32 on ``images``, then move the file into
    place; a model that fails the guard is never left on disk."""
    from resnet_edge.inference.runtime import check_contract, create_session

    proto = convert(fp32_path, metadata)
    check_contract(proto, out_path)
    reference, _ = _logits(create_session(fp32_path, "cpu"), images)
    with atomic_path(out_path) as tmp:
        onnx.save(proto, str(tmp))
        logits, speed = _logits(create_session(tmp, "cpu"), images)
        if logits.dtype != np.float32:
            raise UserError(f"FP16 model gives {logits.dtype} logits, the contract says float32")
        fp32_acc = float((reference.argmax(1) == labels).mean())
        acc = float((logits.argmax(1) == labels).mean())
        result = Fp16Result(
            test_accuracy=acc,
            fp32_accuracy=fp32_acc,
            accuracy_drop_points=100 * (fp32_acc - acc),
            top1_agreement=float((logits.argmax(1) == reference.argmax(1)).mean()),
            max_abs_diff=float(np.abs(logits - reference).max()),
            images_per_second_cpu=speed,
            **_node_precision(proto),
        )
        problems = []
        if result.top1_agreement < MIN_TOP1_AGREEMENT:
            problems.append(
                f"top-1 agrees with FP32 on {100 * result.top1_agreement:.2f} % of the test images "
                f"(needs {100 * MIN_TOP1_AGREEMENT:.1f} %)"
            )
        if result.accuracy_drop_points > MAX_ACCURACY_DROP + 1e-9:
            problems.append(
                f"it loses {result.accuracy_drop_points:.2f} points of accuracy (at most {MAX_ACCURACY_DROP:g})"
            )
        if problems:
            raise UserError(
                f"FP16 model does not keep FP32's answers: {'; '.join(problems)}; "
                f"max |diff| {result.max_abs_diff:.3g}; no FP16 model was written"
            )
    return result


def _node_precision(proto: onnx.ModelProto) -> dict[str, Any]:
    """How many compute nodes (all but Cast) run in float16, and the op types left computing in float32
    (a float32 output)."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {
        v.name: v.type.tensor_type.elem_type
        for v in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input)
    }
    compute = [n for n in inferred.graph.node if n.op_type != "Cast"]
    in_float32 = [n for n in compute if any(types.get(o) == onnx.TensorProto.FLOAT for o in n.output)]
    return {"converted_nodes": len(compute) - len(in_float32), "float32_nodes": sorted({n.op_type for n in in_float32})}


def export_fp16(
    fp32_path: Path, fp16_path: Path, run_dir: Path, images: np.ndarray, labels: np.ndarray, meta: dict[str, str]
) -> dict[str, Any]:
    """model.fp16.onnx, written by write_fp16 into the staging folder; export.json's FP16 section (final path)."""
    r = write_fp16(fp32_path, fp16_path, images, labels, meta)
    return {
        "path": str(run_dir / FP16_MODEL),
        "bytes": fp16_path.stat().st_size,
        "size_ratio": fp16_path.stat().st_size / fp32_path.stat().st_size,
        **{k: v for k, v in asdict(r).items() if k != "fp32_accuracy"},
        "guard": {"min_top1_agreement": MIN_TOP1_AGREEMENT, "max_accuracy_drop": MAX_ACCURACY_DROP},
        "io_dtype": "float32",
        "checked_on": "CPUExecutionProvider (slow in FP16; FP16 is for GPUs)",
    }
