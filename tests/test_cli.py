from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from conftest import write_dataset
from resnet_edge import __version__
from resnet_edge.cli import app

runner = CliRunner()


def run(*args):
    result = runner.invoke(app, list(map(str, args)))
    return result.exit_code, result.stdout, result.stderr


def assert_user_error(args, message):
    code, out, err = run(*args)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in out + err


def test_version_and_help_are_instant_without_torch():
    code = ("import sys; from typer.testing import CliRunner; from resnet_edge.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0; "
            "assert 'torch' not in sys.modules and 'onnxruntime' not in sys.modules, 'heavy import'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert run("--version")[1].strip() == f"resnet-edge {__version__}"


def test_models_lists_every_architecture():
    code, out, _ = run("models")
    assert code == 0
    for name in ("resnet8", "resnet20", "resnet18", "resnet152", "11,175,370"):
        assert name in out


@pytest.mark.parametrize("args, message", [
    (["--arch", "resnet9"], "unknown architecture 'resnet9'"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--device", "cuda"], "--device cuda was asked for, but PyTorch sees no CUDA GPU"),
    (["--arch", "resnet18", "--batch-size", "1", "--device", "cpu"], "needs --batch-size of at least 2"),
])
def test_train_option_errors(tmp_path, args, message):
    assert_user_error(["train", "--run", tmp_path / "r", "--epochs", "1", *args], message)


def test_train_data_dir_errors(tmp_path):
    assert_user_error(["train", "--run", tmp_path / "r", "--data-dir", tmp_path / "missing"], "not a directory")
    bad = write_dataset(tmp_path / "bad")
    (bad / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x01garbage")
    assert_user_error(["train", "--run", tmp_path / "r", "--data-dir", bad], "wrong magic number")


def test_train_unwritable_run_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert_user_error(["train", "--run", blocker / "run", "--epochs", "1"], "cannot write to this folder")


def test_resume_without_checkpoint(tmp_path):
    assert_user_error(["train", "--run", tmp_path / "r", "--resume"], "no checkpoint")


def test_train_on_a_user_data_dir(tmp_path):
    data = write_dataset(tmp_path / "digits", n_train=256, n_test=64, compress=True)
    code, out, err = run("train", "--run", tmp_path / "r", "--data-dir", data, "--epochs", "1", "--device", "cpu", "--quiet")
    assert code == 0, err
    assert "trained resnet8" in out and (tmp_path / "r" / "train.json").is_file()
