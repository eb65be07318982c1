"""The load generator of the serving benchmarks (serve_load.py --mix, serve_soak.py, serve_peers.py):
closed-loop clients, each sending one single-image Open Inference Protocol request at a time.

Modes: "json" (KServe v2 JSON, UINT8 data), "binary" (the binary tensor data extension: JSON header +
784 raw bytes, logits back as binary), "grpc" (GRPCInferenceService/ModelInfer with raw_input_contents),
and, asked for by name (not in MODES, the default of the scripts that import it), "stream": the same
ModelInferRequest messages over one GRPCInferenceService/ModelStreamInfer stream per client, the next
request written once the previous answer came back (one in flight per client, as the other modes).
HTTP clients speak HTTP/1.1 keep-alive on raw asyncio streams, the gRPC ones use grpc.aio with
pre-serialized messages, so the client costs as little CPU as possible on a machine it shares with
the server. Every request is built before the clock starts; a request that does not answer 200 / OK
is an error (counted, with its kind).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass, field

import numpy as np

MODES = ("json", "binary", "grpc")
ALL_MODES = MODES + ("stream",)
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc, url: str, why, timeout: float = 120) -> None:
    """Poll ``url`` until it answers 200; exit with ``why()`` (the server's output) if ``proc`` ends or
    ``timeout`` seconds pass first."""
    import urllib.request

    deadline = time.time() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {why()}")
        try:
            if urllib.request.urlopen(url, timeout=1).status == 200:
                return
        except OSError:
            if time.time() > deadline:
                raise SystemExit(f"server did not become ready: {why()}")
            time.sleep(0.2)


def launch(cmd: list[str], log, http: int, **popen) -> subprocess.Popen:
    """Start a server (output to the file ``log``) and wait until model "m" is ready on port ``http``;
    a server that exits or never gets ready is stopped and reported with the end of its log."""
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, **popen)
    try:
        wait_ready(proc, f"http://127.0.0.1:{http}/v2/models/m/ready", lambda: log.read_text()[-2000:])
    except BaseException:
        stop([proc])
        raise
    return proc


def machine_line(m: dict) -> str:
    """The machine of a result, for its Markdown: CPU model, logical cores and the ISA features it has."""
    features = " ".join(k for k, v in (m.get("isa") or {}).items() if v)
    return f"{m.get('cpu')} ({m.get('logical_cores')} logical cores; {features or 'no ISA features detected'})"


def save_report(out, stem: str, report: dict, markdown: str) -> None:
    """``report`` as <out>/<stem>.json and ``markdown`` as <out>/<stem>.md (the folder made if needed)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(markdown)


def stop(procs: list) -> None:
    """Terminate every process first, then wait (kill what does not end in 30 s)."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_images(count: int = 256) -> np.ndarray:
    from resnet_edge.core.mnist import load_test_split

    images, _ = load_test_split()
    return np.round(images[:count].reshape(count, 784) * 255).astype(np.uint8)


def http_requests(mode: str, name: str, port: int, images: np.ndarray) -> list[bytes]:
    """Whole HTTP/1.1 requests (head + body), one per image."""
    out = []
    for img in images:
        extra = ""
        if mode == "json":
            body = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784],
                                           "data": img.tolist()}]}).encode()
        else:
            head = json.dumps({"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784],
                                           "parameters": {"binary_data_size": 784}}],
                               "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
            body = head + img.tobytes()
            extra = f"Inference-Header-Content-Length: {len(head)}\r\n"
        out.append((f"POST /v2/models/{name}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                    f"Content-Type: application/{'json' if mode == 'json' else 'octet-stream'}\r\n{extra}"
                    f"Content-Length: {len(body)}\r\n\r\n").encode() + body)
    return out


def grpc_requests(name: str, images: np.ndarray) -> list[bytes]:
    from resnet_edge.serving.proto import messages

    out = []
    for img in images:
        request = messages()["ModelInferRequest"](model_name=name)
        request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 784])
        request.raw_input_contents.append(img.tobytes())
        out.append(request.SerializeToString())
    return out


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


async def _http_client(port: int, requests: list[bytes], offset: int, stop_at: float, tally: Tally) -> None:
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as exc:
        tally.errors.append(type(exc).__name__)
        return
    i = offset
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            writer.write(requests[i % len(requests)])
            i += 1
            status, _ = await read_response(reader)
            if status == 200:
                tally.latencies.append(time.perf_counter() - t0)
            else:
                tally.errors.append(f"HTTP {status}")
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        tally.errors.append(type(exc).__name__)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes]]:
    """One HTTP/1.1 response read whole (Content-Length bodies): its status and lower-case header fields."""
    lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    fields = {k.strip().lower(): v.strip() for k, v in (line.split(b":", 1) for line in lines[1:] if b":" in line)}
    await reader.readexactly(int(fields.get(b"content-length", b"0")))
    return status, fields


async def _grpc_client(channel, requests: list[bytes], offset: int, stop_at: float, tally: Tally) -> None:
    import grpc

    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    i = offset
    while time.perf_counter() < stop_at:
        t0 = time.perf_counter()
        try:
            await call(requests[i % len(requests)], timeout=30)
            tally.latencies.append(time.perf_counter() - t0)
        except grpc.RpcError as exc:
            tally.errors.append(f"gRPC {exc.code().name}")
        i += 1


async def _stream_client(channel, requests: list[bytes], offset: int, stop_at: float, tally: Tally) -> None:
    """One ModelStreamInfer stream, one request in flight: write, read its answer, repeat until ``stop_at``;
    then half-close and read to the end. Answers stay serialized: a ModelStreamInferResponse whose first
    byte is 0x0a starts with field 1, error_message (fields are written in field order), so it is an error."""
    import grpc

    call = channel.stream_stream(STREAM, request_serializer=bytes, response_deserializer=bytes)()
    i = offset
    try:
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await call.write(requests[i % len(requests)])
            i += 1
            answer = await call.read()
            if answer is grpc.aio.EOF:
                tally.errors.append("stream ended")
                return
            if answer[:1] == b"\x0a":
                tally.errors.append(f"stream error: {stream_error(answer)[:40]}")
            else:
                tally.latencies.append(time.perf_counter() - t0)
        await call.done_writing()
        while await call.read() is not grpc.aio.EOF:
            tally.errors.append("answer after the last request")
    except grpc.RpcError as exc:
        tally.errors.append(f"gRPC {exc.code().name}")


def stream_error(answer: bytes) -> str:
    from resnet_edge.serving.proto import messages

    return messages()["ModelStreamInferResponse"].FromString(answer).error_message


async def run_load(modes: list[str], clients: int, seconds: float, name: str, http_port: int, grpc_port: int | None,
                   warmup: float = 1.0, server_pid: int | None = None) -> dict[str, dict]:
    """``clients`` closed-loop clients for ``seconds``, spread round-robin over ``modes``; per mode:
    requests, req/s, p50/p90/p99 ms, errors (with their kinds); with ``server_pid``, also the CPU
    seconds the server (with its child processes) and this load generator used after the warm-up."""
    import grpc

    images = test_images()
    reqs = {m: grpc_requests(name, images) if m in ("grpc", "stream") else http_requests(m, name, http_port, images)
            for m in modes}
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") if {"grpc", "stream"} & set(modes) else None

    def clients_for(stop_at: float, tallies: dict[str, Tally]) -> list:
        tasks = []
        for k in range(clients):
            mode = modes[k % len(modes)]
            if mode == "grpc":
                tasks.append(_grpc_client(channel, reqs[mode], k * 7, stop_at, tallies[mode]))
            elif mode == "stream":
                tasks.append(_stream_client(channel, reqs[mode], k * 7, stop_at, tallies[mode]))
            else:
                tasks.append(_http_client(http_port, reqs[mode], k * 7, stop_at, tallies[mode]))
        return tasks

    await asyncio.gather(*clients_for(time.perf_counter() + warmup, {m: Tally() for m in modes}))
    tallies = {m: Tally() for m in modes}
    cpu0 = cpu_seconds(server_pid), time.process_time(), loop_cpu_seconds(server_pid), cpu_by_process(server_pid)
    t0 = time.perf_counter()
    await asyncio.gather(*clients_for(t0 + seconds, tallies))
    elapsed = time.perf_counter() - t0
    cpu1 = cpu_seconds(server_pid), time.process_time(), loop_cpu_seconds(server_pid), cpu_by_process(server_pid)
    if channel is not None:
        await channel.close()
    out = {m: summarize(t, elapsed) for m, t in tallies.items()}
    if server_pid is not None:
        for r in out.values():  # the whole run's CPU (all modes together)
            r["server_cpu_s"], r["client_cpu_s"] = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
            r["server_loop_cpu_s"] = cpu1[2] - cpu0[2]
            r["server_cpu_s_by_process"] = {k: v - cpu0[3].get(k, 0.0) for k, v in cpu1[3].items()}
    return out


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process and its children (0 without a pid)."""
    if pid is None:
        return 0.0
    import psutil

    total = 0.0
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def cpu_by_process(pid: int | None) -> dict[str, float]:
    """cpu_seconds split by process name (the server and each kind of child it runs, e.g. Triton's
    tritonserver and Python backend stubs): user + system CPU seconds summed per name."""
    if pid is None:
        return {}
    import psutil

    out: dict[str, float] = {}
    for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        try:
            t, name = p.cpu_times(), p.name()
            out[name] = out.get(name, 0.0) + t.user + t.system
        except psutil.Error:
            pass
    return out


def loop_cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a server's main thread, where `serve` runs its event loop (HTTP and gRPC
    handlers, request checks, the batcher; not ONNX Runtime, the request thread pool or grpcio's own threads).
    With cores to spare for everything else, that one thread bounds req/s: at most 1 / (its CPU per request)."""
    if pid is None:
        return 0.0
    import psutil

    try:
        return next((t.user_time + t.system_time for t in psutil.Process(pid).threads() if t.id == pid), 0.0)
    except psutil.Error:
        return 0.0


def summarize(tally: Tally, elapsed: float) -> dict:
    ms = np.array(tally.latencies) * 1e3
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: None)
    return {"requests": len(ms), "requests_per_second": len(ms) / elapsed, "p50_ms": pct(50), "p90_ms": pct(90),
            "p99_ms": pct(99), "errors": len(tally.errors), "error_kinds": sorted(set(tally.errors))[:10],
            "seconds": elapsed}


def line(label: str, r: dict) -> str:
    if not r["requests"]:
        return f"{label:28s} no answers; errors {r['errors']} {r['error_kinds']}"
    return (f"{label:28s} {r['requests_per_second']:8,.0f} req/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
            f"errors {r['errors']}{' ' + str(r['error_kinds']) if r['errors'] else ''}")
