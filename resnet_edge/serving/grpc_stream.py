"""gRPC ModelStreamInfer: Triton's bidirectional stream of ModelInferRequest -> ModelStreamInferResponse,
with unary ModelInfer's checks, batcher and budgets (grpc_front.py registers it and ends streams at shutdown).

Each message of a stream is one inference request, handled as unary ModelInfer handles its one message: its
bytes count in --max-pending-bytes (shared with HTTP and unary calls) until its answer is built; it is
parsed and checked by the same functions (in the request thread pool above state.INLINE_BYTES); its rows go
to the same batcher (--max-queue); it is counted in the statistics and metrics as protocol "grpc" (a
request for a model not served is not, as unary). Its answer is a ModelStreamInferResponse whose
infer_response.id is the request's id. An error for one request is that answer's error_message (the name
of the gRPC status code unary would answer, then unary's details; infer_response.id still the request's
id when the message could be parsed) and the stream goes on. Answers go out in completion order, as
Triton's do; the id tells them apart.

Bounds. A stream has at most MAX_IN_FLIGHT requests read and not yet answered; its next message is read
only when one of them has been answered, so a client that sends faster than it is answered is held by
HTTP/2 flow control (grpc_front turns BDP probing off: 64 KiB a stream). A stream has one message being
received at a time, not counted in --max-pending-bytes until it has arrived, so at most max_rpcs(config)
streams are open at once (as many --max-body-bytes messages as --max-pending-bytes holds, at most
--max-connections); one more is refused with RESOURCE_EXHAUSTED. A stream may stay silent between messages
as long as it likes (--client-timeout bounds a unary call's one message). A message over --max-body-bytes
ends its stream with RESOURCE_EXHAUSTED (grpc's own limit). At shutdown a stream reads no further message,
answers those in flight (within grpc_front's grace period) and ends with OK. No torch here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from resnet_edge.serving.grpc_front import _status, infer_parsed, max_rpcs, parse_model_infer, record
from resnet_edge.serving.proto import messages
from resnet_edge.serving.v2 import RequestError

log = logging.getLogger(__name__)
# Requests of one stream read and not yet answered. Enough to keep the batcher fed from one stream (8 rows
# or more in one batch); the next message waits for one of them, so a stream holds at most this many
# messages' bytes in the budget and this many requests in the batcher.
MAX_IN_FLIGHT = 8


class StreamInfer:
    """ModelStreamInfer of a grpc_front.GrpcServer: the streams open, and the event that ends them."""

    def __init__(self, front: Any) -> None:
        self.state = front.state
        self.limit = max_rpcs(front.config)
        self.open = 0
        self.closing = asyncio.Event()

    def method_handler(self) -> Any:
        import grpc

        return grpc.stream_stream_rpc_method_handler(
            self.handle,
            request_deserializer=None,  # bytes: parsed off the loop, counted in the byte budget first
            response_serializer=messages()["ModelStreamInferResponse"].SerializeToString,
        )

    def close(self) -> None:
        """Shutdown: streams read no further message; they answer the ones in flight and end."""
        self.closing.set()

    async def handle(self, requests: Any, context: Any) -> None:
        import grpc

        if self.closing.is_set():
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        if self.open >= self.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.open} gRPC streams open (limit {self.limit}: --max-pending-bytes / "
                "--max-body-bytes, at most --max-connections); retry later",
            )
        self.open += 1
        try:
            await _Stream(self, context).run()
        finally:
            self.open -= 1


class _Stream:
    """One ModelStreamInfer call: reads while fewer than MAX_IN_FLIGHT requests are unanswered, and
    answers each request as it completes (one write at a time)."""

    def __init__(self, owner: StreamInfer, context: Any) -> None:
        self.owner, self.state, self.context = owner, owner.state, context
        self.in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)
        self.writing = asyncio.Lock()
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Until the client half-closes (or the server closes): then the answers in flight, then OK."""
        import grpc

        loop = asyncio.get_running_loop()
        closed = loop.create_task(self.owner.closing.wait())
        read: asyncio.Future | None = None
        try:
            while True:
                await self.in_flight.acquire()  # back-pressure: the next message waits for an answer
                if closed.done():
                    break
                read = asyncio.ensure_future(self.context.read())
                await asyncio.wait({read, closed}, return_when=asyncio.FIRST_COMPLETED)
                if not read.done():
                    break  # shutdown: no further message
                data, read = read.result(), None
                if data is grpc.aio.EOF:
                    break
                task = loop.create_task(self._answer(data))
                del data
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            while self.tasks:
                await asyncio.wait(set(self.tasks))
        finally:  # the client went away or the call was cancelled: what it started is dropped
            closed.cancel()
            if read is not None:
                read.cancel()
            for task in self.tasks:
                task.cancel()

    async def _answer(self, data: bytes) -> None:
        """One request: its answer (or error) written on the stream, then its place in flight given back."""
        import grpc

        started, timing, request_id, served = time.perf_counter_ns(), [0], [""], list[Any]()
        holder = [data]
        del data
        classes = messages()
        code: int | None = 200
        try:
            response = classes["ModelStreamInferResponse"](
                infer_response=await self._infer(holder, timing, request_id, served)
            )
        except RequestError as exc:
            code, response = exc.status, self._error(_status(exc), str(exc), request_id[0])
        except Exception:
            log.exception("gRPC stream request failed")
            code, response = None, self._error(grpc.StatusCode.INTERNAL, "internal server error", request_id[0])
        finally:
            holder.clear()
        if code is not None:  # counted by its model (none: a model or version this server does not serve)
            record(served, code, started, timing)
        try:
            async with self.writing:
                await self.context.write(response)
        except Exception as exc:  # the call ended meanwhile (client gone): nobody to answer
            log.debug("gRPC stream answer not sent: %r", exc)
        finally:
            self.in_flight.release()

    async def _infer(self, holder: list[bytes], timing: list[int], request_id: list[str], served: list) -> Any:
        """Unary ModelInfer's path for one message: counted in --max-pending-bytes until its answer is built."""
        size = len(holder[0])
        self.state.take_bytes(size)  # Busy: RESOURCE_EXHAUSTED
        try:
            request_id[0], name, version, parsed = await self.state.work(parse_model_infer, holder, size=size)
            return await infer_parsed(self.state, name, version, parsed, timing, served)
        finally:
            self.state.give_bytes(size)

    def _error(self, code: Any, message: str, request_id: str) -> Any:
        classes = messages()
        return classes["ModelStreamInferResponse"](
            error_message=f"{code.name}: {message}", infer_response=classes["ModelInferResponse"](id=request_id)
        )
