"""`bench`: PyTorch eager against ONNX Runtime FP32 and INT8, measured honestly, and a recommendation.

The sweep runs each cell (variant x batch size) in a fresh worker process (bench_worker.py), then
gathers the cells, the per-variant facts (size, accuracy from export.json, cold start, memory, INT8
convolutions left in float) and the recommendation per workload (variants.recommend). The report
(ratios, diagnoses, Markdown, plot) is bench_report.py. ``--no-torch`` keeps torch out of the whole
benchmark.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.bench.report import diagnose, ratios, write_reports  # noqa: F401  (write_reports: the CLI's entry)
from resnet_edge.core.config import BenchConfig
from resnet_edge.core.contract import (
    BENCH_FP16,
    BENCH_INT8,
    BENCH_VARIANTS,
    CHECKPOINT,
    EXPORT_REPORT,
    FP32_MODEL,
    TORCH,
    TRAIN_REPORT,
    VARIANT_TABLE,
)
from resnet_edge.core.errors import UserError
from resnet_edge.core.machine import machine
from resnet_edge.core.providers import CPU
from resnet_edge.inference.variants import recommend

VARIANTS = BENCH_VARIANTS
FILES = {TORCH: CHECKPOINT, **{v.bench: v.file for v in VARIANT_TABLE.values()}}
EXPORT_SECTIONS = {v.bench: v.key for v in VARIANT_TABLE.values()}


def _run_cell(variant: str, model: Path, config: BenchConfig, batch_size: int) -> dict[str, Any]:
    args = {
        "variant": variant,
        "model": str(model),
        "provider": config.provider,
        "batch_size": batch_size,
        "duration": config.duration,
        "min_runs": config.min_runs,
        "warmup": config.warmup,
        "threads": config.threads,
    }
    env = dict(os.environ)
    # glibc returns large blocks to the OS and maps them afresh (zeroed) on the next call unless these
    # thresholds are raised; PyTorch eager at batch 256 then varied from 31 to 46 ms between otherwise
    # identical processes. Every variant runs with them, so each reuses its memory as a server would.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**30))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**30))
    proc = subprocess.run(
        [sys.executable, "-m", "resnet_edge.bench.worker", json.dumps(args)], capture_output=True, text=True, env=env
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"benchmark worker for {variant} batch {batch_size} failed: {tail}")
    row = json.loads(lines[-1])
    if "error" in row:
        raise UserError(row["error"])
    return row


UNSTABLE_SPREAD = 0.10  # a cell whose repeats' p50 spread exceeds 10 % of their median is flagged


def combine_repeats(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """One cell's rows from its interleaved repeats -> one row: the median repeat's figures (by p50), each
    repeat's p50, their range and spread, and whether the cell was unstable (spread over UNSTABLE_SPREAD)."""
    ordered = sorted(repeats, key=lambda r: r["p50_ms"])
    row = dict(ordered[len(ordered) // 2])
    p50s = [r["p50_ms"] for r in repeats]
    median = float(np.median(p50s))
    spread = (max(p50s) - min(p50s)) / median if median > 0 else 0.0
    row.update(
        p50_ms=median,
        throughput=row["batch_size"] / (median / 1e3),
        repeats_p50_ms=p50s,
        p50_range_ms=[min(p50s), max(p50s)],
        p50_spread=spread,
        unstable=len(p50s) > 1 and spread > UNSTABLE_SPREAD,
        runs=sum(r["runs"] for r in repeats),
    )
    return row


def run_bench(
    run_dir: Path, config: BenchConfig, progress: Callable[[str, int], Callable[[int], None]] | None = None
) -> dict[str, Any]:
    """Measure every available variant of the run at every batch size; returns the bench.json content."""
    from resnet_edge.core.files import file_sha256

    variants = _variants_to_measure(run_dir, config)
    rows = _measure(run_dir, config, variants, progress)
    export = _read_json(run_dir / EXPORT_REPORT)
    train = _read_json(run_dir / TRAIN_REPORT)
    per_variant = {v: _variant_summary(run_dir, v, rows, train, export) for v in variants}
    arch = (train or export or {}).get("arch")
    report: dict[str, Any] = {
        "run": str(run_dir),
        "arch": arch if isinstance(arch, str) else None,
        "provider": config.provider,
        "settings": asdict(config),
        "machine": machine(config.threads, include_torch=config.torch),
        "rows": rows,
        "variants": per_variant,
        # what was measured, so a later choice can tell whether these figures are about the run's files
        "files": {FILES[v]: file_sha256(run_dir / FILES[v]) for v in variants if v != TORCH},
    }
    report["ratios"] = ratios(rows)
    if BENCH_INT8 in variants:
        from resnet_edge.core.int8 import cpu_problem
        from resnet_edge.core.machine import cpu_info
        from resnet_edge.inference.runtime import check_model_file

        per_variant[BENCH_INT8]["float_convolutions"] = float_convolutions(run_dir / FILES[BENCH_INT8])
        per_variant[BENCH_INT8]["cpu_problem"] = cpu_problem(check_model_file(run_dir / FILES[BENCH_INT8]), cpu_info())
    report["recommendation"] = recommend(rows, _eligibility(export, per_variant))
    report["diagnoses"] = diagnose(report)
    return report


def _variants_to_measure(run_dir: Path, config: BenchConfig) -> list[str]:
    """The run's variants this bench measures; every model file opened once first (fail fast on a bad
    file, before minutes of measuring)."""
    from resnet_edge.inference.runtime import check_provider_available, create_session
    from resnet_edge.inference.variants import check_same_checkpoint

    check_provider_available(config.provider)
    check_same_checkpoint(run_dir)
    variants = [
        v
        for v in VARIANTS
        if (v != TORCH or config.torch) and (v != BENCH_FP16 or config.measures_fp16) and (run_dir / FILES[v]).exists()
    ]
    if not any(v != TORCH for v in variants):
        raise UserError(f"{run_dir}: no {FP32_MODEL} to benchmark (run `resnet-edge export --quantize` first)")
    for v in variants:
        if v != TORCH:
            create_session(run_dir / FILES[v], "cpu")
    return variants


def _measure(
    run_dir: Path,
    config: BenchConfig,
    variants: list[str],
    progress: Callable[[str, int], Callable[[int], None]] | None,
) -> list[dict[str, Any]]:
    """Every (variant, batch size) cell, --repeats times, interleaved: each repeat measures every cell, in
    alternating order, so drift reaches every cell alike; a row per cell with its repeats combined."""
    cells = [(v, bs) for v in variants for bs in config.batch_sizes]
    advance = progress("benchmark", len(cells) * config.repeats) if progress else None
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {cell: [] for cell in cells}
    for repeat in range(config.repeats):
        for variant, bs in cells if repeat % 2 == 0 else cells[::-1]:
            measured[variant, bs].append(_run_cell(variant, run_dir / FILES[variant], config, bs))
            if advance:
                advance(1)
    return [combine_repeats(measured[cell]) for cell in cells]


def _variant_summary(
    run_dir: Path, v: str, rows: list[dict[str, Any]], train: dict[str, Any] | None, export: dict[str, Any] | None
) -> dict[str, Any]:
    """bench.json's facts about one variant: file, size, the accuracy its report gives, start-up and memory."""
    cells = [r for r in rows if r["variant"] == v]
    section = train if v == TORCH else (export or {}).get(EXPORT_SECTIONS[v])
    acc = section.get("test_accuracy") if isinstance(section, dict) else None
    acc = acc if isinstance(acc, (int, float)) and not isinstance(acc, bool) else None  # reports may be edited
    return {
        "file": str(run_dir / FILES[v]),
        "bytes": (run_dir / FILES[v]).stat().st_size,
        "test_accuracy": acc,
        "cold_start_ms": float(np.median([c["cold_start_ms"] for c in cells])),
        "peak_rss_mb": max(c["peak_rss_mb"] for c in cells),
        "model_rss_mb": max(c["peak_rss_mb"] - c["rss_before_mb"] for c in cells),
        "device_memory_mb": max((c["device_memory_mb"] or 0) for c in cells) or None,
        "nodes_per_provider": next((c.get("nodes_per_provider") for c in cells if c.get("nodes_per_provider")), None),
    }


def _eligibility(export: dict[str, Any] | None, per_variant: dict[str, Any]) -> dict[str, str | None]:
    """None for a variant that may be recommended, else why not (accuracy guard, CPU it cannot run on)."""
    out: dict[str, str | None] = {v: None for v in per_variant if v != TORCH}
    if BENCH_INT8 in out:

        def number(*keys: str) -> float | None:  # export.json may have been edited: a wrong type reads as absent
            value: Any = export
            for key in keys:
                value = value.get(key) if isinstance(value, dict) else None
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None

        guard = number("settings", "quantization", "max_accuracy_drop")
        drop = number("int8", "accuracy_drop_points")
        if per_variant[BENCH_INT8].get("cpu_problem"):
            out[BENCH_INT8] = "it would saturate on this CPU"
        elif drop is None or guard is None:
            out[BENCH_INT8] = "no export.json accuracy figures for it"
        elif drop > guard + 1e-9:
            out[BENCH_INT8] = f"it loses {drop:.2f} points, over the guard of {guard:g}"
    if BENCH_FP16 in out and not (export or {}).get("fp16"):
        out[BENCH_FP16] = "no export.json figures for it (made by another export?)"
    return out


def float_convolutions(int8_path: Path) -> dict[str, int] | None:
    """After ONNX Runtime's CPU graph optimizations, how many convolutions run in int8 (QLinearConv)
    and how many stay float Conv between DequantizeLinear and QuantizeLinear. None when the optimized
    graph cannot be written to a temporary file (disk full, a file-size limit): a diagnosis, not a figure."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        try:  # the model itself loaded before measuring: a failure here is the write
            ort.InferenceSession(str(int8_path), options, providers=[CPU])
            graph = onnx.load(options.optimized_model_filepath).graph
        except Exception:  # noqa: BLE001 - ONNX Runtime's error classes derive from Exception only
            return None
    ops = [n.op_type for n in graph.node]
    float_conv = sum(op in ("Conv", "FusedConv", "NhwcFusedConv") for op in ops)
    return {"int8": sum(op in ("QLinearConv", "NhwcQLinearConv") for op in ops), "float": float_conv}


def _read_json(path: Path) -> dict[str, Any] | None:
    from resnet_edge.core.files import read_report

    report = read_report(path)
    return report if isinstance(report, dict) else None
