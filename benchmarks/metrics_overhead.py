"""What `serve`'s metrics cost per request, measured where they are spent: the bookkeeping a request and
its share of a batch make (serving/statistics.py's Recorder: Triton's statistics always, the Prometheus
metrics unless --no-metrics), timed in a loop with the metrics on and off, the median of --repeats.

The cost in the server's req/s is measured side by side with benchmarks/serve_settings.py (--setting
metrics= --setting "nometrics=--no-metrics"); on a shared 2-core machine that comparison is noisy
(rounds vary by +-15 %), so this script gives the figure it cannot resolve: microseconds per request,
to set against the server's CPU per request (serve_settings' "CPU us/request: server").

    python benchmarks/metrics_overhead.py --out benchmarks/results/cpu/serve_metrics_cost
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import machine_line, save_report  # noqa: E402

from resnet_edge.core.machine import machine  # noqa: E402
from resnet_edge.serving.statistics import Metrics, Recorder  # noqa: E402

ROWS_PER_BATCH = 16  # what 32 JSON clients gave (serve_settings: 15.9 rows per ONNX Runtime call)


def per_request_us(recorder: Recorder, n: int) -> float:
    """One request's request_done plus 1/ROWS_PER_BATCH of a batch_done, in microseconds."""
    waits = [20_000] * ROWS_PER_BATCH
    started = time.perf_counter_ns()
    t0 = time.perf_counter()
    for i in range(n):
        recorder.request_done("json", 200, started, 1_000_000)
        if i % ROWS_PER_BATCH == 0:
            recorder.batch_done(ROWS_PER_BATCH, waits, 30_000, 2_000_000, 10_000)
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    on, off = [], []
    for _ in range(args.repeats):  # alternating, so drift hits both alike
        on.append(per_request_us(Recorder("m", "1", Metrics(lambda: 0, lambda: 0)), args.requests))
        off.append(per_request_us(Recorder("m", "1", None), args.requests))
    report = {"machine": machine(), "requests": args.requests, "repeats": args.repeats, "rows_per_batch": ROWS_PER_BATCH,
              "with_metrics_us": statistics.median(on), "without_metrics_us": statistics.median(off),
              "metrics_us": statistics.median(a - b for a, b in zip(on, off, strict=True))}
    text = (f"# The metrics' cost per request\n\nMachine: {machine_line(report['machine'])}. `python "
            f"benchmarks/metrics_overhead.py` ({args.repeats} alternating repeats of {args.requests:,} requests, "
            f"a batch every {ROWS_PER_BATCH}; medians).\n\n"
            f"- statistics and metrics: {report['with_metrics_us']:.2f} us per request\n"
            f"- statistics only (--no-metrics): {report['without_metrics_us']:.2f} us per request\n"
            f"- **the Prometheus metrics: {report['metrics_us']:.2f} us per request**\n")
    print(text)
    if args.out:
        save_report(args.out, "metrics_overhead", report, text)


if __name__ == "__main__":
    main()
