"""Longer end-to-end runs that back the README's claims; deselected by default (`pytest -m slow`)."""

from __future__ import annotations

import pytest

from resnet_edge.core.config import TrainConfig
from resnet_edge.export.onnx_export import export_run
from resnet_edge.training.train import train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("arch, epochs, min_accuracy, max_int8_size_ratio", [
    ("resnet8", 2, 0.992, 0.5),
    ("resnet18", 1, 0.98, 0.27),
])
def test_train_export_quantize_keeps_accuracy(tmp_path, mnist, arch, epochs, min_accuracy, max_int8_size_ratio):
    run = tmp_path / arch
    report = train(TrainConfig(arch=arch, epochs=epochs, device="cpu"), run, dataset=mnist)
    assert report["test_accuracy"] >= min_accuracy
    export = export_run(run, quantize=True)
    assert all(p["max_abs_diff"] <= 1e-4 and p["top1_equal"] for p in export["parity"])
    assert abs(export["fp32"]["test_accuracy"] - report["test_accuracy"]) <= 0.0005
    assert export["int8"]["accuracy_drop_points"] <= 0.1 + 1e-9
    assert export["int8"]["top1_agreement"] >= 0.997
    assert export["int8"]["size_ratio"] <= max_int8_size_ratio
