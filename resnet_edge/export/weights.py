"""The quantized model's weights: ONNX Runtime's quantize_static in our INT8 scheme, and bias correction.

Weights are int8, symmetric, one scale per output channel (QuantizationConfig.per_channel, the
default); in the default "portable" scheme
(resnet_edge.core.int8) they are limited to [-64, 64] (ONNX Runtime's ``reduce_range``), so no int8
kernel of any CPU can saturate on them. Bias correction moves each quantized layer's float bias by the
mean effect of rounding its weights, measured on calibration images. No torch here.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.config import QuantizationConfig
from resnet_edge.core.contract import INPUT_NAME
from resnet_edge.core.int8 import scheme as int8_scheme
from resnet_edge.core.providers import CPU
from resnet_edge.export.calibration import _batches

MEAN_BATCH = 64  # images per run of the float model when bias correction measures its layers' mean inputs


def _quantize(
    pre_path: Path,
    out_path: Path,
    calib: np.ndarray,
    config: QuantizationConfig,
    exclude: list[str],
    progress: Callable[[int], None] | None,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> None:
    """quantize_static in our scheme; ``ranges`` (from activation_ranges) replace its own minmax ranges
    through ONNX Runtime's TensorQuantOverrides; the nodes in ``exclude`` stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    scheme = int8_scheme(config.scheme)
    act = QuantType.QInt8 if scheme.activation_type == "int8" else QuantType.QUInt8
    extra: dict[str, Any] = {"ActivationSymmetric": False, "WeightSymmetric": True}
    if ranges:
        extra["TensorQuantOverrides"] = {
            name: [{"rmin": np.float32(low), "rmax": np.float32(high)}] for name, (low, high) in ranges.items()
        }
    quantize_static(
        str(pre_path),
        str(out_path),
        _batches(calib, config.calibration_batch_size, progress),
        quant_format=QuantFormat.QDQ,
        per_channel=config.per_channel,
        activation_type=act,
        reduce_range=scheme.reduce_range,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        nodes_to_exclude=exclude or None,
        extra_options=extra,
    )


def rounded_models(
    pre: Path,
    work: Path,
    i: int,
    calib: np.ndarray,
    config: QuantizationConfig,
    ranges: dict[str, tuple[float, float]] | None,
    progress: Callable[[int], None] | None,
) -> list[tuple[str, Path, Path]]:
    """The models of candidate calibration ``i``, as (weights, float model, INT8 model): weights rounded to
    nearest and, with the search on, the same ranges with bias-corrected weights (when a layer can be)."""
    path = work / f"candidate-{i}.onnx"
    _quantize(pre, path, calib, config, [], progress, ranges)
    models = [("nearest", pre, path)]
    if config.search:
        corrected, corrected_path = work / f"pre-bias-corrected-{i}.onnx", work / f"candidate-{i}-bias.onnx"
        if bias_correction(pre, path, calib, corrected):
            _quantize(corrected, corrected_path, calib, config, [], None, ranges)
            models.append(("bias correction", corrected, corrected_path))
    return models


def bias_correction(pre_path: Path, qdq_path: Path, images: np.ndarray, out_path: Path) -> int:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization", 2019, sec. 4.2), for our int8
    weights (7-bit in the portable scheme): a rounded weight W_q = W + dW shifts each output channel's
    mean by dW applied to the mean input, E[dW x] = dW E[x]. Each Conv/Gemm bias of the float model
    ``pre_path`` gets that shift subtracted, with dW read from the quantized model ``qdq_path`` (its int8
    weights and scales, so the rounding is exactly what ONNX Runtime did) and E[x] per input channel
    measured on ``images`` (calibration images). Writes the corrected float model to ``out_path``;
    returns how many layers."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(pre_path))
    quantized = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(qdq_path)).graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
    layers = _correctable_layers(model, inits, quantized)
    if not layers:
        return 0
    means = _mean_inputs(pre_path, layers, images)
    for node, attrs in layers:
        weight = numpy_helper.to_array(inits[node.input[1]])
        shift = _rounding_shift(node, attrs, weight, quantized, means[node.input[0]])
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) - shift
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), node.input[2]))
    onnx.save(model, str(out_path))
    return len(layers)


def _correctable_layers(model: Any, inits: dict[str, Any], quantized: dict[str, np.ndarray]) -> list[tuple[Any, dict]]:
    """The Conv/Gemm nodes (with their attributes) whose weight was quantized and whose bias a shift can
    correct: constant weight and bias, a computed input, no groups, Gemm as a plain x W^T + b."""
    import onnx

    layers = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if (
            node.op_type in ("Conv", "Gemm")
            and len(node.input) == 3
            and node.input[1] in inits
            and node.input[2] in inits
            and f"{node.input[1]}_quantized" in quantized
            and attrs.get("group", 1) == 1
            and not attrs.get("transA", 0)
            and attrs.get("alpha", 1.0) == 1.0
            and attrs.get("beta", 1.0) == 1.0
            and node.input[0] not in inits
        ):
            layers.append((node, attrs))
    return layers


def _mean_inputs(pre_path: Path, layers: list[tuple[Any, dict]], images: np.ndarray) -> dict[str, np.ndarray]:
    """The mean of each layer's input per channel over ``images``, from the float model ``pre_path`` with
    those inputs made graph outputs."""
    import onnx
    import onnxruntime as ort

    probe = onnx.load(str(pre_path))
    existing = {o.name for o in probe.graph.output}
    for node, _ in layers:
        if node.input[0] not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[0]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=[CPU])
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(images), MEAN_BATCH):
        batch = images[i : i + MEAN_BATCH]
        values = dict(zip(names, session.run(None, {INPUT_NAME: batch}), strict=True))
        values[INPUT_NAME] = batch
        for node, _ in layers:  # a tensor that feeds two layers is summed twice and counted twice
            x = values[node.input[0]].astype(np.float64)
            axes = (0, *range(2, x.ndim))  # all but the channel axis
            total = x.sum(axis=axes)
            sums[node.input[0]] = (sums[node.input[0]] if node.input[0] in sums else 0) + total
            counts[node.input[0]] = counts.get(node.input[0], 0) + int(np.prod([x.shape[a] for a in axes]))
    return {name: sums[name] / counts[name] for name in sums}


def _rounding_shift(
    node: Any, attrs: dict, weight: np.ndarray, quantized: dict[str, np.ndarray], mean: np.ndarray
) -> np.ndarray:
    """dW E[x] per output channel: the rounding error of the layer's weight (dequantized int8 weight minus
    float weight) applied to its mean input, summed over the kernel's positions for a Conv."""
    q = quantized[f"{node.input[1]}_quantized"].astype(np.float64)
    scale = quantized[f"{node.input[1]}_scale"].astype(np.float64)
    zero = quantized[f"{node.input[1]}_zero_point"].astype(np.float64)
    weight = weight.astype(np.float64)
    if node.op_type == "Gemm" and not attrs.get("transB", 0):  # weight [in, out]: make it [out, in]
        weight, q = weight.T, q.T
    shape = (-1,) + (1,) * (weight.ndim - 1)  # per output channel (axis 0), or one scalar
    dequantized = (q - zero.reshape(shape) if zero.ndim else q - zero) * (scale.reshape(shape) if scale.ndim else scale)
    error = dequantized - weight
    return error.sum(axis=tuple(range(2, error.ndim))) @ mean if error.ndim > 2 else error @ mean
