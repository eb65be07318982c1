"""The dynamic batcher of `serve`: joins the rows of concurrent requests (HTTP and gRPC) into ONNX Runtime
calls of at most --max-batch-size rows, runs them off the event loop, and hands each caller its own rows.
No torch here."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from resnet_edge.core.contract import INPUT_NAME, NUM_CLASSES, OUTPUT_NAME
from resnet_edge.serving.v2 import Busy, RequestError, model_input

log = logging.getLogger(__name__)


class ModelFailure(Exception):
    """The model broke its contract during serving: fatal, the server stops being ready and exits."""


@dataclass
class _Job:
    """One batch's worth (at most --max-batch-size rows) of one request, and the future its caller awaits."""

    pixels: np.ndarray
    future: asyncio.Future = field(repr=False)
    queued: float = 0.0  # event-loop time it was queued: a batch waits for company until queued + max_delay


class RowBudget:
    """Rows accepted and not answered yet, counted against --max-queue across every model's batcher (the
    server's limit, shared: serving more models never means more rows held)."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.held, self.limit = 0, limit


@dataclass
class Served:
    """What the batcher has answered so far (/v2/models/{name}/stats)."""

    batches: int = 0  # ONNX Runtime calls made
    rows: int = 0  # images answered
    requests: int = 0  # requests answered


class DynamicBatcher:
    """Joins concurrent requests into one ONNX Runtime call; each caller gets exactly its own rows.

    ``max_queue`` bounds the rows accepted and not answered yet; a request above ``max_batch_size``
    rows is split into batches of at most that. Up to ``instances`` batches run at once (ONNX Runtime
    sessions are thread-safe); while they run, the next batch gathers, so request handling on the
    event loop overlaps inference instead of taking turns with it. ``io_binding`` feeds the session
    through ONNX Runtime's IOBinding (one host-to-device copy per batch on a GPU provider).

    A job moves: ``queue`` -> ``gathering`` (the batch being gathered; or ``next_first``, the job that
    did not fit and starts the next batch) -> ``running`` (handed to ONNX Runtime) -> answered."""

    def __init__(
        self,
        session: Any,
        max_batch_size: int,
        max_delay_ms: float,
        max_queue: int,
        io_binding: bool = False,
        on_death: Callable[[str], None] | None = None,
        instances: int = 1,
        on_batch: Callable[[int, list[int], int, int, int], None] | None = None,
        budget: RowBudget | None = None,
    ) -> None:
        self.session = session
        self.max_batch_size = max_batch_size
        self.max_delay = max_delay_ms / 1e3
        self.max_queue = max_queue
        self.instances = instances
        self.io_binding = io_binding
        self.on_death = on_death
        self.on_batch = on_batch  # (rows, each job's queue wait, input, infer, output), in nanoseconds
        self.executor = concurrent.futures.ThreadPoolExecutor(max_workers=instances, thread_name_prefix="onnxruntime")
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.task: asyncio.Task | None = None  # the loop that gathers batches
        self.free_instances: asyncio.Semaphore | None = None  # made in start(), on the running loop
        self.dead: str | None = None  # why the batcher stopped for good
        self.failure: BaseException | None = None  # what killed it, when a running batch did
        self.served = Served()
        self.callers_waiting = 0  # requests whose caller still awaits its answer (queued or in a running batch)
        # the server's rows held, every batcher together: rows queued, gathering or running count against
        # --max-queue until they leave the batcher (a caller that went away leaves its rows counted until they
        # are dropped, so /stats can show rows held with no caller waiting)
        self.budget = budget or RowBudget(max_queue)
        self.gathering: list[_Job] = []  # the jobs of the batch being gathered
        self.next_first: _Job | None = None  # taken from the queue, did not fit: starts the next batch
        self.running: dict[asyncio.Task, list[_Job]] = {}  # batches handed to ONNX Runtime

    def start(self) -> None:
        self.free_instances = asyncio.Semaphore(self.instances)
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
        # a batch still inside ONNX Runtime (an unload whose drain timed out) is waited for off the loop
        await asyncio.get_running_loop().run_in_executor(None, self.executor.shutdown, True)

    def _ended(self, task: asyncio.Task) -> None:
        """The loop ended: cancelled at shutdown, or died (itself or in a batch). Either way nobody waits forever."""
        failure = self.failure or (None if task.cancelled() else task.exception())
        reason = f"the batcher stopped ({failure!r:.200})" if failure else "the server is shutting down"
        self.dead = reason
        queued = [*self.gathering, *([self.next_first] if self.next_first else [])]
        while not self.queue.empty():
            queued.append(self.queue.get_nowait())
        self.gathering, self.next_first = [], None
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
        if self.budget.held + n > self.budget.limit:
            raise Busy(
                f"server busy: {self.budget.held} images already queued (limit {self.budget.limit}); retry later"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        futures = []
        for start in range(0, n, self.max_batch_size):  # a large request is split into whole batches
            future = loop.create_future()
            self.queue.put_nowait(_Job(pixels[start : start + self.max_batch_size], future, now))
            futures.append(future)
        self.callers_waiting += 1
        self.budget.held += n  # given back as each part leaves the batcher, not when the caller leaves
        try:
            parts = [await futures[0]] if len(futures) == 1 else await asyncio.gather(*futures)
        finally:
            self.callers_waiting -= 1
        self.served.requests += 1  # one request, however many batches it was split into
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _run(self, parts: list[np.ndarray]) -> tuple[np.ndarray, int, int]:
        """The batch's logits, and the nanoseconds spent joining its input and running the model."""
        t0 = time.perf_counter_ns()
        batch = model_input(parts)  # in this thread: the event loop never joins or scales pixels
        t1 = time.perf_counter_ns()
        if not self.io_binding:
            logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]
        else:
            binding = self.session.io_binding()
            binding.bind_cpu_input(INPUT_NAME, batch)  # from host memory: ONNX Runtime copies it once per batch
            binding.bind_output(OUTPUT_NAME, "cpu")
            self.session.run_with_iobinding(binding)
            logits = binding.copy_outputs_to_cpu()[0]
        return logits, t1 - t0, time.perf_counter_ns() - t1

    def _take(self, jobs: list[_Job], rows: int) -> tuple[int, _Job | None]:
        """Add queued jobs to ``jobs`` without waiting, up to max_batch_size rows; the job that did not fit."""
        while rows < self.max_batch_size and not self.queue.empty():
            nxt = self.queue.get_nowait()
            if rows + len(nxt.pixels) > self.max_batch_size:
                self.next_first = nxt
                return rows, nxt  # starts the next batch; a batch never exceeds the limit
            jobs.append(nxt)
            rows += len(nxt.pixels)
        return rows, None

    async def _collect(self, first: _Job) -> tuple[list[_Job], _Job | None]:
        """``first`` and what joins it until max_delay after ``first`` was queued, up to max_batch_size rows;
        the job that did not fit."""
        loop = asyncio.get_running_loop()
        jobs = self.gathering  # [first]
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
                self.next_first = over = nxt
                break
            jobs.append(nxt)
            rows, over = self._take(jobs, rows + len(nxt.pixels))
        return jobs, over

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_first: _Job | None = None  # the job that did not fit the last batch
        while True:
            first = next_first or await self.queue.get()
            self.gathering, self.next_first = [first], None
            jobs, next_first = await self._collect(first)
            assert self.free_instances is not None
            await self.free_instances.acquire()  # every instance busy: the queue grows meanwhile, the batch takes it
            if next_first is None:
                _, next_first = self._take(jobs, sum(len(j.pixels) for j in jobs))
            gone = [j for j in jobs if j.future.done()]  # callers that went away (cancelled, a deadline)
            if gone:
                self._release(gone)
                jobs = [j for j in jobs if not j.future.done()]
            self.gathering = []
            if not jobs:
                self.free_instances.release()
                continue
            task = loop.create_task(self._batch(jobs))
            self.running[task] = jobs
            task.add_done_callback(self._batch_done)

    async def _batch(self, jobs: list[_Job]) -> None:
        loop = asyncio.get_running_loop()
        try:
            rows = sum(len(j.pixels) for j in jobs)
            started = loop.time()
            try:
                logits, input_ns, infer_ns = await loop.run_in_executor(
                    self.executor, self._run, [j.pixels for j in jobs]
                )
            except Exception as exc:  # the model failed on this batch: its callers may retry
                log.exception("inference failed")
                _fail(jobs, f"inference failed: {type(exc).__name__}; retry later")
                return
            if getattr(logits, "shape", None) != (rows, NUM_CLASSES):
                _fail(jobs, "not ready: the model broke its contract")
                raise ModelFailure(
                    f"the model answered a batch of {rows} rows with {getattr(logits, 'shape', None)}, "
                    f"expected ({rows}, {NUM_CLASSES})"
                )
            t0 = time.perf_counter_ns()
            self._deliver(jobs, logits)
            if self.on_batch is not None:
                waits = [int((started - j.queued) * 1e9) for j in jobs]
                self.on_batch(rows, waits, input_ns, infer_ns, time.perf_counter_ns() - t0)
        finally:
            self._release(jobs)
            assert self.free_instances is not None
            self.free_instances.release()

    def _release(self, jobs: list[_Job]) -> None:
        """Rows that left the batcher (answered, failed or dropped) stop counting against --max-queue. A
        caller that goes away leaves its rows queued until the batcher drops them, so they count till then."""
        self.budget.held -= sum(len(j.pixels) for j in jobs)

    def _batch_done(self, task: asyncio.Task) -> None:
        jobs = self.running.pop(task, [])
        if task.cancelled() or task.exception() is None:
            return
        self.failure = task.exception()  # fatal (ModelFailure, or a bug of ours): the whole batcher stops
        _fail(jobs, f"not ready: the batcher stopped ({self.failure!r:.200})")
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _deliver(self, jobs: list[_Job], logits: np.ndarray) -> None:
        self.served.batches += 1
        start = 0
        for j in jobs:
            n = len(j.pixels)
            self.served.rows += n
            if not j.future.done():
                j.future.set_result(logits[start : start + n])
            start += n


def _fail(jobs: list[_Job], message: str) -> None:
    """A 503 with ``message`` for each caller of ``jobs`` that still waits (an exception of its own each)."""
    for job in jobs:
        if not job.future.done():
            job.future.set_exception(RequestError(503, message))
