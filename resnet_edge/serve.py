"""`serve`: an ONNX Runtime inference server speaking the Open Inference Protocol (KServe v2 REST).

Endpoints: /v2/health/live, /v2/health/ready, /v2/models/{name}, /v2/models/{name}/ready,
/v2/models/{name}/infer, and /v1/predict for one image file. Every request is validated before it
reaches the model (input count and name, datatype, shape, byte count, values), the way Triton does.
Concurrent requests are batched dynamically: the batcher takes what is queued, up to --max-batch-size
rows or --max-delay-ms after the first, runs ONNX Runtime off the event loop, and hands each caller
its own rows. No torch here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from .config import ServerConfig
from .contract import IMAGE_PIXELS, IMAGE_SIZE, INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME, digit_prediction, softmax, to_pixels
from .runtime import create_session

log = logging.getLogger(__name__)

MAX_ROWS_PER_REQUEST = 1024
PROBABILITIES = "probabilities"
OUTPUTS = {OUTPUT_NAME: f"raw scores, FP32 [N, {NUM_CLASSES}]", PROBABILITIES: f"softmax of the logits, FP32 [N, {NUM_CLASSES}]"}
_SHAPES = ([*INPUT_SHAPE], [IMAGE_SIZE, IMAGE_SIZE], [IMAGE_PIXELS])  # after N
ACCEPTED_SHAPES = ", ".join("[N, " + ", ".join(map(str, s)) + "]" for s in _SHAPES)


class RequestError(Exception):
    """A bad request: status and message go back to the client as {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ------------------------------------------------------------------------------------------ batcher
@dataclass
class _Job:
    pixels: np.ndarray
    future: asyncio.Future = field(repr=False)


class DynamicBatcher:
    """Joins concurrent requests into one ONNX Runtime call; each caller gets exactly its own rows."""

    def __init__(self, session: Any, max_batch_size: int, max_delay_ms: float, max_queue: int) -> None:
        self.session = session
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1e3
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="onnxruntime")
        self.task: asyncio.Task | None = None
        self.batches = 0  # ONNX Runtime calls made
        self.rows = 0  # images answered
        self.requests = 0  # requests answered
        self.pending = 0  # requests accepted and not answered yet (queued or in the running batch)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.executor.shutdown(wait=True)

    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(pixels, future))
        except asyncio.QueueFull:
            raise RequestError(503, f"server busy: {self.queue.maxsize} requests already queued; retry later") from None
        self.pending += 1
        try:
            return await future
        finally:
            self.pending -= 1

    def _run(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending: _Job | None = None
        while True:
            job = pending or await self.queue.get()
            pending = None
            jobs, rows = [job], len(job.pixels)
            deadline = loop.time() + self.max_delay
            while rows < self.max_batch_size:
                try:
                    nxt = self.queue.get_nowait()
                except asyncio.QueueEmpty:
                    timeout = deadline - loop.time()
                    if timeout <= 0:
                        break
                    try:
                        nxt = await asyncio.wait_for(self.queue.get(), timeout)
                    except asyncio.TimeoutError:
                        break
                if rows + len(nxt.pixels) > self.max_batch_size:
                    pending = nxt  # starts the next batch; a batch never exceeds the limit
                    break
                jobs.append(nxt)
                rows += len(nxt.pixels)
            batch = jobs[0].pixels if len(jobs) == 1 else np.concatenate([j.pixels for j in jobs])
            try:
                logits = await loop.run_in_executor(self.executor, self._run, batch)
            except Exception as exc:  # the model failed: every caller of this batch gets a 500
                log.exception("inference failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(RequestError(500, f"inference failed: {type(exc).__name__}"))
                continue
            self.batches += 1
            self.rows += rows
            self.requests += len(jobs)
            start = 0
            for j in jobs:
                n = len(j.pixels)
                if not j.future.done():  # a caller that went away
                    j.future.set_result(logits[start:start + n])
                start += n


# ------------------------------------------------------------------------------------------ validation
def _flatten(data: Any) -> np.ndarray:
    """Flat or nested JSON numbers -> float64 1-D array; ragged or non-numeric data is an error."""
    if not isinstance(data, list):
        raise RequestError(400, f"input 'data' must be a JSON array of numbers, got {type(data).__name__}")
    if data and not isinstance(data[0], list):
        try:
            return np.asarray(data, dtype=np.float64)
        except (TypeError, ValueError):
            raise RequestError(400, "input 'data' must hold only numbers") from None
    try:
        arr = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        raise RequestError(400, "input 'data' must be numbers in a flat or evenly nested (row-major) array") from None
    return arr.reshape(-1)


def parse_infer_request(body: dict[str, Any]) -> tuple[np.ndarray, list[str], Any]:
    """A v2 inference request -> float32 pixels [N, 1, 28, 28], the outputs asked for, the request id."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object with 'inputs'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        got = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
        raise RequestError(400, f"expected 'inputs' to hold exactly 1 tensor named {INPUT_NAME!r}, got {got}")
    tensor = inputs[0]
    if tensor.get("name") != INPUT_NAME:
        raise RequestError(400, f"unexpected input name {tensor.get('name')!r}, expected {INPUT_NAME!r}")
    datatype = tensor.get("datatype")
    if datatype not in ("FP32", "UINT8"):
        raise RequestError(400, f"input {INPUT_NAME!r} datatype must be FP32 (0-1) or UINT8 (0-255), got {datatype!r}")
    shape = tensor.get("shape")
    if (not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
            or not (shape[1:] in _SHAPES) or shape[0] < 1):
        raise RequestError(400, f"input {INPUT_NAME!r} shape must be {ACCEPTED_SHAPES} with N >= 1, got {shape}")
    n = shape[0]
    if n > MAX_ROWS_PER_REQUEST:
        raise RequestError(400, f"at most {MAX_ROWS_PER_REQUEST} images per request, got N = {n}")
    values = _flatten(tensor.get("data"))
    expected = n * IMAGE_PIXELS
    if values.size != expected:
        raise RequestError(400, f"input {INPUT_NAME!r} with shape {shape} needs {expected} values, got {values.size}")
    if not np.isfinite(values).all():
        raise RequestError(400, f"input {INPUT_NAME!r} holds non-finite values (NaN or infinity)")
    if datatype == "FP32":
        if values.min() < 0 or values.max() > 1:
            raise RequestError(400, f"FP32 pixels must be in [0, 1], got values from {values.min():g} to {values.max():g}")
        pixels = values.astype(np.float32)
    else:
        if values.min() < 0 or values.max() > 255 or not np.all(values == np.round(values)):
            raise RequestError(400, "UINT8 pixels must be integers from 0 to 255")
        pixels = to_pixels(values.astype(np.uint8).reshape(n, IMAGE_PIXELS))
    requested = body.get("outputs")
    names = [OUTPUT_NAME]
    if requested is not None:
        if not isinstance(requested, list) or not all(isinstance(o, dict) for o in requested):
            raise RequestError(400, "'outputs' must be a list of {\"name\": ...} objects")
        names = [o.get("name") for o in requested]
        unknown = [nm for nm in names if nm not in OUTPUTS]
        if unknown:
            raise RequestError(400, f"unknown output {unknown[0]!r}, expected one of {list(OUTPUTS)}")
    return pixels.reshape(n, *INPUT_SHAPE), names, body.get("id")


# ------------------------------------------------------------------------------------------ the app
def model_metadata(name: str, meta: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name, "versions": ["1"], "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, *INPUT_SHAPE]}],
        "outputs": [{"name": o, "datatype": "FP32", "shape": [-1, NUM_CLASSES]} for o in OUTPUTS],
        "parameters": {k: meta[k] for k in ("architecture", "test_accuracy", "labels") if k in meta},
    }


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes ``limit`` (by Content-Length or while streaming)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            if int(length) > limit:
                raise RequestError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes")
        except ValueError:
            raise RequestError(400, "malformed Content-Length header") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(config: ServerConfig, session: Any | None = None) -> Any:
    """The FastAPI app for one model. The session is created here unless given (tests may pass one)."""
    from contextlib import asynccontextmanager

    from . import __version__

    session = session or create_session(config.model_path, config.provider, threads=config.threads)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if config.model_name is None:
        config.model_name = meta.get("architecture") or Path(config.model_path).name.split(".")[0]
    state: dict[str, Any] = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: Any):
        batcher = DynamicBatcher(session, config.max_batch_size, config.max_delay_ms, config.max_queue)
        batcher.start()
        state["batcher"], state["ready"] = batcher, True
        yield
        state["ready"] = False
        await batcher.stop()

    app = FastAPI(title="resnet-edge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    _add_error_handlers(app)
    _add_health_routes(app, config, state, model_metadata(config.model_name, meta))
    _add_inference_routes(app, config, state)
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _check_model(config: ServerConfig, name: str) -> None:
    if name != config.model_name:
        raise RequestError(404, f"unknown model {name!r}; this server serves {config.model_name!r}")


def _add_error_handlers(app: Any) -> None:
    """Every error a client can cause answers {"error": message} with its status; anything else 500."""
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
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(500, "internal server error")



def _add_health_routes(app: Any, config: ServerConfig, state: dict[str, Any], metadata_body: dict[str, Any]) -> None:
    """Server and model metadata, liveness and readiness (Open Inference Protocol)."""
    from . import __version__

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "resnet-edge", "version": __version__, "extensions": []}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    @app.get("/v2/models/{name}")
    async def metadata(name: str) -> dict[str, Any]:
        _check_model(config, name)
        return metadata_body

    @app.get("/v2/models/{name}/stats")
    async def stats(name: str) -> dict[str, Any]:
        """Triton's statistics extension, in brief: how much was served and how it was batched."""
        _check_model(config, name)
        batcher = state.get("batcher")
        counts = {"inference_count": batcher.rows, "execution_count": batcher.batches,
                  "request_count": batcher.requests, "pending_requests": batcher.pending} if batcher else {}
        return {"model_stats": [{"name": name, "version": "1", **counts}]}

    @app.get("/v2/models/{name}/ready")
    async def model_ready(name: str) -> Response:
        _check_model(config, name)
        return JSONResponse({"name": name, "ready": state["ready"]}, status_code=200 if state["ready"] else 503)


def _add_inference_routes(app: Any, config: ServerConfig, state: dict[str, Any]) -> None:
    """POST /v2/models/{name}/infer (tensors) and /v1/predict (one image file)."""
    from .preprocess import ImageError, image_to_pixels

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        _check_model(config, name)
        raw = await _read_body(request, config.max_body_bytes)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(400, f"malformed JSON: {exc.msg if hasattr(exc, 'msg') else exc}") from None
        pixels, outputs, request_id = parse_infer_request(body)
        logits = await state["batcher"].infer(pixels)
        tensors = {OUTPUT_NAME: logits, PROBABILITIES: softmax(logits) if PROBABILITIES in outputs else None}
        response = {"model_name": config.model_name, "model_version": "1",
                    "outputs": [{"name": o, "datatype": "FP32", "shape": list(tensors[o].shape),
                                 "data": tensors[o].reshape(-1).tolist()} for o in outputs]}
        if request_id is not None:
            response["id"] = request_id
        return Response(json.dumps(response), media_type="application/json")

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        raw = await _read_body(request, config.max_body_bytes)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            data = await _multipart_file(request, raw)
        else:
            data = raw
        if not data:
            raise RequestError(400, "expected an image (image/png, image/jpeg) as the body or as multipart field 'file'")
        try:
            pixels = image_to_pixels(data)
        except ImageError as exc:
            raise RequestError(400, str(exc)) from None
        logits = await state["batcher"].infer(pixels)
        return digit_prediction(logits[0])


async def _multipart_file(request: Any, raw: bytes) -> bytes:
    """The 'file' field of a multipart body already read (and size-checked) into ``raw``."""
    from starlette.requests import Request as StarletteRequest

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": raw, "more_body": False}

    replay = StarletteRequest(request.scope, receive)
    try:
        form = await replay.form()
    except Exception:
        raise RequestError(400, "malformed multipart body") from None
    upload = form.get("file")
    if upload is None or isinstance(upload, str):
        raise RequestError(400, f"multipart body needs a file field named 'file', got fields {list(form.keys())}")
    return await upload.read()


class _GracefulServer(uvicorn.Server):
    """uvicorn's graceful shutdown on SIGINT/SIGTERM, then a normal exit (status 0): uvicorn itself
    re-raises the signal afterwards, which makes a clean stop look like a crash to a supervisor."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def serve(config: ServerConfig, log_level: str = "warning", announce: Callable[[ServerConfig], None] | None = None) -> None:
    """Run the server until SIGINT/SIGTERM; uvicorn then finishes the requests in flight and returns.
    ``announce`` is called once the model is loaded (the model name is known then)."""
    app = create_app(config)  # a missing or broken model fails here, before the port is opened
    if announce is not None:
        announce(config)
    kwargs: dict[str, Any] = {}
    try:
        import uvloop  # noqa: F401

        kwargs["loop"] = "uvloop"
    except ImportError:
        pass
    try:
        import httptools  # noqa: F401

        kwargs["http"] = "httptools"
    except ImportError:
        pass
    server = _GracefulServer(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level, access_log=False,
                                    timeout_graceful_shutdown=30, **kwargs))
    server.run()
