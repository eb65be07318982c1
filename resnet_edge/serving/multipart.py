"""/v1/predict's multipart/form-data body -> its 'file' part, with python-multipart's streaming parser and
a cap on the number of parts. Runs in the request thread pool (routes.image_pixels). No torch here."""

from __future__ import annotations

import logging
from typing import Any

from resnet_edge.serving.v2 import RequestError

MAX_MULTIPART_PARTS = 8  # /v1/predict needs one part, 'file'; a body of more is refused as soon as the count passes


def multipart_file(raw: bytes, content_type: str) -> bytes:
    """The 'file' part of a multipart/form-data body (read whole and size-checked before): parsed in the
    request thread pool by python-multipart's streaming parser, which stops at the part over
    MAX_MULTIPART_PARTS. 400 for a malformed body or one without a file part named 'file'."""
    try:
        from python_multipart.multipart import MultipartParser, parse_options_header
    except ImportError:  # python-multipart before 0.0.13
        from multipart.multipart import MultipartParser, parse_options_header  # type: ignore[no-redef]

    logging.getLogger("python_multipart").setLevel(logging.ERROR)  # a client's malformed body is its 400, not our log
    _, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise RequestError(400, "malformed multipart body: no boundary in its Content-Type")
    found = _FileField(parse_options_header)
    parser = MultipartParser(boundary, found.callbacks())
    try:
        parser.write(raw)
        parser.finalize()
    except RequestError:
        raise
    except Exception:  # python-multipart's parse errors
        raise RequestError(400, "malformed multipart body") from None
    if not found.ended:
        raise RequestError(400, "malformed multipart body: it does not end with its closing boundary")
    if found.file is None:
        raise RequestError(400, f"multipart body needs a file field named 'file', got fields {found.names[:10]}")
    return found.file


class _FileField:
    """python-multipart's callbacks, collecting the first file part named 'file' and the names of all parts."""

    def __init__(self, parse_options_header: Any) -> None:
        self.parse_options_header = parse_options_header
        self.parts = 0
        self.names: list[str] = []
        self.file: bytes | None = None
        self.ended = False
        self.field, self.value = b"", b""  # the header being read
        self.disposition: dict[bytes, bytes] | None = None  # the part's Content-Disposition options
        self.chunks: list[bytes] = []  # the part's data

    def callbacks(self) -> Any:  # python-multipart's MultipartCallbacks (a TypedDict of later releases)
        names = ("part_begin", "header_field", "header_value", "header_end", "part_data", "part_end", "end")
        return {f"on_{name}": getattr(self, f"on_{name}") for name in names}

    def on_part_begin(self) -> None:
        self.parts += 1
        if self.parts > MAX_MULTIPART_PARTS:
            raise RequestError(
                400, f"multipart body of more than {MAX_MULTIPART_PARTS} parts; /v1/predict takes one, 'file'"
            )
        self.field, self.value, self.disposition, self.chunks = b"", b"", None, []

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        if self.field.lower() == b"content-disposition":
            self.disposition = self.parse_options_header(self.value)[1]
        self.field, self.value = b"", b""

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        self.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        options = self.disposition or {}
        name = options.get(b"name", b"")
        self.names.append(name.decode("latin-1")[:40])
        if name == b"file" and b"filename" in options and self.file is None:
            self.file = b"".join(self.chunks)
        self.chunks = []

    def on_end(self) -> None:
        self.ended = True
