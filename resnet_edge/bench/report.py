"""bench's report: ratios, diagnoses of slow INT8 and FP16, and the Markdown and PNG renderings of bench.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet_edge.core.contract import BENCH_FP16, BENCH_FP32, BENCH_INT8, BENCH_JSON, BENCH_MD, BENCH_PNG, TORCH
from resnet_edge.core.machine import ISA_FLAGS
from resnet_edge.core.providers import CPU, is_cpu_provider


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per batch size: each ONNX variant's p50 speed-up over torch eager, and INT8 and FP16 over FP32."""
    by = {(r["variant"], r["batch_size"]): r for r in rows}
    out = []
    for bs in sorted({r["batch_size"] for r in rows}):
        for num, den in (
            (BENCH_FP32, TORCH),
            (BENCH_INT8, TORCH),
            (BENCH_FP16, TORCH),
            (BENCH_INT8, BENCH_FP32),
            (BENCH_FP16, BENCH_FP32),
        ):
            if (num, bs) in by and (den, bs) in by:
                out.append(
                    {
                        "batch_size": bs,
                        "variant": num,
                        "baseline": den,
                        "speedup_p50": by[den, bs]["p50_ms"] / by[num, bs]["p50_ms"],
                        "throughput_ratio": by[num, bs]["throughput"] / by[den, bs]["throughput"],
                    }
                )
    return out


def diagnose(report: dict[str, Any]) -> list[str]:
    """What a user needs to know when the numbers look wrong: INT8 slower than FP32, provider fallbacks."""
    notes = []
    isa, provider = report["machine"]["isa"], report["provider"]
    conv = (report["variants"].get(BENCH_INT8) or {}).get("float_convolutions") or {}
    for r in report["ratios"]:
        if r["variant"] == BENCH_INT8 and r["baseline"] == BENCH_FP32 and r["speedup_p50"] < 1.0:
            if not is_cpu_provider(provider):
                cause = (
                    f"QDQ INT8 on {provider} without TensorRT: the quantized operators have no kernels there "
                    "and run on the CPU, with copies between devices"
                )
            elif conv.get("float"):
                cause = (
                    f"{conv['float']} of its {conv['float'] + conv.get('int8', 0)} convolutions stay float Conv "
                    "between DequantizeLinear and QuantizeLinear after ONNX Runtime's fusions"
                )
            elif not report["machine"].get(
                "int8_dot_product", any(isa.get(f) for f in ("avx512_vnni", "avx_vnni", "amx_int8"))
            ):
                cause = (
                    "this CPU has no int8 dot-product instructions (VNNI/AMX/dotprod): its int8 kernels "
                    "multiply in 16-bit pairs, little faster than FP32 FMA"
                )
            elif r["batch_size"] == 1:
                cause = "batch 1 is overhead-bound: the Quantize/Dequantize steps cost more than the int8 math saves"
            else:
                cause = "the model is small enough that quantize/dequantize overhead outweighs the int8 math"
            notes.append(f"INT8 is {1 / r['speedup_p50']:.2f}x slower than FP32 at batch {r['batch_size']}: {cause}.")
    for r in report["ratios"]:
        if r["variant"] == BENCH_FP16 and r["baseline"] == BENCH_FP32 and r["speedup_p50"] < 1.0:
            cause = (
                "ONNX Runtime's CPU provider has few tuned float16 kernels (its fast paths are float32 "
                "and int8); FP16 is the GPU variant"
                if is_cpu_provider(provider)
                else "on this provider and batch size half precision did not pay; at small batches a GPU is often "
                "bound by kernel launches, not arithmetic"
            )
            notes.append(f"FP16 is {1 / r['speedup_p50']:.2f}x slower than FP32 at batch {r['batch_size']}: {cause}.")
    for v, info in report["variants"].items():
        if info.get("cpu_problem"):
            notes.append(f"{v}: {info['cpu_problem']}.")
        placement = info.get("nodes_per_provider") or {}
        fallback = {k: n for k, n in placement.items() if k == CPU}
        if fallback and len(placement) > 1:
            notes.append(
                f"{v}: {fallback[CPU]} of {sum(placement.values())} nodes fell back to "
                f"the CPU on {provider} ({placement})."
            )
    return notes


# ------------------------------------------------------------------------------------------ rendering
VARIANT_COLORS = {TORCH: "tab:red", BENCH_FP32: "tab:blue", BENCH_INT8: "tab:green", BENCH_FP16: "tab:purple"}


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    isa = ", ".join(f for f, on in m["isa"].items() if on) or "none of " + ", ".join(ISA_FLAGS)
    lines = [
        f"# resnet-edge bench: {report['arch']} on {report['provider']}",
        "",
        f"Machine: {m['cpu']} ({m['logical_cores']} logical cores, threads {m['threads'] or 'default'}); "
        f"ISA: {isa}; GPU: {m['gpu'] or 'none'}; versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        "",
        "| variant | batch | p50 ms | p90 ms | p99 ms | images/s | runs | p50 of each repeat (ms) | spread |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in report["rows"]:
        repeats = ", ".join(f"{x:.3f}" for x in r.get("repeats_p50_ms", [r["p50_ms"]]))
        spread = f"{100 * r['p50_spread']:.0f} %" if "p50_spread" in r else "-"
        lines.append(
            f"| {r['variant']} | {r['batch_size']} | {r['p50_ms']:.3f} | {r['p90_ms']:.3f} | "
            f"{r['p99_ms']:.3f} | {r['throughput']:,.0f} | {r['runs']} | {repeats} | "
            f"{spread}{' **unstable**' if r.get('unstable') else ''} |"
        )
    unstable = [r for r in report["rows"] if r.get("unstable")]
    if unstable:
        lines += [
            "",
            f"**Unstable cells** ({len(unstable)}): their repeats' p50 differ by more than 10 % of the median "
            "(a busy or throttling machine); compare them with care, or measure again with more --repeats.",
        ]
    lines += [
        "",
        "| variant | file | size | test accuracy | cold start ms | peak RSS MB | model RSS MB | GPU MB "
        "| nodes per provider |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v, i in report["variants"].items():
        acc = f"{100 * i['test_accuracy']:.2f} %" if i["test_accuracy"] is not None else "-"
        gpu = f"{i['device_memory_mb']:.0f}" if i.get("device_memory_mb") else "-"
        placement = (
            ", ".join(
                f"{k.replace('ExecutionProvider', '')} {n}" for k, n in (i.get("nodes_per_provider") or {}).items()
            )
            or "-"
        )
        lines.append(
            f"| {v} | {Path(i['file']).name} | {i['bytes'] / 1e6:.2f} MB | {acc} | {i['cold_start_ms']:.0f} | "
            f"{i['peak_rss_mb']:.0f} | {i['model_rss_mb']:.0f} | {gpu} | {placement} |"
        )
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

    from resnet_edge.core.files import atomic_path

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v in report["variants"]:
        cells = sorted((r for r in report["rows"] if r["variant"] == v), key=lambda r: r["batch_size"])
        bs = [r["batch_size"] for r in cells]
        ax1.plot(bs, [r["p50_ms"] for r in cells], "o-", color=VARIANT_COLORS.get(v), label=v)
        ax1.fill_between(
            bs, [r["p50_ms"] for r in cells], [r["p99_ms"] for r in cells], color=VARIANT_COLORS.get(v), alpha=0.15
        )
        ax2.plot(bs, [r["throughput"] for r in cells], "o-", color=VARIANT_COLORS.get(v), label=v)
    for ax, label in ((ax1, "latency ms (p50, band to p99)"), (ax2, "throughput (images/s)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("batch size")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    m = report["machine"]
    fig.suptitle(
        f"{report['arch']} on {report['provider']}: {m['cpu']}"
        + (f" / {m['gpu']}" if m["gpu"] and report["provider"] != "cpu" else ""),
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def write_reports(report: dict[str, Any], out_dir: Path) -> None:
    from resnet_edge.core.files import write_bytes, write_json

    write_json(out_dir / BENCH_JSON, report)
    write_bytes(out_dir / BENCH_MD, render_markdown(report).encode())
    render_plot(report, out_dir / BENCH_PNG)
