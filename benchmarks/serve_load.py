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
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import free_port, run_load, wait_ready  # noqa: E402

from resnet_edge.core.machine import machine  # noqa: E402


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
        wait_ready(server, f"http://127.0.0.1:{port}/v2/health/ready", lambda: server.stderr.read(), timeout=60)
        result = asyncio.run(run_load(["json"], clients, seconds, "m", port, None))["json"]
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
    ap.add_argument("--max-delay-ms", type=float, default=0.0, help="serve --max-delay-ms (its default: 0)")
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
