"""What makes one ONNX file servable by `serve`'s batcher: its session on the provider asked for, the
batching check (a dynamic batch, rows that do not depend on each other), and what it is served under:
its metadata answer and its configuration in Triton's JSON form. No torch here."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.config import ServerConfig
from resnet_edge.core.contract import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from resnet_edge.core.errors import UserError
from resnet_edge.core.names import check_labels, is_name
from resnet_edge.core.providers import is_cpu_provider
from resnet_edge.serving.v2 import OUTPUTS

log = logging.getLogger(__name__)


def check_batching(session: Any, max_batch_size: int) -> None:
    """Refuse a model the batcher cannot serve: a fixed batch dimension (unless --max-batch-size 1 with a
    fixed batch of 1), or rows that depend on the other rows of the batch (a batch of distinct inputs
    must answer row by row what each input answers alone)."""
    dim = session.get_inputs()[0].shape[0]
    if isinstance(dim, int):
        if dim == 1 and max_batch_size == 1:
            return
        raise UserError(
            f"the model has a fixed batch dimension of {dim}; the server batches requests, so it needs a "
            f"dynamic batch dimension" + (" (or serve it with --max-batch-size 1)" if dim == 1 else "")
        )
    if max_batch_size == 1:
        return
    probe = np.stack(
        [
            np.zeros(INPUT_SHAPE, np.float32),
            np.ones(INPUT_SHAPE, np.float32),
            np.random.default_rng(0).random(INPUT_SHAPE, dtype=np.float32),
            np.tril(np.ones(INPUT_SHAPE, np.float32)),
        ]
    )  # four inputs no model confuses
    together = np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: probe})[0])
    alone = np.concatenate([session.run([OUTPUT_NAME], {INPUT_NAME: probe[i : i + 1]})[0] for i in range(4)])
    tolerance = 0.02 * max(1.0, float(np.abs(alone).max()))  # batch-size effects of FP16 or INT8 kernels pass
    if together.shape != (4, NUM_CLASSES) or not np.abs(together - alone).max() <= tolerance:
        raise UserError(
            f"the model does not answer one row per input row (a batch of 4 gave {together.shape} "
            f"outputs that differ from the rows run alone); refusing to batch callers together"
        )


def model_metadata(name: str, versions: list[str], meta: dict[str, str]) -> dict[str, Any]:
    """The model's metadata answer, made once at load. Of the file's metadata_props only what passes the
    rules of names.py is served (a valid architecture name, a short accuracy, NUM_CLASSES short labels):
    whatever else a file holds, say 10 MB of labels, is dropped with a warning, never sent per request."""
    parameters = {}
    if is_name(meta.get("architecture")):
        parameters["architecture"] = meta["architecture"]
    accuracy = meta.get("test_accuracy")
    if isinstance(accuracy, str) and len(accuracy) <= 32 and accuracy.isprintable():
        parameters["test_accuracy"] = accuracy
    if "labels" in meta:
        if check_labels(meta["labels"]) is not None:
            parameters["labels"] = meta["labels"]
        else:
            log.warning(
                "the model's 'labels' metadata is not %d short names; its metadata is served without it", NUM_CLASSES
            )
    return {
        "name": name,
        "versions": versions,
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}],
        "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, NUM_CLASSES]} for o in OUTPUTS],
        "parameters": parameters,
    }


def triton_model_config(config: ServerConfig, name: str, every_version: bool = False) -> dict[str, Any]:
    """A served model's configuration in Triton's JSON form (model configuration extension): what
    Triton's own tools read before they send a request. The same fields `package` writes to config.pbtxt."""
    kind = "KIND_CPU" if is_cpu_provider(config.provider) else "KIND_GPU"
    return {
        "name": name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"all": {}} if every_version else {"latest": {"num_versions": 1}},
        "max_batch_size": config.max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": list(INPUT_SHAPE)}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [NUM_CLASSES], "label_filename": ""}],
        "dynamic_batching": {"max_queue_delay_microseconds": round(config.max_delay_ms * 1000)},
        "instance_group": [{"name": name, "kind": kind, "count": config.instances}],
    }


def open_session(config: ServerConfig, path: Path, saturation: bool) -> Any:
    """An ONNX Runtime session of ``path`` that the batcher can serve (UserError otherwise). ``saturation``:
    refuse an INT8 model that would lose accuracy on this CPU (the CLI has checked a model it chose)."""
    from resnet_edge.inference.runtime import create_session

    if saturation:
        from resnet_edge.inference.variants import saturation_problem

        problem = saturation_problem(path, config.provider)
        if problem:
            raise UserError(problem)
    session = create_session(path, config.provider, threads=config.threads, spinning=False)
    check_batching(session, config.max_batch_size)
    return session
