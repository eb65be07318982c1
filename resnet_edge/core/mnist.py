"""MNIST-format datasets: IDX parsing and verification, and the bundled copy.

The IDX format (LeCun et al.): a big-endian header -- two zero bytes, a type code (0x08 for uint8),
the number of dimensions -- then one uint32 per dimension and the row-major payload. Images are
magic 0x00000803 (N x 28 x 28), labels 0x00000801 (N). Files may be gzip-compressed.

numpy only: the inference side reads test images with it. The training batches are training/batches.py.
"""

from __future__ import annotations

import hashlib
import logging
import struct
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from resnet_edge.core.contract import IMAGE_SIZE, NUM_CLASSES, to_pixels
from resnet_edge.core.errors import UserError

log = logging.getLogger(__name__)

IMAGE_MAGIC = 0x00000803
LABEL_MAGIC = 0x00000801

# The four files of an MNIST-format dataset, by split and kind.
IDX_FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


class DataError(UserError):
    """A dataset file is missing, malformed or corrupt; the message names the file."""


@dataclass(frozen=True)
class Dataset:
    """An MNIST-format dataset held in memory as uint8 arrays."""

    name: str
    train_images: np.ndarray  # uint8 [N, 28, 28]
    train_labels: np.ndarray  # uint8 [N]
    test_images: np.ndarray  # uint8 [M, 28, 28]
    test_labels: np.ndarray  # uint8 [M]

    def pixel_stats(self) -> tuple[float, float]:
        """Mean and standard deviation of the training pixels, as fractions of 255."""
        # A histogram of the 256 levels gives both exactly, without a float copy of every pixel.
        counts = np.bincount(self.train_images.reshape(-1), minlength=256).astype(np.float64)
        levels = np.arange(256, dtype=np.float64) / 255.0
        n = counts.sum()
        mean = float((counts * levels).sum() / n)
        return mean, float(np.sqrt((counts * (levels - mean) ** 2).sum() / n))


def bundled_dir() -> Path:
    """The folder of the MNIST copy shipped inside the package."""
    return Path(str(resources.files("resnet_edge.core") / "mnist_files"))


def _read(path: Path, n: int = -1) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _idx_size(header: bytes, source: str) -> int:
    """Total bytes (header included) that an IDX header promises; the ceiling for decompression."""
    if len(header) < 4:
        raise DataError(f"{source}: too short to be an IDX file ({len(header)} bytes)")
    ndim = header[3]
    if header[:2] != b"\0\0" or header[2] != 0x08 or not 1 <= ndim <= 3:
        (magic,) = struct.unpack(">I", header[:4])
        raise DataError(f"{source}: wrong magic number 0x{magic:08x}, not an IDX file of uint8 images or labels")
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{source}: header truncated")
    dims = struct.unpack(f">{ndim}I", header[4 : 4 + 4 * ndim])
    return 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))


MAX_IDX_BYTES = 2**34  # 16 GiB: no header may ask for more, whatever it says


def _open_payload(path: Path) -> tuple[bytes, bytes]:
    """(raw file bytes, uncompressed IDX payload). A gzip stream is decompressed only up to the size its
    own IDX header promises (plus one byte, to notice more): a gzip bomb costs at most that."""
    raw = _read(path)
    if raw[:2] != b"\x1f\x8b":
        return raw, raw
    stream = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        head = stream.decompress(raw, 16)
        while len(head) < 16 and stream.unconsumed_tail:
            head += stream.decompress(stream.unconsumed_tail, 16 - len(head))
        limit = _idx_size(head, str(path))
        if limit > MAX_IDX_BYTES:
            raise DataError(f"{path}: its IDX header promises {limit:,} bytes, more than any dataset we read")
        body = stream.decompress(stream.unconsumed_tail, limit - len(head) + 1)
    except zlib.error as exc:
        raise DataError(f"{path}: corrupt or truncated gzip stream ({exc})") from None
    payload = head + body
    if len(payload) > limit:
        raise DataError(f"{path}: the gzip stream holds more than the {limit:,} bytes its IDX header promises; refused")
    if not stream.eof:
        raise DataError(f"{path}: corrupt or truncated gzip stream (ends after {len(payload):,} bytes)")
    return raw, payload


def parse_idx(payload: bytes, expected_magic: int, source: str) -> np.ndarray:
    """Parse an uncompressed IDX payload, checking magic number, dimensions and length."""
    if len(payload) < 8:
        raise DataError(f"{source}: too short to be an IDX file ({len(payload)} bytes)")
    (magic,) = struct.unpack(">I", payload[:4])
    if magic != expected_magic:
        raise DataError(f"{source}: wrong magic number 0x{magic:08x}, expected 0x{expected_magic:08x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(payload) < header:
        raise DataError(f"{source}: header truncated")
    dims = struct.unpack(f">{ndim}I", payload[4:header])
    if expected_magic == IMAGE_MAGIC and tuple(dims[1:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{source}: images are {dims[1]}x{dims[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
    expected = int(np.prod(dims))
    got = len(payload) - header
    if got != expected:
        raise DataError(f"{source}: payload has {got} bytes, header promises {expected} (truncated or padded)")
    return np.frombuffer(payload, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find(data_dir: Path, stem: str) -> Path:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{data_dir}: missing {stem} (or {stem}.gz)")


def _read_checksums(data_dir: Path) -> dict[str, str]:
    """SHA256SUMS as `sha256sum` writes it: `<hex digest>  <file name>`, names of payloads or of .gz files."""
    sums = data_dir / "SHA256SUMS"
    if not sums.is_file():
        return {}
    try:
        text = _read(sums).decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{sums}: not a text file (expected lines `<sha256>  <file name>`)") from None
    table = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        # A line we cannot read would verify nothing, silently: it is an error, never skipped.
        if len(parts) != 2 or len(parts[0]) != 64 or any(c not in "0123456789abcdefABCDEF" for c in parts[0]):
            raise DataError(f"{sums}: line {number} is not `<sha256>  <file name>` (as `sha256sum` writes it)")
        table[parts[1].lstrip("*")] = parts[0].lower()
    return table


def _load_split(folder: Path, split: str, checksums: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    arrays = {}
    for kind in ("images", "labels"):
        stem = IDX_FILES[split, kind]
        path = _find(folder, stem)
        raw, payload = _open_payload(path)
        # An entry may name the payload (checked whatever the compression) or the file as it is on disk.
        for name, data in ((stem, payload), (path.name, raw)):
            expected = checksums.get(name)
            if expected is None:
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest != expected:
                raise DataError(
                    f"{path}: SHA-256 of the {'payload' if data is payload else 'file'} is {digest[:16]}..., "
                    f"SHA256SUMS says {expected[:16]}... "
                    "(corrupt or changed file)"
                )
        arrays[kind] = parse_idx(payload, IMAGE_MAGIC if kind == "images" else LABEL_MAGIC, str(path))
    images, labels = arrays["images"], arrays["labels"]
    if len(images) != len(labels):
        raise DataError(f"{folder}: {split} split has {len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise DataError(f"{folder}: {split} split is empty")
    if labels.max() >= NUM_CLASSES:
        raise DataError(f"{folder}: {split} labels go up to {labels.max()}, expected 0-{NUM_CLASSES - 1}")
    return images, labels


def _folder(data_dir: str | Path | None) -> Path:
    folder = Path(data_dir) if data_dir is not None else bundled_dir()
    if not folder.is_dir():
        raise DataError(f"{folder}: not a directory")
    return folder


def load_dataset(data_dir: str | Path | None = None) -> Dataset:
    """Load the four IDX files of ``data_dir`` (default: the bundled MNIST).

    When the folder has a SHA256SUMS file (the bundled copy has), the SHA-256 of every uncompressed
    payload listed there is verified, so the data is checked whatever compression it arrives in.
    """
    folder = _folder(data_dir)
    checksums = _read_checksums(folder)
    train_images, train_labels = _load_split(folder, "train", checksums)
    test_images, test_labels = _load_split(folder, "test", checksums)
    name = "mnist" if data_dir is None else folder.name
    return Dataset(name, train_images, train_labels, test_images, test_labels)


def load_split(data_dir: str | Path | None = None, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """One split's uint8 images [N, 28, 28] and labels, verified, without reading the other split."""
    folder = _folder(data_dir)
    return _load_split(folder, split, _read_checksums(folder))


def load_test_split(data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Test images as float32 [N, 1, 28, 28] in [0, 1] and int64 labels: the ONNX input contract."""
    images, labels = load_split(data_dir, "test")
    return to_pixels(images), labels.astype(np.int64)
