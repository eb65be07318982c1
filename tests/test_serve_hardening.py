"""What a client, a slow client or a broken model can do to `serve` (issue 9's reproducers): each
answers 4xx or 503 quickly, the server stays ready, and memory stays bounded."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from helpers import DEADLINE_S, error_line, free_port, start_server, until, wait_until


# ------------------------------------------------------------------------------------------ tiny models
def linear_model(path: Path, batch: int | str = "batch", reverse_rows: bool = False) -> Path:
    """A contract-shaped ONNX model (pixels [B,1,28,28] -> logits [B,10], a linear layer) made in
    milliseconds; ``batch`` fixed or dynamic; ``reverse_rows`` returns the batch's rows reversed."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weights = numpy_helper.from_array(rng.normal(size=(784, 10)).astype(np.float32), "w")
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),
             helper.make_node("MatMul", ["flat", "w"], ["scores" if reverse_rows else "logits"])]
    inits = [weights]
    if reverse_rows:
        inits += [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
                  (("starts", [-1]), ("ends", [-2**63]), ("axes", [0]), ("steps", [-1]))]
        nodes.append(helper.make_node("Slice", ["scores", "starts", "ends", "axes", "steps"], ["logits"]))
    graph = helper.make_graph(nodes, "linear", [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, [batch, 1, 28, 28])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    return linear_model(tmp_path_factory.mktemp("models") / "linear.onnx")


@pytest.fixture(scope="module")
def server(linear):
    """--client-timeout 60: no connection of a test is cut off by the guard while the test runs."""
    proc, url = start_server("--model", linear, "--model-name", "m", "--max-body-bytes", 2_000_000,
                             "--max-batch-size", 8, "--max-queue", 2048, "--client-timeout", 60)
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def impatient_server(linear):
    """--client-timeout 1: for the tests of the guard that cuts slow clients off."""
    proc, url = start_server("--model", linear, "--model-name", "m", "--client-timeout", 1)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def _pending_bytes(url):
    return httpx.get(f"{url}/v2/models/m/stats", timeout=10).json()["server"]["pending_bytes"]


def _closed_by_server(s: socket.socket, why: str) -> bytes:
    """What the server sent before it closed ``s`` (read to the end), failing clearly if it never closes."""
    s.settimeout(DEADLINE_S)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except socket.timeout:
        pytest.fail(f"the server left the connection open for {DEADLINE_S:g} s; expected it closed {why}")
    return data


def _infer_url(url):
    return f"{url}/v2/models/m/infer"


@contextlib.asynccontextmanager
async def _in_process(model, **options):
    """`serve`'s ASGI app in this process, its lifespan running (batcher started, ready), and an httpx client
    on it: the app the server runs, without a process, a port or uvicorn (for what they have no part in)."""
    from resnet_edge.core.config import ServerConfig
    from resnet_edge.serving.app import create_app

    app = create_app(ServerConfig(model_path=model, model_name="m", **options))
    async with app.fastapi.router.lifespan_context(app.fastapi):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://serve",
                                     timeout=DEADLINE_S) as client:
            yield app, client


def _assert_ready(url):
    r = httpx.get(f"{url}/v2/health/ready", timeout=2)
    assert r.status_code == 200, r.text


# ------------------------------------------------------------------------------------------ request bodies
def _tensor(data, datatype="FP32", shape=(1, 784), **extra):
    return {"inputs": [{"name": "pixels", "datatype": datatype, "shape": list(shape), "data": data}], **extra}


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png_with_chunk_after_idat(kind: bytes, payload: bytes) -> bytes:
    """A valid 28x28 PNG with one more (well-formed, CRC-correct) chunk between IDAT and IEND."""
    png = _png_bytes(Image.new("L", (28, 28)))
    iend = png.rindex(b"IEND") - 4
    return png[:iend] + _chunk(kind, payload) + png[iend:]


BAD_ZTXT = _png_with_chunk_after_idat(b"zTXt", b"key\x00\x01abc")  # compression method 1: Pillow raises SyntaxError
BAD_FCTL = _png_with_chunk_after_idat(b"fcTL", struct.pack(">IIIIIHHBB", 0, 1000, 1000, 0, 0, 1, 1, 0, 0))  # frame > image
DEEP = b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

REPRODUCERS = [  # (body or JSON, expected status, words of the message)
    (DEEP, 400, "nested too deeply"),
    (_tensor([1] * 783 + [int("9" * 400)]), 400, "too large"),
    (b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": [' + b"9" * 5000 + b"]}]}", 400, "malformed JSON"),
    (_tensor([0.5] * 784, outputs=[{"name": ["logits"]}]), 400, "unknown output ['logits']"),
    (_tensor([0.5] * 784, outputs=[{"name": {"a": 1}}]), 400, "unknown output {'a': 1}"),
    (_tensor(["0.5"] * 784), 400, "only numbers"),
    (_tensor([True] * 784), 400, "only numbers"),
    (_tensor([0.5] * 783 + [False]), 400, "only numbers"),
    (_tensor([[0.5] * 392, [0.5] * 391 + [[0.5]]]), 400, "only numbers"),
    (_tensor([0.5] * 784, parameters=[1]), 400, "'parameters' must be a JSON object"),
    (_tensor([0.5] * 784, parameters={"binary_data_output": "yes"}), 400, "binary_data_output"),
    (_tensor([0.5] * 784, shape=[True, 784]), 400, "shape must be"),
    (_tensor([0.5] * 784, shape=[]), 400, "shape must be"),
]


@pytest.mark.parametrize("body, status, words", REPRODUCERS, ids=range(len(REPRODUCERS)))
def test_reproducers_answer_4xx_and_the_server_stays_ready(server, body, status, words):
    """Each is refused with its own worded 4xx (how fast: benchmarks/serve_abuse.py, not a unit test)."""
    url, _ = server
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(_infer_url(url), content=content, timeout=10)
    assert r.status_code == status and words in r.json()["error"], r.text
    assert "\n" not in r.json()["error"]
    _assert_ready(url)


@pytest.mark.parametrize("png, name", [(BAD_ZTXT, "zTXt"), (BAD_FCTL, "fcTL")])
def test_bad_png_chunks_after_idat_are_400_and_one_line_in_predict(server, tmp_path, linear, png, name):
    url, _ = server
    r = httpx.post(f"{url}/v1/predict", content=png, headers={"content-type": "image/png"})
    assert r.status_code == 400 and "cannot decode" in r.json()["error"], r.text
    path = tmp_path / f"{name}.png"
    path.write_bytes(png)
    assert "cannot decode the image" in error_line(["predict", path, "--model", linear])


def test_image_formats_are_limited_to_digit_photos(server):
    url, _ = server
    buf = io.BytesIO()
    Image.new("RGB", (28, 28)).save(buf, format="PPM")  # a format Pillow reads that no photo of a digit comes as
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nshowpage\n"
    for data in (buf.getvalue(), eps):
        r = httpx.post(f"{url}/v1/predict", content=data)
        assert r.status_code == 400 and "not one of PNG, JPEG, BMP, GIF, WEBP, TIFF" in r.json()["error"], r.text
    for fmt in ("JPEG", "BMP", "GIF", "WEBP", "TIFF"):
        img = Image.new("L", (56, 56))
        img.paste(255, (20, 10, 36, 46))  # a bar: a "1"
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        assert httpx.post(f"{url}/v1/predict", content=buf.getvalue()).status_code == 200, fmt


def test_image_bombs_are_refused_from_the_header_and_large_images_reduced(server, tmp_path, linear, monkeypatch):
    """80 Mpx passed before (Pillow refuses only twice its limit); a 4096x4096 RGBA costs 64 MiB decoded.
    Both are refused from the header: with Pillow's decoding made to fail, the refusal is the same."""
    from PIL import ImageFile

    from resnet_edge.inference.preprocess import ImageError, decode_image

    url, proc = server
    bombs = [_png_bytes(Image.new("1", (9000, 9000))), _png_bytes(Image.new("RGBA", (4096, 4096)))]
    for bomb in bombs:
        r = httpx.post(f"{url}/v1/predict", content=bomb)
        assert r.status_code == 400 and "over the limit" in r.json()["error"], r.text
    with monkeypatch.context() as patch:
        patch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("a bomb's pixels were decoded"))
        for bomb in bombs:
            with pytest.raises(ImageError, match="over the limit"):
                decode_image(bomb)
    big = Image.new("L", (4000, 4000))
    big.paste(255, (1500, 500, 2500, 3500))
    r = httpx.post(f"{url}/v1/predict", content=_png_bytes(big))  # 16 Mpx of 8-bit gray: allowed, reduced
    assert r.status_code == 200, r.text
    path = tmp_path / "bomb.png"
    path.write_bytes(bombs[0])
    assert "over the limit" in error_line(["predict", path, "--model", linear])


def test_decode_reduces_before_any_float_conversion():
    from resnet_edge.inference.preprocess import WORK_SIDE, decode_image

    img = Image.new("L", (4000, 3000), 0)
    gray = decode_image(_png_bytes(img))
    assert max(gray.shape) <= WORK_SIDE and gray.dtype == np.float32


def test_request_work_runs_off_the_event_loop(server, linear, monkeypatch):
    """A large body being parsed must not hold up /v2/health: with the parsing of a medium body (request
    thread pool) and of a large one (the parser process's executor) both held at a fault point, health
    answers. In this process, on the app itself; then the same bodies against the real server."""
    import concurrent.futures

    from resnet_edge.serving import state as state_module

    url, _ = server
    body = json.dumps(_tensor(np.full(600 * 784, 0.5).tolist(), shape=(600, 784))).encode()  # ~2 MB, over the limit
    large = json.dumps(_tensor(np.full(350 * 784, 0.5).tolist(), shape=(350, 784))).encode()  # ~1.4 MB: a process
    medium = json.dumps(_tensor(np.full(100 * 784, 0.5).tolist(), shape=(100, 784))).encode()  # ~0.4 MB: a thread
    release, held, on_loop = threading.Event(), {}, []
    parse = state_module.parse_http_request

    def held_parse(raw, header_value=None):
        if threading.current_thread() is threading.main_thread():  # the event loop's thread: never held
            on_loop.append(len(raw))
        else:
            held[len(raw)] = threading.current_thread().name
            release.wait(DEADLINE_S)
        return parse(raw, header_value)

    monkeypatch.setattr(state_module, "parse_http_request", held_parse)
    # the parser process's stand-in (a process would not see the fault point): the same executor interface
    processes = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="parser-process")

    async def scenario():
        async with _in_process(linear, max_body_bytes=2_000_000) as (app, client):
            app.server.processes = processes
            heavy = [asyncio.create_task(client.post("/v2/models/m/infer", content=b)) for b in (large, medium)]
            await until(lambda: len(held) == 2 or on_loop, "both bodies to be held in their parsers")
            health = await client.get("/v2/health/live")
            answered_while_held = not release.is_set()
            release.set()
            return health, answered_while_held, await asyncio.gather(*heavy)

    health, answered_while_held, results = asyncio.run(scenario())
    assert not on_loop, f"bodies of {on_loop} bytes were parsed on the event loop"
    assert held[len(large)].startswith("parser-process") and held[len(medium)].startswith("requests"), held
    assert health.status_code == 200 and answered_while_held
    assert [r.status_code for r in results] == [200, 200], [r.text[:200] for r in results]
    with httpx.Client(timeout=DEADLINE_S) as client:  # the real server: a real parser process, a real thread
        assert [client.post(_infer_url(url), content=b).status_code for b in (large, medium)] == [200, 200]
        assert client.post(_infer_url(url), content=body).status_code == 413


def _slow_clients(url: str) -> list[socket.socket]:
    """20 connections: 10 trickle their headers (never ended), 10 send 1 byte of a 5000-byte body."""
    port = int(url.rsplit(":", 1)[1])
    slow = []
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", port))
        if i % 2:
            s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{")  # body never comes
        else:
            s.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n")  # headers never end
        slow.append(s)
    return slow


def test_slow_clients_cannot_stall_health(server):
    """Health and stats answer while 20 slow connections are held open (the server's --client-timeout is
    60 s, so they are provably still held: their bodies' bytes are counted in flight)."""
    url, _ = server
    slow = _slow_clients(url)
    try:
        wait_until(lambda: _pending_bytes(url) == 10, "the 10 slow bodies' first bytes to be in flight")
        _assert_ready(url)
        assert _pending_bytes(url) == 10  # still held: health answered while they were
    finally:
        for s in slow:
            s.close()
    wait_until(lambda: _pending_bytes(url) == 0, "the slow bodies' bytes to be given back")
    _assert_ready(url)


def test_slow_clients_are_cut_off_after_the_client_timeout(impatient_server):
    """Connections that trickle their headers or body are closed after --client-timeout (1 s here)."""
    url = impatient_server
    for s in _slow_clients(url):
        with s:
            data = _closed_by_server(s, "after --client-timeout (1 s)")
            assert data == b"" or b"408" in data.split(b"\r\n")[0], data[:100]  # closed, or answered 408
    _assert_ready(url)


def test_rows_over_the_queue_and_large_requests_split(linear):
    """--max-queue counts images: a request larger than the queue is refused clearly; one larger than
    --max-batch-size is split into batches and answered whole."""
    x = np.random.default_rng(1).random((40, 784))

    async def scenario():
        async with _in_process(linear, max_batch_size=4, max_queue=16) as (_, client):
            split = await client.post("/v2/models/m/infer", json=_tensor(x[:16].tolist(), shape=(16, 784)))
            stats = (await client.get("/v2/models/m/stats")).json()["model_stats"][0]
            over = await client.post("/v2/models/m/infer", json=_tensor(x.tolist(), shape=(40, 784)))
            return split, stats, over, await client.get("/v2/health/ready")

    split, stats, over, ready = asyncio.run(scenario())
    assert split.status_code == 200 and split.json()["outputs"][0]["shape"] == [16, 10]
    assert stats["execution_count"] == 4 and stats["inference_count"] == 16  # 16 rows in 4 batches of 4
    assert stats["inference_stats"]["success"]["count"] == 1  # one request, split in 4 batches
    assert over.status_code == 413 and "over the server's queue of 16" in over.json()["error"]
    assert ready.status_code == 200


class GatedSession:
    """Stands in for ONNX Runtime: each run() records its batch size and the runs in progress, then waits
    until the test opens the gate (the test decides when a batch ends; no sleep decides it). Logits: the
    first pixel of each row, so every row says whose it is."""

    def __init__(self):
        self.gate, self.lock = threading.Event(), threading.Lock()
        self.running, self.most, self.sizes = 0, 0, []

    def run(self, names, feeds):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
            self.sizes.append(len(feeds["pixels"]))
        try:
            assert self.gate.wait(DEADLINE_S), "the test never opened the gate"
        finally:
            with self.lock:
                self.running -= 1
        return [np.repeat(feeds["pixels"][:, 0, 0, :1], 10, axis=1)]


def test_split_request_matches_unsplit_rows():
    from resnet_edge.serving.batcher import DynamicBatcher

    class Echo:  # logits = the first pixel of each row
        def run(self, names, feeds):
            return [np.repeat(feeds["pixels"][:, 0, 0, :1], 10, axis=1)]

    async def scenario():
        batcher = DynamicBatcher(Echo(), max_batch_size=3, max_delay_ms=1, max_queue=100)
        batcher.start()
        x = np.arange(10, dtype=np.float32)[:, None, None, None] * np.ones((10, 1, 28, 28), np.float32)
        out = await batcher.infer(x)
        await batcher.stop()
        return out, batcher.served.batches

    out, batches = asyncio.run(scenario())
    assert out[:, 0].tolist() == list(range(10)) and batches == 4


def test_a_caller_that_goes_away_keeps_its_rows_counted_until_the_batcher_drops_them():
    """--max-queue bounds the rows the batcher really holds: a cancelled caller (a gRPC deadline, a dropped
    client) leaves its rows waiting for an instance until the batcher drops them, so they count until
    then; none leak."""
    from resnet_edge.serving.batcher import DynamicBatcher
    from resnet_edge.serving.v2 import Busy

    session = GatedSession()

    async def scenario():
        batcher = DynamicBatcher(session, max_batch_size=1, max_delay_ms=0, max_queue=2)
        batcher.start()
        row = np.zeros((1, 1, 28, 28), np.float32)
        running = asyncio.ensure_future(batcher.infer(row))
        await until(lambda: session.running == 1, "the first batch to run")  # held there: the next one queues
        gone = asyncio.ensure_future(batcher.infer(row))
        await until(lambda: batcher.budget.held == 2, "the second row to be queued")
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)  # its caller has gone
        counted_after_cancel = batcher.budget.held
        try:
            await batcher.infer(row)
            third = "accepted"
        except Busy:
            third = "busy"
        session.gate.set()
        await running
        await until(lambda: batcher.budget.held == 0, "the cancelled row to be dropped once an instance is free")
        after = await batcher.infer(row)
        left = batcher.budget.held
        await batcher.stop()
        return counted_after_cancel, third, after.shape, left

    counted, third, shape, left = asyncio.run(scenario())
    assert counted == 2 and third == "busy"  # was 1 and accepted: the queue held 3 rows with --max-queue 2
    assert shape == (1, 10) and left == 0
    assert session.sizes == [1, 1]  # the cancelled row never ran


def test_stop_ends_a_batcher_loop_that_swallowed_a_cancel():
    """asyncio.wait_for (Python < 3.12) can swallow a cancel that lands as queue.get() completes; the
    batcher's loop then waits for the next request, and stop() must still end it (it hung before)."""
    from resnet_edge.serving.batcher import DynamicBatcher

    class Echo:
        def run(self, names, feeds):
            return [np.zeros((len(feeds["pixels"]), 10), np.float32)]

    async def scenario():
        batcher = DynamicBatcher(Echo(), max_batch_size=4, max_delay_ms=0, max_queue=100)
        real_loop, entered = batcher._loop, asyncio.Event()

        async def swallowing_loop():  # what the race does: the first cancel is lost
            entered.set()
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass
            await real_loop()

        batcher._loop = swallowing_loop
        batcher.start()
        await entered.wait()  # the loop runs (a cancel before its first step would not reach the try)
        stopping = asyncio.ensure_future(batcher.stop())
        finished, _ = await asyncio.wait({stopping}, timeout=DEADLINE_S)
        ended = stopping in finished
        if not ended:  # the old stop(): still waiting for the loop
            batcher.task.cancel()
            await asyncio.wait({stopping}, timeout=5)
        return ended, batcher.task.done(), batcher.dead

    ended, done, dead = asyncio.run(scenario())
    assert ended, "stop() waited on a loop that had swallowed its cancel"
    assert done and dead == "the server is shutting down"


@pytest.mark.parametrize("instances", [1, 2])
def test_next_batch_gathers_while_one_runs_and_instances_bound_the_runs(instances):
    """Batches are pipelined: while ONNX Runtime runs one, the next gathers (and with --instances 2 runs
    beside it); never more runs at once than instances, never more rows than max_batch_size, and every
    caller gets its own rows."""
    from resnet_edge.serving.batcher import DynamicBatcher

    session = GatedSession()

    async def scenario():
        batcher = DynamicBatcher(session, max_batch_size=4, max_delay_ms=0, max_queue=100, instances=instances)
        batcher.start()
        first = asyncio.ensure_future(batcher.infer(np.zeros((1, 1, 28, 28), np.float32)))
        await until(lambda: session.running == 1, "the first batch (1 row) to run")  # held: these queue behind it
        rest = [asyncio.ensure_future(batcher.infer(np.full((1, 1, 28, 28), i, np.float32))) for i in range(1, 11)]
        # every instance busy (held at the gate) and the next batch gathered, waiting for one
        await until(lambda: session.running == instances and len(batcher.gathering) == 4,
                    f"{instances} batches running and the next gathered")
        session.gate.set()
        results = await asyncio.gather(first, *rest)
        await batcher.stop()
        return results

    results = asyncio.run(scenario())
    assert all(r.shape == (1, 10) and (r == i).all() for i, r in enumerate(results))
    assert session.most == instances and max(session.sizes) == 4
    assert session.sizes[0] == 1 and session.sizes[1] == 4  # the second batch took what queued during the first


def test_a_running_batch_that_breaks_the_contract_stops_the_batcher():
    from resnet_edge.serving.batcher import DynamicBatcher
    from resnet_edge.serving.v2 import RequestError

    deaths = []

    class Extra:  # one row too many: the model broke its contract
        def run(self, names, feeds):
            return [np.zeros((len(feeds["pixels"]) + 1, 10), np.float32)]

    async def scenario():
        batcher = DynamicBatcher(Extra(), max_batch_size=4, max_delay_ms=0, max_queue=10, on_death=deaths.append,
                                 instances=2)
        batcher.start()
        first = await asyncio.gather(batcher.infer(np.zeros((1, 1, 28, 28), np.float32)), return_exceptions=True)
        await until(lambda: batcher.dead is not None, "the batcher to stop")
        late = await asyncio.gather(batcher.infer(np.zeros((1, 1, 28, 28), np.float32)), return_exceptions=True)
        await batcher.stop()
        return first + late

    results = asyncio.run(asyncio.wait_for(scenario(), 10))
    assert all(isinstance(r, RequestError) and r.status == 503 for r in results), results
    assert "contract" in str(results[0]) and "not ready" in str(results[1])
    assert len(deaths) == 1 and "ModelFailure" in deaths[0]


def _body_of(data, datatype="FP32", shape=(1, 784), **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "datatype": datatype, "shape": list(shape), "data": data}],
                       **extra}).encode()


@pytest.mark.parametrize("data, words", [
    (["0.5"] * 784, "only numbers"),
    ([None] * 784, "only numbers"),
    ([0.5] * 783 + [{"a": 1}], "only numbers"),
    ([[0.5] * 392, [0.5] * 391], "evenly nested"),
    ([[0.5] * 392, [0.5] * 391 + [[0.5]]], "only numbers"),
    ([1] * 783 + [2**63], "pixels must be"),  # past int64: numpy makes it a float, the range check refuses it
    ([1] * 783 + [2**64 * 10**10], "pixels must be"),
])
def test_json_fast_path_refuses_what_the_checks_refuse(data, words):
    """Bodies without a true/false token take numpy's type inference; everything but int64/float64
    numbers still gets the worded 400."""
    from resnet_edge.serving.v2 import RequestError, parse_http_request

    body = _body_of(data)
    assert b"true" not in body and b"false" not in body
    with pytest.raises(RequestError) as info:
        parse_http_request(body)
    assert info.value.status == 400 and words in str(info.value), str(info.value)


@pytest.mark.parametrize("datatype, shape, make", [
    ("UINT8", (1, 784), lambda px: [int(v) for v in px]),
    ("FP32", (1, 784), lambda px: [v / 255 for v in px]),
    ("FP32", (1, 1, 28, 28), lambda px: [[[v / 255 for v in px[r * 28:(r + 1) * 28]] for r in range(28)]]),
    ("UINT8", (1, 28, 28), lambda px: [[int(v) for v in px[r * 28:(r + 1) * 28]] for r in range(28)]),
])
def test_json_fast_path_gives_the_pixels_of_the_checked_path(datatype, shape, make):
    from resnet_edge.serving import v2

    px = np.random.default_rng(3).integers(0, 256, 784)
    fast = v2.parse_http_request(_body_of(make(px), datatype, shape))
    # the same body with a boolean elsewhere (the request id cannot hold one: a string that says so) takes the checks
    slow = v2.parse_http_request(_body_of(make(px), datatype, shape, id="true"))
    assert np.array_equal(fast.pixels, slow.pixels) and fast.pixels.dtype == slow.pixels.dtype
    model_input = v2.model_input([fast.pixels])  # what the model gets (UINT8 rows are scaled per batch)
    assert model_input.dtype == np.float32 and np.allclose(model_input.reshape(-1), px / 255, atol=1e-6)


def test_ids_and_numbers_json_allows_but_strict_json_does_not(server):
    """NaN, Infinity and lone surrogates are not strict JSON (orjson refuses them); the standard parser
    then decides, so the answers stay what they were: 400 for non-finite pixels, 200 with the id echoed."""
    url, _ = server
    r = httpx.post(_infer_url(url), content=_body_of([0] * 784, "UINT8", id="\ud800 x"), timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "\ud800 x", r.text
    raw = _body_of([0] * 784, "UINT8").replace(b'"inputs"', b'"id": "\\ud800", "inputs"', 1)
    r = httpx.post(_infer_url(url), content=raw, timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "\ud800", r.text
    r = httpx.post(_infer_url(url), content=_body_of([0.5] * 783 + [float("inf")]), timeout=10)
    assert r.status_code == 400 and "non-finite" in r.json()["error"], r.text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_booleans_in_a_utf16_or_utf32_body_are_400(encoding):
    """json reads UTF-16/32 bodies that orjson refuses; their true/false tokens are not UTF-8 bytes, so the
    numpy fast path must not be taken (it made [true, 0, ...] pixels 1 and 0)."""
    from resnet_edge.serving.v2 import RequestError, parse_http_request

    body = json.dumps(json.loads(_body_of([True] + [0] * 783, "UINT8"))).encode(encoding)
    with pytest.raises(RequestError) as info:
        parse_http_request(body)
    assert info.value.status == 400 and "only numbers" in str(info.value)


def test_size_check_leaves_long_ids_and_deeply_indented_json_alone():
    from resnet_edge.serving.v2 import check_json_size, parse_http_request

    long_id = _body_of([0] * 784, "UINT8", id="x" * 120_000)
    indented = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [8, 1, 28, 28],
                                       "data": np.random.default_rng(5).random((8, 1, 28, 28)).tolist()}]},
                          indent=8).encode()
    for body in (long_id, indented):
        check_json_size(body, len(body))
        assert parse_http_request(body).pixels.shape[0] in (1, 8)


def test_non_finite_logits_stay_nan_and_infinity_in_json():
    from resnet_edge.serving.v2 import InferRequest, encode_http_response

    logits = np.array([[np.inf, -np.inf, np.nan] + [0.5] * 7], np.float32)
    body, _ = encode_http_response("m", "1", InferRequest(np.zeros((1, 1, 28, 28), np.float32), [("logits", False)]), logits)
    data = json.loads(body)["outputs"][0]["data"]
    assert data[0] == np.inf and data[1] == -np.inf and np.isnan(data[2]) and data[3] == 0.5


def test_a_batch_that_fails_outside_onnx_runtime_answers_its_callers():
    """A bug of ours while delivering a batch stops the batcher; that batch's callers get 503 (they waited forever)."""
    from resnet_edge.serving.batcher import DynamicBatcher
    from resnet_edge.serving.v2 import RequestError

    class Echo:
        def run(self, names, feeds):
            return [np.zeros((len(feeds["pixels"]), 10), np.float32)]

    deaths = []

    async def scenario():
        batcher = DynamicBatcher(Echo(), max_batch_size=4, max_delay_ms=0, max_queue=10, on_death=deaths.append)

        def broken_deliver(jobs, logits):
            raise RuntimeError("bug")

        batcher._deliver = broken_deliver
        batcher.start()
        result = await asyncio.gather(asyncio.wait_for(batcher.infer(np.zeros((1, 1, 28, 28), np.float32)), 5),
                                      return_exceptions=True)
        await batcher.stop()
        return result[0]

    result = asyncio.run(scenario())
    assert isinstance(result, RequestError) and result.status == 503 and "batcher stopped" in str(result), repr(result)
    assert deaths and "RuntimeError" in deaths[0]


def test_json_far_larger_than_its_shape_is_413_before_parsing(server, monkeypatch):
    """An 1.9 MB body that claims one image is refused from its size, before any parser sees it (a parser
    made to fail gives the same answer); a large valid one (30 nested images, pretty-printed with full
    float64 digits, ~50 bytes a value) is served."""
    from resnet_edge.core.config import ServerConfig
    from resnet_edge.serving import state as state_module
    from resnet_edge.serving.v2 import RequestError

    url, _ = server
    wrong = _body_of([0.5] * 380_000)
    r = httpx.post(_infer_url(url), content=wrong, timeout=10)
    assert r.status_code == 413 and "a JSON request of 1 images needs at most" in r.json()["error"], r.text
    monkeypatch.setattr(state_module, "parse_http_request", lambda *args: pytest.fail("the body was parsed"))
    state = state_module.ServerState(ServerConfig(model_path="m.onnx"))
    with pytest.raises(RequestError, match="a JSON request of 1 images needs at most"):
        asyncio.run(state.parse(wrong, None))
    assert state.processes is None  # no parser process was started for it either
    state.pool.shutdown()
    monkeypatch.undo()
    images = np.random.default_rng(4).random((30, 1, 28, 28))
    body = json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [30, 1, 28, 28],
                                   "data": images.tolist()}]}, indent=4).encode()
    assert len(body) > 1_000_000
    r = httpx.post(_infer_url(url), content=body, timeout=30)
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [30, 10], r.text[:300]
    _assert_ready(url)


# ------------------------------------------------------------------------------------------ broken models
def test_model_that_reverses_rows_is_refused_at_start(tmp_path):
    bad = linear_model(tmp_path / "reverse.onnx", reverse_rows=True)
    assert "does not answer one row per input row" in error_line(["serve", "--model", bad, "--port", free_port()])


def test_fixed_batch_one_needs_max_batch_size_one(tmp_path):
    fixed = linear_model(tmp_path / "fixed.onnx", batch=1)
    assert "fixed batch dimension of 1" in error_line(["serve", "--model", fixed, "--port", free_port()])

    async def scenario():
        async with _in_process(fixed, max_batch_size=1) as (_, client):
            r = await client.post("/v2/models/m/infer", json=_tensor(np.zeros((3, 784)).tolist(), shape=(3, 784)))
            return r, (await client.get("/v2/models/m/stats")).json()["model_stats"][0]

    r, stats = asyncio.run(scenario())
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [3, 10]
    assert stats["execution_count"] == 3  # split into 3 calls of 1


def test_wrong_row_count_marks_not_ready_and_the_process_exits_1(linear):
    """A batch answered with the wrong number of rows: callers get 503, ready 503, then exit status 1."""
    port = free_port()
    code = ("import sys, numpy as np; import resnet_edge.serving.batcher as b; "
            "b.DynamicBatcher._run = lambda self, b: (np.zeros((len(b) + 1, 10), np.float32), 0, 0); "
            f"sys.argv = ['resnet-edge', 'serve', '--model', {str(linear)!r}, '--model-name', 'm', '--port', '{port}']; "
            "from resnet_edge.cli import app; app()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read()
        try:
            return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, "the server to be ready", deadline_s=60)
        r = httpx.post(_infer_url(url), json=_tensor([0.5] * 784), timeout=10)
        assert r.status_code == 503 and "contract" in r.json()["error"], r.text
        # not ready at once; the process exits EXIT_DELAY_S (1 s) later, on its own
        assert httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 503
        assert proc.wait(timeout=DEADLINE_S) == 1
        lines = proc.stderr.read().strip().splitlines()
        assert lines[-1].startswith("error: the batcher stopped") and "Traceback" not in "".join(lines[-3:])
    finally:
        if proc.poll() is None:
            proc.kill()


def test_model_exception_is_503_not_500():
    from resnet_edge.serving.batcher import DynamicBatcher
    from resnet_edge.serving.v2 import RequestError

    class Failing:
        def run(self, names, feeds):
            raise RuntimeError("CUDA out of memory")

    async def scenario():
        batcher = DynamicBatcher(Failing(), max_batch_size=4, max_delay_ms=0, max_queue=10)
        batcher.start()
        with pytest.raises(RequestError) as info:
            await batcher.infer(np.zeros((1, 1, 28, 28), np.float32))
        await batcher.stop()
        return info.value

    assert asyncio.run(scenario()).status == 503


def test_dead_batcher_fails_waiting_callers_and_new_ones():
    """If the batcher's task dies (anything outside its try), nobody waits forever."""
    from resnet_edge.serving.batcher import DynamicBatcher
    from resnet_edge.serving.v2 import RequestError

    deaths = []

    async def scenario():
        batcher = DynamicBatcher(None, max_batch_size=4, max_delay_ms=0, max_queue=10, on_death=deaths.append)

        async def broken_collect(first):
            raise ValueError("bug")

        batcher._collect = broken_collect
        batcher.start()
        results = await asyncio.gather(*(batcher.infer(np.zeros((1, 1, 28, 28), np.float32)) for _ in range(3)),
                                       return_exceptions=True)
        late = await asyncio.gather(batcher.infer(np.zeros((1, 1, 28, 28), np.float32)), return_exceptions=True)
        await batcher.stop()
        return results + late

    results = asyncio.wait_for(scenario(), 10)
    results = asyncio.run(results)
    assert all(isinstance(r, RequestError) and r.status == 503 for r in results), results
    assert deaths and "batcher stopped" in deaths[0]


def test_io_binding_path_gives_the_same_logits_on_the_cpu(linear):
    """The IOBinding feed used on GPU providers, run on the CPU provider (ONNX Runtime binds host memory there too)."""
    from resnet_edge.inference.runtime import create_session
    from resnet_edge.serving.batcher import DynamicBatcher

    session = create_session(linear)
    x = np.random.default_rng(2).random((5, 1, 28, 28), dtype=np.float32)
    expected = session.run(["logits"], {"pixels": x})[0]

    async def scenario():
        batcher = DynamicBatcher(session, max_batch_size=8, max_delay_ms=1, max_queue=100, io_binding=True)
        batcher.start()
        out = await asyncio.gather(batcher.infer(x[:2]), batcher.infer(x[2:]))
        await batcher.stop()
        return np.concatenate(out)

    assert np.allclose(asyncio.run(scenario()), expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ options
@pytest.mark.parametrize("args, words", [
    (["--max-delay-ms", "nan"], "--max-delay-ms must be a finite number"),
    (["--max-delay-ms", "inf"], "--max-delay-ms must be a finite number"),
    (["--max-queue", "8", "--max-batch-size", "64"], "--max-queue (8 images) must be at least --max-batch-size"),
    (["--grpc-port", "70000"], "--grpc-port must be 0-65535"),
    (["--client-timeout", "nan"], "--client-timeout must be a finite number"),
    (["--max-pending-bytes", "10"], "--max-pending-bytes must be at least"),
    (["--instances", "0"], "--instances must be at least 1"),
])
def test_bad_serve_options_are_one_line(linear, args, words):
    assert words in error_line(["serve", "--model", linear, *args])


def test_busy_port_is_one_line_before_serving(linear):
    """Exit 1 and one line, the error (error_line: no 'serving ...' announced before it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = error_line(["serve", "--model", linear, "--port", port])
    assert line.startswith(f"error: cannot listen on 127.0.0.1:{port}"), line


def test_cuda_provider_missing_is_one_line(linear):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA execution provider")
    line = error_line(["serve", "--model", linear, "--provider", "cuda", "--port", free_port()])
    assert "CUDAExecutionProvider" in line and "not available" in line


def test_stats_report_memory(server):
    url, _ = server
    body = httpx.get(f"{url}/v2/models/m/stats").json()
    assert body["server"]["rss_bytes"] > 10 * 2**20 and body["server"]["pending_bytes"] == 0
    assert "gpu_memory_bytes" not in body["server"]  # CPU provider: no GPU figure is made up


# ------------------------------------------------------------------------------------------ review round 2
@pytest.mark.parametrize("headers", [{"Inference-Header-Content-Length": b"\xb2"}, {"Content-Length": b"\xb9"}])
def test_non_ascii_digits_in_length_headers_are_400(server, headers):
    url, _ = server
    body = json.dumps(_tensor([0] * 784, "UINT8")).encode()
    if b"\xb9" in headers.get("Content-Length", b""):
        headers = {"Content-Length": b"\xb9" + str(len(body)).encode()}
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5) as s:
        head = b"".join(k.encode() + b": " + v + b"\r\n" for k, v in headers.items())
        if b"Content-Length" not in head:
            head += b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + head + b"\r\n" + body)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.split(b" ", 2)[1] == b"400", reply[:300]
    assert "error" in json.loads(reply.split(b"\r\n\r\n", 1)[1]), reply[:300]  # uvicorn's own 400 too
    _assert_ready(url)


@pytest.mark.parametrize("request_id", [1, 1e999, [[[]]], {"a": 1}, True])
def test_request_id_that_is_not_a_string_is_400(server, request_id):
    url, _ = server
    body = json.dumps(_tensor([0] * 784, "UINT8", id=request_id)).encode()  # 1e999 -> Infinity
    r = httpx.post(_infer_url(url), content=body, timeout=10)
    assert r.status_code == 400 and "'id' must be a string" in r.json()["error"], r.text


def test_deeply_nested_id_in_a_large_body_is_400(server):
    """Parsed in a thread (body > 16 KiB), encoded on the event loop's deeper stack: was a 500."""
    url, _ = server
    for depth in range(940, 1001, 6):
        body = b'{"id": ' + b"[" * depth + b"]" * depth + b', "pad": "' + b"x" * 20_000 + b'", "inputs": [{"name": ' \
            b'"pixels", "datatype": "UINT8", "shape": [1, 784], "data": ' + json.dumps([0] * 784).encode() + b"}]}"
        r = httpx.post(_infer_url(url), content=body, timeout=10)
        assert r.status_code == 400, (depth, r.text)
    _assert_ready(url)


def test_string_id_is_echoed_and_duplicate_outputs_are_400(server):
    url, _ = server
    r = httpx.post(_infer_url(url), json=_tensor([0] * 784, "UINT8", id="abc"), timeout=10)
    assert r.status_code == 200 and r.json()["id"] == "abc"
    twice = _tensor([0] * 784, "UINT8", outputs=[{"name": "logits"}, {"name": "logits"}])
    r = httpx.post(_infer_url(url), json=twice, timeout=10)
    assert r.status_code == 400 and "twice" in r.json()["error"], r.text


@pytest.fixture(scope="module")
def small_server(linear):
    """HTTP and gRPC with a budget of three bodies: --max-pending-bytes 300000, --max-body-bytes 100000."""
    grpc_port = free_port()
    proc, url = start_server("--model", linear, "--model-name", "m", "--grpc-port", grpc_port, "--max-body-bytes",
                             100_000, "--max-pending-bytes", 300_000, "--client-timeout", 5)
    yield url, f"127.0.0.1:{grpc_port}"
    proc.terminate()
    proc.wait(timeout=30)


def _grpc_request(**fields):
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="m", **fields)
    request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 784])
    request.raw_input_contents.append(bytes(784))
    return request


def test_declared_content_length_alone_reserves_no_bytes(small_server):
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    url, address = small_server
    port = int(url.rsplit(":", 1)[1])
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]  # 4 x 100000 promised > the budget
    try:
        for s in idle:  # each request's handler holds the one byte it has received
            s.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        wait_until(lambda: _pending_bytes(url) == 4, "the 4 requests to be in flight, 1 byte each")
        r = httpx.post(_infer_url(url), json=_tensor([0] * 784, "UINT8"), timeout=10)
        assert r.status_code == 200, r.text
        with grpc.insecure_channel(address) as channel:
            assert service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(_grpc_request(), timeout=10).outputs
    finally:
        for s in idle:
            s.close()


def test_grpc_messages_are_bounded_by_the_byte_limits(small_server):
    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from resnet_edge.core.config import ServerConfig
    from resnet_edge.serving.grpc_front import COPIES, max_rpcs, receive_slots

    _, address = small_server
    with grpc.insecure_channel(address) as channel:
        request = _grpc_request()
        request.raw_input_contents[0] = bytes(200_000)  # over --max-body-bytes: refused before it is parsed
        with pytest.raises(grpc.RpcError) as info:
            service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    config = ServerConfig(model_path="m.onnx", max_body_bytes=100_000, max_pending_bytes=300_000)
    assert max_rpcs(config) == 3  # messages of --max-body-bytes the budget holds
    # messages received and parsed at once, each costing up to COPIES times its size: within the budget
    assert receive_slots(config) == 1 and receive_slots(ServerConfig(model_path="m.onnx")) == 32 // COPIES


def test_grpc_answers_like_http_and_advertises_only_what_it_serves(small_server):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    url, address = small_server
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert list(stub.ServerMetadata(service_pb2.ServerMetadataRequest()).extensions) == []
        classify = _grpc_request()
        classify.outputs.add(name="logits").parameters["classification"].int64_param = 3
        twice = _grpc_request()
        twice.outputs.add(name="logits")
        twice.outputs.add(name="logits")
        for request, words in ((classify, "classification"), (twice, "twice")):
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details()
    body = _tensor([0] * 784, "UINT8", outputs=[{"name": "logits", "parameters": {"classification": 3}}])
    assert httpx.post(_infer_url(url), json=body, timeout=10).status_code == 400
    assert httpx.get(f"{url}/openapi.json", timeout=10).status_code == 404  # docs are off, and the schema too
    # HTTP advertises the extensions it implements as Triton specifies them (tests/test_serve_metrics.py
    # reads statistics and configuration with tritonclient); gRPC, which has neither call, advertises none
    extensions = httpx.get(f"{url}/v2", timeout=10).json()["extensions"]
    assert extensions == ["binary_tensor_data", "statistics", "model_configuration"]
    stats = httpx.get(f"{url}/v2/models/m/stats", timeout=10).json()["model_stats"][0]
    assert {"inference_stats", "batch_stats", "execution_count", "inference_count"} <= set(stats)


def test_max_connections_one_serves_one_connection(linear):
    proc, url = start_server("--model", linear, "--model-name", "m", "--max-connections", 1)
    try:
        with httpx.Client(timeout=10) as client:  # one keep-alive connection
            for _ in range(3):
                assert client.post(_infer_url(url), json=_tensor([0] * 784, "UINT8")).status_code == 200
            r = httpx.get(f"{url}/v2/health/live", timeout=10)  # a second connection meanwhile
            assert r.status_code == 503 and "--max-connections" in r.json()["error"], r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


_PEAK = r"""
import io, resource, sys
from PIL import Image
from resnet_edge.inference.preprocess import decode_image
img = Image.new("P", (4096, 4096), 0) if sys.argv[1] == "P" else Image.new("I;16", (4096, 4096), 0)
img.paste(1 if sys.argv[1] == "P" else 60000, (1000, 1000, 3000, 3000))
buf = io.BytesIO()
img.save(buf, "PNG", **({"transparency": 0} if sys.argv[1] == "P" else {}))
data = buf.getvalue()
del img, buf
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
gray = decode_image(data)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024, gray.max())
"""


@pytest.mark.parametrize("mode", ["P", "I;16"])
def test_wide_conversions_of_large_images_stay_within_the_decoded_limit(mode):
    """P with transparency -> RGBA (64 MiB at 4096x4096) and I;16 -> I (64 MiB) ran at full size."""
    out = subprocess.run([sys.executable, "-c", _PEAK, mode], capture_output=True, text=True, timeout=60)
    growth, peak = out.stdout.split()
    assert int(growth) < 40 and float(peak) > 0.2, out.stdout + out.stderr  # under 32 MiB decoded; the square shows


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_tiff_is_scaled_by_its_range(scale):
    from resnet_edge.inference.preprocess import decode_image

    a = np.zeros((28, 28), np.float32)
    a[5:23, 12:16] = scale
    buf = io.BytesIO()
    Image.fromarray(a, "F").save(buf, "TIFF")
    gray = decode_image(buf.getvalue())
    assert gray.max() == pytest.approx(1.0) and gray.min() == 0.0


def test_predict_refuses_a_huge_file_before_reading_it(tmp_path, linear):
    """Refused from its size on disk (the message gives it), not after reading 32 MiB of it."""
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.truncate(400 * 2**20)  # sparse: costs no disk
    assert "file of 400 MiB is over the limit of 32 MiB" in error_line(["predict", path, "--model", linear])


def test_grpc_is_not_ready_as_soon_as_shutdown_starts(linear):
    import grpc
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    grpc_port = free_port()
    proc, url = start_server("--model", linear, "--model-name", "m", "--grpc-port", grpc_port, "--client-timeout", 60)
    slow = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
    try:  # a request in flight keeps uvicorn draining (until this test closes it: --client-timeout is 60 s)
        slow.sendall(b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
        wait_until(lambda: _pending_bytes(url) == 1, "the slow request to be in flight")
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready
            proc.send_signal(subprocess.signal.SIGTERM)
            wait_until(lambda: not stub.ServerReady(service_pb2.ServerReadyRequest(), timeout=10).ready,
                       "gRPC readiness to turn false after SIGTERM")
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):  # not answered, not closed: the server was still draining
            slow.recv(1)
        assert proc.poll() is None
    finally:
        slow.close()
        assert proc.wait(timeout=30) == 0


def test_a_dead_parser_process_pool_is_shut_down():
    import concurrent.futures

    from resnet_edge.core.config import ServerConfig
    from resnet_edge.serving.state import PROCESS_BYTES, ServerState
    from resnet_edge.serving.v2 import RequestError

    class Broken(concurrent.futures.Executor):
        shut = False

        def submit(self, *args, **kwargs):
            raise concurrent.futures.BrokenExecutor("the worker died")

        def shutdown(self, wait=True, cancel_futures=False):
            self.shut = True

    state = ServerState(ServerConfig(model_path="m.onnx"))
    state.processes = broken = Broken()
    with pytest.raises(RequestError) as info:
        asyncio.run(state.parse(b'{"inputs": [{"shape": [1000, 784]' + b" " * PROCESS_BYTES, None))
    assert info.value.status == 503 and broken.shut and state.processes is None
    state.pool.shutdown()


def test_a_response_leaves_in_one_write_and_nothing_is_lost_at_close():
    """uvicorn writes a response's head and body separately; OneWrite sends them together when the response
    completes (flush), anything else by the end of the loop iteration, and what is pending before a close."""
    import asyncio

    from resnet_edge.serving.uvicorn_fence import OneWrite

    class Transport:
        def __init__(self):
            self.sent, self.closed = [], False

        def write(self, data):
            assert not self.closed
            self.sent.append(data)

        def close(self):
            self.closed = True

        def is_closing(self):
            return self.closed

        def get_extra_info(self, name):
            return ("127.0.0.1", 1) if name == "peername" else None

    async def scenario():
        loop = asyncio.get_running_loop()
        raw = Transport()
        t = OneWrite(raw, loop)
        t.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        t.write(b"{}")
        assert raw.sent == [] and t.get_extra_info("peername") == ("127.0.0.1", 1)  # the rest is the transport's
        t.flush()
        assert raw.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"]
        t.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # no flush: it leaves at the end of this iteration
        await asyncio.sleep(0)
        assert raw.sent[-1] == b"HTTP/1.1 100 Continue\r\n\r\n"
        t.write(b"last words")
        t.close()
        assert raw.sent[-1] == b"last words" and raw.closed
        t.write(b"too late")
        await asyncio.sleep(0)  # the scheduled flush finds the transport closing and drops it
        assert raw.sent[-1] == b"last words"

    asyncio.run(scenario())


def _raw_exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
    """Send ``request``, read its final HTTP/1.1 response whole (past any 100 Continue): status, lower-case
    headers, body."""
    sock.sendall(request)
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed before a response: {data[:200]!r}"
            data += chunk
        head, _, data = data.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        if status >= 200:
            break
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:])}
    while len(data) < int(fields.get(b"content-length", b"0")):
        data += sock.recv(65536)
    return status, fields, data


def test_an_answer_to_an_unread_expect_100_continue_body_closes_the_connection(server):
    """A request that asks for 100 Continue and is answered before its body was read (413 by Content-Length,
    an unknown model, an unknown route, 405) gets connection: close and the server closes: the client may
    skip the body, and on a kept connection its next request would be read as that body. Without Expect the
    connection stays: the client sends the body anyway, and an early close would cut it off with a reset."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    for path, length in [("/v2/models/m/infer", 99_999_999), ("/v2/models/nope/infer", 3200), ("/v1/predict", 99_999_999),
                         ("/v2/models/m/infer/x", 3200), ("/v2/health/live", 3200)]:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            status, fields, _ = _raw_exchange(s, f"POST {path} HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                                 f"Content-Length: {length}\r\n\r\n".encode())
            assert status in (404, 405, 413) and fields.get(b"connection") == b"close", (path, status, fields)
            # closed after the answer: the guard would wait for this server's 60 s --client-timeout
            assert _closed_by_server(s, "after its answer") == b"", path
    big = b"x" * 3_000_000  # over --max-body-bytes, sent whole before reading, as most clients do: 413, not a reset
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        status, fields, _ = _raw_exchange(s, b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                                          + str(len(big)).encode() + b"\r\n\r\n" + big)
        assert status == 413 and fields.get(b"connection") != b"close"
        status, _, body = _raw_exchange(s, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")  # the connection goes on
        assert status == 200 and b"live" in body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:  # Expect with its body read: kept, too
        payload = json.dumps(_tensor([0.5] * 784)).encode()
        status, fields, _ = _raw_exchange(s, b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                                          b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
        assert status == 200 and fields.get(b"connection") != b"close", fields
        status, _, _ = _raw_exchange(s, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 200
    _assert_ready(url)


def test_a_pipelined_request_left_unfinished_is_cut_off_by_the_client_timeout(impatient_server):
    """A whole request followed, in the same send, by the headers of a next one whose body never comes: the
    first is answered, and the connection is closed by --client-timeout (1 s here). Before, the guard saw
    no new bytes since the first request and a request 'on its way', and re-armed itself forever."""
    url = impatient_server
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(_tensor([0.5] * 784)).encode()
    infer = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(infer + b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
        data = _closed_by_server(s, "by --client-timeout (1 s)")
    assert [int(c) for c in re.findall(rb"HTTP/1\.1 (\d{3}) ", data)] == [200], data[:300]
    _assert_ready(url)
