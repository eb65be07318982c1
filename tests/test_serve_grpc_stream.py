"""gRPC ModelStreamInfer (issue "gRPC ModelStreamInfer"): tritonclient.grpc's stream gets unary ModelInfer's
answers with their ids, an error for one request travels in its answer and the stream goes on, streamed
requests count in the statistics and metrics as "grpc", a stream reads at most MAX_IN_FLIGHT requests
ahead of its answers, shares --max-pending-bytes, outlives --client-timeout, is refused past the stream
limit and ends cleanly at shutdown."""

from __future__ import annotations

import asyncio
import queue
import signal
from types import SimpleNamespace

import grpc
import httpx
import numpy as np
import pytest
from helpers import free_port, start_server, until, wait_until
from test_serve_hardening import linear_model

CLIENT_DEADLINE = 30  # the clients' own deadline on calls that must succeed: far beyond what they need
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def linear(tmp_path_factory):
    return linear_model(tmp_path_factory.mktemp("models") / "linear.onnx")


@pytest.fixture(scope="module")
def served(linear):
    grpc_port = free_port()
    proc, url = start_server("--model", linear, "--model-name", "m", "--max-batch-size", 8, "--grpc-port", grpc_port)
    yield url, f"127.0.0.1:{grpc_port}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((1 + i % 3, 1, 28, 28)).astype(np.float32) for i in range(n)]


def _inputs(x: np.ndarray, name: str = "pixels") -> list:
    import tritonclient.grpc as grpcclient

    inp = grpcclient.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return [inp]


def _stream(address: str, requests: list[tuple[str, str, np.ndarray, str]]) -> tuple[dict, list]:
    """(model, input name, pixels, id) sent on one tritonclient stream -> ({id: logits}, [error messages])."""
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(address)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    for model, name, x, request_id in requests:
        client.async_stream_infer(model, _inputs(x, name), request_id=request_id)
    got: list = []

    def all_answered() -> bool:
        while not answers.empty():
            got.append(answers.get_nowait())
        return len(got) >= len(requests)

    wait_until(all_answered, f"{len(requests)} answers on the stream")
    client.stop_stream()
    client.close()
    results = {r.get_response().id: r.as_numpy("logits") for r, e in got if e is None}
    return results, [str(e) for r, e in got if e is not None]


def _unary(address: str, x: np.ndarray) -> np.ndarray:
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(address).infer("m", _inputs(x)).as_numpy("logits")


def test_twenty_streamed_requests_get_unary_answers_with_their_ids(served):
    _, address = served
    images = _images(20)
    results, errors = _stream(address, [("m", "pixels", x, f"req-{i}") for i, x in enumerate(images)])
    assert errors == [] and sorted(results) == sorted(f"req-{i}" for i in range(20))
    for i, x in enumerate(images):  # same logits as unary ModelInfer (batched differently: float rounding)
        expected = _unary(address, x)
        assert results[f"req-{i}"].shape == expected.shape == (len(x), 10)
        assert np.allclose(results[f"req-{i}"], expected, rtol=1e-5, atol=1e-5)


def test_a_bad_request_in_the_middle_fails_alone(served):
    """Request 5 names its input wrongly: its answer is an error, and the requests after it succeed."""
    _, address = served
    images = _images(10, seed=1)
    results, errors = _stream(address, [("m", "wrong" if i == 5 else "pixels", x, f"r{i}")
                                        for i, x in enumerate(images)])
    assert len(errors) == 1 and errors[0].startswith("INVALID_ARGUMENT: ") and "'wrong'" in errors[0], errors
    assert sorted(results) == sorted(f"r{i}" for i in range(10) if i != 5)


def test_an_unknown_model_is_an_error_in_the_stream(served):
    _, address = served
    x = _images(1, seed=2)[0]
    results, errors = _stream(address, [("nope", "pixels", x, "a"), ("m", "pixels", x, "b")])
    assert len(errors) == 1 and errors[0].startswith("NOT_FOUND: unknown model 'nope'"), errors
    assert list(results) == ["b"]


def _raw_request(model: str, request_id: str, input_name: str = "pixels", rows: int = 1) -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=input_name, datatype="UINT8", shape=[rows, 784])
    request.raw_input_contents.append(bytes(784 * rows))
    return request.SerializeToString()


def _open_stream(channel, messages):
    from tritonclient.grpc import service_pb2

    call = channel.stream_stream(STREAM, request_serializer=lambda b: b,
                                 response_deserializer=service_pb2.ModelStreamInferResponse.FromString)
    return call(messages, timeout=CLIENT_DEADLINE) if messages is not None else call(timeout=CLIENT_DEADLINE)


def test_error_answers_carry_the_request_id_and_the_status_name(served):
    """Over the wire (tritonclient drops an error's id): each answer's infer_response.id is its request's."""
    _, address = served
    sent = [_raw_request("m", "bad", input_name="wrong"), _raw_request("other", "lost"), b"\xff\xff not protobuf",
            _raw_request("m", "good")]

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            call = _open_stream(channel, iter(sent))
            answers = [answer async for answer in call]
            return answers, await call.code()

    answers, code = asyncio.run(main())
    assert code == grpc.StatusCode.OK and len(answers) == 4
    by_id = {a.infer_response.id: a for a in answers}
    assert by_id["bad"].error_message.startswith("INVALID_ARGUMENT: ")
    assert by_id["lost"].error_message.startswith("NOT_FOUND: ")
    assert by_id[""].error_message.startswith("INVALID_ARGUMENT: the request is not a valid protobuf message")
    good = by_id["good"]
    assert good.error_message == "" and good.infer_response.model_name == "m"
    assert list(good.infer_response.outputs[0].shape) == [1, 10]


def _grpc_requests(metrics: str, code: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(metrics) for s in f.samples
               if s.name == "resnet_edge_requests_total" and s.labels.get("protocol") == "grpc"
               and s.labels.get("code") == code)


def test_streamed_requests_count_in_statistics_and_metrics_as_grpc(served):
    """12 answered, 1 bad input (counted as a failure, 400), 1 unknown model (counted by no model)."""
    url, address = served

    def now():
        stats = httpx.get(f"{url}/v2/models/m/stats").json()["model_stats"][0]["inference_stats"]
        metrics = httpx.get(f"{url}/metrics").text
        return (stats["success"]["count"], stats["fail"]["count"],
                _grpc_requests(metrics, "200"), _grpc_requests(metrics, "400"))

    before = now()
    images = _images(12, seed=3)
    requests = [("m", "pixels", x, f"s{i}") for i, x in enumerate(images)]
    requests[4:4] = [("m", "wrong", images[0], "bad")]
    requests[9:9] = [("nope", "pixels", images[0], "unknown")]
    results, errors = _stream(address, requests)
    assert len(results) == 12 and len(errors) == 2
    after = now()
    assert [a - b for a, b in zip(after, before, strict=True)] == [12, 1, 12, 1]


# In-process: a GrpcServer's StreamInfer over a fake call, so that what the stream reads can be counted
# exactly while the batcher holds every request.


class _Call:
    """A ModelStreamInfer call as the handler sees it: messages read from a queue, answers written to a list."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue = asyncio.Queue()
        self.reads = 0
        self.answers: list = []

    async def read(self):
        message = await self.incoming.get()
        self.reads += 1
        return message

    async def write(self, response) -> None:
        from resnet_edge.serving.proto import messages

        self.answers.append(messages()["ModelStreamInferResponse"].FromString(response.SerializeToString()))

    async def abort(self, code, details):
        raise AssertionError(f"aborted: {code} {details}")


class _HeldBatcher:
    """Answers each request's rows (its first 10 pixels as logits) once ``go`` is set."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.waiting = 0

    async def infer(self, pixels: np.ndarray) -> np.ndarray:
        self.waiting += 1
        try:
            await self.go.wait()
        finally:
            self.waiting -= 1
        return pixels.reshape(len(pixels), -1)[:, :10].astype(np.float32)


def _state(**config):
    """A ServerState serving "m" whose batcher is a _HeldBatcher."""
    from resnet_edge.core.config import ServerConfig
    from resnet_edge.serving.state import ServerState

    from resnet_edge.serving.models import READY, ServedModel

    state = ServerState(ServerConfig(model_path="m.onnx", model_name="m", **config))
    model = ServedModel("m", "1", None)
    model.batcher, model.state, model.recorder = _HeldBatcher(), READY, state.models.recorder("m", "1")
    state.models.add(model)
    state.batcher, state.started = model.batcher, True
    return state


def _streams(**config):
    from resnet_edge.serving.grpc_stream import StreamInfer

    state = _state(**config)
    return state, StreamInfer(SimpleNamespace(state=state, config=state.config, model_name="m"))


def test_a_stream_reads_at_most_max_in_flight_requests_ahead_of_its_answers():
    """20 messages waiting to be read, the batcher holding every request: the stream reads MAX_IN_FLIGHT
    of them and no more until answers go out; then all 20 are answered, each with its id."""
    from resnet_edge.serving.grpc_stream import MAX_IN_FLIGHT

    async def main():
        state, streams = _streams()
        call = _Call()
        for i in range(20):
            call.incoming.put_nowait(_raw_request("m", f"q{i}"))
        call.incoming.put_nowait(grpc.aio.EOF)
        handler = asyncio.ensure_future(streams.handle(None, call))
        await until(lambda: state.batcher.waiting >= MAX_IN_FLIGHT, f"{MAX_IN_FLIGHT} requests in the batcher")
        for _ in range(50):  # every task that can run runs: a reader without bound would read on
            await asyncio.sleep(0)
        held = (call.reads, state.batcher.waiting, len(call.answers), state.pending_bytes)
        state.batcher.go.set()
        await asyncio.wait_for(handler, CLIENT_DEADLINE)
        state.pool.shutdown()
        return held, call.answers, state.pending_bytes, streams.open

    held, answers, pending, still_open = asyncio.run(main())
    size = len(_raw_request("m", "q0"))
    assert held == (MAX_IN_FLIGHT, MAX_IN_FLIGHT, 0, MAX_IN_FLIGHT * size)
    assert sorted(a.infer_response.id for a in answers) == sorted(f"q{i}" for i in range(20))
    assert all(a.error_message == "" for a in answers) and pending == 0 and still_open == 0


def test_streamed_messages_share_the_byte_budget_and_a_full_budget_fails_one_request():
    """--max-pending-bytes full (HTTP bodies in flight): the streamed request is RESOURCE_EXHAUSTED in its
    answer; once the bytes are given back the next one on the same stream is answered."""
    async def main():
        state, streams = _streams(max_body_bytes=4096, max_pending_bytes=4096)
        state.batcher.go.set()
        call = _Call()
        handler = asyncio.ensure_future(streams.handle(None, call))
        state.take_bytes(4096 - 100)  # someone else's bytes in flight
        call.incoming.put_nowait(_raw_request("m", "full"))
        await until(lambda: len(call.answers) == 1, "the first answer")
        state.give_bytes(4096 - 100)
        call.incoming.put_nowait(_raw_request("m", "room"))
        await until(lambda: len(call.answers) == 2, "the second answer")
        call.incoming.put_nowait(grpc.aio.EOF)
        await asyncio.wait_for(handler, CLIENT_DEADLINE)
        state.pool.shutdown()
        return call.answers, state.pending_bytes

    (full, room), pending = asyncio.run(main())
    assert full.error_message.startswith("RESOURCE_EXHAUSTED: server busy") and full.infer_response.id == ""
    assert room.error_message == "" and room.infer_response.id == "room" and pending == 0


def test_a_stream_cancelled_by_its_client_gives_back_its_bytes_and_its_place():
    """Over real gRPC (an in-process GrpcServer): 12 requests sent, 8 held in the batcher, then the client
    cancels: the requests read are dropped, their bytes given back and the stream no longer counted."""
    import socket

    from resnet_edge.serving import grpc_front

    async def main():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        state = _state(grpc_port=port)
        server = grpc_front.GrpcServer(state)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = _open_stream(channel, None)
                for i in range(12):
                    await call.write(_raw_request("m", f"c{i}"))
                await until(lambda: state.batcher.waiting == 8, "8 requests held in the batcher")
                held = (state.pending_bytes > 0, server.streams.open)
                call.cancel()
                await until(lambda: server.streams.open == 0 and state.batcher.waiting == 0, "the stream's end")
                return held, state.pending_bytes
        finally:
            await server.stop()
            state.pool.shutdown()

    held, pending = asyncio.run(main())
    assert held == (True, 1) and pending == 0


# A server of its own: --max-body-bytes 100000 and --max-pending-bytes 300000 allow 3 streams at once;
# --client-timeout 0.5 s.


@pytest.fixture
def small(linear):
    grpc_port = free_port()
    proc, _ = start_server("--model", linear, "--model-name", "m", "--grpc-port", grpc_port, "--max-body-bytes",
                           100_000, "--max-pending-bytes", 300_000, "--client-timeout", 0.5)
    yield proc, f"127.0.0.1:{grpc_port}"
    if proc.poll() is None:
        proc.kill()
        proc.wait(30)


class _Client:
    """One raw stream whose messages the test sends one at a time."""

    def __init__(self, channel) -> None:
        self.call = _open_stream(channel, None)

    async def ask(self, request_id: str):
        await self.call.write(_raw_request("m", request_id))
        return await self.call.read()


def test_streams_past_the_limit_are_refused_and_one_that_ended_frees_its_place(small):
    _, address = small

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            clients = [_Client(channel) for _ in range(3)]
            first = [(await c.ask(f"c{i}")).infer_response.id for i, c in enumerate(clients)]  # all 3 handled
            extra = _Client(channel)
            try:
                await extra.ask("extra")
            except grpc.aio.AioRpcError:
                pass  # the write may fail first (a client-side INTERNAL when the call has already ended)
            # the call's own status: what the server ended it with
            refused = ((await asyncio.wait_for(extra.call.code(), 10)).name, await extra.call.details())
            await clients[0].call.done_writing()
            ended = await clients[0].call.code()  # its handler has returned: its place is free
            again = await _Client(channel).ask("again")
            return first, refused, ended, again

    first, refused, ended, again = asyncio.run(main())
    assert first == ["c0", "c1", "c2"]
    assert refused[0] == "RESOURCE_EXHAUSTED" and "3 gRPC streams open (limit 3" in refused[1], refused
    assert ended == grpc.StatusCode.OK and again.infer_response.id == "again" and again.error_message == ""


def test_a_silent_stream_outlives_the_client_timeout_and_shutdown_ends_it_cleanly(small):
    """Silent between two requests for longer than --client-timeout (a stalled unary call is answered
    DEADLINE_EXCEEDED meanwhile), the stream still serves; SIGTERM then ends it with OK, and the server
    exits 0 without waiting for the stream's client."""
    proc, address = small

    async def main():
        async with grpc.aio.insecure_channel(address) as channel:
            client = _Client(channel)
            first = (await client.ask("before")).infer_response.id
            stalled = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer",
                                           request_serializer=lambda b: b, response_deserializer=lambda b: b)
            forever = asyncio.Event()

            async def no_message():
                await forever.wait()
                yield b""

            try:
                await stalled(no_message(), timeout=CLIENT_DEADLINE)
                timed_out = "OK"
            except grpc.aio.AioRpcError as exc:
                timed_out = exc.code().name
            second = (await client.ask("after")).infer_response.id
            proc.send_signal(signal.SIGTERM)
            end = await client.call.read()  # no further answer: the stream ends
            return first, timed_out, second, end, await client.call.code()

    first, timed_out, second, end, code = asyncio.run(main())
    assert (first, timed_out, second) == ("before", "DEADLINE_EXCEEDED", "after")
    assert end is grpc.aio.EOF and code == grpc.StatusCode.OK
    assert proc.wait(30) == 0
