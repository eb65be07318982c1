"""`eval`: test accuracy and throughput of a .onnx model (ONNX Runtime, no torch) or a .pt checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet_edge.core.errors import UserError
from resnet_edge.core.mnist import load_test_split
from resnet_edge.inference.runtime import create_session, evaluate_session


def evaluate_file(
    path: Path, provider: str = "cpu", data_dir: Path | None = None, batch_size: int = 500
) -> dict[str, Any]:
    path = Path(path)
    if path.suffix == ".onnx":
        session = create_session(path, provider)
        images, labels = load_test_split(data_dir)
        r = evaluate_session(session, images, labels, batch_size=batch_size)
        return {
            "accuracy": r.accuracy,
            "images_per_second": r.images_per_second,
            "runtime": f"onnxruntime {session.get_providers()[0]}",
        }
    if path.suffix == ".pt":
        return _evaluate_checkpoint(path, data_dir, batch_size)
    raise UserError(f"{path}: expected a .onnx model or a .pt checkpoint")


def _evaluate_checkpoint(path: Path, data_dir: Path | None, batch_size: int) -> dict[str, Any]:
    import time

    import torch

    from resnet_edge.core.mnist import load_split
    from resnet_edge.training.checkpoint import evaluate, load_checkpoint, model_from_checkpoint

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
