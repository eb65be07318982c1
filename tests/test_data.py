from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from conftest import write_dataset, write_idx
from resnet_edge.core.mnist import DataError, bundled_dir, load_dataset
from resnet_edge.training.batches import DeviceBatches


def test_bundled_mnist_matches_published_facts(mnist):
    assert mnist.train_images.shape == (60000, 28, 28) and mnist.test_images.shape == (10000, 28, 28)
    assert np.bincount(mnist.train_labels).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert np.bincount(mnist.test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    mean, std = mnist.pixel_stats()
    assert mean == pytest.approx(0.1307, abs=1e-4) and std == pytest.approx(0.3081, abs=1e-4)


@pytest.mark.parametrize("compress", [False, True])
def test_data_dir_reads_raw_and_gzip(tmp_path, compress):
    ds = load_dataset(write_dataset(tmp_path / "d", compress=compress))
    assert ds.train_images.shape == (64, 28, 28) and ds.test_labels.shape == (32,)


def test_wrong_magic_is_named(tmp_path):
    folder = write_dataset(tmp_path / "d")
    write_idx(folder / "train-labels-idx1-ubyte", 0x803, np.zeros(64))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte: wrong magic number 0x00000803"):
        load_dataset(folder)


def test_truncated_payload_is_named(tmp_path):
    folder = write_dataset(tmp_path / "d")
    write_idx(folder / "t10k-images-idx3-ubyte", 0x803, np.zeros((32, 28, 28)), payload_cut=100)
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte: payload has .*truncated"):
        load_dataset(folder)


def test_truncated_gzip_is_named(tmp_path):
    folder = write_dataset(tmp_path / "d", compress=True)
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        load_dataset(folder)


def test_mismatched_counts(tmp_path):
    folder = write_dataset(tmp_path / "d")
    write_idx(folder / "train-labels-idx1-ubyte", 0x801, np.zeros(63))
    with pytest.raises(DataError, match="64 images but 63 labels"):
        load_dataset(folder)


def test_missing_file_and_folder(tmp_path):
    folder = write_dataset(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset(folder)
    with pytest.raises(DataError, match="not a directory"):
        load_dataset(tmp_path / "nope")


def test_checksum_failure_names_the_file(tmp_path):
    folder = tmp_path / "mnist"
    shutil.copytree(bundled_dir(), folder)
    # A payload that is valid IDX but not the published one: one label changed.
    labels = np.frombuffer(__import__("gzip").decompress((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())[8:], np.uint8).copy()
    labels[0] = (labels[0] + 1) % 10
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(folder / "t10k-labels-idx1-ubyte", 0x801, labels)
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte: SHA-256 of the payload .*corrupt"):
        load_dataset(folder)


def test_bundled_hashes_are_the_published_ones():
    sums = (bundled_dir() / "SHA256SUMS").read_text()
    assert "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db  train-images-idx3-ubyte" in sums


def test_device_batches_cover_the_split_and_augment_in_place(small_mnist):
    g = torch.Generator().manual_seed(0)
    batches = DeviceBatches(small_mnist.train_images, small_mnist.train_labels, 256, torch.device("cpu"), g, augment=False)
    seen = torch.cat([y for _, y in batches])
    assert len(batches) == 8 and sorted(seen.tolist()) == sorted(small_mnist.train_labels.tolist())
    x, _ = next(iter(DeviceBatches(small_mnist.train_images, small_mnist.train_labels, 64, torch.device("cpu"), g)))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
