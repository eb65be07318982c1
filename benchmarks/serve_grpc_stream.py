"""req/s of one `resnet-edge serve` answering gRPC ModelStreamInfer, unary gRPC ModelInfer and JSON HTTP
with the same number of closed-loop clients (--clients, default 8), single MNIST images (resnet8-shaped
input, UINT8 [1, 784]) from serve_loadgen.py's request builders.

Cells:
- json: KServe v2 JSON over HTTP/1.1 keep-alive, one request at a time per client (serve_loadgen).
- grpc: unary ModelInfer, one call at a time per client (serve_loadgen).
- grpc-stream: one ModelStreamInfer stream per client, the next request written once the previous
  answer came back (as many requests in flight as the other cells).
- grpc-stream-window: one stream per client keeping --window requests in flight (what a stream is for;
  --window x --clients requests in flight, so not the same load as the others).
Every cell runs --repeats rounds, interleaved (round by round), so a change in the machine's speed hits
every cell alike; medians reported, with the server's CPU seconds per request. The CPU model (from
/proc/cpuinfo) names the result file. Run it on an otherwise idle machine (load average < 1.5).

    python benchmarks/serve_grpc_stream.py --model exported/resnet8/model.int8.onnx
    # -> benchmarks/results/cpu/serve_grpc_stream-<cpu>.json and .md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import (  # noqa: E402
    Tally,
    cpu_seconds,
    free_port,
    grpc_requests,
    launch,
    machine_line,
    run_load,
    save_report,
    stop,
    summarize,
    test_images,
)

from resnet_edge.core.machine import machine  # noqa: E402

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
CELLS = ("json", "grpc", "grpc-stream", "grpc-stream-window")


async def _stream_client(channel, requests: list[bytes], window: int, stop_at: float, tally: Tally) -> None:
    """One stream keeping ``window`` requests in flight until ``stop_at``; latency by request id."""
    from resnet_edge.serving.proto import messages

    call = channel.stream_stream(STREAM, request_serializer=lambda b: b,
                                 response_deserializer=messages()["ModelStreamInferResponse"].FromString)()
    sent: dict[str, float] = {}
    free = asyncio.Semaphore(window)

    async def write() -> None:
        i = 0
        while time.perf_counter() < stop_at:
            await free.acquire()
            request_id, message = requests[i % len(requests)]
            sent[request_id] = time.perf_counter()
            await call.write(message)
            i += 1
        await call.done_writing()

    async def read() -> None:
        async for answer in call:
            started = sent.pop(answer.infer_response.id, None)
            if answer.error_message or started is None:
                tally.errors.append(answer.error_message[:40] or "unknown id")
            else:
                tally.latencies.append(time.perf_counter() - started)
            free.release()

    await asyncio.gather(write(), read())


def _with_ids(requests: list[bytes], client: int) -> list[tuple[str, bytes]]:
    """Each message with a distinct id (field 3 of ModelInferRequest), unique over a client's cycle."""
    from resnet_edge.serving.proto import messages

    cls = messages()["ModelInferRequest"]
    out = []
    for k, raw in enumerate(requests):
        message = cls.FromString(raw)
        message.id = f"{client}-{k}"
        out.append((message.id, message.SerializeToString()))
    return out


async def stream_load(port: int, clients: int, window: int, seconds: float, server_pid: int,
                      warmup: float = 1.0) -> dict:
    """run_load's measurement over one ModelStreamInfer stream per client."""
    import grpc

    base = grpc_requests("m", test_images())
    per_client = [_with_ids(base[k * 7:] + base[:k * 7], k) for k in range(clients)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        warm = [_stream_client(channel, per_client[k], window, time.perf_counter() + warmup, Tally())
                for k in range(clients)]
        await asyncio.gather(*warm)
        tally = Tally()
        cpu0 = cpu_seconds(server_pid), time.process_time()
        t0 = time.perf_counter()
        await asyncio.gather(*(_stream_client(channel, per_client[k], window, t0 + seconds, tally)
                               for k in range(clients)))
        elapsed = time.perf_counter() - t0
        cpu1 = cpu_seconds(server_pid), time.process_time()
    out = summarize(tally, elapsed)
    out["server_cpu_s"], out["client_cpu_s"] = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return out


def one_cell(cell: str, args, http: int, grpc_port: int, pid: int) -> dict:
    if cell in ("json", "grpc"):
        return asyncio.run(run_load([cell], args.clients, args.seconds, "m", http, grpc_port, server_pid=pid))[cell]
    window = args.window if cell == "grpc-stream-window" else 1
    return asyncio.run(stream_load(grpc_port, args.clients, window, args.seconds, pid))


def cpu_slug(cpu: str | None) -> str:
    return re.sub(r"[^a-z0-9]+", "-", (cpu or "unknown-cpu").lower()).strip("-")


def markdown(report: dict) -> str:
    rows = ["| cell | req/s (median) | rounds | p50 ms | p99 ms | server CPU ms / request | errors |",
            "|---|---:|---|---:|---:|---:|---:|"]
    for cell, r in report["cells"].items():
        rows.append(f"| {cell} | {r['requests_per_second']:,.0f} | {', '.join(f'{x:,.0f}' for x in r['rounds'])} "
                    f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu_ms_per_request']:.3f} | {r['errors']} |")
    s = report["settings"]
    return (f"# serve: gRPC streaming vs unary vs JSON\n\nMachine: {machine_line(report['machine'])}; load average "
            f"before: {report['load_before']}.\nModel: {s['model']}; {s['clients']} clients, {s['seconds']} s a cell, "
            f"{s['repeats']} interleaved rounds, window {s['window']} for grpc-stream-window.\n\n"
            + "\n".join(rows) + "\n")


def summary(results: list[dict]) -> dict:
    """A cell's rounds -> medians (req/s, latency, server CPU per request), each round's req/s, errors."""

    def med(key: str) -> float:
        return statistics.median(x[key] for x in results if x[key] is not None)

    return {"requests_per_second": med("requests_per_second"), "rounds": [x["requests_per_second"] for x in results],
            "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "errors": sum(x["errors"] for x in results),
            "server_cpu_ms_per_request": statistics.median(1e3 * x["server_cpu_s"] / max(1, x["requests"])
                                                           for x in results)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("exported/resnet8/model.int8.onnx"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    args = p.parse_args()
    load_before = os.getloadavg()[0]
    http, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "resnet_edge", "serve", "--model", str(args.model), "--model-name", "m",
           "--port", str(http), "--grpc-port", str(grpc_port)]
    rounds: dict[str, list[dict]] = {c: [] for c in CELLS}
    with tempfile.TemporaryDirectory() as tmp:
        proc = launch(cmd, Path(tmp) / "serve.log", http)
        try:
            for r in range(args.repeats):
                for cell in CELLS:
                    result = one_cell(cell, args, http, grpc_port, proc.pid)
                    rounds[cell].append(result)
                    print(f"round {r + 1} {cell:20s} {result['requests_per_second']:8,.0f} req/s "
                          f"errors {result['errors']}", flush=True)
        finally:
            stop([proc])
    cells = {cell: summary(results) for cell, results in rounds.items()}
    m = machine()
    report = {"machine": m, "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
              "settings": {"model": str(args.model), "clients": args.clients, "window": args.window,
                           "seconds": args.seconds, "repeats": args.repeats},
              "cells": cells, "raw": rounds}
    save_report(args.out, f"serve_grpc_stream-{cpu_slug(m.get('cpu'))}", report, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
