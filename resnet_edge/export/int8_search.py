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

import contextlib
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.config import QuantizationConfig
from resnet_edge.core.contract import INPUT_NAME, to_pixels
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import atomic_path
from resnet_edge.core.int8 import audit_weights
from resnet_edge.core.int8 import scheme as int8_scheme
from resnet_edge.core.providers import CPU
from resnet_edge.inference.runtime import EvalResult, create_session, evaluate_session

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
                batch = images[i : i + batch_size]
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
    subset = train_images[_calibration_indices(len(train_images), size, seed)]
    return np.ascontiguousarray(to_pixels(subset) if subset.dtype == np.uint8 else subset)


def _calibration_indices(n: int, size: int, seed: int) -> np.ndarray:
    """The seeded draw of calibration images (sorted indices): one place, so the selection split excludes
    exactly the images calibration_images takes."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


@dataclass(frozen=True)
class Calibration:
    """One way to set the activation ranges: a calibration method and, for percentile, its percentile."""

    method: str  # minmax | entropy | percentile
    percentile: float | None = None

    @property
    def name(self) -> str:
        return self.method if self.percentile is None else f"{self.method} {self.percentile:g}"


# The search's candidates after the one --calibration-method names (tried first): the ranges of every
# activation tensor from its whole calibration range (minmax), the KL-divergence threshold of TensorRT's
# entropy calibration, and histogram percentiles that clip the rarest values (ONNX Runtime's calibrators).
# Entropy is not among them: its threshold search (pure Python over 2048 bins per tensor) made resnet8's export
# take 32-36 s against 11-12 s for minmax (benchmarks/int8_quality.py, 2-core AMD EPYC);
# --calibration-method entropy tries it.
SEARCH = (
    Calibration("minmax"),
    Calibration("percentile", 99.999),
    Calibration("percentile", 99.99),
    Calibration("percentile", 99.9),
)
DEFAULT_PERCENTILE = 99.999  # ONNX Runtime's own default
HISTOGRAM_BINS = 2048
# ONNX Runtime's entropy calibrator defaults to 128 histogram bins and 128 quantized bins: its threshold
# search then has exactly one candidate, the whole range, and "entropy" gives minmax's ranges byte for
# byte. With 2048 bins (TensorRT's recipe) it searches thresholds from 128 bins up.
ENTROPY_QUANTIZED_BINS = 128


def candidates(config: QuantizationConfig) -> list[Calibration]:
    """--calibration-method first, then (with the search on) the others of SEARCH."""
    first = Calibration(config.method, DEFAULT_PERCENTILE if config.method == "percentile" else None)
    return [first] + ([c for c in SEARCH if c != first] if config.search else [])


def activation_ranges(
    pre_path: Path, calib: np.ndarray, calibration: Calibration, batch_size: int, work: Path
) -> dict[str, tuple[float, float]] | None:
    """(min, max) of every activation tensor by ``calibration``, with ONNX Runtime's calibrators; None for
    minmax, which quantize_static computes itself."""
    if calibration.method == "minmax":
        return None
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    if calibration.method == "entropy":
        method, extra = (
            CalibrationMethod.Entropy,
            {"num_bins": HISTOGRAM_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS},
        )
    else:
        method, extra = CalibrationMethod.Percentile, {"num_bins": HISTOGRAM_BINS, "percentile": calibration.percentile}
    augmented = work / f"augmented-{calibration.name.replace(' ', '-')}.onnx"
    calibrator = create_calibrator(
        str(pre_path), None, augmented_model_path=str(augmented), calibrate_method=method, extra_options=extra
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibrators print their progress
            calibrator.collect_data(_batches(calib, batch_size))
            data = calibrator.compute_data()
    finally:
        augmented.unlink(missing_ok=True)
    ranges = {}
    for name in data:
        low, high = data[name].range_value
        ranges[name] = (float(np.min(low)), float(np.max(high)))
    return ranges


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
    through ONNX Runtime's TensorQuantOverrides."""
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
    session = ort.InferenceSession(model.SerializeToString(), providers=[CPU])
    out_names = [o.name for o in session.get_outputs()]
    values = dict(zip(out_names, session.run(None, {INPUT_NAME: images}), strict=True))
    values[INPUT_NAME] = images
    ranked = []
    for name, (scale, zero, info) in params.items():
        if name not in values:
            continue
        x = values[name].astype(np.float64)
        dq = (np.clip(np.round(x / scale) + zero, info.min, info.max) - zero) * scale
        ranked.append((name, sqnr_db(x, dq)))
    return sorted(ranked, key=lambda t: t[1])


def bias_correction(pre_path: Path, qdq_path: Path, images: np.ndarray, out_path: Path) -> int:
    """Empirical bias correction (Nagel et al., "Data-Free Quantization", 2019, sec. 4.2), for our 7-bit
    weights: a rounded weight W_q = W + dW shifts each output channel's mean by dW applied to the mean
    input, E[dW x] = dW E[x]. Each Conv/Gemm bias of the float model ``pre_path`` gets that shift
    subtracted, with dW read from the quantized model ``qdq_path`` (its int8 weights and scales, so the
    rounding is exactly what ONNX Runtime did) and E[x] per input channel measured on ``images``
    (calibration images). Writes the corrected float model to ``out_path``; returns how many layers."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(str(pre_path))
    quantized = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(qdq_path)).graph.initializer}
    inits = {t.name: t for t in model.graph.initializer}
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
    if not layers:
        return 0
    existing = {o.name for o in model.graph.output}
    probe = onnx.load(str(pre_path))
    for node, _ in layers:
        if node.input[0] not in existing:
            probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(node.input[0]))
    session = ort.InferenceSession(probe.SerializeToString(), providers=[CPU])
    names = [o.name for o in session.get_outputs()]
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for i in range(0, len(images), 64):
        values = dict(zip(names, session.run(None, {INPUT_NAME: images[i : i + 64]}), strict=True))
        values[INPUT_NAME] = images[i : i + 64]
        for node, _ in layers:
            x = values[node.input[0]].astype(np.float64)
            axes = (0, *range(2, x.ndim))  # all but the channel axis
            sums[node.input[0]] = sums.get(node.input[0], 0) + x.sum(axis=axes)
            counts[node.input[0]] = counts.get(node.input[0], 0) + int(np.prod([x.shape[a] for a in axes]))
    for node, attrs in layers:
        mean = sums[node.input[0]] / counts[node.input[0]]
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        q = quantized[f"{node.input[1]}_quantized"].astype(np.float64)
        scale = quantized[f"{node.input[1]}_scale"].astype(np.float64)
        zero = quantized[f"{node.input[1]}_zero_point"].astype(np.float64)
        if node.op_type == "Gemm" and not attrs.get("transB", 0):  # weight [in, out]: make it [out, in]
            weight, q = weight.T, q.T
        shape = (-1,) + (1,) * (weight.ndim - 1)  # per output channel (axis 0), or one scalar
        dequantized = (q - zero.reshape(shape) if zero.ndim else q - zero) * (
            scale.reshape(shape) if scale.ndim else scale
        )
        error = dequantized - weight
        shift = error.sum(axis=tuple(range(2, error.ndim))) @ mean if error.ndim > 2 else error @ mean
        bias = numpy_helper.to_array(inits[node.input[2]]).astype(np.float64) - shift
        inits[node.input[2]].CopyFrom(numpy_helper.from_array(bias.astype(np.float32), node.input[2]))
    onnx.save(model, str(out_path))
    return len(layers)


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
    calibration: str = "minmax"  # the calibration chosen by the search
    weights: str = "nearest"  # how the weights were rounded: nearest | bias correction
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every candidate the search tried
    selection: dict[str, Any] = field(default_factory=dict)  # the images the search chose on


@dataclass
class _Round:
    model: Path
    result: EvalResult
    float_nodes: list[str]


@dataclass
class _Split:
    """Images a stage judges on, with the FP32 model's answers on them."""

    pixels: np.ndarray
    labels: np.ndarray | None
    fp32: EvalResult

    def judge(self, result: EvalResult) -> dict[str, float | None]:
        agreement = float((result.predictions == self.fp32.predictions).mean())
        drop = None if self.labels is None else 100 * (self.fp32.accuracy - result.accuracy)
        return {
            "accuracy": None if self.labels is None else result.accuracy,
            "drop_points": drop,
            "agreement": agreement,
        }


def _holds(judged: dict[str, float | None], config: QuantizationConfig) -> bool:
    drop_ok = judged["drop_points"] is None or judged["drop_points"] <= config.max_accuracy_drop + 1e-9
    return drop_ok and 100 * judged["agreement"] >= config.min_agreement - 1e-9  # type: ignore[operator]


MIN_SELECTION = 100  # held-out training images the search needs at least


def selection_split(
    train_images: np.ndarray, train_labels: np.ndarray | None, config: QuantizationConfig
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Training images the calibration did not see (seeded), on which the search chooses: choosing on test
    images would make the reported test accuracy a selected figure. Also --calibration-size more training
    images outside both, for the search's larger-calibration candidate (fewer when the set is small)."""
    n = len(train_images)
    calib = set(_calibration_indices(n, config.calibration_size, config.seed).tolist())
    rest = np.array([i for i in range(n) if i not in calib], dtype=np.int64)
    if len(rest) < MIN_SELECTION:
        raise UserError(
            f"--calibration-size {config.calibration_size} leaves {len(rest)} of the {n} training images for the "
            f"search to choose on (it needs {MIN_SELECTION} the calibration did not see); give a smaller "
            "--calibration-size, or --no-search"
        )
    rng = np.random.default_rng(config.seed + 2)
    picked = np.sort(rng.choice(rest, size=min(config.selection_size, len(rest)), replace=False))
    unused = np.setdiff1d(rest, picked)
    more = (
        np.sort(
            np.random.default_rng(config.seed + 4).choice(
                unused, size=min(config.calibration_size, len(unused)), replace=False
            )
        )
        if len(unused)
        else unused
    )
    images, extra = train_images[picked], train_images[more]
    pixels = np.ascontiguousarray(to_pixels(images) if images.dtype == np.uint8 else images)
    extra = np.ascontiguousarray(to_pixels(extra) if extra.dtype == np.uint8 else extra)
    return pixels, None if train_labels is None else np.asarray(train_labels)[picked].astype(np.int64), extra


def _evaluate(path: Path, split: _Split, progress: Callable[[int], None] | None = None) -> EvalResult:
    labels = split.labels if split.labels is not None else np.zeros(len(split.pixels), np.int64)
    return evaluate_session(create_session(path, "cpu"), split.pixels, labels, progress=progress)


def _search(
    pre: Path,
    work: Path,
    calib: np.ndarray,
    select: _Split | None,
    config: QuantizationConfig,
    bar: Callable[[str, int], Callable[[int], None] | None],
    more_calib: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Quantize with every candidate calibration (no float layers), each with its weights rounded to nearest
    and (with the search on) bias-corrected, and judge each on the selection split; the log, best first
    (highest agreement with FP32, then accuracy), each with its model, float model and ranges."""
    tried: list[dict[str, Any]] = []
    for i, calibration in enumerate(candidates(config)):
        t0 = time.perf_counter()
        ranges = activation_ranges(pre, calib, calibration, config.calibration_batch_size, work)
        path = work / f"candidate-{i}.onnx"
        _quantize(pre, path, calib, config, [], bar(f"calibrate {calibration.name}", len(calib)), ranges)
        weights = [("nearest", pre, path)]
        if config.search:  # the same ranges with bias-corrected weights: a second candidate
            corrected, corrected_path = work / f"pre-bias-corrected-{i}.onnx", work / f"candidate-{i}-bias.onnx"
            if bias_correction(pre, path, calib, corrected):
                _quantize(corrected, corrected_path, calib, config, [], None, ranges)
                weights.append(("bias correction", corrected, corrected_path))
        for method, model_pre, model in weights:
            judged = (
                select.judge(_evaluate(model, select, bar("select", len(select.pixels))))
                if select is not None
                else {"accuracy": None, "drop_points": None, "agreement": None}
            )
            tried.append(
                {
                    "calibration": calibration.name,
                    "weights": method,
                    "float_nodes": 0,
                    "calibration_images": len(calib),
                    **{f"selection_{k}": v for k, v in judged.items()},
                    "seconds": time.perf_counter() - t0,
                    "_model": model,
                    "_pre": model_pre,
                    "_ranges": ranges,
                    "_calibration": calibration,
                }
            )
            log.info(
                "candidate %s, %s: agreement %s, drop %s",
                calibration.name,
                method,
                judged["agreement"],
                judged["drop_points"],
            )
    ranked = _rank(tried)
    if select is not None and more_calib is not None and len(more_calib):
        ranked = _more_calibration(ranked, pre, work, calib, more_calib, select, config, bar)
    if select is not None and len(ranked) > 1:
        ranked = _refine_sensitive_tensors(ranked, pre, work, calib, select, config, bar)
    return ranked


def _rank(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda r: (-(r["selection_agreement"] or 0.0), -(r["selection_accuracy"] or 0.0)))


def _more_calibration(
    ranked: list[dict[str, Any]],
    pre: Path,
    work: Path,
    calib: np.ndarray,
    more: np.ndarray,
    select: _Split,
    config: QuantizationConfig,
    bar: Callable[[str, int], Callable[[int], None] | None],
) -> list[dict[str, Any]]:
    """One more candidate: the best calibration again on a larger calibration set (the calibration images
    and as many more, none of them in the selection split), weights rounded to nearest."""
    t0 = time.perf_counter()
    best = ranked[0]
    big = np.concatenate([calib, more])
    ranges = activation_ranges(pre, big, best["_calibration"], config.calibration_batch_size, work)
    path = work / "candidate-more-calibration.onnx"
    _quantize(pre, path, big, config, [], bar(f"calibrate on {len(big)}", len(big)), ranges)
    judged = select.judge(_evaluate(path, select, bar("select", len(select.pixels))))
    row = {
        "calibration": f"{best['_calibration'].name}, {len(big)} calibration images",
        "weights": "nearest",
        "float_nodes": 0,
        "calibration_images": len(big),
        **{f"selection_{k}": v for k, v in judged.items()},
        "seconds": time.perf_counter() - t0,
        "_model": path,
        "_pre": pre,
        "_ranges": ranges,
        "_calibration": best["_calibration"],
        "_calib": big,
    }
    log.info("candidate %s: agreement %s, drop %s", row["calibration"], judged["agreement"], judged["drop_points"])
    return _rank([*ranked, row])


SENSITIVE_TENSORS = 3  # the refinement gives this many of the worst-quantized tensors another range


def _refine_sensitive_tensors(
    ranked: list[dict[str, Any]],
    pre: Path,
    work: Path,
    calib: np.ndarray,
    select: _Split,
    config: QuantizationConfig,
    bar: Callable[[str, int], Callable[[int], None] | None],
) -> list[dict[str, Any]]:
    """One more candidate: the best one with its SENSITIVE_TENSORS worst-quantized activation tensors (our
    SNR ranking on held-out images) given a tighter percentile range (per-tensor overrides, as NNCF's and
    INC's tuning do per layer), the other tensors as they were. Judged on the selection split like the rest."""
    t0 = time.perf_counter()
    best = ranked[0]
    tighter = {None: 99.99, 99.999: 99.99, 99.99: 99.9, 99.9: 99.0}.get(best["_calibration"].percentile, 99.99)
    alternative = Calibration("percentile", tighter)
    own = best.get("_calib", calib)  # the calibration set of the candidate refined, for every range
    alt_ranges = activation_ranges(pre, own, alternative, config.calibration_batch_size, work) or {}
    probe = calibration_images(select.pixels, 128, config.seed + 3)  # held-out images, not the calibration set
    worst = [name for name, _ in sensitivity_ranking(best["_pre"], best["_model"], probe) if name in alt_ranges]
    if not worst:
        return ranked
    chosen = worst[:SENSITIVE_TENSORS]
    ranges = {**(best["_ranges"] or {}), **{name: alt_ranges[name] for name in chosen}}
    path = work / "candidate-sensitive.onnx"
    _quantize(best["_pre"], path, own, config, [], bar("calibrate sensitive tensors", len(own)), ranges)
    judged = select.judge(_evaluate(path, select, bar("select", len(select.pixels))))
    row = {
        "calibration": f"{best['calibration']}, {alternative.name} on {len(chosen)} sensitive tensors",
        "weights": best["weights"],
        "float_nodes": 0,
        "overridden_tensors": chosen,
        "calibration_images": len(own),
        **{f"selection_{k}": v for k, v in judged.items()},
        "seconds": time.perf_counter() - t0,
        "_model": path,
        "_pre": best["_pre"],
        "_ranges": ranges,
        "_calibration": best["_calibration"],
        "_calib": own,
    }
    log.info("candidate %s: agreement %s, drop %s", row["calibration"], judged["agreement"], judged["drop_points"])
    return _rank([*ranked, row])


def _guarded(
    pre: Path,
    work: Path,
    calib: np.ndarray,
    train_images: np.ndarray,
    select: _Split | None,
    test: _Split,
    config: QuantizationConfig,
    bar: Callable[[str, int], Callable[[int], None] | None],
    more_calib: np.ndarray | None = None,
) -> tuple[_Round, list[dict[str, Any]], list[dict[str, Any]], dict[str, Any]]:
    """The search for the best quantized model, then, only if it does not hold the guard, float fallback:
    the worst-quantized tensors (1, 2, 4, ... of them, by sensitivity_ranking) kept in float.

    The candidates are ranked on the selection split (held-out training images): the best whose agreement
    there reaches --min-agreement (else the best) is the search's model, and it alone is checked against
    the guard on the test set, the promise `export` makes: nothing is chosen among candidates by test
    images. Fallback starts from it, its rounds checked on the test set as the guard always was."""
    import onnx

    graph_nodes = len(onnx.load(str(pre)).graph.node)
    tried = _search(pre, work, calib, select, config, bar, more_calib)
    eligible = [
        r
        for r in tried
        if r["selection_agreement"] is None or 100 * r["selection_agreement"] >= config.min_agreement - 1e-9
    ]
    best = (eligible or tried)[0]
    ranges, best_pre, path = best["_ranges"], best["_pre"], best["_model"]
    checked: list[dict[str, Any]] = []
    exclude: list[str] = []
    keep_float, ranking = 0, None
    while True:
        int8 = _evaluate(path, test, bar("evaluate INT8", len(test.pixels)))
        on_test = test.judge(int8)
        holds = _holds(on_test, config)
        checked.append(
            {
                "calibration": best["calibration"],
                "weights": best["weights"],
                "float_nodes": list(exclude),
                "int8_accuracy": int8.accuracy,
                "drop_points": on_test["drop_points"],
                "agreement": on_test["agreement"],
                "holds": holds,
            }
        )
        if not exclude:
            best.update(
                test_accuracy=int8.accuracy,
                test_drop_points=on_test["drop_points"],
                test_agreement=on_test["agreement"],
                holds=holds,
            )
        log.info(
            "INT8 with %d nodes in float: accuracy %.4f, agreement %.4f",
            len(exclude),
            int8.accuracy,
            on_test["agreement"],
        )
        if holds:
            best["chosen"] = True
            return _Round(path, int8, exclude), checked, _public(tried), best
        if ranking is None:
            ranking = sensitivity_ranking(best_pre, path, calibration_images(train_images, 128, config.seed + 1))
        keep_float = max(1, 2 * keep_float)
        if keep_float >= len(ranking):  # every quantized tensor in float: no INT8 model worth the name
            break
        exclude = _nodes_touching(best_pre, [name for name, _ in ranking[:keep_float]])
        path = work / f"int8-float-{keep_float}.onnx"
        own = best.get("_calib", calib)
        if best["weights"] == "bias correction":
            # the layers kept in float keep their float weights, so they must keep their own biases too:
            # quantize the plain model, then correct only the layers that were quantized (those with int8
            # weights), then quantize that with the same float layers and ranges
            plain, corrected = work / f"int8-float-{keep_float}-plain.onnx", work / f"pre-float-{keep_float}.onnx"
            _quantize(pre, plain, own, config, exclude, None, ranges)
            bias_correction(pre, plain, own, corrected)
            _quantize(corrected, path, own, config, exclude, bar("calibrate", len(own)), ranges)
        else:
            _quantize(best_pre, path, own, config, exclude, bar("calibrate", len(own)), ranges)
    closest = max(checked, key=lambda r: r["agreement"])
    raise AccuracyGuardError(
        f"INT8 loses {closest['drop_points']:.2f} points of test accuracy ({100 * test.fp32.accuracy:.2f} % -> "
        f"{100 * closest['int8_accuracy']:.2f} %) and agrees with FP32 on {100 * closest['agreement']:.2f} % of the "
        f"test images at best, against --max-accuracy-drop {config.max_accuracy_drop:g} and --min-agreement "
        f"{config.min_agreement:g}; the search ({len(tried)} candidates) and keeping up to "
        f"{len(exclude)} of {graph_nodes} nodes in float did not bring it within the guard; no INT8 model was "
        "written (try --calibration-size, or a looser guard)"
    )


def _public(tried: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The search's log as export.json keeps it (no paths or ranges)."""
    return [{k: v for k, v in row.items() if not k.startswith("_")} for row in tried]


def quantize_model(
    fp32_path: Path,
    out_path: Path,
    train_images: np.ndarray,
    test_pixels: np.ndarray,
    test_labels: np.ndarray,
    config: QuantizationConfig,
    progress: Callable[[str, int], Callable[[int], None]] | None = None,
    metadata: dict[str, str] | None = None,
    train_labels: np.ndarray | None = None,
) -> QuantizeResult:
    """Quantize ``fp32_path`` to ``out_path`` and prove the accuracy (test set, against FP32).

    The search chooses among candidate calibrations on a selection split of training images the
    calibration did not see (with ``train_labels`` it judges accuracy there too, else agreement only);
    the test set only reports, and the model written must hold the guard on it.
    ``progress(description, total)`` returns a callback advanced by images done. On failure nothing
    is written at ``out_path``.
    """
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    def bar(description: str, total: int) -> Callable[[int], None] | None:
        return progress(description, total) if progress else None

    calib = calibration_images(train_images, config.calibration_size, config.seed)
    fp32_session = create_session(fp32_path, "cpu")
    fp32 = evaluate_session(fp32_session, test_pixels, test_labels, progress=bar("evaluate FP32", len(test_pixels)))
    test = _Split(test_pixels, test_labels, fp32)
    select, more_calib = None, None
    if config.search:  # one candidate needs no choosing
        select_pixels, select_labels, more_calib = selection_split(train_images, train_labels, config)
        fp32_select = evaluate_session(
            fp32_session,
            select_pixels,
            select_labels if select_labels is not None else np.zeros(len(select_pixels), np.int64),
        )
        select = _Split(select_pixels, select_labels, fp32_select)
    scheme = int8_scheme(config.scheme).metadata(config.per_channel)
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        graph_nodes = len(onnx.load(str(pre)).graph.node)
        passed, rounds, tried, chosen = _guarded(pre, work, calib, train_images, select, test, config, bar, more_calib)
        model = onnx.load(str(passed.model))
        props = dict(metadata or {})
        settings = asdict(config)
        settings["requested_method"] = settings.pop("method")  # what was asked; "calibration": what was chosen
        props["quantization"] = json.dumps(
            {
                **settings,
                "format": "QDQ",
                "weight_type": "int8",
                "calibration": chosen["calibration"],
                "weights": chosen["weights"],
                "calibration_images": len(chosen.get("_calib", calib)),
                "float_nodes": passed.float_nodes,
            }
        )
        props["int8_scheme"] = json.dumps(scheme)
        onnx.helper.set_model_props(model, props)
        with atomic_path(out_path) as final:
            onnx.save(model, str(final))
    int8, audit = passed.result, audit_weights(model)
    used = len(chosen.get("_calib", calib))
    return QuantizeResult(
        fp32_accuracy=fp32.accuracy,
        fp32_images_per_second=fp32.images_per_second,
        test_accuracy=int8.accuracy,
        images_per_second=int8.images_per_second,
        accuracy_drop_points=100 * (fp32.accuracy - int8.accuracy),
        top1_agreement=float((int8.predictions == fp32.predictions).mean()),
        logits_sqnr_db=sqnr_db(fp32.logits, int8.logits),
        float_nodes=passed.float_nodes,
        graph_nodes=graph_nodes,
        guard_rounds=rounds,
        calibration_images=used,
        scheme=scheme,
        max_abs_weight=audit.max_abs_weight if audit else None,
        saturation_free=audit.saturation_free if audit else None,
        calibration=chosen["calibration"],
        weights=chosen["weights"],
        candidates=tried,
        selection={}
        if select is None
        else {
            "images": len(select.pixels),
            "labels": select.labels is not None,
            "from": "training images the calibration did not see (seeded)",
            "fp32_accuracy": select.fp32.accuracy if select.labels is not None else None,
            "checked_on_test": "only the best candidate on this split; then float fallback rounds",
        },
    )
