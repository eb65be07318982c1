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
every cell alike; medians reported, with the server's CPU seconds per request. On a shared machine a round
starts only once the CPUs have been idle for 3 s, and counts only if no other process used OTHERS_MAX CPU
seconds during any of its cells (a disturbed round is set aside, kept in the report, and run again). The
CPU model (from /proc/cpuinfo) and its int8 instruction level (amx, vnni, avx512, avx2; dotprod on ARM)
name the result file.

    python benchmarks/serve_grpc_stream.py --model exported/resnet8/model.int8.onnx
    # -> benchmarks/results/cpu/serve_grpc_stream-<cpu>-<level>.json and .md
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
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
OTHERS_MAX = 1.0  # CPU seconds other processes may use during a cell (of ~12 on 2 cores) for its round to count


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
    """One cell's run; ``others_cpu_s``: CPU seconds the rest of the machine used meanwhile (all cores busy
    time less the server's and this process's), which says whether the machine was idle enough."""
    import psutil

    def busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0) + getattr(t, "softirq", 0)

    before = busy(), cpu_seconds(pid), time.process_time()
    if cell in ("json", "grpc"):
        out = asyncio.run(run_load([cell], args.clients, args.seconds, "m", http, grpc_port, server_pid=pid))[cell]
    else:
        window = args.window if cell == "grpc-stream-window" else 1
        out = asyncio.run(stream_load(grpc_port, args.clients, window, args.seconds, pid))
    after = busy(), cpu_seconds(pid), time.process_time()
    out["others_cpu_s"] = (after[0] - before[0]) - (after[1] - before[1]) - (after[2] - before[2])
    return out


def cpu_slug(m: dict) -> str:
    """The CPU's name and its int8 instruction level, for a file name: two CPUs that /proc/cpuinfo names
    alike (a hypervisor's "AMD EPYC" with AVX2 only, another with AVX-512 VNNI) get a report each; two with
    the same name and level still share one."""
    isa = m.get("isa") or {}
    level = next((tag for tag, flags in (("amx", ("amx_int8",)), ("vnni", ("avx512_vnni", "avx_vnni")),
                                          ("avx512", ("avx512f",)), ("avx2", ("avx2",)), ("dotprod", ("asimddp",)))
                  if any(isa.get(f) for f in flags)), m.get("arch") or "")
    return re.sub(r"[^a-z0-9]+", "-", f"{m.get('cpu') or 'unknown-cpu'} {level}".lower()).strip("-")


def markdown(report: dict) -> str:
    rows = ["| cell | req/s (median) | rounds | p50 ms | p99 ms | server CPU ms / request | errors "
            "| other processes' CPU s, by round |", "|---|---:|---|---:|---:|---:|---:|---|"]
    for cell, r in report["cells"].items():
        rows.append(f"| {cell} | {r['requests_per_second']:,.0f} | {', '.join(f'{x:,.0f}' for x in r['rounds'])} "
                    f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['server_cpu_ms_per_request']:.3f} | {r['errors']} "
                    f"| {', '.join(f'{x:.1f}' for x in r['others_cpu_s'])} |")
    s = report["settings"]
    return (f"# serve: gRPC streaming vs unary vs JSON\n\nMachine: {machine_line(report['machine'])}; load average "
            f"before: {report['load_before']}.\nModel: {s['model']}; {s['clients']} clients, {s['seconds']} s a cell, "
            f"{s['repeats']} interleaved rounds kept (undisturbed by other processes; "
            f"{len(report['disturbed_rounds'])} set aside), window {s['window']} for grpc-stream-window.\n\n"
            + "\n".join(rows) + "\n")


def summary(results: list[dict]) -> dict:
    """A cell's rounds -> medians (req/s, latency, server CPU per request), each round's req/s, errors."""

    def med(key: str) -> float:
        return statistics.median(x[key] for x in results if x[key] is not None)

    return {"requests_per_second": med("requests_per_second"), "rounds": [x["requests_per_second"] for x in results],
            "p50_ms": med("p50_ms"), "p99_ms": med("p99_ms"), "errors": sum(x["errors"] for x in results),
            "server_cpu_ms_per_request": statistics.median(1e3 * x["server_cpu_s"] / max(1, x["requests"])
                                                           for x in results),
            "others_cpu_s": [round(x["others_cpu_s"], 2) for x in results]}


def wait_idle(max_wait: float, busy_max: float = 10.0) -> bool:
    """Until the machine has been under ``busy_max`` % CPU for 3 s in a row (the server idle between
    rounds), at most ``max_wait`` seconds; whether it was."""
    import psutil

    end, quiet = time.monotonic() + max_wait, 0
    while time.monotonic() < end:
        quiet = quiet + 1 if psutil.cpu_percent(interval=1.0) < busy_max else 0
        if quiet >= 3:
            return True
    return False


def measure(args, http: int, grpc_port: int, pid: int) -> tuple[dict[str, list[dict]], list[dict]]:
    """--repeats rounds of every cell in which no other process used OTHERS_MAX CPU seconds in any cell;
    a disturbed round is set aside (kept in the report) and run again; a round for which the machine
    stays busy --max-wait seconds is not run. --max-rounds attempts in all at most. Stopped (SIGTERM,
    Ctrl-C), it returns the rounds it has."""
    rounds: dict[str, list[dict]] = {c: [] for c in CELLS}
    disturbed: list[dict] = []
    try:
        for attempt in range(args.max_rounds):
            if len(rounds[CELLS[0]]) >= args.repeats:
                break
            if not wait_idle(args.max_wait):
                print(f"round {attempt + 1}: the machine stayed busy for {args.max_wait:g} s; not run", flush=True)
                continue
            results = {cell: one_cell(cell, args, http, grpc_port, pid) for cell in CELLS}
            clean = all(r["others_cpu_s"] < OTHERS_MAX for r in results.values())
            cells = ", ".join(f"{c} {r['requests_per_second']:,.0f} req/s (others {r['others_cpu_s']:.1f} s)"
                              for c, r in results.items())
            print(f"round {attempt + 1} ({'kept' if clean else 'disturbed, set aside'}): {cells}", flush=True)
            if not clean:
                disturbed.append(results)
                continue
            for cell, r in results.items():
                rounds[cell].append(r)
    except (KeyboardInterrupt, SystemExit):
        print("stopped: reporting the rounds kept so far", flush=True)
    return rounds, disturbed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=Path("exported/resnet8/model.int8.onnx"))
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--window", type=int, default=8)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--repeats", type=int, default=5, help="undisturbed rounds wanted")
    p.add_argument("--max-rounds", type=int, default=15, help="rounds run at most, disturbed ones included")
    p.add_argument("--max-wait", type=float, default=300.0, help="seconds to wait for an idle machine before a round")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu"))
    args = p.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the server is stopped on the way out
    load_before = os.getloadavg()[0]
    http, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "resnet_edge", "serve", "--model", str(args.model), "--model-name", "m",
           "--port", str(http), "--grpc-port", str(grpc_port)]
    with tempfile.TemporaryDirectory() as tmp:
        proc = launch(cmd, Path(tmp) / "serve.log", http)
        try:
            rounds, disturbed = measure(args, http, grpc_port, proc.pid)
        finally:
            stop([proc])
    if not rounds[CELLS[0]]:
        raise SystemExit("no undisturbed round (the machine was busy, or the run was stopped first): nothing written")
    cells = {cell: summary(results) for cell, results in rounds.items()}
    m = machine()
    report = {"machine": m, "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
              "settings": {"model": str(args.model), "clients": args.clients, "window": args.window,
                           "seconds": args.seconds, "repeats": args.repeats, "others_max_cpu_s": OTHERS_MAX},
              "cells": cells, "raw": rounds, "disturbed_rounds": disturbed}
    save_report(args.out, f"serve_grpc_stream-{cpu_slug(m)}", report, markdown(report))
    print(markdown(report))

if __name__ == "__main__":
    main()
