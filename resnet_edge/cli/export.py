"""`export`: ONNX with parity, optionally INT8 (accuracy-guarded search) and FP16."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table

from resnet_edge.cli.app import app
from resnet_edge.cli.console import QUIET, RUN, console, need_torch, progress_bars, size_text, user_errors
from resnet_edge.core.config import ExportConfig, QuantizationConfig
from resnet_edge.core.contract import EXPORT_REPORT
from resnet_edge.core.files import resolve_run

OPSET = typer.Option(ExportConfig.opset, help="ONNX opset (13 or later with --quantize).")
QUANTIZE = typer.Option(False, "--quantize", help="Also write a static INT8 model (QDQ) and prove its accuracy.")
CALIBRATION_SIZE = typer.Option(
    QuantizationConfig.calibration_size, help="Training images to calibrate activation ranges on."
)
CALIBRATION_METHOD = typer.Option(QuantizationConfig.method, help="minmax | entropy | percentile")
MAX_DROP = typer.Option(
    QuantizationConfig.max_accuracy_drop, help="Points of test accuracy INT8 may lose; worse layers stay float."
)
MIN_AGREEMENT = typer.Option(
    QuantizationConfig.min_agreement, help="Percent of test images on which INT8 must give FP32's digit."
)
SEARCH = typer.Option(
    QuantizationConfig.search,
    help="Try every calibration (minmax, percentiles) and keep the best INT8 model, chosen on held-out training "
    "images, before keeping any layer in float.",
)
SCHEME = typer.Option(
    QuantizationConfig.scheme,
    help="INT8 scheme: portable (uint8 activations, weights in [-64, 64]: same accuracy on every CPU) | vnni "
    "(8-bit weights: exact only on CPUs with VNNI/AMX/ARM dotprod) | s8s8 (int8 activations).",
)
FP16 = typer.Option(
    False,
    "--fp16",
    help="Also write model.fp16.onnx (float16 weights and compute, float32 in and out: the GPU variant), checked "
    "against FP32 on the test set.",
)


@app.command("export")
@user_errors
def export_cli(
    run: Path | None = RUN,
    opset: int = OPSET,
    quantize: bool = QUANTIZE,
    calibration_size: int = CALIBRATION_SIZE,
    calibration_method: str = CALIBRATION_METHOD,
    max_accuracy_drop: float = MAX_DROP,
    min_agreement: float = MIN_AGREEMENT,
    search: bool = SEARCH,
    scheme: str = SCHEME,
    fp16: bool = FP16,
    quiet: bool = QUIET,
) -> None:
    """Export the run to ONNX (parity-checked) and, with --quantize, to static INT8 (accuracy-guarded)."""
    need_torch("export", "onnxscript")
    qconfig = QuantizationConfig(
        calibration_size=calibration_size,
        method=calibration_method,
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        search=search,
        scheme=scheme,
    )
    config = ExportConfig(opset=opset, quantize=quantize, quantization=qconfig if quantize else None, fp16=fp16)
    run_dir = resolve_run(run)
    from resnet_edge.export.onnx_export import export_run

    progress, open_bar = progress_bars(quiet)
    with progress:
        report = export_run(
            run_dir,
            opset=config.opset,
            quantize=config.quantize,
            qconfig=config.quantization,
            progress=open_bar,
            fp16=config.fp16,
        )
    _print_export(report, run_dir)


def _print_export(report: dict[str, Any], run_dir: Path) -> None:
    table = Table(title=f"{report['arch']} export ({run_dir})")
    for col in ("model", "test acc.", "agreement", "size", "check"):
        table.add_column(col, justify="left" if col in ("model", "check") else "right")
    worst = max(p["max_abs_diff"] for p in report["parity"])
    fp32 = report["fp32"]
    sizes = "/".join(str(p["batch_size"]) for p in report["parity"])
    table.add_row(
        "FP32",
        f"{100 * fp32['test_accuracy']:.2f} %",
        "-",
        size_text(fp32["bytes"]),
        f"parity {worst:.1e} (batch {sizes})",
    )
    for key, check in (("int8", "SQNR {logits_sqnr_db:.1f} dB"), ("fp16", "max |diff| {max_abs_diff:.1e}")):
        if key in report:
            r = report[key]
            table.add_row(
                key.upper(),
                f"{100 * r['test_accuracy']:.2f} %",
                f"{100 * r['top1_agreement']:.2f} %",
                f"{size_text(r['bytes'])} ({100 * r['size_ratio']:.0f} %)",
                check.format(**r),
            )
    console.print_table(table)
    if "int8" in report and report["int8"].get("selection"):  # the search ran
        _print_search(report["int8"])
    if "int8" in report and report["int8"]["float_nodes"]:
        console.print(f"accuracy guard kept {len(report['int8']['float_nodes'])} nodes in float")
    console.print(f"exported in {report['seconds']:.1f} s -> {run_dir / EXPORT_REPORT}")


def _print_search(int8: dict[str, Any]) -> None:
    """One line per candidate of the INT8 search, judged on the selection split (export.json has them all)."""
    selection = int8.get("selection") or {}
    table = Table(
        title=f"INT8 search on {selection.get('images', '?')} held-out training images (export.json: all)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("calibration", "weights", "agreement", "drop", "s", "on test"):
        table.add_column(
            col, justify="right" if col in ("agreement", "drop", "s") else "left", no_wrap=col != "calibration"
        )
    for c in int8["candidates"]:
        drop = c.get("selection_drop_points")
        verdict = "" if "holds" not in c else ("holds" if c["holds"] else "misses")
        table.add_row(
            c["calibration"].replace("percentile ", "p").replace(" sensitive tensors", " tensors"),
            "bias corr." if c.get("weights") == "bias correction" else "nearest",
            f"{100 * c['selection_agreement']:.2f} %",
            "-" if drop is None else f"{drop:+.2f} pt",
            f"{c['seconds']:.1f}",
            verdict + (", chosen" if c.get("chosen") else ""),
        )
    console.print_table(table)
