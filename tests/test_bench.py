from __future__ import annotations

import json
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
                                 "--min-runs", "5", "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "bench.json").read_text())
    machine = report["machine"]
    for field in ("cpu", "isa", "logical_cores", "threads", "gpu", "versions"):
        assert field in machine
    assert {"avx2", "avx512_vnni", "amx_int8"} <= set(machine["isa"])
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
    assert report["variants"]["onnx-int8"]["float_convolutions"] == {"int8": 9, "float": 0}  # resnet8: 9 convs
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
    code = ("import sys; from pathlib import Path; from resnet_edge.bench import BenchConfig, run_bench; "
            f"r = run_bench(Path({str(run)!r}), BenchConfig(batch_sizes=(2,), duration=0.02, min_runs=3, torch=False)); "
            "assert {x['variant'] for x in r['rows']} == {'onnx-fp32', 'onnx-int8'}; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
