"""The benchmark scripts behind the README's figures still import and still call the library as it is now
(serve_costs.py once broke silently when a serving function changed its arguments): every script imports,
and the in-process parts that call resnet_edge directly run for a moment. Their figures are not checked
here; the scripts measure, the README quotes them."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


@pytest.fixture(autouse=True)
def _benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_benchmark_script_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"benchmarks/{name}.py says nothing of what it measures"


def test_serve_costs_format_work_runs_on_the_current_serving_code():
    serve_costs = importlib.import_module("serve_costs")
    costs = serve_costs.format_us(seconds=0.01)
    assert set(costs) == {"json", "binary", "grpc"} and all(v > 0 for v in costs.values())
