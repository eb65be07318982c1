"""Load test of `resnet-edge serve` on loopback: N concurrent clients for T seconds, single-image requests.

For each setting (dynamic batching on: --max-batch-size 64; off: --max-batch-size 1) it starts the
server on a free 127.0.0.1 port, runs N keep-alive clients that each send one KServe v2 JSON request
(one MNIST test image, a different one each time) and wait for the answer, then stops the server.
Reports requests/s, p50/p90/p99 latency and errors. Clients and server share the machine, as on an
edge box. Both N (<= 256) and T (<= 120 s) are bounded; nothing leaves 127.0.0.1.

    python benchmarks/serve_load.py --model exported/resnet8/model.int8.onnx --clients 32 --seconds 10
    python benchmarks/serve_load.py --model run/model.fp16.onnx --provider cuda --clients 1,32,128   # GPU check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from resnet_edge.data import load_test_split
from resnet_edge.machine import machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_requests(name: str, port: int, count: int = 256) -> list[bytes]:
    images, _ = load_test_split()
    reqs = []
    for i in range(count):
        body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784],
                                       "data": np.round(images[i].reshape(-1) * 255).astype(int).tolist()}]}).encode()
        head = (f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        reqs.append(head + body)
    return reqs


async def client(port: int, requests: list[bytes], offset: int, stop_at: float, latencies: list[float],
                 errors: list[str]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    i = offset
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            if status == 200:
                latencies.append(time.perf_counter() - t0)
            else:
                errors.append(str(status))
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(type(exc).__name__)
    finally:
        writer.close()


async def load(port: int, name: str, clients: int, seconds: float) -> dict:
    requests = build_requests(name, port)
    latencies: list[float] = []
    errors: list[str] = []
    # One short warm-up so the first requests do not pay for lazy initialization.
    await asyncio.gather(*(client(port, requests, k, time.perf_counter() + 1.0, [], []) for k in range(clients)))
    t0 = time.perf_counter()
    await asyncio.gather(*(client(port, requests, k * 7, t0 + seconds, latencies, errors) for k in range(clients)))
    elapsed = time.perf_counter() - t0
    ms = np.array(latencies) * 1e3
    return {"requests": len(latencies), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "seconds": elapsed, "requests_per_second": len(latencies) / elapsed,
            "p50_ms": float(np.percentile(ms, 50)) if len(ms) else None,
            "p90_ms": float(np.percentile(ms, 90)) if len(ms) else None,
            "p99_ms": float(np.percentile(ms, 99)) if len(ms) else None}


def run_setting(model: Path, max_batch_size: int, max_delay_ms: float, clients: int, seconds: float, threads: int | None,
                provider: str = "cpu") -> dict:
    port = free_port()
    cmd = [sys.executable, "-m", "resnet_edge", "serve", "--model", str(model), "--port", str(port),
           "--model-name", "m", "--max-batch-size", str(max_batch_size), "--max-delay-ms", str(max_delay_ms),
           "--provider", provider]
    if threads:
        cmd += ["--threads", str(threads)]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while True:
            if server.poll() is not None:
                raise SystemExit(f"server exited: {server.stderr.read()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("server did not start")
                time.sleep(0.2)
        result = asyncio.run(load(port, "m", clients, seconds))
    finally:
        server.terminate()
        server.wait(timeout=30)
    return {"max_batch_size": max_batch_size, "max_delay_ms": max_delay_ms, **result}


def _measure(args: argparse.Namespace, clients: int) -> dict:
    settings = {"batching": args.max_batch_size, "no batching": 1}
    runs: dict[str, list[dict]] = {k: [] for k in settings}
    for _ in range(args.repeats):
        for label, mbs in settings.items():
            r = run_setting(args.model, mbs, args.max_delay_ms, clients, args.seconds, args.threads, args.provider)
            runs[label].append(r)
            print(f"{clients:4d} clients  {label:12s} {r['requests_per_second']:8,.0f} req/s  p50 {r['p50_ms']:.1f} ms  "
                  f"p99 {r['p99_ms']:.1f} ms  errors {r['errors']}", flush=True)
    summary = {}
    for label, rs in runs.items():
        summary[label] = {k: statistics.median(r[k] for r in rs) for k in ("requests_per_second", "p50_ms", "p99_ms")}
        summary[label]["errors"] = sum(r["errors"] for r in rs)
    ratio = summary["batching"]["requests_per_second"] / summary["no batching"]["requests_per_second"]
    print(f"{clients:4d} clients  dynamic batching: {ratio:.2f}x the throughput of --max-batch-size 1")
    return {"runs": runs, "median": summary, "batching_throughput_ratio": ratio}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--clients", default="32", help="concurrent clients; a comma-separated list measures each")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting; medians are reported")
    ap.add_argument("--max-batch-size", type=int, default=64, help="of the batching setting (the other is 1)")
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--provider", default="cpu", help="serve --provider (cuda: ONNX Runtime's CUDA provider)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    concurrency = [int(c) for c in str(args.clients).split(",")]
    if not all(1 <= c <= 256 for c in concurrency) or not 0 < args.seconds <= 120:
        raise SystemExit("--clients must be 1-256 and --seconds at most 120")
    by_clients = {c: _measure(args, c) for c in concurrency}
    out = {"model": str(args.model), "provider": args.provider, "clients": concurrency, "seconds": args.seconds,
           "repeats": args.repeats, "machine": machine(gpu=args.provider != "cpu"), "by_clients": by_clients}
    if len(concurrency) == 1:  # the single-setting layout of earlier results
        out.update(by_clients[concurrency[0]], clients=concurrency[0])
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
