"""One training run's state: device, data on it, model (DDP, compiled), optimizer, one-cycle schedule,
RNG states; built fresh or from a checkpoint. training/train.py runs the loop over it."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from resnet_edge.core.config import TrainConfig
from resnet_edge.core.contract import CHECKPOINT
from resnet_edge.core.errors import UserError
from resnet_edge.core.mnist import Dataset, load_dataset
from resnet_edge.training.checkpoint import CheckpointError
from resnet_edge.training.distributed import ShardedBatches, World, sync_batchnorm
from resnet_edge.training.models import MODELS, create_model

log = logging.getLogger(__name__)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch; returns the loss and the logits (neither synchronized)."""
    x = x.contiguous(memory_format=memory_format)
    with torch.autocast(x.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        logits = model(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, logits.detach()


def rng_state(generator: torch.Generator) -> dict[str, Any]:
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
class Session:
    """Everything one training run holds while it runs: built by ``setup_session``, advanced by ``_run_epoch``."""

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
        step_model = cast(nn.Module, torch.compile(step_model, mode=None if mode == "default" else mode))
    return model, step_model, mode


def _optimizer_and_schedule(
    config: TrainConfig, model: nn.Module, device: torch.device, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, Any]:
    """SGD with Nesterov momentum (no weight decay on biases and norms) and the one-cycle schedule."""
    optimizer = torch.optim.SGD(
        _param_groups(model, config.weight_decay),
        lr=config.lr,
        momentum=config.momentum,
        nesterov=True,
        fused=True if device.type == "cuda" else None,
    )
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=config.lr,
        total_steps=config.epochs * steps_per_epoch,
        pct_start=warmup_fraction(config, steps_per_epoch),
        anneal_strategy="linear",
        div_factor=10.0,
        final_div_factor=100.0,
        three_phase=False,
        cycle_momentum=False,
    )
    return optimizer, scheduler


def setup_session(
    config: TrainConfig,
    run_dir: Path,
    ckpt: dict[str, Any] | None,
    dataset: Dataset | None,
    world: World,
    device: torch.device,
) -> Session:
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
    batches = ShardedBatches(
        dataset.train_images,
        dataset.train_labels,
        min(config.batch_size, len(dataset.train_images)),
        device,
        generator,
        world,
        augment=config.augment,
    )
    optimizer, scheduler = _optimizer_and_schedule(config, model, device, len(batches))
    s = Session(
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


def warmup_fraction(config: TrainConfig, steps_per_epoch: int) -> float:
    """The recipe's warm-up share, but at least one step up and one down: OneCycleLR divides by both."""
    total = config.epochs * steps_per_epoch
    if total < 3:
        raise UserError(
            f"the one-cycle schedule needs at least 3 steps; this run has {total} "
            "(give more --epochs or images, or a smaller --batch-size)"
        )
    return min(max(config.warmup_fraction, 2 / total), (total - 1) / total)


def _restore(s: Session, ckpt: dict[str, Any]) -> None:
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


def schedule_report(s: Session) -> dict[str, Any]:
    """The learning-rate schedule as it runs (OneCycleLR, linear, no momentum cycling)."""
    total = s.config.epochs * len(s.batches)
    return {
        "kind": "one-cycle, linear",
        "optimizer": f"SGD, Nesterov momentum {s.config.momentum}",
        "peak_lr": s.config.lr,
        "initial_lr": s.config.lr / 10,
        "final_lr": s.config.lr / 1000,
        "warmup_steps": round(warmup_fraction(s.config, len(s.batches)) * total),
        "steps_per_epoch": len(s.batches),
        "total_steps": total,
    }
