"""`serve`: an ONNX Runtime inference server speaking the Open Inference Protocol (KServe v2).

HTTP: /v2, /v2/health/live, /v2/health/ready, /v2/models/{name}[/versions/1], .../ready, .../stats,
.../infer (JSON and the binary tensor data extension), and /v1/predict for one image file. gRPC
(GRPCInferenceService, serve_grpc.py) on --grpc-port. Every request is checked before it reaches the
model (serve_v2.py); parsing, conversion and image decoding run in a small thread pool, never on the
event loop (bodies up to INLINE_BYTES excepted: a few tens of microseconds). Concurrent requests are
batched dynamically: the batcher takes queued rows up to --max-batch-size or --max-delay-ms after the
first, runs ONNX Runtime off the event loop, and hands each caller its own rows. Memory is bounded by
queued rows (--max-queue) and request bytes in flight (--max-pending-bytes). A model that breaks the
one-row-per-row contract, or a batcher that dies, makes the server not ready and the process exit
with status 1 so that a supervisor restarts it. No torch here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from resnet_edge.core.config import ServerConfig
from resnet_edge.core.contract import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME, digit_prediction
from resnet_edge.core.errors import UserError
from resnet_edge.core.names import check_labels, check_name, is_name
from resnet_edge.core.providers import is_cpu_provider, is_cuda_device_provider
from resnet_edge.inference.runtime import create_session
from resnet_edge.serving.v2 import (
    HEADER_LENGTH,
    OUTPUTS,
    PROBABILITIES,
    Busy,
    InferRequest,
    RequestError,
    ascii_count,
    check_json_size,
    encode_http_response,
    header_length,
    model_input,
    multipart_file,
    parse_http_request,
)

__all__ = ["Busy", "DynamicBatcher", "RequestError", "ServerConfig", "create_app", "serve", "OUTPUTS", "PROBABILITIES"]

log = logging.getLogger(__name__)

INLINE_BYTES = 16 * 1024  # request bodies this small are parsed on the event loop (tens of microseconds)
WORKERS = 2  # threads for request work (parse, convert, decode): also bounds decoding memory
PROCESS_BYTES = 2**20  # JSON bodies larger than this are parsed in a separate process: json holds the GIL
MAX_HEADER_BYTES = 64 * 1024  # request line and headers
EXIT_DELAY_S = 1.0  # after a fatal model failure: ready answers 503 this long, then the process exits


class ModelFailure(Exception):
    """The model broke its contract during serving: fatal, the server stops being ready and exits."""


# ------------------------------------------------------------------------------------------ batcher
@dataclass
class _Job:
    pixels: np.ndarray
    future: asyncio.Future = field(repr=False)
    queued: float = 0.0  # event-loop time it was queued: a batch waits for company until queued + max_delay


class DynamicBatcher:
    """Joins concurrent requests into one ONNX Runtime call; each caller gets exactly its own rows.

    ``max_queue`` bounds the rows accepted and not answered yet; a request above ``max_batch_size``
    rows is split into batches of at most that. Up to ``instances`` batches run at once (ONNX Runtime
    sessions are thread-safe); while they run, the next batch gathers, so request handling on the
    event loop overlaps inference instead of taking turns with it. ``io_binding`` feeds the session
    through ONNX Runtime's IOBinding (one host-to-device copy per batch on a GPU provider)."""

    def __init__(
        self,
        session: Any,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue: int,
        io_binding: bool = False,
        on_death: Callable[[str], None] | None = None,
        instances: int = 1,
    ) -> None:
        self.session = session
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1e3
        self.max_queue = max_queue
        self.instances = instances
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=instances, thread_name_prefix="onnxruntime")
        self.io_binding = io_binding
        self.on_death = on_death
        self.task: asyncio.Task | None = None
        self.slots: asyncio.Semaphore | None = None  # free instances
        self.dead: str | None = None  # why the batcher stopped for good
        self.failure: BaseException | None = None  # what killed it, when a running batch did
        self.batches = 0  # ONNX Runtime calls made
        self.rows = 0  # images answered
        self.requests = 0  # requests answered
        self.pending = 0  # requests accepted and not answered yet (queued or in a running batch)
        self.pending_rows = 0  # rows queued or running, counted until they leave the batcher (after their caller
        #                        may have gone away: /stats can show rows with no request pending)
        self.inflight: list[_Job] = []  # the jobs of the batch being gathered
        self.held: _Job | None = None  # taken from the queue for the next batch
        self.running: dict[asyncio.Task, list[_Job]] = {}  # batches handed to ONNX Runtime

    def start(self) -> None:
        self.slots = asyncio.Semaphore(self.instances)
        self.task = asyncio.get_running_loop().create_task(self._loop())
        self.task.add_done_callback(self._ended)

    async def stop(self) -> None:
        # cancelled again until it ends: asyncio.wait_for (Python < 3.12) can swallow a cancel that lands
        # just as queue.get() completes, and the loop would then wait for the next request forever
        while self.task and not self.task.done():
            self.task.cancel()
            await asyncio.wait({self.task}, timeout=0.1)  # its exception, if any, is read and reported by _ended
        for task in list(self.running):
            task.cancel()
        await asyncio.gather(*self.running, return_exceptions=True)
        self.executor.shutdown(wait=True)

    def _ended(self, task: asyncio.Task) -> None:
        """The loop ended: cancelled at shutdown, or died (itself or in a batch). Either way nobody waits forever."""
        failure = self.failure or (None if task.cancelled() else task.exception())
        reason = f"the batcher stopped ({failure!r:.200})" if failure else "the server is shutting down"
        self.dead = reason
        queued = [*self.inflight, *([self.held] if self.held else [])]
        while not self.queue.empty():
            queued.append(self.queue.get_nowait())
        self.inflight, self.held = [], None
        self._release(queued)  # the rows of running batches are given back when those batches end
        for job in [*queued, *(j for jobs in self.running.values() for j in jobs)]:
            if not job.future.done():
                job.future.set_exception(RequestError(503, f"not ready: {reason}"))
        if failure is not None:
            log.error("batcher died: %r", failure)
            if self.on_death is not None:
                self.on_death(reason)

    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        if self.dead is not None:
            raise RequestError(503, f"not ready: {self.dead}")
        n = len(pixels)
        if n > self.max_queue:
            raise RequestError(
                413, f"a request of {n} images is over the server's queue of {self.max_queue} (--max-queue)"
            )
        if self.pending_rows + n > self.max_queue:
            raise Busy(f"server busy: {self.pending_rows} images already queued (limit {self.max_queue}); retry later")
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for start in range(0, n, self.max_batch_size):  # a large request is split into whole batches
            future = loop.create_future()
            self.queue.put_nowait(_Job(pixels[start : start + self.max_batch_size], future, now))
            futures.append(future)
        self.pending += 1
        self.pending_rows += n  # given back as each part leaves the batcher, not when the caller leaves
        try:
            parts = [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
        finally:
            self.pending -= 1
        self.requests += 1  # one request, however many batches it was split into
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run(self, parts: list[np.ndarray]) -> np.ndarray:
        batch = model_input(parts)  # in this thread: the event loop never joins or scales pixels
        if not self.io_binding:
            return self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_NAME, batch)  # from host memory: ONNX Runtime copies it once per batch
        binding.bind_output(OUTPUT_NAME, "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def _take(self, jobs: list[_Job], rows: int) -> tuple[int, _Job | None]:
        """Add queued jobs to ``jobs`` without waiting, up to max_batch_size rows; the job that did not fit."""
        while rows < self.max_batch_size and not self.queue.empty():
            nxt = self.queue.get_nowait()
            if rows + len(nxt.pixels) > self.max_batch_size:
                self.held = nxt
                return rows, nxt  # starts the next batch; a batch never exceeds the limit
            jobs.append(nxt)
            rows += len(nxt.pixels)
        return rows, None

    async def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """``first`` and what joins it until max_delay after ``first`` was queued, up to max_batch_size rows;
        the job that did not fit."""
        loop = asyncio.get_running_loop()
        jobs = self.inflight  # [first]
        rows, over = self._take(jobs, len(first.pixels))
        deadline = first.queued + self.max_delay
        while over is None and rows < self.max_batch_size:
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                nxt = await asyncio.wait_for(self.queue.get(), timeout)
            except asyncio.TimeoutError:
                break
            if rows + len(nxt.pixels) > self.max_batch_size:
                self.held = over = nxt
                break
            jobs.append(nxt)
            rows, over = self._take(jobs, rows + len(nxt.pixels))
        return jobs, over

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending: _Job | None = None
        while True:
            first = pending or await self.queue.get()
            self.inflight, self.held = [first], None
            jobs, pending = await self._collect(first)
            assert self.slots is not None
            await self.slots.acquire()  # every instance busy: the queue grows meanwhile, and the batch takes it
            if pending is None:
                _, pending = self._take(jobs, sum(len(j.pixels) for j in jobs))
            gone = [j for j in jobs if j.future.done()]  # callers that went away (cancelled, a deadline)
            if gone:
                self._release(gone)
                jobs = [j for j in jobs if not j.future.done()]
            self.inflight = []
            if not jobs:
                self.slots.release()
                continue
            task = loop.create_task(self._batch(jobs))
            self.running[task] = jobs
            task.add_done_callback(self._batch_done)

    async def _batch(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            rows = sum(len(j.pixels) for j in jobs)
            try:
                logits = await loop.run_in_executor(self.executor, self._run, [j.pixels for j in jobs])
            except Exception as exc:  # the model failed on this batch: its callers may retry
                log.exception("inference failed")
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(
                            RequestError(503, f"inference failed: {type(exc).__name__}; retry later")
                        )
                return
            if getattr(logits, "shape", None) != (rows, NUM_CLASSES):
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(RequestError(503, "not ready: the model broke its contract"))
                raise ModelFailure(
                    f"the model answered a batch of {rows} rows with {getattr(logits, 'shape', None)}, "
                    f"expected ({rows}, {NUM_CLASSES})"
                )
            self._deliver(jobs, logits)
        finally:
            self._release(jobs)
            assert self.slots is not None
            self.slots.release()

    def _release(self, jobs: list[_Job]) -> None:
        """Rows that left the batcher (answered, failed or dropped) stop counting against --max-queue. A
        caller that goes away leaves its rows queued until the batcher drops them, so they count till then."""
        self.pending_rows -= sum(len(j.pixels) for j in jobs)

    def _batch_done(self, task: asyncio.Task) -> None:
        jobs = self.running.pop(task, [])
        if task.cancelled() or task.exception() is None:
            return
        self.failure = task.exception()  # fatal (ModelFailure, or a bug of ours): the whole batcher stops
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(RequestError(503, f"not ready: the batcher stopped ({self.failure!r:.200})"))
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _deliver(self, jobs: list[_Job], logits: np.ndarray) -> None:
        self.batches += 1
        start = 0
        for j in jobs:
            n = len(j.pixels)
            self.rows += n
            if not j.future.done():
                j.future.set_result(logits[start : start + n])
            start += n


# ------------------------------------------------------------------------------------------ model checks
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


# ------------------------------------------------------------------------------------------ the app
class ServerState:
    """What the routes (HTTP and gRPC) share: readiness, the batcher, the request thread pool, byte budget."""

    def __init__(self, config: ServerConfig, metadata: dict[str, Any]) -> None:
        self.config = config
        self.metadata = metadata
        self.ready = False
        self.batcher: DynamicBatcher | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="requests")
        self.processes: concurrent.futures.ProcessPoolExecutor | None = None  # started at the first large JSON body
        self.pending_bytes = 0
        self.bytes_lock = threading.Lock()
        self.fatal: str | None = None
        self.stopping = False  # SIGTERM/SIGINT received: readiness answers false
        self.stop_server: Callable[[], None] | None = None  # set by serve(): ends uvicorn

    async def work(self, fn: Callable[..., Any], *args: Any, size: int = INLINE_BYTES + 1) -> Any:
        """``fn(*args)`` in the request thread pool (or inline when the input is at most INLINE_BYTES)."""
        if size <= INLINE_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def parse(self, raw: bytes, header_value: str | None) -> InferRequest:
        """An HTTP inference request, parsed inline, in a thread, or (a large JSON body, whose parsing
        would hold the GIL and so the event loop for tens of milliseconds) in a worker process."""
        # the JSON part (binary data after it is cheap); a header length past the body is refused here,
        # before any thread or process is given the body
        json_size = len(raw) if header_value is None else header_length(header_value, len(raw))
        check_json_size(raw, json_size)  # implausibly large for its shape: refused before parsing
        if json_size <= PROCESS_BYTES:
            return await self.work(parse_http_request, raw, header_value, size=len(raw))
        if self.processes is None:
            import multiprocessing

            self.processes = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        try:
            return await asyncio.get_running_loop().run_in_executor(
                self.processes, parse_http_request, raw, header_value
            )
        except concurrent.futures.BrokenExecutor:
            broken, self.processes = self.processes, None  # the worker died (killed for memory?): a new one next time
            if broken is not None:
                broken.shutdown(wait=False, cancel_futures=True)
            raise RequestError(503, "the request parser stopped; retry later") from None

    def take_bytes(self, n: int) -> None:
        """Count ``n`` request bytes in flight (HTTP and gRPC threads); Busy past --max-pending-bytes."""
        with self.bytes_lock:
            if self.pending_bytes + n > self.config.max_pending_bytes:
                raise Busy(
                    f"server busy: {self.pending_bytes} bytes of requests in flight (limit "
                    f"{self.config.max_pending_bytes}); retry later"
                )
            self.pending_bytes += n

    def give_bytes(self, n: int) -> None:
        with self.bytes_lock:
            self.pending_bytes -= n

    def draining(self) -> None:
        """Shutdown started: not ready from now on (requests already accepted still finish)."""
        self.stopping = True

    @property
    def is_ready(self) -> bool:
        return self.ready and not self.stopping

    def died(self, reason: str) -> None:
        """The batcher stopped for good: not ready at once, exit (status 1) shortly after."""
        self.ready, self.fatal = False, reason
        if self.stop_server is not None and self.loop is not None:
            self.loop.call_later(EXIT_DELAY_S, self.stop_server)

    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        if self.batcher is None or not self.ready:
            raise RequestError(503, f"not ready{': ' + self.fatal if self.fatal else ''}")
        return await self.batcher.infer(pixels)


def create_app(config: ServerConfig, session: Any | None = None) -> Any:
    """The ASGI app for one model (InferenceApp in front of FastAPI; ``.state.server`` is its ServerState).
    The session is created here unless given (tests may pass one)."""
    from contextlib import asynccontextmanager

    from resnet_edge import __version__

    session = session or create_session(config.model_path, config.provider, threads=config.threads, spinning=False)
    check_batching(session, config.max_batch_size)
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if config.model_name is None:
        if meta.get("architecture"):
            config.model_name = check_name(meta["architecture"], f"{config.model_path}: the 'architecture' metadata")
        else:
            config.model_name = check_name(
                Path(config.model_path).name.split(".")[0], f"{config.model_path}: the file name (give --model-name)"
            )
    else:  # one path segment in every URL, as Triton's model names; a file or the user may have named it
        check_name(config.model_name, "--model-name")
    state = ServerState(config, model_metadata(config.model_name, meta))
    io_binding = not is_cpu_provider(config.provider)

    @asynccontextmanager
    async def lifespan(app: Any):
        batcher = DynamicBatcher(
            session,
            config.max_batch_size,
            config.max_delay_ms,
            config.max_queue,
            io_binding=io_binding,
            on_death=state.died,
            instances=config.instances,
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

    app = FastAPI(
        title="resnet-edge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.server = state
    _add_error_handlers(app)
    _add_health_routes(app, state)
    _add_inference_routes(app, state)
    return InferenceApp(app, state)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _check_model(config: ServerConfig, name: str, version: str = "1") -> None:
    if name != config.model_name:
        raise RequestError(404, f"unknown model {name[:100]!r}; this server serves {config.model_name!r}")
    if version != "1":
        raise RequestError(404, f"unknown version {version[:20]!r} of {name!r}; this server has version 1")


def _add_error_handlers(app: Any) -> None:
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


def _ready_response(state: ServerState, body: dict[str, Any]) -> Response:
    return JSONResponse({**body, "ready": state.is_ready}, status_code=200 if state.is_ready else 503)


def _add_health_routes(app: Any, state: ServerState) -> None:
    """Server and model metadata, liveness and readiness (Open Inference Protocol)."""
    from resnet_edge import __version__

    config = state.config

    @app.get("/v2")
    async def server_metadata() -> dict[str, Any]:
        return {"name": "resnet-edge", "version": __version__, "extensions": ["binary_tensor_data", "statistics"]}

    @app.get("/v2/health/live")
    async def live() -> dict[str, Any]:
        return {"live": True}

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return _ready_response(state, {})

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def metadata(name: str, version: str = "1") -> dict[str, Any]:
        _check_model(config, name, version)
        return state.metadata

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str = "1") -> Response:
        _check_model(config, name, version)
        return _ready_response(state, {"name": name})

    @app.get("/v2/models/{name}/stats")
    async def stats(name: str) -> dict[str, Any]:
        """Triton's statistics extension, in brief: how much was served and how it was batched."""
        _check_model(config, name)
        b = state.batcher
        counts = (
            {
                "inference_count": b.rows,
                "execution_count": b.batches,
                "request_count": b.requests,
                "pending_requests": b.pending,
                "pending_rows": b.pending_rows,
            }
            if b
            else {}
        )
        memory = await state.work(_memory_report, config.provider)
        return {
            "model_stats": [{"name": name, "version": "1", **counts}],
            "server": {"pending_bytes": state.pending_bytes, **memory},
        }


def _memory_report(provider: str) -> dict[str, Any]:
    """Resident memory of this process, and its GPU memory (nvidia-smi) on a CUDA or TensorRT provider."""
    import os
    import subprocess

    import psutil

    report: dict[str, Any] = {"rss_bytes": psutil.Process().memory_info().rss}
    if is_cuda_device_provider(provider):
        report["gpu_memory_bytes"] = None
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                capture_output=True,
                text=True,
                timeout=2,
            ).stdout
            used = [
                int(m)
                for p, m in (line.split(",") for line in out.strip().splitlines() if "," in line)
                if p.strip() == str(os.getpid())
            ]
            report["gpu_memory_bytes"] = sum(used) * 2**20 if used else None
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return report


class _Body:
    """``async with _Body(headers, receive, state) as raw``: the request body, counted against
    --max-pending-bytes as it arrives and until the response (headers that only promise bytes hold
    none); 413 past --max-body-bytes (by Content-Length or while streaming). ``headers``: a mapping with
    .get (lower-case names); ``receive``: the ASGI receive callable. (A class, not a generator-based
    context manager: this runs for every request, on the event loop.)"""

    __slots__ = ("headers", "receive", "state", "taken")

    def __init__(self, headers: Any, receive: Callable[[], Any], state: ServerState) -> None:
        self.headers, self.receive, self.state, self.taken = headers, receive, state, 0

    async def __aenter__(self) -> bytes:
        state, headers = self.state, self.headers
        limit = state.config.max_body_bytes
        length = headers.get("content-length")
        if length is not None:
            if not ascii_count(length, 15):
                raise RequestError(400, "malformed Content-Length header")
            if int(length) > limit:
                raise RequestError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes")
        encoding = headers.get("content-encoding")
        if encoding is not None and encoding.strip().lower() != "identity":
            raise RequestError(
                415, f"Content-Encoding {encoding.strip().lower()[:40]!r} is not supported; send the body uncompressed"
            )
        chunks = []  # bytes received are counted in self.taken: a declared Content-Length alone reserves nothing
        try:
            while True:  # a client too slow to send it is cut off by the connection's guard (_guarded_http)
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    raise RequestError(400, "the client went away before sending the whole body")
                chunk = message.get("body", b"")
                if chunk:
                    if self.taken + len(chunk) > limit:
                        raise RequestError(413, f"request body is over the limit of {limit} bytes")
                    state.take_bytes(len(chunk))
                    self.taken += len(chunk)
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    break
        except BaseException:
            self._give_back()  # __aexit__ does not run when __aenter__ fails
            raise
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def __aexit__(self, *exc_info: Any) -> None:
        self._give_back()

    def _give_back(self) -> None:
        taken, self.taken = self.taken, 0
        self.state.give_bytes(taken)


class _Headers:
    """The ASGI scope's headers as a read-only mapping of lower-case str names (the first of repeats)."""

    __slots__ = ("_raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self._raw = raw

    def get(self, name: str, default: Any = None) -> Any:
        key = name.encode("latin-1")
        for k, v in self._raw:
            if k == key:
                return v.decode("latin-1")
        return default


INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")


async def infer_response(
    state: ServerState, headers: Any, receive: Callable[[], Any], name: str, version: str | None
) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """POST .../infer: status, body and extra headers (JSON errors as {"error": message})."""
    config = state.config
    try:
        _check_model(config, name, version or "1")
        async with _Body(headers, receive, state) as raw:
            parsed = await state.parse(raw, headers.get(HEADER_LENGTH.lower()))
            logits = await state.infer(parsed.pixels)
            body, header_length = await state.work(
                encode_http_response, config.model_name, parsed, logits, size=logits.nbytes * 8
            )
    except RequestError as exc:
        return exc.status, json.dumps({"error": str(exc)}).encode(), [(b"content-type", b"application/json")]
    if header_length is None:
        return 200, body, [(b"content-type", b"application/json")]
    return (
        200,
        body,
        [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH.lower().encode(), str(header_length).encode())],
    )


def _close_if_answered_unread(receive: Callable[[], Any], send: Callable[[Any], Any]) -> tuple[Callable, Callable]:
    """For a request with an Expect header (100-continue): an answer that starts before its whole body was
    read (413 by Content-Length, 415, an unknown model or route, 405) says connection: close, and uvicorn
    closes after it. Such a client may skip the body once it has a final answer; on a kept connection its
    next request would be read as that body. (Without Expect the client sends the body anyway, uvicorn
    reads past it, and closing early would cut the upload off with a reset instead of the answer.)"""
    whole = False

    async def receive_whole() -> Any:
        nonlocal whole
        message = await receive()
        if message["type"] == "http.request" and not message.get("more_body", False):
            whole = True
        return message

    async def send_closing(message: Any) -> None:
        if message["type"] == "http.response.start" and not whole:
            message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
        await send(message)

    return receive_whole, send_closing


class InferenceApp:
    """The ASGI app `serve` runs: POST .../infer, the hot path, answered here in plain ASGI (no framework
    middleware per request); everything else goes to the FastAPI app."""

    def __init__(self, fastapi_app: Any, state: ServerState) -> None:
        self.fastapi = fastapi_app
        self.server = state
        self.state = fastapi_app.state  # .state.server: the ServerState, as on the FastAPI app

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Any], send: Callable[[Any], Any]) -> None:
        if scope["type"] == "http" and any(name == b"expect" for name, _ in scope["headers"]):
            receive, send = _close_if_answered_unread(receive, send)
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
            if match:
                try:
                    status, body, extra = await infer_response(
                        self.server, _Headers(scope["headers"]), receive, *match.groups()
                    )
                except Exception:  # a bug of ours; the fuzz test hunts these
                    log.exception("unhandled error")
                    status, body, extra = (
                        500,
                        b'{"error": "internal server error"}',
                        [(b"content-type", b"application/json")],
                    )
                await send(
                    {
                        "type": "http.response.start",
                        "status": status,
                        "headers": [*extra, (b"content-length", str(len(body)).encode())],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.fastapi(scope, receive, send)


def _add_inference_routes(app: Any, state: ServerState) -> None:
    """POST /v2/models/{name}[/versions/1]/infer (tensors; InferenceApp answers POST itself, this route
    answers other methods with 405 and serves the FastAPI app mounted alone) and /v1/predict (one image file)."""
    from resnet_edge.inference.preprocess import ImageError, image_to_pixels

    async def infer(request: Request) -> Response:
        status, body, extra = await infer_response(
            state, request.headers, request.receive, request.path_params["name"], request.path_params.get("version")
        )
        return Response(body, status_code=status, headers={k.decode(): v.decode() for k, v in extra})

    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        app.router.routes.insert(0, Route(path, infer, methods=["POST"]))

    def decode(data: bytes) -> np.ndarray:
        try:
            return image_to_pixels(data)
        except ImageError as exc:
            raise RequestError(400, str(exc)) from None

    def image_pixels(raw: bytes, content_type: str) -> np.ndarray:
        data = multipart_file(raw, content_type) if content_type.startswith("multipart/form-data") else raw
        if not data:
            raise RequestError(
                400, "expected an image (PNG, JPEG, BMP, GIF, WebP, TIFF) as the body or as multipart field 'file'"
            )
        return decode(data)

    @app.post("/v1/predict")
    async def predict(request: Request) -> dict[str, Any]:
        async with _Body(request.headers, request.receive, state) as raw:
            # the multipart form, if any, and the image are both read in the request thread pool
            pixels = await state.work(image_pixels, raw, request.headers.get("content-type", ""))
            logits = await state.infer(pixels)
        return digit_prediction(logits[0])


# ------------------------------------------------------------------------------------------ running it
async def _busy_json(scope: Any, receive: Any, send: Any) -> None:
    body = b'{"error": "server busy: too many connections at once (--max-connections); retry later"}'
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class _OneWrite:
    """A connection's transport whose writes leave in one send per response: uvicorn writes a response's
    head and body separately (two system calls, and two wake-ups of a client that reads them as they
    come); they are joined here and sent when the response completes, or for anything else (100 Continue,
    a streamed body, an error answer before closing) at the end of the loop iteration at the latest.
    Everything but write and close is the transport's own."""

    __slots__ = ("_transport", "_loop", "_pending", "_scheduled")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop, self._pending, self._scheduled = transport, loop, [], False

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self.flush()  # what is pending goes first: the transport sends what it holds before it closes
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


UVICORN_TESTED = ((0, 29), (0, 55))  # the releases (major, minor) serve's use of uvicorn's internals was tested on
UVICORN_INTERNALS = (
    "HttpToolsProtocol",
    "service_unavailable",
    "STATUS_LINE",
)  # of uvicorn.protocols.http.httptools_impl


def _guarded_http(client_timeout: float) -> type:
    """uvicorn's httptools protocol with what it lacks against slow or greedy clients: a request (line,
    headers and body) must arrive within ``client_timeout`` seconds, its headers within
    MAX_HEADER_BYTES, else the connection is closed (an idle keep-alive connection is closed by
    uvicorn's timeout_keep_alive). One timer per request, no task."""
    from uvicorn.protocols.http import httptools_impl
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    httptools_impl.service_unavailable = _busy_json  # uvicorn's own 503 (past --max-connections) as {"error": ...}

    class GuardedHttp(HttpToolsProtocol):
        def connection_made(self, transport: Any) -> None:
            self._completed = 0  # requests received whole on this connection
            super().connection_made(_OneWrite(transport, self.loop))
            self._arm()

        def _arm(self) -> None:
            self._header_bytes, self._in_headers, self._since_arm = 0, True, 0
            self._guard = self.loop.call_later(client_timeout, self._too_slow)

        def _too_slow(self) -> None:
            if (
                self._since_arm == 0
                and self.cycle is not None
                and not self.cycle.response_complete
                and not self.cycle.more_body
            ):
                self._arm()  # a response is on its way to a request received whole: not the client's fault
            else:
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            completed = self._completed
            self._since_arm += len(data)
            super().data_received(data)
            if self._in_headers and self._completed == completed:  # headers still incomplete after this data
                self._header_bytes += len(data)
                if self._header_bytes > MAX_HEADER_BYTES:
                    self.transport.close()

        def send_400_response(self, msg: str) -> None:  # a request httptools cannot parse: {"error": ...} too
            import json

            body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
            head = [
                httptools_impl.STATUS_LINE[400],
                *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
            ]
            self.transport.write(
                b"".join(
                    [
                        *head,
                        b"content-type: application/json\r\ncontent-length: ",
                        str(len(body)).encode(),
                        b"\r\nconnection: close\r\n\r\n",
                        body,
                    ]
                )
            )
            self.transport.close()

        def on_headers_complete(self) -> None:
            self._in_headers = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._completed += 1
            self._guard.cancel()
            self._arm()  # for the next request on this connection

        def on_response_complete(self) -> None:
            self.transport.flush()  # the response's head and body, in one send
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._guard is not None:
                self._guard.cancel()
            super().connection_lost(exc)

    return GuardedHttp


class _GracefulServer(uvicorn.Server):
    """uvicorn's graceful shutdown on SIGINT/SIGTERM, then a normal exit (status 0): uvicorn itself
    re-raises the signal afterwards, which makes a clean stop look like a crash to a supervisor.
    ``on_exit`` runs at the signal: readiness (HTTP and gRPC) turns false while requests in flight drain."""

    on_exit: Callable[[], None] | None = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.on_exit is not None:
            self.on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[override]
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


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


def serve(
    config: ServerConfig, log_level: str = "warning", announce: Callable[[ServerConfig], None] | None = None
) -> None:
    """Run the server until SIGINT/SIGTERM; uvicorn then finishes the requests in flight and returns.
    ``announce`` is called once the model is loaded and the ports are open. A batcher that died ends
    the process with a one-line error (status 1)."""
    app = create_app(config)  # a missing or broken model fails here, before the port is opened
    state: ServerState = app.state.server
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
    if announce is not None:
        announce(config)
    kwargs: dict[str, Any] = {}
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: F401

        kwargs["loop"] = "uvloop"
    server = _GracefulServer(
        uvicorn.Config(
            app,
            log_level=log_level,
            access_log=False,
            timeout_graceful_shutdown=30,
            http=_guarded_http(config.client_timeout),
            timeout_keep_alive=5,
            proxy_headers=False,
            limit_concurrency=config.max_connections + 1,
            **kwargs,
        )
    )  # uvicorn counts this one
    state.stop_server = lambda: setattr(server, "should_exit", True)
    server.on_exit = state.draining
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.fatal:
        raise UserError(f"{state.fatal}; stopped serving so that a supervisor restarts the server")
