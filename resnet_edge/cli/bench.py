"""`bench`: PyTorch against ONNX Runtime FP32, INT8 (and FP16), with the machine described."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from resnet_edge.cli.app import app
from resnet_edge.cli.console import RUN, console, int_list, note, progress_bars, torch_available, user_errors
from resnet_edge.core.config import BenchConfig
from resnet_edge.core.contract import BENCH_FP32, BENCH_JSON, BENCH_MD, BENCH_PNG, TORCH
from resnet_edge.core.files import resolve_run

PROVIDER = typer.Option(
    BenchConfig.provider, help="ONNX Runtime execution provider: cpu, cuda, tensorrt or a full name."
)
BATCH_SIZES = typer.Option(",".join(map(str, BenchConfig.batch_sizes)), help="Comma-separated batch sizes.")
DURATION = typer.Option(BenchConfig.duration, help="Timed seconds per cell and repeat (and at least --min-runs runs).")
REPEATS = typer.Option(
    BenchConfig.repeats,
    help="Interleaved sweeps over every cell; a low-precision variant is recommended only when its repeats beat "
    "FP32's without overlap.",
)
THREADS = typer.Option(None, help="Intra-op threads for ONNX Runtime and torch (default: the runtime's).")
NO_TORCH = typer.Option(False, "--no-torch", help="Skip PyTorch (and never import it).")
FP16 = typer.Option(
    None,
    "--fp16/--no-fp16",
    help="Measure model.fp16.onnx (default: on GPU providers only; ONNX Runtime's CPU kernels are slow in FP16).",
)
MIN_RUNS = typer.Option(BenchConfig.min_runs, help="Timed runs per cell and repeat, whatever the duration.")
OUT = typer.Option(None, help="Folder for bench.json/.md/.png (default: the run folder).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar.")


@app.command("bench")
@user_errors
def bench_cli(
    run: Path | None = RUN,
    provider: str = PROVIDER,
    batch_sizes: str = BATCH_SIZES,
    duration: float = DURATION,
    repeats: int = REPEATS,
    threads: int | None = THREADS,
    no_torch: bool = NO_TORCH,
    fp16: bool | None = FP16,
    min_runs: int = MIN_RUNS,
    out: Path | None = OUT,
    quiet: bool = QUIET,
) -> None:
    """Latency and throughput of PyTorch eager vs ONNX Runtime FP32 vs INT8, with the machine described."""
    from resnet_edge.bench.runner import run_bench, write_reports
    from resnet_edge.core.files import ensure_writable_dir

    if not no_torch and not torch_available():
        note(
            "note: PyTorch is not installed, so only ONNX Runtime is measured (as with --no-torch; "
            'pip install "resnet-edge[train]" adds it)'
        )
        no_torch = True
    config = BenchConfig(
        provider=provider,
        batch_sizes=int_list(batch_sizes, "--batch-sizes"),
        duration=duration,
        threads=threads,
        torch=not no_torch,
        min_runs=min_runs,
        fp16=fp16,
        repeats=repeats,
    )
    run_dir = resolve_run(run)
    out_dir = out or run_dir
    ensure_writable_dir(out_dir)
    progress, open_bar = progress_bars(quiet)
    with progress:
        report = run_bench(run_dir, config, progress=open_bar)
    write_reports(report, out_dir)
    _print_bench(report)
    console.print(f"-> {out_dir / BENCH_JSON}, {BENCH_MD}, {BENCH_PNG}")


def _print_bench(report: dict[str, Any]) -> None:
    m = report["machine"]
    table = Table(
        title=f"{report['arch']} on {report['provider']}: {m['cpu']}" + (f" / {m['gpu']}" if m["gpu"] else "")
    )
    for col in ("variant", "batch", "p50 ms", "p99 ms", "images/s", "vs torch", "vs FP32", "spread"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    speed = {(r["variant"], r["baseline"], r["batch_size"]): r["speedup_p50"] for r in report["ratios"]}
    for r in report["rows"]:
        vs_torch = speed.get((r["variant"], TORCH, r["batch_size"]))
        vs_fp32 = speed.get((r["variant"], BENCH_FP32, r["batch_size"]))
        table.add_row(
            r["variant"],
            str(r["batch_size"]),
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['throughput']:,.0f}",
            f"{vs_torch:.2f}x" if vs_torch else "",
            f"{vs_fp32:.2f}x" if vs_fp32 else "",
            (f"{100 * r['p50_spread']:.0f} %" + (" !" if r.get("unstable") else "")) if "p50_spread" in r else "",
        )
    console.print_table(table)
    for workload, r in (report.get("recommendation") or {}).items():
        console.print(
            f"recommended for {workload} (batch {r['batch_size']}) on this machine: {r['variant']} ({r['why']})"
        )
    unstable = sum(bool(r.get("unstable")) for r in report["rows"])
    if unstable:
        console.print(
            f"note: {unstable} cells marked ! were unstable (their repeats' p50 spread over 10 %); see bench.md",
            style="yellow",
        )
    for d in report["diagnoses"]:
        console.print(f"note: {d}", style="yellow")
