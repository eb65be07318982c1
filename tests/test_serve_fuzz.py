"""Seeded fuzzing of `serve` over every route, method, header and body shape, HTTP and gRPC: no answer
is a 5xx but 503 (no gRPC status but the protocol's), and the server is still ready and right after.
Bounded: a fixed number of cases from fixed seeds (a few seconds)."""

from __future__ import annotations

import copy
import io
import json
import random

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import free_port, start_server
from test_serve_hardening import linear_model

HTTP_CASES = 600
GRPC_CASES = 200
ROUTES = ["/v2", "/v2/health/live", "/v2/health/ready", "/v2/models/m", "/v2/models/m/ready", "/v2/models/m/stats",
          "/v2/models/m/infer", "/v2/models/m/versions/1/infer", "/v2/models/m/versions/2/infer", "/v2/models/m/versions/1",
          "/v2/models/other/infer", "/v2/models/%00/infer", "/v1/predict", "/", "/docs", "/v2/models/m/infer/x",
          "/v2/models/" + "m" * 5000 + "/infer", "/v2/repository/index"]
METHODS = ["GET", "POST", "POST", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
ODD_VALUES = [None, True, False, 0, -1, 1, 2**63, 10**40, -10**40, 1e308, -0.0, 0.5, "", "x", "FP32", "pixels", "logits",
              [], [0], [[]], [1, 784], [-1, 784], [1, 28, 28], {}, {"name": "logits"}, {"binary_data_size": 3136},
              [[[[[[[[[[0]]]]]]]]]], "\u0000", "é" * 100, [None] * 784, [0.5] * 784, ["0.5"] * 784]


def _valid(rng: random.Random) -> dict:
    n = rng.choice([1, 2, 3])
    return {"id": "f", "inputs": [{"name": "pixels", "datatype": rng.choice(["FP32", "UINT8"]), "shape": [n, 784],
                                   "data": [0] * (n * 784)}],
            "outputs": [{"name": rng.choice(["logits", "probabilities"]), "parameters": {"binary_data": rng.random() < 0.5}}],
            "parameters": {"binary_data_output": rng.random() < 0.5}}


def _mutate(rng: random.Random, value, depth=0):
    """Replace one node somewhere in a JSON value by an odd one (or drop a key, or duplicate a list)."""
    if depth > 6 or not isinstance(value, (dict, list)) or not value or rng.random() < 0.15:
        return copy.deepcopy(rng.choice(ODD_VALUES))
    value = copy.copy(value)
    if isinstance(value, dict):
        key = "inputs" if "inputs" in value and rng.random() < 0.6 else rng.choice(list(value))
        if rng.random() < 0.15:
            del value[key]
        else:
            value[key] = _mutate(rng, value[key], depth + 1)
    else:
        i = rng.randrange(len(value))
        value[i] = _mutate(rng, value[i], depth + 1)
        if rng.random() < 0.1:
            value = value + value
    return value


def _image(rng: random.Random) -> bytes:
    img = Image.fromarray(np.random.default_rng(rng.randrange(2**32)).integers(0, 256, (rng.randint(1, 80), rng.randint(1, 80)),
                                                                              dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format=rng.choice(["PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP"]))
    data = buf.getvalue()
    if rng.random() < 0.5:  # truncated, or bytes flipped
        data = data[:rng.randrange(len(data))] if rng.random() < 0.5 else bytes(
            b ^ 0xFF if rng.random() < 0.01 else b for b in data)
    return data


def _body(rng: random.Random, route: str) -> tuple[bytes, dict[str, str]]:
    if "infer" in route:
        kind = rng.choice([0, 1, 1, 1, 1, 2, 2, 2, 5, 6])
    elif "predict" in route:
        kind = rng.choice([0, 3, 3, 3, 4, 4, 6])
    else:
        kind = rng.randrange(7)
    headers: dict[str, str] = {}
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(2000))), headers
    if kind == 1:
        return json.dumps(_mutate(rng, _valid(rng))).encode(), headers
    if kind == 2:  # binary extension, header length and sizes right or wrong
        request = _valid(rng)
        tensor = request["inputs"][0]
        payload = (np.zeros(tensor["shape"][0] * 784, "<f4" if tensor["datatype"] == "FP32" else "u1")).tobytes()
        del tensor["data"]
        tensor["parameters"] = {"binary_data_size": rng.choice([len(payload), len(payload) - 1, 0, -5, "3136"])}
        head = json.dumps(rng.choice([request, _mutate(rng, request)])).encode()
        payload = payload[:rng.randrange(len(payload) + 1)] if rng.random() < 0.3 else payload
        headers["Inference-Header-Content-Length"] = rng.choice(
            [str(len(head)), str(len(head) + 3), "-1", "0", "abc", "9" * 30, str(len(head) + len(payload) + 10)])
        return head + payload, headers
    if kind == 3:
        return _image(rng), {"content-type": rng.choice(["image/png", "application/octet-stream", "text/plain"])}
    if kind == 4:
        boundary = "b0undary"
        part = _image(rng) if rng.random() < 0.7 else b"x"
        field = rng.choice(["file", "image", ""])
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"d.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + part + f"\r\n--{boundary}--\r\n".encode()
        if rng.random() < 0.3:
            body = body[:rng.randrange(len(body))]
        return body, {"content-type": f"multipart/form-data; boundary={rng.choice([boundary, 'other', ''])}"}
    if kind == 5:  # deep or wide JSON
        depth = rng.choice([10, 100, 5000])
        return (b"[" * depth + b"]" * depth if rng.random() < 0.5 else b'{"inputs":' + b"[" * depth), headers
    return b"", headers


def _target(rng: random.Random) -> tuple[str, str]:
    """Mostly what does work (POST to infer and predict), the rest anything."""
    pick = rng.random()
    if pick < 0.6:
        return "POST", rng.choice(["/v2/models/m/infer", "/v2/models/m/infer", "/v2/models/m/versions/1/infer"])
    if pick < 0.75:
        return "POST", "/v1/predict"
    return rng.choice(METHODS), rng.choice(ROUTES)


def _headers(rng: random.Random, headers: dict[str, str]) -> dict[str, str]:
    extra = rng.choice([{}, {}, {}, {}, {}, {"content-encoding": "gzip"}, {"content-type": "application/json; charset=latin-1"},
                        {"x-" + "a" * 50: "b" * 5000}, {"accept-encoding": "gzip"}, {"expect": "100-continue"},
                        {"inference-header-content-length": "12"}])
    return {**headers, **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = linear_model(tmp_path_factory.mktemp("fuzz") / "m.onnx")
    grpc_port = free_port()
    proc, url = start_server("--model", model, "--model-name", "m", "--grpc-port", grpc_port, "--max-body-bytes", 100_000,
                             "--max-batch-size", 4, "--client-timeout", 2)
    yield url, f"127.0.0.1:{grpc_port}", proc
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def _still_serving(url: str) -> None:
    assert httpx.get(f"{url}/v2/health/ready", timeout=5).status_code == 200
    valid = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": [0.5] * 784}]}
    assert httpx.post(f"{url}/v2/models/m/infer", json=valid, timeout=5).status_code == 200


def test_http_fuzz_never_5xx_but_503(server):
    url, _, proc = server
    rng = random.Random(9)
    bad = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for case in range(HTTP_CASES):
            method, route = _target(rng)
            body, headers = _body(rng, route) if method in ("POST", "PUT", "PATCH") else (b"", {})
            r = client.request(method, route, content=body, headers=_headers(rng, headers))
            if r.status_code >= 500 and r.status_code != 503:
                bad.append((case, method, route[:40], r.status_code, r.text[:200]))
            elif r.status_code >= 400 and method != "HEAD" and r.content:
                assert "\n" not in r.json().get("error", "") if r.headers.get("content-type", "").startswith("application/json") else True
    assert not bad, bad[:5]
    assert proc.poll() is None
    _still_serving(url)


def test_grpc_fuzz_answers_only_protocol_status_codes(server):
    import grpc
    from tritonclient.grpc import service_pb2

    url, address, _ = server
    rng = random.Random(13)
    allowed = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
               grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNIMPLEMENTED}
    methods = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelInfer",
               "ModelInfer", "RepositoryIndex", "ModelStatistics"]
    seen = []
    with grpc.insecure_channel(address) as channel:
        for _ in range(GRPC_CASES):
            method = rng.choice(methods)
            if method == "ModelInfer" and rng.random() < 0.8:
                request = service_pb2.ModelInferRequest(model_name=rng.choice(["m", "m", "x", ""]),
                                                        model_version=rng.choice(["", "1", "2"]))
                n = rng.choice([0, 1, 2, 5000])
                tensor = request.inputs.add(name=rng.choice(["pixels", "pixels", "p"]), datatype=rng.choice(["FP32", "UINT8", "BYTES"]),
                                            shape=rng.choice([[n, 784], [n, 1, 28, 28], [784], [], [-1, 784]]))
                if rng.random() < 0.5:
                    request.raw_input_contents.append(bytes(rng.randrange(256) for _ in range(rng.choice([0, 10, 784, 3136]))))
                else:
                    tensor.contents.fp32_contents.extend([rng.random() * rng.choice([1, 2, -1]) for _ in range(rng.choice([0, 784]))])
                    if rng.random() < 0.3:
                        tensor.contents.uint_contents.extend([rng.randrange(300) for _ in range(784)])
                if rng.random() < 0.3:
                    request.outputs.add(name=rng.choice(["logits", "probabilities", "x"]))
                payload = request.SerializeToString()
            else:
                payload = bytes(rng.randrange(256) for _ in range(rng.randrange(300)))
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
            try:
                call(payload, timeout=10)
                seen.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                seen.append(exc.code())
    assert set(seen) <= allowed, set(seen) - allowed
    _still_serving(url)
