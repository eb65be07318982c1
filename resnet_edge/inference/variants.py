"""Which model of a run to deploy on this machine, and why: measured when we can, reasoned when not.

Order of evidence for `serve`, `predict` and `eval` (unless --variant or --model says otherwise):
1. the run's bench.json, when it was measured on this CPU model with the same ISA flags and the same
   execution provider: its recommendation for the workload (batch-1 latency or large-batch throughput);
2. otherwise, on the CPU provider: INT8 on a CPU with int8 dot-product instructions (VNNI, AMX, ARM
   dotprod), FP32 elsewhere (never FP16: ONNX Runtime's CPU kernels are slow in it); on a GPU provider:
   FP16 when the run has it, else FP32 (QDQ INT8 has no CUDA kernels; see bench's diagnoses).
An INT8 model that would saturate on this CPU, or a pair of models made from different checkpoints,
is never picked silently. Torch-free.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from resnet_edge.core.config import VARIANTS
from resnet_edge.core.contract import (
    BENCH_FP32,
    BENCH_JSON,
    CHECKPOINT,
    EXPORT_REPORT,
    MODEL_FILES,
    VARIANT_TABLE,
)
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import read_report
from resnet_edge.core.machine import CpuInfo, cpu_info
from resnet_edge.core.names import printable
from resnet_edge.core.providers import is_cpu_provider, is_tensorrt_provider, provider_name

log = logging.getLogger(__name__)

FILES = MODEL_FILES  # variant -> file name in the run folder
BENCH_NAMES = {k: v.bench for k, v in VARIANT_TABLE.items()}
KEY_OF_BENCH = {v.bench: k for k, v in VARIANT_TABLE.items()}  # onnx-int8 -> int8


@dataclass(frozen=True)
class Choice:
    path: Path
    variant: str  # fp32 | int8 | fp16 | file (a --model path)
    reason: str


def runs_int8_on_cpu(provider: str) -> bool:
    """Whether QDQ integer math runs on the host CPU with this provider: on the CPU provider and on GPU
    providers without int8 kernels (CUDA falls back to the CPU for them); TensorRT builds its own."""
    return not is_tensorrt_provider(provider)


def _props(path: Path) -> dict[str, str]:
    from resnet_edge.inference.runtime import check_model_file

    return {p.key: p.value for p in check_model_file(path).metadata_props}


def check_same_checkpoint(run_dir: Path) -> None:
    """Refuse a run whose model.onnx, model.int8.onnx and export.json come from different checkpoints."""
    sources: dict[str, str] = {}
    for name in FILES.values():
        if (run_dir / name).exists():
            sha = _props(run_dir / name).get("source_checkpoint_sha256")
            if sha:
                sources[name] = sha
    report = read_report(run_dir / EXPORT_REPORT)  # None when missing or malformed: nothing to compare
    checkpoint = report.get("checkpoint") if isinstance(report, dict) else None
    sha = checkpoint.get("sha256") if isinstance(checkpoint, dict) else None
    if isinstance(sha, str) and sha:
        sources[EXPORT_REPORT] = sha
    if (run_dir / CHECKPOINT).exists() and sources:
        from resnet_edge.core.files import file_sha256

        current = file_sha256(run_dir / CHECKPOINT)
        if current not in sources.values():
            log.warning(
                "%s: checkpoint.pt is newer than its exported models; run `resnet-edge export` again to deploy it",
                run_dir,
            )
    if len(set(sources.values())) > 1:
        listing = ", ".join(f"{k} from {printable(v, 12)}" for k, v in sources.items())
        raise UserError(
            f"{run_dir}: its files come from different checkpoints ({listing}); "
            f"run `resnet-edge export --run {run_dir} --quantize` again"
        )


def bench_recommendation(run_dir: Path, workload: str, provider: str, cpu: CpuInfo) -> tuple[str, str] | None:
    """(variant, reason) from the run's bench.json when it was measured here, on the files the run holds
    now; None otherwise (no report, another machine or provider, other files, a malformed report)."""
    report = read_report(run_dir / BENCH_JSON)
    if not isinstance(report, dict):
        return None
    try:
        rec: Any = report["recommendation"][workload]
        measured_on, benched = report["machine"], report.get("files") or {}
    except (KeyError, TypeError, IndexError, AttributeError):
        return None
    if not (
        isinstance(rec, dict)
        and isinstance(measured_on, dict)
        and isinstance(benched, dict)
        and isinstance(rec.get("variant"), str)
        and isinstance(rec.get("why", ""), str)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in benched.items())
    ):
        return None
    from resnet_edge.core.files import file_sha256

    if not cpu.same_as(measured_on) or provider_name(str(report.get("provider"))) != provider_name(provider):
        return None
    variant = KEY_OF_BENCH.get(rec["variant"])
    if variant is None or FILES[variant] not in benched:
        return None
    # Every file it measured must be the run's file now (a file it did not measure, say an FP16 model
    # on a CPU bench, changes nothing it compared).
    for name, sha in benched.items():
        if name not in FILES.values() or not (run_dir / name).exists() or file_sha256(run_dir / name) != sha:
            return None
    why = printable(rec.get("why", ""), 300)  # text from a file: no control characters reach the terminal
    return variant, f"bench.json, measured on this CPU, recommends it for {workload}: {why}".rstrip(": ")


def choose_model(
    run_dir: Path,
    variant: str = "auto",
    workload: str = "throughput",
    provider: str = "cpu",
    cpu: CpuInfo | None = None,
) -> Choice:
    if variant not in VARIANTS:
        raise UserError(f"--variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    available = {v: run_dir / n for v, n in FILES.items() if (run_dir / n).exists()}
    if not available:
        raise UserError(f"{run_dir}: no {' or '.join(FILES.values())} (run `resnet-edge export --quantize` first)")
    check_same_checkpoint(run_dir)
    cpu = cpu or cpu_info()
    if variant != "auto":
        if variant not in available:
            flag = f" {VARIANT_TABLE[variant].export_flag}" if VARIANT_TABLE[variant].export_flag else ""
            raise UserError(f"{run_dir}: no {FILES[variant]} (run `resnet-edge export{flag}` first)")
        return Choice(available[variant], variant, f"--variant {variant}")
    if len(available) == 1:
        only = next(iter(available))
        return Choice(available[only], only, f"the run has only the {only.upper()} model")
    from resnet_edge.core.int8 import cpu_problem
    from resnet_edge.inference.runtime import check_model_file

    saturates = (
        "int8" in available and runs_int8_on_cpu(provider) and cpu_problem(check_model_file(available["int8"]), cpu)
    )
    if saturates:
        del available["int8"]
    measured = bench_recommendation(run_dir, workload, provider, cpu)
    if measured and measured[0] in available:
        return Choice(available[measured[0]], measured[0], measured[1])
    for candidate, reason in _rule(provider, cpu, saturates):
        if candidate in available:
            return Choice(available[candidate], candidate, reason)
    only = next(iter(available))
    return Choice(available[only], only, "the only model of the run this CPU can run as exported")


def saturation_problem(path: Path, provider: str) -> str | None:
    """Why this INT8 model would not give the accuracy measured at export on this CPU, if it would not."""
    if not runs_int8_on_cpu(provider):
        return None
    from resnet_edge.core.int8 import cpu_problem
    from resnet_edge.inference.runtime import check_model_file

    return cpu_problem(check_model_file(path), cpu_info()) or None


def select_model(
    run: Path | None, model: Path | None, variant: str, workload: str, provider: str, refuse_saturating: bool = True
) -> tuple[Choice, str | None]:
    """--model PATH, else the run's variant chosen for this machine; with a warning to show, if any.

    An INT8 model that would saturate on this CPU is refused by serve/predict (its answers would not be
    the accuracy measured at export) and only warned about by eval/bench, which measure what happens.
    """
    from resnet_edge.core.files import resolve_run

    if run is not None and model is not None:
        raise UserError("give --run or --model, not both")
    if model is not None and variant != "auto":
        raise UserError("give --variant or --model, not both")
    choice = (
        Choice(model, "file", "") if model is not None else choose_model(resolve_run(run), variant, workload, provider)
    )
    problem = saturation_problem(choice.path, provider)
    if problem and refuse_saturating:
        raise UserError(f"{choice.path}: {problem}")
    return choice, (f"{choice.path}: {problem}" if problem else None)


def _rule(provider: str, cpu: CpuInfo, int8_saturates: Any) -> list[tuple[str, str]]:
    """Without a bench measured here: (variant, reason) in order of preference."""
    unmeasured = "no bench.json measured on it (`resnet-edge bench` measures)"
    if not is_cpu_provider(provider):
        return [
            ("fp16", f"a GPU provider ({provider}) and {unmeasured}: FP16 is the GPU's low-precision variant"),
            (
                "fp32",
                f"a GPU provider ({provider}) and {unmeasured}; QDQ INT8 runs its quantized operators "
                "on the CPU with most GPU providers",
            ),
        ]
    if int8_saturates:
        return [("fp32", "the INT8 model needs int8 dot-product instructions this CPU lacks")]
    if cpu.int8_dot_product:
        return [
            ("int8", f"this CPU has int8 dot-product instructions ({cpu.isa_summary}); {unmeasured}"),
            ("fp32", f"the run has no INT8 model; {unmeasured}"),
        ]
    return [
        (
            "fp32",
            "this CPU has no int8 dot-product instructions (VNNI/AMX/dotprod), where INT8 is often no "
            f"faster; {unmeasured}",
        ),
        ("int8", f"the run has no FP32 model; {unmeasured}"),
    ]


def recommend(rows: list[dict[str, Any]], eligible: dict[str, str | None], min_margin: float = 1.05) -> dict[str, Any]:
    """Per workload, the fastest eligible ONNX variant at its batch size, from bench rows.

    ``eligible`` maps a bench variant name to None (eligible) or the reason it is not. A low-precision
    variant (INT8, FP16) must beat FP32 by ``min_margin`` (5 %, beyond run-to-run noise) to be
    recommended: a tie goes to FP32, which needs no accuracy caveat. So QDQ INT8 on a GPU, where its
    operators fall back to the CPU, is recommended only when it was measured faster there.
    """
    out: dict[str, Any] = {}
    batches = sorted({r["batch_size"] for r in rows})
    for workload, bs in (("latency", batches[0]), ("throughput", batches[-1])) if batches else ():
        cells = {r["variant"]: r for r in rows if r["batch_size"] == bs and r["variant"] in BENCH_NAMES.values()}
        entry = _recommend_cell(cells, eligible, bs, min_margin)
        if entry:
            out[workload] = {"batch_size": bs, **entry}
    return out


def _recommend_cell(
    cells: dict[str, dict[str, Any]], eligible: dict[str, str | None], bs: int, min_margin: float
) -> dict[str, Any] | None:
    fp32 = cells.get(BENCH_FP32)
    low = {v: c for v, c in cells.items() if v != BENCH_FP32}
    if fp32 is None:
        fine = [v for v in low if eligible.get(v) is None]
        return {"variant": fine[0], "why": "the only ONNX variant measured"} if len(low) == 1 and fine else None
    entry: dict[str, Any] = {}
    best, best_speedup, why_not, overlapped = BENCH_FP32, 1.0, [], False
    for v, cell in sorted(low.items()):
        label = KEY_OF_BENCH[v].upper()
        speedup = fp32["p50_ms"] / cell["p50_ms"]
        entry[f"{KEY_OF_BENCH[v]}_vs_fp32"] = speedup
        overlap = _ranges_overlap(cell, fp32)
        if eligible.get(v) is not None:
            why_not.append(f"{label} not eligible: {eligible[v]}")
        elif speedup < min_margin:
            why_not.append(
                f"{label} is {speedup:.2f}x FP32 at batch {bs} (p50), under the {min_margin:.2f}x "
                "needed to be worth its accuracy risk"
            )
        elif overlap:
            overlapped = True
            why_not.append(
                f"no decisive difference: {label} is {speedup:.2f}x FP32 at batch {bs} (median p50), but "
                f"its {len(cell['repeats_p50_ms'])} repeats ({_range(cell)} ms) overlap FP32's "
                f"({_range(fp32)} ms)"
            )
        elif speedup > best_speedup:
            best, best_speedup = v, speedup
    if best == BENCH_FP32:
        entry.update(variant=best, why="; ".join(why_not) or "the only ONNX variant measured")
        entry["decisive"] = not overlapped  # False: a faster variant's repeats overlapped FP32's
    else:
        label = KEY_OF_BENCH[best].upper()
        entry.update(variant=best, why=f"{label} {best_speedup:.2f}x faster than FP32 at batch {bs} (p50)")
    return entry


def _ranges_overlap(cell: dict[str, Any], fp32: dict[str, Any]) -> bool:
    """Whether the repeats of a low-precision cell and of FP32 overlap (its slowest repeat not faster than
    FP32's fastest): then noise could flip the order. Cells measured once (old reports) never overlap."""
    low, base = cell.get("p50_range_ms"), fp32.get("p50_range_ms")
    return bool(low and base and len(cell.get("repeats_p50_ms", [])) > 1 and low[1] >= base[0])


def _range(cell: dict[str, Any]) -> str:
    low, high = cell["p50_range_ms"]
    return f"{low:.3g}-{high:.3g}"


def default_model(names: list[str], provider: str, cpu: CpuInfo | None = None) -> str | None:
    """Of a repository's model names, the one `serve --repository` answers /v1/predict and the page with
    when none is named (None for none): its only model; else by the rule without a bench, INT8
    (``<arch>_int8``) on a CPU with int8 dot-product instructions, FP16 (``<arch>_fp16``) on GPU
    providers, FP32 elsewhere."""
    if len(names) <= 1:
        return names[0] if names else None
    int8 = [m for m in names if m.endswith(VARIANT_TABLE["int8"].repository_suffix)]
    fp16 = [m for m in names if m.endswith(VARIANT_TABLE["fp16"].repository_suffix)]
    fp32 = [m for m in names if m not in int8 and m not in fp16]
    on_cpu = is_cpu_provider(provider)
    if int8 and on_cpu and (cpu or cpu_info()).int8_dot_product:
        return int8[0]
    if fp16 and not on_cpu:
        return fp16[0]
    return (fp32 or int8 or fp16)[0]
