"""The images INT8 is calibrated and judged on, and the activation ranges each calibration method sets.

Calibration images are a seeded subset of the training images (never test images: they judge the
result); the selection split, on which the search chooses, is drawn from the training images the
calibration did not see. A calibration method (minmax, entropy, percentile) turns the float model's
activations on the calibration images into a (min, max) range per tensor, with ONNX Runtime's calibrators.
No torch here.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.config import QuantizationConfig
from resnet_edge.core.contract import INPUT_NAME, to_pixels
from resnet_edge.core.errors import UserError

MIN_SELECTION = 100  # held-out training images the search needs at least
DEFAULT_PERCENTILE = 99.999  # ONNX Runtime's own default
HISTOGRAM_BINS = 2048
# ONNX Runtime's entropy calibrator defaults to 128 histogram bins and 128 quantized bins: its threshold
# search then has exactly one candidate, the whole range, and "entropy" gives minmax's ranges byte for
# byte. With 2048 bins (TensorRT's recipe) it searches thresholds from 128 bins up.
ENTROPY_QUANTIZED_BINS = 128


def _batches(images: np.ndarray, batch_size: int, progress: Callable[[int], None] | None = None) -> Any:
    """onnxruntime's CalibrationDataReader over an array of images, with a progress hook."""
    from onnxruntime.quantization import CalibrationDataReader

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.rewind()

        def _gen(self) -> Iterator[dict[str, np.ndarray]]:
            for i in range(0, len(images), batch_size):
                batch = images[i : i + batch_size]
                if progress:
                    progress(len(batch))
                yield {INPUT_NAME: batch}

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

        def rewind(self) -> None:
            self._it = self._gen()

    return Batches()


def _as_input(images: np.ndarray) -> np.ndarray:
    """Model input from training images: uint8 [N, 28, 28] images are converted, pixels pass as they are."""
    return np.ascontiguousarray(to_pixels(images) if images.dtype == np.uint8 else images)


def calibration_images(train_images: np.ndarray, size: int, seed: int) -> np.ndarray:
    """A seeded random subset of the training images (never test images: they judge the result), as
    model input; uint8 [N, 28, 28] images are converted after sampling, so only the subset is."""
    return _as_input(train_images[_calibration_indices(len(train_images), size, seed)])


def _calibration_indices(n: int, size: int, seed: int) -> np.ndarray:
    """The seeded draw of calibration images (sorted indices): one place, so the selection split excludes
    exactly the images calibration_images takes."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(size, n), replace=False))


def selection_split(
    train_images: np.ndarray, train_labels: np.ndarray | None, config: QuantizationConfig
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Training images the calibration did not see (seeded), on which the search chooses: choosing on test
    images would make the reported test accuracy a selected figure. Also --calibration-size more training
    images outside both, for the search's larger-calibration candidate (fewer when the set is small)."""
    n = len(train_images)
    calib = set(_calibration_indices(n, config.calibration_size, config.seed).tolist())
    rest = np.array([i for i in range(n) if i not in calib], dtype=np.int64)
    if len(rest) < MIN_SELECTION:
        raise UserError(
            f"--calibration-size {config.calibration_size} leaves {len(rest)} of the {n} training images for the "
            f"search to choose on (it needs {MIN_SELECTION} the calibration did not see); give a smaller "
            "--calibration-size, or --no-search"
        )
    rng = np.random.default_rng(config.seed + 2)
    picked = np.sort(rng.choice(rest, size=min(config.selection_size, len(rest)), replace=False))
    more = _more_calibration_indices(np.setdiff1d(rest, picked), config)
    labels = None if train_labels is None else np.asarray(train_labels)[picked].astype(np.int64)
    return _as_input(train_images[picked]), labels, _as_input(train_images[more])


def _more_calibration_indices(unused: np.ndarray, config: QuantizationConfig) -> np.ndarray:
    """Up to --calibration-size of the ``unused`` indices (neither calibration nor selection), seeded."""
    if not len(unused):
        return unused
    rng = np.random.default_rng(config.seed + 4)
    return np.sort(rng.choice(unused, size=min(config.calibration_size, len(unused)), replace=False))


@dataclass(frozen=True)
class Calibration:
    """One way to set the activation ranges: a calibration method and, for percentile, its percentile."""

    method: str  # minmax | entropy | percentile
    percentile: float | None = None

    @property
    def name(self) -> str:
        return self.method if self.percentile is None else f"{self.method} {self.percentile:g}"


def even_batch_size(n: int, batch_size: int) -> int:
    """The largest batch size up to ``batch_size`` that divides ``n`` images evenly: ONNX Runtime's
    histogram calibrators stack every batch's outputs into one array, which fails on a shorter last batch
    (e.g. --calibration-size 100 with batches of 64)."""
    return next(b for b in range(min(batch_size, max(n, 1)), 0, -1) if n % b == 0)


def activation_ranges(
    pre_path: Path, calib: np.ndarray, calibration: Calibration, batch_size: int, work: Path
) -> dict[str, tuple[float, float]] | None:
    """(min, max) of every activation tensor by ``calibration``, with ONNX Runtime's calibrators; None for
    minmax, which quantize_static computes itself."""
    if calibration.method == "minmax":
        return None
    from onnxruntime.quantization.calibrate import create_calibrator

    method, extra = _calibrator_options(calibration)
    augmented = work / f"augmented-{calibration.name.replace(' ', '-')}.onnx"
    calibrator = create_calibrator(
        str(pre_path), None, augmented_model_path=str(augmented), calibrate_method=method, extra_options=extra
    )
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its histogram calibrators print their progress
            calibrator.collect_data(_batches(calib, even_batch_size(len(calib), batch_size)))
            data = calibrator.compute_data()
    finally:
        augmented.unlink(missing_ok=True)
    ranges = {}
    for name in data:
        low, high = data[name].range_value
        ranges[name] = (float(np.min(low)), float(np.max(high)))
    return ranges


def _calibrator_options(calibration: Calibration) -> tuple[Any, dict[str, Any]]:
    """ONNX Runtime's calibration method and extra options for an entropy or percentile ``calibration``."""
    from onnxruntime.quantization.calibrate import CalibrationMethod

    if calibration.method == "entropy":
        return CalibrationMethod.Entropy, {"num_bins": HISTOGRAM_BINS, "num_quantized_bins": ENTROPY_QUANTIZED_BINS}
    return CalibrationMethod.Percentile, {"num_bins": HISTOGRAM_BINS, "percentile": calibration.percentile}
