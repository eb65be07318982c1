"""`bench`: PyTorch eager against ONNX Runtime FP32 and INT8, measured honestly, then rendered.

Each cell (variant x batch size) runs in a fresh worker process (``python -m resnet_edge.bench``), so
the variants do not share thread pools or allocators and each one's peak memory is its own. A cell:
create the session (cold start = creation to first result), warm up, then time single calls with
``time.perf_counter`` for ``duration`` seconds and at least ``min_runs`` runs; on CUDA, inputs and
outputs stay on the device (IOBinding / CUDA tensors) and every call is synchronized. The ONNX
variants never import torch, and ``--no-torch`` keeps torch out of the whole benchmark.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .contract import BENCH_JSON, BENCH_MD, BENCH_PNG, CHECKPOINT, EXPORT_REPORT, FP32_MODEL, INT8_MODEL, TRAIN_REPORT
from .config import BenchConfig
from .errors import UserError
from .machine import ISA_FLAGS
from .variants import recommend

log = logging.getLogger(__name__)

VARIANTS = ("torch", "onnx-fp32", "onnx-int8")
FILES = {"torch": CHECKPOINT, "onnx-fp32": FP32_MODEL, "onnx-int8": INT8_MODEL}


# ------------------------------------------------------------------------------------------ machine
def describe_machine(threads: int | None, include_torch: bool) -> dict[str, Any]:
    """CPU model, the ISA flags that decide INT8 speed, cores, GPU and versions (no torch import)."""
    from .machine import machine

    return machine(threads, include_torch)


# ------------------------------------------------------------------------------------------ worker
def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.percentile(a, 50)), "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def _time_loop(call: Callable[[], None], duration: float, min_runs: int, warmup: int) -> list[float]:
    t_end = time.perf_counter() + 0.2
    n = 0
    while n < warmup or time.perf_counter() < t_end:
        call()
        n += 1
    samples = []
    t_end = time.perf_counter() + duration
    while len(samples) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _node_placement(model_path: Path, provider: str, x: np.ndarray, threads: int | None) -> dict[str, int]:
    """How many graph nodes ran on each execution provider, read from ONNX Runtime's profile."""
    import onnxruntime as ort

    from .contract import INPUT_NAME
    from .runtime import provider_name

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"resnet-edge-profile-{os.getpid()}")
    if threads:
        options.intra_op_num_threads = threads
    name = provider_name(provider)
    sess = ort.InferenceSession(str(model_path), options, providers=[name, "CPUExecutionProvider"])
    sess.run(None, {INPUT_NAME: x})
    profile = Path(sess.end_profiling())
    counts: dict[str, set[str]] = {}
    try:
        for event in json.loads(profile.read_text()):
            if (event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time")
                    and "provider" in event.get("args", {})):
                counts.setdefault(event["args"]["provider"], set()).add(event["name"].rsplit("_kernel_time", 1)[0])
    finally:
        profile.unlink(missing_ok=True)
    return {k: len(v) for k, v in counts.items()}


def measure_cell(variant: str, model_path: Path, provider: str, batch_size: int, duration: float,
                 min_runs: int, warmup: int, threads: int | None) -> dict[str, Any]:
    """One cell, in this process: cold start, latency samples, memory."""
    from .data import load_test_split

    images, _ = load_test_split()
    reps = -(-batch_size // len(images))
    x = np.ascontiguousarray(np.concatenate([images] * reps)[:batch_size]) if reps > 1 else np.ascontiguousarray(images[:batch_size])
    rss_before = _rss_mb()
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if variant == "torch":
        call, device_memory = _torch_call(model_path, provider, x, threads)
    else:
        call, device_memory, session = _onnx_call(model_path, provider, x, threads)
        extra["provider_used"] = session.get_providers()[0]
    call()
    cold_start = time.perf_counter() - t0
    samples = _time_loop(call, duration, min_runs, warmup)
    if variant != "torch" and provider != "cpu":
        extra["nodes_per_provider"] = _node_placement(model_path, provider, x, threads)
    stats = _percentiles(samples)
    return {"variant": variant, "provider": provider, "batch_size": batch_size, **stats,
            "throughput": batch_size / (stats["p50_ms"] / 1e3), "runs": len(samples),
            "cold_start_ms": cold_start * 1e3, "rss_before_mb": rss_before, "peak_rss_mb": _peak_rss_mb(),
            "device_memory_mb": device_memory() if device_memory else None, **extra}


def _onnx_call(model_path: Path, provider: str, x: np.ndarray, threads: int | None):
    import onnxruntime as ort

    from .contract import INPUT_NAME, OUTPUT_NAME
    from .runtime import create_session

    session = create_session(model_path, provider, threads=threads)
    if session.get_providers()[0] == "CPUExecutionProvider":
        feed = {INPUT_NAME: x}
        return (lambda: session.run([OUTPUT_NAME], feed)), None, session
    # GPU: input copied to the device once, output left there; only the model's work is timed.
    device = "cuda" if "CUDA" in session.get_providers()[0] or "Tensorrt" in session.get_providers()[0] else "cpu"
    binding = session.io_binding()
    binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    binding.bind_output(OUTPUT_NAME, device)

    def call() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return call, _gpu_memory_mb, session


def _gpu_memory_mb() -> float | None:
    """Device memory this process holds (CUDA context included), as nvidia-smi reports it: the same
    measure for PyTorch and ONNX Runtime."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        pid, _, mem = line.partition(",")
        if pid.strip() == str(os.getpid()):
            return float(mem)
    return None


def _torch_call(model_path: Path, provider: str, x: np.ndarray, threads: int | None):
    import torch

    from .checkpoint import load_checkpoint, model_from_checkpoint

    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if provider in ("cuda", "CUDAExecutionProvider", "tensorrt") else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--provider cuda: PyTorch sees no CUDA GPU for the torch variant (use --no-torch)")
    model = model_from_checkpoint(load_checkpoint(model_path), model_path).to(device)
    xt = torch.from_numpy(x).to(device)

    def call() -> None:
        with torch.inference_mode():
            model(xt)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return call, (_gpu_memory_mb if device.type == "cuda" else None)


def _worker_main() -> None:
    """Entry of ``python -m resnet_edge.bench``: one cell's JSON arguments on argv, its row on stdout."""
    args = json.loads(sys.argv[1])
    try:
        row = measure_cell(args["variant"], Path(args["model"]), args["provider"], args["batch_size"],
                           args["duration"], args["min_runs"], args["warmup"], args["threads"])
    except UserError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    print(json.dumps(row))


# -------------------------------------------------------------------------------------------- sweep
def _run_cell(variant: str, model: Path, config: BenchConfig, batch_size: int) -> dict[str, Any]:
    args = {"variant": variant, "model": str(model), "provider": config.provider, "batch_size": batch_size,
            "duration": config.duration, "min_runs": config.min_runs, "warmup": config.warmup,
            "threads": config.threads}
    env = dict(os.environ)
    # glibc returns large blocks to the OS and maps them afresh (zeroed) on the next call unless these
    # thresholds are raised; PyTorch eager at batch 256 then varied from 31 to 46 ms between otherwise
    # identical processes. Every variant runs with them, so each reuses its memory as a server would.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(2**30))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(2**30))
    proc = subprocess.run([sys.executable, "-m", "resnet_edge.bench", json.dumps(args)], capture_output=True,
                          text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"benchmark worker for {variant} batch {batch_size} failed: {tail}")
    row = json.loads(lines[-1])
    if "error" in row:
        raise UserError(row["error"])
    return row


def run_bench(run_dir: Path, config: BenchConfig, progress: Callable[[str, int], Callable[[int], None]] | None = None) -> dict[str, Any]:
    """Measure every available variant of the run at every batch size; returns the bench.json content."""
    from .runtime import check_provider_available, create_session

    from .files import file_sha256
    from .variants import check_same_checkpoint

    check_provider_available(config.provider)
    check_same_checkpoint(run_dir)
    variants = [v for v in VARIANTS if (v != "torch" or config.torch) and (run_dir / FILES[v]).exists()]
    if not any(v.startswith("onnx") for v in variants):
        raise UserError(f"{run_dir}: no {FP32_MODEL} to benchmark (run `resnet-edge export --quantize` first)")
    for v in variants:  # fail fast on a bad file, before minutes of measuring
        if v != "torch":
            create_session(run_dir / FILES[v], "cpu")
    advance = progress("benchmark", len(variants) * len(config.batch_sizes)) if progress else None
    rows = []
    for variant in variants:
        for bs in config.batch_sizes:
            rows.append(_run_cell(variant, run_dir / FILES[variant], config, bs))
            if advance:
                advance(1)
    export = _read_json(run_dir / EXPORT_REPORT)
    train = _read_json(run_dir / TRAIN_REPORT)
    per_variant = {}
    for v in variants:
        cells = [r for r in rows if r["variant"] == v]
        acc = (train or {}).get("test_accuracy") if v == "torch" else \
            ((export or {}).get("fp32" if v == "onnx-fp32" else "int8") or {}).get("test_accuracy")
        per_variant[v] = {
            "file": str(run_dir / FILES[v]), "bytes": (run_dir / FILES[v]).stat().st_size, "test_accuracy": acc,
            "cold_start_ms": float(np.median([c["cold_start_ms"] for c in cells])),
            "peak_rss_mb": max(c["peak_rss_mb"] for c in cells),
            "model_rss_mb": max(c["peak_rss_mb"] - c["rss_before_mb"] for c in cells),
            "device_memory_mb": max((c["device_memory_mb"] or 0) for c in cells) or None,
            "nodes_per_provider": next((c.get("nodes_per_provider") for c in cells if c.get("nodes_per_provider")), None),
        }
    report = {"run": str(run_dir), "arch": (train or export or {}).get("arch"), "provider": config.provider,
              "settings": asdict(config), "machine": describe_machine(config.threads, config.torch),
              "rows": rows, "variants": per_variant,
              # what was measured, so a later choice can tell whether these figures are about the run's files
              "files": {FILES[v]: file_sha256(run_dir / FILES[v]) for v in variants if v != "torch"}}
    report["ratios"] = ratios(rows)
    if "onnx-int8" in variants:
        from .int8 import cpu_problem
        from .machine import cpu_info

        per_variant["onnx-int8"]["float_convolutions"] = float_convolutions(run_dir / FILES["onnx-int8"])
        per_variant["onnx-int8"]["cpu_problem"] = cpu_problem(_proto(run_dir / FILES["onnx-int8"]), cpu_info())
    report["recommendation"] = recommend(rows, _eligibility(export, per_variant))
    report["diagnoses"] = diagnose(report)
    return report


def _proto(path: Path) -> Any:
    from .runtime import check_model_file

    return check_model_file(path)


def _eligibility(export: dict[str, Any] | None, per_variant: dict[str, Any]) -> dict[str, str | None]:
    """None for a variant that may be recommended, else why not (accuracy guard, CPU it cannot run on)."""
    out: dict[str, str | None] = {v: None for v in per_variant if v != "torch"}
    if "onnx-int8" in out:
        int8 = (export or {}).get("int8") or {}
        guard = ((export or {}).get("settings", {}).get("quantization") or {}).get("max_accuracy_drop")
        drop = int8.get("accuracy_drop_points")
        if per_variant["onnx-int8"].get("cpu_problem"):
            out["onnx-int8"] = "it would saturate on this CPU"
        elif drop is None or guard is None:
            out["onnx-int8"] = "no export.json accuracy figures for it"
        elif drop > guard + 1e-9:
            out["onnx-int8"] = f"it loses {drop:.2f} points, over the guard of {guard:g}"
    return out


def float_convolutions(int8_path: Path) -> dict[str, int]:
    """After ONNX Runtime's CPU graph optimizations, how many convolutions run in int8 (QLinearConv)
    and how many stay float Conv between DequantizeLinear and QuantizeLinear."""
    import tempfile

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
        graph = onnx.load(options.optimized_model_filepath).graph
    ops = [n.op_type for n in graph.node]
    float_conv = sum(op in ("Conv", "FusedConv", "NhwcFusedConv") for op in ops)
    return {"int8": sum(op in ("QLinearConv", "NhwcQLinearConv") for op in ops), "float": float_conv}


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: each ONNX variant's p50 speed-up over torch eager, and INT8 over FP32."""
    by = {(r["variant"], r["batch_size"]): r for r in rows}
    out = []
    for bs in sorted({r["batch_size"] for r in rows}):
        for num, den in (("onnx-fp32", "torch"), ("onnx-int8", "torch"), ("onnx-int8", "onnx-fp32")):
            if (num, bs) in by and (den, bs) in by:
                out.append({"batch_size": bs, "variant": num, "baseline": den,
                            "speedup_p50": by[den, bs]["p50_ms"] / by[num, bs]["p50_ms"],
                            "throughput_ratio": by[num, bs]["throughput"] / by[den, bs]["throughput"]})
    return out


def diagnose(report: dict[str, Any]) -> list[str]:
    """What a user needs to know when the numbers look wrong: INT8 slower than FP32, provider fallbacks."""
    notes = []
    isa, provider = report["machine"]["isa"], report["provider"]
    conv = (report["variants"].get("onnx-int8") or {}).get("float_convolutions") or {}
    for r in report["ratios"]:
        if r["variant"] == "onnx-int8" and r["baseline"] == "onnx-fp32" and r["speedup_p50"] < 1.0:
            if provider not in ("cpu", "CPUExecutionProvider"):
                cause = (f"QDQ INT8 on {provider} without TensorRT: the quantized operators have no kernels there "
                         "and run on the CPU, with copies between devices")
            elif conv.get("float"):
                cause = (f"{conv['float']} of its {conv['float'] + conv.get('int8', 0)} convolutions stay float Conv "
                         "between DequantizeLinear and QuantizeLinear after ONNX Runtime's fusions")
            elif not report["machine"].get("int8_dot_product", any(isa.get(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))):
                cause = ("this CPU has no int8 dot-product instructions (VNNI/AMX/dotprod): its int8 kernels "
                         "multiply in 16-bit pairs, little faster than FP32 FMA")
            elif r["batch_size"] == 1:
                cause = "batch 1 is overhead-bound: the Quantize/Dequantize steps cost more than the int8 math saves"
            else:
                cause = "the model is small enough that quantize/dequantize overhead outweighs the int8 math"
            notes.append(f"INT8 is {1 / r['speedup_p50']:.2f}x slower than FP32 at batch {r['batch_size']}: {cause}.")
    for v, info in report["variants"].items():
        if info.get("cpu_problem"):
            notes.append(f"{v}: {info['cpu_problem']}.")
        placement = info.get("nodes_per_provider") or {}
        fallback = {k: n for k, n in placement.items() if k == "CPUExecutionProvider"}
        if fallback and len(placement) > 1:
            notes.append(f"{v}: {fallback['CPUExecutionProvider']} of {sum(placement.values())} nodes fell back to "
                         f"the CPU on {provider} ({placement}).")
    return notes


# ------------------------------------------------------------------------------------------ rendering
VARIANT_COLORS = {"torch": "tab:red", "onnx-fp32": "tab:blue", "onnx-int8": "tab:green"}


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    isa = ", ".join(f for f, on in m["isa"].items() if on) or "none of " + ", ".join(ISA_FLAGS)
    lines = [f"# resnet-edge bench: {report['arch']} on {report['provider']}", "",
             f"Machine: {m['cpu']} ({m['logical_cores']} logical cores, threads {m['threads'] or 'default'}); "
             f"ISA: {isa}; GPU: {m['gpu'] or 'none'}; versions: "
             + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v), "",
             "| variant | batch | p50 ms | p90 ms | p99 ms | images/s | runs |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['variant']} | {r['batch_size']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['throughput']:,.0f} | {r['runs']} |")
    lines += ["", "| variant | file | size | test accuracy | cold start ms | peak RSS MB | model RSS MB | GPU MB | nodes per provider |",
              "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for v, i in report["variants"].items():
        acc = f"{100 * i['test_accuracy']:.2f} %" if i["test_accuracy"] is not None else "-"
        gpu = f"{i['device_memory_mb']:.0f}" if i.get("device_memory_mb") else "-"
        placement = ", ".join(f"{k.replace('ExecutionProvider', '')} {n}" for k, n in (i.get("nodes_per_provider") or {}).items()) or "-"
        lines.append(f"| {v} | {Path(i['file']).name} | {i['bytes'] / 1e6:.2f} MB | {acc} | {i['cold_start_ms']:.0f} | "
                     f"{i['peak_rss_mb']:.0f} | {i['model_rss_mb']:.0f} | {gpu} | {placement} |")
    lines += ["", "| batch | variant | against | p50 speed-up |", "|---:|---|---|---:|"]
    for r in report["ratios"]:
        lines.append(f"| {r['batch_size']} | {r['variant']} | {r['baseline']} | {r['speedup_p50']:.2f}x |")
    if report.get("recommendation"):
        lines += ["", "Recommendation on this machine (fastest variant within the accuracy guard):", ""]
        for workload, r in report["recommendation"].items():
            lines.append(f"- {workload} (batch {r['batch_size']}): **{r['variant']}**: {r['why']}")
    if report["diagnoses"]:
        lines += ["", "Diagnoses:", ""] + [f"- {d}" for d in report["diagnoses"]]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in report["variants"]:
        cells = sorted((r for r in report["rows"] if r["variant"] == v), key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in cells]
        ax1.plot(bs, [r["p50_ms"] for r in cells], "o-", color=VARIANT_COLORS.get(v), label=v)
        ax1.fill_between(bs, [r["p50_ms"] for r in cells], [r["p99_ms"] for r in cells], color=VARIANT_COLORS.get(v), alpha=0.15)
        ax2.plot(bs, [r["throughput"] for r in cells], "o-", color=VARIANT_COLORS.get(v), label=v)
    for ax, label in ((ax1, "latency ms (p50, band to p99)"), (ax2, "throughput (images/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = report["machine"]
    fig.suptitle(f"{report['arch']} on {report['provider']}: {m['cpu']}" + (f" / {m['gpu']}" if m["gpu"] and report["provider"] != "cpu" else ""), fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    from .files import write_bytes, write_json

    write_json(out_dir / BENCH_JSON, report)
    write_bytes(out_dir / BENCH_MD, render_markdown(report).encode())
    render_plot(report, out_dir / BENCH_PNG)


if __name__ == "__main__":
    _worker_main()
