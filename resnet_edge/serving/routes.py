"""The FastAPI routes of `serve`: the page at / (draw a digit), server and model metadata, liveness and
readiness, statistics, POST /v1/predict (one image file), and errors as {"error": message}. POST
.../infer is answered by asgi.py; its route here serves other methods (405) and the FastAPI app mounted
alone. No torch here."""

from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from typing import Any

import numpy as np
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from resnet_edge.core.contract import digit_prediction
from resnet_edge.core.providers import is_cuda_device_provider
from resnet_edge.inference.preprocess import ImageError, image_to_pixels
from resnet_edge.serving.asgi import RequestBody, infer_response
from resnet_edge.serving.models import check_control, names_on_disk
from resnet_edge.serving.multipart import multipart_file
from resnet_edge.serving.state import ServerState
from resnet_edge.serving.v2 import RequestError

log = logging.getLogger(__name__)

# Open Inference Protocol extensions this server implements as Triton specifies them.
EXTENSIONS = ["binary_tensor_data", "statistics", "model_configuration"]


def add_routes(app: Any, state: ServerState) -> None:
    add_error_handlers(app)
    add_page_route(app)
    add_stats_route(app, state)  # before /v2/models/{name}, which would take /v2/models/stats
    add_health_routes(app, state)
    add_inference_routes(app, state)
    add_repository_routes(app, state)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def add_error_handlers(app: Any) -> None:
    """Every error a client can cause answers {"error": message} with its status."""

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "invalid request")

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:  # a bug of ours; the fuzz test hunts these
        log.exception("unhandled error")
        return _error(500, "internal server error")


# The page's inline <script> and <style> blocks, allowed by their hashes in its Content-Security-Policy.
_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def page_and_policy() -> tuple[bytes, str]:
    """The page (page/index.html, one file) and its Content-Security-Policy: nothing but this server
    ('self': the page fetches v1/predict) and the page's own inline script and style, by their SHA-256."""
    from importlib.resources import files

    html = (files("resnet_edge.serving") / "page" / "index.html").read_bytes()
    allowed: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for kind, text in _INLINE.findall(html):
        allowed[kind].append(f"'sha256-{base64.b64encode(hashlib.sha256(text).digest()).decode()}'")
    script, style = (" ".join(allowed[kind]) or "'none'" for kind in (b"script", b"style"))
    policy = (
        f"default-src 'none'; script-src {script}; style-src {style}; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    return html, policy


def add_page_route(app: Any) -> None:
    """GET / (and HEAD): the page where a person draws a digit, read once here, not per request; and
    /favicon.ico, which browsers ask for by themselves, answered 204 (no icon) rather than a 404 to log."""
    html, policy = page_and_policy()
    headers = {
        "content-security-policy": policy,
        "x-content-type-options": "nosniff",
        "referrer-policy": "no-referrer",
        "cache-control": "no-cache",
    }

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def page() -> Response:
        return Response(html, media_type="text/html; charset=utf-8", headers=headers)

    @app.api_route("/favicon.ico", methods=["GET", "HEAD"], include_in_schema=False)
    async def no_icon() -> Response:
        return Response(status_code=204, headers={"cache-control": "max-age=86400"})


def _ready_response(ready: bool, body: dict[str, Any]) -> Response:
    return JSONResponse({**body, "ready": ready}, status_code=200 if ready else 503)


def add_health_routes(app: Any, state: ServerState) -> None:
    """Server and model metadata, liveness and readiness (Open Inference Protocol)."""
    from resnet_edge import __version__

    models = state.models

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "resnet-edge", "version": __version__, "extensions": EXTENSIONS}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return _ready_response(state.is_ready, {})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(name: str, version: str | None = None) -> dict[str, Any]:
        return models.described(name, version).metadata

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        model = models.lookup(name, version)
        return _ready_response(state.model_is_ready(model), {"name": name})


def add_stats_route(app: Any, state: ServerState) -> None:
    """Triton's statistics extension (/v2/models[/{name}[/versions/{v}]]/stats: "model_stats" in Triton's
    schema), with what Triton has no field for under "server"; Triton's model configuration extension
    (/v2/models/{name}[/versions/{v}]/config); and GET /metrics (Prometheus' text format)."""
    models = state.models

    async def stats_response(name: str | None, version: str | None) -> dict[str, Any]:
        stats = models.statistics(name, version)
        server = {
            "pending_bytes": state.pending_bytes,
            "pending_requests": models.rows_waiting,
            "pending_rows": models.budget.held,
            **await state.work(_memory_report, state.config.provider),
        }
        return {"model_stats": stats, "server": server}

    @app.get("/v2/models/stats")
    async def all_stats() -> dict[str, Any]:
        return await stats_response(None, None)

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def stats(name: str, version: str | None = None) -> dict[str, Any]:
        return await stats_response(name, version)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(name: str, version: str | None = None) -> dict[str, Any]:
        return models.described(name, version).model_config

    @app.get("/metrics")
    async def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        if state.metrics is None:
            raise RequestError(404, "metrics are off (serve --no-metrics)")
        return Response(await state.work(state.metrics.exposition), media_type=CONTENT_TYPE_LATEST)


def _memory_report(provider: str) -> dict[str, Any]:
    """Resident memory of this process, and its GPU memory (nvidia-smi) on a CUDA or TensorRT provider."""
    import psutil

    report: dict[str, Any] = {"rss_bytes": psutil.Process().memory_info().rss}
    if is_cuda_device_provider(provider):
        report["gpu_memory_bytes"] = _gpu_memory_bytes()
    return report


def _gpu_memory_bytes() -> int | None:
    """This process's GPU memory as nvidia-smi reports it; None when it cannot say."""
    from resnet_edge.core.machine import process_gpu_memory_mb

    mb = process_gpu_memory_mb(timeout=2)
    return None if mb is None else int(mb * 2**20)


def add_inference_routes(app: Any, state: ServerState) -> None:
    """POST /v2/models/{name}[/versions/1]/infer (tensors; InferenceApp answers POST itself, this route
    answers other methods with 405 and serves the FastAPI app mounted alone) and /v1/predict (one image file)."""

    async def infer(request: Request) -> Response:
        status, body, extra = await infer_response(
            state, request.headers, request.receive, request.path_params["name"], request.path_params.get("version")
        )
        return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in extra})

    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        app.router.routes.insert(0, Route(path, infer, methods=["POST"]))

    @app.post("/v1/predict")
    async def predict(request: Request, model: str | None = None, version: str | None = None) -> dict[str, Any]:
        """One image file -> the digit, by the server's default model or ?model=<name>[&version=<v>]."""
        started, timing = time.perf_counter_ns(), [0]
        served = state.models.predict_model(model, version)  # 404 (uncounted) for a model not served
        try:
            with served:  # held to the answer: an unload or a reload lets this request finish (models.py)
                async with RequestBody(request.headers, request.receive, state) as raw:
                    # the multipart form, if any, and the image are both read in the request thread pool
                    pixels = await state.work(image_pixels, raw, request.headers.get("content-type", ""))
                    logits = await served.infer(pixels, timing)
        except RequestError as exc:
            served.request_done("predict", exc.status, started, timing[0])
            raise
        served.request_done("predict", 200, started, timing[0])
        return digit_prediction(logits[0])


def image_pixels(raw: bytes, content_type: str) -> np.ndarray:
    """/v1/predict's body (an image, or a multipart form with the image as field 'file') -> the model's input."""
    data = multipart_file(raw, content_type) if content_type.startswith("multipart/form-data") else raw
    if not data:
        raise RequestError(
            400, "expected an image (PNG, JPEG, BMP, GIF, WebP, TIFF) as the body or as multipart field 'file'"
        )
    try:
        return image_to_pixels(data)
    except ImageError as exc:
        raise RequestError(400, str(exc)) from None


def add_repository_routes(app: Any, state: ServerState) -> None:
    """Triton's model repository extension: POST /v2/repository/index (every model and version, its state
    and why it is not ready; {"ready": true} for the ready ones only), and with --model-control explicit
    POST /v2/repository/models/{name}/load and /unload."""

    @app.post("/v2/repository/index")
    async def index(request: Request) -> Response:
        body = await _small_json(request, state)
        only_ready = body.get("ready", False)
        if not isinstance(only_ready, bool):
            raise RequestError(400, "'ready' must be true or false")
        on_disk = await state.work(names_on_disk, state.config.repository)
        entries = state.models.index(on_disk)
        return JSONResponse([e for e in entries if e["state"] == "READY" or not only_ready])

    @app.post("/v2/repository/models/{name}/load")
    async def load(request: Request, name: str) -> Response:
        await _control_request(request, state)
        assert state.config.repository is not None
        await state.models.load(state.config.repository, name, state.model_died)
        return JSONResponse({})

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(request: Request, name: str) -> Response:
        await _control_request(request, state)
        await state.models.unload(name)
        return JSONResponse({})


async def _small_json(request: Request, state: ServerState) -> dict[str, Any]:
    """A control request's JSON body ({} when empty), read within the request limits; 400 unless an object."""
    import json

    async with RequestBody(request.headers, request.receive, state) as raw:
        if not raw.strip():
            return {}
        if len(raw) > 64 * 1024:
            raise RequestError(413, "a repository request body is at most 64 KiB")
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise RequestError(400, "the body is not JSON") from None
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    return body


async def _control_request(request: Request, state: ServerState) -> None:
    body = await _small_json(request, state)
    check_control(state.config.model_control, body.get("parameters", {}))
