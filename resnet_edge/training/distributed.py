"""Data-parallel training with PyTorch's own engine: torchrun's environment, the process group, each
rank's shard of the batches, BatchNorm over the global batch, and torchrun's launcher for `--nproc`.

One process per GPU (NCCL) or per CPU process (gloo), each holding the whole training split on its
device. The *global* batch is the recipe: every rank draws the same seeded permutation of the training
set each epoch and takes its own 1/world_size slice of every global batch, so no image is seen twice in
an epoch (the last ``N mod global_batch`` images of each permutation are dropped, as in one process),
and the images a step sees, the learning-rate schedule and the checkpoint do not depend on the world
size: ``--resume`` may change it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from resnet_edge.core.errors import UserError
from resnet_edge.training.batches import DeviceBatches, affine_from_draws

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place in a data-parallel job (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes checkpoints and reports."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_from_env(env: Mapping[str, str] = os.environ) -> World:
    """The RANK / WORLD_SIZE / LOCAL_RANK that torchrun sets; a single process without them."""
    if "WORLD_SIZE" not in env:
        return World()
    try:
        world = World(int(env.get("RANK", "0")), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise UserError(
            f"RANK={env.get('RANK')!r}, WORLD_SIZE={env.get('WORLD_SIZE')!r}, "
            f"LOCAL_RANK={env.get('LOCAL_RANK')!r}: not integers (start the job with torchrun)"
        ) from None
    if not (world.world_size >= 1 and 0 <= world.rank < world.world_size and world.local_rank >= 0):
        raise UserError(f"RANK={world.rank}, WORLD_SIZE={world.world_size}: no such rank (start the job with torchrun)")
    return world


def start(world: World, device: torch.device, timeout_s: float) -> bool:
    """Join the process group (NCCL on CUDA, gloo on the CPU) unless alone or already in one; returns
    whether this call started it. The timeout bounds every collective: a rank that stops answering
    ends the job with an error instead of a hang."""
    if not world.distributed or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    log.info("rank %d of %d joined the %s process group", world.rank, world.world_size, backend)
    return True


def stop() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place; the tensor itself when alone."""
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def broadcast_from_main(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.broadcast(t, src=0)
    return t


class ShardedBatches(DeviceBatches):
    """``DeviceBatches`` with ``batch_size`` the global batch, of which this rank yields its slice.

    Every rank makes the same generator calls as one process with that batch (one permutation per
    epoch, one [global batch, 4] draw of augmentation parameters per step) and keeps its rows, so with
    world size 1 it is ``DeviceBatches`` bit for bit, and the union of the ranks' batches is the
    single process's batch, augmented the same way.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        world: World,
        augment: bool = True,
    ) -> None:
        if batch_size % world.world_size:
            raise UserError(
                f"--batch-size {batch_size} is the global batch; it must divide evenly among "
                f"{world.world_size} processes"
            )
        super().__init__(images, labels, batch_size, device, generator, augment=augment, drop_last=True)
        self.world = world
        self.local_batch_size = batch_size // world.world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.images), device=self.device, generator=self.generator)
        lo = self.world.rank * self.local_batch_size
        hi = lo + self.local_batch_size
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size][lo:hi]
            x = self.images[idx].unsqueeze(1).float().div_(255.0)
            if self.augment:
                draws = torch.rand(self.batch_size, 4, device=self.device, generator=self.generator)
                x = affine_from_draws(x, draws[lo:hi])
            yield x, self.labels[idx]


class _SumOverRanks(torch.autograd.Function):
    """y = sum over ranks of x; the gradient of a sum over ranks is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm with the statistics of the global batch, on any device (torch.nn.SyncBatchNorm runs on
    GPUs only). The mean and the variance are summed over the ranks differentiably, so the gradients
    flow through them as in one process with the whole batch (two passes, as for a stable variance).
    Same parameters and buffers as nn.BatchNorm2d: its checkpoints load into the plain model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        xf = x.float()
        count = xf.numel() // xf.shape[1] * dist.get_world_size()
        mean = _SumOverRanks.apply(xf.sum((0, 2, 3))) / count
        centred = xf - mean[None, :, None, None]
        var = _SumOverRanks.apply((centred * centred).sum((0, 2, 3))) / count
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            # momentum None is BatchNorm's cumulative average: every batch so far weighs the same
            factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.detach(), factor)
            self.running_var.lerp_(var.detach() * count / max(count - 1, 1), factor)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        return (y * self.weight[None, :, None, None] + self.bias[None, :, None, None]).to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm2d normalizes over the global batch: torch's SyncBatchNorm on GPUs, ours elsewhere."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = GlobalBatchNorm2d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            ).to(child.weight.device)
            sync.load_state_dict(child.state_dict())
            setattr(model, name, sync)
        else:
            sync_batchnorm(child, device)
    return model


def launch(nproc: int, entry: Callable[..., Any], *args: Any) -> Any:
    """Run ``entry(*args)`` in ``nproc`` local processes with torchrun's engine (torch.distributed's
    elastic launcher, the one behind `torchrun --standalone`), each with RANK/WORLD_SIZE/LOCAL_RANK set.
    A rank that fails or dies stops all of them; returns rank 0's result."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: the cores shared among the processes
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"resnet-edge-{os.getpid()}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    # The launcher logs a failed rank's traceback; the failure is told in one line below instead.
    quiet_loggers = [
        logging.getLogger(name)
        for name in ("torch.distributed.elastic", "torch.distributed.launcher", "torch.multiprocessing")
    ]
    levels = [logger.level for logger in quiet_loggers]
    for logger in quiet_loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        results = elastic_launch(config, entry)(*args)
    except SignalException:
        raise KeyboardInterrupt from None
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        raise UserError(
            f"rank {rank} of {nproc} failed ({_failure_line(failure)}); every rank was stopped "
            "and the run keeps its last finished epoch"
        ) from None
    finally:
        for logger, level in zip(quiet_loggers, levels, strict=True):
            logger.setLevel(level)
    return results[0]


def _failure_line(failure: Any) -> str:
    """The one line a failed rank left: its exception's message, else its exit status or signal."""
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    text = str(message or "").strip().splitlines()
    if text and text[0] and "<N/A>" not in text[0]:
        return text[0].removeprefix("UserError: ").removeprefix("TrainingError: ").removeprefix("DataError: ")[:300]
    if failure.exitcode is not None and failure.exitcode < 0:
        return f"killed by signal {-failure.exitcode}"
    return f"exit status {failure.exitcode}"
