"""Training: the recipe, the loop, checkpoints and resume, in one process or data-parallel.

The loop reads top to bottom: data on the device, model, optimizer and one-cycle schedule, then for
each epoch the batches, a test pass, and an atomic checkpoint + train.json. Everything the run needs to
continue (weights, optimizer, scheduler, RNG states, epoch, history) lives in checkpoint.pt, which is
read back only with ``torch.load(weights_only=True)``.

Under torchrun (or ``--nproc``) every rank runs this same loop on its slice of each global batch
(distributed.py) with DistributedDataParallel averaging the gradients; rank 0 alone evaluates and
writes. Nothing saved depends on the world size, so a run may resume with another.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from resnet_edge.core.config import TrainConfig
from resnet_edge.core.contract import CHECKPOINT, TRAIN_REPORT
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import atomic_path, write_json
from resnet_edge.core.machine import cpu_info, versions
from resnet_edge.core.mnist import Dataset
from resnet_edge.training.checkpoint import evaluate, load_checkpoint
from resnet_edge.training.distributed import (
    World,
    all_reduce_sum,
    broadcast_from_main,
    start,
    stop,
    world_from_env,
)
from resnet_edge.training.models import count_parameters
from resnet_edge.training.session import (
    Session,
    resolve_device,
    rng_state,
    schedule_report,
    setup_session,
    train_step,
)

log = logging.getLogger(__name__)


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, incompatible checkpoint); the message says why."""


class Reporter(Protocol):
    """What the loop tells the outside world; the CLI renders it, tests may ignore it."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float | None, accuracy: float | None, images: int) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...


class SilentReporter:
    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float | None, accuracy: float | None, images: int) -> None: ...
    def epoch_end(self, record: dict[str, Any]) -> None: ...


def _step(s: Session, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if s.compile_mode == "reduce-overhead":  # a new CUDA-graph generation: the last step's outputs are consumed
        torch.compiler.cudagraph_mark_step_begin()
    return train_step(s.step_model, s.optimizer, x, y, s.dtype, s.memory_format, s.config.label_smoothing)


def _warm_up(s: Session, steps: int = 3) -> None:
    """Compile (and record the CUDA graphs) on a few real steps, then put every state back: compilation
    is timed apart from training and changes nothing it computes."""
    if s.compile_mode is None or s.start_epoch >= s.config.epochs:
        return
    t0 = time.perf_counter()
    saved: dict[str, Any] = {
        "model": copy.deepcopy(s.model.state_dict()),
        "optimizer": copy.deepcopy(s.optimizer.state_dict()),
        "data": s.generator.get_state(),
    }
    s.batches.augment = s.config.augment
    for _, (x, y) in zip(range(steps), s.batches, strict=False):
        _step(s, x, y)
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    s.model.load_state_dict(saved["model"])
    s.optimizer.load_state_dict(saved["optimizer"])
    s.generator.set_state(saved["data"])
    s.compile_seconds = time.perf_counter() - t0


def _global_mean(value: torch.Tensor, world: World) -> float:
    """The mean over ranks of a per-rank scalar: every rank gets the same figure (and the same decision)."""
    return all_reduce_sum(value.detach().float().clone()).item() / world.world_size


def _test_accuracy(s: Session) -> float:
    """Rank 0 evaluates (full precision, so the figure is the one the exported FP32 model reproduces); the
    others wait for its figure."""
    accuracy = torch.zeros((), dtype=torch.float64, device=s.device)
    if s.world.is_main:
        accuracy.fill_(evaluate(s.model, s.test_images, s.test_labels, channels_last=s.config.channels_last))
    return broadcast_from_main(accuracy).item()


def _run_epoch(s: Session, epoch: int, reporter: Reporter) -> dict[str, Any]:
    """One pass over the training set and a test pass; returns the epoch's record (nothing saved yet)."""
    config, batches, world = s.config, s.batches, s.world
    reporter.epoch_start(epoch + 1, config.epochs, len(batches))
    batches.augment = config.augment and epoch < config.epochs - config.clean_epochs
    s.step_model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=s.device)
    correct = torch.zeros((), dtype=torch.long, device=s.device)
    # Reading a value synchronizes the GPU (and, with several processes, the ranks): every 50 steps there.
    every = 1 if s.device.type == "cpu" and not world.distributed else 50
    for step, (x, y) in enumerate(batches):
        loss, logits = _step(s, x, y)
        s.scheduler.step()
        loss_sum += loss.detach()
        correct += (logits.argmax(1) == y).sum()
        shown = shown_accuracy = None
        if step % every == 0 or step == len(batches) - 1:
            shown, shown_accuracy = _global_mean(loss, world), correct.item() / ((step + 1) * len(y))
            if not math.isfinite(shown):
                raise TrainingError(
                    f"loss became {shown} at epoch {epoch + 1}, step {step + 1} "
                    "(try a lower --lr); the last checkpoint was left as it was"
                )
        reporter.step(shown, shown_accuracy, len(y) * world.world_size)
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    epoch_seconds = time.perf_counter() - t0
    totals = all_reduce_sum(torch.stack([loss_sum.float(), correct.float()])).tolist()
    mean_loss = totals[0] / (len(batches) * world.world_size)
    if not math.isfinite(mean_loss):
        raise TrainingError(
            f"loss became {mean_loss} in epoch {epoch + 1} (try a lower --lr); the last checkpoint was left as it was"
        )
    accuracy = _test_accuracy(s)
    s.seconds += time.perf_counter() - t0
    return {
        "epoch": epoch + 1,
        "loss": round(mean_loss, 6),
        "test_accuracy": accuracy,
        "train_accuracy": totals[1] / (len(batches) * batches.batch_size),
        "images_per_second": round(len(batches) * batches.batch_size / epoch_seconds, 1),
        "seconds": round(epoch_seconds, 3),
        "elapsed": round(s.seconds, 3),
        "lr_end": s.scheduler.get_last_lr()[0],
    }


def _save(s: Session, epoch: int) -> dict[str, Any]:
    """checkpoint.pt then train.json, each written whole; returns the report. Rank 0 only."""
    state = {
        "model": s.model.state_dict(),
        "config": asdict(s.config),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "rng": rng_state(s.generator),
        "epoch": epoch,
        "history": s.history,
        "seconds": s.seconds,
        "dataset": s.dataset_name,
    }
    buffer = io.BytesIO()  # serialized in memory, written by Python: a full disk or a file-size limit is an
    torch.save(state, buffer)  # OSError (one line), not the RuntimeError torch's own file writer raises
    with atomic_path(s.run_dir / CHECKPOINT) as tmp:
        tmp.write_bytes(buffer.getbuffer())
    report = _report(s)
    write_json(s.run_dir / TRAIN_REPORT, report)
    return report


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (torchrun stopping the ranks after one failed or died, a scheduler's kill) ends the run as
    Ctrl-C does: the unfinished epoch is dropped, no temporary is left, the last checkpoint stays."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _saved_config(ckpt: dict[str, Any], config: TrainConfig) -> TrainConfig:
    """--resume: the saved recipe; how to run it (device, compilation, timeout) comes from this call."""
    saved = ckpt["config"]
    return dataclasses.replace(
        TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}),
        device=config.device,
        compile=config.compile,
        compile_mode=config.compile_mode,
        dist_timeout=config.dist_timeout,
    )


def train(
    config: TrainConfig,
    run_dir: Path,
    *,
    resume: bool = False,
    reporter: Reporter | None = None,
    dataset: Dataset | None = None,
    on_epoch_saved: Callable[[int], None] | None = None,
    world: World | None = None,
) -> dict[str, Any]:
    """Train ``config.arch`` and write checkpoint.pt and train.json to ``run_dir`` after every epoch.

    With ``resume``, the run continues from run_dir/checkpoint.pt with its own recipe; the device and the
    world size may differ. ``world`` defaults to torchrun's environment (one process without it); with
    several processes this joins (and leaves) the process group, and only rank 0 reports and writes.
    Returns the train.json report. Ctrl-C (KeyboardInterrupt) or SIGTERM propagates after the last
    finished epoch has been saved: nothing of the unfinished epoch is written.
    """
    t_start = time.perf_counter()
    world = world or world_from_env()
    ckpt = load_checkpoint(run_dir / CHECKPOINT) if resume else None
    if ckpt is not None:
        config = _saved_config(ckpt, config)
    device = resolve_device(config.device, world)
    started = start(world, device, config.dist_timeout)
    try:
        with _sigterm_as_interrupt():
            s = setup_session(config, run_dir, ckpt, dataset, world, device)
            log.info(
                "training %s (%d parameters) on %s, rank %d of %d, autocast %s",
                config.arch,
                count_parameters(s.model),
                s.device,
                world.rank,
                world.world_size,
                s.dtype,
            )
            s.setup_seconds = time.perf_counter() - t_start
            _warm_up(s)
            _loop(s, (reporter if world.is_main else None) or SilentReporter(), on_epoch_saved)
            return _report(s)
    finally:
        if started:
            stop()


def _loop(s: Session, reporter: Reporter, on_epoch_saved: Callable[[int], None] | None) -> None:
    s.first_step_at = time.perf_counter()
    for epoch in range(s.start_epoch, s.config.epochs):
        record = _run_epoch(s, epoch, reporter)
        s.history.append(record)
        if s.world.is_main:
            _save(s, epoch + 1)
        reporter.epoch_end(record)
        if on_epoch_saved is not None:
            on_epoch_saved(epoch + 1)


def train_worker(
    config: TrainConfig, run_dir: Path, resume: bool, reporter_factory: Callable[[], Reporter] | None
) -> dict[str, Any]:
    """What each process of ``train --nproc`` runs (torchrun's launcher gives it RANK/WORLD_SIZE)."""
    world = world_from_env()
    reporter = reporter_factory() if reporter_factory is not None and world.is_main else None
    return train(config, run_dir, resume=resume, reporter=reporter, world=world)


def _report(s: Session) -> dict[str, Any]:
    config, device, world = s.config, s.device, s.world
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info().model
    return {
        "arch": config.arch,
        "recipe": config.recipe,
        "params": count_parameters(s.model),
        "device": device.type,
        "device_name": device_name,
        "autocast": str(s.dtype).replace("torch.", "") if s.dtype else "off",
        "compiled": s.compile_mode,
        "threads": torch.get_num_threads(),
        "world_size": world.world_size,
        "distributed": {
            "world_size": world.world_size,
            "backend": dist.get_backend() if dist.is_initialized() else None,
            "global_batch_size": s.batches.batch_size,
            "per_process_batch_size": s.batches.local_batch_size,
            "sync_bn": config.sync_bn and world.distributed,
            "sampling": "one seeded permutation per epoch, each global batch split evenly among the processes; "
            f"the last {len(s.batches.images) % s.batches.batch_size} images of each permutation dropped",
        },
        "lr_schedule": schedule_report(s),
        "epochs": config.epochs,
        "epochs_done": len(s.history),
        "seconds": round(s.seconds, 3),
        "this_process": {  # start-up and compilation, timed apart from training; wall: first step to now
            "setup_seconds": round(s.setup_seconds, 3),
            "compile_seconds": round(s.compile_seconds, 3),
            "wall_seconds": round(time.perf_counter() - s.first_step_at, 3) if s.first_step_at else 0.0,
        },
        "test_accuracy": s.history[-1]["test_accuracy"] if s.history else None,
        "dataset": s.dataset_name,
        "normalization": {"mean": s.stats[0], "std": s.stats[1]},
        "history": s.history,
        "config": asdict(config),
        "checkpoint": str(s.run_dir / CHECKPOINT),
        "versions": versions(include_torch=True),
    }
