"""`package`: a Triton repository checked with Triton's own ModelConfig protobuf, a KServe manifest,
ORT-format models with parity, and `serve --repository` answering like `serve --model`."""

from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from helpers import start_server
from resnet_edge.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def deploy(trained_run, tmp_path_factory):
    run, _, _ = trained_run
    copy = tmp_path_factory.mktemp("pkg") / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("bench.*", "deploy"))
    result = runner.invoke(app, ["package", "--run", str(copy), "--max-batch-size", "32", "--threads", "2"])
    assert result.exit_code == 0, result.output
    return copy, copy / "deploy"


def _graph_io(path):
    graph = onnx.load(str(path)).graph
    dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]  # noqa: E731
    return {v.name: dims(v) for v in graph.input}, {v.name: dims(v) for v in graph.output}


@pytest.mark.parametrize("name, source", [("resnet8", "model.onnx"), ("resnet8_int8", "model.int8.onnx")])
def test_triton_config_parses_with_tritons_protobuf_and_matches_the_graph(deploy, name, source):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    run, out = deploy
    folder = out / "triton" / name
    config = text_format.Parse((folder / "config.pbtxt").read_text(), mc.ModelConfig())
    assert config.name == name and config.platform == "onnxruntime_onnx" and config.max_batch_size == 32
    assert (folder / "1" / "model.onnx").read_bytes() == (run / source).read_bytes()
    inputs, outputs = _graph_io(folder / "1" / "model.onnx")
    assert {i.name: [d for d in i.dims] for i in config.input} == {k: v[1:] for k, v in inputs.items()}
    assert {o.name: [d for d in o.dims] for o in config.output} == {k: v[1:] for k, v in outputs.items()}
    assert all(isinstance(v[0], str) for v in (*inputs.values(), *outputs.values()))  # dynamic batch left out
    assert config.input[0].data_type == mc.TYPE_FP32 and config.output[0].data_type == mc.TYPE_FP32
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert config.instance_group[0].kind == mc.ModelInstanceGroup.KIND_CPU and config.instance_group[0].count == 1
    assert config.parameters["intra_op_thread_count"].string_value == "2"
    labels = (folder / config.output[0].label_filename).read_text().split()
    assert labels == [str(i) for i in range(10)]


def test_kserve_manifest(deploy):
    import yaml

    _, out = deploy
    manifest = yaml.safe_load((out / "kserve.yaml").read_text())
    assert manifest["apiVersion"] == "serving.kserve.io/v1beta1" and manifest["kind"] == "InferenceService"
    model = manifest["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "onnx" and model["protocolVersion"] == "v2"
    assert model["storageUri"] and model["resources"]["limits"]["cpu"]


def test_ort_format_models_match_the_onnx_models(deploy):
    import onnxruntime as ort

    from resnet_edge.core.mnist import load_test_split

    run, out = deploy
    images, _ = load_test_split()
    x = images[:100]
    for variant, source in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
        ort_model = out / "ort" / f"model.{variant}.ort"
        assert ort_model.read_bytes()[4:8] == b"ORTM"  # the flatbuffer's file identifier
        got = ort.InferenceSession(str(ort_model), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
        expected = ort.InferenceSession(str(run / source), providers=["CPUExecutionProvider"]).run(None, {"pixels": x})[0]
        assert np.abs(got - expected).max() <= 1e-5
    assert "Conv" in (out / "ort" / "required_operators.config").read_text()


def test_serve_repository_answers_like_serve_model(deploy):
    from resnet_edge.core.mnist import load_test_split

    run, out = deploy
    images, _ = load_test_split()
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [8, 1, 28, 28],
                        "data": images[:8].reshape(-1).tolist()}]}
    answers = []
    for args in (["--repository", out / "triton", "--model-name", "resnet8"], ["--model", run / "model.onnx",
                                                                                "--model-name", "resnet8"]):
        proc, url = start_server(*args)
        try:
            r = httpx.post(f"{url}/v2/models/resnet8/infer", json=body, timeout=30)
            assert r.status_code == 200, r.text
            answers.append(np.array(r.json()["outputs"][0]["data"]))
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    assert np.array_equal(answers[0], answers[1])


def test_tritonclient_http_json_against_our_server(deploy):
    """Triton's own HTTP client, in JSON mode, gets the same digits as `predict` would."""
    import tritonclient.http as triton

    from resnet_edge.core.mnist import load_test_split
    from resnet_edge.inference.runtime import create_session

    run, out = deploy
    images, _ = load_test_split()
    x = np.ascontiguousarray(images[:16])
    proc, url = start_server("--repository", out / "triton", "--model-name", "resnet8")
    try:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        assert client.is_server_ready() and client.is_model_ready("resnet8")
        inp = triton.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        result = client.infer("resnet8", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=False)])
        logits = result.as_numpy("logits")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    expected = create_session(run / "model.onnx").run(["logits"], {"pixels": x})[0]
    assert np.array_equal(logits.argmax(1), expected.argmax(1)) and np.abs(logits - expected).max() < 1e-4


def test_package_and_repository_errors(tmp_path, deploy):
    def line(args):
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 1, result.output
        return result.stderr.strip()

    run, out = deploy
    assert "no model to package" in line(["package", "--run", tmp_path])
    assert "--kind must be cpu or gpu" in line(["package", "--run", run, "--kind", "tpu"])
    assert "no model 'resnet9'" in line(["serve", "--repository", out / "triton", "--model-name", "resnet9"])
    assert "no model repository there" in line(["serve", "--repository", tmp_path / "none"])
    assert "without --run, --model or --variant" in line(["serve", "--repository", out / "triton", "--variant", "int8"])


def test_package_never_replaces_a_folder_it_did_not_write(deploy, tmp_path):
    run, out = deploy
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    for target, message in ((run, "it holds the run itself"), (run.parent, "it holds the run itself"),
                            (keep, "did not write")):
        result = runner.invoke(app, ["package", "--run", str(run), "--out", str(target)])
        assert result.exit_code == 1 and message in result.stderr, result.output
    assert (keep / "notes.txt").read_text() == "mine" and (run / "checkpoint.pt").exists()
    again = runner.invoke(app, ["package", "--run", str(run), "--no-ort"])  # an earlier package: replaced whole
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in out.iterdir()) == [".resnet-edge-package", "kserve.yaml", "triton"]


def test_repository_model_choice_follows_cpu_and_provider(deploy):
    from test_int8_portability import AVX2_ONLY, VNNI

    from resnet_edge.core.repository import scan_repository
    from resnet_edge.inference.variants import default_model

    _, out = deploy
    names = list(scan_repository(out / "triton"))  # what package wrote: resnet8, resnet8_int8
    assert default_model(names, "cpu", VNNI) == "resnet8_int8"
    assert default_model(names, "cpu", AVX2_ONLY) == "resnet8"
    assert default_model(names, "cuda", VNNI) == "resnet8"
    assert default_model(["resnet8_int8"], "cpu", AVX2_ONLY) == "resnet8_int8"  # the only one


# ------------------------------------------------------------------ names and folders from files (issue 25)
def _run_with_architecture(run, folder, arch):
    """A copy of the run's FP32 model alone (no INT8, no bench), its 'architecture' metadata set to ``arch``."""
    folder.mkdir(parents=True)
    model = onnx.load(str(run / "model.onnx"))
    for p in model.metadata_props:
        if p.key == "architecture":
            p.value = arch
    onnx.save(model, str(folder / "model.onnx"))
    return folder


@pytest.mark.parametrize("arch", ["/tmp/elsewhere/prod_model", "../../../escaped", 'm" backend: "python',
                                  "m\n---\napiVersion: v1\nkind: Pod", "a/b", "A" * 64, "r\x1b[2J", "..", ".hidden"])
def test_package_refuses_an_architecture_that_is_not_a_plain_name(deploy, tmp_path, arch):
    """audit-3 #1 and #2: the name became folders outside --out and config lines; now one line, nothing written."""
    from helpers import error_line

    run, _ = deploy
    copy = _run_with_architecture(run, tmp_path / "work" / "run", arch)
    out = tmp_path / "work" / "deploy"
    line = error_line(["package", "--run", copy, "--out", out, "--no-ort"])
    assert "not a valid model name" in line and "\x1b" not in line and len(line) < 300
    assert not out.exists() and sorted(p.name for p in (tmp_path / "work").iterdir()) == ["run"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_config_pbtxt_and_kserve_yaml_are_written_by_their_formats_quoting():
    """Even a value that passed no name check cannot add fields or documents: protobuf's escaping in
    config.pbtxt, a YAML emitter for kserve.yaml (here through --storage-uri, which is the user's own)."""
    import yaml
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from resnet_edge.core.config import PackageConfig
    from resnet_edge.deploy.package import kserve_manifest, triton_config

    hostile = 'm" parameters { key: "EXECUTION_ENV_PATH" value: { string_value: "x" } } backend: "python\n\x1b'
    config = text_format.Parse(triton_config(hostile, PackageConfig()), mc.ModelConfig())
    assert config.name == hostile and config.backend == "" and "EXECUTION_ENV_PATH" not in config.parameters
    uri = "s3://bucket/repo\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: injected}\n# "
    docs = [d for d in yaml.safe_load_all(kserve_manifest("resnet8", ["resnet8"], PackageConfig(storage_uri=uri))) if d]
    assert len(docs) == 1 and docs[0]["kind"] == "InferenceService"
    assert docs[0]["spec"]["predictor"]["model"]["storageUri"] == uri


def test_package_out_never_deletes_a_repository_it_did_not_write(deploy, tmp_path):
    """audit-3 #3: an --out whose top level held only triton/ was deleted whole, other models with it."""
    from helpers import error_line

    run, _ = deploy
    store = tmp_path / "models_store"
    for m in ("prod_model_a", "prod_model_b"):
        (store / "triton" / m / "1").mkdir(parents=True)
        (store / "triton" / m / "config.pbtxt").write_text(f'name: "{m}"\n')
        (store / "triton" / m / "1" / "model.onnx").write_text("precious weights\n")
    line = error_line(["package", "--run", run, "--out", store, "--no-ort"])
    assert "did not write" in line
    assert sorted(p.name for p in (store / "triton").iterdir()) == ["prod_model_a", "prod_model_b"]
    assert (store / "triton" / "prod_model_a" / "1" / "model.onnx").read_text() == "precious weights\n"
    # a symbolic link to an empty folder: written into that folder (no traceback); again: replaced, as ours
    (tmp_path / "real_out").mkdir()
    (tmp_path / "link_out").symlink_to(tmp_path / "real_out")
    for _ in range(2):
        result = runner.invoke(app, ["package", "--run", str(run), "--out", str(tmp_path / "link_out"), "--no-ort"])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "link_out").is_symlink()
        assert sorted(p.name for p in (tmp_path / "real_out").iterdir()) == [".resnet-edge-package", "kserve.yaml", "triton"]


def test_a_package_folder_with_anything_else_in_it_is_not_replaced(deploy, tmp_path):
    """A marked folder is replaced only while it holds nothing but the package: a model or a note added
    since is never deleted with it (the marker alone would have let package delete them)."""
    from helpers import error_line

    run, _ = deploy
    out = tmp_path / "deploy"
    assert runner.invoke(app, ["package", "--run", str(run), "--out", str(out), "--no-ort"]).exit_code == 0
    (out / "triton" / "someone_elses_model" / "1").mkdir(parents=True)
    assert "someone_elses_model" in error_line(["package", "--run", run, "--out", out, "--no-ort"])
    shutil.rmtree(out / "triton" / "someone_elses_model")
    (out / "notes.md").write_text("mine")
    assert "notes.md" in error_line(["package", "--run", run, "--out", out, "--no-ort"])
    assert (out / "notes.md").read_text() == "mine"
    (out / "notes.md").unlink()
    (out / ".resnet-edge-package").unlink()  # a package written before the marker: this run's models only
    assert runner.invoke(app, ["package", "--run", str(run), "--out", str(out), "--no-ort"]).exit_code == 0


def test_export_keeps_a_deploy_folder_it_did_not_write(trained_run, tmp_path):
    """export removes <run>/deploy (copies of the old models) only when package wrote it; a link or a
    folder of someone else's is kept, and said, never deleted (a link used to end in a traceback after
    the old models were already gone)."""
    run, _, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("deploy", "bench.*"))
    target = tmp_path / "elsewhere"
    (target / "triton").mkdir(parents=True)
    (copy / "deploy").symlink_to(target)
    result = runner.invoke(app, ["export", "--run", str(copy), "--quiet", "--no-search"])  # no --quantize: quick
    assert result.exit_code == 0, result.output
    report = json.loads((copy / "export.json").read_text())
    assert (copy / "deploy").is_symlink() and (target / "triton").is_dir() and report["kept_stale"]
    assert (copy / "model.onnx").exists()
