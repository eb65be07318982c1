"""INT8 that holds on every CPU, the variant a run deploys, and no stale pair of artifacts.

Nothing here depends on the ISA of the machine running the tests: saturation is judged on the model
file, and CPUs are described by CpuInfo values made here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from helpers import error_line
from resnet_edge.cli import app
from resnet_edge.core.machine import CpuInfo

runner = CliRunner()

AVX2_ONLY = CpuInfo("AMD EPYC (test)", "x86_64", {"avx2": True, "avx512f": False, "avx512_vnni": False,
                                                  "avx_vnni": False, "amx_int8": False})
VNNI = CpuInfo("Intel Xeon (test)", "x86_64", {"avx2": True, "avx512f": True, "avx512_vnni": True,
                                               "avx_vnni": False, "amx_int8": False})
ARM = CpuInfo("Neoverse (test)", "aarch64", {"asimddp": True})


def _weights_and_activations(path):
    """Independent of the code under test: every int8 weight that feeds a DequantizeLinear into a Conv or
    Gemm, and the element types of the activation zero points."""
    model = onnx.load(str(path))
    inits = {t.name: t for t in model.graph.initializer}
    consumers = {i: n for n in model.graph.node for i in n.input}
    weights, activations = [], set()
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            user = consumers.get(node.output[0])
            if user is not None and user.op_type in ("Conv", "Gemm", "MatMul") and user.input[1] == node.output[0]:
                weights.append(numpy_helper.to_array(inits[node.input[0]]))
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            activations.add(inits[node.input[2]].data_type)
    return weights, activations


def _pair_sums_fit_int16(weights) -> bool:
    """VPMADDUBSW (x86 without VNNI) adds two uint8 x int8 products into a saturating int16: the worst
    pair of any weight tensor must stay within [-32768, 32767] for every uint8 input."""
    for w in weights:
        flat = np.abs(w.astype(np.int64)).reshape(w.shape[0], -1)
        top2 = np.sort(flat, axis=1)[:, -2:].sum(axis=1) if flat.shape[1] > 1 else flat[:, 0]
        if (255 * top2).max() > 32767:
            return False
    return True


@pytest.fixture(scope="module")
def vnni_model(tmp_path_factory, trained_run):
    """The old default: uint8 activations with full 8-bit weights (scheme "vnni")."""
    from resnet_edge.core.mnist import load_dataset, load_test_split
    from resnet_edge.export.quantize import QuantizationConfig, quantize_model

    run, _, _ = trained_run
    folder = tmp_path_factory.mktemp("vnni")
    images, labels = load_test_split()
    # no search: the int8 weights are the scheme's whatever the calibration chosen
    config = QuantizationConfig(scheme="vnni", calibration_size=128, max_accuracy_drop=100, min_agreement=0,
                                search=False)
    quantize_model(run / "model.onnx", folder / "model.int8.onnx", load_dataset().train_images, images[:500],
                   labels[:500], config)
    return folder / "model.int8.onnx"


def test_default_int8_cannot_saturate_on_any_cpu(trained_run):
    run, _, export = trained_run
    weights, activations = _weights_and_activations(run / "model.int8.onnx")
    assert weights and activations == {onnx.TensorProto.UINT8}
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 64
    assert _pair_sums_fit_int16(weights)
    scheme = json.loads({p.key: p.value for p in onnx.load(str(run / "model.int8.onnx")).metadata_props}["int8_scheme"])
    assert scheme["name"] == "portable" and scheme["weight_range"] == [-64, 64] and scheme["requires_cpu"] is None
    assert export["int8"]["scheme"]["name"] == "portable" and export["int8"]["saturation_free"] is True
    assert "every CPU" in export["int8"]["accuracy_holds"]
    assert export["evaluated_on"]["cpu"] and "isa" in export["evaluated_on"]


def test_the_old_default_fails_the_same_check(vnni_model):
    """8-bit weights with uint8 activations: the check above fails on it, and our audit says so too."""
    from resnet_edge.core.int8 import audit_weights, cpu_problem

    weights, activations = _weights_and_activations(vnni_model)
    assert activations == {onnx.TensorProto.UINT8}
    assert not _pair_sums_fit_int16(weights)
    proto = onnx.load(str(vnni_model))
    audit = audit_weights(proto)
    assert audit.saturation_free is False and audit.max_abs_weight > 64
    assert "int8 dot-product" in cpu_problem(proto, AVX2_ONLY)
    assert cpu_problem(proto, VNNI) is None and cpu_problem(proto, ARM) is None
    assert json.loads({p.key: p.value for p in proto.metadata_props}["int8_scheme"])["requires_cpu"]


def test_portable_model_has_no_cpu_problem(trained_run):
    from resnet_edge.core.int8 import audit_weights, cpu_problem

    run, _, _ = trained_run
    proto = onnx.load(str(run / "model.int8.onnx"))
    assert audit_weights(proto).saturation_free
    assert all(cpu_problem(proto, cpu) is None for cpu in (AVX2_ONLY, VNNI, ARM))
    assert audit_weights(onnx.load(str(run / "model.onnx"))) is None  # FP32: nothing to saturate


def test_predict_and_serve_refuse_a_saturating_model_on_a_cpu_without_vnni(vnni_model, monkeypatch, tmp_path):
    from PIL import Image

    import resnet_edge.core.machine as machine
    import resnet_edge.inference.variants as variants

    # the CPU as every caller sees it: variants.py holds its own name for cpu_info (patching machine's
    # alone passed only on CPUs without VNNI, where the real probe refuses too)
    for module in (machine, variants):
        monkeypatch.setattr(module, "cpu_info", lambda *a: AVX2_ONLY)
    png = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    assert "needs int8 dot-product instructions" in error_line(["predict", png, "--model", vnni_model])
    assert "needs int8 dot-product instructions" in error_line(["serve", "--model", vnni_model, "--port", "0"])
    result = runner.invoke(app, ["eval", str(vnni_model)])  # eval measures what happens, loudly
    assert result.exit_code == 0 and "warning:" in result.stderr


def _run_copy(trained_run, tmp_path):
    run, _, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    for p in copy.glob("bench.*"):
        p.unlink()
    return copy


@pytest.mark.parametrize("cpu, expected", [(VNNI, "int8"), (ARM, "int8"), (AVX2_ONLY, "fp32")])
def test_auto_variant_without_a_bench_follows_the_cpu(trained_run, tmp_path, cpu, expected):
    from resnet_edge.inference.variants import choose_model

    choice = choose_model(_run_copy(trained_run, tmp_path), cpu=cpu)
    assert choice.variant == expected and choice.path.name == ("model.int8.onnx" if expected == "int8" else "model.onnx")
    assert ("dot-product" in choice.reason) and "bench" in choice.reason
    cuda = choose_model(_run_copy(trained_run, tmp_path / "c"), provider="cuda", cpu=VNNI)
    assert cuda.variant == "fp32"


def _bench_json(run, cpu, rows, provider="cpu"):
    from resnet_edge.core.files import file_sha256
    from resnet_edge.inference.variants import recommend

    (run / "bench.json").write_text(json.dumps({
        "provider": provider, "machine": {"cpu": cpu.model, "isa": cpu.isa},
        "files": {n: file_sha256(run / n) for n in ("model.onnx", "model.int8.onnx")},
        "recommendation": recommend(rows, {"onnx-fp32": None, "onnx-int8": None})}))


def _rows(int8_ms, fp32_ms):
    return [{"variant": v, "batch_size": bs, "p50_ms": ms * bs} for bs in (1, 64)
            for v, ms in (("onnx-int8", int8_ms), ("onnx-fp32", fp32_ms))]


def test_auto_variant_follows_a_bench_measured_on_this_cpu(trained_run, tmp_path):
    from resnet_edge.inference.variants import choose_model

    run = _run_copy(trained_run, tmp_path)
    _bench_json(run, VNNI, _rows(int8_ms=1.0, fp32_ms=0.8))  # INT8 measured slower here
    choice = choose_model(run, cpu=VNNI)
    assert choice.variant == "fp32" and "measured on this CPU" in choice.reason
    # The same bench from another CPU is not evidence about this one: the CPU rule applies.
    other = CpuInfo("Another Xeon", "x86_64", VNNI.isa)
    assert choose_model(run, cpu=other).variant == "int8"
    # Nor is a bench of other files: after a re-export the figures are about models no longer there.
    bench = json.loads((run / "bench.json").read_text())
    bench["files"]["model.int8.onnx"] = "0" * 64
    (run / "bench.json").write_text(json.dumps(bench))
    assert "measured on this CPU" not in choose_model(run, cpu=VNNI).reason
    _bench_json(run, AVX2_ONLY, _rows(int8_ms=0.5, fp32_ms=1.0))
    choice = choose_model(run, cpu=AVX2_ONLY, workload="latency")
    assert choice.variant == "int8" and "2.00x faster" in choice.reason
    assert choose_model(run, variant="fp32", cpu=AVX2_ONLY).variant == "fp32"


def test_recommendation_never_picks_a_slower_or_ineligible_int8():
    from resnet_edge.inference.variants import recommend

    slower = recommend(_rows(int8_ms=1.02, fp32_ms=1.0), {"onnx-fp32": None, "onnx-int8": None})
    assert {w: r["variant"] for w, r in slower.items()} == {"latency": "onnx-fp32", "throughput": "onnx-fp32"}
    tie = recommend(_rows(int8_ms=0.98, fp32_ms=1.0), {"onnx-fp32": None, "onnx-int8": None})
    assert tie["throughput"]["variant"] == "onnx-fp32"  # within noise: no accuracy risk for 2 %
    faster = recommend(_rows(int8_ms=0.5, fp32_ms=1.0), {"onnx-fp32": None, "onnx-int8": None})
    assert faster["throughput"] == {"batch_size": 64, "int8_vs_fp32": 2.0, "variant": "onnx-int8",
                                    "why": "INT8 2.00x faster than FP32 at batch 64 (p50)"}
    guarded = recommend(_rows(int8_ms=0.5, fp32_ms=1.0), {"onnx-fp32": None, "onnx-int8": "it loses 0.30 points"})
    assert guarded["latency"]["variant"] == "onnx-fp32" and "0.30 points" in guarded["latency"]["why"]


def _with_checkpoint_sha(path, sha):
    model = onnx.load(str(path))
    for p in model.metadata_props:
        if p.key == "source_checkpoint_sha256":
            p.value = sha
    onnx.save(model, str(path))


def test_a_pair_from_two_checkpoints_is_refused(trained_run, tmp_path):
    run = _run_copy(trained_run, tmp_path)
    _with_checkpoint_sha(run / "model.int8.onnx", "0" * 64)
    png = tmp_path / "d.png"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png)
    for args in (["predict", png, "--run", run], ["serve", "--run", run, "--port", "0"], ["eval", "--run", run]):
        assert "come from different checkpoints" in error_line(args)


def test_predict_says_which_file_it_chose_and_why(trained_run, tmp_path, mnist):
    from PIL import Image

    run = _run_copy(trained_run, tmp_path)
    png = tmp_path / "d.png"
    Image.fromarray(mnist.test_images[0]).save(png)
    result = runner.invoke(app, ["predict", str(png), "--run", str(run), "--variant", "fp32"])
    assert result.exit_code == 0, result.output
    assert f"using {run / 'model.onnx'} (--variant fp32)" in result.stderr
    auto = runner.invoke(app, ["predict", str(png), "--run", str(run)])
    assert auto.exit_code == 0 and "using " in auto.stderr and "dot-product" in auto.stderr


def test_export_without_quantize_removes_the_stale_int8(trained_run, tmp_path):
    from resnet_edge.export.onnx_export import export_run

    run = _run_copy(trained_run, tmp_path)
    report = export_run(run, quantize=False)
    assert not (run / "model.int8.onnx").exists() and report["removed_stale"] == ["model.int8.onnx"]
    saved = json.loads((run / "export.json").read_text())
    assert "int8" not in saved and saved["checkpoint"]["sha256"] == report["checkpoint"]["sha256"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_interrupted_export_leaves_the_old_files_whole(trained_run, tmp_path, monkeypatch):
    import resnet_edge.export.quantize as quantize
    from resnet_edge.export.onnx_export import export_run

    run = _run_copy(trained_run, tmp_path)
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(quantize, "quantize_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_run(run, quantize=True)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # no new, removed or temporary file
