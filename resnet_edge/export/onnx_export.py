"""PyTorch -> ONNX to the model contract, with the checks that prove the file is faithful.

The contract (core/contract.py, docs/DESIGN.md): input ``pixels`` float32 [batch, 1, 28, 28] in [0, 1],
normalization inside the graph; output ``logits`` float32 [batch, 10]; a dynamic batch dimension;
metadata_props that describe the model. Every export is checked with onnx's full checker and against
PyTorch on real test images at several batch sizes; a model that fails is never left on disk.
"""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import torch
from torch import nn

from resnet_edge.core.config import QuantizationConfig
from resnet_edge.core.contract import (
    BATCH_DIM,
    DEPLOY_DIR,
    EXPORT_REPORT,
    FP16_MODEL,
    FP32_MODEL,
    INPUT_NAME,
    INPUT_SHAPE,
    INT8_MODEL,
    LABELS,
    NUM_CLASSES,
    OUTPUT_NAME,
)
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import atomic_path, write_json
from resnet_edge.inference.runtime import create_session

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
PARITY_BATCH_SIZES = (1, 7, 64)
PARITY_ATOL = 1e-4


class ParityError(UserError):
    """The ONNX model does not reproduce PyTorch; the message gives shape and value failures apart."""


@dataclass
class ParityResult:
    batch_size: int
    max_abs_diff: float
    top1_equal: bool
    shape_ok: bool
    expected_shape: list[int]
    got_shape: list[int]

    @property
    def ok(self) -> bool:
        return self.shape_ok and self.top1_equal and self.max_abs_diff <= PARITY_ATOL


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every BatchNorm folded into the convolution before it
    (torch.fx's Conv+BN fusion, which works on any traceable model, whatever its attribute names)."""
    from torch.fx.experimental.optimization import fuse

    folded = fuse(copy.deepcopy(model).eval())
    remaining = [n for n, m in folded.named_modules() if isinstance(m, nn.BatchNorm2d)]
    if remaining:
        raise RuntimeError(f"BatchNorm layers left unfolded: {remaining}")
    return folded


def to_onnx(model: nn.Module, opset: int = DEFAULT_OPSET) -> onnx.ModelProto:
    """Export with the maintained dynamo exporter and a dynamic batch dimension."""
    # An example batch of 2: with 1 the exporter may specialize the batch dimension to a constant.
    example = torch.rand(2, *INPUT_SHAPE)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                model,
                (example,),
                dynamo=True,
                dynamic_shapes={"x": {0: batch}},
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                optimize=True,
                verbose=False,
                external_data=False,
            )
        except Exception as exc:
            raise UserError(f"torch.onnx.export failed at opset {opset}: {str(exc).splitlines()[0][:200]}") from None
    assert program is not None  # None only from the legacy exporter (dynamo=False)
    proto = program.model_proto
    # The exporter names the batch dimension after the Dim; give it the contract's name.
    for value in (*proto.graph.input, *proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = BATCH_DIM
    return proto


def check_parity(
    model: nn.Module, onnx_path: Path, images: np.ndarray, batch_sizes: tuple[int, ...] = PARITY_BATCH_SIZES
) -> list[ParityResult]:
    """Run PyTorch and ONNX Runtime (CPU) on the same images at each batch size and compare."""
    session = create_session(onnx_path, "cpu")
    results = []
    model = model.eval()
    for bs in batch_sizes:
        x = images[:bs]
        with torch.no_grad():
            expected = model(torch.from_numpy(x)).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        shape_ok = got.shape == expected.shape
        diff = float(np.abs(got - expected).max()) if shape_ok else float("inf")
        top1 = bool(shape_ok and (got.argmax(1) == expected.argmax(1)).all())
        results.append(ParityResult(bs, diff, top1, shape_ok, list(expected.shape), list(got.shape)))
    return results


def parity_failure_message(results: list[ParityResult]) -> str | None:
    shape_fail = [r for r in results if not r.shape_ok]
    value_fail = [r for r in results if r.shape_ok and not r.ok]
    parts = []
    if shape_fail:
        parts.append(
            "shape failures: "
            + ", ".join(f"batch {r.batch_size}: expected {r.expected_shape}, got {r.got_shape}" for r in shape_fail)
        )
    if value_fail:
        worst = max(value_fail, key=lambda r: r.max_abs_diff)
        parts.append(
            "value failures: "
            + ", ".join(
                f"batch {r.batch_size}: max |diff| {r.max_abs_diff:.3g}{'' if r.top1_equal else ', top-1 differs'}"
                for r in value_fail
            )
            + f" (largest {worst.max_abs_diff:.3g}, tolerance {PARITY_ATOL:g})"
        )
    return "; ".join(parts) or None


def metadata(
    arch: str,
    checkpoint_sha256: str,
    test_accuracy: float | None,
    mean: float,
    std: float,
    versions: dict[str, str | None],
) -> dict[str, str]:
    return {
        "labels": json.dumps(list(LABELS)),
        "architecture": arch,
        "input": json.dumps(
            {
                "name": INPUT_NAME,
                "dtype": "float32",
                "shape": [BATCH_DIM, *INPUT_SHAPE],
                "range": [0.0, 1.0],
                "layout": "NCHW",
                "description": "grayscale intensities in [0, 1], white digit on black as in MNIST; "
                "normalization is inside the graph",
            }
        ),
        "output": json.dumps({"name": OUTPUT_NAME, "dtype": "float32", "shape": [BATCH_DIM, NUM_CLASSES]}),
        "normalization": json.dumps({"mean": mean, "std": std}),
        "test_accuracy": "" if test_accuracy is None else f"{test_accuracy:.6f}",
        "source_checkpoint_sha256": checkpoint_sha256,
        "versions": json.dumps(versions),
        "producer": "resnet-edge",
    }


def export_onnx(
    model: nn.Module, out_path: Path, images: np.ndarray, meta: dict[str, str], opset: int = DEFAULT_OPSET
) -> list[ParityResult]:
    """Fold BatchNorm, export, check (full checker + parity against the unfolded model), then move
    the file into place. On any failure nothing is left at ``out_path``'s place (an old file stays)."""
    folded = fold_batchnorm(model)
    proto = to_onnx(folded, opset)
    onnx.helper.set_model_props(proto, meta)
    with atomic_path(out_path) as tmp:
        onnx.save(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise UserError(f"exported model fails the ONNX checker: {str(exc).splitlines()[0][:200]}") from None
        results = check_parity(model, tmp, images)
        message = parity_failure_message(results)
        if message:
            raise ParityError(f"ONNX model does not match PyTorch: {message}; no model was written")
    return results


def export_run(
    run_dir: Path,
    *,
    opset: int = DEFAULT_OPSET,
    quantize: bool = False,
    qconfig: QuantizationConfig | None = None,
    progress: Any = None,
    fp16: bool = False,
) -> dict[str, Any]:
    """The `export` stage: checkpoint.pt -> model.onnx (checked) [-> model.int8.onnx (guarded)]
    [-> model.fp16.onnx (checked)] + export.json.

    Everything is made in a staging folder inside the run and moved into place only when all of it
    passed its checks: stale files of an earlier export (an INT8 model or export.json from another
    checkpoint) are removed first, export.json goes last. A failed or interrupted export therefore
    never leaves files from two checkpoints side by side.
    """
    import tempfile

    from resnet_edge.core.contract import CHECKPOINT
    from resnet_edge.core.files import ensure_writable_dir, remove_stale_temporaries
    from resnet_edge.export.staging import move_into_place, stale_files
    from resnet_edge.training.checkpoint import load_checkpoint

    t0 = time.perf_counter()
    ckpt = load_checkpoint(run_dir / CHECKPOINT)  # a missing or bad checkpoint: one clear error, nothing made
    ensure_writable_dir(run_dir)
    remove_stale_temporaries(run_dir)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".export-") as tmp:
        stage = Path(tmp)
        report = _export_to(
            stage, run_dir, ckpt, opset=opset, quantize=quantize, qconfig=qconfig, progress=progress, fp16=fp16
        )
        stale = stale_files(run_dir, stage, report)
        report["seconds"] = round(time.perf_counter() - t0, 2)
        write_json(stage / EXPORT_REPORT, report)
        move_into_place(stage, run_dir, stale, remove_deploy=DEPLOY_DIR in report["removed_stale"])
    return report


def _export_to(
    stage: Path,
    run_dir: Path,
    ckpt: dict[str, Any],
    *,
    opset: int,
    quantize: bool,
    qconfig: QuantizationConfig | None,
    progress: Any,
    fp16: bool = False,
) -> dict[str, Any]:
    """Write model.onnx [, model.int8.onnx] [and model.fp16.onnx] into ``stage``; return export.json's
    content (paths final)."""
    from resnet_edge.core.contract import CHECKPOINT, to_pixels
    from resnet_edge.core.mnist import load_dataset
    from resnet_edge.training.checkpoint import model_from_checkpoint

    t0 = time.perf_counter()
    ckpt_path = run_dir / CHECKPOINT
    model = model_from_checkpoint(ckpt, ckpt_path)
    dataset = load_dataset(ckpt["config"].get("data_dir"))
    test_pixels, test_labels = to_pixels(dataset.test_images), dataset.test_labels.astype(np.int64)
    meta = _model_metadata(model, ckpt, ckpt_path)
    fp32_path = stage / FP32_MODEL
    parity = export_onnx(model, fp32_path, test_pixels[: max(PARITY_BATCH_SIZES)], meta, opset)
    log.info("wrote %s (%d bytes) in %.1f s", fp32_path, fp32_path.stat().st_size, time.perf_counter() - t0)
    settings = {"opset": opset, "batchnorm_folded": True, "quantize": quantize, "fp16": fp16}
    report = _report(run_dir, ckpt, meta, fp32_path, parity, settings)
    if quantize:
        from resnet_edge.export.int8_search import AccuracyGuardError
        from resnet_edge.export.quantize import export_int8

        qconfig = qconfig or QuantizationConfig()
        try:
            q, report["int8"] = export_int8(
                fp32_path, stage / INT8_MODEL, run_dir, dataset, (test_pixels, test_labels), qconfig, progress, meta
            )
        except AccuracyGuardError as exc:  # the export is all or nothing: say what the run holds now
            raise AccuracyGuardError(
                f"{exc}; nothing else of this export was written either (the run keeps what it had): "
                "`resnet-edge export` without --quantize writes the FP32 model alone"
            ) from None
        report["fp32"].update(test_accuracy=q.fp32_accuracy, images_per_second=q.fp32_images_per_second)
        report["settings"]["quantization"] = {
            **asdict(qconfig),
            "format": "QDQ",
            "weight_type": "int8",
            "calibration_images": q.calibration_images,
        }
    else:
        from resnet_edge.inference.runtime import evaluate_session

        fp32 = evaluate_session(create_session(fp32_path, "cpu"), test_pixels, test_labels)
        report["fp32"].update(test_accuracy=fp32.accuracy, images_per_second=fp32.images_per_second)
    if fp16:
        from resnet_edge.export.fp16 import export_fp16

        report["fp16"] = export_fp16(fp32_path, stage / FP16_MODEL, run_dir, test_pixels, test_labels, meta)
    return report


def _checkpoint_accuracy(ckpt: dict[str, Any]) -> float | None:
    """The test accuracy of the checkpoint's last epoch, as training measured it (None without a history)."""
    history = ckpt.get("history") or []
    return history[-1]["test_accuracy"] if history else None


def _model_metadata(model: nn.Module, ckpt: dict[str, Any], ckpt_path: Path) -> dict[str, str]:
    """The metadata_props of every model of this export."""
    from resnet_edge.core.files import file_sha256
    from resnet_edge.core.machine import versions

    mean, std = float(model.get_buffer("normalize.mean").item()), float(model.get_buffer("normalize.std").item())
    return metadata(
        ckpt["config"]["arch"],
        file_sha256(ckpt_path),
        _checkpoint_accuracy(ckpt),
        mean,
        std,
        versions(include_torch=True),
    )


def _report(
    run_dir: Path,
    ckpt: dict[str, Any],
    meta: dict[str, str],
    fp32_path: Path,
    parity: list[ParityResult],
    settings: dict[str, Any],
) -> dict[str, Any]:
    """export.json's content for the FP32 model; the INT8 and FP16 sections come after."""
    from resnet_edge.core.contract import CHECKPOINT
    from resnet_edge.core.machine import machine, versions

    return {
        "arch": ckpt["config"]["arch"],
        "checkpoint": {
            "path": str(run_dir / CHECKPOINT),
            "sha256": meta["source_checkpoint_sha256"],
            "test_accuracy": _checkpoint_accuracy(ckpt),
        },
        "fp32": {"path": str(run_dir / FP32_MODEL), "bytes": fp32_path.stat().st_size},
        "parity": [
            {"batch_size": r.batch_size, "max_abs_diff": r.max_abs_diff, "top1_equal": r.top1_equal} for r in parity
        ],
        "parity_tolerance": PARITY_ATOL,
        "settings": settings,
        "versions": versions(include_torch=True),
        # Accuracy figures below were measured with ONNX Runtime on this machine's CPU.
        "evaluated_on": machine(gpu=False),
    }
