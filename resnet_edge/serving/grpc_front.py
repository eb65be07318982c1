"""`serve --grpc-port`: the Open Inference Protocol's gRPC service (GRPCInferenceService of KServe's
grpc_service.proto, Triton's) with grpcio, next to the HTTP server and sharing its batcher and its budgets.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer (inputs as raw_input_contents or
typed contents; outputs always as raw_output_contents, as Triton answers) and ModelStreamInfer (grpc_stream.py). The
gRPC server (grpc.aio) runs on the HTTP server's event loop; requests get v2.py's checks, the same as
HTTP's, and go to the same batcher. Every method is registered as request-streaming (on the wire the
same as unary, so unary clients are served unchanged): a handler starts before its message arrives,
reads the one message itself within --client-timeout, and gets it as bytes, parsed in the request thread
pool (a message of at most 16 KiB, state.INLINE_BYTES, on the event loop). ModelInfer messages are
received a few at a time (receive_slots: what --max-pending-bytes holds of --max-body-bytes messages,
COPIES copies each; a call waits for a slot up to --client-timeout) and their bytes count against
--max-pending-bytes, shared with HTTP, until the answer is built; the other methods read through slots
of their own, so that inference never delays a health check. Errors are gRPC status codes:
INVALID_ARGUMENT (a bad request), NOT_FOUND (model or version), RESOURCE_EXHAUSTED (queue or bytes full,
message too large, no receive slot within --client-timeout), UNAVAILABLE (not ready), DEADLINE_EXCEEDED
(a client's own deadline, or a message that did not arrive within --client-timeout). No torch here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import Any

import numpy as np

from resnet_edge.core.contract import INPUT_NAME, OUTPUT_NAME
from resnet_edge.core.errors import UserError
from resnet_edge.serving.models import NotLoaded
from resnet_edge.serving.proto import SERVICE, messages
from resnet_edge.serving.state import ServerState
from resnet_edge.serving.v2 import (
    OUTPUTS,
    Busy,
    InferRequest,
    RequestError,
    binary_values,
    check_tensor_header,
    output_tensors,
    tensor_pixels,
)

log = logging.getLogger(__name__)
GRACE_S = 5.0  # requests in flight get this long at shutdown
# What a message being received and parsed costs in RSS, in units of its size: grpc's slices, Python bytes,
# the upb message, its raw_input_contents bytes, malloc's slack. Measured with 32 clients sending 8 MiB
# ModelInfer messages (defaults: 256 MiB / 8 MiB = 32): RSS peaked 353 MB with 8 slots, 305 MB with 4
# (119 MB before), on a 2-core AMD EPYC.
COPIES = 8
TIMED_OUT = 408  # a RequestError status of this module only: DEADLINE_EXCEEDED
_TYPED = {"FP32": ("fp32_contents", np.float32), "UINT8": ("uint_contents", np.float64)}


def grpc_infer_request(request: Any) -> InferRequest:
    """A ModelInferRequest -> checked pixels and the outputs asked for (the checks of HTTP requests)."""
    if len(request.inputs) != 1:
        raise RequestError(400, f"expected exactly 1 input tensor named {INPUT_NAME!r}, got {len(request.inputs)}")
    tensor = request.inputs[0]
    n = check_tensor_header(tensor.name, tensor.datatype, list(tensor.shape))
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or tensor.HasField("contents"):
            raise RequestError(
                400, "raw_input_contents must hold exactly one entry, and then the input no typed contents"
            )
        values = binary_values(tensor.datatype, request.raw_input_contents[0])
    else:
        name, dtype = _TYPED[tensor.datatype]
        others = [f.name for f, _ in tensor.contents.ListFields() if f.name != name]
        if others:
            raise RequestError(400, f"{tensor.datatype} contents go in {name}, got {', '.join(others)}")
        values = np.array(getattr(tensor.contents, name), dtype=dtype)
    pixels = tensor_pixels(tensor.datatype, n, values)
    outputs = [(o.name, True) for o in request.outputs] or [(OUTPUT_NAME, True)]
    unknown = [name for name, _ in outputs if name not in OUTPUTS]
    if unknown:
        raise RequestError(400, f"unknown output {unknown[0][:80]!r}, expected one of {list(OUTPUTS)}")
    if len({name for name, _ in outputs}) != len(outputs):
        raise RequestError(400, "an output is asked for twice")
    for what, params in (
        ("request", request.parameters),
        ("input", tensor.parameters),
        *(("output", o.parameters) for o in request.outputs),
    ):
        for unsupported in ("shared_memory_region", "classification"):
            if unsupported in params:  # refused over HTTP too
                raise RequestError(400, f"{what} parameter {unsupported!r} is not supported by this server")
    return InferRequest(pixels, outputs, request.id)


def grpc_infer_response(model: Any, request: InferRequest, logits: np.ndarray) -> Any:
    response = messages()["ModelInferResponse"](
        model_name=model.name, model_version=model.version, id=request.request_id or ""
    )
    tensors = output_tensors(logits, [name for name, _ in request.outputs])
    for name, _ in request.outputs:
        t = np.ascontiguousarray(tensors[name], dtype="<f4")
        response.outputs.add(name=name, datatype="FP32", shape=list(t.shape))
        response.raw_output_contents.append(t.tobytes())
    return response


def _status(exc: RequestError) -> Any:
    import grpc

    if isinstance(exc, Busy) or exc.status == 413:
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, NotLoaded):
        return grpc.StatusCode.UNAVAILABLE
    return {
        400: grpc.StatusCode.INVALID_ARGUMENT,
        403: grpc.StatusCode.FAILED_PRECONDITION,
        404: grpc.StatusCode.NOT_FOUND,
        503: grpc.StatusCode.UNAVAILABLE,
        TIMED_OUT: grpc.StatusCode.DEADLINE_EXCEEDED,
    }.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)


def parse_message(cls: Any, holder: list[bytes]) -> Any:
    """The one message of a call, popped from ``holder`` (so that no caller keeps its bytes) -> a ``cls``."""
    try:
        return cls.FromString(holder.pop())
    except Exception:
        raise RequestError(400, "the request is not a valid protobuf message of this method") from None


def parse_model_infer(holder: list[bytes]) -> tuple[str, str, str, InferRequest | RequestError]:
    """A ModelInfer message's bytes (popped from ``holder``) -> its id, model name and version, and its
    checked pixels, or the RequestError of a check: in the request thread pool (on the event loop for a
    message of at most INLINE_BYTES). The error is returned afresh, not raised: no traceback into the
    frames that hold the message, gone when this returns. A message that is no ModelInferRequest raises."""
    request = parse_message(messages()["ModelInferRequest"], holder)
    request_id, name, version = request.id, request.model_name, request.model_version
    try:
        return request_id, name, version, grpc_infer_request(request)
    except RequestError as exc:
        return request_id, name, version, RequestError(exc.status, str(exc))
    finally:
        del request


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_grpc_port(host: str, port: int) -> None:
    """Fail early, before anything is announced, when the gRPC port is taken (the server binds it at start-up)."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen for gRPC on {grpc_address(host, port)}: {exc.strerror or exc}") from None


def max_rpcs(config: Any) -> int:
    """ModelInfer messages of --max-body-bytes that --max-pending-bytes holds (at most --max-connections)."""
    return max(1, min(config.max_connections, config.max_pending_bytes // config.max_body_bytes))


def receive_slots(config: Any) -> int:
    """Messages received and parsed at once per kind (ModelInfer; the other methods): each may cost COPIES
    times its size while it is, so that all of them stay within --max-pending-bytes."""
    return max(1, max_rpcs(config) // COPIES)


class GrpcServer:
    """GRPCInferenceService on --grpc-port, on the HTTP server's event loop (grpc.aio), sharing ``state``."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = state.config
        self.server: Any = None
        # receive slots of ModelInfer, and of the other methods (never delayed by inference)
        self.infer_slots = asyncio.Semaphore(receive_slots(self.config))
        self.other_slots = asyncio.Semaphore(receive_slots(self.config))
        from resnet_edge.serving.grpc_stream import StreamInfer  # it imports this module

        self.streams = StreamInfer(self)  # ModelStreamInfer

    async def start(self) -> None:
        """Open the port and serve; a port that cannot be opened is a UserError."""
        import grpc

        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.config.max_body_bytes),
                ("grpc.max_send_message_length", 64 * 2**20),
                ("grpc.so_reuseport", 0),  # a port in use is an error, never shared
                # no window growth: a stream whose message is not being read holds
                # the initial 64 KiB window (with BDP probing: 676 MB RSS above, not 305)
                ("grpc.http2.bdp_probe", 0),
            ],
            maximum_concurrent_rpcs=self.config.max_connections,
        )  # as HTTP's connections
        server.add_generic_rpc_handlers((self._handlers(),))
        address = grpc_address(self.config.host, self.config.grpc_port)
        try:
            port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise UserError(f"cannot listen for gRPC on {address}: {str(exc).splitlines()[0][:120]}") from None
        if not port:
            raise UserError(f"cannot listen for gRPC on {address} (in use, or not an address of this machine)")
        await server.start()
        self.server = server

    async def stop(self) -> None:
        self.streams.close()  # streams read no further message; the grace period is theirs too
        if self.server is not None:
            await self.server.stop(GRACE_S)

    def _handlers(self) -> Any:
        import grpc

        from resnet_edge.serving.grpc_models import CALLS

        classes = messages()
        calls = {
            "ServerLive": self._server_live,
            "ServerReady": self._server_ready,
            "ServerMetadata": self._server_metadata,
            "ModelInfer": self._model_infer,
            **{name: functools.partial(call, self) for name, call in CALLS.items()},
        }
        handlers = {
            name: grpc.stream_unary_rpc_method_handler(  # one message, read by the handler: see _receive
                self._guarded(fn, classes[f"{name}Request"]),
                request_deserializer=None,  # bytes: parsed off the loop
                response_serializer=classes[f"{name}Response"].SerializeToString,
            )
            for name, fn in calls.items()
        }
        handlers["ModelStreamInfer"] = self.streams.method_handler()
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _guarded(self, fn: Any, cls: Any) -> Any:
        """Turn RequestError into a gRPC status; anything else is logged. The status is sent only once
        ``fn``'s frames are gone: context.abort raises, and a traceback into frames that still hold the
        request would keep it (megabytes) alive until the cyclic GC runs."""

        async def handler(requests: Any, context: Any) -> Any:
            response, error = await self._answer(fn, cls, context)
            if error is not None:
                await context.abort(*error)
            return response

        return handler

    async def _answer(self, fn: Any, cls: Any, context: Any) -> tuple[Any, Any]:
        import grpc

        try:
            return await fn(cls, context), None
        except RequestError as exc:
            error = (_status(exc), str(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("gRPC handler failed")
            error = (grpc.StatusCode.INTERNAL, "internal server error")
        return None, error

    async def _receive(self, context: Any, slots: asyncio.Semaphore) -> bytes:
        """The call's one message, read while holding one of ``slots`` (the caller releases it): a slot
        within --client-timeout (else RESOURCE_EXHAUSTED), then the message within --client-timeout
        (else DEADLINE_EXCEEDED)."""
        import grpc

        timeout = self.config.client_timeout
        try:
            await asyncio.wait_for(slots.acquire(), timeout)
        except asyncio.TimeoutError:
            raise Busy(
                f"server busy: every gRPC receive slot stayed taken for --client-timeout ({timeout:g} s; "
                f"{receive_slots(self.config)} slots, from --max-pending-bytes); retry later"
            ) from None
        try:
            data = await asyncio.wait_for(context.read(), timeout)
        except asyncio.TimeoutError:
            slots.release()
            raise RequestError(
                TIMED_OUT, f"the request message did not arrive within --client-timeout ({timeout:g} s)"
            ) from None
        except BaseException:
            slots.release()
            raise
        if data is grpc.aio.EOF:
            slots.release()
            raise RequestError(400, "the call ended without a request message")
        return data

    async def request(self, cls: Any, context: Any) -> Any:
        """The message of a method other than ModelInfer (small ones are parsed inline)."""
        data = await self._receive(context, self.other_slots)
        try:
            size, holder = len(data), [data]
            del data
            return await self.state.work(parse_message, cls, holder, size=size)
        finally:
            self.other_slots.release()

    async def _server_live(self, cls: Any, context: Any) -> Any:
        await self.request(cls, context)
        return messages()["ServerLiveResponse"](live=True)

    async def _server_ready(self, cls: Any, context: Any) -> Any:
        await self.request(cls, context)
        return messages()["ServerReadyResponse"](ready=self.state.is_ready)

    async def _server_metadata(self, cls: Any, context: Any) -> Any:
        from resnet_edge import __version__

        await self.request(cls, context)
        return messages()["ServerMetadataResponse"](
            name="resnet-edge", version=__version__, extensions=[]
        )  # binary_tensor_data is HTTP's; gRPC has raw contents

    async def _model_infer(self, cls: Any, context: Any) -> Any:
        """ModelInfer, counted in its model's statistics and metrics (a call for a model not served is not)."""
        started, timing, served = time.perf_counter_ns(), [0], list[Any]()
        try:
            response = await self._model_infer_counted(cls, context, timing, served)
        except RequestError as exc:
            record(served, exc.status, started, timing)
            raise
        record(served, 200, started, timing)
        return response

    async def _model_infer_counted(self, cls: Any, context: Any, timing: list[int], served: list[Any]) -> Any:
        """Received in a slot, its bytes counted in the budget shared with HTTP (--max-pending-bytes) until
        the answer is built; parsed as state.work places it, the bytes dropped as soon as parsed."""
        slots = self.infer_slots
        data = await self._receive(context, slots)
        holder: list[bytes] | None = None
        try:
            size, holder = len(data), [data]
            del data
            self.state.take_bytes(size)  # Busy: RESOURCE_EXHAUSTED
            try:
                _, name, version, parsed = await self.state.work(parse_model_infer, holder, size=size)
            except BaseException:
                self.state.give_bytes(size)
                raise
        finally:
            holder = None
            slots.release()
        try:
            return await infer_parsed(self.state, name, version, parsed, timing, served)
        finally:
            self.state.give_bytes(size)


async def infer_parsed(
    state: ServerState, name: str, version: str, parsed: InferRequest | RequestError, timing: list[int], served: list
) -> Any:
    """A parsed ModelInfer (unary or streamed) -> its answer: the model looked up (404 for one not served,
    counted nowhere; else ``served`` holds it, to count the request), then the parse's error or the logits."""
    model = state.models.lookup(name, version or None)
    served.append(model)
    if isinstance(parsed, RequestError):
        raise parsed
    with state.models.serving(name, version or None) as model:  # an unload waits for it (models.py)
        logits = await model.infer(parsed.pixels, timing)
    return grpc_infer_response(model, parsed, logits)


def record(served: list[Any], code: int, started: int, timing: list[int]) -> None:
    """One request of the model in ``served`` (none: not counted) answered with ``code``."""
    if served:
        served[0].request_done("grpc", code, started, timing[0])
