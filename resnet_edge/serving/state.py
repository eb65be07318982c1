"""What `serve`'s routes share, HTTP and gRPC: readiness, the served models (models.py), the request thread
pool (and the process that parses large JSON bodies), the budget of request bytes in flight and the
Prometheus metrics. No torch here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from resnet_edge.core.config import ServerConfig
from resnet_edge.serving.models import ModelTable, ServedModel
from resnet_edge.serving.statistics import Metrics
from resnet_edge.serving.v2 import Busy, InferRequest, RequestError, check_json_size, json_part_size, parse_http_request

INLINE_BYTES = 16 * 1024  # request bodies this small are parsed on the event loop (tens of microseconds)
WORKERS = 2  # threads for request work (parse, convert, decode): also bounds decoding memory
PROCESS_BYTES = 2**20  # JSON bodies larger than this are parsed in a separate process: json holds the GIL
EXIT_DELAY_S = 1.0  # after a fatal model failure: ready answers 503 this long, then the process exits


class ServerState:
    """What the routes (HTTP and gRPC) share: readiness, the models, the request thread pool, byte budget."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.started = False  # the lifespan has started the batchers (and gRPC)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="requests")
        self.processes: concurrent.futures.ProcessPoolExecutor | None = None  # started at the first large JSON body
        self.pending_bytes = 0
        self.bytes_lock = threading.Lock()
        self.fatal: str | None = None
        self.stopping = False  # SIGTERM/SIGINT received: readiness answers false
        self.stop_server: Callable[[], None] | None = None  # set by serve(): ends uvicorn
        self.metrics = (  # Prometheus; Triton's statistics are each model's (its Recorder)
            Metrics(self._rows_held, lambda: self.pending_bytes) if config.metrics else None
        )
        self.models = ModelTable(config, self.metrics)

    def _rows_held(self) -> int:
        return self.models.budget.held

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
        json_size = json_part_size(header_value, len(raw))
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
        return self.started and not self.stopping and self.fatal is None and self.models.ready

    def model_is_ready(self, model: ServedModel) -> bool:
        """A model's readiness (HTTP .../ready, gRPC ModelReady): served, and the server not shutting down."""
        return self.started and not self.stopping and model.ready

    def died(self, reason: str) -> None:
        """The server must stop: not ready at once, exit (status 1) shortly after."""
        self.fatal = reason
        if self.stop_server is not None and self.loop is not None:
            self.loop.call_later(EXIT_DELAY_S, self.stop_server)

    def model_died(self, model: ServedModel, reason: str) -> None:
        """A model broke its contract while serving (its batcher stopped). Served from one file (--model,
        --run), the server exits so that a supervisor restarts it; from a repository, that model is
        UNAVAILABLE with the reason (the others serve on, the server stays ready while one does; a load
        brings it back)."""
        if self.config.repository is None:
            self.died(reason)
        else:
            model.fail(reason)
