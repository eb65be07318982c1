from __future__ import annotations

import dataclasses
import gzip
import os
from pathlib import Path

import numpy as np
import pytest

# Tests run on the CPU, with the two cores CI has, whatever the machine.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")


@pytest.fixture(scope="session")
def mnist():
    from resnet_edge.core.mnist import load_dataset

    return load_dataset()


@pytest.fixture(scope="session")
def small_mnist(mnist):
    """2,048 training and 512 test images: enough for a loss to fall, fast enough for many tests."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:2048], train_labels=mnist.train_labels[:2048],
                               test_images=mnist.test_images[:512], test_labels=mnist.test_labels[:512])


@pytest.fixture(scope="session")
def tiny_mnist(mnist):
    """512 training and 128 test images (8 steps of 64 an epoch): for tests of what training writes and
    restores (checkpoints, resume, warm-up), where the number of images changes nothing checked."""
    return dataclasses.replace(mnist, train_images=mnist.train_images[:512], train_labels=mnist.train_labels[:512],
                               test_images=mnist.test_images[:128], test_labels=mnist.test_labels[:128])


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, mnist):
    """The one real-MNIST end-to-end run of the default suite: resnet8, 1 epoch on the first 40,000 of the
    60,000 training images (test_export.py asserts 98 %; two thirds of the epoch's time; the whole recipe's accuracy is
    test_slow.py's), tested on all 10,000, then export --quantize with the default guard. (20,000 images
    gave 96.8 %, a model whose INT8 tests in test_export.py no longer hold.)"""
    from resnet_edge.export.onnx_export import export_run
    from resnet_edge.training.train import TrainConfig, train

    run = tmp_path_factory.mktemp("run") / "resnet8"
    report = train(TrainConfig(arch="resnet8", epochs=1, device="cpu", train_limit=40_000), run, dataset=mnist)
    export = export_run(run, quantize=True)
    return run, report, export


def write_idx(path: Path, magic: int, array: np.ndarray, compress: bool = False, payload_cut: int = 0) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if payload_cut:
        data = data[:-payload_cut]
    path.write_bytes(gzip.compress(data) if compress else data)


def write_dataset(folder: Path, n_train: int = 64, n_test: int = 32, compress: bool = False, seed: int = 0) -> Path:
    """A small MNIST-format dataset of random digits (IDX, optionally gzip) in ``folder``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if compress else ""
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte{suffix}", 0x803, rng.integers(0, 256, (n, 28, 28)), compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte{suffix}", 0x801, rng.integers(0, 10, n), compress)
    return folder
