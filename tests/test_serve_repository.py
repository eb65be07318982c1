"""`serve --repository`: every model and version of a Triton repository in one server, each answering
with its own model; Triton's repository extension (index, load, unload) over HTTP and gRPC with
Triton's own clients; a broken model reported, never taking the others down, never read outside the
repository; the server's row limit shared by every model."""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import httpx
import numpy as np
import pytest

from helpers import error_line, free_port, until, wait_until
from resnet_edge.core.config import ServerConfig

IMAGE = np.zeros((1, 1, 28, 28), np.float32)


def digit_model(path, digit: int):
    """A contract-shaped model that answers ``digit`` for every image: logits = pixels @ 0 + one-hot(digit)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    bias = np.zeros(10, np.float32)
    bias[digit] = 5.0
    inits = [numpy_helper.from_array(np.zeros((784, 10), np.float32), "w"), numpy_helper.from_array(bias, "b")]
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["scores"]),
             helper.make_node("Add", ["scores", "b"], ["logits"])]
    graph = helper.make_graph(nodes, "digit", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def _folder(repo, name, versions: dict[str, int], config: bytes = b'platform: "onnxruntime_onnx"\n'):
    for version, digit in versions.items():
        digit_model(repo / name / version / "model.onnx", digit)
    (repo / name).mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_bytes(config)


@pytest.fixture()
def repository(tmp_path):
    """a: versions 1 and 2 (digits 1, 2); b: version 1 (digit 3); and four broken models: a model file that
    is not ONNX, a version folder that is a symlink out of the repository, no config.pbtxt, a config.pbtxt
    that is not text."""
    repo = tmp_path / "repo"
    _folder(repo, "a", {"1": 1, "2": 2})
    _folder(repo, "b", {"1": 3})
    _folder(repo, "broken", {})
    (repo / "broken" / "1").mkdir()
    (repo / "broken" / "1" / "model.onnx").write_bytes(b"not an onnx model")
    outside = digit_model(tmp_path / "elsewhere" / "7" / "model.onnx", 7).parent
    _folder(repo, "outside", {})
    os.symlink(outside, repo / "outside" / "1")
    digit_model(repo / "noconfig" / "1" / "model.onnx", 4)
    _folder(repo, "unreadable", {"1": 5}, config=b"\xff\xfe\x00 not text")
    _folder(repo, "loop", {})  # its model.onnx is a link to itself
    (repo / "loop" / "1").mkdir()
    os.symlink(repo / "loop" / "1" / "model.onnx", repo / "loop" / "1" / "model.onnx")
    return repo


def _start(repo, *args):
    """`serve --repository repo ARGS` with gRPC; its URL and gRPC address once a model is ready."""
    import subprocess
    import sys

    port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "resnet_edge", "serve", "--repository", str(repo), "--port",
                             str(port), "--grpc-port", str(grpc_port), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert proc.poll() is None, proc.stderr.read()
        try:
            return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(ready, "the server to be ready")
    return proc, url, f"127.0.0.1:{grpc_port}"


def _digit(url, model, version=None):
    path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.0] * 784}]}
    r = httpx.post(url + path, json=body, timeout=30)
    return r.status_code, (int(np.argmax(r.json()["outputs"][0]["data"])), r.json()["model_version"]) \
        if r.status_code == 200 else r.json()["error"]


def _grpc_infer(client, model):
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput("pixels", [1, 1, 28, 28], "FP32")
    inp.set_data_from_numpy(IMAGE)
    return client.infer(model, [inp])


def test_one_server_serves_every_model_and_version_and_reports_the_broken(repository):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    proc, url, address = _start(repository, "--model-control", "explicit")
    try:
        assert _digit(url, "a") == (200, (2, "2"))  # no version: the highest
        assert _digit(url, "a", "1") == (200, (1, "1"))
        assert _digit(url, "b") == (200, (3, "1"))
        http, grpc = httpclient.InferenceServerClient(url[7:]), grpcclient.InferenceServerClient(address)
        index = {(m["name"], m.get("version", "")): m for m in http.get_model_repository_index()}
        assert {k for k, m in index.items() if m["state"] == "READY"} == {("a", "1"), ("a", "2"), ("b", "1")}
        reasons = {name: m["reason"] for (name, _), m in index.items() if m["state"] != "READY"}
        assert set(reasons) == {"broken", "outside", "noconfig", "unreadable", "loop"}, index
        assert "leads outside the repository" in reasons["outside"] and "no config.pbtxt" in reasons["noconfig"]
        assert "version 1 is a symlink loop" in reasons["loop"]
        assert "not UTF-8 text" in reasons["unreadable"] and reasons["broken"]
        grpc_index = {(m.name, m.version): m.state for m in grpc.get_model_repository_index().models}
        assert grpc_index == {k: m["state"] for k, m in index.items()}
        for name in ("a", "b"):  # Triton's clients read every served model's configuration, both protocols
            assert http.get_model_config(name)["name"] == name and grpc.get_model_config(name).config.name == name
        assert len(http.get_inference_statistics("a")["model_stats"]) == 2  # both versions
        assert not http.is_model_ready("broken") and _digit(url, "broken")[0] == 503
        assert not http.is_model_ready("outside") and http.is_server_ready()  # the others serve on

        grpc.unload_model("a")
        assert not http.is_model_ready("a") and not grpc.is_model_ready("a")
        assert _digit(url, "a")[0] == 404
        for path in ("/v2/models/a", "/v2/models/a/config"):  # an unloaded model has no metadata to give
            assert httpx.get(url + path, timeout=10).status_code == 404
        with pytest.raises(InferenceServerException) as info:
            _grpc_infer(grpc, "a")
        assert info.value.status() == "StatusCode.UNAVAILABLE"
        assert _digit(url, "b") == (200, (3, "1"))  # untouched
        http.load_model("a")
        assert http.is_model_ready("a") and _digit(url, "a") == (200, (2, "2"))

        shutil.copy(repository / "b" / "1" / "model.onnx", repository / "broken" / "1" / "model.onnx")
        grpc.load_model("broken")  # the load reads the folder again: mended, it serves
        assert http.is_model_ready("broken") and _digit(url, "broken") == (200, (3, "1"))
        with pytest.raises(InferenceServerException, match="leads outside"):
            http.load_model("outside")
        _folder(repository, "c", {"1": 6})  # added while serving, with a version 2 that is no model
        (repository / "c" / "2").mkdir()
        (repository / "c" / "2" / "model.onnx").write_bytes(b"junk")
        _folder(repository, "bad name", {"1": 6})  # cannot be served (not a URL segment): hides no other
        assert "c" in {m["name"] for m in http.get_model_repository_index()}
        with pytest.raises(InferenceServerException, match="version 2 failed to load"):
            http.load_model("c")  # all or nothing: version 1 is not served either
        assert _digit(url, "c", "1")[0] != 200 and not http.is_model_ready("c", "1")
        with pytest.raises(InferenceServerException):
            http.load_model("nothere")
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        assert 'resnet_edge_requests_total{code="200",model="a",protocol="json",version="2"}' in metrics
        assert 'resnet_edge_requests_total{code="200",model="b",protocol="json",version="1"}' in metrics
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_model_control_none_refuses_load_and_unload_and_only_loads_the_named_model(repository):
    import grpc as grpcio
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    proc, url, address = _start(repository, "--model-name", "b")
    try:
        assert _digit(url, "b") == (200, (3, "1"))
        r = httpx.post(f"{url}/v2/repository/models/b/unload", timeout=10)
        assert r.status_code == 403 and "--model-control explicit" in r.json()["error"]
        with pytest.raises(InferenceServerException) as info:
            grpcclient.InferenceServerClient(address).load_model("a")
        assert info.value.status() == str(grpcio.StatusCode.FAILED_PRECONDITION)
        assert _digit(url, "a")[0] == 404  # in the repository, not loaded
        states = {m["name"]: m["state"] for m in httpx.post(f"{url}/v2/repository/index", timeout=10).json()}
        assert states["a"] == "UNAVAILABLE" and states["b"] == "READY"
        for body in (b"[1]", b"{", b'{"parameters": {"config": "{}"}}'):
            assert httpx.post(f"{url}/v2/repository/models/b/load", content=body, timeout=10).status_code in (400, 403)
        assert httpx.post(f"{url}/v2/repository/index", content=b'{"ready": 3}', timeout=10).status_code == 400
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_repository_with_no_loadable_model_is_one_line(repository):
    for name in ("a", "b"):
        shutil.rmtree(repository / name)
    assert "no model could be loaded" in error_line(["serve", "--repository", repository])
    assert "no model 'zz'" in error_line(["serve", "--repository", repository, "--model-name", "zz"])
    assert "--model-control must be one of" in error_line(["serve", "--repository", repository, "--model-control", "poll"])
    assert "give one" in error_line(["serve", "--model", repository / "noconfig" / "1" / "model.onnx",
                                     "--model-control", "explicit"])


class _Held:
    """A session-like batcher stand-in: each infer waits for ``go``."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.callers_waiting = 0
        self.stopped = False

    async def infer(self, pixels):
        self.callers_waiting += 1
        try:
            await self.go.wait()
        finally:
            self.callers_waiting -= 1
        return np.zeros((len(pixels), 10), np.float32)

    async def stop(self):
        self.stopped = True


def test_an_unload_finishes_the_requests_in_flight_and_refuses_new_ones():
    from resnet_edge.serving.models import READY, UNAVAILABLE, UNLOADING, ModelTable, ServedModel
    from resnet_edge.serving.v2 import RequestError

    async def request(table):
        with table.serving("m") as model:  # held from the lookup, as a request whose body is still arriving
            await asyncio.sleep(0)
            return await model.infer(IMAGE, [0])

    async def main():
        table = ModelTable(ServerConfig(), None)
        model = ServedModel("m", "1", None)
        model.batcher, model.state = _Held(), READY
        table.add(model)
        flight = asyncio.ensure_future(request(table))
        await asyncio.sleep(0)
        stopping = asyncio.ensure_future(table.unload("m"))
        await until(lambda: model.state == UNLOADING, "the unload to start")
        with pytest.raises(RequestError) as info:  # UNLOADING: new requests are refused at once
            table.serving("m")
        assert info.value.status == 503 and not stopping.done()
        held = model.batcher
        held.go.set()
        assert (await flight).shape == (1, 10)  # the request in flight got its answer
        await stopping
        assert held.stopped and model.state == UNAVAILABLE and model.reason == "unloaded"
        with pytest.raises(RequestError) as info:
            table.serving("m")
        assert info.value.status == 404

    asyncio.run(main())


def test_an_unload_whose_caller_goes_away_still_ends_unloaded():
    """A gRPC client's deadline cancels its call: the unload runs to its end, never stuck in UNLOADING."""
    from resnet_edge.serving.models import READY, UNAVAILABLE, ModelTable, ServedModel

    async def main():
        table = ModelTable(ServerConfig(), None)
        model = ServedModel("m", "1", None)
        model.batcher, model.state = _Held(), READY
        table.add(model)
        model.holding = 1  # a request in flight
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(table.unload("m"), 0.05)
        model.holding = 0  # answered
        await until(lambda: model.state == UNAVAILABLE, "the unload to end")
        assert model.reason == "unloaded" and model.batcher is None and model.session is None

    asyncio.run(main())


def test_an_unload_lets_a_request_whose_body_is_still_arriving_finish(repository):
    """The request took the model before the unload: it is answered by it; the next one is not."""
    import socket
    import threading

    proc, url, _ = _start(repository, "--model-control", "explicit")
    try:
        body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784],
                                       "data": [0] * 784}]}).encode()
        conn = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        conn.sendall(b"POST /v2/models/b/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:100])
        unloaded = []
        thread = threading.Thread(target=lambda: unloaded.append(
            httpx.post(f"{url}/v2/repository/models/b/unload", timeout=60).status_code))
        thread.start()
        states = lambda: {m["name"]: m["state"] for m in httpx.post(f"{url}/v2/repository/index", timeout=10).json()}  # noqa: E731
        wait_until(lambda: states()["b"] == "UNLOADING", "b to be unloading")
        assert _digit(url, "b")[0] == 503  # a new request is refused while b drains
        conn.sendall(body[100:])
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            answer += conn.recv(65536)
        conn.close()
        assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
        data = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert int(np.argmax(data["outputs"][0]["data"])) == 3
        thread.join(60)
        assert unloaded == [200] and states()["b"] == "UNAVAILABLE" and _digit(url, "b")[0] == 404
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_the_row_limit_is_the_servers_not_each_models():
    """--max-queue bounds the rows of every model's batcher together: more models, no more memory."""
    from resnet_edge.serving.batcher import DynamicBatcher, RowBudget
    from resnet_edge.serving.v2 import Busy

    class Slow:
        def __init__(self):
            self.release = None

        def run(self, outputs, feeds):
            self.release.wait(30)
            return [np.zeros((len(feeds["pixels"]), 10), np.float32)]

    async def main():
        import threading

        budget = RowBudget(4)
        sessions = [Slow(), Slow()]
        for s in sessions:
            s.release = threading.Event()
        batchers = [DynamicBatcher(s, 4, 0, 4, budget=budget) for s in sessions]
        for b in batchers:
            b.start()
        first = asyncio.ensure_future(batchers[0].infer(np.zeros((3, 1, 28, 28), np.float32)))
        while budget.held < 3:
            await asyncio.sleep(0.001)
        with pytest.raises(Busy):  # the other model's batcher is empty, the server's rows are not
            await batchers[1].infer(np.zeros((2, 1, 28, 28), np.float32))
        assert (await _answer(batchers[1], sessions[1], 1)).shape == (1, 10)
        sessions[0].release.set()
        assert (await first).shape == (3, 10) and budget.held == 0
        for b in batchers:
            await b.stop()

    async def _answer(batcher, session, rows):
        session.release.set()
        return await batcher.infer(np.zeros((rows, 1, 28, 28), np.float32))

    asyncio.run(main())


def test_a_model_folder_linked_out_of_the_repository_is_never_listed(tmp_path, monkeypatch):
    """A model folder that is a symlink out of the repository is reported, and nothing outside is read:
    not its files, not even its listing."""
    from pathlib import Path

    from resnet_edge.core.repository import scan_repository

    repo = tmp_path / "repo"
    _folder(repo, "a", {"1": 1})
    elsewhere = tmp_path / "elsewhere"
    digit_model(elsewhere / "1" / "model.onnx", 7)
    os.symlink(elsewhere, repo / "linked")
    listed = []
    iterdir = Path.iterdir

    def recording_iterdir(self):
        listed.append(self.resolve())
        return iterdir(self)

    monkeypatch.setattr(Path, "iterdir", recording_iterdir)
    found = scan_repository(repo)
    assert found["linked"].problem == "its folder leads outside the repository" and not found["linked"].versions
    assert found["a"].problem is None
    assert not [p for p in listed if not p.is_relative_to(repo.resolve())], listed
