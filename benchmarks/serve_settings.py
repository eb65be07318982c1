"""Which `serve` settings answer fastest on this machine, and how much faster binary and gRPC are than
JSON under each: several configurations of `resnet-edge serve`, all up at once, measured in short
slices that alternate between them.

Each --setting is NAME=SERVE-OPTIONS (e.g. "threads1=--threads 1"; "default=" for serve's defaults;
every server also gets --max-batch-size 64 and --max-pending-bytes 1 GiB so that gRPC admits all the
clients). In each round every setting runs every mode (json, binary, grpc, or the stream; serve_loadgen's closed-loop
clients, one image per request) for --slice seconds after a short warm-up, one slice after another. On
a shared machine whose speed drifts by tens of percent over minutes, slices of a second or two that
alternate many times see the same machine; ratios are taken within each round (a setting's binary
slice against its json slice just before it; a setting against the first setting in the same mode) and
summarized by their median and quartiles. Reported per setting and mode: req/s over all slices, the
median slice's p99, rows per ONNX Runtime call (from /stats), and CPU microseconds per answered request
(server with all its threads, and this load generator).

    python benchmarks/serve_settings.py --model exported/resnet8/model.int8.onnx \\
        --setting default= --setting "threads1=--threads 1" --setting "instances2=--instances 2" \\
        --modes json,binary --rounds 20 --out benchmarks/results/cpu/serve_settings

--checkout NAME=DIR runs setting NAME with another checkout's serve code (e.g. a `git worktree` holding a
change), for an A/B of a change to the hot path under the same alternating slices:

    python benchmarks/serve_settings.py --model exported/resnet8/model.int8.onnx --setting shipped= \\
        --setting variant= --checkout variant=/tmp/variant --modes stream --rounds 10 --slice 5
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
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import ALL_MODES, MODES, free_port, launch, line, machine_line, run_load, save_report, stop  # noqa: E402

from resnet_edge.core.machine import machine  # noqa: E402

BASE_ARGS = ["--max-batch-size", "64", "--max-pending-bytes", str(2**30)]


def start(name: str, options: str, model: Path, workdir: Path, checkout: Path | None = None
          ) -> tuple[subprocess.Popen, int, int]:
    """serve with ``options``; with ``checkout``, that checkout's resnet_edge/ (first on PYTHONPATH)."""
    http, grpc = free_port(), free_port()
    log = workdir / f"{name}.log"
    cmd = [sys.executable, "-m", "resnet_edge", "serve", "--model", str(model), "--model-name", "m", "--port", str(http),
           "--grpc-port", str(grpc), *BASE_ARGS, *options.split()]
    env = {**os.environ, "PYTHONPATH": str(checkout)} if checkout else None
    return launch(cmd, log, http, cwd=workdir, env=env), http, grpc


def batch_counts(http: int) -> tuple[int, int]:
    """(rows answered, ONNX Runtime calls) so far, from the statistics route."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/models/m/stats", timeout=10) as r:
        stats = json.load(r)["model_stats"][0]
    return stats["inference_count"], stats["execution_count"]


def quartiles(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "rounds": len(values)}


def summarize_cell(slices: list[dict]) -> dict:
    n = sum(s["requests"] for s in slices)
    return {"requests": n, "errors": sum(s["errors"] for s in slices),
            "error_kinds": sorted({k for s in slices for k in s["error_kinds"]})[:10],
            "requests_per_second": n / sum(s["seconds"] for s in slices),
            "median_slice_p99_ms": statistics.median(s["p99_ms"] for s in slices if s["p99_ms"] is not None) if n else None,
            "rows_per_batch": sum(s["rows"] for s in slices) / max(1, sum(s["batches"] for s in slices)),
            "server_cpu_us": 1e6 * sum(s["server_cpu_s"] for s in slices) / n if n else None,
            "client_cpu_us": 1e6 * sum(s["client_cpu_s"] for s in slices) / n if n else None,
            "loop_cpu_us": 1e6 * sum(s["server_loop_cpu_s"] for s in slices) / n if n else None}


def ratios(cells: dict[tuple, list[dict]], names: list[str], modes: list[str]) -> list[dict]:
    out = []
    pairs = [(f"{s}: {m} / json", (s, m), (s, "json")) for s in names for m in modes if m != "json" and "json" in modes]
    pairs += [(f"{m}: {s} / {names[0]}", (s, m), (names[0], m)) for m in modes for s in names[1:]]
    for label, a, b in pairs:
        per_round = [x["requests_per_second"] / y["requests_per_second"] for x, y in zip(cells[a], cells[b])
                     if x["requests"] and y["requests"]]
        if per_round:
            out.append({"ratio": label, **quartiles(per_round), "per_round": per_round})
    return out


def _code_of(report: dict, setting: str) -> str:
    checkout = report.get("checkouts", {}).get(setting)
    return f", the code of {checkout}" if checkout else ""


def markdown(report: dict) -> str:
    rows = ["| setting | serve options | mode | req/s | p99 ms (median slice) | rows per batch | CPU us/request: server | "
            "its event loop | client | errors |", "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for c in report["cells"]:
        x = c["result"]
        rows.append(f"| {c['setting']} | `{report['settings'][c['setting']] or '(defaults)'}`{_code_of(report, c['setting'])} | {c['mode']} | "
                    f"{x['requests_per_second']:,.0f} | {x['median_slice_p99_ms'] or 0:.1f} | {x['rows_per_batch']:.1f} | "
                    f"{x['server_cpu_us'] or 0:.0f} | {x['loop_cpu_us'] or 0:.0f} | {x['client_cpu_us'] or 0:.0f} | {x['errors']} |")
    loop_rows = "".join(
        f"| {s}: {m} / json | {jx['loop_cpu_us'] / mx['loop_cpu_us']:.2f}x |\n"
        for s in report["settings"] for m in report["modes"] if m != "json"
        for jx in [_cell(report, s, "json")] for mx in [_cell(report, s, m)] if jx and mx and mx["loop_cpu_us"])
    ratio_rows = "".join(f"| {r['ratio']} | {r['median']:.2f}x | {r['q1']:.2f}-{r['q3']:.2f}x | {r['rounds']} |\n"
                         for r in report["ratios"])
    return (f"# `serve` settings side by side ({report['model']})\n\nMachine: {machine_line(report['machine'])}\n\n"
            f"{report['clients']} closed-loop clients, one image per request; {report['rounds']} rounds, each running every "
            f"setting in every mode for {report['slice_s']} s (after {report['warmup_s']} s of warm-up); all servers up at "
            f"once, with `{' '.join(BASE_ARGS)}`. req/s over all slices; CPU per answered request over all slices.\n\n"
            + "\n".join(rows) + "\n\nRatios of req/s taken within each round, median and quartiles over rounds:\n\n"
            "| ratio | median | middle half | rounds |\n| --- | ---: | ---: | ---: |\n" + ratio_rows
            + ("" if not loop_rows else "\nThe event loop's CPU per request (serve's main thread: HTTP and gRPC handlers, checks, "
               "the batcher; not ONNX Runtime or grpcio's threads) bounds req/s where everything else has cores of its own; "
               "its ratio says how much faster than json a mode could be there (json's loop CPU / the mode's):\n\n"
               "| mode vs json, event loop bound | ratio |\n| --- | ---: |\n" + loop_rows))


def _cell(report: dict, setting: str, mode: str) -> dict | None:
    return next((c["result"] for c in report["cells"] if c["setting"] == setting and c["mode"] == mode), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--setting", action="append", default=[], help="NAME=SERVE-OPTIONS; repeat (the first is the baseline)")
    ap.add_argument("--checkout", action="append", default=[],
                    help="NAME=DIR: setting NAME runs the serve code of the checkout DIR (a change tried before keeping it)")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--slice", type=float, default=1.5, help="seconds a slice measures")
    ap.add_argument("--warmup", type=float, default=0.3, help="seconds before each slice, not counted")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    settings = dict(s.split("=", 1) if "=" in s else (s, "") for s in args.setting or ["default="])
    modes = args.modes.split(",")
    if not set(modes) <= set(ALL_MODES) or not 0 < args.slice <= 60 or args.rounds < 1 or not 1 <= args.clients <= 512:
        raise SystemExit("--modes from json,binary,grpc,stream; --slice up to 60 s; --rounds >= 1; --clients 1-512")
    names = list(settings)
    checkouts = {n: Path(d).resolve() for n, d in (c.split("=", 1) for c in args.checkout if "=" in c)}
    if len(checkouts) != len(args.checkout) or not set(checkouts) <= set(names) or not all(
            (d / "resnet_edge").is_dir() for d in checkouts.values()):
        raise SystemExit("--checkout NAME=DIR: NAME one of the --setting names, DIR a checkout holding resnet_edge/")
    cells: dict[tuple, list[dict]] = {(s, m): [] for s in names for m in modes}
    with tempfile.TemporaryDirectory() as tmp:
        started: dict[str, tuple] = {}
        try:
            for name in names:
                started[name] = start(name, settings[name], args.model.resolve(), Path(tmp), checkouts.get(name))
            for r in range(args.rounds):
                for name, (proc, http, grpc) in started.items():
                    for mode in modes:
                        rows0, batches0 = batch_counts(http)
                        result = asyncio.run(run_load([mode], args.clients, args.slice, "m", http, grpc,
                                                      warmup=args.warmup, server_pid=proc.pid))[mode]
                        rows1, batches1 = batch_counts(http)  # the warm-up's batches too: a rate, not a count
                        result["rows"], result["batches"] = rows1 - rows0, batches1 - batches0
                        cells[(name, mode)].append(result)
                        print(line(f"[{r + 1}/{args.rounds}] {name} {mode}", result), flush=True)
        finally:
            stop([proc for proc, _, _ in started.values()])
    report = {"model": str(args.model), "settings": settings, "checkouts": {n: str(d) for n, d in checkouts.items()},
              "modes": modes, "clients": args.clients,
              "slice_s": args.slice, "warmup_s": args.warmup, "rounds": args.rounds, "machine": machine(gpu=False),
              "cells": [{"setting": s, "mode": m, "result": summarize_cell(cells[(s, m)])} for s in names for m in modes],
              "ratios": ratios(cells, names, modes),
              "slices": {f"{s} {m}": [{k: v for k, v in x.items() if k in ("requests", "seconds", "requests_per_second",
                                                                         "p99_ms", "errors", "rows", "batches")}
                                      for x in cells[(s, m)]] for s in names for m in modes}}
    print(markdown(report))
    if args.out:
        save_report(args.out, "serve_settings", report, markdown(report))


if __name__ == "__main__":
    main()
