"""Calibration sets of any size: ONNX Runtime's histogram calibrators (entropy, percentile) failed with
'inhomogeneous shape' when the last batch was shorter than the others (--calibration-size 100)."""

from __future__ import annotations

import numpy as np
import pytest

from resnet_edge.export.calibration import Calibration, activation_ranges, even_batch_size
from test_serve_hardening import linear_model


@pytest.mark.parametrize("n, batch, expected", [(128, 64, 64), (100, 64, 50), (96, 64, 48), (97, 64, 1), (5, 64, 5)])
def test_even_batch_size_divides_the_set(n, batch, expected):
    assert even_batch_size(n, batch) == expected


@pytest.mark.parametrize("method", ["percentile", "entropy"])
def test_histogram_calibration_takes_a_set_that_is_no_multiple_of_the_batch(tmp_path, method):
    model = linear_model(tmp_path / "m.onnx")
    images = np.random.default_rng(0).random((100, 1, 28, 28)).astype(np.float32)
    calibration = Calibration(method, 99.99) if method == "percentile" else Calibration(method)
    ranges = activation_ranges(model, images, calibration, 64, tmp_path)
    assert ranges is not None and "logits" in ranges
    low, high = ranges["logits"]
    assert np.isfinite(low) and np.isfinite(high) and low < high
