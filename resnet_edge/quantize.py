"""Static INT8 quantization with onnxruntime.quantization, guarded by test accuracy.

Recipe: pre-processing (shape inference + graph optimization), QDQ format, int8 weights per output
channel, activations calibrated on training images, in the scheme of int8.py (default "portable":
uint8 activations, weights in [-64, 64], exact on every CPU). Both models are then evaluated on the
whole test set; when INT8 loses more than ``max_accuracy_drop`` points, the activation tensors whose
own quantize-dequantize is worst (our ranking: SNR of each tensor on real images, graph input
included) are kept in float, more of them each round, until the guard holds.
No torch here: quantization and its checks run on ONNX Runtime alone.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .contract import to_pixels
from .errors import UserError
from .files import atomic_path
from .config import QuantizationConfig
from .int8 import audit_weights
from .int8 import scheme as int8_scheme
from .contract import INPUT_NAME
from .runtime import EvalResult, create_session, evaluate_session

log = logging.getLogger(__name__)



class AccuracyGuardError(UserError):
    """INT8 loses more accuracy than allowed even with layers kept in float."""


def _batches(images: np.ndarray, batch_size: int, progress: Callable[[int], None] | None = None) -> Any:
    """onnxruntime's CalibrationDataReader over an array of images, with a progress hook."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def _gen(self) -> Iterator[dict[str, np.ndarray]]:
            for i in range(0, len(images), batch_size):
                batch = images[i:i + batch_size]
                if progress:
                    progress(len(batch))
                yield {INPUT_NAME: batch}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = self._gen()

    return Batches()


def calibration_images(train_images: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded random subset of the training images (never test images: they judge the result), as
    model input; uint8 [N, 28, 28] images are converted after sampling, so only the subset is."""
    rng = np.random.default_rng(seed)
    subset = train_images[np.sort(rng.choice(len(train_images), size=min(size, len(train_images)), replace=False))]
    return np.ascontiguousarray(to_pixels(subset) if subset.dtype == np.uint8 else subset)


def _quantize(pre_path: Path, out_path: Path, calib: np.ndarray, config: QuantizationConfig,
              exclude: list[str], progress: Callable[[int], None] | None) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    scheme = int8_scheme(config.scheme)
    act = QuantType.QInt8 if scheme.activation_type == "int8" else QuantType.QUInt8
    quantize_static(str(pre_path), str(out_path), _batches(calib, config.calibration_batch_size, progress),
                    quant_format=QuantFormat.QDQ, per_channel=config.per_channel, activation_type=act,
                    reduce_range=scheme.reduce_range,
                    weight_type=QuantType.QInt8, calibrate_method=method, nodes_to_exclude=exclude or None,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})


def sensitivity_ranking(pre_path: Path, qdq_path: Path, images: np.ndarray) -> list[tuple[str, float]]:
    """Activation tensors ranked worst first by the SNR (dB) of their own quantize-dequantize.

    For every tensor the QDQ model quantizes (the graph input included), the float model's values on
    real images go through that tensor's scale and zero point; a low SNR means a range that clips or
    wastes levels. Like onnxruntime's qdq_loss_debug, but it also covers graph inputs.
    """
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    qdq = onnx.load(str(qdq_path))
    inits = {t.name: numpy_helper.to_array(t) for t in qdq.graph.initializer}
    params = {}
    for node in qdq.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            scale, zero = inits[node.input[1]], inits[node.input[2]]
            params[node.input[0]] = (float(scale), int(zero), np.iinfo(zero.dtype))
    model = onnx.load(str(pre_path))
    existing = {o.name for o in model.graph.output}
    produced = {o for n in model.graph.node for o in n.output}
    for name in params:
        if name in produced and name not in existing:
            model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in session.get_outputs()]
    values = dict(zip(out_names, session.run(None, {INPUT_NAME: images})))
    values[INPUT_NAME] = images
    ranked = []
    for name, (scale, zero, info) in params.items():
        if name not in values:
            continue
        x = values[name].astype(np.float64)
        dq = (np.clip(np.round(x / scale) + zero, info.min, info.max) - zero) * scale
        ranked.append((name, sqnr_db(x, dq)))
    return sorted(ranked, key=lambda t: t[1])


def _nodes_touching(model_path: Path, tensors: list[str]) -> list[str]:
    """Names of the nodes that produce or consume ``tensors``: keeping them float keeps the tensor float."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    wanted, names = set(tensors), []
    for node in graph.node:
        if wanted & (set(node.output) | set(node.input)) and node.name not in names:
            names.append(node.name)
    return names


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


@dataclass
class QuantizeResult:
    """What export.json reports about the INT8 model; field names are export.json's."""

    fp32_accuracy: float
    fp32_images_per_second: float
    test_accuracy: float
    images_per_second: float
    accuracy_drop_points: float
    top1_agreement: float
    logits_sqnr_db: float
    float_nodes: list[str]  # nodes the guard kept in float
    graph_nodes: int
    guard_rounds: list[dict[str, Any]]
    calibration_images: int
    scheme: dict[str, Any]
    max_abs_weight: int | None
    saturation_free: bool | None


@dataclass
class _Round:
    model: Path
    result: EvalResult
    float_nodes: list[str]


def _guarded_rounds(pre: Path, work: Path, calib: np.ndarray, train_images: np.ndarray, test_pixels: np.ndarray,
                    test_labels: np.ndarray, fp32: EvalResult, config: QuantizationConfig,
                    bar: Callable[[str, int], Callable[[int], None] | None]) -> tuple[_Round, list[dict[str, Any]]]:
    """Quantize, measure, and keep the worst-quantized tensors in float (1, 2, 4, ... of them) until the
    accuracy guard holds; returns the passing round and the log of every round."""
    import onnx

    graph_nodes = len(onnx.load(str(pre)).graph.node)
    exclude: list[str] = []
    ranking: list[tuple[str, float]] | None = None
    rounds: list[dict[str, Any]] = []
    keep_float = 0  # how many of the worst-quantized tensors stay float
    while True:
        candidate = work / f"int8-{len(rounds)}.onnx"
        _quantize(pre, candidate, calib, config, exclude, bar("calibrate", len(calib)))
        int8 = evaluate_session(create_session(candidate, "cpu"), test_pixels, test_labels,
                                progress=bar("evaluate INT8", len(test_pixels)))
        drop = 100 * (fp32.accuracy - int8.accuracy)
        rounds.append({"float_nodes": list(exclude), "int8_accuracy": int8.accuracy, "drop_points": drop})
        log.info("INT8 accuracy %.4f (drop %.3f points) with %d nodes in float", int8.accuracy, drop, len(exclude))
        if drop <= config.max_accuracy_drop + 1e-9:
            return _Round(candidate, int8, exclude), rounds
        if ranking is None:
            probe = calibration_images(train_images, 128, config.seed + 1)  # real data, not the calibration set
            ranking = sensitivity_ranking(pre, candidate, probe)
        keep_float = max(1, 2 * keep_float)
        if keep_float >= len(ranking):  # every quantized tensor in float: no INT8 model worth the name
            best = min(rounds, key=lambda r: r["drop_points"])
            raise AccuracyGuardError(
                f"INT8 loses {best['drop_points']:.2f} points of test accuracy ({100 * fp32.accuracy:.2f} % -> "
                f"{100 * best['int8_accuracy']:.2f} %), more than --max-accuracy-drop {config.max_accuracy_drop:g}; "
                f"keeping up to {len(exclude)} of {graph_nodes} nodes in float did not bring it within the "
                "guard; no INT8 model was written (try --calibration-size, --calibration-method)")
        exclude = _nodes_touching(pre, [name for name, _ in ranking[:keep_float]])


def quantize_model(fp32_path: Path, out_path: Path, train_images: np.ndarray, test_pixels: np.ndarray,
                   test_labels: np.ndarray, config: QuantizationConfig,
                   progress: Callable[[str, int], Callable[[int], None]] | None = None,
                   metadata: dict[str, str] | None = None) -> QuantizeResult:
    """Quantize ``fp32_path`` to ``out_path`` and prove the accuracy (test set, against FP32).

    ``progress(description, total)`` returns a callback advanced by images done. On failure nothing
    is written at ``out_path``.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    def bar(description: str, total: int) -> Callable[[int], None] | None:
        return progress(description, total) if progress else None

    calib = calibration_images(train_images, config.calibration_size, config.seed)
    fp32 = evaluate_session(create_session(fp32_path, "cpu"), test_pixels, test_labels,
                            progress=bar("evaluate FP32", len(test_pixels)))
    scheme = int8_scheme(config.scheme).metadata(config.per_channel)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        graph_nodes = len(onnx.load(str(pre)).graph.node)
        passed, rounds = _guarded_rounds(pre, work, calib, train_images, test_pixels, test_labels, fp32, config, bar)
        model = onnx.load(str(passed.model))
        props = dict(metadata or {})
        props["quantization"] = json.dumps({**asdict(config), "format": "QDQ", "weight_type": "int8",
                                            "float_nodes": passed.float_nodes})
        props["int8_scheme"] = json.dumps(scheme)
        onnx.helper.set_model_props(model, props)
        with atomic_path(out_path) as final:
            onnx.save(model, str(final))
    int8, audit = passed.result, audit_weights(model)
    return QuantizeResult(
        fp32_accuracy=fp32.accuracy, fp32_images_per_second=fp32.images_per_second,
        test_accuracy=int8.accuracy, images_per_second=int8.images_per_second,
        accuracy_drop_points=100 * (fp32.accuracy - int8.accuracy),
        top1_agreement=float((int8.predictions == fp32.predictions).mean()),
        logits_sqnr_db=sqnr_db(fp32.logits, int8.logits), float_nodes=passed.float_nodes, graph_nodes=graph_nodes,
        guard_rounds=rounds, calibration_images=len(calib), scheme=scheme,
        max_abs_weight=audit.max_abs_weight if audit else None, saturation_free=audit.saturation_free if audit else None)
