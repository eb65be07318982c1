"""`serve`'s app for one model: the model loaded and checked (a batcher can serve it; the name and the
metadata it is served under), the shared state, and the lifespan that starts and stops the batcher and
the gRPC front. No torch here."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI

from resnet_edge.core.config import ServerConfig
from resnet_edge.core.contract import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from resnet_edge.core.errors import UserError
from resnet_edge.core.names import check_labels, check_name, is_name
from resnet_edge.core.providers import is_cpu_provider
from resnet_edge.inference.runtime import create_session
from resnet_edge.serving.asgi import InferenceApp
from resnet_edge.serving.batcher import DynamicBatcher
from resnet_edge.serving.routes import add_routes
from resnet_edge.serving.state import ServerState
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


def model_metadata(name: str, meta: dict[str, str]) -> dict[str, Any]:
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
        "versions": ["1"],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}],
        "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, NUM_CLASSES]} for o in OUTPUTS],
        "parameters": parameters,
    }


def _model_name(config: ServerConfig, meta: dict[str, str]) -> str:
    """--model-name, else the model's architecture metadata, else its file name; one URL path segment each."""
    if config.model_name is not None:  # one path segment in every URL, as Triton's model names
        return check_name(config.model_name, "--model-name")
    if meta.get("architecture"):
        return check_name(meta["architecture"], f"{config.model_path}: the 'architecture' metadata")
    return check_name(
        Path(str(config.model_path)).name.split(".")[0], f"{config.model_path}: the file name (give --model-name)"
    )


def triton_model_config(config: ServerConfig) -> dict[str, Any]:
    """The served model's configuration in Triton's JSON form (model configuration extension): what
    Triton's own tools read before they send a request. The same fields `package` writes to config.pbtxt."""
    kind = "KIND_CPU" if is_cpu_provider(config.provider) else "KIND_GPU"
    return {
        "name": config.model_name,
        "platform": "onnxruntime_onnx",
        "backend": "onnxruntime",
        "version_policy": {"latest": {"num_versions": 1}},
        "max_batch_size": config.max_batch_size,
        "input": [{"name": INPUT_NAME, "data_type": "TYPE_FP32", "format": "FORMAT_NONE", "dims": list(INPUT_SHAPE)}],
        "output": [{"name": OUTPUT_NAME, "data_type": "TYPE_FP32", "dims": [NUM_CLASSES], "label_filename": ""}],
        "dynamic_batching": {"max_queue_delay_microseconds": round(config.max_delay_ms * 1000)},
        "instance_group": [{"name": config.model_name, "kind": kind, "count": config.instances}],
    }


def create_app(config: ServerConfig, session: Any | None = None) -> InferenceApp:
    """The ASGI app for one model (InferenceApp in front of FastAPI; ``.state.server`` is its ServerState).
    The session is created here unless given (tests may pass one). Sets ``config.model_name`` when unset."""
    from resnet_edge import __version__

    if session is None:
        if config.model_path is None:
            raise UserError("serve needs a model file (--model, or --run / --repository)")
        session = create_session(config.model_path, config.provider, threads=config.threads, spinning=False)
    check_batching(session, config.max_batch_size)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    config.model_name = _model_name(config, meta)
    state = ServerState(config, model_metadata(config.model_name, meta))
    state.model_config = triton_model_config(config)
    app = FastAPI(
        title="resnet-edge",
        version=__version__,
        lifespan=_lifespan(state, session),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = state
    add_routes(app, state)
    return InferenceApp(app, state)


def _lifespan(state: ServerState, session: Any) -> Any:
    """Start the batcher and the gRPC front, mark the server ready; at shutdown, the reverse."""
    config = state.config

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        batcher = DynamicBatcher(
            session,
            config.max_batch_size,
            config.max_delay_ms,
            config.max_queue,
            io_binding=not is_cpu_provider(config.provider),
            on_death=state.died,
            instances=config.instances,
            on_batch=state.recorder.batch_done,
        )
        state.loop = asyncio.get_running_loop()
        batcher.start()
        grpc_server = None
        if config.grpc_port:
            from resnet_edge.serving.grpc_front import GrpcServer

            grpc_server = GrpcServer(state)
            try:
                await grpc_server.start()
            except UserError as exc:  # taken between serve()'s check and now
                state.fatal = str(exc)
                raise
        state.batcher, state.ready = batcher, True
        yield
        state.ready = False
        if grpc_server is not None:
            await grpc_server.stop()
        await batcher.stop()
        state.pool.shutdown(wait=False)
        if state.processes is not None:  # idle by now: waiting leaves nothing for the interpreter's exit hook, which
            state.processes.shutdown(wait=True, cancel_futures=True)  # otherwise may write to its closed wake-up pipe

    return lifespan
