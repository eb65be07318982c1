"""gRPC under --client-timeout and --max-pending-bytes (issue 25, defects #4 and #5): a message that never
comes is answered within --client-timeout and frees its slot, health RPCs answer whatever ModelInfer
calls are stalled, unary clients are still served by the request-streaming handlers, and a failed
ModelInfer is freed by reference counting alone (no reference cycle keeps its megabytes)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest

from helpers import free_port, start_server
from test_serve_hardening import linear_model

TIMEOUT = 0.5  # --client-timeout of the server below
CLIENT_DEADLINE = 5  # the clients' own deadline: far beyond TIMEOUT


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """--max-body-bytes 100000, --max-pending-bytes 300000: three messages' worth, one receive slot."""
    model = linear_model(tmp_path_factory.mktemp("models") / "linear.onnx")
    grpc_port = free_port()
    proc, url = start_server("--model", model, "--model-name", "m", "--grpc-port", grpc_port, "--max-body-bytes", 100_000,
                             "--max-pending-bytes", 300_000, "--client-timeout", TIMEOUT)
    yield f"127.0.0.1:{grpc_port}"
    proc.terminate()
    assert proc.wait(timeout=30) == 0


def _infer_request(request_id: str = "") -> bytes:
    from tritonclient.grpc import service_pb2

    request = service_pb2.ModelInferRequest(model_name="m", id=request_id)
    request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 784])
    request.raw_input_contents.append(bytes(784))
    return request.SerializeToString()


def _stalled(channel, method: str):
    """A call that sends its headers and never its message (what a unary client looks like that stops)."""
    forever = asyncio.Event()

    async def no_message():
        await forever.wait()
        yield b""

    call = channel.stream_unary(f"/inference.GRPCInferenceService/{method}", request_serializer=lambda b: b,
                                response_deserializer=lambda b: b)
    return call(no_message(), timeout=CLIENT_DEADLINE)


async def _status(call) -> tuple[str, str]:
    import grpc

    try:
        await call
        return "OK", ""
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, exc.details()


@pytest.mark.parametrize("method", ["ModelInfer", "ServerLive"])
def test_a_message_that_never_comes_is_answered_after_the_client_timeout(server, method):
    import grpc

    async def main():
        async with grpc.aio.insecure_channel(server) as channel:
            return await _status(_stalled(channel, method))

    code, details = asyncio.run(main())
    # the server's answer, not the client's own deadline ("Deadline Exceeded", after 5 s)
    assert code == "DEADLINE_EXCEEDED" and f"--client-timeout ({TIMEOUT:g} s)" in details, (code, details)


def test_health_rpcs_answer_while_stalled_model_infer_calls_hold_the_slots(server):
    """Five stalled ModelInfer calls (more than the old limit of three RPCs at once, all RPCs counted):
    every health and metadata RPC still answers, each stalled call is answered by the server (no slot
    within --client-timeout, or no message), and then ModelInfer serves again."""
    import grpc
    from tritonclient.grpc import service_pb2

    async def main():
        async with grpc.aio.insecure_channel(server) as channel:
            stalled = [_stalled(channel, "ModelInfer") for _ in range(5)]
            for call in stalled:
                await call.wait_for_connection()  # their headers went first, on the same connection
            health = {}
            for method, request in (("ServerLive", service_pb2.ServerLiveRequest()),
                                    ("ServerReady", service_pb2.ServerReadyRequest()),
                                    ("ModelReady", service_pb2.ModelReadyRequest(name="m")),
                                    ("ServerMetadata", service_pb2.ServerMetadataRequest()),
                                    ("ModelMetadata", service_pb2.ModelMetadataRequest(name="m"))):
                call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}",
                                           request_serializer=lambda m: m.SerializeToString(), response_deserializer=lambda b: b)
                health[method] = await _status(call(request, timeout=CLIENT_DEADLINE))
            answers = [await _status(call) for call in stalled]
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                                        response_deserializer=service_pb2.ModelInferResponse.FromString)
            response = await infer(_infer_request("after"), timeout=CLIENT_DEADLINE)
            return health, answers, response

    health, answers, response = asyncio.run(main())
    assert all(status == ("OK", "") for status in health.values()), health
    for code, details in answers:
        assert (code, "server busy") == ("RESOURCE_EXHAUSTED", details[:11]) or (
            code == "DEADLINE_EXCEEDED" and "--client-timeout" in details), answers
    assert response.id == "after" and list(response.outputs[0].shape) == [1, 10]


def test_a_call_that_ends_early_gives_its_receive_slot_back_at_once(tmp_path):
    """Stalled ModelInfer calls that the client cancels, or whose own deadline passes, free their slot
    then, not after --client-timeout (60 s here): the next ModelInfer is served within its 10 s deadline."""
    import grpc
    from tritonclient.grpc import service_pb2

    model = linear_model(tmp_path / "linear.onnx")
    grpc_port = free_port()
    proc, _ = start_server("--model", model, "--model-name", "m", "--grpc-port", grpc_port, "--max-body-bytes", 100_000,
                           "--max-pending-bytes", 300_000, "--client-timeout", 60)

    async def main():
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stalled = [_stalled(channel, "ModelInfer") for _ in range(3)]
            short = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                                         response_deserializer=lambda b: b)
            forever = asyncio.Event()

            async def no_message():
                await forever.wait()
                yield b""

            expiring = [short(no_message(), timeout=0.3) for _ in range(3)]
            for call in stalled + expiring:
                await call.wait_for_connection()
            for call in stalled:
                call.cancel()
            codes = [(await _status(call))[0] for call in expiring]
            infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b,
                                        response_deserializer=service_pb2.ModelInferResponse.FromString)
            return codes, await _status(infer(_infer_request(), timeout=10))

    try:
        codes, after = asyncio.run(main())
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
    assert codes == ["DEADLINE_EXCEEDED"] * 3 and after == ("OK", ""), (codes, after)


def test_unary_clients_are_served_by_the_streaming_handlers(server):
    import grpc
    import tritonclient.grpc as grpcclient
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    client = grpcclient.InferenceServerClient(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m")
    x = np.full((2, 784), 0.5, np.float32)
    inp = grpcclient.InferInput("pixels", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)  # raw_input_contents
    result = client.infer("m", [inp], request_id="r1")
    assert result.get_response().id == "r1" and result.as_numpy("logits").shape == (2, 10)
    typed = service_pb2.ModelInferRequest(model_name="m", id="r2")
    typed.inputs.add(name="pixels", datatype="UINT8", shape=[1, 784]).contents.uint_contents.extend([7] * 784)
    with grpc.insecure_channel(server) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelInfer(typed, timeout=CLIENT_DEADLINE)
        assert response.id == "r2" and np.allclose(np.frombuffer(response.raw_output_contents[0], "<f4"),
                                                   result.as_numpy("logits")[0] * 7 / 127.5, rtol=1e-3)
        with pytest.raises(grpc.RpcError) as info:  # a client stream that ends without a message
            channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")(iter(()), timeout=CLIENT_DEADLINE)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:  # over --max-body-bytes: refused by grpc before any copy
            stub.ModelInfer(service_pb2.ModelInferRequest(model_name="m", raw_input_contents=[bytes(200_000)]),
                            timeout=CLIENT_DEADLINE)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_receive_slots_stay_within_the_byte_budget():
    from resnet_edge.core.config import ServerConfig
    from resnet_edge.serving.grpc_front import COPIES, receive_slots

    for body, pending in ((8 * 2**20, 256 * 2**20), (100_000, 300_000), (2**20, 2**30)):
        config = ServerConfig(model_path="m.onnx", max_body_bytes=body, max_pending_bytes=pending)
        slots = receive_slots(config)
        assert slots >= 1 and (slots == 1 or slots * COPIES * body <= pending)


# The server in this process, with the cyclic GC off: after each failed ModelInfer nothing unreachable
# may hold the request (its bytes, the parsed message, its pixels), the bytes budget is whole again,
# and Python's allocations have not grown by the message.
_FREED = r"""
import asyncio, gc, json, socket, sys, tracemalloc
import grpc
import numpy as np
from google.protobuf.message import Message
from resnet_edge.core.config import ServerConfig
from resnet_edge.serving.proto import SERVICE, messages
from resnet_edge.serving.state import ServerState
from resnet_edge.serving.models import ServedModel
from resnet_edge.serving import grpc_front

SIZE = 4 * 2**20


def big(o):
    if isinstance(o, (bytes, bytearray, memoryview)):
        return len(o) >= SIZE // 2
    if isinstance(o, np.ndarray):
        return o.nbytes >= SIZE // 2
    return isinstance(o, Message) and o.ByteSize() >= SIZE // 2


def body(model, rows, values):
    request = messages()["ModelInferRequest"](model_name=model)
    request.inputs.add(name="pixels", datatype="UINT8", shape=[rows, 784])
    request.raw_input_contents.append(bytes(values))
    return request.SerializeToString()


async def main():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServerConfig(model_path="m.onnx", model_name="m", grpc_port=port, max_body_bytes=2 * SIZE,
                          max_pending_bytes=8 * SIZE, client_timeout=5)
    state = ServerState(config)
    state.models.add(ServedModel("m", "1", None))  # not loaded: a valid request is UNAVAILABLE once parsed
    server = grpc_front.GrpcServer(state)
    await server.start()
    rows = SIZE // 784
    cases = [("wrong size", body("m", 1, SIZE)), ("unknown model", body("x", rows, rows * 784)),
             ("not ready", body("m", 1000, 784_000)), ("budget full", body("m", rows, rows * 784))]
    results = {}
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = channel.unary_unary(f"/{SERVICE}/ModelInfer", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:  # the first call's one-off allocations before anything is measured
            await call(body("m", 1, 1), timeout=10)
        except grpc.aio.AioRpcError:
            pass
        gc.collect()
        gc.disable()
        tracemalloc.start()
        for name, data in cases:
            if name == "budget full":
                state.take_bytes(config.max_pending_bytes - 1000)  # HTTP bodies in flight
            before = tracemalloc.get_traced_memory()[0]
            try:
                await call(data, timeout=10)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            if name == "budget full":
                state.give_bytes(config.max_pending_bytes - 1000)
            grown = tracemalloc.get_traced_memory()[0] - before
            gc.set_debug(gc.DEBUG_SAVEALL)
            gc.collect()
            held = sorted({type(o).__name__ for o in gc.garbage for r in gc.get_referents(o)
                           if big(r) and not any(r is d for _, d in cases)})
            gc.set_debug(0)
            gc.garbage.clear()
            slots = [getattr(server, attribute, None) for attribute in ("infer_slots", "other_slots")]
            results[name] = {"code": code, "grown": grown, "held": held, "pending": state.pending_bytes,
                             "slots": [s._value if s is not None else None for s in slots],
                             "all_slots": grpc_front.receive_slots(config)}
        tracemalloc.stop()
        gc.enable()
    await server.stop()
    state.pool.shutdown()
    print(json.dumps(results))


asyncio.run(main())
"""


def test_a_failed_model_infer_is_freed_by_reference_counting_alone():
    out = subprocess.run([sys.executable, "-c", _FREED], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout.splitlines()[-1])
    codes = {name: r["code"] for name, r in results.items()}
    assert codes == {"wrong size": "INVALID_ARGUMENT", "unknown model": "NOT_FOUND", "not ready": "UNAVAILABLE",
                     "budget full": "RESOURCE_EXHAUSTED"}, codes
    for name, r in results.items():
        assert r["held"] == [], (name, r)  # no unreachable object (a frame, a traceback) holds the request
        assert r["grown"] < 2**20, (name, r)  # the 4 MiB message and its copies are gone without the GC
        assert r["pending"] == 0 and r["slots"] == [r["all_slots"]] * 2, (name, r)  # budget and receive slots given back
