"""What `serve` has done, counted two ways: Triton's statistics extension (per model and version,
cumulative counts and nanoseconds: GET /v2/models[/{name}[/versions/{v}]]/stats, gRPC ModelStatistics)
and Prometheus metrics (GET /metrics, or --metrics-port). One recorder feeds both, from the batcher and
the request handlers; every update is a few integer additions under a lock, off the ONNX Runtime call.

Prometheus names follow its naming rules (snake case, unit suffix in base units: _seconds, _bytes,
_total for counters). Where Triton has a metric for the same thing, docs/serving.md says which.
"""

from __future__ import annotations

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


class Metrics:
    """The Prometheus metrics of one server, in a registry of its own (several apps in one process, as in
    the tests, never share counters), with a ``model`` and ``version`` label on each per-model metric.
    ``bind(model, version)`` makes the children of one model version once, so the hot path does no
    label lookup; the status-code children are made on first use."""

    def __init__(self, rows_held: Any, pending_bytes: Any) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, process_resident_memory_bytes, ...
        model_labels = ("model", "version")

        def histogram(name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]) -> Any:
            return Histogram(name, documentation, labels, buckets=buckets, registry=self.registry)

        self.requests = Counter(
            "resnet_edge_requests",
            "Inference requests answered, by protocol and status (HTTP status; gRPC's mapped to HTTP's).",
            (*model_labels, "protocol", "code"),
            registry=self.registry,
        )
        self.request_seconds = histogram(
            "resnet_edge_request_duration_seconds",
            "Whole inference request: body read, parsed, inferred, encoded.",
            (*model_labels, "protocol"),
            LATENCY_BUCKETS,
        )
        self.handling_seconds = histogram(
            "resnet_edge_request_handling_seconds",
            "The request's own work outside the batcher: reading, parsing, checking and encoding.",
            (*model_labels, "protocol"),
            LATENCY_BUCKETS,
        )
        self.queue_seconds = histogram(
            "resnet_edge_queue_duration_seconds",
            "Time a request's rows waited in the batcher before their ONNX Runtime call started.",
            model_labels,
            LATENCY_BUCKETS,
        )
        self.infer_seconds = histogram(
            "resnet_edge_inference_duration_seconds",
            "One ONNX Runtime call (a batch): joining the rows, running the model.",
            model_labels,
            LATENCY_BUCKETS,
        )
        self.batch_rows = histogram(
            "resnet_edge_batch_size", "Rows (images) per ONNX Runtime call, as the session saw them.", model_labels,
            BATCH_BUCKETS,
        )  # fmt: skip
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

    def bind(self, model: str, version: str) -> ModelMetrics:
        return ModelMetrics(self, model, version)

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)


class ModelMetrics:
    """One model version's label children of the server's Metrics."""

    def __init__(self, metrics: Metrics, model: str, version: str) -> None:
        self.model = (model, version)
        self.requests = metrics.requests
        self.request_seconds = {p: metrics.request_seconds.labels(model, version, p) for p in PROTOCOLS}
        self.handling_seconds = {p: metrics.handling_seconds.labels(model, version, p) for p in PROTOCOLS}
        self.queue_seconds = metrics.queue_seconds.labels(model, version)
        self.infer_seconds = metrics.infer_seconds.labels(model, version)
        self.batch_rows = metrics.batch_rows.labels(model, version)

    def request_done(self, protocol: str, code: int, seconds: float, handling: float) -> None:
        self.requests.labels(*self.model, protocol, str(code)).inc()
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
