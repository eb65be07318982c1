from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from resnet_edge.cli import app

runner = CliRunner()


def test_bench_writes_every_report_field(tmp_path, trained_run):
    run, _, _ = trained_run
    out = tmp_path / "bench"
    result = runner.invoke(app, ["bench", "--run", str(run), "--batch-sizes", "1,4", "--duration", "0.05",
                                 "--min-runs", "5", "--repeats", "1", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    machine = report["machine"]
    for field in ("cpu", "isa", "logical_cores", "threads", "gpu", "versions"):
        assert field in machine
    from resnet_edge.core.machine import cpu_info

    assert machine["isa"] == cpu_info().isa  # this machine's flags, whatever its ISA (x86 or ARM names)
    assert {"onnxruntime", "torch"} <= set(machine["versions"])
    cells = {(r["variant"], r["batch_size"]) for r in report["rows"]}
    assert cells == {(v, b) for v in ("torch", "onnx-fp32", "onnx-int8") for b in (1, 4)}
    for row in report["rows"]:
        assert row["provider"] == "cpu" and row["runs"] >= 5 and row["p50_ms"] > 0
    for v, info in report["variants"].items():
        assert info["bytes"] > 0 and info["cold_start_ms"] > 0 and info["peak_rss_mb"] > 0
        assert 0.9 < info["test_accuracy"] <= 1
    ratio_keys = {(r["variant"], r["baseline"]) for r in report["ratios"]}
    assert ratio_keys == {("onnx-fp32", "torch"), ("onnx-int8", "torch"), ("onnx-int8", "onnx-fp32")}
    # A recommendation per workload, for a variant that was measured, with its reason; and the
    # structural facts behind a slow INT8 (how many convolutions ONNX Runtime left in float).
    rec = report["recommendation"]
    assert set(rec) == {"latency", "throughput"}
    assert rec["latency"]["batch_size"] == 1 and rec["throughput"]["batch_size"] == 4
    assert all(r["variant"] in ("onnx-fp32", "onnx-int8") and r["why"] for r in rec.values())
    convs = report["variants"]["onnx-int8"]["float_convolutions"]  # resnet8: 9 convolutions
    assert convs["int8"] + convs["float"] == 9 and convs["int8"] >= 1
    if platform.machine() in ("x86_64", "AMD64"):  # ONNX Runtime's x86 kernels fuse every QDQ convolution
        assert convs == {"int8": 9, "float": 0}
    assert set(report["files"]) == {"model.onnx", "model.int8.onnx"}
    md = (out / "bench.md").read_text()
    assert md.startswith("# resnet-edge bench") and f"**{rec['throughput']['variant']}**" in md
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "onnx-int8" in result.stdout


def test_cuda_without_the_provider_is_a_clear_error(trained_run):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    run, _, _ = trained_run
    result = runner.invoke(app, ["bench", "--run", str(run), "--provider", "cuda", "--no-torch"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert line.startswith("error: ") and "CUDAExecutionProvider" in line and "onnxruntime-gpu" in line
    assert "replace" in line and len(line.splitlines()) == 1


def test_no_torch_bench_never_imports_torch(tmp_path, trained_run):
    run, _, _ = trained_run
    code = ("import sys; from pathlib import Path; from resnet_edge.bench.runner import BenchConfig, run_bench; "
            f"r = run_bench(Path({str(run)!r}), BenchConfig(batch_sizes=(2,), duration=0.02, min_runs=3, torch=False)); "
            "assert {x['variant'] for x in r['rows']} == {'onnx-fp32', 'onnx-int8'}; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ a recommendation noise cannot flip (issue 21)
def _cell(variant, p50s, batch=64):
    from resnet_edge.bench.runner import combine_repeats

    return combine_repeats([{"variant": variant, "batch_size": batch, "p50_ms": p, "p90_ms": p, "p99_ms": p,
                             "runs": 10} for p in p50s])


def test_repeats_are_combined_with_their_spread_and_unstable_cells_flagged():
    row = _cell("onnx-int8", [10.0, 30.0, 11.0])
    assert row["p50_ms"] == 11.0 and row["p50_range_ms"] == [10.0, 30.0] and row["runs"] == 30
    assert row["unstable"] and abs(row["p50_spread"] - 20 / 11) < 1e-9
    assert not _cell("onnx-fp32", [10.0, 10.5, 10.2])["unstable"]


def test_overlapping_repeats_give_no_decisive_difference_and_keep_fp32():
    """A run under load measured INT8 at 0.78-2.57x FP32 and recommended FP32 where a quiet run said INT8:
    with repeats, INT8 is recommended only when its slowest repeat beats FP32's fastest."""
    from resnet_edge.inference.variants import recommend

    eligible = {"onnx-fp32": None, "onnx-int8": None}
    noisy = [_cell("onnx-fp32", [10.0, 12.0, 30.0]), _cell("onnx-int8", [6.0, 8.0, 11.0])]
    rec = recommend(noisy, eligible)["throughput"]
    assert rec["variant"] == "onnx-fp32" and rec["why"].startswith("no decisive difference") and not rec["decisive"]
    clear = [_cell("onnx-fp32", [10.0, 10.4, 10.8]), _cell("onnx-int8", [6.0, 6.3, 6.9])]
    rec = recommend(clear, eligible)["throughput"]
    assert rec["variant"] == "onnx-int8" and "faster than FP32" in rec["why"]
    once = [_cell("onnx-fp32", [10.0]), _cell("onnx-int8", [6.0])]  # one repeat: the margin alone decides
    assert recommend(once, eligible)["throughput"]["variant"] == "onnx-int8"


def test_bench_md_flags_unstable_cells():
    from resnet_edge.bench.report import ratios, render_markdown

    rows = [_cell("onnx-fp32", [10.0, 12.0, 30.0]), _cell("onnx-int8", [6.0, 6.1, 6.2])]
    report = {"arch": "resnet8", "provider": "cpu", "rows": rows, "ratios": ratios(rows), "variants": {},
              "machine": {"cpu": "Test CPU", "isa": {"avx2": True}, "logical_cores": 2, "threads": None, "gpu": None,
                          "versions": {}}, "diagnoses": [], "recommendation": {}}
    md = render_markdown(report)
    assert "10.000, 12.000, 30.000" in md and "**unstable**" in md and "Unstable cells** (1)" in md


# ------------------------------------------------------------------ one provider vocabulary (issue 22's two bugs)
@pytest.mark.parametrize("spelling, cpu, cuda", [("cpu", True, False), ("CPU", True, False),
                                                 ("CPUExecutionProvider", True, False), ("cuda", False, True),
                                                 ("CUDA", False, True), ("CUDAExecutionProvider", False, True),
                                                 ("TensorRT", False, True), ("openvino", False, False)])
def test_every_spelling_of_a_provider_means_one_thing(spelling, cpu, cuda):
    from resnet_edge.core.providers import is_cpu_provider, is_cuda_device_provider

    assert is_cpu_provider(spelling) is cpu and is_cuda_device_provider(spelling) is cuda


def test_bench_torch_runs_on_the_gpu_for_cuda_however_spelled(tmp_path):
    """`bench --provider CUDA` timed PyTorch on the CPU against ONNX Runtime on the GPU: the torch cell now
    asks for the GPU (here, with none visible, it says so)."""
    import numpy as np

    from resnet_edge.bench.worker import _torch_call
    from resnet_edge.core.errors import UserError

    for spelling in ("CUDA", "TensorrtExecutionProvider"):
        with pytest.raises(UserError, match="PyTorch sees no CUDA GPU"):
            _torch_call(tmp_path / "checkpoint.pt", spelling, np.zeros((1, 1, 28, 28), np.float32), None)


def test_int8_diagnosis_on_the_cpu_provider_however_spelled():
    """`--provider CPU` was diagnosed as a GPU provider (QDQ without kernels there)."""
    from resnet_edge.bench.report import diagnose, ratios

    rows = [{"variant": v, "batch_size": 64, "p50_ms": ms, "p90_ms": ms, "p99_ms": ms, "throughput": 1.0, "runs": 1}
            for v, ms in (("onnx-fp32", 10.0), ("onnx-int8", 12.0))]
    report = {"provider": "CPU", "rows": rows, "ratios": ratios(rows),
              "variants": {"onnx-int8": {"float_convolutions": {"int8": 9, "float": 0}}},
              "machine": {"isa": {"avx2": True}, "int8_dot_product": False}}
    notes = diagnose(report)
    assert any("no int8 dot-product instructions" in n for n in notes) and not any("without TensorRT" in n for n in notes)
