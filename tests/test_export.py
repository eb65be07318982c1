from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from helpers import error_line
from resnet_edge.cli import app
from resnet_edge.core.mnist import load_test_split
from resnet_edge.export.int8_search import AccuracyGuardError
from resnet_edge.export.quantize import QuantizationConfig, quantize_model
from resnet_edge.inference.runtime import create_session
from resnet_edge.training.checkpoint import load_checkpoint, model_from_checkpoint

runner = CliRunner()


def test_real_mnist_end_to_end(trained_run):
    """The default suite's one real run: resnet8, 1 epoch of 40,000 MNIST images; then export --quantize."""
    run, report, export = trained_run
    assert report["test_accuracy"] >= 0.98
    assert all(p["max_abs_diff"] <= 1e-4 and p["top1_equal"] for p in export["parity"])
    assert [p["batch_size"] for p in export["parity"]] == [1, 7, 64]
    # The ONNX model reproduces the checkpoint's accuracy; INT8 keeps it within the guard.
    assert abs(export["fp32"]["test_accuracy"] - report["test_accuracy"]) <= 0.0005
    assert export["int8"]["accuracy_drop_points"] <= 0.1 + 1e-9
    assert export["int8"]["top1_agreement"] >= 0.99
    saved = json.loads((run / "export.json").read_text())
    assert saved["int8"]["bytes"] == (run / "model.int8.onnx").stat().st_size


def test_dynamic_batch_parity_at_many_sizes(trained_run):
    run, _, _ = trained_run
    model = model_from_checkpoint(load_checkpoint(run / "checkpoint.pt"), run / "checkpoint.pt")
    session = create_session(run / "model.onnx")
    images, _ = load_test_split()
    for bs in (1, 2, 3, 16, 100, 257):
        with torch.no_grad():
            expected = model(torch.from_numpy(images[:bs])).numpy()
        got = session.run(["logits"], {"pixels": images[:bs]})[0]
        assert got.shape == (bs, 10)
        assert np.abs(got - expected).max() <= 1e-4
        assert (got.argmax(1) == expected.argmax(1)).all()


def test_second_onnx_consumer_agrees(trained_run):
    from onnx.reference import ReferenceEvaluator

    run, _, _ = trained_run
    images, _ = load_test_split()
    x = images[:4]
    ref = ReferenceEvaluator(str(run / "model.onnx")).run(None, {"pixels": x})[0]
    ort_out = create_session(run / "model.onnx").run(["logits"], {"pixels": x})[0]
    assert np.abs(ref - ort_out).max() <= 1e-4


def test_graph_contract_and_metadata(trained_run):
    run, _, _ = trained_run
    model = onnx.load(str(run / "model.onnx"))
    (inp,), (out,) = model.graph.input, model.graph.output
    assert inp.name == "pixels" and out.name == "logits"
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [1, 28, 28]
    assert not any(n.op_type == "BatchNormalization" for n in model.graph.node)  # folded
    props = {p.key: p.value for p in model.metadata_props}
    assert props["architecture"] == "resnet8"
    assert json.loads(props["labels"]) == [str(i) for i in range(10)]
    assert json.loads(props["normalization"])["mean"] == pytest.approx(0.1307, abs=1e-3)
    assert len(props["source_checkpoint_sha256"]) == 64 and float(props["test_accuracy"]) > 0.9
    assert "torch" in json.loads(props["versions"])


def test_int8_graph_is_qdq_with_int8_weights(trained_run):
    run, _, export = trained_run
    model = onnx.load(str(run / "model.int8.onnx"))
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    int8_weights = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "no int8 convolution weights"
    assert export["int8"]["size_ratio"] < 0.5


def test_accuracy_guard_fails_clearly_when_int8_cannot_hold(tmp_path, trained_run):
    from resnet_edge.core.contract import to_pixels
    from resnet_edge.core.mnist import load_dataset

    run, _, _ = trained_run
    images, labels = load_test_split()
    # Calibrated on half-intensity images: every activation range is too narrow and clips.
    dim = to_pixels(load_dataset().train_images[:256]) * 0.5
    out = tmp_path / "model.int8.onnx"
    with pytest.raises(AccuracyGuardError, match=r"INT8 loses \d+\.\d+ points .* no INT8 model was written"):
        quantize_model(run / "model.onnx", out, dim, images[:2000], labels[:2000],
                       QuantizationConfig(calibration_size=64, max_accuracy_drop=0.1))
    assert not out.exists() and not list(tmp_path.iterdir())


def test_export_refused_by_the_guard_says_the_run_keeps_what_it_had(tmp_path, trained_run, monkeypatch):
    """`export --quantize` is all or nothing: when INT8 cannot hold the guard no FP32 model is written
    either, so the one error line says so and how to get the FP32 model alone; the earlier export stays."""
    import shutil

    import resnet_edge.export.quantize as quantize

    run, _, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}

    def refuse(*args, **kwargs):
        raise AccuracyGuardError("INT8 loses 0.13 points of test accuracy ...; no INT8 model was written")

    monkeypatch.setattr(quantize, "export_int8", refuse)
    line = error_line(["export", "--run", copy, "--quantize", "--quiet"])
    assert "no INT8 model was written" in line and "the run keeps what it had" in line
    assert "export` without --quantize writes the FP32 model alone" in line
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == before


def test_accuracy_guard_keeps_the_worst_layers_float(tmp_path, trained_run, monkeypatch):
    """The fully quantized model is made to miss the guard on the test set: the next round keeps the
    worst-quantized tensors in float, is measured for real, and its model is the one written."""
    import resnet_edge.export.int8_search as q
    from resnet_edge.core.contract import to_pixels
    from resnet_edge.core.mnist import load_dataset

    run, _, _ = trained_run
    images, labels = load_test_split()
    real, on_test = q.evaluate_session, []

    def evaluate(session, pixels, *args, **kwargs):
        result = real(session, pixels, *args, **kwargs)
        if len(pixels) == 2000:  # the test set (the selection split here is 384 images)
            on_test.append(result.accuracy)
            if len(on_test) == 2:  # FP32 first, then the fully quantized model
                result.accuracy -= 0.01
        return result

    monkeypatch.setattr(q, "evaluate_session", evaluate)
    out = tmp_path / "model.int8.onnx"
    result = quantize_model(run / "model.onnx", out, to_pixels(load_dataset().train_images[:512]),
                            images[:2000], labels[:2000], QuantizationConfig(calibration_size=128, search=False, min_agreement=99.0))
    assert [r["drop_points"] > 0.1 for r in result.guard_rounds] == [True, False]
    assert result.float_nodes and result.accuracy_drop_points <= 0.1
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["quantization"])["float_nodes"] == result.float_nodes


def test_export_bad_checkpoints(tmp_path, trained_run):
    run, _, _ = trained_run
    assert "no checkpoint there" in error_line(["export", "--run", tmp_path / "empty"])
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "checkpoint.pt").write_bytes((run / "checkpoint.pt").read_bytes()[:3000])
    assert "not a readable checkpoint" in error_line(["export", "--run", cut])
    assert not (cut / "model.onnx").exists()


def test_export_option_errors(trained_run):
    run, _, _ = trained_run
    assert "--calibration-method must be one of" in error_line(["export", "--run", run, "--calibration-method", "magic"])
    assert "--calibration-size must be at least 1" in error_line(["export", "--run", run, "--calibration-size", "0"])


def test_eval_bad_onnx_files(tmp_path, trained_run):
    run, _, _ = trained_run
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x08\x07garbage" * 10)
    assert "not a readable ONNX model" in error_line(["eval", corrupt])
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes((run / "model.onnx").read_bytes()[:5000])
    assert "truncated" in error_line(["eval", truncated])
    assert "no model file there" in error_line(["eval", tmp_path / "missing.onnx"])


def _with_external_data(src, folder, location):
    """A copy of the model whose first initializer points at ``location`` as external data."""
    model = onnx.load(str(src))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path = folder / "evil.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("location", ["../x", "/etc/passwd", "link.bin"])
def test_external_data_outside_the_folder_is_refused(tmp_path, trained_run, location):
    run, _, _ = trained_run
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "x").write_bytes(b"\0" * 64)
    (folder / "link.bin").symlink_to(tmp_path / "x")
    path = _with_external_data(run / "model.onnx", folder, location)
    assert "points outside the model's folder" in error_line(["eval", path])


def test_eval_refuses_a_model_outside_the_contract(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 32, 32])
    y = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 32, 32])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["image"], ["logits"])], "g", [x], [y]))
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    assert "expected one input named 'pixels'" in error_line(["eval", path])


def test_eval_reports_the_run_models(trained_run):
    run, report, export = trained_run
    result = runner.invoke(app, ["eval", "--run", str(run), "--variant", "all"])
    assert result.exit_code == 0, result.output
    assert f"{100 * export['int8']['test_accuracy']:.2f} %" in result.stdout
    assert f"{100 * export['fp32']['test_accuracy']:.2f} %" in result.stdout


def test_eval_of_onnx_does_not_import_torch(trained_run):
    import subprocess
    import sys

    run, _, _ = trained_run
    code = (f"import sys; from resnet_edge.inference.evaluate import evaluate_file; "
            f"r = evaluate_file(__import__('pathlib').Path({str(run / 'model.onnx')!r})); "
            "assert r['accuracy'] > 0.9; assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ INT8 that stays INT8 (issue 21)
def test_each_calibration_method_sets_its_own_ranges(tmp_path, mnist):
    """ONNX Runtime's entropy calibrator at its default 128 bins searched one threshold, the whole range:
    --calibration-method entropy gave minmax's scales byte for byte. Each method must set other ranges."""
    from onnxruntime.quantization.calibrate import create_calibrator

    from resnet_edge.export.calibration import Calibration, _batches, activation_ranges, calibration_images
    from test_serve_hardening import linear_model

    model = linear_model(tmp_path / "m.onnx")
    calib = calibration_images(mnist.train_images, 256, 0)
    calibrator = create_calibrator(str(model), None, augmented_model_path=str(tmp_path / "augmented.onnx"))
    calibrator.collect_data(_batches(calib, 64))
    data = calibrator.compute_data()
    minmax = {k: (float(np.min(data[k].range_value[0])), float(np.max(data[k].range_value[1]))) for k in data}
    found = {c.name: activation_ranges(model, calib, c, 64, tmp_path) for c in
             (Calibration("entropy"), Calibration("percentile", 99.99), Calibration("percentile", 99.9))}
    assert activation_ranges(model, calib, Calibration("minmax"), 64, tmp_path) is None  # quantize_static's own
    for name, ranges in found.items():
        assert ranges.keys() == minmax.keys()
        assert ranges["logits"] != minmax["logits"], f"{name} gave minmax's range"
        assert minmax["logits"][0] <= ranges["logits"][0] and ranges["logits"][1] <= minmax["logits"][1]
    logits = [ranges["logits"] for ranges in found.values()]
    assert len(set(logits)) == len(logits)  # each method its own range


def test_search_keeps_a_quantized_candidate_before_any_float_fallback(tmp_path, trained_run, monkeypatch):
    """minmax is made to disagree with FP32 on the selection split: the search ranks it last and writes the
    best other candidate, checked alone on the test set, with no layer in float; every candidate is logged."""
    import resnet_edge.export.int8_search as q
    from resnet_edge.core.mnist import load_dataset

    run, _, export = trained_run
    images, labels = load_test_split()
    real = q._evaluate

    def evaluate(path, split, progress=None):
        result = real(path, split, progress)
        if path.name.startswith("candidate-0") and len(split.pixels) == 500:  # minmax (both roundings), selection
            result.predictions = (result.predictions + 1) % 10
        return result

    monkeypatch.setattr(q, "_evaluate", evaluate)
    monkeypatch.setattr(q, "SEARCH", (q.Calibration("minmax"), q.Calibration("percentile", 99.99)))
    train = load_dataset()
    out = tmp_path / "model.int8.onnx"
    result = quantize_model(run / "model.onnx", out, train.train_images[:3000], images[:1000], labels[:1000],
                            QuantizationConfig(calibration_size=64, selection_size=500, min_agreement=98.0),
                            train_labels=train.train_labels[:3000])
    assert result.calibration.startswith("percentile 99.99") and result.float_nodes == []
    assert [c["calibration"] for c in result.candidates if c.get("chosen")] == ["percentile 99.99"]
    refined = [c for c in result.candidates if "overridden_tensors" in c]  # the best, 3 tensors re-ranged
    assert len(refined) == 1 and len(refined[0]["overridden_tensors"]) == 3
    larger = [c for c in result.candidates if c["calibration_images"] == 128]  # the best calibration on 64 + 64
    assert len(larger) == 1 and larger[0]["calibration"] == "percentile 99.99, 128 calibration images"
    verdicts = {(c["calibration"], c["weights"]): c.get("holds") for c in result.candidates
                if c not in refined and c not in larger}
    assert set(verdicts) == {(m, w) for m in ("minmax", "percentile 99.99") for w in ("nearest", "bias correction")}
    assert [c["holds"] for c in result.candidates if "holds" in c] == [True]
    assert sum("holds" in c for c in result.candidates) == 1  # one candidate checked on the test set, no more
    assert [r["float_nodes"] for r in result.guard_rounds] == [[]]
    assert all(c["seconds"] > 0 for c in result.candidates)
    assert [c["calibration"] for c in result.candidates][-2:] == ["minmax", "minmax"]  # ranked last: agreement 0
    assert all(c["selection_agreement"] > 0.9 for c in result.candidates if c["calibration"] != "minmax")
    assert result.selection["images"] == 500 and result.selection["labels"]
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["quantization"])["calibration"] == result.calibration
    assert json.loads(props["quantization"])["calibration_images"] == result.calibration_images
    # the real run's export.json logs its search too
    assert sum(bool(c.get("chosen")) for c in export["int8"]["candidates"]) == 1


def test_agreement_is_part_of_the_guard():
    from resnet_edge.export.int8_search import _holds

    config = QuantizationConfig(max_accuracy_drop=0.1, min_agreement=99.0)
    assert _holds({"drop_points": 0.0, "agreement": 0.991}, config)
    assert not _holds({"drop_points": 0.0, "agreement": 0.989}, config)  # same accuracy, other digits
    assert not _holds({"drop_points": 0.2, "agreement": 0.999}, config)
    assert "--min-agreement is a percentage" in error_line(["export", "--quantize", "--min-agreement", "101"])


def test_bias_correction_keeps_the_contract_and_shifts_only_biases(tmp_path, trained_run, mnist):
    """The weight-side method: the corrected float model has the same graph and weights, biases moved by
    the rounding's mean effect; quantized, it keeps the contract and FP32's answers."""
    from onnx import numpy_helper
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from resnet_edge.export.calibration import calibration_images
    from resnet_edge.export.weights import _quantize, bias_correction
    from resnet_edge.inference.runtime import check_contract, create_session

    run, _, _ = trained_run
    pre, qdq, corrected, final = (tmp_path / n for n in ("pre.onnx", "q.onnx", "bc.onnx", "bc.int8.onnx"))
    quant_pre_process(str(run / "model.onnx"), str(pre), skip_symbolic_shape=True)
    calib = calibration_images(mnist.train_images, 128, 0)
    _quantize(pre, qdq, calib, QuantizationConfig(), [], None)
    assert bias_correction(pre, qdq, calib, corrected) == 10  # resnet8: 9 convolutions and the classifier
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(pre)).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(corrected)).graph.initializer}
    moved = [k for k in before if not np.array_equal(before[k], after[k])]
    assert moved and all(k.endswith("bias") for k in moved) and before.keys() == after.keys()
    assert max(float(np.abs(before[k] - after[k]).max()) for k in moved) < 0.5
    _quantize(corrected, final, calib, QuantizationConfig(), [], None)
    check_contract(onnx.load(str(final)), final)
    images, _ = load_test_split()
    x = images[:500]
    fp32 = create_session(run / "model.onnx").run(["logits"], {"pixels": x})[0]
    int8 = create_session(final).run(["logits"], {"pixels": x})[0]
    assert int8.shape == (500, 10) and (int8.argmax(1) == fp32.argmax(1)).mean() >= 0.99


def test_selection_and_every_calibration_set_are_disjoint():
    """The search chooses on images no calibration saw, the larger calibration set included."""
    from resnet_edge.export.calibration import calibration_images, selection_split

    images = np.arange(3000, dtype=np.float32).reshape(3000, 1, 1, 1) * np.ones((1, 1, 28, 28), np.float32)
    config = QuantizationConfig(calibration_size=500, selection_size=2000)
    calib = {float(x) for x in calibration_images(images, 500, config.seed)[:, 0, 0, 0]}
    select, _, more = selection_split(images, None, config)
    chosen, extra = {float(x) for x in select[:, 0, 0, 0]}, {float(x) for x in more[:, 0, 0, 0]}
    assert len(chosen) == 2000 and len(extra) == 500 and not (calib & chosen or calib & extra or chosen & extra)
    from resnet_edge.core.errors import UserError

    with pytest.raises(UserError, match="leaves 50 of the 3000 training images"):
        selection_split(images, None, QuantizationConfig(calibration_size=2950))


def test_fallback_from_a_bias_corrected_candidate_keeps_float_layers_uncorrected(tmp_path, trained_run, monkeypatch):
    """A layer kept in float has its float weights, so its bias must be the model's own: the correction
    is for rounded weights only (a review found fallback carried it into the float layers)."""
    from onnx import numpy_helper

    import resnet_edge.export.int8_search as q
    from resnet_edge.core.mnist import load_dataset

    run, _, _ = trained_run
    images, labels = load_test_split()
    real, test_checks = q._evaluate, []

    def evaluate(path, split, progress=None):
        result = real(path, split, progress)
        if len(split.pixels) == 500 and "bias" not in path.name and path.name.startswith("candidate-"):
            result.predictions = (result.predictions + 1) % 10  # every nearest-rounded candidate ranks last
        if len(split.pixels) == 1000:
            test_checks.append(path.name)
            if len(test_checks) == 1:  # the search's model misses the guard: fallback
                result.accuracy -= 0.01
        return result

    monkeypatch.setattr(q, "_evaluate", evaluate)
    monkeypatch.setattr(q, "SEARCH", (q.Calibration("minmax"),))
    train = load_dataset()
    out = tmp_path / "model.int8.onnx"
    result = quantize_model(run / "model.onnx", out, train.train_images[:3000], images[:1000], labels[:1000],
                            QuantizationConfig(calibration_size=64, selection_size=500, min_agreement=98.0),
                            train_labels=train.train_labels[:3000])
    assert result.weights == "bias correction" and result.float_nodes
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(run / "model.onnx")).graph.initializer}
    written = onnx.load(str(out))
    inits = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    float_biases = [n.input[2] for n in written.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) == 3
                    and n.input[2] in inits and n.input[2] in original]
    assert float_biases, "no layer was kept in float"
    for name in float_biases:
        assert np.array_equal(inits[name], original[name]), f"{name}: a float layer's bias was corrected"


def _qdq_pair(tmp_path, scales: dict[str, tuple[float, int]]):
    """A float model pixels -> hidden = 20 * pixels - 5 -> logits = hidden / 2, and its QDQ twin with the
    (scale, uint8 zero point) of ``scales`` on each of the three tensors, graph input included."""
    from onnx import TensorProto, helper, numpy_helper

    def graph(nodes, inits):
        return helper.make_model(
            helper.make_graph(
                nodes,
                "g",
                [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 1, 28, 28])],
                [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 1, 28, 28])],
                [numpy_helper.from_array(np.asarray(v, dtype=np.float32), k) for k, v in inits.items()],
            ),
            opset_imports=[helper.make_opsetid("", 17)],
        )

    consts = {"twenty": 20.0, "five": 5.0, "half": 0.5}
    float_nodes = [
        helper.make_node("Mul", ["pixels", "twenty"], ["scaled"]),
        helper.make_node("Sub", ["scaled", "five"], ["hidden"]),
        helper.make_node("Mul", ["hidden", "half"], ["logits"]),
    ]
    pre = tmp_path / "pre.onnx"
    onnx.save(graph(float_nodes, consts), str(pre))
    nodes, inits = [], dict(consts)
    for name, (scale, _) in scales.items():  # x -> QuantizeLinear -> DequantizeLinear -> x_dq
        inits[f"{name}_scale"] = scale
        nodes += [
            helper.make_node("QuantizeLinear", [name, f"{name}_scale", f"{name}_zero"], [f"{name}_q"]),
            helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_scale", f"{name}_zero"], [f"{name}_dq"]),
        ]
    q = graph(
        [
            *nodes[:2],
            helper.make_node("Mul", ["pixels_dq", "twenty"], ["scaled"]),
            helper.make_node("Sub", ["scaled", "five"], ["hidden"]),
            *nodes[2:4],
            helper.make_node("Mul", ["hidden_dq", "half"], ["logits"]),
            *nodes[4:],  # logits_dq: what a consumer of the QDQ model's output would read
        ],
        inits,
    )
    # the zero points are uint8 initializers, as quantize_static writes them
    q.graph.initializer.extend(numpy_helper.from_array(np.uint8(z), f"{n}_zero") for n, (_, z) in scales.items())
    qdq = tmp_path / "qdq.onnx"
    onnx.save(q, str(qdq))
    onnx.checker.check_model(str(qdq), full_check=True)
    return pre, qdq


def test_sensitivity_ranking_puts_the_worst_quantized_tensor_first(tmp_path, mnist):
    """hidden spans [-5, 15]: a range that clips it at 1 is by far its worst quantization and comes first,
    the pixels' own 1/255 steps are exact on MNIST and come last."""
    from resnet_edge.core.contract import to_pixels
    from resnet_edge.export.sensitivity import sensitivity_ranking

    images = to_pixels(mnist.test_images[:64])
    # hidden's and the pixels' ranges are their exact spans; logits' [-2.5, 13.4] wastes a third of its levels
    fine = {"pixels": (1 / 255, 0), "hidden": (20 / 255, 64), "logits": (16 / 255, 40)}
    clipped = {**fine, "hidden": (6 / 255, 212)}  # [-5, 1]: every stroke pixel (up to 15) clips
    ranking = sensitivity_ranking(*_qdq_pair(tmp_path, clipped), images)
    assert [name for name, _ in ranking] == ["hidden", "logits", "pixels"], ranking
    snr = dict(ranking)
    assert snr["hidden"] < 15 < 30 < snr["logits"] < 100 < snr["pixels"]  # pixels: exact up to float rounding

    # The graph input is ranked like any tensor: too narrow a range for the pixels puts them first.
    narrow = {**fine, "pixels": (0.5 / 255, 0)}
    ranking = sensitivity_ranking(*_qdq_pair(tmp_path, narrow), images)
    assert [name for name, _ in ranking] == ["pixels", "logits", "hidden"], ranking
