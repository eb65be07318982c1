"""Training: the recipe, the loop, checkpoints and resume.

The loop reads top to bottom: data on the device, model, optimizer and one-cycle schedule, then for
each epoch the batches, a test pass, and an atomic checkpoint + train.json. Everything the run needs to
continue (weights, optimizer, scheduler, RNG states, epoch, history) lives in checkpoint.pt, which is
read back only with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .data import Dataset, DeviceBatches, load_dataset
from .errors import UserError
from .config import TrainConfig
from .files import atomic_path, write_json
from .models import MODELS, UnknownModelError, count_parameters, create_model

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
TRAIN_REPORT = "train.json"


class TrainingError(UserError):
    """Training cannot go on (non-finite loss, incompatible checkpoint); the message says why."""


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, unsafe or of another architecture; the message names it."""


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


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and no fallback: a pickle that would run code is refused."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there (run `resnet-edge train` first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, truncated zip, wrong format: all one answer to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise CheckpointError(f"{path}: refused: it is not a plain-weights checkpoint and loading it "
                                  "would run code from the file") from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: {first[:160]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a resnet-edge checkpoint (no model weights and config)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: Path, arch: str | None = None) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights, with clear errors on mismatch."""
    saved_arch = ckpt["config"].get("arch")
    if arch is not None and saved_arch != arch:
        raise CheckpointError(f"{path}: checkpoint holds {saved_arch}, not {arch}")
    try:
        model = create_model(saved_arch)
    except UnknownModelError:
        raise CheckpointError(f"{path}: checkpoint names an unknown architecture {saved_arch!r}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {saved_arch} "
                              f"({str(exc).splitlines()[0][:160]})") from None
    return model.eval()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000,
             dtype: torch.dtype | None = None, channels_last: bool = False) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on uint8 ``images`` [N, 28, 28] already on its device."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].unsqueeze(1).float().div_(255.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        correct += (logits.argmax(1) == labels[i:i + batch_size]).sum()
    model.train(was_training)
    return correct.item() / len(images)


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


def versions() -> dict[str, str]:
    import onnxruntime
    import torchvision

    return {"resnet_edge": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}


def train(config: TrainConfig, run_dir: Path, *, resume: bool = False, reporter: Reporter | None = None,
          dataset: Dataset | None = None, on_epoch_saved: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Train ``config.arch`` and write checkpoint.pt and train.json to ``run_dir`` after every epoch.

    With ``resume``, the run continues from run_dir/checkpoint.pt with its own recipe; only the device
    may differ. Returns the train.json report. Ctrl-C (KeyboardInterrupt) propagates after the last
    finished epoch has been saved: nothing of the unfinished epoch is written.
    """
    reporter = reporter or SilentReporter()
    ckpt_path = run_dir / CHECKPOINT
    ckpt = None
    if resume:
        ckpt = load_checkpoint(ckpt_path)
        saved = ckpt["config"]
        config = dataclasses.replace(TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__}),
                                     device=config.device, compile=config.compile)
    device = resolve_device(config.device)
    if config.batch_size < 2 and MODELS[config.arch].family == "imagenet":
        raise UserError(f"{config.arch} needs --batch-size of at least 2: its last stage is 1x1 at 28x28, "
                        "and BatchNorm cannot train on a single value per channel")
    dataset = dataset or load_dataset(config.data_dir)
    mean, std = dataset.pixel_stats()

    torch.manual_seed(config.seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(config.seed)
    model = create_model(config.arch, mean=mean, std=std).to(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(_param_groups(model, config.weight_decay), lr=config.lr,
                                momentum=config.momentum, nesterov=True)
    batches = DeviceBatches(dataset.train_images, dataset.train_labels, min(config.batch_size, len(dataset.train_images)),
                            device, generator, augment=config.augment)
    test_images = torch.from_numpy(dataset.test_images).to(device)
    test_labels = torch.from_numpy(dataset.test_labels.astype(np.int64)).to(device)
    total_steps = config.epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, total_steps=total_steps, pct_start=config.warmup_fraction,
        anneal_strategy="linear", div_factor=10.0, final_div_factor=100.0,
        three_phase=False, cycle_momentum=False)

    start_epoch, history, seconds = 0, [], 0.0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], generator)
        start_epoch, history, seconds = ckpt["epoch"], list(ckpt["history"]), float(ckpt.get("seconds", 0.0))
        if start_epoch >= config.epochs:
            log.info("checkpoint already holds all %d epochs; nothing to do", config.epochs)

    dtype = autocast_dtype(config, device)
    step_model: nn.Module = torch.compile(model) if config.compile else model
    params = count_parameters(model)
    report: dict[str, Any] = {}
    log.info("training %s (%d parameters) on %s, autocast %s", config.arch, params, device, dtype)

    for epoch in range(start_epoch, config.epochs):
        reporter.epoch_start(epoch + 1, config.epochs, len(batches))
        batches.augment = config.augment and epoch < config.epochs - config.clean_epochs
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        for step, (x, y) in enumerate(batches):
            loss, logits = train_step(step_model, optimizer, x, y, dtype, memory_format, config.label_smoothing)
            scheduler.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            # Reading a value synchronizes the GPU, so there it happens every 50 steps only.
            shown = shown_accuracy = None
            if device.type == "cpu" or step % 50 == 0 or step == len(batches) - 1:
                shown, shown_accuracy = loss.item(), correct.item() / ((step + 1) * batches.batch_size)
                if not math.isfinite(shown):
                    raise TrainingError(f"loss became {shown} at epoch {epoch + 1}, step {step + 1} "
                                        "(try a lower --lr); the last checkpoint was left as it was")
            reporter.step(shown, shown_accuracy, len(y))
        if device.type == "cuda":
            torch.cuda.synchronize()
        epoch_seconds = time.perf_counter() - t0
        mean_loss = loss_sum.item() / len(batches)
        if not math.isfinite(mean_loss):
            raise TrainingError(f"loss became {mean_loss} in epoch {epoch + 1} (try a lower --lr); "
                                "the last checkpoint was left as it was")
        # Full precision, so the figure is the one the exported FP32 model reproduces.
        accuracy = evaluate(model, test_images, test_labels, channels_last=config.channels_last)
        seconds += time.perf_counter() - t0
        record = {"epoch": epoch + 1, "loss": round(mean_loss, 6), "test_accuracy": accuracy,
                  "train_accuracy": correct.item() / (len(batches) * batches.batch_size),
                  "images_per_second": round(len(batches) * batches.batch_size / epoch_seconds, 1),
                  "seconds": round(epoch_seconds, 3), "lr_end": scheduler.get_last_lr()[0]}
        history.append(record)
        state = {
            "model": model.state_dict(), "config": asdict(config), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": _rng_state(generator), "epoch": epoch + 1,
            "history": history, "seconds": seconds, "dataset": dataset.name,
        }
        with atomic_path(ckpt_path) as tmp:
            torch.save(state, tmp)
        report = _report(config, params, device, dtype, history, seconds, dataset.name, (mean, std), run_dir)
        write_json(run_dir / TRAIN_REPORT, report)
        reporter.epoch_end(record)
        if on_epoch_saved is not None:
            on_epoch_saved(epoch + 1)
    if not report:
        report = _report(config, params, device, dtype, history, seconds, dataset.name, (mean, std), run_dir)
    return report


def _report(config: TrainConfig, params: int, device: torch.device, dtype: torch.dtype | None,
            history: list[dict[str, Any]], seconds: float, dataset_name: str, stats: tuple[float, float],
            run_dir: Path) -> dict[str, Any]:
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {
        "arch": config.arch,
        "params": params,
        "device": device.type,
        "device_name": device_name,
        "autocast": str(dtype).replace("torch.", "") if dtype else "off",
        "threads": torch.get_num_threads(),
        "epochs": config.epochs,
        "epochs_done": len(history),
        "seconds": round(seconds, 3),
        "test_accuracy": history[-1]["test_accuracy"] if history else None,
        "dataset": dataset_name,
        "normalization": {"mean": stats[0], "std": stats[1]},
        "history": history,
        "config": asdict(config),
        "checkpoint": str(run_dir / CHECKPOINT),
        "versions": versions(),
    }
