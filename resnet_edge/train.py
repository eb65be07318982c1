"""Training: the recipe, the loop, checkpoints and resume.

The loop reads top to bottom: data on the device, model, optimizer and one-cycle schedule, then for
each epoch the batches, a test pass, and an atomic checkpoint + train.json. Everything the run needs to
continue (weights, optimizer, scheduler, RNG states, epoch, history) lives in checkpoint.pt, which is
read back only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import CheckpointError, evaluate, load_checkpoint
from .config import TrainConfig
from .contract import CHECKPOINT, TRAIN_REPORT
from .data import Dataset, DeviceBatches, load_dataset
from .errors import UserError
from .files import atomic_path, write_json
from .machine import cpu_info, versions
from .models import MODELS, count_parameters, create_model

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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU "
                         f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
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


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               dtype: torch.dtype | None, memory_format: torch.memory_format, label_smoothing: float = 0.0) -> torch.Tensor:
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
        log.warning("resuming on %s a run saved on %s: data order and augmentation are reseeded",
                    generator.device.type, state.get("data_device"))
        generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Session:
    """Everything one training run holds while it runs: built by ``_setup``, advanced by ``_run_epoch``."""

    config: TrainConfig
    run_dir: Path
    device: torch.device
    dtype: torch.dtype | None
    memory_format: torch.memory_format
    model: nn.Module
    step_model: nn.Module  # the compiled model with --compile, else ``model``
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generator: torch.Generator
    batches: DeviceBatches
    test_images: torch.Tensor
    test_labels: torch.Tensor
    dataset_name: str
    stats: tuple[float, float]
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def _setup(config: TrainConfig, run_dir: Path, ckpt: dict[str, Any] | None, dataset: Dataset | None) -> _Session:
    """Data on the device, model, optimizer and one-cycle schedule; the checkpoint's state when resuming."""
    device = resolve_device(config.device)
    if config.batch_size < 2 and MODELS[config.arch].family == "imagenet":
        raise UserError(f"{config.arch} needs --batch-size of at least 2: its last stage is 1x1 at 28x28, "
                        "and BatchNorm cannot train on a single value per channel")
    dataset = dataset or load_dataset(config.data_dir)
    mean, std = dataset.pixel_stats()
    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = create_model(config.arch, mean=mean, std=std).to(device).to(memory_format=memory_format)
    optimizer = torch.optim.SGD(_param_groups(model, config.weight_decay), lr=config.lr,
                                momentum=config.momentum, nesterov=True)
    batches = DeviceBatches(dataset.train_images, dataset.train_labels, min(config.batch_size, len(dataset.train_images)),
                            device, generator, augment=config.augment)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=config.epochs * len(batches), pct_start=config.warmup_fraction,
        anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0, three_phase=False, cycle_momentum=False)
    session = _Session(
        config, run_dir, device, autocast_dtype(config, device), memory_format, model,
        torch.compile(model) if config.compile else model, optimizer, scheduler, generator, batches,
        torch.from_numpy(dataset.test_images).to(device), torch.from_numpy(dataset.test_labels.astype(np.int64)).to(device),
        dataset.name, (mean, std))
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            _set_rng_state(ckpt["rng"], generator)
            session.start_epoch, session.history = int(ckpt["epoch"]), list(ckpt["history"])
            session.seconds = float(ckpt.get("seconds", 0.0))
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
            detail = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise CheckpointError(f"{run_dir / CHECKPOINT}: cannot resume from it: its state does not fit "
                                  f"{config.arch} with this recipe ({detail})") from None
        if session.start_epoch >= config.epochs:
            log.info("checkpoint already holds all %d epochs; nothing to do", config.epochs)
    return session


def _run_epoch(s: _Session, epoch: int, reporter: Reporter) -> dict[str, Any]:
    """One pass over the training set and a test pass; returns the epoch's record (nothing saved yet)."""
    config, batches = s.config, s.batches
    reporter.epoch_start(epoch + 1, config.epochs, len(batches))
    batches.augment = config.augment and epoch < config.epochs - config.clean_epochs
    s.model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), device=s.device)
    correct = torch.zeros((), dtype=torch.long, device=s.device)
    for step, (x, y) in enumerate(batches):
        loss, logits = train_step(s.step_model, s.optimizer, x, y, s.dtype, s.memory_format, config.label_smoothing)
        s.scheduler.step()
        loss_sum += loss.detach()
        correct += (logits.argmax(1) == y).sum()
        # Reading a value synchronizes the GPU, so there it happens every 50 steps only.
        shown = shown_accuracy = None
        if s.device.type == "cpu" or step % 50 == 0 or step == len(batches) - 1:
            shown, shown_accuracy = loss.item(), correct.item() / ((step + 1) * batches.batch_size)
            if not math.isfinite(shown):
                raise TrainingError(f"loss became {shown} at epoch {epoch + 1}, step {step + 1} "
                                    "(try a lower --lr); the last checkpoint was left as it was")
        reporter.step(shown, shown_accuracy, len(y))
    if s.device.type == "cuda":
        torch.cuda.synchronize()
    epoch_seconds = time.perf_counter() - t0
    mean_loss = loss_sum.item() / len(batches)
    if not math.isfinite(mean_loss):
        raise TrainingError(f"loss became {mean_loss} in epoch {epoch + 1} (try a lower --lr); "
                            "the last checkpoint was left as it was")
    # Full precision, so the figure is the one the exported FP32 model reproduces.
    accuracy = evaluate(s.model, s.test_images, s.test_labels, channels_last=config.channels_last)
    s.seconds += time.perf_counter() - t0
    return {"epoch": epoch + 1, "loss": round(mean_loss, 6), "test_accuracy": accuracy,
            "train_accuracy": correct.item() / (len(batches) * batches.batch_size),
            "images_per_second": round(len(batches) * batches.batch_size / epoch_seconds, 1),
            "seconds": round(epoch_seconds, 3), "lr_end": s.scheduler.get_last_lr()[0]}


def _save(s: _Session, epoch: int) -> dict[str, Any]:
    """checkpoint.pt then train.json, each written whole; returns the report."""
    state = {
        "model": s.model.state_dict(), "config": asdict(s.config), "optimizer": s.optimizer.state_dict(),
        "scheduler": s.scheduler.state_dict(), "rng": _rng_state(s.generator), "epoch": epoch,
        "history": s.history, "seconds": s.seconds, "dataset": s.dataset_name,
    }
    with atomic_path(s.run_dir / CHECKPOINT) as tmp:
        torch.save(state, tmp)
    report = _report(s)
    write_json(s.run_dir / TRAIN_REPORT, report)
    return report


def train(config: TrainConfig, run_dir: Path, *, resume: bool = False, reporter: Reporter | None = None,
          dataset: Dataset | None = None, on_epoch_saved: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``config.arch`` and write checkpoint.pt and train.json to ``run_dir`` after every epoch.

    With ``resume``, the run continues from run_dir/checkpoint.pt with its own recipe; only the device
    may differ. Returns the train.json report. Ctrl-C (KeyboardInterrupt) propagates after the last
    finished epoch has been saved: nothing of the unfinished epoch is written.
    """
    reporter = reporter or SilentReporter()
    ckpt = None
    if resume:
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
        saved = ckpt["config"]
        config = dataclasses.replace(TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}),
                                     device=config.device, compile=config.compile)
    s = _setup(config, run_dir, ckpt, dataset)
    log.info("training %s (%d parameters) on %s, autocast %s", config.arch, count_parameters(s.model), s.device, s.dtype)
    for epoch in range(s.start_epoch, config.epochs):
        record = _run_epoch(s, epoch, reporter)
        s.history.append(record)
        _save(s, epoch + 1)
        reporter.epoch_end(record)
        if on_epoch_saved is not None:
            on_epoch_saved(epoch + 1)
    return _report(s)


def _report(s: _Session) -> dict[str, Any]:
    config, device = s.config, s.device
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_info().model
    return {
        "arch": config.arch,
        "params": count_parameters(s.model),
        "device": device.type,
        "device_name": device_name,
        "autocast": str(s.dtype).replace("torch.", "") if s.dtype else "off",
        "threads": torch.get_num_threads(),
        "epochs": config.epochs,
        "epochs_done": len(s.history),
        "seconds": round(s.seconds, 3),
        "test_accuracy": s.history[-1]["test_accuracy"] if s.history else None,
        "dataset": s.dataset_name,
        "normalization": {"mean": s.stats[0], "std": s.stats[1]},
        "history": s.history,
        "config": asdict(config),
        "checkpoint": str(s.run_dir / CHECKPOINT),
        "versions": versions(include_torch=True),
    }
