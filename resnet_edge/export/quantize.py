"""Static INT8 quantization with onnxruntime.quantization, guarded by test accuracy: `export --quantize`.

Recipe: pre-processing (shape inference + graph optimization), QDQ format, int8 weights per output
channel, activations calibrated on training images, in the scheme of resnet_edge.core.int8 (default
"portable": uint8 activations, weights in [-64, 64], exact on every CPU). The search (int8_search) chooses
among candidate calibrations and weight roundings on held-out training images; its model is then
evaluated with FP32 on the test set, and when INT8 loses more than ``max_accuracy_drop`` points or
agrees with FP32 on fewer than ``min_agreement`` percent of the images, the activation tensors whose own
quantize-dequantize is worst (sensitivity.sensitivity_ranking: SNR of each tensor on real images, graph
input included) are kept in float, more of them each round, until the guard holds.
The steps live in calibration (images, ranges), weights (quantize_static in our scheme, bias correction),
sensitivity and int8_search; this module runs them, writes the model with its metadata, and gives
export_run the INT8 section of export.json (export_int8).
No torch here: quantization and its checks run on ONNX Runtime alone.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from resnet_edge.core.config import QuantizationConfig
from resnet_edge.core.contract import INT8_MODEL
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import atomic_path
from resnet_edge.core.int8 import audit_weights
from resnet_edge.core.int8 import scheme as int8_scheme
from resnet_edge.export.calibration import calibration_images
from resnet_edge.export.int8_search import GuardRound, Split, judging_splits, search_and_guard
from resnet_edge.export.sensitivity import sqnr_db

if TYPE_CHECKING:
    import onnx

    from resnet_edge.core.mnist import Dataset


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
    test, select, more_calib = judging_splits(
        fp32_path, train_images, train_labels, test_pixels, test_labels, config, bar
    )
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=".quantize-") as tmp:
        work = Path(tmp)
        pre = work / "pre.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        graph_nodes = len(onnx.load(str(pre)).graph.node)
        passed, rounds, tried, chosen = search_and_guard(
            pre, work, calib, train_images, select, test, config, bar, more_calib
        )
        model = _write(passed, out_path, config, chosen, len(chosen.get("_calib", calib)), metadata)
    int8, fp32, audit = passed.result, test.fp32, audit_weights(model)
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
        calibration_images=len(chosen.get("_calib", calib)),
        scheme=int8_scheme(config.scheme).metadata(config.per_channel),
        max_abs_weight=audit.max_abs_weight if audit else None,
        saturation_free=audit.saturation_free if audit else None,
        calibration=chosen["calibration"],
        weights=chosen["weights"],
        candidates=tried,
        selection=_selection_report(select),
    )


def _write(
    passed: GuardRound,
    out_path: Path,
    config: QuantizationConfig,
    chosen: dict[str, Any],
    calibrated_on: int,
    metadata: dict[str, str] | None,
) -> onnx.ModelProto:
    """The INT8 model that held the guard, with ``metadata`` and how it was quantized in its metadata_props,
    saved at ``out_path`` in one step (atomic_path); returns it."""
    import onnx

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
            "calibration_images": calibrated_on,
            "float_nodes": passed.float_nodes,
        }
    )
    props["int8_scheme"] = json.dumps(int8_scheme(config.scheme).metadata(config.per_channel))
    onnx.helper.set_model_props(model, props)
    with atomic_path(out_path) as final:
        onnx.save(model, str(final))
    return model


def _selection_report(select: Split | None) -> dict[str, Any]:
    """export.json's account of the images the search chose on (empty without the search)."""
    if select is None:
        return {}
    return {
        "images": len(select.pixels),
        "labels": select.labels is not None,
        "from": "training images the calibration did not see (seeded)",
        "fp32_accuracy": select.fp32.accuracy if select.labels is not None else None,
        "checked_on_test": "only the best candidate on this split; then float fallback rounds",
    }


def _check_scheme_measurable(name: str) -> None:
    """A scheme that saturates on this CPU would be judged here by answers it does not give elsewhere."""
    from resnet_edge.core.int8 import scheme
    from resnet_edge.core.machine import cpu_info

    cpu = cpu_info()
    if scheme(name).requires_int8_dot_product and cpu.u8s8_saturates:
        raise UserError(
            f"--scheme {name} needs a CPU with VNNI/AMX (or ARM) to be measured faithfully; this CPU "
            f"({cpu.model}) saturates on its 8-bit weights. Use the default --scheme portable"
        )


def export_int8(
    fp32_path: Path,
    int8_path: Path,
    run_dir: Path,
    dataset: Dataset,
    test: tuple[np.ndarray, np.ndarray],
    qconfig: QuantizationConfig,
    progress: Any,
    meta: dict[str, str],
) -> tuple[QuantizeResult, dict[str, Any]]:
    """model.int8.onnx, quantized and guarded by quantize_model into the staging folder; its result and
    export.json's INT8 section (final path)."""
    _check_scheme_measurable(qconfig.scheme)
    test_pixels, test_labels = test
    q = quantize_model(
        fp32_path,
        int8_path,
        dataset.train_images,
        test_pixels,
        test_labels,
        qconfig,
        progress=progress,
        metadata=meta,
        train_labels=dataset.train_labels,
    )
    return q, {
        "path": str(run_dir / INT8_MODEL),
        "bytes": int8_path.stat().st_size,
        "size_ratio": int8_path.stat().st_size / fp32_path.stat().st_size,
        **{k: v for k, v in asdict(q).items() if not k.startswith("fp32_") and k != "calibration_images"},
        "accuracy_holds": (
            "on every CPU: no int8 kernel can saturate on its weights"
            if q.saturation_free
            else "only on x86 CPUs with VNNI/AMX and on ARM (int8 dot-product instructions)"
        ),
    }
