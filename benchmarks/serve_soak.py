"""Soak test of `resnet-edge serve`: JSON, binary and gRPC clients mixed at one concurrency for a long
time, with the server's memory sampled every second. Reports req/s, p50/p99 and errors per protocol,
and the server's RSS after warm-up, at the end and at its peak (growth = end - after warm-up; the
issue's bar: < 50 MB over 10 minutes at concurrency 32, zero errors).

    python benchmarks/serve_soak.py --model exported/resnet8/model.int8.onnx --clients 32 --seconds 600 \
        --out benchmarks/results/cpu/serve_soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import MODES, free_port, line, run_load, wait_ready  # noqa: E402

from resnet_edge.core.machine import machine  # noqa: E402


def start_server(model: Path, extra: list[str]) -> tuple[subprocess.Popen, int, int]:
    port, grpc_port = free_port(), free_port()
    cmd = [sys.executable, "-m", "resnet_edge", "serve", "--model", str(model), "--model-name", "m", "--port", str(port),
           "--grpc-port", str(grpc_port), *extra]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_ready(server, f"http://127.0.0.1:{port}/v2/health/ready", lambda: server.stderr.read(), timeout=60)
    return server, port, grpc_port


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process, self.samples, self.done = psutil.Process(pid), [], threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                self.samples.append((time.time(), self.process.memory_info().rss))
            except psutil.Error:
                return


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--server-args", default="", help="extra serve options, e.g. '--max-batch-size 32'")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    modes = args.modes.split(",")
    if not 1 <= args.clients <= 512 or not 0 < args.seconds <= 3600 or not set(modes) <= set(MODES):
        raise SystemExit("--clients 1-512, --seconds up to 3600, --modes from json,binary,grpc")
    server, port, grpc_port = start_server(args.model, args.server_args.split())
    try:
        asyncio.run(run_load(modes, args.clients, 5.0, "m", port, grpc_port, warmup=1.0))  # warm-up round
        sampler = RssSampler(server.pid)
        start_rss = psutil.Process(server.pid).memory_info().rss
        sampler.start()
        results = asyncio.run(run_load(modes, args.clients, args.seconds, "m", port, grpc_port, warmup=0.0))
        sampler.done.set()
        end_rss = psutil.Process(server.pid).memory_info().rss
        alive = server.poll() is None
    finally:
        server.terminate()
        server.wait(timeout=60)
    for mode, r in results.items():
        print(line(f"{mode} ({args.clients // len(modes)}+ clients)", r))
    peak = max([rss for _, rss in sampler.samples] + [end_rss])
    print(f"server RSS: {start_rss / 2**20:.0f} MB after warm-up, {end_rss / 2**20:.0f} MB at the end "
          f"(growth {(end_rss - start_rss) / 2**20:+.1f} MB), peak {peak / 2**20:.0f} MB; errors "
          f"{sum(r['errors'] for r in results.values())}; server alive at the end: {alive}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "model": str(args.model), "clients": args.clients, "seconds": args.seconds, "modes": modes,
            "server_args": args.server_args, "results": results, "rss_after_warmup": start_rss, "rss_end": end_rss,
            "rss_peak": peak, "rss_growth": end_rss - start_rss, "rss_samples": sampler.samples[::10],
            "machine": machine(gpu=False)}, indent=2) + "\n")


if __name__ == "__main__":
    main()
