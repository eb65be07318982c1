"""Which activation tensors quantize worst: the ranking behind the search's refinement and the guard's float fallback.

For every activation tensor the INT8 model quantizes (the graph input included), the float model's values
on real images go through that tensor's own scale and zero point; the signal-to-quantization-noise ratio
(SQNR, dB) of that round trip ranks them, lowest (worst) first. No torch here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.contract import INPUT_NAME
from resnet_edge.core.providers import CPU


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``test`` against ``reference`` in dB (inf when they are equal)."""
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def sensitivity_ranking(pre_path: Path, qdq_path: Path, images: np.ndarray) -> list[tuple[str, float]]:
    """Activation tensors ranked worst first by the SNR (dB) of their own quantize-dequantize.

    For every tensor the QDQ model quantizes (the graph input included), the float model's values on
    real images go through that tensor's scale and zero point; a low SNR means a range that clips or
    wastes levels. Like onnxruntime's qdq_loss_debug, but it also covers graph inputs.
    """
    params = _activation_quantization(qdq_path)
    values = _float_values(pre_path, list(params), images)
    ranked = []
    for name, (scale, zero, info) in params.items():
        if name not in values:
            continue
        x = values[name].astype(np.float64)
        dq = (np.clip(np.round(x / scale) + zero, info.min, info.max) - zero) * scale
        ranked.append((name, sqnr_db(x, dq)))
    return sorted(ranked, key=lambda t: t[1])


def _activation_quantization(qdq_path: Path) -> dict[str, tuple[float, int, Any]]:
    """Scale, zero point and integer range (np.iinfo) of every activation tensor the QDQ model quantizes."""
    import onnx
    from onnx import numpy_helper

    qdq = onnx.load(str(qdq_path))
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    params = {}
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            scale, zero = inits[node.input[1]], inits[node.input[2]]
            params[node.input[0]] = (float(scale), int(zero), np.iinfo(zero.dtype))
    return params


def _float_values(pre_path: Path, names: list[str], images: np.ndarray) -> dict[str, np.ndarray]:
    """The float model's values of ``names`` (those it computes) and of its graph outputs and input on ``images``."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(pre_path))
    existing = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output}
    for name in names:
        if name in produced and name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    out_names = [o.name for o in session.get_outputs()]
    values = dict(zip(out_names, session.run(None, {INPUT_NAME: images}), strict=True))
    values[INPUT_NAME] = images
    return values


def nodes_touching(model_path: Path, tensors: list[str]) -> list[str]:
    """Names of the nodes that produce or consume ``tensors``: keeping them float keeps the tensor float."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    wanted, names = set(tensors), []
    for node in graph.node:
        if wanted & (set(node.output) | set(node.input)) and node.name not in names:
            names.append(node.name)
    return names
