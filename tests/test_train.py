from __future__ import annotations


import pytest
import torch

from resnet_edge.training.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint
from resnet_edge.core.config import TrainConfig
from resnet_edge.training.train import TrainingError, train


def _cfg(**kw):
    return TrainConfig(**{"arch": "resnet8", "epochs": 2, "batch_size": 64, "device": "cpu", "amp": "off", **kw})


def test_short_training_lowers_the_loss(tmp_path, small_mnist):
    report = train(_cfg(epochs=3, lr=0.1, augment=False), tmp_path / "run", dataset=small_mnist)
    losses = [h["loss"] for h in report["history"]]
    assert losses[2] < losses[1] < losses[0] < 2.3  # ln(10) = 2.30 is the loss of a guess
    assert report["test_accuracy"] > 0.3  # 3x chance after 96 steps of 64 on 2,048 images (0.40 measured)
    for field in ("arch", "params", "device", "epochs", "seconds", "test_accuracy", "history"):
        assert field in report
    assert set(report["history"][0]) >= {"epoch", "loss", "test_accuracy", "images_per_second"}
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_interrupt_then_resume_equals_straight_run(tmp_path, tiny_mnist):
    straight = tmp_path / "straight"
    train(_cfg(), straight, dataset=tiny_mnist)

    def ctrl_c(epoch: int) -> None:
        raise KeyboardInterrupt

    resumed = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(), resumed, dataset=tiny_mnist, on_epoch_saved=ctrl_c)
    assert load_checkpoint(resumed / "checkpoint.pt")["epoch"] == 1  # the finished epoch was saved
    report = train(_cfg(), resumed, resume=True, dataset=tiny_mnist)
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    a = load_checkpoint(straight / "checkpoint.pt")["model"]
    b = load_checkpoint(resumed / "checkpoint.pt")["model"]
    for name in a:
        assert torch.equal(a[name], b[name]), name


class _Exploit:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {_Exploit.marker}",))


def test_pickle_that_runs_code_is_refused(tmp_path):
    _Exploit.marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    torch.save({"model": _Exploit(), "config": {"arch": "resnet8"}}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(path)
    assert not _Exploit.marker.exists()


def test_truncated_and_foreign_checkpoints(tmp_path, tiny_mnist):
    run = tmp_path / "run"
    train(_cfg(epochs=1), run, dataset=tiny_mnist)
    ckpt = run / "checkpoint.pt"
    cut = tmp_path / "cut.pt"
    cut.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="cut.pt: not a readable checkpoint"):
        load_checkpoint(cut)
    with pytest.raises(CheckpointError, match="checkpoint holds resnet8, not resnet20"):
        model_from_checkpoint(load_checkpoint(ckpt), ckpt, arch="resnet20")
    state = load_checkpoint(ckpt)
    state["config"]["arch"] = "resnet14"  # weights of resnet8 under another name
    other = tmp_path / "other.pt"
    torch.save(state, other)
    with pytest.raises(CheckpointError, match="other.pt: weights do not fit resnet14"):
        model_from_checkpoint(load_checkpoint(other), other)


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, tiny_mnist):
    run = tmp_path / "run"
    train(_cfg(epochs=1), run, dataset=tiny_mnist)
    before = (run / "checkpoint.pt").read_bytes()
    with pytest.raises(TrainingError, match="loss became nan"):
        train(_cfg(epochs=1, lr=float("inf")), run, dataset=tiny_mnist)
    assert (run / "checkpoint.pt").read_bytes() == before
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


def test_fast_recipe_runs_on_the_cpu_and_is_recorded(tmp_path):
    """--recipe fast is a GPU recipe, but it runs anywhere (no compilation on the CPU); train.json says
    which recipe ran, with which batch and schedule, and an option given overrides the recipe."""
    import json

    from typer.testing import CliRunner

    from resnet_edge.cli import app
    from resnet_edge.core.config import TRAIN_RECIPES

    fast = TRAIN_RECIPES["fast"]

    args = ["train", "--recipe", "fast", "--device", "cpu", "--epochs", "2", "--train-limit", "1024",
            "--test-limit", "256", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--run", str(tmp_path / "fast")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "fast" / "train.json").read_text())
    assert report["recipe"] == "fast" and report["config"]["recipe"] == "fast"
    assert report["distributed"]["global_batch_size"] == fast["batch_size"] != TrainConfig.batch_size
    assert report["lr_schedule"]["peak_lr"] == fast["lr"] != TrainConfig.lr
    assert report["config"]["weight_decay"] == fast["weight_decay"] != TrainConfig.weight_decay
    assert report["lr_schedule"]["total_steps"] == 2 * (1024 // fast["batch_size"])  # 1,024 images, 2 epochs
    assert report["compiled"] is None  # compilation is for one CUDA process
    assert set(report["this_process"]) == {"setup_seconds", "compile_seconds", "wall_seconds"}
    assert report["history"][0]["elapsed"] > 0
    result = CliRunner().invoke(app, [*args, "--batch-size", "128", "--run", str(tmp_path / "b128")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "b128" / "train.json").read_text())
    assert report["config"]["batch_size"] == 128 and report["lr_schedule"]["peak_lr"] == fast["lr"]


def test_recipe_and_compile_mistakes_are_one_line():
    from helpers import error_line

    assert "--recipe must be one of default, fast" in error_line(["train", "--recipe", "fastest"])
    assert "--compile-mode must be one of" in error_line(["train", "--compile-mode", "turbo"])


def test_compile_warm_up_changes_nothing_it_computes(tmp_path, tiny_mnist, monkeypatch):
    """The compilation warm-up (a few real steps, timed apart) puts weights, optimizer and data order
    back: with torch.compile replaced by the identity, a 'compiled' run ends bit for bit where a plain
    one does."""
    plain = train(_cfg(epochs=1), tmp_path / "plain", dataset=tiny_mnist)
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: model)
    compiled = train(_cfg(epochs=1, compile=True), tmp_path / "compiled", dataset=tiny_mnist)
    assert plain["compiled"] is None and compiled["compiled"] == "default"
    assert compiled["this_process"]["compile_seconds"] > 0
    a = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
