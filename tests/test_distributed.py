"""Data-parallel training on the CPU: gloo, 2 processes, against one process with the same global batch.

Why the weights of the two runs agree, and how closely: both see the same images in the same order
(one seeded permutation per epoch, each global batch of 64 split 32/32 between the ranks), augmented
with the same draws; with --sync-bn every BatchNorm normalizes over the global 64 as the single process
does; DDP averages the two ranks' gradients of their mean losses, which is the gradient of the mean
over 64. What differs is only the order of float additions (two partial sums and an all-reduce instead
of one sum; BatchNorm's variance in two passes), and early training amplifies such differences: one
process with 1 thread against the same with 2 threads already differs by up to 1.1e-3 (a BatchNorm
running variance) after these 16 steps at peak LR 0.02 (at LR 0.2 by 0.34, hence the low LR here).
Measured on the 2-core Xeon: DDP with --sync-bn 1.1e-3 from one process, DDP with BatchNorm per rank
4.5e-2, batch 32 instead of 64 up to 16; a run resumed in one process after 1 epoch of 2 processes
3.0e-3 from a straight single-process run after 3 epochs. We allow 1e-2 on every parameter and buffer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from helpers import error_line
from resnet_edge.training.checkpoint import load_checkpoint
from resnet_edge.cli import app
from resnet_edge.training.batches import DeviceBatches
from resnet_edge.training.distributed import ShardedBatches, World, world_from_env
from resnet_edge.core.errors import UserError
from resnet_edge.training.train import TrainConfig, train

runner = CliRunner()
TOLERANCE = 1e-2  # max |difference| of any weight or buffer; see the module docstring
# The recipe of every run here: 512 training images, global batch 64 (8 steps an epoch), 256 test images.
SMALL = {"arch": "resnet8", "batch_size": 64, "lr": 0.02, "device": "cpu", "amp": "off", "sync_bn": True,
         "train_limit": 512, "test_limit": 256}
CLI_SMALL = ["--arch", "resnet8", "--batch-size", "64", "--lr", "0.02", "--device", "cpu", "--amp", "off", "--sync-bn",
             "--train-limit", "512", "--test-limit", "256", "--quiet"]


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoint.pt")["model"]


@pytest.fixture(scope="module")
def single_runs(tmp_path_factory, mnist):
    """One process, the same recipe: 2 epochs (against the DDP run) and 3 epochs (against the resumed one)."""
    base = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1 on 2 cores); much faster on a busy machine
    try:
        for epochs in (2, 3):
            train(TrainConfig(**SMALL, epochs=epochs), base / f"e{epochs}", dataset=mnist)
    finally:
        torch.set_num_threads(threads)
    return base


def test_ranks_split_each_global_batch_without_repeating_an_image():
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    labels = np.arange(40, dtype=np.uint8)  # each image's label is its index
    one = DeviceBatches(images, labels, 8, torch.device("cpu"), torch.Generator().manual_seed(3))
    ranks = [ShardedBatches(images, labels, 8, torch.device("cpu"), torch.Generator().manual_seed(3), World(r, 4, r))
             for r in range(4)]
    for epoch in range(2):  # a new permutation each epoch, the same on every rank
        seen = []
        for whole, *parts in zip(one, *ranks):
            assert [len(y) for _, y in parts] == [2, 2, 2, 2]
            assert torch.equal(torch.cat([y for _, y in parts]), whole[1])
            assert torch.allclose(torch.cat([x for x, _ in parts]), whole[0], atol=1e-6)  # same augmentation
            seen += whole[1].tolist()
        assert len(seen) == len(set(seen)) == 40  # 5 global batches of 8: no image twice, none dropped
    alone = ShardedBatches(images, labels, 8, torch.device("cpu"), torch.Generator().manual_seed(3), World())
    ref = DeviceBatches(images, labels, 8, torch.device("cpu"), torch.Generator().manual_seed(3))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(alone, ref))  # bit for bit
    with pytest.raises(UserError, match="divide evenly among 3"):
        ShardedBatches(images, labels, 8, torch.device("cpu"), torch.Generator(), World(0, 3, 0))


def test_world_comes_from_torchrun_environment():
    assert world_from_env({}) == World(0, 1, 0)
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == World(3, 4, 1)
    with pytest.raises(UserError, match="no such rank"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(UserError, match="not integers"):
        world_from_env({"RANK": "x", "WORLD_SIZE": "2"})


@pytest.mark.slow  # 18 s: two gloo ranks and a single process trained side by side (GlobalBatchNorm2d's
# arithmetic over ranks is test_training_parts.py's, in the default suite)
def test_two_gloo_processes_match_one_process_and_the_checkpoint_exports(tmp_path, single_runs):
    from resnet_edge.export.onnx_export import export_run

    run = tmp_path / "ddp"
    result = runner.invoke(app, ["train", "--nproc", "2", "--epochs", "2", "--run", str(run), *CLI_SMALL])
    assert result.exit_code == 0, result.output
    report = __import__("json").loads((run / "train.json").read_text())
    assert report["world_size"] == 2 and report["distributed"]["backend"] == "gloo"
    assert report["distributed"]["global_batch_size"] == 64 and report["distributed"]["per_process_batch_size"] == 32
    assert report["lr_schedule"]["total_steps"] == 16 and report["distributed"]["sync_bn"] is True
    difference = _max_difference(_weights(run), _weights(single_runs / "e2"))
    print(f"max |difference| 2 gloo processes vs one process, 2 epochs: {difference:.2e}")
    assert difference <= TOLERANCE
    single = __import__("json").loads((single_runs / "e2" / "train.json").read_text())
    for a, b in zip(report["history"], single["history"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
    export = export_run(run)  # the rank-0 checkpoint is a plain one: export and its parity check pass
    assert all(p["max_abs_diff"] <= 1e-4 and p["top1_equal"] for p in export["parity"])


def _worker_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (a child of the agent process with RANK=rank)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = next(int(line.split()[1]) for line in status.read_text().splitlines() if line.startswith("PPid:"))
            env = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration):
            continue
        if ppid == agent and f"RANK={rank}".encode() in env:
            return int(status.parent.name)
    return None


@pytest.mark.slow  # 9 s: torchrun, a rank killed, then a resume
def test_killed_rank_stops_torchrun_job_then_resume_with_one_process(tmp_path, mnist, single_runs):
    """torchrun, 2 gloo processes; rank 1 is SIGKILLed after the first checkpoint: the whole job ends
    (no hang), the checkpoint is a whole one of a finished epoch, and resuming it in ONE process ends
    where a straight single-process run ends."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "resnet_edge.cli", "--", "train", "--epochs", "3", "--run", str(run), *CLI_SMALL]
    # "--": torchrun's own parser would take our --run for an abbreviation of its --run-path
    job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (run / "checkpoint.pt").exists() and job.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    victim = _worker_pid(job.pid, 1)
    assert victim is not None, job.communicate(timeout=60)[0][-3000:]
    os.kill(victim, signal.SIGKILL)
    try:  # a hang guard (far below --dist-timeout's 600 s), not a timing: no figure is asserted
        output = job.communicate(timeout=120)[0]
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail("the job hung after one of its ranks was killed")
    assert job.returncode != 0, output[-3000:]
    saved = load_checkpoint(run / "checkpoint.pt")
    assert 1 <= saved["epoch"] < 3, output[-3000:]
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = train(TrainConfig(**SMALL, epochs=3), run, resume=True, dataset=mnist)  # world size 2 -> 1
    finally:
        torch.set_num_threads(threads)
    assert report["world_size"] == 1 and [h["epoch"] for h in report["history"]] == [1, 2, 3]
    difference = _max_difference(_weights(run), _weights(single_runs / "e3"))
    print(f"max |difference| resumed (2 -> 1 processes after epoch {saved['epoch']}) vs one process: {difference:.2e}")
    assert difference <= TOLERANCE


def test_nproc_mistakes_are_one_line():
    assert "divide evenly among --nproc 2" in error_line(["train", "--nproc", "2", "--batch-size", "63"])
    assert "--nproc must be at least 1" in error_line(["train", "--nproc", "0"])
    os.environ["WORLD_SIZE"] = "2"
    try:
        assert "under torchrun leave it out" in error_line(["train", "--nproc", "2"])
    finally:
        del os.environ["WORLD_SIZE"]


@pytest.mark.slow  # 9 s: torchrun with a rank that fails
def test_a_failing_rank_of_nproc_is_one_error_line(tmp_path):
    """A mistake that only the ranks see (here a missing --data-dir) ends `train --nproc 2` with one line
    from the launching process, not the launcher's tracebacks."""
    proc = subprocess.run([sys.executable, "-m", "resnet_edge", "train", "--nproc", "2", "--device", "cpu", "--quiet",
                           "--data-dir", str(tmp_path / "missing"), "--run", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank "), proc.stderr
    assert "missing: not a directory" in lines[0]
