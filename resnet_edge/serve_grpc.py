"""`serve --grpc-port`: the Open Inference Protocol's gRPC service (GRPCInferenceService of KServe's
grpc_predict_v2.proto) with grpcio, next to the HTTP server and sharing its batcher.

ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata and ModelInfer (inputs as
raw_input_contents or typed contents; outputs always as raw_output_contents, as Triton answers).
The gRPC server (grpc.aio) runs on the HTTP server's event loop; requests get serve_v2's checks, the
same as HTTP's, and go to the same batcher. Errors are gRPC status codes:
INVALID_ARGUMENT (a bad request), NOT_FOUND (model or version), RESOURCE_EXHAUSTED (queue or bytes
full, message too large), UNAVAILABLE (not ready), DEADLINE_EXCEEDED (a client's own deadline). No torch here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import numpy as np

from .contract import INPUT_NAME, INPUT_SHAPE, NUM_CLASSES, OUTPUT_NAME
from .errors import UserError
from .proto import SERVICE, messages
from .serve_v2 import (OUTPUTS, Busy, InferRequest, RequestError, binary_values, check_tensor_header, output_tensors,
                       tensor_pixels)

log = logging.getLogger(__name__)
GRACE_S = 5.0  # requests in flight get this long at shutdown
_TYPED = {"FP32": ("fp32_contents", np.float32), "UINT8": ("uint_contents", np.float64)}


def grpc_infer_request(request: Any) -> InferRequest:
    """A ModelInferRequest -> checked pixels and the outputs asked for (the checks of HTTP requests)."""
    if len(request.inputs) != 1:
        raise RequestError(400, f"expected exactly 1 input tensor named {INPUT_NAME!r}, got {len(request.inputs)}")
    tensor = request.inputs[0]
    n = check_tensor_header(tensor.name, tensor.datatype, list(tensor.shape))
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1 or tensor.HasField("contents"):
            raise RequestError(400, "raw_input_contents must hold exactly one entry, and then the input no typed contents")
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
    for what, params in (("request", request.parameters), ("input", tensor.parameters),
                         *(("output", o.parameters) for o in request.outputs)):
        for unsupported in ("shared_memory_region", "classification"):
            if unsupported in params:  # refused over HTTP too
                raise RequestError(400, f"{what} parameter {unsupported!r} is not supported by this server")
    return InferRequest(pixels, outputs, request.id)


def grpc_infer_response(model_name: str, request: InferRequest, logits: np.ndarray) -> Any:
    response = messages()["ModelInferResponse"](model_name=model_name, model_version="1", id=request.request_id or "")
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
    return {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND, 503: grpc.StatusCode.UNAVAILABLE}.get(exc.status, grpc.StatusCode.INVALID_ARGUMENT)


class _Malformed:
    """What a request that is not a valid protobuf message deserializes to (answered INVALID_ARGUMENT)."""


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
    """RPCs at once: grpcio receives and parses a message before any handler runs, so --max-pending-bytes
    bounds gRPC memory only through this count (each message is at most --max-body-bytes); beyond: RESOURCE_EXHAUSTED."""
    return max(1, min(config.max_connections, config.max_pending_bytes // config.max_body_bytes))


class GrpcServer:
    """GRPCInferenceService on --grpc-port, on the HTTP server's event loop (grpc.aio), sharing ``state``."""

    def __init__(self, state: Any) -> None:
        self.state = state
        self.config = state.config
        self.server: Any = None

    async def start(self) -> None:
        """Open the port and serve; a port that cannot be opened is a UserError."""
        import grpc

        server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.config.max_body_bytes),
                                          ("grpc.max_send_message_length", 64 * 2**20),
                                          ("grpc.so_reuseport", 0)],  # a port in use is an error, never shared
                                 maximum_concurrent_rpcs=max_rpcs(self.config))
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
        if self.server is not None:
            await self.server.stop(GRACE_S)


    def _handlers(self) -> Any:
        import grpc

        classes = messages()

        def parse(cls: Any) -> Any:
            def parse_bytes(data: bytes) -> Any:
                try:
                    return cls.FromString(data)
                except Exception:
                    return _Malformed()
            return parse_bytes

        calls = {"ServerLive": self._server_live, "ServerReady": self._server_ready, "ModelReady": self._model_ready,
                 "ServerMetadata": self._server_metadata, "ModelMetadata": self._model_metadata,
                 "ModelInfer": self._model_infer}
        handlers = {name: grpc.unary_unary_rpc_method_handler(
            self._guarded(fn), request_deserializer=parse(classes[f"{name}Request"]),
            response_serializer=classes[f"{name}Response"].SerializeToString) for name, fn in calls.items()}
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _guarded(self, fn: Any) -> Any:
        """Turn RequestError (and a malformed message) into a gRPC status; anything else is logged."""
        import grpc

        async def handler(request: Any, context: Any) -> Any:
            try:
                if isinstance(request, _Malformed):
                    raise RequestError(400, "the request is not a valid protobuf message of this method")
                return await fn(request)
            except RequestError as exc:
                await context.abort(_status(exc), str(exc))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("gRPC handler failed")
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        return handler

    def _check_model(self, name: str, version: str) -> None:
        if name != self.config.model_name:
            raise RequestError(404, f"unknown model {name[:100]!r}; this server serves {self.config.model_name!r}")
        if version not in ("", "1"):
            raise RequestError(404, f"unknown version {version[:20]!r} of {name[:100]!r}; this server has version 1")

    async def _server_live(self, request: Any) -> Any:
        return messages()["ServerLiveResponse"](live=True)

    async def _server_ready(self, request: Any) -> Any:
        return messages()["ServerReadyResponse"](ready=self.state.is_ready)

    async def _model_ready(self, request: Any) -> Any:
        self._check_model(request.name, request.version)
        return messages()["ModelReadyResponse"](ready=self.state.is_ready)

    async def _server_metadata(self, request: Any) -> Any:
        from . import __version__

        return messages()["ServerMetadataResponse"](name="resnet-edge", version=__version__,
                                                    extensions=[])  # both are HTTP-only here

    async def _model_metadata(self, request: Any) -> Any:
        self._check_model(request.name, request.version)
        meta = self.state.metadata
        response = messages()["ModelMetadataResponse"](name=meta["name"], versions=meta["versions"], platform=meta["platform"])
        response.inputs.add(name=INPUT_NAME, datatype="FP32", shape=[-1, *INPUT_SHAPE])
        for name in OUTPUTS:
            response.outputs.add(name=name, datatype="FP32", shape=[-1, NUM_CLASSES])
        return response

    async def _model_infer(self, request: Any) -> Any:
        self._check_model(request.model_name, request.model_version)
        size = request.ByteSize()
        self.state.take_bytes(size)  # the same budget as HTTP bodies (--max-pending-bytes)
        try:
            raw = sum(len(b) for b in request.raw_input_contents)
            parsed = await self.state.work(grpc_infer_request, request, size=raw if raw else 10**9)
            logits = await self.state.infer(parsed.pixels)
            return grpc_infer_response(self.config.model_name, parsed, logits)
        finally:
            self.state.give_bytes(size)
