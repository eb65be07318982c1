"""What sits inside a model file, a run folder or a repository is not ours (audit 3 of 20c9291): names,
metadata, run reports and a model's real output shape are checked where they enter; a bad one is one
line and exit 1, never a traceback, a path outside the folder, or markup and escape codes on a terminal."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys

import httpx
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

from helpers import error_line, free_port, runner, start_server
from resnet_edge.cli import app
from test_serve_hardening import linear_model


def _set_metadata(path, **props):
    model = onnx.load(str(path))
    for p in model.metadata_props:
        if p.key in props:
            p.value = props.pop(p.key)
    for k, v in props.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def _digit_png(path):
    Image.fromarray((np.eye(28) * 255).astype("uint8")).save(path)
    return path


def _no_traceback(args):
    """The CLI ran to an answer or to one `error:` line, never into an exception of ours."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1), result.output
    if result.exit_code == 1:
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: "), result.stderr
    return result


def _serve_refused(*args) -> str:
    """`serve ARGS` must refuse before serving: exit 1 and one `error:` line (a subprocess with a deadline,
    so that a server that starts instead fails the test rather than hanging it)."""
    proc = subprocess.run([sys.executable, "-m", "resnet_edge", "serve", "--port", str(free_port()), *map(str, args)],
                          capture_output=True, text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.fixture()
def run_copy(trained_run, tmp_path):
    run, _, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("deploy", "checkpoint.pt"))
    return copy


def _bench_json_of_this_machine(run, **recommendation):
    """A bench.json that `choose_model` consults: measured on this CPU and provider, on the run's files."""
    from resnet_edge.core.files import file_sha256
    from resnet_edge.core.machine import machine

    files = {n: file_sha256(run / n) for n in ("model.onnx", "model.int8.onnx")}
    rec = {"batch_size": 1, "variant": "onnx-int8", "why": "INT8 measured faster"}
    report = {"machine": machine(), "provider": "cpu", "files": files,
              "recommendation": {"latency": {**rec, **recommendation}, "throughput": {**rec, **recommendation}}}
    (run / "bench.json").write_text(json.dumps(report))


# ------------------------------------------------------------------------------------------ run reports
@pytest.mark.parametrize("case", ["export nested", "export sha list", "bench nested", "bench variant list"])
def test_malformed_run_reports_never_end_in_a_traceback(run_copy, tmp_path, case):
    """audit-3 #7: export.json / bench.json nested 100,000 deep, or a list where a string belongs."""
    run = run_copy
    _bench_json_of_this_machine(run)
    if case == "export nested":
        (run / "export.json").write_text("[" * 100_000 + "]" * 100_000)
    elif case == "export sha list":
        report = json.loads((run / "export.json").read_text())
        report["checkpoint"]["sha256"] = ["x"]
        (run / "export.json").write_text(json.dumps(report))
    elif case == "bench nested":
        (run / "bench.json").write_text('{"recommendation": ' + "[" * 100_000 + "]" * 100_000 + "}")
    else:
        _bench_json_of_this_machine(run, variant=["onnx-int8"])
    image = _digit_png(tmp_path / "d.png")
    for args in (["predict", image, "--run", run], ["eval", "--run", run],
                 ["package", "--run", run, "--out", tmp_path / "deploy", "--no-ort"]):
        _no_traceback(args)


# ------------------------------------------------------------------------------------------ terminal text
def test_markup_and_escape_codes_from_files_are_printed_as_text(run_copy, tmp_path):
    """audit-3 #8 and #11: '[/x]' in a path was a rich MarkupError; ESC sequences from bench.json reached
    the terminal raw."""
    run = run_copy
    folder = tmp_path / "img[" / "x]"  # the path img[/x]/d.png
    folder.mkdir(parents=True)
    image = _digit_png(folder / "d.png")
    result = _no_traceback(["predict", image, "--model", run / "model.onnx"])
    assert result.exit_code == 0 and f"{image}: " in result.stdout
    _bench_json_of_this_machine(run, why="[/x] x\x1b[2J\x1b[H\x1b[32mall checks passed\x1b[0m")
    result = _no_traceback(["predict", _digit_png(tmp_path / "plain.png"), "--run", run])
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "[/x] x\\x1b[2J" in result.stderr
    result = _no_traceback(["eval", image])  # not a model: one line that names it
    assert result.exit_code == 1 and "img[/x]/d.png" in result.stderr


def test_eval_table_prints_a_model_path_with_brackets(tmp_path, monkeypatch):
    (tmp_path / "m[" / "x]").mkdir(parents=True)
    linear_model(tmp_path / "m[" / "x]" / "l.onnx")
    monkeypatch.chdir(tmp_path)  # a short relative path: the table prints it whole
    result = _no_traceback(["eval", "m[/x]/l.onnx"])
    assert result.exit_code == 0 and "m[/x]/l.onnx" in result.stdout, result.stdout


def test_tables_are_never_cut_on_a_narrow_terminal():
    """CI's pipe is 80 columns: bench's table printed 'onn…' for every variant and '0.2…' for latencies."""
    import io

    from rich.table import Table

    from resnet_edge.cli.console import TerminalConsole as _TerminalConsole

    out = io.StringIO()
    narrow = _TerminalConsole(file=out, width=40)
    table = Table(title="bench")
    for col in ("variant", "batch", "p50 ms", "p99 ms", "images/s", "vs torch", "vs FP32"):
        table.add_column(col)
    table.add_row("onnx-int8", "64", "12.345", "23.456", "5,184", "1.23x", "1.41x")
    narrow.print_table(table)
    assert "…" not in out.getvalue()
    assert all(v in out.getvalue() for v in ("onnx-int8", "12.345", "23.456", "1.41x", "images/s"))
    assert narrow.width == 40  # the console is narrow again for what follows


# ------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("arch", ["a/b", "A" * 5_000_000, "[/x]", "r\x1b[2J\x1b[31m", "..", "has space"])
def test_serve_refuses_a_model_name_that_is_not_one_url_segment(tmp_path, arch):
    """audit-3 #12 (and #8, #11 through serve): 'a/b' served a model no URL reached; 5 MB came back in every 404."""
    model = _set_metadata(linear_model(tmp_path / "m.onnx"), architecture=arch)
    line = _serve_refused("--model", model)
    assert "not a valid model name" in line and len(line) < 400 and "\x1b" not in line


def test_serve_refuses_an_invalid_model_name_option(tmp_path):
    model = linear_model(tmp_path / "m.onnx")
    assert "not a valid model name" in _serve_refused("--model", model, "--model-name", "a/b")


def _repository(tmp_path, model_folder, versions, source):
    repo = tmp_path / "repo"
    for v in versions:
        (repo / model_folder / v).mkdir(parents=True)
        shutil.copy(source, repo / model_folder / v / "model.onnx")
    (repo / model_folder / "config.pbtxt").write_text("")
    return repo


def test_repository_version_folders_are_ascii_digits(tmp_path):
    """audit-3 #9: a version folder '²' passed str.isdigit() and crashed int()."""
    model = linear_model(tmp_path / "m.onnx")
    repo = _repository(tmp_path, "resnet8", ["1", "\u00b2"], model)
    line = error_line(["serve", "--repository", repo, "--model-name", "resnet8"])
    assert "not a version number in ASCII digits" in line
    from resnet_edge.core.repository import scan_repository

    shutil.rmtree(repo / "resnet8" / "\u00b2")
    (repo / "resnet8" / "02").mkdir()  # Triton skips a version with a leading zero: so do we
    shutil.copy(model, repo / "resnet8" / "02" / "model.onnx")
    assert scan_repository(repo)["resnet8"].versions == {"1": (repo / "resnet8" / "1" / "model.onnx").resolve()}


def test_repository_model_folders_follow_the_name_rule(tmp_path):
    """audit-3 #8: a folder '[bold red]m' was announced as 'm' (markup swallowed) at a URL that 404s."""
    repo = _repository(tmp_path, "[bold red]m", ["1"], linear_model(tmp_path / "m.onnx"))
    line = _serve_refused("--repository", repo)
    assert "'[bold red]m'" in line and "not a valid model name" in line


def test_labels_that_are_not_ten_short_names_are_not_served(tmp_path):
    """audit-3 #14: 10^6 labels made every metadata GET an 11.9 MB answer."""
    model = _set_metadata(linear_model(tmp_path / "m.onnx"), labels=json.dumps([str(i) for i in range(10**5)]))
    proc, url = start_server("--model", model, "--model-name", "m")
    try:
        r = httpx.get(f"{url}/v2/models/m", timeout=10)
        assert r.status_code == 200 and len(r.content) < 2000 and "labels" not in r.json()["parameters"], r.text[:300]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    from resnet_edge.core.names import check_labels

    assert check_labels(json.dumps([f"digit {i}" for i in range(10)])) == [f"digit {i}" for i in range(10)]
    for bad in (json.dumps(list("0123456789x")), json.dumps([["0"]] * 10), json.dumps(["x" * 33] * 10),
                json.dumps(["\x1b"] * 10), "[" * 10_000, "not json"):
        assert check_labels(bad) is None


# ------------------------------------------------------------------------------------------ model outputs
def _five_columns(tmp_path):
    """A model that declares logits [batch, 10] and answers 5 columns (a Slice after the real logits)."""
    model = onnx.load(str(linear_model(tmp_path / "linear.onnx")))
    for node in model.graph.node:
        node.output[:] = ["full" if o == "logits" else o for o in node.output]
    model.graph.initializer.extend([helper.make_tensor(k, TensorProto.INT64, [1], [v])
                                    for k, v in (("s0", 0), ("s1", 5), ("ax", 1))])
    model.graph.node.append(helper.make_node("Slice", ["full", "s0", "s1", "ax"], ["logits"]))
    onnx.save(model, str(tmp_path / "slice5.onnx"))
    return tmp_path / "slice5.onnx"


def test_a_model_whose_output_is_not_ten_logits_is_refused_at_load(tmp_path):
    """audit-3 #10: predict crashed, eval reported 51 % with no warning, serve --max-batch-size 1 said ready."""
    model = _five_columns(tmp_path)
    for args in (["predict", _digit_png(tmp_path / "d.png"), "--model", model], ["eval", model]):
        assert "[2, 5]" in error_line(args)
    assert "[2, 5]" in _serve_refused("--model", model, "--max-batch-size", 1, "--model-name", "m")


def test_every_batch_is_checked_too():
    """A model may answer the probe at load correctly and another batch wrongly: evaluate checks each batch."""
    from resnet_edge.inference.runtime import ModelFileError, evaluate_session

    class Drifting:
        def run(self, outputs, feeds):
            n = len(feeds["pixels"])
            return [np.zeros((n, 10 if n < 3 else 5), np.float32)]

    images, labels = np.zeros((4, 1, 28, 28), np.float32), np.zeros(4, np.int64)
    assert evaluate_session(Drifting(), images[:2], labels[:2], batch_size=2).accuracy == 1.0
    with pytest.raises(ModelFileError, match=r"answered 4 input rows with float32 \[4, 5\]"):
        evaluate_session(Drifting(), images, labels, batch_size=4)


# ------------------------------------------------------------------------------------------ request size
def test_a_header_length_past_the_body_is_400_before_any_parser_starts():
    """audit-3 #13: a 13-byte body with Inference-Header-Content-Length 999999999999 spawned the parser process."""
    from resnet_edge.core.config import ServerConfig
    from resnet_edge.serving.state import ServerState
    from resnet_edge.serving.v2 import RequestError

    state = ServerState(ServerConfig(model_path="m.onnx"))
    with pytest.raises(RequestError) as info:
        asyncio.run(state.parse(b'{"inputs":1}', "999999999999"))
    assert info.value.status == 400 and state.processes is None
    state.pool.shutdown()


def test_a_decoy_shape_cannot_raise_the_json_size_limit():
    """audit-3 #13: '"x": {"shape": [1024]}' let a 7.8 MB one-image request through to the parser."""
    from resnet_edge.serving.v2 import RequestError, check_json_size

    doc = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 784], "data": [0] * 784}],
           "pad": [0] * 1_000_000, "x": {"shape": [1024]}}
    body = json.dumps(doc, separators=(",", ":")).encode()
    with pytest.raises(RequestError) as info:
        check_json_size(body, len(body))
    assert info.value.status == 413 and "of 1 images" in str(info.value)
    del doc["inputs"][0]["shape"]  # no plain shape for the tensor at all: it could only fail after parsing
    body = json.dumps(doc, separators=(",", ":")).encode().replace(b'"shape"', b'"shapes"')
    with pytest.raises(RequestError) as info:
        check_json_size(body, len(body))
    assert info.value.status == 413 and "plain" in str(info.value)


# ------------------------------------------------------------------------------------------ multipart
def _multipart(fields: int, files: int, boundary: str = "b" * 30) -> tuple[bytes, str]:
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="f{k}"\r\n\r\nv\r\n' for k in range(fields)]
    parts += [f'--{boundary}\r\nContent-Disposition: form-data; name="g{k}"; filename="x"\r\n\r\nv\r\n' for k in range(files)]
    return ("".join(parts) + f"--{boundary}--\r\n").encode(), f"multipart/form-data; boundary={boundary}"


def test_multipart_parts_are_capped_and_parsed_off_the_event_loop(tmp_path):
    """audit-3 #6: 1,000 fields and 1,000 files were parsed on the event loop (Starlette's form())."""
    from resnet_edge.serving.multipart import MAX_MULTIPART_PARTS, multipart_file
    from resnet_edge.serving.v2 import RequestError

    body, content_type = _multipart(1000, 1000)
    with pytest.raises(RequestError, match=f"more than {MAX_MULTIPART_PARTS} parts"):
        multipart_file(body, content_type)
    png = (tmp_path / "d.png")
    _digit_png(png)
    good = (f'--xyz\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--xyz\r\nContent-Disposition: form-data; name="file"; filename="d.png"\r\nContent-Type: image/png\r\n\r\n'
            ).encode() + png.read_bytes() + b"\r\n--xyz--\r\n"
    assert multipart_file(good, "multipart/form-data; boundary=xyz") == png.read_bytes()
    with pytest.raises(RequestError, match="closing boundary"):
        multipart_file(good[:-10], "multipart/form-data; boundary=xyz")
    few, few_type = _multipart(2, 1)
    with pytest.raises(RequestError, match="named 'file'"):
        multipart_file(few, few_type)

    proc, url = start_server("--model", linear_model(tmp_path / "m.onnx"), "--model-name", "m")
    try:
        r = httpx.post(f"{url}/v1/predict", content=body, headers={"content-type": content_type}, timeout=10)
        assert r.status_code == 400 and "more than" in r.json()["error"], r.text
        r = httpx.post(f"{url}/v1/predict", files={"file": ("d.png", png.read_bytes(), "image/png")}, timeout=10)
        assert r.status_code == 200 and len(r.json()["probabilities"]) == 10, r.text
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# ------------------------------------------------------------------------------------------ shutdown
def test_the_parser_process_pool_is_waited_for_at_shutdown(tmp_path):
    """audit-3 #15: shut down with wait=False, its exit hook sometimes printed a traceback at SIGTERM."""
    from resnet_edge.core.config import ServerConfig
    from resnet_edge.serving.app import create_app

    class Recorder:
        waited = None

        def shutdown(self, wait=True, cancel_futures=False):
            Recorder.waited = wait

    app = create_app(ServerConfig(model_path=linear_model(tmp_path / "m.onnx"), model_name="m"))

    async def lifespan():
        async with app.fastapi.router.lifespan_context(app.fastapi):
            app.server.processes = Recorder()

    asyncio.run(lifespan())
    assert Recorder.waited is True
