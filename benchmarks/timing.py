"""Timing helpers shared by the benchmark scripts (imported as `timing`: scripts run from benchmarks/)."""

from __future__ import annotations

import time

import numpy as np


def p50_ms(session, x: np.ndarray, runs: int, warmup: int = 20) -> float:
    """Median latency in ms of ``runs`` calls of an ONNX Runtime session on ``x`` after ``warmup`` calls."""
    for _ in range(warmup):
        session.run(None, {"pixels": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        session.run(None, {"pixels": x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e3)
