"""Where a served request's CPU goes, and how much faster than JSON the binary and gRPC paths can be
on this machine: the transport floors, the model's own cost and `serve`, side by side in one run.

Cells (all with the closed-loop clients of serve_loadgen.py, --clients at once, single images):
- floors: trivial servers that answer every request with the same 60 bytes, doing no work at all:
  HTTP/1.1 (uvicorn + httptools + uvloop, as `serve` runs), gRPC unary (grpc.aio on uvloop, as
  `serve --grpc-port` runs) and gRPC bidirectional streaming (one stream per client; a floor for
  `serve`'s ModelStreamInfer, which benchmarks/serve_grpc_stream.py measures; its client is this script's,
  one request at a time on each stream). Each floor's server + client CPU per request
  is the least any server on that transport costs here.
- inference: the model alone in ONNX Runtime, created as `serve` creates it, CPU per image at the
  batch size `serve` formed in the JSON cells.
- serve: `resnet-edge serve` answering json, binary and grpc requests (serve_loadgen's modes).
- format work: what each mode alone does per request, timed in this process on the same images:
  json (parse the JSON body, write the JSON answer), binary (parse the JSON header and the raw bytes,
  write the binary answer), grpc (protobuf parse, the request's checks, the answer and its protobuf).

Every cell runs --repeats times, interleaved (round by round), so a change in the machine's speed
during the run (a shared host) hits every cell alike; medians reported.

Two comparisons:
- hard: a request of mode m costs at least its transport floor F_m plus the inference I, and the machine
  has C cores, so req/s(m) <= C / (F_m + I) whatever `serve` does, even with every core busy (each cell
  reports how busy it kept them). Divided by json's measured req/s, that is the most mode m could be
  against json; below 1.5x, mode m cannot be 1.5x json on this machine.
- estimate: costs add up, F_m + I + W_m + S, with S the rest of what `serve` does per request (batching,
  limits, the ASGI or gRPC handler). For S = 0, mode m vs json in CPU per request is
  (F_json + I + W_json) / (F_m + I + W_m); a shared S >= 0 pulls it toward 1. It compares CPU, not req/s:
  a cell that keeps the cores a little busier than another has a req/s ratio above its CPU ratio.
Writes serve_costs.json and serve_costs.md to --out.

    python benchmarks/serve_costs.py --model exported/resnet8/model.int8.onnx --out benchmarks/results/cpu/serve_costs
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import (Tally, cpu_seconds, free_port, grpc_requests, http_requests, machine_line,  # noqa: E402
                           run_load, save_report, stop, summarize, test_images, wait_ready)

from resnet_edge.core.machine import machine  # noqa: E402

ANSWER = b"\x00" * 60
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"
FLOORS = ("http-json", "http-binary", "grpc", "grpc-stream")


# ------------------------------------------------------------------------------------------ trivial servers
def echo_server(kind: str, port: int) -> None:
    """Answer every request with ANSWER, doing nothing else (run in its own process)."""
    import uvloop

    if kind == "http":
        import uvicorn

        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            if scope["path"] == "/ready":
                await receive()
            else:
                more = True
                while more:
                    more = (await receive()).get("more_body", False)
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"60")]})
            await send({"type": "http.response.body", "body": ANSWER})

        uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, loop="uvloop",
                    http="httptools", proxy_headers=False, lifespan="off")
        return
    import grpc

    async def unary(request, context):
        return ANSWER

    async def stream(requests, context):
        async for _ in requests:
            yield ANSWER

    async def serve() -> None:
        server = grpc.aio.server()
        handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(unary),
                    "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(stream)}
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("inference.GRPCInferenceService", handlers),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    uvloop.install()
    asyncio.run(serve())


async def _stream_client(channel, requests: list[bytes], offset: int, stop_at: float, tally: Tally) -> None:
    call = channel.stream_stream(STREAM_METHOD)()
    i = offset
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        await call.write(requests[i % len(requests)])
        await call.read()
        tally.latencies.append(time.perf_counter() - t0)
        i += 1
    await call.done_writing()


async def stream_load(port: int, clients: int, seconds: float, server_pid: int, warmup: float = 1.0) -> dict:
    """run_load's measurement over one bidirectional stream per client."""
    import grpc

    requests = grpc_requests("m", test_images())
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await asyncio.gather(*[_stream_client(channel, requests, k, time.perf_counter() + warmup, Tally()) for k in range(clients)])
    tally = Tally()
    cpu0, t0 = (cpu_seconds(server_pid), time.process_time()), time.perf_counter()
    await asyncio.gather(*[_stream_client(channel, requests, k * 7, t0 + seconds, tally) for k in range(clients)])
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_seconds(server_pid), time.process_time()
    await channel.close()
    out = summarize(tally, elapsed)
    out["server_cpu_s"], out["client_cpu_s"] = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return out


def wait_port(proc: subprocess.Popen, port: int, timeout: float = 60) -> None:
    import socket

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"a trivial server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"nothing listens on {port} after {timeout} s")
            time.sleep(0.1)


# ------------------------------------------------------------------------------------------ the model alone
def inference_us(model: Path, batch: int, seconds: float) -> float:
    """CPU microseconds per image of ONNX Runtime running ``batch`` images at a time (this process's CPU,
    ONNX Runtime's threads included), on a session made as `serve` makes it."""
    import numpy as np

    from resnet_edge.core.contract import INPUT_NAME, INPUT_SHAPE, OUTPUT_NAME
    from resnet_edge.inference.runtime import create_session

    session = create_session(model, "cpu", spinning=False)
    x = np.random.default_rng(0).random((batch, *INPUT_SHAPE), dtype=np.float32)
    for _ in range(20):
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
    runs, cpu0, t0 = 0, time.process_time(), time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        session.run([OUTPUT_NAME], {INPUT_NAME: x})
        runs += 1
    return 1e6 * (time.process_time() - cpu0) / (runs * batch)


def format_us(seconds: float = 1.0) -> dict[str, float]:
    """CPU microseconds per request of each mode's own work (parse, checks, answer), on serve_loadgen's images."""
    import numpy as np

    from resnet_edge.serving.proto import messages
    from resnet_edge.serving.grpc_front import grpc_infer_request, grpc_infer_response
    from resnet_edge.serving.v2 import encode_http_response, parse_http_request

    images = test_images(64)
    logits = np.random.default_rng(0).random((1, 10), dtype=np.float32)
    bodies = {}
    for mode in ("json", "binary"):
        for raw in http_requests(mode, "m", 0, images):
            head, body = raw.split(b"\r\n\r\n", 1)
            fields = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
            length = fields.get(b"Inference-Header-Content-Length")
            bodies.setdefault(mode, []).append((body, length.decode() if length else None))
    request_class = messages()["ModelInferRequest"]
    served = types.SimpleNamespace(name="m", version="1")  # what grpc_infer_response reads of a served model

    def http(mode: str, i: int) -> None:
        body, length = bodies[mode][i % 64]
        encode_http_response("m", "1", parse_http_request(body, length), logits)

    def grpc(i: int, wire=grpc_requests("m", images)) -> None:
        parsed = grpc_infer_request(request_class.FromString(wire[i % 64]))
        grpc_infer_response(served, parsed, logits).SerializeToString()

    out = {}
    for mode, fn in (("json", lambda i: http("json", i)), ("binary", lambda i: http("binary", i)), ("grpc", grpc)):
        for i in range(200):
            fn(i)
        runs, cpu0, t0 = 0, time.process_time(), time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for i in range(100):
                fn(i)
            runs += 100
        out[mode] = 1e6 * (time.process_time() - cpu0) / runs
    return out


# ------------------------------------------------------------------------------------------ the run
def per_request(r: dict) -> dict:
    n = r["requests"] or 1
    return {"requests_per_second": r["requests_per_second"], "p50_ms": r["p50_ms"], "p99_ms": r["p99_ms"],
            "errors": r["errors"], "server_us": 1e6 * r["server_cpu_s"] / n, "client_us": 1e6 * r["client_cpu_s"] / n,
            "total_us": 1e6 * (r["server_cpu_s"] + r["client_cpu_s"]) / n,
            "busy_cores": (r["server_cpu_s"] + r["client_cpu_s"]) / r["seconds"]}


def rows_per_batch(http: int) -> tuple[int, int]:
    import urllib.request

    stats = json.load(urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/m/stats", timeout=10))["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


def median_cells(rounds: list[dict]) -> dict:
    keys = rounds[0].keys()
    return {k: {f: statistics.median(r[k][f] for r in rounds) for f in rounds[0][k]} for k in keys}


def markdown(report: dict) -> str:
    m, c, b = report["machine"], report["cells"], report["bounds"]
    lines = [f"# Where a served request's CPU goes ({report['model']})", "",
             f"Machine: {machine_line(m)}; {report['clients']} closed-loop clients, "
             f"single images, {report['seconds']} s a cell, {report['repeats']} interleaved rounds, medians.", "",
             "| cell | req/s | p50 ms | p99 ms | CPU us/request: server | client | total | busy cores |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, x in c.items():
        lines.append(f"| {name} | {x['requests_per_second']:,.0f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | "
                     f"{x['server_us']:.0f} | {x['client_us']:.0f} | {x['total_us']:.0f} | {x['busy_cores']:.2f} |")
    w = report["format_us"]
    lines += ["", f"Inference alone (I): {report['inference_us']:.0f} us of CPU per image at batch {report['batch']} "
              f"(the rows per batch `serve` formed in the json cells). Format work per request (W): json "
              f"{w['json']:.0f} us, binary {w['binary']:.0f} us, grpc {w['grpc']:.0f} us.", "",
              "| mode | req/s vs json: median (each round) | floor + inference, us | at most, with every core busy | "
              "CPU estimate if `serve`'s shared work cost nothing |", "| --- | --- | ---: | ---: | ---: |"]
    for mode, x in b.items():
        measured = (f"{x['measured']:.2f}x ({', '.join(f'{v:.2f}' for v in x['per_round'])})" if x["measured"] is not None
                    else "(not measured here: serve_peers.py --modes stream)")
        lines.append(f"| {mode} | {measured} | {x['floor_plus_inference_us']:.0f} | {x['at_most']:.2f}x | "
                     f"{x['estimate_without_shared_work']:.2f}x |")
    lines += ["", f"At most: {m['logical_cores']} cores / (floor + inference), over json's median req/s; a mode below "
              "1.5x there cannot be 1.5x json on this machine. The estimate is (F_json + I + W_json) / (F_mode + I + "
              "W_mode) in CPU per request, F the floor's total (streaming with grpc's W); see the script's docstring."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="the .onnx model `serve` serves (required)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--echo", choices=["http", "grpc"], help=argparse.SUPPRESS)  # internal: run a trivial server
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.echo:
        return echo_server(args.echo, args.port)
    if args.model is None or not args.model.is_file():
        raise SystemExit(f"--model: no such file {args.model}" if args.model else "--model is required")
    if not 1 <= args.clients <= 512 or not 0 < args.seconds <= 600 or not 1 <= args.repeats <= 20:
        raise SystemExit("--clients 1-512, --seconds up to 600, --repeats 1-20")
    procs, log = [], tempfile.TemporaryFile("w+")
    try:
        ports = {}
        for kind in ("http", "grpc"):
            ports[kind] = free_port()
            procs.append(subprocess.Popen([sys.executable, __file__, "--echo", kind, "--port", str(ports[kind])]))
            wait_port(procs[-1], ports[kind])
        echo = {kind: p for kind, p in zip(("http", "grpc"), procs)}
        http, grpc = free_port(), free_port()
        serve = subprocess.Popen([sys.executable, "-m", "resnet_edge", "serve", "--model", str(args.model), "--model-name", "m",
                                  "--port", str(http), "--grpc-port", str(grpc)],
                                 stdout=subprocess.DEVNULL, stderr=log)
        procs.append(serve)
        wait_ready(serve, f"http://127.0.0.1:{http}/v2/health/ready", lambda: (log.seek(0), log.read()[-2000:])[1])
        rounds, batch = [], None
        for repeat in range(args.repeats):
            cells = {}
            for floor in FLOORS:
                if floor == "grpc-stream":
                    r = asyncio.run(stream_load(ports["grpc"], args.clients, args.seconds, echo["grpc"].pid))
                else:  # the HTTP floors send serve_loadgen's json or binary requests (bodies of 2.6 kB / 1 kB)
                    mode = floor.split("-")[-1]
                    r = asyncio.run(run_load([mode], args.clients, args.seconds, "m", ports["http"], ports["grpc"],
                                             server_pid=echo[floor.split("-")[0]].pid))[mode]
                cells[f"floor: {floor}"] = per_request(r)
            for mode in ("json", "binary", "grpc"):
                before = rows_per_batch(http)
                r = asyncio.run(run_load([mode], args.clients, args.seconds, "m", http, grpc, server_pid=serve.pid))[mode]
                after = rows_per_batch(http)
                if mode == "json" and batch is None:  # inference is timed at the first round's batch size
                    batch = max(1, round((after[0] - before[0]) / max(1, after[1] - before[1])))
                cells[f"serve: {mode}"] = per_request(r)
            cells["inference"] = {"us_per_image": inference_us(args.model, batch, seconds=min(args.seconds, 3.0))}
            cells["format"] = format_us(seconds=min(args.seconds / 3, 1.0))
            rounds.append(cells)
            print(f"[{repeat + 1}/{args.repeats}] " + "; ".join(f"{k} {v['requests_per_second']:,.0f} req/s "
                                                              f"{v['total_us']:.0f} us" for k, v in cells.items()
                                                              if k.startswith(("floor", "serve"))), flush=True)
    finally:
        stop(procs)
        log.close()
    cells = median_cells(rounds)
    infer, work = cells.pop("inference")["us_per_image"], cells.pop("format")
    floor = {k: cells[f"floor: {k}"]["total_us"] for k in FLOORS}
    bounds = {}
    for mode, transport, fmt in (("binary", "http-binary", "binary"), ("grpc", "grpc", "grpc"), ("grpc streaming", "grpc-stream", "grpc")):
        measured = [r[f"serve: {mode}"]["requests_per_second"] / r["serve: json"]["requests_per_second"]
                    for r in rounds] if f"serve: {mode}" in cells else None
        cores = os.cpu_count() or 1
        bounds[mode] = {"measured": statistics.median(measured) if measured else None, "per_round": measured,
                        "floor_plus_inference_us": floor[transport] + infer,
                        "at_most": cores * 1e6 / (floor[transport] + infer) / cells["serve: json"]["requests_per_second"],
                        "estimate_without_shared_work": (floor["http-json"] + infer + work["json"]) / (floor[transport] + infer + work[fmt])}
    report = {"model": str(args.model), "clients": args.clients, "seconds": args.seconds, "repeats": args.repeats,
              "batch": batch, "inference_us": infer, "format_us": work, "cells": cells, "bounds": bounds,
              "rounds": rounds, "machine": machine(gpu=False)}
    print(markdown(report))
    if args.out:
        save_report(args.out, "serve_costs", report, markdown(report))


if __name__ == "__main__":
    main()
