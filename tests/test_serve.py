from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from helpers import free_port, start_server, wait_until
from resnet_edge.cli import app
from resnet_edge.core.mnist import load_test_split


@pytest.fixture(scope="module")
def server(trained_run):
    run, _, _ = trained_run
    proc, url = start_server("--model", run / "model.int8.onnx", "--model-name", "digits", "--max-body-bytes", 200_000, "--max-batch-size", 16, "--max-delay-ms", 5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def test_images():
    return load_test_split()


def _infer(url, pixels, datatype="FP32", shape=None, client=httpx, **body):
    payload = {"inputs": [{"name": "pixels", "datatype": datatype, "shape": shape or list(pixels.shape),
                           "data": pixels.reshape(-1).tolist()}], **body}
    return client.post(f"{url}/v2/models/digits/infer", json=payload, timeout=30)


def test_health_and_metadata(server):
    assert httpx.get(f"{server}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200
    assert httpx.get(f"{server}/v2/models/digits/ready").status_code == 200
    meta = httpx.get(f"{server}/v2/models/digits").json()
    assert meta["name"] == "digits"
    assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]
    assert meta["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}


def test_infer_matches_onnxruntime(server, trained_run, test_images):
    from resnet_edge.inference.runtime import create_session

    run, _, _ = trained_run
    images, labels = test_images
    x = images[:5]
    r = _infer(server, x, id="req-1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-1" and body["model_name"] == "digits"
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["shape"] == [5, 10] and out["datatype"] == "FP32"
    expected = create_session(run / "model.int8.onnx").run(["logits"], {"pixels": x})[0]
    assert np.allclose(np.array(out["data"]).reshape(5, 10), expected, atol=1e-5)


def test_infer_shapes_datatypes_and_outputs(server, test_images):
    images, labels = test_images
    x = images[:3]
    ref = np.array(_infer(server, x).json()["outputs"][0]["data"]).reshape(3, 10)
    as_uint8 = np.round(x * 255).astype(np.uint8)
    for shape in ([3, 28, 28], [3, 784]):
        r = _infer(server, as_uint8, datatype="UINT8", shape=shape)
        assert r.status_code == 200, r.text
        assert np.abs(np.array(r.json()["outputs"][0]["data"]).reshape(3, 10) - ref).max() < 1e-3
    nested = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [3, 1, 28, 28], "data": x.tolist()}],
              "outputs": [{"name": "probabilities"}]}
    r = httpx.post(f"{server}/v2/models/digits/infer", json=nested)
    assert r.status_code == 200, r.text
    (out,) = r.json()["outputs"]
    probs = np.array(out["data"]).reshape(3, 10)
    assert out["name"] == "probabilities" and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs.argmax(1) == ref.argmax(1)).all()


BAD = [
    ({"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 784], "data": [0] * 784}]}, 400, "expected 'pixels'"),
    ({"inputs": [{"name": "pixels", "datatype": "INT64", "shape": [1, 784], "data": [0] * 784}]}, 400, "datatype must be FP32"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 28, 28], "data": [0] * 2352}]}, 400, "shape must be"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [2, 784], "data": [0] * 784}]}, 400, "needs 1568 values, got 784"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": [0.5] * 783 + ["x"]}]}, 400, "only numbers"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": [2.0] * 784}]}, 400, "must be in [0, 1]"),
    ({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], "data": [300] * 784}]}, 400, "0 to 255"),
    ({"inputs": []}, 400, "exactly 1 tensor"),
    ({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": [0] * 784}], "outputs": [{"name": "x"}]}, 400, "unknown output 'x'"),
]


@pytest.mark.parametrize("body, status, message", BAD)
def test_bad_requests_get_a_clear_error(server, body, status, message):
    r = httpx.post(f"{server}/v2/models/digits/infer", content=json.dumps(body), headers={"content-type": "application/json"})
    assert r.status_code == status and message in r.json()["error"], r.text
    assert "Traceback" not in r.text
    assert httpx.get(f"{server}/v2/health/live").status_code == 200  # still answering


def test_non_finite_malformed_unknown_and_oversized(server):
    nan = '{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": [' + ", ".join(["NaN"] * 784) + "]}]}"
    r = httpx.post(f"{server}/v2/models/digits/infer", content=nan)
    assert r.status_code == 400 and "non-finite" in r.json()["error"]
    r = httpx.post(f"{server}/v2/models/digits/infer", content=b'{"inputs": [')
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = httpx.post(f"{server}/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    assert httpx.get(f"{server}/v2/models/nope").status_code == 404
    r = httpx.post(f"{server}/v2/models/digits/infer", content=b"x" * 300_000)
    assert r.status_code == 413 and "over the limit" in r.json()["error"]

    def chunks():  # no Content-Length: refused while streaming
        for _ in range(100):
            yield b" " * 10_000

    r = httpx.post(f"{server}/v2/models/digits/infer", content=chunks())
    assert r.status_code == 413
    assert httpx.get(f"{server}/v2/health/ready").status_code == 200


def _png(array01: np.ndarray, invert: bool = False, scale: int = 1) -> bytes:
    a = (array01 * 255).astype(np.uint8)
    img = Image.fromarray(255 - a if invert else a)
    if scale != 1:
        img = img.resize((28 * scale, 28 * scale), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_v1_predict_raw_and_multipart(server, test_images):
    images, labels = test_images
    png = _png(images[0, 0])
    r = httpx.post(f"{server}/v1/predict", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    assert r.json()["digit"] == labels[0] and abs(sum(r.json()["probabilities"]) - 1) < 1e-4
    photo = _png(images[1, 0], invert=True, scale=5)  # dark on light, 140x140, like a scan
    r = httpx.post(f"{server}/v1/predict", files={"file": ("digit.png", photo, "image/png")})
    assert r.status_code == 200 and r.json()["digit"] == labels[1], r.text
    r = httpx.post(f"{server}/v1/predict", content=b"not an image", headers={"content-type": "image/png"})
    assert r.status_code == 400 and "cannot decode" in r.json()["error"]


def test_concurrent_callers_each_get_their_own_answer(server, trained_run, test_images):
    from resnet_edge.inference.runtime import create_session

    run, _, _ = trained_run
    images, _ = test_images
    expected = create_session(run / "model.int8.onnx").run(["logits"], {"pixels": images[:96]})[0]

    def one(i):
        n = 1 + i % 3  # requests of 1, 2 and 3 rows, batched together
        r = _infer(server, images[i:i + n], client=client)
        assert r.status_code == 200, r.text
        return i, np.array(r.json()["outputs"][0]["data"]).reshape(n, 10)

    before = httpx.get(f"{server}/v2/models/digits/stats").json()["model_stats"][0]
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(32) as pool:  # 32 connections, kept alive
        results = list(pool.map(one, range(90)))
    for i, got in results:
        assert np.abs(got - expected[i:i + len(got)]).max() < 1e-4, f"request {i} got another caller's rows"
    after = httpx.get(f"{server}/v2/models/digits/stats").json()["model_stats"][0]
    requests = after["inference_stats"]["success"]["count"] - before["inference_stats"]["success"]["count"]
    calls = after["execution_count"] - before["execution_count"]
    assert requests == 90 and after["inference_count"] - before["inference_count"] == 180
    assert calls < requests, "no two requests were ever merged into one ONNX Runtime call"


def test_batcher_merges_waiting_requests_and_splits_answers_by_caller():
    import asyncio

    from resnet_edge.serving.batcher import DynamicBatcher

    calls = []

    class RecordingSession:  # logits = the pixel value of each row, so every row says whose it is
        def run(self, names, feeds):
            x = feeds["pixels"]
            calls.append(len(x))
            return [np.repeat(x[:, 0, 0, :1], 10, axis=1)]

    async def scenario():
        batcher = DynamicBatcher(RecordingSession(), max_batch_size=8, max_delay_ms=50, max_queue=100)
        batcher.start()
        sizes = [1, 2, 3, 1, 1]
        jobs = [batcher.infer(np.full((n, 1, 28, 28), i, np.float32)) for i, n in enumerate(sizes)]
        results = await asyncio.gather(*jobs)
        await batcher.stop()
        return sizes, results

    sizes, results = asyncio.run(scenario())
    assert calls == [8]  # all five requests, 8 rows, in one call
    for i, (n, r) in enumerate(zip(sizes, results)):
        assert r.shape == (n, 10) and (r == i).all()


def test_sigterm_finishes_in_flight_requests(trained_run, test_images):
    run, _, _ = trained_run
    images, _ = test_images
    proc, url = start_server("--model", run / "model.onnx", "--model-name", "digits", "--max-delay-ms", 1000, "--max-batch-size", 64)
    result = {}

    def slow():  # waits ~1 s in the batcher: in flight when SIGTERM arrives
        result["r"] = _infer(url, images[:1])

    t = threading.Thread(target=slow)
    t.start()
    # SIGTERM only once the server holds the request (no sleep-based bet)
    wait_until(lambda: httpx.get(f"{url}/v2/models/digits/stats").json()["server"]["pending_requests"] >= 1
               or not t.is_alive(), "the request to reach the batcher")
    assert t.is_alive(), "the request was answered before SIGTERM could arrive while it was in flight"
    proc.send_signal(signal.SIGTERM)
    t.join(30)
    assert proc.wait(timeout=30) == 0
    assert result["r"].status_code == 200


def test_server_refuses_to_start_with_a_broken_model(tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"garbage")
    result = CliRunner().invoke(app, ["serve", "--model", str(broken), "--port", str(free_port())])
    assert result.exit_code == 1 and result.stderr.strip().startswith("error: ") and "not a readable ONNX model" in result.stderr


def test_predict_cli_on_png_digits(tmp_path, trained_run, test_images):
    run, _, _ = trained_run
    images, labels = test_images
    paths = []
    for i in range(10):
        p = tmp_path / f"digit{i}.png"
        p.write_bytes(_png(images[i, 0], invert=i % 2 == 1, scale=1 + i % 3))
        paths.append(str(p))
    result = CliRunner().invoke(app, ["predict", *paths, "--run", str(run), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert [r["digit"] for r in out] == labels[:10].tolist()
    assert [r["path"] for r in out] == paths


def test_full_queue_answers_503_and_the_rest_are_served():
    import asyncio

    from resnet_edge.serving.batcher import DynamicBatcher
    from resnet_edge.serving.v2 import RequestError

    class EchoSession:  # stands in for ONNX Runtime: logits = row index
        def run(self, names, feeds):
            x = feeds["pixels"]
            return [np.repeat(x[:, 0, 0, :1], 10, axis=1)]

    async def scenario():
        batcher = DynamicBatcher(EchoSession(), max_batch_size=1, max_delay_ms=0, max_queue=2)
        batcher.start()
        await asyncio.sleep(0)
        # the six are admitted or refused before the batcher runs any of them: no batch frees a row meanwhile
        jobs = [batcher.infer(np.full((1, 1, 28, 28), i, np.float32)) for i in range(6)]
        results = await asyncio.gather(*jobs, return_exceptions=True)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    busy = [r for r in results if isinstance(r, RequestError)]
    served = [(i, r) for i, r in enumerate(results) if not isinstance(r, Exception)]
    assert busy and all(r.status == 503 and "busy" in str(r) for r in busy)
    assert served and all(r.shape == (1, 10) and (r == i).all() for i, r in served)


def test_serving_and_predict_never_import_torch(trained_run, tmp_path):
    run, _, _ = trained_run
    png = tmp_path / "d.png"
    images, _ = load_test_split()
    png.write_bytes(_png(images[0, 0]))
    code = ("import sys; from pathlib import Path; from typer.testing import CliRunner; "
            "from resnet_edge.cli import app; from resnet_edge.core.config import ServerConfig; from resnet_edge.serving.app import create_app; "
            f"create_app(ServerConfig(model_path=Path({str(run / 'model.int8.onnx')!r}), model_name='m')); "
            f"r = CliRunner().invoke(app, ['predict', {str(png)!r}, '--run', {str(run)!r}]); assert r.exit_code == 0, r.output; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_name_defaults_to_the_architecture(trained_run):
    from resnet_edge.core.config import ServerConfig
    from resnet_edge.serving.app import create_app

    run, _, _ = trained_run
    config = ServerConfig(model_path=run / "model.int8.onnx")
    create_app(config)
    assert config.model_name == "resnet8"
