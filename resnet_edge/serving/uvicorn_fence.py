"""Every touch of uvicorn's internals in `serve`, fenced in one module: what uvicorn's public API
(uvicorn.Config, uvicorn.Server.run, should_exit) does not offer.

- ``guarded_http``: a subclass of uvicorn's httptools protocol (uvicorn.protocols.http.httptools_impl.
  HttpToolsProtocol, passed as Config(http=...)) with the slow-client guard uvicorn lacks, its responses
  sent in one write, and httptools' own 400 answered as {"error": ...}. It overrides the protocol's hooks
  (connection_made, data_received, on_headers_complete, on_message_complete, on_response_complete,
  send_400_response, connection_lost) and reads its private fields (loop, transport, cycle with
  response_complete and more_body, server_state.default_headers) and the module's STATUS_LINE.
- uvicorn's 503 past --max-connections (limit_concurrency): the module global ``service_unavailable``
  of httptools_impl is replaced by an ASGI app that answers {"error": ...}.
- ``GracefulServer``: uvicorn.Server with its undocumented hooks handle_exit and capture_signals
  overridden, so that SIGTERM drains and then exits with status 0.

UVICORN_TESTED names the releases this was tested with (pyproject pins uvicorn to them) and
UVICORN_INTERNALS the names of httptools_impl used here; tests/test_structure.py checks both. No torch here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import Callable, Iterator
from typing import Any, cast

import uvicorn
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

UVICORN_TESTED = ((0, 29), (0, 55))  # the releases (major, minor) serve's use of uvicorn's internals was tested on
UVICORN_INTERNALS = (
    "HttpToolsProtocol",
    "service_unavailable",
    "STATUS_LINE",
)  # of uvicorn.protocols.http.httptools_impl
MAX_HEADER_BYTES = 64 * 1024  # request line and headers


async def busy_json(scope: Any, receive: Any, send: Any) -> None:
    """uvicorn's own 503 past --max-connections, as {"error": ...}; the connection is closed after it."""
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


class OneWrite:
    """A connection's transport whose writes leave in one send per response: uvicorn writes a response's
    head and body separately (two system calls, and two wake-ups of a client that reads them as they
    come); they are joined here and sent when the response completes, or for anything else (100 Continue,
    a streamed body, an error answer before closing) at the end of the loop iteration at the latest.
    Everything but write and close is the transport's own."""

    __slots__ = ("_transport", "_loop", "_pending", "_scheduled")

    def __init__(self, transport: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._transport, self._loop, self._scheduled = transport, loop, False
        self._pending: list[bytes] = []

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


class GuardedHttp(HttpToolsProtocol):
    """uvicorn's httptools protocol with what it lacks against slow or greedy clients: a request (line,
    headers and body) must arrive within ``client_timeout`` seconds, its headers within
    MAX_HEADER_BYTES, else the connection is closed (an idle keep-alive connection is closed by
    uvicorn's timeout_keep_alive). One timer per request, no task. Made by guarded_http()."""

    client_timeout = 10.0

    def connection_made(self, transport: Any) -> None:
        self._completed = 0  # requests received whole on this connection
        self._one_write = OneWrite(transport, self.loop)
        # OneWrite stands in for the transport: write and close its own, everything else delegated
        super().connection_made(cast(asyncio.Transport, self._one_write))
        self._arm()

    def _arm(self) -> None:
        self._header_bytes, self._in_headers, self._since_arm = 0, True, 0
        self._guard = self.loop.call_later(self.client_timeout, self._too_slow)

    def _too_slow(self) -> None:
        cycle = self.cycle
        if self._since_arm == 0 and cycle is not None and not cycle.response_complete and not cycle.more_body:
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
        body = json.dumps({"error": f"malformed HTTP request: {msg}"}).encode()
        head = [
            httptools_impl.STATUS_LINE[400],
            *(name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers),
        ]
        closing = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        self.transport.write(b"".join([*head, closing, body]))
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
        self._one_write.flush()  # the response's head and body, in one send
        super().on_response_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._guard is not None:
            self._guard.cancel()
        super().connection_lost(exc)


def guarded_http(client_timeout: float) -> type[GuardedHttp]:
    """The protocol class for uvicorn.Config(http=...): GuardedHttp with ``client_timeout``. Also makes
    uvicorn's 503 past --max-connections answer {"error": ...} (a module global of httptools_impl)."""
    httptools_impl.service_unavailable = busy_json  # an ASGI app, as uvicorn's own
    return cast(type[GuardedHttp], type("GuardedHttp", (GuardedHttp,), {"client_timeout": client_timeout}))


class GracefulServer(uvicorn.Server):
    """uvicorn's graceful shutdown on SIGINT/SIGTERM, then a normal exit (status 0): uvicorn itself
    re-raises the signal afterwards, which makes a clean stop look like a crash to a supervisor.
    ``on_exit`` runs at the signal: readiness (HTTP and gRPC) turns false while requests in flight drain."""

    on_exit: Callable[[], None] | None = None

    def stop(self) -> None:
        """End serving as a signal would (requests in flight finish)."""
        self.should_exit = True

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.on_exit is not None:
            self.on_exit()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
