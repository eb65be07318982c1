"""The hot path of `serve`: POST /v2/models/{name}[/versions/{v}]/infer answered in plain ASGI (no
framework middleware per request), the request body read against the byte limits, and the ASGI app
that sends everything else to the FastAPI app (routes.py). No torch here."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any

from resnet_edge.serving.state import ServerState
from resnet_edge.serving.v2 import HEADER_LENGTH, RequestError, ascii_count, encode_http_response

log = logging.getLogger(__name__)

INFER_PATH = re.compile(r"/v2/models/([^/]+)(?:/versions/([^/]+))?/infer")
JSON_TYPE = (b"content-type", b"application/json")
Answer = tuple[int, bytes, list[tuple[bytes, bytes]]]  # status, body, headers besides content-length


class RequestBody:
    """``async with RequestBody(headers, receive, state) as raw``: the request body, counted against
    --max-pending-bytes as it arrives and until the response (headers that only promise bytes hold
    none); 413 past --max-body-bytes (by Content-Length or while streaming). ``headers``: a mapping with
    .get (lower-case names); ``receive``: the ASGI receive callable. (A class, not a generator-based
    context manager: this runs for every request, on the event loop.)"""

    __slots__ = ("headers", "receive", "state", "taken")

    def __init__(self, headers: Any, receive: Callable[[], Any], state: ServerState) -> None:
        self.headers, self.receive, self.state, self.taken = headers, receive, state, 0

    async def __aenter__(self) -> bytes:
        self._check_headers()
        chunks = []  # bytes received are counted in self.taken: a declared Content-Length alone reserves nothing
        limit = self.state.config.max_body_bytes
        try:
            while True:  # a client too slow to send it is cut off by the connection's guard (uvicorn_fence)
                message = await self.receive()
                if message["type"] == "http.disconnect":
                    raise RequestError(400, "the client went away before sending the whole body")
                chunk = message.get("body", b"")
                if chunk:
                    if self.taken + len(chunk) > limit:
                        raise RequestError(413, f"request body is over the limit of {limit} bytes")
                    self.state.take_bytes(len(chunk))
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

    def _check_headers(self) -> None:
        """Content-Length within --max-body-bytes, no Content-Encoding: refused before any byte is read."""
        limit = self.state.config.max_body_bytes
        length = self.headers.get("content-length")
        if length is not None:
            if not ascii_count(length, 15):
                raise RequestError(400, "malformed Content-Length header")
            if int(length) > limit:
                raise RequestError(413, f"request body of {int(length)} bytes is over the limit of {limit} bytes")
        encoding = self.headers.get("content-encoding")
        if encoding is not None and encoding.strip().lower() != "identity":
            raise RequestError(
                415, f"Content-Encoding {encoding.strip().lower()[:40]!r} is not supported; send the body uncompressed"
            )

    def _give_back(self) -> None:
        taken, self.taken = self.taken, 0
        self.state.give_bytes(taken)


class ScopeHeaders:
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


async def infer_response(
    state: ServerState, headers: Any, receive: Callable[[], Any], name: str, version: str | None
) -> Answer:
    """POST .../infer: status, body and extra headers (JSON errors as {"error": message})."""
    started, timing = time.perf_counter_ns(), [0]
    protocol = "binary" if headers.get(HEADER_LENGTH.lower()) is not None else "json"
    try:
        counted = state.models.lookup(name, version)
    except RequestError as exc:  # no model of ours: counted by no model's statistics
        return exc.status, json.dumps({"error": str(exc)}).encode(), [JSON_TYPE]
    try:
        # held from here to the answer: an unload or a reload lets this request finish (models.py)
        with state.models.serving(name, version) as model:
            async with RequestBody(headers, receive, state) as raw:
                parsed = await state.parse(raw, headers.get(HEADER_LENGTH.lower()))
                logits = await model.infer(parsed.pixels, timing)
                body, header_length = await state.work(
                    encode_http_response, model.name, model.version, parsed, logits, size=logits.nbytes * 8
                )
    except RequestError as exc:
        counted.request_done(protocol, exc.status, started, timing[0])
        return exc.status, json.dumps({"error": str(exc)}).encode(), [JSON_TYPE]
    counted.request_done(protocol, 200, started, timing[0])
    if header_length is None:
        return 200, body, [JSON_TYPE]
    return (
        200,
        body,
        [(b"content-type", b"application/octet-stream"), (HEADER_LENGTH.lower().encode(), str(header_length).encode())],
    )


def close_if_answered_unread(receive: Callable[[], Any], send: Callable[[Any], Any]) -> tuple[Callable, Callable]:
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
            receive, send = close_if_answered_unread(receive, send)
        if scope["type"] == "http" and scope["method"] == "POST":
            match = INFER_PATH.fullmatch(scope["path"])
            if match:
                await self._infer(ScopeHeaders(scope["headers"]), receive, send, *match.groups())
                return
        await self.fastapi(scope, receive, send)

    async def _infer(self, headers: ScopeHeaders, receive: Callable, send: Callable, *name_version: Any) -> None:
        try:
            status, body, extra = await infer_response(self.server, headers, receive, *name_version)
        except Exception:  # a bug of ours; the fuzz test hunts these
            log.exception("unhandled error")
            status, body, extra = 500, b'{"error": "internal server error"}', [JSON_TYPE]
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [*extra, (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})
