"""What issue 9's reproducers do to a running `resnet-edge serve`, measured: each class of bad request
sent by --clients concurrent keep-alive clients (raw asyncio streams, in a child process) for --seconds,
while this process polls /v2/health/ready every 50 ms. Reports per class the statuses, the p99 and
slowest answer, whether health stayed 200 (and its slowest answer), and the server's peak RSS
(sampled every 0.2 s). The issue's bar: every class answers 4xx
or 503 within 1 s, ready stays 200, RSS under 300 MB during the image-bomb flood.

    python benchmarks/serve_abuse.py --model exported/resnet8/model.int8.onnx --clients 32 --seconds 10 \
        --out benchmarks/results/cpu/serve_abuse.json
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

from resnet_edge.machine import machine  # noqa: E402


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


def classes() -> dict[str, tuple[str, bytes]]:
    """Class name -> (route, body). Built once, before the clock."""
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


def _flood_process(port: int, route: str, body: bytes, clients: int, seconds: float, out: Any) -> None:
    async def run() -> dict:
        statuses: Counter = Counter()
        times: list[float] = []
        request = (f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        stop = time.perf_counter() + seconds
        await asyncio.gather(*(_client(port, request, stop, statuses, times) for _ in range(clients)))
        times.sort()
        return {"statuses": {str(k): v for k, v in statuses.items()}, "slowest_s": times[-1] if times else None,
                "p99_s": times[int(0.99 * (len(times) - 1))] if times else None}

    out.put(asyncio.run(run()))


def flood(port: int, route: str, body: bytes, clients: int, seconds: float) -> dict:
    """``clients`` raw clients (in a child process) send ``body`` to ``route`` for ``seconds``, while this
    process polls /v2/health/ready every 50 ms (so neither's own CPU time counts in the other's latency)."""
    import multiprocessing
    import urllib.error
    import urllib.request

    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_flood_process, args=(port, route, body, clients, seconds, out))
    child.start()
    health: Counter = Counter()
    slowest = 0.0
    stop = time.perf_counter() + seconds + 1.0  # the child's start-up included
    while time.perf_counter() < stop:
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
    return {**result, "health": {str(k): v for k, v in health.items()}, "health_slowest_s": slowest}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 120:
        raise SystemExit("--clients 1-256, --seconds up to 120")
    server, port, _ = start_server(args.model, [])
    results = {}
    try:
        process = psutil.Process(server.pid)
        for name, (route, body) in classes().items():
            peak, done = [process.memory_info().rss], threading.Event()

            def sample() -> None:
                while not done.wait(0.2):
                    peak.append(process.memory_info().rss)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            r = flood(port, route, body, args.clients, args.seconds)
            done.set()
            sampler.join()
            r["rss_peak_mb"] = max(peak) / 2**20
            results[name] = r
            print(f"{name:40s} {r['statuses']}  p99 {r['p99_s']:.2f} s  slowest {r['slowest_s']:.2f} s  ready {r['health']} "
                  f"(slowest {r['health_slowest_s']:.2f} s)  RSS peak {r['rss_peak_mb']:.0f} MB", flush=True)
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
