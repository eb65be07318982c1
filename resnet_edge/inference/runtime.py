"""ONNX Runtime sessions for our models: file checks, execution providers, options, evaluation.

Inference code: this module never imports torch, so an edge box runs it with onnxruntime and numpy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.contract import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from resnet_edge.core.errors import UserError
from resnet_edge.core.providers import CPU, CUDA, TENSORRT, provider_name

log = logging.getLogger(__name__)


class ModelFileError(UserError):
    """An .onnx file is missing, corrupt, unsafe or outside the model contract."""


def check_provider_available(provider: str) -> str:
    """The ONNX Runtime name of ``provider``; a clear error when this build does not have it."""
    import onnxruntime as ort

    name = provider_name(provider)
    available = ort.get_available_providers()
    if name not in available:
        hint = ""
        if name in (CUDA, TENSORRT):
            hint = (
                " Install the GPU build, which must replace the CPU one (both provide the `onnxruntime` "
                "module): `pip uninstall -y onnxruntime && pip install onnxruntime-gpu`, built for your "
                "CUDA major version."
            )
        raise UserError(
            f"execution provider {provider!r} ({name}) is not available in onnxruntime "
            f"{ort.__version__}; available: {', '.join(available)}.{hint}"
        )
    return name


def check_model_file(path: Path) -> Any:
    """Load and check an .onnx file before ONNX Runtime sees it; returns the ModelProto (no external data).

    Refuses: a missing or unreadable file, bytes that are not an ONNX model, and external data that
    points outside the model's folder (an absolute path, '..', or a symbolic link).
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no model file there")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelFileError(
            f"{path}: not a readable ONNX model (corrupt or truncated: "
            f"{str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
        ) from None
    if not proto.graph.node:
        raise ModelFileError(f"{path}: not a readable ONNX model (empty graph; corrupt or truncated)")
    folder = path.resolve().parent
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        candidate = Path(location)
        target = folder / candidate
        if (
            not location
            or candidate.is_absolute()
            or ".." in candidate.parts
            or target.is_symlink()
            or folder not in target.resolve().parents
        ):
            raise ModelFileError(
                f"{path}: external data of {tensor.name!r} points outside the model's folder ({location!r}); refused"
            )
        if not target.is_file():
            raise ModelFileError(f"{path}: external data file {location!r} is missing")
    return proto


def check_contract(proto: Any, path: Path) -> None:
    """The model must take ``pixels`` [batch, 1, 28, 28] float32 and give ``logits`` [batch, 10]."""
    inputs = [i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]

    def shape(v: Any) -> list[Any]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        raise ModelFileError(f"{path}: expected one input named {INPUT_NAME!r}, got {[i.name for i in inputs]}")
    got = shape(inputs[0])
    if len(got) != 4 or got[1:] != list(INPUT_SHAPE) or inputs[0].type.tensor_type.elem_type != 1:
        raise ModelFileError(
            f"{path}: input {INPUT_NAME!r} must be float32 [batch, {', '.join(map(str, INPUT_SHAPE))}], got {got}"
        )
    outputs = {o.name: shape(o) for o in proto.graph.output}
    if OUTPUT_NAME not in outputs or outputs[OUTPUT_NAME][1:] != [NUM_CLASSES]:
        raise ModelFileError(
            f"{path}: expected an output {OUTPUT_NAME!r} of shape [batch, {NUM_CLASSES}], got {outputs}"
        )


def create_session(
    path: Path,
    provider: str = "cpu",
    threads: int | None = None,
    graph_level: str = "all",
    check_contract_too: bool = True,
    spinning: bool = True,
    probe: bool = True,
) -> Any:
    """An InferenceSession on exactly the provider asked for (ONNX Runtime would fall back silently).
    ``probe``: run it once on a batch of 2 (or its fixed batch) and check the output's shape (check_outputs);
    bench's workers, which time the first call, skip it (bench checks every file before it measures)."""
    import onnxruntime as ort

    proto = check_model_file(Path(path))
    if check_contract_too:
        check_contract(proto, Path(path))
    name = check_provider_available(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_level]
    if threads:
        options.intra_op_num_threads = threads
    options.log_severity_level = 3
    if not spinning:  # idle intra-op threads sleep instead of spinning: CPU left to request handling
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if name in (CUDA, TENSORRT) and hasattr(ort, "preload_dlls"):
        try:  # CUDA and cuDNN from the nvidia-* wheels (those PyTorch uses), without importing torch
            ort.preload_dlls()
        except Exception:  # a system-wide CUDA install is found by the loader instead
            log.debug("onnxruntime.preload_dlls failed", exc_info=True)
    providers = [name] if name == CPU else [name, CPU]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:
        raise ModelFileError(f"{path}: ONNX Runtime cannot load it ({str(exc).splitlines()[0][:200]})") from None
    if session.get_providers()[0] != name:
        raise UserError(f"ONNX Runtime did not start {name} for {path} (got {session.get_providers()})")
    if check_contract_too and probe:
        check_outputs(session, path)
    return session


def _batch_of(session: Any, rows: int) -> int:
    dim = session.get_inputs()[0].shape[0]
    return dim if isinstance(dim, int) and dim > 0 else rows


def check_output_shape(logits: Any, rows: int, path: Path | str) -> np.ndarray:
    """What the model answered for ``rows`` inputs must be float32 logits [rows, NUM_CLASSES]: a file may
    declare that shape and answer another (a Slice after the logits), so every run is checked."""
    shape = getattr(logits, "shape", None)
    if shape != (rows, NUM_CLASSES) or getattr(logits, "dtype", None) != np.float32:
        raise ModelFileError(
            f"{path}: the model answered {rows} input rows with {getattr(logits, 'dtype', '?')} "
            f"{list(shape) if shape is not None else type(logits).__name__}, not "
            f"float32 {OUTPUT_NAME!r} [{rows}, {NUM_CLASSES}] as its contract says"
        )
    return logits


def check_outputs(session: Any, path: Path | str) -> None:
    """Run the model once at load on a small batch of zeros and check the shape of what it answers."""
    rows = _batch_of(session, 2)
    try:
        logits = session.run([OUTPUT_NAME], {INPUT_NAME: np.zeros((rows, *INPUT_SHAPE), np.float32)})[0]
    except Exception as exc:  # noqa: BLE001 - ONNX Runtime's error classes derive from Exception only
        raise ModelFileError(
            f"{path}: ONNX Runtime cannot run it ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__})"
        ) from None
    check_output_shape(logits, rows, path)


@dataclass
class EvalResult:
    accuracy: float
    predictions: np.ndarray
    logits: np.ndarray
    images_per_second: float


def evaluate_session(
    session: Any, images: np.ndarray, labels: np.ndarray, batch_size: int = 500, progress: Any = None
) -> EvalResult:
    """Top-1 accuracy and logits of a session over float32 [N, 1, 28, 28] images."""
    import time

    outs = []
    t0 = time.perf_counter()
    for i in range(0, len(images), batch_size):
        batch = images[i : i + batch_size]
        outs.append(check_output_shape(session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0], len(batch), "the model"))
        if progress is not None:
            progress(min(batch_size, len(images) - i))
    seconds = time.perf_counter() - t0
    logits = np.concatenate(outs)
    preds = logits.argmax(1)
    return EvalResult(float((preds == labels).mean()), preds, logits, len(images) / seconds)
