"""Training batches: the whole split resident on the training device, shuffled and augmented there."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F


class DeviceBatches:
    """The whole split as one uint8 tensor on the training device, cut into shuffled batches there.

    Each batch is converted to float and augmented as a whole batch with one affine_grid /
    grid_sample call (small rotations, scalings and shifts; never flips: a mirrored 2 is not a 2),
    so the training loop runs no per-sample Python.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        device: torch.device,
        generator: torch.Generator,
        augment: bool = True,
        drop_last: bool = True,
    ) -> None:
        self.images = torch.from_numpy(np.ascontiguousarray(images)).to(device)
        self.labels = torch.from_numpy(labels.astype(np.int64)).to(device)
        self.batch_size = batch_size
        self.device = device
        self.generator = generator
        self.augment = augment
        self.drop_last = drop_last

    def __len__(self) -> int:
        n = len(self.images)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.images), device=self.device, generator=self.generator)
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx].unsqueeze(1).float().div_(255.0)
            if self.augment:
                x = random_affine(x, self.generator)
            yield x, self.labels[idx]


def random_affine(
    x: torch.Tensor,
    generator: torch.Generator,
    max_degrees: float = 10.0,
    max_scale: float = 0.1,
    max_shift: float = 0.1,
) -> torch.Tensor:
    """Random rotation, scaling and shift per image, applied to the batch in one grid_sample."""
    return affine_from_draws(
        x, torch.rand(x.shape[0], 4, device=x.device, generator=generator), max_degrees, max_scale, max_shift
    )


def affine_from_draws(
    x: torch.Tensor, draws: torch.Tensor, max_degrees: float = 10.0, max_scale: float = 0.1, max_shift: float = 0.1
) -> torch.Tensor:
    """``random_affine`` with its uniform [0, 1) draws given ([N, 4]): a rank of a data-parallel run
    draws them for the whole global batch, as one process would, and applies its own slice."""
    r = draws * 2 - 1  # uniform in [-1, 1]
    angle = r[:, 0] * math.radians(max_degrees)
    scale = 1 + r[:, 1] * max_scale
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, r[:, 2] * max_shift * 2], 1), torch.stack([sin, cos, r[:, 3] * max_shift * 2], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
