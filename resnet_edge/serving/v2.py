"""Open Inference Protocol (KServe v2) messages for `serve`: JSON requests, the binary tensor data
extension (Inference-Header-Content-Length, `binary_data_size`, `binary_data`, `binary_data_output`),
and the checks every tensor passes before it reaches the model, whichever way it came (JSON, binary,
gRPC). Pure functions without I/O. No torch here.

Where serve runs them (state.py, asgi.py, routes.py, grpc_front.py, batcher.py):
- on the event loop, for every HTTP request: header_length / json_part_size and check_json_size;
- parse_http_request: on the event loop for a body of at most 16 KiB (state.INLINE_BYTES: about one
  image as JSON), in the request thread pool up to a JSON part of 1 MiB (state.PROCESS_BYTES), above that in
  a worker process;
- encode_http_response: on the event loop when the logits are at most 2 KiB (INLINE_BYTES / 8: up to 51
  rows), else in the request thread pool;
- gRPC's message parsing and checks (grpc_front.parse_model_infer, grpc_infer_request): on the event
  loop for a message of at most 16 KiB, else in the thread pool; gRPC answers (grpc_infer_response,
  with output_tensors): on the event loop;
- model_input: in the batcher's inference thread, with the batch.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from resnet_edge.core.contract import (
    IMAGE_PIXELS,
    IMAGE_SIZE,
    INPUT_NAME,
    INPUT_SHAPE,
    NUM_CLASSES,
    OUTPUT_NAME,
    softmax,
    to_pixels,
)

MAX_ROWS_PER_REQUEST = 1024
PROBABILITIES = "probabilities"
OUTPUTS = {
    OUTPUT_NAME: f"raw scores, FP32 [N, {NUM_CLASSES}]",
    PROBABILITIES: f"softmax of the logits, FP32 [N, {NUM_CLASSES}]",
}
DATATYPES: dict[str, np.dtype] = {
    "FP32": np.dtype("<f4"),
    "UINT8": np.dtype("u1"),
}  # what a client may send, little-endian
_SHAPES = ([*INPUT_SHAPE], [IMAGE_SIZE, IMAGE_SIZE], [IMAGE_PIXELS])  # after N
ACCEPTED_SHAPES = ", ".join("[N, " + ", ".join(map(str, s)) + "]" for s in _SHAPES)
HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_BYTES_PER_VALUE = 128  # generous: a float64 in full (~24 characters), pretty-printed with deep indentation
JSON_SLACK_BYTES = 2**20  # the rest of a JSON request: names, parameters, a long id
_SHAPE = re.compile(rb'"shape"\s*:\s*\[\s*(\d{1,9})')


def ascii_count(value: str | None, max_digits: int) -> bool:
    """A header value that is a byte count: ASCII digits only ('²' passes str.isdigit() but not int())."""
    return value is not None and 0 < len(value) <= max_digits and value.isascii() and value.isdigit()


class RequestError(Exception):
    """A bad request: status and message go back to the client as {"error": message}."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status

    def __reduce__(self) -> Any:  # crosses the process boundary of the JSON parser intact
        return (RequestError, (self.status, str(self)))


class Busy(RequestError):
    """The server is full (queue rows, body bytes): 503, gRPC RESOURCE_EXHAUSTED; retry later."""

    def __init__(self, message: str) -> None:
        super().__init__(503, message)


@dataclass
class InferRequest:
    pixels: np.ndarray  # float32 [N, 1, 28, 28] in [0, 1], or uint8 [N, 784] in 0-255 (see model_input)
    outputs: list[tuple[str, bool]]  # (output name, as binary data)
    request_id: Any = None


# ------------------------------------------------------------------------------------------ tensors
def check_tensor_header(name: Any, datatype: Any, shape: Any) -> int:
    """Name, datatype and shape of the one input -> N, the number of images."""
    if name != INPUT_NAME:
        raise RequestError(400, f"unexpected input name {_short(name)}, expected {INPUT_NAME!r}")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise RequestError(
            400, f"input {INPUT_NAME!r} datatype must be FP32 (0-1) or UINT8 (0-255), got {_short(datatype)}"
        )
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
        or not shape
        or shape[1:] not in _SHAPES
        or shape[0] < 1
    ):
        raise RequestError(
            400, f"input {INPUT_NAME!r} shape must be {ACCEPTED_SHAPES} with N >= 1, got {_short(shape)}"
        )
    if shape[0] > MAX_ROWS_PER_REQUEST:
        raise RequestError(400, f"at most {MAX_ROWS_PER_REQUEST} images per request, got N = {shape[0]}")
    return shape[0]


def tensor_pixels(datatype: str, n: int, values: np.ndarray) -> np.ndarray:
    """Flat values of a checked tensor -> the model's rows, counts and ranges checked: float32 [N, 1, 28, 28]
    in [0, 1], or uint8 [N, 784] as sent (0-255; model_input scales them when their batch runs)."""
    expected = n * IMAGE_PIXELS
    if values.size != expected:
        raise RequestError(400, f"input {INPUT_NAME!r} of {n} images needs {expected} values, got {values.size}")
    if values.dtype.kind == "i":  # JSON integers
        low, high = (0, 1) if datatype == "FP32" else (0, 255)
        if values.size and (values.min() < low or values.max() > high):
            raise _range_error(datatype, values)
        values = values.astype(np.uint8 if datatype == "UINT8" else np.float32)
    elif values.dtype != np.uint8:
        if not np.isfinite(values).all():
            raise RequestError(400, f"input {INPUT_NAME!r} holds non-finite values (NaN or infinity)")
        low, high = (0, 1) if datatype == "FP32" else (0, 255)
        if values.min() < low or values.max() > high:
            raise _range_error(datatype, values)
        if datatype == "UINT8":
            if not np.all(values == np.round(values)):
                raise RequestError(400, "UINT8 pixels must be integers from 0 to 255")
            values = values.astype(np.uint8)
    if values.dtype == np.uint8:
        return values.reshape(n, IMAGE_PIXELS)  # scaled by model_input, a batch at a time, off the event loop
    return values.astype(np.float32, copy=False).reshape(n, *INPUT_SHAPE)


def model_input(parts: list[np.ndarray]) -> np.ndarray:
    """The rows of one batch (tensor_pixels' results, in order) -> the model's input, float32 [N, 1, 28, 28]
    in [0, 1]. uint8 rows become floats here, the same as contract.to_pixels, in one pass per batch: the
    batcher calls this in its inference thread, so the event loop never converts pixels."""
    if all(p.dtype == np.uint8 for p in parts):
        return to_pixels(parts[0] if len(parts) == 1 else np.concatenate(parts))
    if len(parts) == 1:
        return parts[0]
    return np.concatenate([to_pixels(p) if p.dtype == np.uint8 else p for p in parts])


def _range_error(datatype: str, values: np.ndarray) -> RequestError:
    rule = "FP32 pixels must be in [0, 1]" if datatype == "FP32" else "UINT8 pixels must be integers from 0 to 255"
    return RequestError(400, f"{rule}, got values from {values.min():g} to {values.max():g}")


def json_values(data: Any, booleans_possible: bool = True, datatype: str = "FP32") -> np.ndarray:
    """JSON `data`, flat or evenly nested numbers (never booleans or strings) -> int64 or float64 1-D array,
    or uint8 for UINT8 data that is a flat list of integers from 0 to 255.

    ``booleans_possible=False`` (the body holds no true/false token) allows the fast paths: bytes() takes
    a flat list of ints 0-255 whole in C (about 5x faster than numpy's inference of a dtype for an
    image's 784 numbers, and it checks the range); numpy infers int64 or float64 from numbers alone; every
    other kind (strings, null, objects, ragged nesting, integers past 64 bits) goes through the checks
    below, which word the error."""
    if not isinstance(data, list):
        raise RequestError(400, f"input 'data' must be a JSON array of numbers, got {type(data).__name__}")
    if not booleans_possible and datatype == "UINT8":
        try:
            return np.frombuffer(bytes(data), dtype=np.uint8)
        except (TypeError, ValueError):
            pass  # floats, nesting, out of range: worded below
    if not booleans_possible:
        try:
            values = np.array(data)
        except (ValueError, TypeError, OverflowError, RecursionError):
            values = None
        if values is not None and values.dtype.kind in "if" and values.dtype.itemsize == 8:
            return values.reshape(-1)
    flat: Any
    if data and isinstance(data[0], list):  # nested: numpy finds out whether it is even
        try:
            flat = np.asarray(data, dtype=object).reshape(-1)
        except (ValueError, TypeError, RecursionError):
            raise RequestError(
                400, "input 'data' must be numbers in a flat or evenly nested (row-major) array"
            ) from None
    else:
        flat = data
    kinds = set(map(type, flat))
    if not kinds <= {int, float}:
        bad = sorted(k.__name__ for k in kinds - {int, float})
        raise RequestError(400, f"input 'data' must hold only numbers in an evenly nested array, got {', '.join(bad)}")
    try:
        values = np.asarray(flat, dtype=np.int64 if kinds == {int} else np.float64)
    except (OverflowError, ValueError, TypeError):
        raise RequestError(400, "input 'data' holds a number too large for its datatype") from None
    return values


def binary_values(datatype: str, chunk: bytes | memoryview) -> np.ndarray:
    """Raw little-endian tensor bytes -> a flat array of the datatype (no copy)."""
    dtype = DATATYPES[datatype]
    if len(chunk) % dtype.itemsize:
        raise RequestError(400, f"binary data of {len(chunk)} bytes is not a whole number of {datatype} values")
    return np.frombuffer(chunk, dtype=dtype)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ------------------------------------------------------------------------------------------ HTTP requests
def _loads(raw: bytes | memoryview) -> tuple[Any, bool]:
    """The parsed JSON, and whether it was strict UTF-8 JSON (parsed by orjson)."""
    try:
        return orjson.loads(raw), True  # 4-6x faster than json for an image's numbers
    except orjson.JSONDecodeError:
        pass  # NaN/Infinity, lone surrogates, UTF-16/32, nesting past 1024: json decides and words it
    try:
        return json.loads(bytes(raw)), False
    except RecursionError:
        raise RequestError(400, "malformed JSON: nested too deeply") from None
    except UnicodeDecodeError as exc:
        raise RequestError(
            400, f"malformed JSON: not UTF-8 ({exc.reason}); binary tensor data needs the {HEADER_LENGTH} header"
        ) from None
    except ValueError as exc:  # JSONDecodeError, and integers longer than Python converts
        message = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc).split(";")[0]
        if message == "Extra data":
            message += f" after the JSON object (binary tensor data needs the {HEADER_LENGTH} header)"
        raise RequestError(400, f"malformed JSON: {message}") from None


def check_json_size(raw: bytes, json_size: int) -> None:
    """Refuse a JSON part far larger than its tensor could need before parsing it (an 8 MB body that
    claims one image). Its row count is read from a plain ``"shape": [N`` in the bytes: a valid request
    has exactly one tensor and so one shape, so the smallest N found is taken (a decoy ``"shape": [1024]``
    elsewhere cannot raise the limit), and a large JSON part with no plain shape at all is refused (it
    could only fail after a costly parse)."""
    if json_size <= JSON_SLACK_BYTES:
        return
    rows = [int(m.group(1)) for m in itertools.islice(_SHAPE.finditer(raw, 0, json_size), 16)]
    if not rows:
        raise RequestError(
            413,
            f"a JSON request over {JSON_SLACK_BYTES} bytes must give its tensor's shape as a plain "
            f'"shape": [N, ...]; got {json_size} bytes without one',
        )
    most = min(min(rows), MAX_ROWS_PER_REQUEST)
    limit = JSON_SLACK_BYTES + most * IMAGE_PIXELS * JSON_BYTES_PER_VALUE
    if json_size > limit:
        raise RequestError(
            413,
            f"a JSON request of {most} images needs at most {limit} bytes ({JSON_BYTES_PER_VALUE} "
            f"per value), got {json_size}; large tensors travel best as binary data ({HEADER_LENGTH})",
        )


def header_length(value: str | None, body_size: int) -> int | None:
    """Inference-Header-Content-Length (None without one): a byte count within the body, else 400."""
    if value is None:
        return None
    if not ascii_count(value, 12) or int(value) > body_size:
        raise RequestError(
            400, f"{HEADER_LENGTH} must be a byte count within the body of {body_size} bytes, got {_short(value)}"
        )
    return int(value)


def json_part_size(header_value: str | None, body_size: int) -> int:
    """The size of a body's JSON part: all of it, or Inference-Header-Content-Length (checked)."""
    length = header_length(header_value, body_size)
    return body_size if length is None else length


def parse_http_request(raw: bytes, header_value: str | None = None) -> InferRequest:
    """A v2 inference request body (JSON, or JSON header + binary tensors) -> checked pixels and outputs."""
    length = header_length(header_value, len(raw))
    view = memoryview(raw)
    body, strict = _loads(view if length is None else view[:length])
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object with 'inputs'")
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        got = len(inputs) if isinstance(inputs, list) else type(inputs).__name__
        raise RequestError(400, f"expected 'inputs' to hold exactly 1 tensor named {INPUT_NAME!r}, got {got}")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, f"request 'id' must be a string, got {type(request_id).__name__}")
    tensor = inputs[0]
    n = check_tensor_header(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"))
    size = _parameters(tensor, "input").get("binary_data_size")
    if size is not None:
        rest = view[length:] if length is not None else view[:0]
        if length is None or not isinstance(size, int) or isinstance(size, bool) or size != len(rest):
            raise RequestError(
                400,
                f"binary_data_size {_short(size)} does not match the {len(rest)} bytes after the "
                f"JSON header ({HEADER_LENGTH} {header_value})",
            )
        values = binary_values(tensor["datatype"], rest)
    else:
        if length is not None and length != len(raw):
            raise RequestError(
                400, f"{len(raw) - length} bytes after the JSON header but no input has binary_data_size"
            )
        end = len(raw) if length is None else length  # a JSON boolean comes from a true/false token only
        booleans = not strict or raw.find(b"true", 0, end) >= 0 or raw.find(b"false", 0, end) >= 0
        values = json_values(tensor.get("data"), booleans, tensor["datatype"])
    pixels = tensor_pixels(tensor["datatype"], n, values)
    outputs = requested_outputs(body.get("outputs"), _parameters(body, "request").get("binary_data_output", False))
    return InferRequest(pixels, outputs, request_id)


def _parameters(obj: dict[str, Any], what: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise RequestError(400, f"{what} 'parameters' must be a JSON object, got {type(params).__name__}")
    for unsupported in ("shared_memory_region", "classification"):
        if unsupported in params:
            raise RequestError(400, f"{what} parameter {unsupported!r} is not supported by this server")
    return params


def requested_outputs(requested: Any, binary_default: Any) -> list[tuple[str, bool]]:
    if not isinstance(binary_default, bool):
        raise RequestError(400, f"'binary_data_output' must be true or false, got {_short(binary_default)}")
    if requested is None:
        return [(OUTPUT_NAME, binary_default)]
    if not isinstance(requested, list) or not requested or not all(isinstance(o, dict) for o in requested):
        raise RequestError(400, "'outputs' must be a non-empty list of {\"name\": ...} objects")
    result: list[tuple[str, bool]] = []
    for output in requested:
        name = output.get("name")
        if not isinstance(name, str) or name not in OUTPUTS:
            raise RequestError(400, f"unknown output {_short(name)}, expected one of {list(OUTPUTS)}")
        if any(name == seen for seen, _ in result):
            raise RequestError(400, f"output {name!r} is asked for twice")
        binary = _parameters(output, "output").get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise RequestError(400, f"output 'binary_data' must be true or false, got {_short(binary)}")
        result.append((name, binary))
    return result


# ------------------------------------------------------------------------------------------ HTTP responses
def output_tensors(logits: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    tensors = {OUTPUT_NAME: logits}
    if PROBABILITIES in names:
        tensors[PROBABILITIES] = softmax(logits).astype(np.float32)
    return tensors


def encode_http_response(
    model_name: str, model_version: str, request: InferRequest, logits: np.ndarray
) -> tuple[bytes, int | None]:
    """The response body, and the JSON header's length when some output travels as binary data."""
    tensors = output_tensors(logits, [name for name, _ in request.outputs])
    described, blobs = [], []
    for name, binary in request.outputs:
        t = np.ascontiguousarray(tensors[name], dtype="<f4")
        entry: dict[str, Any] = {"name": name, "datatype": "FP32", "shape": list(t.shape)}
        if binary:
            entry["parameters"] = {"binary_data_size": t.nbytes}
            blobs.append(t.tobytes())
        else:
            entry["data"] = t.reshape(-1)
        described.append(entry)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": described}
    if request.request_id is not None:
        response["id"] = request.request_id
    header = None
    if all(np.isfinite(e["data"]).all() for e in described if "data" in e):  # orjson writes NaN and inf as null
        try:
            header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)  # float32 in its shortest exact form
        except orjson.JSONEncodeError:  # an id json accepted that orjson will not write (a lone surrogate)
            pass
    if header is None:  # json writes NaN, Infinity, -Infinity as JavaScript does, and any str
        header = json.dumps(
            {**response, "outputs": [{**e, "data": e["data"].tolist()} if "data" in e else e for e in described]}
        ).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
