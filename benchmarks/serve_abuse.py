"""What issue 9's reproducers do to a running `resnet-edge serve`, measured: each class of bad request
sent by --clients concurrent keep-alive clients (raw asyncio streams, in a child process) for --seconds,
while this process polls /v2/health/ready every 50 ms. Reports per class the statuses, the p99 and
slowest answer, whether health stayed 200 (and its slowest answer), and the server's peak RSS
(sampled every 0.2 s). The issue's bar: every class answers 4xx
or 503 within 1 s, ready stays 200, RSS under 300 MB during the image-bomb flood.

Issue 25's classes: a multipart /v1/predict body of 1,000 fields and 1,000 files, and two on --grpc-port
(grpc.aio clients in the child): invalid 8 MiB ModelInfer messages, and ModelInfer calls that send their
headers and never their message (each client opens one, waits for the server's answer, opens the next).
For the gRPC classes this process also calls gRPC ServerLive every 50 ms ("grpc_live"); the stalled
class reports the calls still open when the clock stopped. --only SUBSTRING (repeatable) picks classes.

    python benchmarks/serve_abuse.py --model exported/resnet8/model.int8.onnx --clients 32 --seconds 10 \
        --out benchmarks/results/cpu/serve_abuse.json
    python benchmarks/serve_abuse.py --model exported/resnet8/model.int8.onnx --seconds 3 --only gRPC --only multipart
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import read_response  # noqa: E402
from serve_soak import start_server  # noqa: E402

from resnet_edge.core.machine import machine  # noqa: E402


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _after_idat(kind: bytes, payload: bytes) -> bytes:
    png = _png(Image.new("L", (28, 28)))
    at = png.rindex(b"IEND") - 4
    return png[:at] + struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload)) + png[at:]


def _tensor(data, **extra) -> bytes:
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": data}], **extra}).encode()


GRPC, STALLED = "grpc:", "grpc-stalled:"  # routes of the gRPC classes: the method after the colon
INVALID_MB = 8  # the invalid ModelInfer messages: 8 MiB (the default --max-body-bytes) of bytes for one image


def _multipart() -> tuple[bytes, dict[str, str]]:
    """1,000 tiny form fields and 1,000 tiny files (issue 25's reproducer): body and its Content-Type."""
    boundary = "a" * 70
    body = b"".join(b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nv\r\n' % k
                    for k in range(1000))
    body += b"".join(b"--" + boundary.encode() + b'\r\nContent-Disposition: form-data; name="g%d"; filename="x"\r\n\r\nv\r\n' % k
                     for k in range(1000))
    body += b"--" + boundary.encode() + b"--\r\n"
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def _invalid_model_infer() -> bytes:
    """A ModelInfer message of INVALID_MB MiB whose shape says one image: INVALID_ARGUMENT, once parsed."""
    from resnet_edge.serving.proto import messages

    request = messages()["ModelInferRequest"](model_name="m")
    request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 784])
    request.raw_input_contents.append(b"\0" * (INVALID_MB * 2**20 - 200))
    return request.SerializeToString()


def classes() -> dict[str, tuple[Any, ...]]:
    """Class name -> (route, body[, extra headers]). Built once, before the clock."""
    big = Image.new("L", (4096, 4096))
    big.paste(255, (1500, 500, 2500, 3500))
    return {
        "image bomb 81 Mpx (1-bit PNG)": ("/v1/predict", _png(Image.new("1", (9000, 9000)))),
        "image 16 Mpx RGBA (64 MiB decoded)": ("/v1/predict", _png(Image.new("RGBA", (4096, 4096)))),
        "image 16 Mpx gray (accepted, reduced)": ("/v1/predict", _png(big)),
        "PNG bad zTXt after IDAT": ("/v1/predict", _after_idat(b"zTXt", b"key\x00\x01abc")),
        "PNG bad fcTL after IDAT": ("/v1/predict", _after_idat(b"fcTL", struct.pack(">IIIIIHHBB", 0, 1000, 1000, 0, 0, 1, 1, 0, 0))),
        "JSON nested 100,000 deep": ("/v2/models/m/infer", b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
        "integer of 400 digits": ("/v2/models/m/infer", _tensor([1] * 783 + [int("9" * 400)])),
        "integer of 5,000 digits": ("/v2/models/m/infer", b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 784], "data": ['
                                    + b"9" * 5000 + b"]}]}"),
        "outputs[].name a list": ("/v2/models/m/infer", _tensor([0.5] * 784, outputs=[{"name": ["logits"]}])),
        "strings in data": ("/v2/models/m/infer", _tensor(["0.5"] * 784)),
        "JSON body of 7.9 MB, wrong count": ("/v2/models/m/infer", _tensor([0.5] * 1_600_000)),
        "multipart 1,000 fields + 1,000 files": ("/v1/predict", *_multipart()),
        f"gRPC invalid {INVALID_MB} MiB ModelInfer": (GRPC + "ModelInfer", _invalid_model_infer()),
        "gRPC stalled ModelInfer (no message)": (STALLED + "ModelInfer", b""),
    }


async def _client(port: int, request: bytes, stop: float, statuses: Counter, times: list[float]) -> None:
    """One keep-alive client on a raw asyncio stream (a light client: the flood measures the server, not
    an HTTP library); reconnects when the server closes the connection."""
    reader = writer = None
    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            await writer.drain()
            status, fields = await read_response(reader)
            statuses[status] += 1
            if fields.get(b"connection", b"").lower() == b"close":
                writer.close()
                writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            statuses[type(exc).__name__] += 1
            if writer is not None:
                writer.close()
            writer = None
        times.append(time.perf_counter() - t0)
    if writer is not None:
        writer.close()


async def _grpc_client(channel: Any, route: str, body: bytes, stop: float, statuses: Counter, times: list[float],
                       still_open: list[int]) -> None:
    """One gRPC client on the shared channel: sends ``body`` to the method, or (STALLED) opens a call that
    never sends its message and waits for the server's answer, again and again until ``stop``."""
    import grpc

    method = route.split(":", 1)[1]
    forever = asyncio.Event()

    async def no_message():
        await forever.wait()
        yield b""

    async def outcome(call: Any) -> str:
        try:
            await call
            return "OK"
        except grpc.aio.AioRpcError as exc:
            return exc.code().name
        except asyncio.CancelledError:  # call.cancel() below: grpc.aio raises this from the call
            return "CANCELLED"

    while time.perf_counter() < stop:
        t0 = time.perf_counter()
        if route.startswith(STALLED):
            call = channel.stream_unary(f"/inference.GRPCInferenceService/{method}", request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)(no_message(), timeout=120)
        else:
            call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}", request_serializer=lambda b: b,
                                       response_deserializer=lambda b: b)(body, timeout=120)
        answer = asyncio.ensure_future(outcome(call))
        done, _ = await asyncio.wait({answer}, timeout=max(0.0, stop - time.perf_counter()))
        if not done:  # the clock stopped first
            call.cancel()
            await answer
            still_open[0] += 1
            return
        statuses[answer.result()] += 1
        times.append(time.perf_counter() - t0)


def _flood_process(port: int, route: str, body: bytes, headers: dict[str, str], clients: int, seconds: float, out: Any) -> None:
    async def run() -> dict:
        statuses: Counter = Counter()
        times: list[float] = []
        still_open = [0]
        stop = time.perf_counter() + seconds
        if route.startswith((GRPC, STALLED)):
            import grpc

            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
                await asyncio.gather(*(_grpc_client(channel, route, body, stop, statuses, times, still_open) for _ in range(clients)))
        else:
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            request = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Content-Length: {len(body)}\r\n\r\n").encode() + body
            await asyncio.gather(*(_client(port, request, stop, statuses, times) for _ in range(clients)))
        times.sort()
        result = {"statuses": {str(k): v for k, v in statuses.items()}, "slowest_s": times[-1] if times else None,
                  "p99_s": times[int(0.99 * (len(times) - 1))] if times else None}
        if route.startswith(STALLED):
            result["still_open_at_stop"] = still_open[0]
        return result

    out.put(asyncio.run(run()))


def _grpc_live(call: Any, live: Counter) -> float:
    """One gRPC ServerLive: its status counted, its time returned."""
    import grpc

    t0 = time.perf_counter()
    try:
        call(b"", timeout=10)
        live["OK"] += 1
    except grpc.RpcError as exc:
        live[exc.code().name] += 1
    return time.perf_counter() - t0


def flood(port: int, route: str, body: bytes, clients: int, seconds: float, headers: dict[str, str] | None = None,
          grpc_port: int = 0) -> dict:
    """``clients`` raw clients (in a child process) send ``body`` to ``route`` for ``seconds``, while this
    process polls /v2/health/ready every 50 ms (so neither's own CPU time counts in the other's latency);
    for a gRPC class (route GRPC... or STALLED...: to ``grpc_port``) also gRPC ServerLive."""
    import multiprocessing
    import urllib.error
    import urllib.request

    is_grpc = route.startswith((GRPC, STALLED))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_flood_process, args=(grpc_port if is_grpc else port, route, body, headers or {}, clients, seconds, out))
    child.start()
    health: Counter = Counter()
    live: Counter = Counter()
    slowest = live_slowest = 0.0
    channel = live_call = None
    if is_grpc:
        import grpc

        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        live_call = channel.unary_unary("/inference.GRPCInferenceService/ServerLive", request_serializer=lambda b: b,
                                        response_deserializer=lambda b: b)
    stop = time.perf_counter() + seconds + 1.0  # the child's start-up included
    while time.perf_counter() < stop:
        if live_call is not None:
            live_slowest = max(live_slowest, _grpc_live(live_call, live))
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=10) as r:
                health[r.status] += 1
        except urllib.error.HTTPError as exc:
            health[exc.code] += 1
        except OSError as exc:
            health[type(exc).__name__] += 1
        slowest = max(slowest, time.perf_counter() - t0)
        time.sleep(0.05)
    result = out.get(timeout=120)
    child.join(timeout=30)
    if channel is not None:
        channel.close()
        result.update(grpc_live={str(k): v for k, v in live.items()}, grpc_live_slowest_s=live_slowest)
    return {**result, "health": {str(k): v for k, v in health.items()}, "health_slowest_s": slowest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                    help="only the classes whose name contains this (case-insensitive; repeatable)")
    args = ap.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 120:
        raise SystemExit("--clients 1-256, --seconds up to 120")
    chosen = {name: c for name, c in classes().items() if not args.only or any(o.lower() in name.lower() for o in args.only)}
    if not chosen:
        raise SystemExit(f"--only matches no class of: {', '.join(classes())}")
    server, port, grpc_port = start_server(args.model, [])
    results = {}
    try:
        process = psutil.Process(server.pid)
        for name, (route, body, *headers) in chosen.items():
            peak, done = [process.memory_info().rss], threading.Event()

            def sample() -> None:
                while not done.wait(0.2):
                    peak.append(process.memory_info().rss)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            r = flood(port, route, body, args.clients, args.seconds, *headers, grpc_port=grpc_port)
            done.set()
            sampler.join()
            r["rss_peak_mb"] = max(peak) / 2**20
            results[name] = r
            grpc_part = (f"  gRPC ServerLive {r['grpc_live']} (slowest {r['grpc_live_slowest_s']:.2f} s)" if "grpc_live" in r else "")
            stalled = f"  still open at stop {r['still_open_at_stop']}" if "still_open_at_stop" in r else ""
            times = (f"p99 {r['p99_s']:.2f} s  slowest {r['slowest_s']:.2f} s" if r["p99_s"] is not None else "no answers")
            print(f"{name:40s} {r['statuses']}{stalled}  {times}  ready {r['health']} "
                  f"(slowest {r['health_slowest_s']:.2f} s){grpc_part}  RSS peak {r['rss_peak_mb']:.0f} MB", flush=True)
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=60)
    print(f"server alive after all classes: {alive}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"model": str(args.model), "clients": args.clients, "seconds": args.seconds,
                                        "results": results, "server_alive": alive, "machine": machine(gpu=False)},
                                       indent=2) + "\n")


if __name__ == "__main__":
    main()
