"""checkpoint.pt: reading it safely and rebuilding its model, for every stage that needs the weights.

Checkpoints are read only with ``torch.load(weights_only=True)`` and no fallback: a pickle that would
run code is refused, and a file of the wrong shape is one clear error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from resnet_edge.core.errors import UserError
from resnet_edge.training.models import create_model


class CheckpointError(UserError):
    """A checkpoint is missing, truncated, unsafe or of another architecture; the message names it."""


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` and no fallback: a pickle that would run code is refused."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there (run `resnet-edge train` first)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError, truncated zip, wrong format: all one answer to the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "weights_only" in str(exc) or "Unsupported global" in str(exc) or "GLOBAL" in str(exc):
            raise CheckpointError(
                f"{path}: refused: it is not a plain-weights checkpoint and loading it would run code from the file"
            ) from None
        raise CheckpointError(f"{path}: not a readable checkpoint (truncated or corrupt: {first[:160]})") from None
    if (
        not isinstance(ckpt, dict)
        or not isinstance(ckpt.get("model"), dict)
        or not isinstance(ckpt.get("config"), dict)
    ):
        raise CheckpointError(f"{path}: not a resnet-edge checkpoint (no model weights and config)")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], path: Path, arch: str | None = None) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its weights, with clear errors on mismatch."""
    saved_arch = ckpt["config"].get("arch")
    if arch is not None and saved_arch != arch:
        raise CheckpointError(f"{path}: checkpoint holds {saved_arch}, not {arch}")
    try:
        model = create_model(saved_arch)
    except UserError:
        raise CheckpointError(f"{path}: checkpoint names an unknown architecture {saved_arch!r}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"{path}: weights do not fit {saved_arch} "
            f"({str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__})"
        ) from None
    return model.eval()


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 1000,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> float:
    """Top-1 accuracy (a fraction) of ``model`` on uint8 ``images`` [N, 28, 28] already on its device."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=images.device)
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].unsqueeze(1).float().div_(255.0)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(images.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(x)
        correct += (logits.argmax(1) == labels[i : i + batch_size]).sum()
    model.train(was_training)
    return correct.item() / len(images)


def evaluate_checkpoint_file(path: Path, data_dir: Path | None = None, batch_size: int = 500) -> dict[str, Any]:
    """`eval` of a .pt checkpoint: test accuracy and images/s of the model in PyTorch on the CPU."""
    import time

    from resnet_edge.core.mnist import load_split

    model = model_from_checkpoint(load_checkpoint(path), path)
    test_images, test_labels = load_split(data_dir, "test")
    images, labels = torch.from_numpy(test_images), torch.from_numpy(test_labels.astype("int64"))
    t0 = time.perf_counter()
    acc = evaluate(model, images, labels, batch_size=batch_size)
    return {
        "accuracy": acc,
        "images_per_second": len(images) / (time.perf_counter() - t0),
        "runtime": f"torch {torch.__version__} cpu",
    }
