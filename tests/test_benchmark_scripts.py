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


def test_serve_peers_starts_a_server_that_exited_again_but_not_one_that_never_got_ready(monkeypatch):
    """A peer that exits while starting (PyTriton's flaky handshake) is started again, each failure kept
    for the report; one that stays up and never gets ready is not waited for twice."""
    serve_peers = importlib.import_module("serve_peers")
    outcomes = [SystemExit("server exited: handshake"), SystemExit("server exited: again"), ("proc", 1, 2)]
    monkeypatch.setattr(serve_peers, "start", lambda *a: _next(outcomes))
    failures: dict = {}
    assert serve_peers.start_retrying("triton", Path("m"), Path("."), None, {}, failures) == ("proc", 1, 2)
    assert [why.split(":")[1].strip() for why in failures["triton"]] == ["handshake", "again"]
    outcomes[:] = [SystemExit("server exited: 1")] * serve_peers.START_TRIES
    with pytest.raises(SystemExit, match="server exited"):
        serve_peers.start_retrying("triton", Path("m"), Path("."), None, {}, {})
    outcomes[:] = [SystemExit("server did not become ready: log"), ("proc", 1, 2)]
    with pytest.raises(SystemExit, match="did not become ready"):
        serve_peers.start_retrying("triton", Path("m"), Path("."), None, {}, {})
    assert outcomes == [("proc", 1, 2)], "a server that never got ready was started again"


def _next(outcomes: list):
    outcome = outcomes.pop(0)
    if isinstance(outcome, BaseException):
        raise outcome
    return outcome


@pytest.mark.parametrize("checkout", ["variant=/nonexistent", "other=.", "variant"])
def test_serve_settings_refuses_a_checkout_it_cannot_run(monkeypatch, checkout):
    """--checkout NAME=DIR names one of the settings and a checkout holding resnet_edge/, before any server starts."""
    import sys

    serve_settings = importlib.import_module("serve_settings")
    monkeypatch.setattr(serve_settings, "start", lambda *a: pytest.fail("a server was started"))
    monkeypatch.setattr(sys, "argv", ["serve_settings.py", "--model", "m.onnx", "--setting", "shipped=",
                                      "--setting", "variant=", "--checkout", checkout])
    with pytest.raises(SystemExit, match="--checkout NAME=DIR"):
        serve_settings.main()
