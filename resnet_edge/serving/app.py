"""`serve`'s app: the models loaded and checked (models.py: one file, or a repository's models), the
shared state, and the lifespan that starts and stops the batchers and the gRPC front. No torch here."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from resnet_edge.core.config import ServerConfig
from resnet_edge.core.errors import UserError
from resnet_edge.core.names import check_name
from resnet_edge.serving.asgi import InferenceApp
from resnet_edge.serving.loading import check_batching, model_metadata, open_session, triton_model_config
from resnet_edge.serving.models import LOADING, ServedModel, start_repository
from resnet_edge.serving.routes import add_routes
from resnet_edge.serving.state import ServerState

log = logging.getLogger(__name__)


def _model_name(config: ServerConfig, meta: dict[str, str]) -> str:
    """--model-name, else the model's architecture metadata, else its file name; one URL path segment each."""
    if config.model_name is not None:  # one path segment in every URL, as Triton's model names
        return check_name(config.model_name, "--model-name")
    if meta.get("architecture"):
        return check_name(meta["architecture"], f"{config.model_path}: the 'architecture' metadata")
    return check_name(
        Path(str(config.model_path)).name.split(".")[0], f"{config.model_path}: the file name (give --model-name)"
    )


def create_app(config: ServerConfig, session: Any | None = None) -> InferenceApp:
    """The ASGI app (InferenceApp in front of FastAPI; ``.state.server`` is its ServerState) for the model
    file ``config.model_path`` (its session created here unless given: tests may pass one; sets
    ``config.model_name`` when unset), or for the models of ``config.repository``."""
    from resnet_edge import __version__

    state = ServerState(config)
    if config.repository is not None:
        start_repository(state.models, config.repository, config.model_name)
    else:
        _one_model(state, session)
    app = FastAPI(
        title="resnet-edge",
        version=__version__,
        lifespan=_lifespan(state),
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.server = state
    add_routes(app, state)
    return InferenceApp(app, state)


def _one_model(state: ServerState, session: Any | None) -> None:
    config = state.config
    if session is None:
        if config.model_path is None:
            raise UserError("serve needs a model file (--model, or --run / --repository)")
        session = open_session(config, config.model_path, saturation=False)  # the CLI chose (and checked) it
    else:
        check_batching(session, config.max_batch_size)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    name = config.model_name = _model_name(config, meta)
    model = ServedModel(name, "1", config.model_path)
    metadata, model_config = model_metadata(name, ["1"], meta), triton_model_config(config, name)
    model.loaded(session, metadata, model_config, state.models.recorder(name, "1"))
    state.models.add(model)
    state.models.default = name


def _lifespan(state: ServerState) -> Any:
    """Start the batchers and the gRPC front, mark the server ready; at shutdown, the reverse."""
    config = state.config

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        for model in state.models.all():
            if model.state == LOADING:
                model.start(config, state.models.budget, functools.partial(state.model_died, model))
        grpc_server = None
        if config.grpc_port:
            from resnet_edge.serving.grpc_front import GrpcServer

            grpc_server = GrpcServer(state)
            try:
                await grpc_server.start()
            except UserError as exc:  # taken between serve()'s check and now
                state.fatal = str(exc)
                raise
        state.started = True
        yield
        state.started = False
        if grpc_server is not None:
            await grpc_server.stop()
        await asyncio.gather(*(m.stop(reason="the server stopped") for m in state.models.all() if m.batcher))
        state.pool.shutdown(wait=False)
        if state.processes is not None:  # idle by now: waiting leaves nothing for the interpreter's exit hook, which
            state.processes.shutdown(wait=True, cancel_futures=True)  # otherwise may write to its closed wake-up pipe

    return lifespan
