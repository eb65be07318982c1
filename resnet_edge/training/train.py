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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnet_edge.core.config import TrainConfig
from resnet_edge.core.contract import CHECKPOINT, TRAIN_REPORT
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import atomic_path, write_json
from resnet_edge.core.machine import cpu_info, versions
from resnet_edge.core.mnist import Dataset, load_dataset
from resnet_edge.training.checkpoint import CheckpointError, evaluate, load_checkpoint
from resnet_edge.training.distributed import (
    ShardedBatches,
    World,
    all_reduce_sum,
    broadcast_from_main,
    start,
    stop,
    sync_batchnorm,
    world_from_env,
)
from resnet_edge.training.models import MODELS, count_parameters, create_model

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


def resolve_device(name: str, world: World = World()) -> torch.device:
    """The training device; with several processes on CUDA, the GPU of this rank's LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError(
            "--device cuda was asked for, but PyTorch sees no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
        )
    if name == "cuda" and world.distributed:
        if world.local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {world.local_rank} has no GPU: this node has {torch.cuda.device_count()} "
                "(start at most one process per GPU: torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(world.local_rank)
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def autocast_dtype(config: TrainConfig, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA. On the CPU fp32 unless asked: on our 2-core Xeon (AVX-512 BF16, no AMX)
    bf16 trained resnet8 at 1,573 images/s against 2,251 in fp32 (benchmarks/cpu_train_settings.py)."""
    if config.amp == "off":
        return None
    if config.amp == "bf16" or device.type == "cuda":
        return torch.bfloat16
    return None


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype | None,
    memory_format: torch.memory_format,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """One optimizer step on a batch; returns the loss and the logits (neither synchronized)."""
    x = x.contiguous(memory_format=memory_format)
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits.detach()


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "data": generator.get_state(), "data_device": generator.device.type}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("data_device", "cpu") == generator.device.type:
        generator.set_state(state["data"])
    else:  # a CPU generator's state does not fit a CUDA one: the run goes on, not bit for bit
        log.warning(
            "resuming on %s a run saved on %s: data order and augmentation are reseeded",
            generator.device.type,
            state.get("data_device"),
        )
        generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    if "cuda" in state and torch.cuda.is_available():  # a run saved on a node with more GPUs: as many as are here
        torch.cuda.set_rng_state_all(state["cuda"][: torch.cuda.device_count()])


@dataclass
class _Session:
    """Everything one training run holds while it runs: built by ``_setup``, advanced by ``_run_epoch``."""

    config: TrainConfig
    run_dir: Path
    world: World
    device: torch.device
    dtype: torch.dtype | None
    memory_format: torch.memory_format
    model: nn.Module  # the plain model: evaluated and saved
    step_model: nn.Module  # what the steps call: ``model`` wrapped in DDP with several processes, compiled if asked
    compile_mode: str | None  # torch.compile's mode, None when not compiled
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    batches: ShardedBatches
    test_images: torch.Tensor
    test_labels: torch.Tensor
    dataset_name: str
    stats: tuple[float, float]
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # training + test passes of every epoch, resumed runs included
    setup_seconds: float = 0.0  # this process: data, model, process group
    compile_seconds: float = 0.0  # this process: the compilation warm-up
    first_step_at: float | None = None  # perf_counter at this process's first timed step


def _limited(dataset: Dataset, config: TrainConfig) -> Dataset:
    if config.train_limit is None and config.test_limit is None:
        return dataset
    return dataclasses.replace(
        dataset,
        train_images=dataset.train_images[: config.train_limit],
        train_labels=dataset.train_labels[: config.train_limit],
        test_images=dataset.test_images[: config.test_limit],
        test_labels=dataset.test_labels[: config.test_limit],
    )


def _build_model(
    config: TrainConfig, device: torch.device, world: World, stats: tuple[float, float]
) -> tuple[nn.Module, nn.Module, str | None]:
    """The model, what the steps call (DDP with several processes; compiled when asked) and the compile mode."""
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = create_model(config.arch, mean=stats[0], std=stats[1]).to(device).to(memory_format=memory_format)
    if world.distributed and config.sync_bn:
        model = sync_batchnorm(model, device)
    step_model: nn.Module = model
    if world.distributed:
        step_model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    compiled = config.compile if config.compile is not None else (device.type == "cuda" and not world.distributed)
    mode = config.compile_mode if compiled else None
    if mode is not None:
        step_model = torch.compile(step_model, mode=None if mode == "default" else mode)
    return model, step_model, mode


def _setup(
    config: TrainConfig,
    run_dir: Path,
    ckpt: dict[str, Any] | None,
    dataset: Dataset | None,
    world: World,
    device: torch.device,
) -> _Session:
    """Data on the device, model, optimizer and one-cycle schedule; the checkpoint's state when resuming."""
    if config.batch_size // world.world_size < 2 and MODELS[config.arch].family == "imagenet":
        raise UserError(
            f"{config.arch} needs --batch-size of at least 2 per process: its last stage is 1x1 at "
            "28x28, and BatchNorm cannot train on a single value per channel"
        )
    dataset = _limited(dataset or load_dataset(config.data_dir), config)
    mean, std = dataset.pixel_stats()
    torch.manual_seed(config.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)  # the same permutation and augmentation draws on every rank
    model, step_model, mode = _build_model(config, device, world, (mean, std))
    optimizer = torch.optim.SGD(
        _param_groups(model, config.weight_decay),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        fused=True if device.type == "cuda" else None,
    )
    batches = ShardedBatches(
        dataset.train_images,
        dataset.train_labels,
        min(config.batch_size, len(dataset.train_images)),
        device,
        generator,
        world,
        augment=config.augment,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=config.epochs * len(batches),
        pct_start=_warmup_fraction(config, len(batches)),
        anneal_strategy="linear",
        div_factor=10.0,
        final_div_factor=100.0,
        three_phase=False,
        cycle_momentum=False,
    )
    s = _Session(
        config,
        run_dir,
        world,
        device,
        autocast_dtype(config, device),
        torch.channels_last if config.channels_last else torch.contiguous_format,
        model,
        step_model,
        mode,
        optimizer,
        scheduler,
        generator,
        batches,
        torch.from_numpy(dataset.test_images).to(device),
        torch.from_numpy(dataset.test_labels.astype(np.int64)).to(device),
        dataset.name,
        (mean, std),
    )
    if ckpt is not None:
        _restore(s, ckpt)
    return s


def _warmup_fraction(config: TrainConfig, steps_per_epoch: int) -> float:
    """The recipe's warm-up share, but at least one step up and one down: OneCycleLR divides by both."""
    total = config.epochs * steps_per_epoch
    if total < 3:
        raise UserError(
            f"the one-cycle schedule needs at least 3 steps; this run has {total} "
            "(give more --epochs or images, or a smaller --batch-size)"
        )
    return min(max(config.warmup_fraction, 2 / total), (total - 1) / total)


def _restore(s: _Session, ckpt: dict[str, Any]) -> None:
    try:
        s.model.load_state_dict(ckpt["model"])
        s.optimizer.load_state_dict(ckpt["optimizer"])
        s.scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], s.generator)
        s.start_epoch, s.history = int(ckpt["epoch"]), list(ckpt["history"])
        s.seconds = float(ckpt.get("seconds", 0.0))
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(
            f"{s.run_dir / CHECKPOINT}: cannot resume from it: its state does not fit "
            f"{s.config.arch} with this recipe ({detail})"
        ) from None
    if s.start_epoch >= s.config.epochs:
        log.info("checkpoint already holds all %d epochs; nothing to do", s.config.epochs)


def _step(s: _Session, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if s.compile_mode == "reduce-overhead":  # a new CUDA-graph generation: the last step's outputs are consumed
        torch.compiler.cudagraph_mark_step_begin()
    return train_step(s.step_model, s.optimizer, x, y, s.dtype, s.memory_format, s.config.label_smoothing)


def _warm_up(s: _Session, steps: int = 3) -> None:
    """Compile (and record the CUDA graphs) on a few real steps, then put every state back: compilation
    is timed apart from training and changes nothing it computes."""
    if s.compile_mode is None or s.start_epoch >= s.config.epochs:
        return
    t0 = time.perf_counter()
    saved = {
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


def _test_accuracy(s: _Session) -> float:
    """Rank 0 evaluates (full precision, so the figure is the one the exported FP32 model reproduces); the
    others wait for its figure."""
    accuracy = torch.zeros((), dtype=torch.float64, device=s.device)
    if s.world.is_main:
        accuracy.fill_(evaluate(s.model, s.test_images, s.test_labels, channels_last=s.config.channels_last))
    return broadcast_from_main(accuracy).item()


def _run_epoch(s: _Session, epoch: int, reporter: Reporter) -> dict[str, Any]:
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


def _save(s: _Session, epoch: int) -> dict[str, Any]:
    """checkpoint.pt then train.json, each written whole; returns the report. Rank 0 only."""
    state = {
        "model": s.model.state_dict(),
        "config": asdict(s.config),
        "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(),
        "rng": _rng_state(s.generator),
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
            s = _setup(config, run_dir, ckpt, dataset, world, device)
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


def _loop(s: _Session, reporter: Reporter, on_epoch_saved: Callable[[int], None] | None) -> None:
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


def _schedule(s: _Session) -> dict[str, Any]:
    """The learning-rate schedule as it runs (OneCycleLR, linear, no momentum cycling)."""
    total = s.config.epochs * len(s.batches)
    return {
        "kind": "one-cycle, linear",
        "optimizer": f"SGD, Nesterov momentum {s.config.momentum}",
        "peak_lr": s.config.lr,
        "initial_lr": s.config.lr / 10,
        "final_lr": s.config.lr / 1000,
        "warmup_steps": round(_warmup_fraction(s.config, len(s.batches)) * total),
        "steps_per_epoch": len(s.batches),
        "total_steps": total,
    }


def _report(s: _Session) -> dict[str, Any]:
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
        "lr_schedule": _schedule(s),
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
