"""resnet-edge `serve` side by side with its peers, Seldon MLServer and NVIDIA Triton: the same ONNX model,
the same load generator (serve_loadgen.py) and client settings, on the same machine.

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
MLServer's req/s. resnet-edge runs with serve's defaults unless --server-args says otherwise.

Triton runs without a container (triton_peer.py): nvidia-pytriton 0.7.0 from PyPI bundles tritonserver
2.51 with its Python backend, in its own virtual environment (--triton-venv; it needs numpy < 2). Triton's
C++ HTTP and gRPC front ends and dynamic batcher (up to --max-batch-size rows, --triton-delay-us) take the
requests; each batch goes through the Python backend's stub process to a PyTriton-bound function running
ONNX Runtime's Python API on our model (--triton-instances such functions, --triton-threads intra-op
threads each). Triton's own ONNX Runtime backend (C++) is NOT in the wheel (it ships in NVIDIA's
container images, which these machines cannot run): this is not Triton's fastest path for an ONNX model.
The request bodies are the same for every server (input `pixels` UINT8 [1, 784], output `logits`).
Triton's defaults here come from benchmarks/results/cpu/triton-tuning/ (see its README.md).

Protocols (--modes): json, binary (the binary tensor data extension), grpc (unary ModelInfer) and stream
(ModelStreamInfer, one stream per client and one request in flight on it; Triton serves it for this
non-decoupled model too). MLServer gets no stream cells. For each protocol, concurrency and server:
--seconds of closed-loop single-image requests, --repeats times (servers restarted between repeats).
Within a repeat all servers are up and the cells go level by level, every protocol on every server in
turn, so the machine's drift (a shared host) hits both sides of a ratio alike; medians of req/s, p50,
p99, of the server's and the client's CPU per request (the server's also split by process: for Triton
the PyTriton process running ONNX Runtime, tritonserver and the stubs), of the rows per ONNX Runtime call
(from each server's /v2/models/m/stats) and of the ratios taken within each repeat; errors summed. With
Triton in the run, the goals of issue 24 are checked at each level (--goals) and, where one is missed,
the report says where the CPU went. Writes serve_peers.json and serve_peers.md to --out.

    python benchmarks/serve_peers.py --model exported/resnet8/model.int8.onnx --servers resnet-edge,triton \
        --concurrency 32 --seconds 10 --repeats 3 --out benchmarks/results/cpu/serve_peers
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
import triton_peer  # noqa: E402
from serve_loadgen import ALL_MODES, free_port, launch, line, machine_line, run_load, save_report, stop  # noqa: E402

from resnet_edge.core.machine import machine  # noqa: E402

START_TRIES = 3  # a server that exits while starting is started again, at most this many times in all
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
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", f"mlserver=={version}", "onnxruntime", "numpy", "uvloop<0.21"],
            check=True,
        )  # its parallel workers fail to start with uvloop 0.21+
    return venv / "bin" / "mlserver"


def mlserver_folder(model: Path, folder: Path, http: int, grpc: int, args: argparse.Namespace) -> None:
    (folder / "runtime.py").write_text(RUNTIME)
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "http_port": http,
                "grpc_port": grpc,
                "host": "127.0.0.1",
                "parallel_workers": args.mlserver_workers,
                "metrics_endpoint": None,
                "metrics_port": free_port(),
                "debug": False,
                "logging_settings": None,
            }
        )
    )
    (folder / "model-settings.json").write_text(
        json.dumps(
            {
                "name": "m",
                "implementation": "runtime.OnnxDigits",
                "max_batch_size": args.mlserver_batch_size,
                "max_batch_time": args.mlserver_batch_ms / 1e3,
                "parameters": {"uri": str(model.resolve()), "extra": {"threads": args.mlserver_threads}},
            }
        )
    )


def start(server: str, model: Path, workdir: Path, args: argparse.Namespace, peers: dict) -> tuple:
    http, grpc = free_port(), free_port()
    log = workdir / f"{server}-{http}.log"
    env = None
    if server == "resnet-edge":
        cmd = (
            [
                sys.executable,
                "-m",
                "resnet_edge",
                "serve",
                "--model",
                str(model),
                "--model-name",
                "m",
                "--port",
                str(http),
                "--grpc-port",
                str(grpc),
                "--max-batch-size",
                str(args.max_batch_size),
                "--max-delay-ms",
                str(args.max_delay_ms),
            ]
            + (["--threads", str(args.threads)] if args.threads else [])
            + args.server_args.split()
        )
    elif server == "triton":
        cmd = triton_peer.command(
            peers["triton"],
            model,
            http,
            grpc,
            workdir / f"triton-workspace-{http}",
            args.triton_delay_us,
            args.triton_instances,
            args.triton_threads,
            args.max_batch_size,
            args.triton_http_threads,
        )
    else:
        folder = workdir / "mlserver"
        folder.mkdir(exist_ok=True)
        mlserver_folder(model, folder, http, grpc, args)
        cmd, env = [str(peers["mlserver"]), "start", str(folder)], {**os.environ, "PYTHONPATH": str(folder)}
    return launch(cmd, log, http, env=env, cwd=workdir), http, grpc


def start_retrying(
    server: str, model: Path, workdir: Path, args: argparse.Namespace, peers: dict, failures: dict
) -> tuple:
    """start(), tried up to START_TRIES times when the server exits while starting: PyTriton's model sometimes
    fails its handshake at load ("Model initialize error ... ConnectionRefusedError" from its handshake
    socket; once in six starts on a 2-core AMD EPYC). Each failed start is counted in ``failures`` (the
    report keeps the count and the end of the log), so a flaky start costs a retry, not the whole run. A
    server that stays up and never gets ready is not tried again (wait_ready has waited two minutes)."""
    for attempt in range(1, START_TRIES + 1):
        try:
            return start(server, model, workdir, args, peers)
        except SystemExit as exc:
            failures.setdefault(server, []).append(str(exc)[-300:])
            print(f"{server} did not start (try {attempt} of {START_TRIES}): {str(exc)[-200:]}", flush=True)
            if attempt == START_TRIES or not str(exc).startswith("server exited"):
                raise
    raise AssertionError("unreachable")


def batch_counts(http: int) -> tuple[int, int] | None:
    """(images answered, ONNX Runtime calls) so far from the server's /v2/models/m/stats (Triton's statistics
    extension; resnet-edge serves it too, MLServer does not): None where it does not answer."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/m/stats", timeout=5) as r:
            stats = json.load(r)["model_stats"][0]
        return int(stats["inference_count"]), int(stats["execution_count"])
    except (OSError, ValueError, KeyError, IndexError):
        return None


def skipped(server: str, mode: str, clients: int, levels: list[int]) -> bool:
    """MLServer: no binary extension (its errors, at the first level only), no stream cells."""
    return server == "mlserver" and (mode == "stream" or (mode == "binary" and clients != levels[0]))


def median_result(results: list[dict]) -> dict:
    """Medians of req/s, latency percentiles, CPU microseconds per answered request (server, its processes,
    client), the share of the machine's cores they kept busy, and rows per ONNX Runtime call over repeats;
    errors summed."""
    import statistics

    for r in results:
        n = r["requests"]
        for who in ("server", "client"):
            r[f"{who}_cpu_us"] = 1e6 * r[f"{who}_cpu_s"] / n if r.get(f"{who}_cpu_s") and n else None
        r["server_cpu_us_by_process"] = (
            {k: 1e6 * v / n for k, v in r.get("server_cpu_s_by_process", {}).items()} if n else {}
        )
        loop = r.get("server_loop_cpu_s")  # the main thread: serve's event loop (not meaningful for the peers)
        r["server_loop_cpu_us"] = 1e6 * loop / n if loop and n else None
        r["cores_busy"] = (
            (r.get("server_cpu_s", 0) + r.get("client_cpu_s", 0)) / r["seconds"] if r.get("seconds") else None
        )

    out = {
        "requests": sum(r["requests"] for r in results),
        "errors": sum(r["errors"] for r in results),
        "error_kinds": sorted({k for r in results for k in r["error_kinds"]})[:10],
    }
    for key in (
        "requests_per_second",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "server_cpu_us",
        "client_cpu_us",
        "cores_busy",
        "rows_per_batch",
        "server_loop_cpu_us",
    ):
        values = [r[key] for r in results if r.get(key) is not None]
        out[key] = statistics.median(values) if values else None
    names = {k for r in results for k in r["server_cpu_us_by_process"]}
    out["server_cpu_us_by_process"] = {
        k: statistics.median(r["server_cpu_us_by_process"].get(k, 0.0) for r in results if r["requests"])
        for k in sorted(names)
    }
    return out


def ratios(cells: dict[tuple, list[dict]], servers: list[str], modes: list[str], levels: list[int]) -> list[dict]:
    """Ratios taken within each repeat (cells of one level run one after another), then the median: req/s of
    resnet-edge over each peer on each protocol (and p99 of resnet-edge over the peer's), resnet-edge's
    binary, grpc and stream req/s over its own json, and its stream over its unary grpc."""
    import statistics

    pairs = []
    for clients in levels:
        for mode in modes:
            for peer in ("mlserver", "triton"):
                if peer in servers and (peer, mode) != ("mlserver", "binary"):
                    pairs.append(
                        (f"resnet-edge / {peer}, {mode}", ("resnet-edge", mode, clients), (peer, mode, clients))
                    )
            if mode != "json" and "json" in modes:
                pairs.append(
                    (
                        f"resnet-edge {mode} / resnet-edge json",
                        ("resnet-edge", mode, clients),
                        ("resnet-edge", "json", clients),
                    )
                )
        if "stream" in modes and "grpc" in modes:
            pairs.append(
                (
                    "resnet-edge stream / resnet-edge grpc",
                    ("resnet-edge", "stream", clients),
                    ("resnet-edge", "grpc", clients),
                )
            )
    out = []
    for label, a, b in pairs:
        if a in cells and b in cells:
            per_repeat = [
                x["requests_per_second"] / y["requests_per_second"]
                for x, y in zip(cells[a], cells[b], strict=True)
                if y["requests_per_second"]
            ]
            p99 = [
                x["p99_ms"] / y["p99_ms"]
                for x, y in zip(cells[a], cells[b], strict=True)
                if x["p99_ms"] and y["p99_ms"]
            ]
            if per_repeat:
                out.append(
                    {
                        "ratio": label,
                        "concurrency": a[2],
                        "median": statistics.median(per_repeat),
                        "per_repeat": per_repeat,
                        "p99_median": statistics.median(p99) if p99 else None,
                        "p99_per_repeat": p99,
                    }
                )
    return out


GOALS = (  # issue 24: (ratio label, what is compared, bound, at least / at most)
    ("resnet-edge / triton, json", "req/s", 3.0, ">="),
    ("resnet-edge / triton, binary", "req/s", 3.0, ">="),
    ("resnet-edge / triton, grpc", "req/s", 2.0, ">="),
    ("resnet-edge / triton, stream", "req/s", 2.0, ">="),
    ("resnet-edge / triton, json", "p99", 0.5, "<="),
    ("resnet-edge / triton, binary", "p99", 0.5, "<="),
    ("resnet-edge / triton, grpc", "p99", 0.5, "<="),
    ("resnet-edge / triton, stream", "p99", 0.5, "<="),
    ("resnet-edge stream / resnet-edge grpc", "req/s", 1.5, ">="),
    ("resnet-edge stream / resnet-edge json", "req/s", 1.0, ">="),
)


def goals(report_ratios: list[dict]) -> list[dict]:
    """Each goal of GOALS at each level where its ratio was measured: the median ratio and whether it holds."""
    out = []
    for label, what, bound, op in GOALS:
        for r in report_ratios:
            value = r["median"] if what == "req/s" else r["p99_median"]
            if r["ratio"] == label and value is not None:
                holds = value >= bound if op == ">=" else value <= bound
                out.append(
                    {
                        "goal": f"{label}: {what} {op} {bound:g}x",
                        "concurrency": r["concurrency"],
                        "measured": value,
                        "holds": holds,
                    }
                )
    return out


def cpu_story(report: dict) -> list[str]:
    """Where the CPU went, one line per server, protocol and level."""
    lines = []
    for r in report["runs"]:
        x = r["result"]
        if not x["requests"] or x["server_cpu_us"] is None:
            continue
        roles = triton_peer.PROCESSES if r["server"] == "triton" else {}
        split = ", ".join(f"{roles.get(k, k)} {v:,.0f}" for k, v in x["server_cpu_us_by_process"].items() if v >= 0.5)
        if r["server"] == "resnet-edge" and x.get("server_loop_cpu_us"):  # its serial part: req/s <= 1 / this
            split += (
                f"; its event-loop thread {x['server_loop_cpu_us']:,.0f}, which alone caps req/s at "
                f"{1e6 / x['server_loop_cpu_us']:,.0f}"
            )
        rows = f"; {x['rows_per_batch']:.1f} rows per ONNX Runtime call" if x.get("rows_per_batch") else ""
        lines.append(
            f"- {r['server']} {r['mode']} x{r['concurrency']}: {x['requests_per_second']:,.0f} req/s; "
            f"server {x['server_cpu_us']:,.0f} us of CPU a request ({split}), client {x['client_cpu_us']:,.0f} us; "
            f"{x['cores_busy']:.2f} of {report['machine'].get('logical_cores')} cores busy{rows}"
        )
    return lines


def markdown(report: dict) -> str:
    def fmt(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    rows = [
        "| server | protocol | concurrency | req/s | p50 ms | p99 ms | CPU us/request: server | client | cores busy "
        "| rows/batch | errors |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["runs"]:
        x = r["result"]
        rows.append(
            f"| {r['server']} | {r['mode']} | {r['concurrency']} | {x['requests_per_second']:,.0f} | "
            f"{fmt(x['p50_ms'])} | {fmt(x['p99_ms'])} | {fmt(x.get('server_cpu_us'), ',.0f')} | "
            f"{fmt(x.get('client_cpu_us'), ',.0f')} | {fmt(x.get('cores_busy'), '.2f')} | "
            f"{fmt(x.get('rows_per_batch'))} | "
            f"{x['errors']}{' ' + ', '.join(x['error_kinds']) if x['errors'] else ''} |"
        )
    servers = report["servers"]
    setup = [
        f"resnet-edge batches up to {report['max_batch_size']} rows, --max-delay-ms {report['max_delay_ms']}"
        + (f", serve options `{report['server_args']}`" if report["server_args"] else "")
    ]
    if "mlserver" in servers:
        setup.append(
            f"MLServer {report['mlserver_version']}: max_batch_size {report['mlserver_batch_size']}, max_batch_time "
            f"{report['mlserver_batch_ms']} ms, parallel_workers {report['mlserver_workers']}, "
            f"{report['mlserver_threads']} ONNX Runtime threads (it does not implement the binary extension: its "
            f"errors, at the first level only; no stream cells)"
        )
    if "triton" in servers:
        t = report["triton"]
        setup.append(
            f"Triton: {t['server']}; dynamic batching up to {report['max_batch_size']} rows, "
            f"max_queue_delay_microseconds {t['delay_us']}, {t['instances']} instance(s) with {t['threads']} "
            f"ONNX Runtime thread(s) each (0: its default), HTTP threads {t['http_threads'] or 'Triton default'}. "
            f"{t['note']}"
        )
    text = (
        f"# resnet-edge vs {', '.join(s for s in servers if s != 'resnet-edge')}\n\n"
        f"Model {report['model']}; {report['seconds']} s per cell, {report['repeats']} repeats (medians; in each, all "
        f"servers up at once and the cells run level by level, every protocol on every server in turn), one image "
        f"per request, closed-loop clients (stream: one ModelStreamInfer stream per client, one request in flight).\n"
        f"Machine: {machine_line(report['machine'])}\n\n"
        + "\n".join(f"- {x}" for x in setup)
        + "\n\n"
        + "\n".join(rows)
        + "\n"
    )
    if report.get("ratios"):
        text += (
            "\nRatios, taken within each repeat between cells of the same level measured one after another, median "
            "over repeats (req/s: a / b; p99: a's p99 / b's p99):\n\n| ratio | concurrency | req/s | per repeat | p99 "
            "| per repeat |\n| --- | ---: | ---: | --- | ---: | --- |\n"
            + "".join(
                f"| {r['ratio']} | {r['concurrency']} | {r['median']:.2f}x | "
                f"{', '.join(f'{v:.2f}' for v in r['per_repeat'])} | {fmt(r['p99_median'], '.2f')}x | "
                f"{', '.join(f'{v:.2f}' for v in r['p99_per_repeat'])} |\n"
                for r in report["ratios"]
            )
        )
    if report.get("goals"):
        text += (
            "\nGoals (issue 24):\n\n| goal | concurrency | measured | holds |\n| --- | ---: | ---: | --- |\n"
            + "".join(
                f"| {g['goal']} | {g['concurrency']} | {g['measured']:.2f}x | {'yes' if g['holds'] else '**no**'} |\n"
                for g in report["goals"]
            )
        )
    text += (
        "\nWhere the CPU went (server: all its processes, split by process name; client: this load generator; "
        "cores busy: both together over the cell's seconds; rows per ONNX Runtime call from /v2/models/m/stats). "
        "Triton's processes: PyTriton+ONNX Runtime (triton_peer.py's process: the bound function, PyTriton's proxy), "
        "PyTriton "
        "tensor store (a multiprocessing manager handing out the shared-memory blocks for inputs and outputs), the "
        "Python backend stub, tritonserver (HTTP, gRPC, dynamic batcher, Python backend):\n\n"
        + "\n".join(cpu_story(report))
        + "\n"
    )
    if report.get("stopped_early"):
        text += f"\n**Fewer repeats than asked**: the run stopped {report['stopped_early']!r}\n"
    for server, why in report.get("failed_starts", {}).items():
        text += (
            f"\n{server} failed to start {len(why)} time(s) (tried up to {START_TRIES} times a repeat); "
            f"its log ended: {why[-1]!r}\n"
        )
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--concurrency", default="1,8,32,128")
    ap.add_argument("--modes", default=",".join(ALL_MODES))
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-batch-size", type=int, default=64, help="ours and Triton's")
    ap.add_argument(
        "--server-args",
        default="",
        help="extra resnet-edge serve options, e.g. '--max-pending-bytes "
        "1073741824' (gRPC runs at most max-pending-bytes / max-body-bytes RPCs at once: 32 by default)",
    )
    ap.add_argument("--max-delay-ms", type=float, default=0.0, help="ours (serve's default: 0)")
    ap.add_argument(
        "--mlserver-batch-size", type=int, default=64, help="MLServer's max_batch_size (1: no adaptive batching)"
    )
    ap.add_argument("--mlserver-batch-ms", type=float, default=0.5, help="MLServer's max_batch_time, in ms")
    ap.add_argument("--threads", type=int, default=None, help="ours: serve --threads (default: ONNX Runtime's)")
    ap.add_argument(
        "--mlserver-threads", type=int, default=1, help="MLServer's ONNX Runtime intra-op threads (0: its default)"
    )
    ap.add_argument("--repeats", type=int, default=3, help="runs of every cell (servers restarted); medians reported")
    ap.add_argument("--servers", default="resnet-edge,triton,mlserver")
    ap.add_argument("--mlserver-version", default="1.7.1")
    ap.add_argument("--mlserver-workers", type=int, default=0)
    ap.add_argument(
        "--venv", type=Path, default=Path(tempfile.gettempdir()) / "resnet-edge-peers-venv", help="MLServer's"
    )
    ap.add_argument(
        "--triton-venv",
        type=Path,
        default=Path(tempfile.gettempdir()) / "peers" / "triton",
        help="PyTriton's virtual environment (created unless it has nvidia-pytriton==--pytriton-version)",
    )
    ap.add_argument("--pytriton-version", default=triton_peer.PYTRITON_VERSION)
    ap.add_argument("--triton-delay-us", type=int, default=0, help="Triton's max_queue_delay_microseconds")
    ap.add_argument("--triton-instances", type=int, default=2, help="Triton model instances (PyTriton functions)")
    ap.add_argument(
        "--triton-threads",
        type=int,
        default=1,
        help="ONNX Runtime intra-op threads per Triton instance (0: its default)",
    )
    ap.add_argument("--triton-http-threads", type=int, default=0, help="Triton's HTTP threads (0: Triton's default)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    modes, servers = args.modes.split(","), args.servers.split(",")
    if (
        not set(modes) <= set(ALL_MODES)
        or not all(1 <= c <= 512 for c in levels)
        or not 0 < args.seconds <= 600
        or not set(servers) <= {"resnet-edge", "mlserver", "triton"}
    ):
        raise SystemExit(
            "--modes from json,binary,grpc,stream; --servers from resnet-edge,mlserver,triton; "
            "--concurrency 1-512; --seconds up to 600"
        )
    peers = {
        "mlserver": ensure_venv(args.venv, args.mlserver_version) if "mlserver" in servers else None,
        "triton": triton_peer.ensure_venv(args.triton_venv, args.pytriton_version) if "triton" in servers else None,
    }
    cells: dict[tuple, list[dict]] = {}
    failures: dict[str, list[str]] = {}  # failed starts, by server
    stopped_early = None  # why the repeats ended before --repeats (a server that would not start)
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            started = {}  # every server up at once (idle while another is measured), cells interleaved:
            try:  # a drift in the machine's speed hits both sides of a comparison alike
                try:
                    for server in servers:
                        started[server] = start_retrying(server, args.model.resolve(), Path(tmp), args, peers, failures)
                except SystemExit as exc:
                    if not cells:
                        raise
                    print(f"stopped before repeat {repeat + 1}, the repeats done are reported: {exc}", flush=True)
                    stopped_early = f"before repeat {repeat + 1}: {str(exc)[-300:]}"
                    break
                for clients in levels:  # at each level, every protocol on every server, one after another
                    for mode in modes:
                        for server, (proc, http, grpc) in started.items():
                            if skipped(server, mode, clients, levels):
                                continue
                            before = batch_counts(http)
                            result = asyncio.run(
                                run_load([mode], clients, args.seconds, "m", http, grpc, server_pid=proc.pid)
                            )[mode]
                            after = batch_counts(http)  # warm-up included: rows per call, not a count of requests
                            if before and after and after[1] > before[1]:
                                result["rows_per_batch"] = (after[0] - before[0]) / (after[1] - before[1])
                            cells.setdefault((server, mode, clients), []).append(result)
                            print(line(f"[{repeat + 1}/{args.repeats}] {server} {mode} x{clients}", result), flush=True)
            finally:
                stop([proc for proc, _, _ in started.values()])
    runs = [
        {"server": s, "mode": m, "concurrency": c, "result": median_result(rs), "repeats": rs}
        for (s, m, c), rs in sorted(
            cells.items(), key=lambda kv: (servers.index(kv[0][0]), kv[0][2], modes.index(kv[0][1]))
        )
    ]
    report_ratios = ratios(cells, servers, modes, levels)
    report = {
        "ratios": report_ratios,
        "goals": goals(report_ratios) if "triton" in servers else [],
        "servers": servers,
        "modes": modes,
        "model": str(args.model),
        "seconds": args.seconds,
        "repeats": args.repeats,
        "mlserver_threads": args.mlserver_threads,
        "max_batch_size": args.max_batch_size,
        "max_delay_ms": args.max_delay_ms,
        "threads": args.threads,
        "mlserver_version": args.mlserver_version,
        "mlserver_workers": args.mlserver_workers,
        "mlserver_batch_size": args.mlserver_batch_size,
        "mlserver_batch_ms": args.mlserver_batch_ms,
        "server_args": args.server_args,
        "runs": runs,
        "failed_starts": failures,
        "stopped_early": stopped_early,
        "machine": machine(gpu=False),
        "triton": {
            "server": f"nvidia-pytriton {args.pytriton_version} (its bundled tritonserver, Python backend; "
            "ONNX Runtime's Python API in the PyTriton-bound function)",
            "delay_us": args.triton_delay_us,
            "instances": args.triton_instances,
            "threads": args.triton_threads,
            "http_threads": args.triton_http_threads,
            "note": "Triton's own ONNX Runtime backend (C++) is not in the PyPI wheel (it ships in NVIDIA's "
            "container images, which this machine cannot run), so it was not measured.",
        },
    }
    if report["goals"]:
        for g in report["goals"]:
            print(f"goal {g['goal']} x{g['concurrency']}: {g['measured']:.2f}x {'holds' if g['holds'] else 'MISSED'}")
    print("\n".join(cpu_story(report)))
    if args.out:
        save_report(args.out, "serve_peers", report, markdown(report))


if __name__ == "__main__":
    main()
