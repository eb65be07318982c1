"""resnet-edge `serve` side by side with Seldon MLServer: the same ONNX model, the same load generator
(serve_loadgen.py) and client settings, one server at a time on the same machine.

MLServer runs in its own virtual environment (--venv, created here with `pip install mlserver==VERSION
onnxruntime numpy` unless it exists; never in ours) with a custom runtime: an ONNX Runtime
InferenceSession behind MLServer's MLModel, UINT8 [N, 784] in, logits out, and MLServer's adaptive
batching on (max_batch_size / max_batch_time as ours: --max-batch-size, --max-delay-ms), parallel
workers as --mlserver-workers (0: inference in the main process). Triton is not run here: it ships as a
container image and this script starts only Python processes.

For each server, protocol (json, binary, grpc) and concurrency: --seconds of closed-loop single-image
requests; req/s, p50, p99, errors. Writes serve_peers.json and serve_peers.md to --out.

    python benchmarks/serve_peers.py --model exported/resnet8/model.int8.onnx --concurrency 1,8,32,128 \
        --seconds 20 --out benchmarks/results/cpu/serve_peers
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
from serve_loadgen import MODES, free_port, line, run_load, wait_ready  # noqa: E402

from resnet_edge.machine import machine  # noqa: E402

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
        subprocess.run([str(python), "-m", "pip", "install", "-q", f"mlserver=={version}", "onnxruntime", "numpy"], check=True)
    return venv / "bin" / "mlserver"


def mlserver_folder(model: Path, folder: Path, http: int, grpc: int, args: argparse.Namespace) -> None:
    (folder / "runtime.py").write_text(RUNTIME)
    (folder / "settings.json").write_text(json.dumps({
        "http_port": http, "grpc_port": grpc, "host": "127.0.0.1", "parallel_workers": args.mlserver_workers,
        "metrics_endpoint": None, "metrics_port": free_port(), "debug": False, "logging_settings": None}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": "m", "implementation": "runtime.OnnxDigits", "max_batch_size": args.max_batch_size,
        "max_batch_time": args.max_delay_ms / 1e3,
        "parameters": {"uri": str(model.resolve()), "extra": {"threads": args.threads or 0}}}))


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
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=workdir)
    wait_ready(proc, f"http://127.0.0.1:{http}/v2/models/m/ready", lambda: log.read_text()[-2000:])
    return proc, http, grpc


def markdown(report: dict) -> str:
    rows = ["| server | protocol | concurrency | req/s | p50 ms | p99 ms | errors |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in report["runs"]:
        x = r["result"]
        fmt = (lambda v: f"{v:.1f}" if v is not None else "-")
        rows.append(f"| {r['server']} | {r['mode']} | {r['concurrency']} | {x['requests_per_second']:,.0f} | "
                    f"{fmt(x['p50_ms'])} | {fmt(x['p99_ms'])} | {x['errors']}{' ' + ', '.join(x['error_kinds']) if x['errors'] else ''} |")
    m = report["machine"]
    return (f"# resnet-edge vs MLServer {report['mlserver_version']}\n\nModel {report['model']}; {report['seconds']} s per "
            f"cell, one image per request, closed-loop clients; batching max {report['max_batch_size']} rows, "
            f"{report['max_delay_ms']} ms; MLServer parallel_workers {report['mlserver_workers']}.\n"
            f"Machine: {m.get('cpu', m)}\n\nMLServer {report['mlserver_version']} answers the binary tensor data "
            f"extension with errors (it does not implement it); Triton: {report['triton']}.\n\n" + "\n".join(rows) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--server-args", default="", help="extra resnet-edge serve options, e.g. '--max-pending-bytes "
                    "1073741824' (gRPC runs at most max-pending-bytes / max-body-bytes RPCs at once: 32 by default)")
    ap.add_argument("--max-delay-ms", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=None)
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
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for server in servers:
            proc, http, grpc = start(server, args.model, Path(tmp), args, mlserver)
            try:
                for mode in modes:
                    for clients in levels:
                        result = asyncio.run(run_load([mode], clients, args.seconds, "m", http, grpc))[mode]
                        runs.append({"server": server, "mode": mode, "concurrency": clients, "result": result})
                        print(line(f"{server} {mode} x{clients}", result), flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    report = {"model": str(args.model), "seconds": args.seconds, "max_batch_size": args.max_batch_size,
              "max_delay_ms": args.max_delay_ms, "mlserver_version": args.mlserver_version,
              "mlserver_workers": args.mlserver_workers, "runs": runs, "machine": machine(gpu=False),
              "triton": "not run: Triton ships as a container image; this script starts Python processes only"}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "serve_peers.json").write_text(json.dumps(report, indent=2) + "\n")
        (args.out / "serve_peers.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
