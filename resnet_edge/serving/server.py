"""`serve`: an ONNX Runtime inference server speaking the Open Inference Protocol (KServe v2).

HTTP: /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/1], .../ready, .../stats,
.../infer (JSON and the binary tensor data extension), and /v1/predict for one image file. gRPC
(GRPCInferenceService, grpc_front.py) on --grpc-port. Every request is checked before it reaches the
model (v2.py). Where the work runs: bodies up to INLINE_BYTES (16 KiB: one image as JSON) are parsed on
the event loop, larger ones in a small thread pool, JSON parts over PROCESS_BYTES in a worker process;
images are decoded in the thread pool; the batcher takes queued rows up to --max-batch-size or
--max-delay-ms after the first and runs ONNX Runtime in threads of its own. Memory is bounded by
queued rows (--max-queue) and request bytes in flight (--max-pending-bytes). A model that breaks the
one-row-per-row contract, or a batcher that dies, makes the server not ready and the process exit
with status 1 so that a supervisor restarts it. No torch here.

The rooms: batcher.py (the dynamic batcher), state.py (what the routes share), asgi.py (the hot path
and the request body), routes.py (the FastAPI routes), app.py (the model checked, the app and its
lifespan), uvicorn_fence.py (every touch of uvicorn's internals: the slow-client guard), and this module:
the listening socket and the uvicorn run.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable
from typing import Any

import uvicorn

from resnet_edge.core.config import ServerConfig
from resnet_edge.core.errors import UserError
from resnet_edge.serving.app import create_app
from resnet_edge.serving.uvicorn_fence import GracefulServer, guarded_http

__all__ = ["ServerConfig", "create_app", "serve"]


def _listen(host: str, port: int) -> socket.socket:
    """The listening socket, opened before anything is announced: a busy port is one clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app: Any, config: ServerConfig, log_level: str) -> uvicorn.Config:
    kwargs: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        kwargs["loop"] = "uvloop"
    return uvicorn.Config(
        app,
        log_level=log_level,
        access_log=False,
        timeout_graceful_shutdown=30,
        http=guarded_http(config.client_timeout),
        timeout_keep_alive=5,
        proxy_headers=False,
        limit_concurrency=config.max_connections + 1,  # uvicorn counts this one
        **kwargs,
    )


def _metrics_server(state: Any, config: ServerConfig, sock: socket.socket) -> Any:
    """--metrics-port: /metrics also on a port of its own (prometheus_client's server, in a thread)."""
    if not config.metrics_port or state.metrics is None:
        return None
    from prometheus_client import start_http_server

    try:
        started = start_http_server(config.metrics_port, config.host, registry=state.metrics.registry)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {config.host}:{config.metrics_port}: {exc.strerror or exc}") from None
    return started[0] if isinstance(started, tuple) else None  # (server, thread) since prometheus-client 0.18


def serve(
    config: ServerConfig, log_level: str = "warning", announce: Callable[[ServerConfig, Any], None] | None = None
) -> None:
    """Run the server until SIGINT/SIGTERM; uvicorn then finishes the requests in flight and returns.
    ``announce(config, models)`` is called once the models are loaded and the ports are open. A batcher that died ends
    the process with a one-line error (status 1)."""
    app = create_app(config)  # a missing or broken model fails here, before the port is opened
    state = app.server
    sock = _listen(config.host, config.port)
    if config.port == 0:
        config.port = sock.getsockname()[1]
    if config.grpc_port:
        from resnet_edge.serving.grpc_front import check_grpc_port

        try:
            check_grpc_port(config.host, config.grpc_port)  # a busy port fails here, one line
        except UserError:
            sock.close()
            raise
    metrics_server = _metrics_server(state, config, sock)
    if announce is not None:
        announce(config, state.models)
    server = GracefulServer(_uvicorn_config(app, config, log_level))
    state.stop_server = server.stop
    server.on_exit = state.draining
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        if metrics_server is not None:
            metrics_server.shutdown()
    if state.fatal:
        raise UserError(f"{state.fatal}; stopped serving so that a supervisor restarts the server")
