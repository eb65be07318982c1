"""resnet-edge `serve` side by side with Seldon MLServer: the same ONNX model, the same load generator
(serve_loadgen.py) and client settings, one server at a time on the same machine.

MLServer runs in its own virtual environment (--venv, created here with `pip install mlserver==VERSION
onnxruntime numpy` unless it exists; never in ours) with a custom runtime: an ONNX Runtime
InferenceSession behind MLServer's MLModel, UINT8 [N, 784] in, logits out. Its defaults here (adaptive
batching of 64 rows within 0.5 ms, 1 ONNX Runtime thread, parallel_workers 0) came from earlier runs
whose outputs were not kept. The stored ones (2-core Intel Xeon with AMX, family 6 model 207; resnet8
INT8, 32 JSON clients, 8 s cells, 2 repeats, one setting per run, benchmarks/results/cpu/mlserver-tuning/)
do not single out a best: 0.5 ms 1,036 req/s, 2 ms 1,201, 5 ms 1,168, no batching 1,234, ONNX Runtime's
own thread count 1,188, 1 or 2 parallel workers 1,017 / 946 (they start only with uvloop < 0.21), all
within this shared machine's drift between runs. The three leading settings, each run side by side
with resnet-edge (vs-ours-*/): resnet-edge served 3.59x (0.5 ms), 3.35x (2 ms) and 3.39x (no batching)
MLServer's req/s. resnet-edge runs with serve's defaults unless --server-args says otherwise. Triton is not run here: it ships as a container
image and this script starts only Python processes.

For each protocol (json, binary, grpc), concurrency and server: --seconds of closed-loop single-image
requests, --repeats times (servers restarted between repeats). Within a repeat all servers are up and
the cells go level by level, every protocol on every server in turn, so the machine's drift (a shared
host) hits both sides of a ratio alike; medians of req/s, p50, p99 and of the ratios taken within each
repeat; errors summed. Writes serve_peers.json and serve_peers.md to --out.

    python benchmarks/serve_peers.py --model exported/resnet8/model.int8.onnx --concurrency 1,8,32,128 \
        --seconds 10 --out benchmarks/results/cpu/serve_peers
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import MODES, free_port, launch, line, machine_line, run_load, save_report, stop  # noqa: E402

from resnet_edge.core.machine import machine  # noqa: E402

RUNTIME = '''
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxDigits(MLModel):
    """ONNX Runtime behind MLServer: UINT8 or FP32 pixels [N, 784] (or [N, 1, 28, 28]) -> logits [N, 10]."""

    async def load(self) -> bool:
        options = ort.SessionOptions()
        threads = int(self.settings.parameters.extra.get("threads", 0))
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(self.settings.parameters.uri, options, providers=["CPUExecutionProvider"])
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0])
        x = x.reshape(-1, 1, 28, 28)
        x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
        logits = self.session.run(["logits"], {"pixels": x})[0]
        return InferenceResponse(model_name=self.name, outputs=[NumpyCodec.encode_output("logits", logits)])
'''


def ensure_venv(venv: Path, version: str) -> Path:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"mlserver=={version}", "onnxruntime", "numpy",
                        "uvloop<0.21"], check=True)  # its parallel workers fail to start with uvloop 0.21+
    return venv / "bin" / "mlserver"


def mlserver_folder(model: Path, folder: Path, http: int, grpc: int, args: argparse.Namespace) -> None:
    (folder / "runtime.py").write_text(RUNTIME)
    (folder / "settings.json").write_text(json.dumps({
        "http_port": http, "grpc_port": grpc, "host": "127.0.0.1", "parallel_workers": args.mlserver_workers,
        "metrics_endpoint": None, "metrics_port": free_port(), "debug": False, "logging_settings": None}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": "m", "implementation": "runtime.OnnxDigits", "max_batch_size": args.mlserver_batch_size,
        "max_batch_time": args.mlserver_batch_ms / 1e3,
        "parameters": {"uri": str(model.resolve()), "extra": {"threads": args.mlserver_threads}}}))


def start(server: str, model: Path, workdir: Path, args: argparse.Namespace, mlserver: Path | None) -> tuple:
    http, grpc = free_port(), free_port()
    log = workdir / f"{server}.log"
    if server == "resnet-edge":
        cmd = [sys.executable, "-m", "resnet_edge", "serve", "--model", str(model), "--model-name", "m",
               "--port", str(http), "--grpc-port", str(grpc), "--max-batch-size", str(args.max_batch_size),
               "--max-delay-ms", str(args.max_delay_ms)] + (["--threads", str(args.threads)] if args.threads else []) \
            + args.server_args.split()
        env = None
    else:
        folder = workdir / "mlserver"
        folder.mkdir(exist_ok=True)
        mlserver_folder(model, folder, http, grpc, args)
        cmd, env = [str(mlserver), "start", str(folder)], {**os.environ, "PYTHONPATH": str(folder)}
    return launch(cmd, log, http, env=env, cwd=workdir), http, grpc


def median_result(results: list[dict]) -> dict:
    """Medians of req/s, latency percentiles and CPU microseconds per answered request over repeats;
    errors summed."""
    import statistics

    for r in results:
        for who in ("server", "client"):
            r[f"{who}_cpu_us"] = 1e6 * r[f"{who}_cpu_s"] / r["requests"] if r.get(f"{who}_cpu_s") and r["requests"] else None

    out = {"requests": sum(r["requests"] for r in results), "errors": sum(r["errors"] for r in results),
           "error_kinds": sorted({k for r in results for k in r["error_kinds"]})[:10]}
    for key in ("requests_per_second", "p50_ms", "p90_ms", "p99_ms", "server_cpu_us", "client_cpu_us"):
        values = [r[key] for r in results if r[key] is not None]
        out[key] = statistics.median(values) if values else None
    return out


def ratios(cells: dict[tuple, list[dict]], servers: list[str], modes: list[str], levels: list[int]) -> list[dict]:
    """req/s ratios taken within each repeat (cells of one level run one after another), then the median:
    resnet-edge vs MLServer on each protocol, and resnet-edge's binary and grpc vs its own json."""
    import statistics

    pairs = []
    for mode in modes:
        for clients in levels:
            if "mlserver" in servers and mode != "binary":
                pairs.append((f"resnet-edge / mlserver, {mode}", ("resnet-edge", mode, clients), ("mlserver", mode, clients)))
            if mode != "json" and "json" in modes:
                pairs.append((f"resnet-edge {mode} / resnet-edge json", ("resnet-edge", mode, clients), ("resnet-edge", "json", clients)))
    out = []
    for label, a, b in pairs:
        if a in cells and b in cells:
            per_repeat = [x["requests_per_second"] / y["requests_per_second"] for x, y in zip(cells[a], cells[b])
                          if y["requests_per_second"]]
            if per_repeat:
                out.append({"ratio": label, "concurrency": a[2], "median": statistics.median(per_repeat),
                            "per_repeat": per_repeat})
    return out


def markdown(report: dict) -> str:
    rows = ["| server | protocol | concurrency | req/s | p50 ms | p99 ms | CPU us/request: server | client | errors |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["runs"]:
        x = r["result"]
        fmt = (lambda v: f"{v:.1f}" if v is not None else "-")
        fmt0 = (lambda v: f"{v:.0f}" if v is not None else "-")
        rows.append(f"| {r['server']} | {r['mode']} | {r['concurrency']} | {x['requests_per_second']:,.0f} | "
                    f"{fmt(x['p50_ms'])} | {fmt(x['p99_ms'])} | {fmt0(x.get('server_cpu_us'))} | {fmt0(x.get('client_cpu_us'))} | {x['errors']}{' ' + ', '.join(x['error_kinds']) if x['errors'] else ''} |")
    m = report["machine"]
    return (f"# resnet-edge vs MLServer {report['mlserver_version']}\n\nModel {report['model']}; {report['seconds']} s per "
            f"cell, {report['repeats']} repeats (medians; in each, all servers up at once and the cells run level by level, "
            f"every protocol on every server in turn), one image per request, closed-loop clients; resnet-edge batches up to {report['max_batch_size']} rows, "
            f"--max-delay-ms {report['max_delay_ms']}; MLServer max_batch_size {report['mlserver_batch_size']}, "
            f"max_batch_time {report['mlserver_batch_ms']} ms, parallel_workers {report['mlserver_workers']}.\n"
            f"Machine: {machine_line(m)}\n\nMLServer {report['mlserver_version']} answers the binary tensor data "
            f"extension with errors (it does not implement it); Triton: {report['triton']}.\n\n" + "\n".join(rows) + "\n"
            + ("" if not report.get("ratios") else "\nRatios of req/s, taken within each repeat between cells of the same level measured one after another, "
               "median over repeats:\n\n"
               "| ratio | concurrency | median | per repeat |\n| --- | ---: | ---: | --- |\n"
               + "".join(f"| {r['ratio']} | {r['concurrency']} | {r['median']:.2f}x | "
                         f"{', '.join(f'{v:.2f}' for v in r['per_repeat'])} |\n" for r in report.get("ratios", []))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--server-args", default="", help="extra resnet-edge serve options, e.g. '--max-pending-bytes "
                    "1073741824' (gRPC runs at most max-pending-bytes / max-body-bytes RPCs at once: 32 by default)")
    ap.add_argument("--max-delay-ms", type=float, default=0.0, help="ours (serve's default: 0)")
    ap.add_argument("--mlserver-batch-size", type=int, default=64, help="MLServer's max_batch_size (1: no adaptive batching)")
    ap.add_argument("--mlserver-batch-ms", type=float, default=0.5, help="MLServer's max_batch_time, in ms")
    ap.add_argument("--threads", type=int, default=None, help="ours: serve --threads (default: ONNX Runtime's)")
    ap.add_argument("--mlserver-threads", type=int, default=1, help="MLServer's ONNX Runtime intra-op threads (0: its default)")
    ap.add_argument("--repeats", type=int, default=3, help="runs of every cell (servers restarted); medians reported")
    ap.add_argument("--servers", default="resnet-edge,mlserver")
    ap.add_argument("--mlserver-version", default="1.7.1")
    ap.add_argument("--mlserver-workers", type=int, default=0)
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "resnet-edge-peers-venv")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    modes, servers = args.modes.split(","), args.servers.split(",")
    if not set(modes) <= set(MODES) or not all(1 <= c <= 512 for c in levels) or not 0 < args.seconds <= 600:
        raise SystemExit("--modes from json,binary,grpc; --concurrency 1-512; --seconds up to 600")
    mlserver = ensure_venv(args.venv, args.mlserver_version) if "mlserver" in servers else None
    cells: dict[tuple, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            started = {}  # every server up at once (idle while another is measured), cells interleaved:
            try:  # a drift in the machine's speed hits both sides of a comparison alike
                for server in servers:
                    started[server] = start(server, args.model, Path(tmp), args, mlserver)
                for clients in levels:  # at each level, every protocol on every server, one after another
                    for mode in modes:
                        for server, (proc, http, grpc) in started.items():
                            if (server, mode) == ("mlserver", "binary") and clients != levels[0]:
                                continue  # MLServer does not implement the binary extension: its errors, at one level
                            result = asyncio.run(run_load([mode], clients, args.seconds, "m", http, grpc,
                                                          server_pid=proc.pid))[mode]
                            cells.setdefault((server, mode, clients), []).append(result)
                            print(line(f"[{repeat + 1}/{args.repeats}] {server} {mode} x{clients}", result), flush=True)
            finally:
                stop([proc for proc, _, _ in started.values()])
    runs = [{"server": s, "mode": m, "concurrency": c, "result": median_result(rs), "repeats": rs}
            for (s, m, c), rs in sorted(cells.items(), key=lambda kv: (servers.index(kv[0][0]), modes.index(kv[0][1]), kv[0][2]))]
    report_ratios = ratios(cells, servers, modes, levels)
    report = {"ratios": report_ratios, "model": str(args.model), "seconds": args.seconds, "repeats": args.repeats, "mlserver_threads": args.mlserver_threads, "max_batch_size": args.max_batch_size,
              "max_delay_ms": args.max_delay_ms, "mlserver_version": args.mlserver_version,
              "mlserver_workers": args.mlserver_workers, "mlserver_batch_size": args.mlserver_batch_size,
              "mlserver_batch_ms": args.mlserver_batch_ms, "server_args": args.server_args, "runs": runs, "machine": machine(gpu=False),
              "triton": "not run: Triton ships as a container image; this script starts Python processes only"}
    if args.out:
        save_report(args.out, "serve_peers", report, markdown(report))


if __name__ == "__main__":
    main()
