"""FP16, the GPU's low-precision variant: parity with FP32 on the CPU, the contract, the choice rules."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest

from helpers import error_line, runner
from resnet_edge.cli import app
from resnet_edge.core.mnist import load_test_split
from resnet_edge.inference.runtime import create_session


@pytest.fixture(scope="module")
def fp16_run(trained_run, tmp_path_factory):
    """A copy of the real run exported again with --quantize --fp16 (through the CLI). The INT8 model is
    made quickly (no search, 64 calibration images, the guard loose): here it is only one more variant."""
    run, _, _ = trained_run
    copy = tmp_path_factory.mktemp("fp16") / "resnet8"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("bench.*", "deploy"))
    quick_int8 = ["--no-search", "--calibration-size", "64", "--max-accuracy-drop", "100", "--min-agreement", "0"]
    result = runner.invoke(app, ["export", "--run", str(copy), "--quantize", *quick_int8, "--fp16", "--quiet"])
    assert result.exit_code == 0, result.output
    return copy, json.loads((copy / "export.json").read_text())


def test_fp16_keeps_fp32s_answers_on_the_whole_test_set(fp16_run):
    run, report = fp16_run
    images, labels = load_test_split()
    fp32 = np.concatenate([create_session(run / "model.onnx").run(None, {"pixels": images[i:i + 1000]})[0]
                           for i in range(0, len(images), 1000)])
    fp16 = np.concatenate([create_session(run / "model.fp16.onnx").run(None, {"pixels": images[i:i + 1000]})[0]
                           for i in range(0, len(images), 1000)])
    acc32, acc16 = (fp32.argmax(1) == labels).mean(), (fp16.argmax(1) == labels).mean()
    assert abs(acc32 - acc16) * 100 <= 0.05  # points, on all 10,000 test images
    assert (fp16.argmax(1) == fp32.argmax(1)).mean() >= 0.999
    # export.json says the same, measured the same way.
    h = report["fp16"]
    assert h["test_accuracy"] == pytest.approx(acc16) and h["max_abs_diff"] == pytest.approx(np.abs(fp16 - fp32).max(), rel=1e-3)
    assert 0 < h["max_abs_diff"] < 0.1  # float16 rounding shows, but stays small against logits of order 10
    assert h["bytes"] == (run / "model.fp16.onnx").stat().st_size and h["size_ratio"] < 0.6
    assert h["converted_nodes"] > 0 and h["float32_nodes"] == []  # resnet8: every compute node in float16


def test_fp16_contract_is_float32_in_and_out_with_float16_weights(fp16_run):
    run, _ = fp16_run
    model = onnx.load(str(run / "model.fp16.onnx"))
    f32 = onnx.TensorProto.FLOAT
    assert [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input] == [("pixels", f32)]
    assert [(o.name, o.type.tensor_type.elem_type) for o in model.graph.output] == [("logits", f32)]
    conv_weights = {n.input[1] for n in model.graph.node if n.op_type == "Conv"}
    types = {t.name: t.data_type for t in model.graph.initializer}
    assert conv_weights and all(types[w] == onnx.TensorProto.FLOAT16 for w in conv_weights)
    props = {p.key: p.value for p in model.metadata_props}
    assert props["precision"] == "fp16" and props["source_checkpoint_sha256"]
    batch = create_session(run / "model.fp16.onnx").run(None, {"pixels": np.zeros((3, 1, 28, 28), np.float32)})[0]
    assert batch.dtype == np.float32 and batch.shape == (3, 10)


def test_fp16_that_fails_its_guard_is_never_written(trained_run, tmp_path, monkeypatch):
    from resnet_edge.export import fp16

    run, _, _ = trained_run
    images, labels = load_test_split()
    monkeypatch.setattr(fp16, "MIN_TOP1_AGREEMENT", 1.01)  # no model can pass: the refusal path
    with pytest.raises(fp16.UserError, match="no FP16 model was written"):
        fp16.write_fp16(run / "model.onnx", tmp_path / "model.fp16.onnx", images[:500], labels[:500], {})
    assert list(tmp_path.iterdir()) == []


def test_export_without_fp16_removes_the_stale_fp16(fp16_run, tmp_path):
    run, _ = fp16_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    result = runner.invoke(app, ["export", "--run", str(copy), "--quiet"])
    assert result.exit_code == 0, result.output
    assert not (copy / "model.fp16.onnx").exists() and "model.fp16.onnx" in json.loads(
        (copy / "export.json").read_text())["removed_stale"]


def test_eval_and_predict_take_the_fp16_variant(fp16_run, mnist, tmp_path):
    from PIL import Image

    from conftest import write_dataset

    run, report = fp16_run
    data = write_dataset(tmp_path / "d", n_train=8, n_test=64)  # which models run, not their accuracy
    result = runner.invoke(app, ["eval", "--run", str(run), "--variant", "all", "--data-dir", str(data)])
    assert result.exit_code == 0, result.output
    assert result.output.count("CPUExecutionProvider") == 3  # model.onnx, model.int8.onnx, model.fp16.onnx
    png = tmp_path / "d.png"
    Image.fromarray(mnist.test_images[0]).save(png)
    result = runner.invoke(app, ["predict", str(png), "--run", str(run), "--variant", "fp16", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["digit"] == int(mnist.test_labels[0])


def test_auto_variant_picks_fp16_on_a_gpu_provider_and_never_on_the_cpu(fp16_run):
    from resnet_edge.core.machine import CpuInfo
    from resnet_edge.inference.variants import choose_model

    run, _ = fp16_run
    avx2 = CpuInfo("AVX2 box", "x86_64", {"avx2": True})
    assert choose_model(run, provider="cuda", cpu=avx2).variant == "fp16"
    assert choose_model(run, provider="cpu", cpu=avx2).variant == "fp32"


def _rows(ms):
    return [{"variant": v, "batch_size": bs, "p50_ms": t * bs} for bs in (1, 256) for v, t in ms.items()]


def test_recommendation_covers_gpus_fp16_when_faster_never_a_slower_int8():
    from resnet_edge.inference.variants import recommend

    eligible = {"onnx-fp32": None, "onnx-int8": None, "onnx-fp16": None}
    # CUDA as measured on an H200: QDQ INT8 falls back to the CPU (0.6x), FP16 uses tensor cores.
    gpu = recommend(_rows({"onnx-fp32": 1.0, "onnx-int8": 1.7, "onnx-fp16": 0.6}), eligible)
    assert gpu["throughput"]["variant"] == "onnx-fp16" and "FP16 1.67x faster" in gpu["throughput"]["why"]
    # FP16 within noise of FP32: FP32 (no precision caveat); INT8 measured faster still wins where it is.
    tie = recommend(_rows({"onnx-fp32": 1.0, "onnx-int8": 0.5, "onnx-fp16": 0.97}), eligible)
    assert tie["latency"]["variant"] == "onnx-int8" and tie["latency"]["fp16_vs_fp32"] == pytest.approx(1 / 0.97)
    ineligible = recommend(_rows({"onnx-fp32": 1.0, "onnx-fp16": 0.5}), {**eligible, "onnx-fp16": "no figures"})
    assert ineligible["throughput"]["variant"] == "onnx-fp32" and "no figures" in ineligible["throughput"]["why"]


def test_bench_measures_fp16_on_the_cpu_only_when_asked(fp16_run, tmp_path):
    run, _ = fp16_run
    out = tmp_path / "b"
    args = ["bench", "--run", str(run), "--no-torch", "--batch-sizes", "1", "--duration", "0.05", "--min-runs", "5",
            "--repeats", "1", "--quiet", "--out", str(out)]
    assert runner.invoke(app, args).exit_code == 0
    assert {r["variant"] for r in json.loads((out / "bench.json").read_text())["rows"]} == {"onnx-fp32", "onnx-int8"}
    assert runner.invoke(app, args + ["--fp16"]).exit_code == 0
    report = json.loads((out / "bench.json").read_text())
    assert "onnx-fp16" in {r["variant"] for r in report["rows"]}
    assert report["variants"]["onnx-fp16"]["test_accuracy"] == json.loads((run / "export.json").read_text())["fp16"]["test_accuracy"]


def test_fp16_variant_of_a_run_without_it_is_one_line(trained_run, mnist, tmp_path):
    from PIL import Image

    run, _, _ = trained_run
    png = tmp_path / "d.png"
    Image.fromarray(mnist.test_images[0]).save(png)
    assert "run `resnet-edge export --fp16` first" in error_line(["predict", png, "--run", run, "--variant", "fp16"])


def _copy(run, tmp_path, name):
    copy = tmp_path / name
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("bench.*", "deploy"))
    return copy


def test_a_cpu_bench_without_fp16_still_counts_for_a_run_with_fp16(fp16_run, tmp_path):
    """bench on the CPU measures FP32 and INT8 only; the FP16 file it did not measure must not void it."""
    from resnet_edge.core.files import file_sha256
    from resnet_edge.core.machine import cpu_info
    from resnet_edge.inference.variants import choose_model, recommend

    run = _copy(fp16_run[0], tmp_path, "r")
    cpu = cpu_info()
    rows = [{"variant": v, "batch_size": bs, "p50_ms": t * bs} for bs in (1, 64)
            for v, t in (("onnx-fp32", 1.0), ("onnx-int8", 1.5))]  # INT8 measured slower: FP32 recommended
    (run / "bench.json").write_text(json.dumps({
        "provider": "cpu", "machine": {"cpu": cpu.model, "isa": cpu.isa},
        "files": {n: file_sha256(run / n) for n in ("model.onnx", "model.int8.onnx")},
        "recommendation": recommend(rows, {"onnx-fp32": None, "onnx-int8": None})}))
    choice = choose_model(run, cpu=cpu)
    assert choice.variant == "fp32" and "measured on this CPU" in choice.reason


def test_a_saturating_int8_on_a_gpu_provider_still_gives_fp16(fp16_run, monkeypatch):
    from resnet_edge.core import int8
    from resnet_edge.core.machine import CpuInfo
    from resnet_edge.inference.variants import choose_model

    monkeypatch.setattr(int8, "cpu_problem", lambda model, cpu: "it would saturate")
    avx2 = CpuInfo("AVX2 box", "x86_64", {"avx2": True})
    assert choose_model(fp16_run[0], provider="cuda", cpu=avx2).variant == "fp16"
    assert choose_model(fp16_run[0], provider="cpu", cpu=avx2).variant == "fp32"


@pytest.mark.parametrize("bench", [{"recommendation": {"throughput": "onnx-int8"}, "machine": {}},
                                   {"recommendation": {"throughput": {"variant": "onnx-int8"}}, "machine": [1]},
                                   {"recommendation": {"throughput": {"variant": "onnx-int8"}}, "machine": {},
                                    "files": ["model.onnx"]},
                                   {"recommendation": [], "machine": {}}])
def test_a_malformed_bench_json_is_ignored_not_a_traceback(fp16_run, tmp_path, bench):
    from resnet_edge.core.machine import CpuInfo
    from resnet_edge.inference.variants import choose_model

    run = _copy(fp16_run[0], tmp_path, "r")
    (run / "bench.json").write_text(json.dumps(bench))
    vnni = CpuInfo("VNNI box", "x86_64", {"avx512_vnni": True})
    assert choose_model(run, cpu=vnni).variant == "int8"


def test_a_run_without_fp32_chooses_among_what_it_has(fp16_run, tmp_path, monkeypatch):
    from resnet_edge.core import int8
    from resnet_edge.core.machine import CpuInfo
    from resnet_edge.inference.variants import choose_model

    run = _copy(fp16_run[0], tmp_path, "r")
    (run / "model.onnx").unlink()
    avx2 = CpuInfo("AVX2 box", "x86_64", {"avx2": True})
    assert choose_model(run, cpu=avx2).variant == "int8"  # no FP32 to fall back to: INT8 (it does not saturate)
    monkeypatch.setattr(int8, "cpu_problem", lambda model, cpu: "it would saturate")
    assert choose_model(run, cpu=avx2).variant == "fp16"  # the only model this CPU runs as exported
