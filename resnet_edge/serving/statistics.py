"""What `serve` has done, counted two ways: Triton's statistics extension (per model and version,
cumulative counts and nanoseconds: GET /v2/models[/{name}[/versions/{v}]]/stats, gRPC ModelStatistics)
and Prometheus metrics (GET /metrics, or --metrics-port). One recorder feeds both, from the batcher and
the request handlers; every update is a few integer additions under a lock, off the ONNX Runtime call.

Prometheus names follow its naming rules (snake case, unit suffix in base units: _seconds, _bytes,
_total for counters). Where Triton has a metric for the same thing, docs/serving.md says which.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Any

# Latency buckets in seconds: 100 us to 10 s, what a 28x28 model sees from one image to a full queue.
LATENCY_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PROTOCOLS = ("json", "binary", "grpc", "predict")


@dataclass
class Duration:
    """Triton's $duration_stat: how many and how long in all (nanoseconds)."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class BatchStat:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass
class ModelStatistics:
    """One model version's cumulative statistics, in Triton's terms."""

    name: str
    version: str
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    inference_count: int = 0  # images answered (a request of 64 images counts 64)
    execution_count: int = 0  # ONNX Runtime calls
    last_inference_ms: int = 0
    batches: dict[int, BatchStat] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def request_done(self, ok: bool, ns: int) -> None:
        with self.lock:
            (self.success if ok else self.fail).add(ns)
            if ok:
                self.last_inference_ms = time.time_ns() // 1_000_000

    def batch_done(self, rows: int, jobs: int, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One ONNX Runtime call of ``rows`` rows made of ``jobs`` queued parts that waited ``queue_ns`` in all."""
        with self.lock:
            self.queue.add(queue_ns, jobs)
            self.compute_input.add(input_ns, jobs)
            self.compute_infer.add(infer_ns, jobs)
            self.compute_output.add(output_ns, jobs)
            self.inference_count += rows
            self.execution_count += 1
            stat = self.batches.setdefault(rows, BatchStat())
            stat.compute_input.add(input_ns)
            stat.compute_infer.add(infer_ns)
            stat.compute_output.add(output_ns)

    def triton_json(self) -> dict[str, Any]:
        """Triton's $model_stat."""
        with self.lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.json(),
                    "fail": self.fail.json(),
                    "queue": self.queue.json(),
                    "compute_input": self.compute_input.json(),
                    "compute_infer": self.compute_infer.json(),
                    "compute_output": self.compute_output.json(),
                    "cache_hit": Duration().json(),
                    "cache_miss": Duration().json(),
                },
                "response_stats": {},
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": b.compute_input.json(),
                        "compute_infer": b.compute_infer.json(),
                        "compute_output": b.compute_output.json(),
                    }
                    for size, b in sorted(self.batches.items())
                ],
                "memory_usage": [],
            }


class Histogram:
    """A Prometheus histogram (cumulative at scrape time) updated on the event loop only: a bisect and two
    additions per observation, with no lock (every request handler and every batch's bookkeeping runs on
    that one thread). prometheus_client's own Histogram takes a lock per bucket and per sum and cost
    about 10 % of the binary protocol's req/s here (benchmarks/results/cpu/serve_metrics_cost/)."""

    __slots__ = ("bounds", "counts", "sum", "writes")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds, self.counts, self.sum = bounds, [0] * (len(bounds) + 1), 0.0
        self.writes = 0  # odd while an observation is half made (a sequence lock for snapshot)

    def observe(self, value: float) -> None:
        self.writes += 1
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bucket whose le >= value
        self.sum += value
        self.writes += 1

    def snapshot(self) -> tuple[list[int], float]:
        """Bucket counts and sum of the same observations, read from another thread (a scrape): copied
        again while an observation was being made, so _sum never runs ahead of _count."""
        while True:
            before = self.writes
            counts, total = list(self.counts), self.sum
            if before % 2 == 0 and self.writes == before:
                return counts, total
            time.sleep(0)  # let the event loop's thread finish its observation


# name -> (help, label names, buckets) of the per-model histograms
HISTOGRAMS = {
    "resnet_edge_request_duration_seconds": (
        "Whole inference request: body read, parsed, inferred, encoded.", ("model", "version", "protocol"),
        LATENCY_BUCKETS,
    ),
    "resnet_edge_request_handling_seconds": (
        "The request's own work outside the batcher: reading, parsing, checking and encoding.",
        ("model", "version", "protocol"), LATENCY_BUCKETS,
    ),
    "resnet_edge_queue_duration_seconds": (
        "Time a request's rows waited in the batcher before their ONNX Runtime call started.",
        ("model", "version"), LATENCY_BUCKETS,
    ),
    "resnet_edge_inference_duration_seconds": (
        "One ONNX Runtime call (a batch): joining the rows, running the model.", ("model", "version"),
        LATENCY_BUCKETS,
    ),
    "resnet_edge_batch_size": (
        "Rows (images) per ONNX Runtime call, as the session saw them.", ("model", "version"), BATCH_BUCKETS,
    ),
}  # fmt: skip
REQUESTS_HELP = "Inference requests answered, by protocol and status (HTTP status; gRPC's mapped to HTTP's)."


class Metrics:
    """The Prometheus metrics of one server, in a registry of its own (several apps in one process, as in
    the tests, never share counters): process CPU and memory and two gauges from prometheus_client, and
    the per-model request counter and histograms (``model`` and ``version`` labels) kept here and turned
    into Prometheus' families when scraped (``collect``). ``bind(model, version)`` makes one model
    version's children once, so the hot path looks up nothing."""

    def __init__(self, rows_held: Any, pending_bytes: Any) -> None:
        from prometheus_client import CollectorRegistry, Gauge, ProcessCollector

        self.requests: dict[tuple[str, str, str, str], int] = {}  # (model, version, protocol, code) -> count
        self.histograms: dict[str, dict[tuple[str, ...], Histogram]] = {name: {} for name in HISTOGRAMS}
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        Gauge(
            "resnet_edge_rows_in_flight",
            "Images accepted and not answered yet, every model together (--max-queue).",
            registry=self.registry,
        ).set_function(rows_held)
        Gauge(
            "resnet_edge_pending_request_bytes",
            "Request bytes in flight, HTTP and gRPC (--max-pending-bytes).",
            registry=self.registry,
        ).set_function(pending_bytes)
        self.registry.register(self)  # a collector: collect() below

    def histogram(self, name: str, labels: tuple[str, ...]) -> Histogram:
        return self.histograms[name].setdefault(labels, Histogram(HISTOGRAMS[name][2]))

    def bind(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)

    def collect(self) -> Any:
        """The counter and histograms as Prometheus families (called by the registry at each scrape, in the
        request thread pool: each dict and list is copied first, an atomic step under the GIL)."""
        from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        counter = CounterMetricFamily(
            "resnet_edge_requests", REQUESTS_HELP, labels=("model", "version", "protocol", "code")
        )
        for labels, count in list(self.requests.items()):
            counter.add_metric(list(labels), count)
        yield counter
        for name, (documentation, label_names, bounds) in HISTOGRAMS.items():
            family = HistogramMetricFamily(name, documentation, labels=label_names)
            les = [*map(floatToGoString, bounds), "+Inf"]
            for values, histogram in list(self.histograms[name].items()):
                (counts, total), cumulative = histogram.snapshot(), 0
                buckets = []
                for le, count in zip(les, counts, strict=True):
                    cumulative += count
                    buckets.append((le, cumulative))
                family.add_metric(list(values), buckets, total)
            yield family

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class ModelMetrics:
    """One model version's children of the server's Metrics."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.model = (model, version)
        self.requests = metrics.requests
        self.request_seconds = {
            p: metrics.histogram("resnet_edge_request_duration_seconds", (model, version, p)) for p in PROTOCOLS
        }
        self.handling_seconds = {
            p: metrics.histogram("resnet_edge_request_handling_seconds", (model, version, p)) for p in PROTOCOLS
        }
        self.queue_seconds = metrics.histogram("resnet_edge_queue_duration_seconds", self.model)
        self.infer_seconds = metrics.histogram("resnet_edge_inference_duration_seconds", self.model)
        self.batch_rows = metrics.histogram("resnet_edge_batch_size", self.model)

    def request_done(self, protocol: str, code: int, seconds: float, handling: float) -> None:
        key = (*self.model, protocol, str(code))
        self.requests[key] = self.requests.get(key, 0) + 1
        if code == 200:
            self.request_seconds[protocol].observe(seconds)
            self.handling_seconds[protocol].observe(handling)

    def batch_done(self, rows: int, jobs: int, queue_seconds: list[float], infer_seconds: float) -> None:
        for wait in queue_seconds:
            self.queue_seconds.observe(wait)
        self.infer_seconds.observe(infer_seconds)
        self.batch_rows.observe(rows)


class Recorder:
    """What the request handlers and the batcher report for one model version, counted once for Triton's
    statistics and once for Prometheus (``metrics``: the server's, None with --no-metrics). The batcher
    calls ``batch_done``; a request handler ``request_done``."""

    def __init__(self, model: str, version: str, metrics: Metrics | None) -> None:
        self.statistics = ModelStatistics(model, version)
        self.metrics = metrics.bind(model, version) if metrics is not None else None

    def request_done(self, protocol: str, code: int, started_ns: int, batcher_ns: int) -> None:
        """One inference request answered with ``code``; ``batcher_ns`` of its time was spent in the batcher."""
        total = time.perf_counter_ns() - started_ns
        self.statistics.request_done(code == 200, total)
        if self.metrics is not None:
            self.metrics.request_done(protocol, code, total / 1e9, (total - batcher_ns) / 1e9)

    def batch_done(self, rows: int, queue_ns: list[int], input_ns: int, infer_ns: int, output_ns: int) -> None:
        self.statistics.batch_done(rows, len(queue_ns), sum(queue_ns), input_ns, infer_ns, output_ns)
        if self.metrics is not None:
            self.metrics.batch_done(rows, len(queue_ns), [q / 1e9 for q in queue_ns], (input_ns + infer_ns) / 1e9)
