"""The whole Open Inference Protocol as Triton's own clients speak it: tritonclient.http in its default
(binary tensor data) mode and with binary_data=False, and tritonclient.grpc, against `serve`."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from helpers import free_port, start_server
from resnet_edge.cli import app
from resnet_edge.core.mnist import load_test_split

N_IMAGES = 1000
BATCH = 50  # images per request: 20 requests per client mode


@pytest.fixture(scope="module")
def model(trained_run):
    run, _, _ = trained_run
    return run / "model.int8.onnx"


@pytest.fixture(scope="module")
def server(model):
    grpc_port = free_port()
    proc, url = start_server("--model", model, "--model-name", "digits", "--grpc-port", grpc_port,
                             "--max-batch-size", 32, "--max-delay-ms", 2)
    yield url, f"127.0.0.1:{grpc_port}"
    proc.terminate()
    assert proc.wait(timeout=30) == 0


@pytest.fixture(scope="module")
def predicted(model, tmp_path_factory):
    """1,000 test digits as PNG files, what `resnet-edge predict` answers for them, and the model input
    that predict's preprocessing makes of them (which the tensor clients send)."""
    from PIL import Image

    from resnet_edge.inference.preprocess import image_to_pixels

    images, _ = load_test_split()
    folder = tmp_path_factory.mktemp("digits")
    paths, pixels = [], []
    for i in range(N_IMAGES):
        path = folder / f"{i}.png"
        Image.fromarray((images[i, 0] * 255).round().astype(np.uint8)).save(path)
        paths.append(str(path))
        pixels.append(image_to_pixels(path.read_bytes()))
    result = CliRunner().invoke(app, ["predict", *paths, "--model", str(model), "--json"])
    assert result.exit_code == 0, result.output
    digits = [r["digit"] for r in json.loads(result.stdout)]
    return np.array(digits), np.concatenate(pixels)


def _http_digits(url: str, pixels: np.ndarray, binary: bool) -> np.ndarray:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(url.removeprefix("http://"))
    out = []
    for start in range(0, len(pixels), BATCH):
        x = pixels[start:start + BATCH]
        inp = httpclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        outputs = [httpclient.InferRequestedOutput("logits", binary_data=binary)]
        result = client.infer("digits", [inp], outputs=outputs)
        out.append(result.as_numpy("logits").argmax(1))
    return np.concatenate(out)


def test_tritonclient_http_binary_and_json_give_predicts_digits(server, predicted):
    url, _ = server
    digits, pixels = predicted
    assert (_http_digits(url, pixels, binary=True) == digits).all()  # the client's default mode
    assert (_http_digits(url, pixels, binary=False) == digits).all()


def test_tritonclient_grpc_gives_predicts_digits(server, predicted):
    import tritonclient.grpc as grpcclient

    _, address = server
    digits, pixels = predicted
    client = grpcclient.InferenceServerClient(address)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("digits")
    meta = client.get_model_metadata("digits")
    assert meta.name == "digits" and [(i.name, i.datatype, list(i.shape)) for i in meta.inputs] == [("pixels", "FP32", [-1, 1, 28, 28])]
    assert client.get_server_metadata().name == "resnet-edge"
    out = []
    for start in range(0, N_IMAGES, BATCH):
        x = pixels[start:start + BATCH]
        inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)  # raw_input_contents
        result = client.infer("digits", [inp], outputs=[grpcclient.InferRequestedOutput("logits")], request_id="r7")
        assert result.get_response().id == "r7"
        out.append(result.as_numpy("logits").argmax(1))
    assert (np.concatenate(out) == digits).all()


def test_grpc_typed_contents_uint8_and_probabilities(server, predicted):
    """ModelInfer with typed contents (uint_contents) instead of raw bytes, asking for probabilities."""
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    _, address = server
    digits, pixels = predicted
    x = np.round(pixels[:3] * 255).astype(np.uint8)
    request = service_pb2.ModelInferRequest(model_name="digits")
    tensor = request.inputs.add(name="pixels", datatype="UINT8", shape=[3, 784])
    tensor.contents.uint_contents.extend(x.reshape(-1).tolist())
    request.outputs.add(name="probabilities")
    with grpc.insecure_channel(address) as channel:
        response = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request)
    (out,) = response.outputs
    assert out.name == "probabilities" and list(out.shape) == [3, 10]
    probs = np.frombuffer(response.raw_output_contents[0], "<f4").reshape(3, 10)
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs.argmax(1) == digits[:3]).all()


def test_grpc_errors_are_status_codes(server):
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2, service_pb2_grpc
    from tritonclient.utils import InferenceServerException

    _, address = server
    client = grpcclient.InferenceServerClient(address)

    def status(model="digits", name="pixels", shape=(1, 784), dtype="FP32", data=None):
        inp = grpcclient.InferInput(name, list(shape), dtype)
        inp.set_data_from_numpy(np.zeros(shape, np.float32 if dtype == "FP32" else np.int64) if data is None else data)
        with pytest.raises(InferenceServerException) as info:
            client.infer(model, [inp])
        return info.value.status(), info.value.message()

    assert status(model="nope")[0] == "StatusCode.NOT_FOUND"
    assert status(name="image") == ("StatusCode.INVALID_ARGUMENT", "unexpected input name 'image', expected 'pixels'")
    assert status(dtype="INT64")[0] == "StatusCode.INVALID_ARGUMENT"
    assert status(data=np.full((1, 784), 2, np.float32))[0] == "StatusCode.INVALID_ARGUMENT"
    with grpc.insecure_channel(address) as channel:  # bytes that are no ModelInferRequest
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(b"\xff\xff\xff")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        raw = service_pb2.ModelInferRequest(model_name="digits")
        raw.inputs.add(name="pixels", datatype="FP32", shape=[1, 784])
        raw.raw_input_contents.append(b"\x00" * 100)  # 25 values for 784
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(raw)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "needs 784 values, got 25" in info.value.details()
    assert client.is_server_ready()


def test_binary_request_and_response_by_hand(server, predicted):
    """The extension without tritonclient: JSON header + raw bytes in, the same out (and mixed outputs)."""
    url, _ = server
    digits, pixels = predicted
    x = np.round(pixels[:4] * 255).astype(np.uint8)
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [4, 784],
                                     "parameters": {"binary_data_size": x.nbytes}}],
                         "outputs": [{"name": "logits", "parameters": {"binary_data": True}},
                                     {"name": "probabilities"}]}).encode()
    r = httpx.post(f"{url}/v2/models/digits/infer", content=header + x.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(header)), "content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    length = int(r.headers["inference-header-content-length"])
    head = json.loads(r.content[:length])
    logits_meta, probs_meta = head["outputs"]
    assert logits_meta["parameters"] == {"binary_data_size": 160} and "data" not in logits_meta
    logits = np.frombuffer(r.content[length:], "<f4").reshape(4, 10)
    assert (logits.argmax(1) == digits[:4]).all()
    assert np.array(probs_meta["data"]).reshape(4, 10).argmax(1).tolist() == digits[:4].tolist()
    # binary_data_output on the request makes every output binary; a versioned URL works too
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784],
                                   "data": pixels[0].reshape(-1).tolist()}], "parameters": {"binary_data_output": True}})
    r = httpx.post(f"{url}/v2/models/digits/versions/1/infer", content=body)
    assert r.status_code == 200 and int(r.headers["inference-header-content-length"]) < len(r.content)


BAD_BINARY = [
    ({"binary_data_size": 100}, b"\x00" * 100, "needs 784 values, got 100"),  # UINT8: 100 values
    ({"binary_data_size": 784}, b"\x00" * 700, "does not match the 700 bytes"),
    ({"binary_data_size": "784"}, b"\x00" * 784, "does not match"),
    ({}, b"\x00" * 784, "no input has binary_data_size"),
]


@pytest.mark.parametrize("params, payload, message", BAD_BINARY)
def test_bad_binary_requests_are_400(server, params, payload, message):
    url, _ = server
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], "parameters": params}]}).encode()
    if not params:
        header = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}]}).encode()
    r = httpx.post(f"{url}/v2/models/digits/infer", content=header + payload,
                   headers={"Inference-Header-Content-Length": str(len(header))})
    assert r.status_code == 400 and message in r.json()["error"], r.text


def test_binary_body_without_the_header_is_a_clear_400(server, predicted):
    """The original report: tritonclient's binary body sent without Inference-Header-Content-Length."""
    url, _ = server
    header = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784],
                                     "parameters": {"binary_data_size": 3136}}]}).encode()
    r = httpx.post(f"{url}/v2/models/digits/infer", content=header + np.full(784, 0.5, "<f4").tobytes())
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]


def test_grpc_port_busy_is_one_line(model):
    from helpers import error_line

    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        line = error_line(["serve", "--model", model, "--port", free_port(), "--grpc-port", s.getsockname()[1]])
    assert "cannot listen for gRPC" in line


def test_uint8_rows_become_the_model_input_per_batch_exactly_as_to_pixels():
    """UINT8 tensors stay uint8 until their batch runs (model_input, in the inference thread); the floats the
    model gets are bit for bit those of contract.to_pixels, and mixed batches keep their rows in order."""
    from resnet_edge.core.contract import to_pixels
    from resnet_edge.serving.v2 import model_input, parse_http_request

    rng = np.random.default_rng(3)
    a, c = rng.integers(0, 256, (2, 784), dtype=np.uint8), rng.integers(0, 256, (3, 784), dtype=np.uint8)
    b = to_pixels(rng.integers(0, 256, (1, 784), dtype=np.uint8))
    every_value = np.arange(256, dtype=np.uint8).repeat(4)[None, :784]
    for parts, expected in [([a, b, c], np.concatenate([to_pixels(a), b, to_pixels(c)])), ([a, c], to_pixels(np.concatenate([a, c]))),
                            ([every_value], to_pixels(every_value)), ([b], b)]:
        got = model_input(parts)
        assert got.dtype == np.float32 and got.shape == (len(expected), 1, 28, 28)
        assert np.array_equal(got, expected)
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [2, 28, 28], "data": a.tolist()}]}).encode()
    rows = parse_http_request(body).pixels
    assert rows.dtype == np.uint8 and np.array_equal(model_input([rows]), to_pixels(a))


@pytest.mark.parametrize("data, expected", [
    ([7] * 783 + [255], "rows"),  # flat integers 0-255: taken whole by bytes()
    ([7.0] * 783 + [255], "rows"),  # integer-valued floats: the checks below accept them
    ([[7] * 28] * 27 + [[7] * 27 + [255]], "rows"),  # evenly nested
    ([7] * 783 + [256], "0 to 255"),
    ([7] * 783 + [-1], "0 to 255"),
    ([7] * 783 + [2.5], "0 to 255"),
    ([7] * 783 + [True], "only numbers"),
    ([7] * 783 + [2**70], "0 to 255"),
    ([7] * 783 + ["7"], "only numbers"),
])
def test_uint8_json_data_fast_path_keeps_every_check(data, expected):
    """A flat list of ints 0-255 becomes uint8 rows in one bytes() call; anything else falls back to the
    checks that word the error, so the fast path changes no answer."""
    from resnet_edge.serving.v2 import RequestError, parse_http_request

    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], "data": data}]}).encode()
    if expected == "rows":
        rows = parse_http_request(body).pixels
        assert rows.dtype == np.uint8 and rows.shape == (1, 784)
        assert rows[0, 0] == 7 and rows[0, -1] == 255 and (rows[0, 1:-1] == 7).all()
    else:
        with pytest.raises(RequestError) as caught:
            parse_http_request(body)
        assert caught.value.status == 400 and expected in str(caught.value)
