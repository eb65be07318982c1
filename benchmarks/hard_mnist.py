"""Harder 28x28, 10-class datasets made from the bundled MNIST, offline, for INT8 quality work (issue 21):
cases where post-training quantization of a briefly trained model hurts, unlike plain MNIST.

    python benchmarks/hard_mnist.py --kind noisy --out /tmp/hard-noisy     # then: resnet-edge train --data-dir /tmp/hard-noisy

Kinds (each seeded, the same images every time):
- noisy:    Gaussian noise (sigma 50 of 255), a random 10x10 occlusion, half of the images inverted;
- inverted: every other image inverted and contrast scaled by 0.3-1.0 (wide, uneven activation ranges);
- blobs:    5 % of the images carry a saturated 20x20 white square (rare, extreme activations that
            stretch minmax ranges for every other image: the classic case for percentile calibration);
Written as the four gzip IDX files `--data-dir` reads.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

KINDS = ("noisy", "inverted", "blobs")


def harden(images: np.ndarray, kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = images.astype(np.float32)
    n = len(x)
    if kind == "noisy":
        x = x + rng.normal(0, 50, x.shape)
        for i, (r, c) in enumerate(rng.integers(0, 19, (n, 2))):
            x[i, r:r + 10, c:c + 10] = rng.uniform(0, 255)
        flip = rng.random(n) < 0.5
        x[flip] = 255 - x[flip]
    elif kind == "inverted":
        flip = np.arange(n) % 2 == 1
        x[flip] = 255 - x[flip]
        x = x * rng.uniform(0.3, 1.0, (n, 1, 1))
    elif kind == "blobs":
        for i in np.flatnonzero(rng.random(n) < 0.05):
            r, c = rng.integers(0, 9, 2)
            x[i, r:r + 20, c:c + 20] = 255
    else:
        raise SystemExit(f"--kind must be one of {', '.join(KINDS)}")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _write_idx(path: Path, magic: int, array: np.ndarray) -> None:
    header = magic.to_bytes(4, "big") + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes(), compresslevel=6))


def write_dataset(kind: str, out: Path, seed: int = 0) -> Path:
    from resnet_edge.core.mnist import load_dataset

    mnist = load_dataset()
    out.mkdir(parents=True, exist_ok=True)
    for split, images, labels, offset in (("train", mnist.train_images, mnist.train_labels, 0),
                                          ("t10k", mnist.test_images, mnist.test_labels, 1)):
        _write_idx(out / f"{split}-images-idx3-ubyte.gz", 0x803, harden(images.reshape(-1, 28, 28), kind, seed + offset))
        _write_idx(out / f"{split}-labels-idx1-ubyte.gz", 0x801, labels)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=KINDS, default="noisy")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write_dataset(args.kind, args.out, args.seed))


if __name__ == "__main__":
    main()
