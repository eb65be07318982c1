"""One bench cell (variant x batch size), measured in its own process: ``python -m resnet_edge.bench.worker``.

A fresh process per cell, so the variants do not share thread pools or allocators and each one's peak
memory is its own. A cell: create the session (cold start = creation to first result), warm up, then
time single calls with ``time.perf_counter`` for ``duration`` seconds and at least ``min_runs`` runs;
on CUDA, inputs and outputs stay on the device (IOBinding / CUDA tensors) and every call is
synchronized. The ONNX variants never import torch.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.contract import TORCH
from resnet_edge.core.errors import UserError
from resnet_edge.core.machine import process_gpu_memory_mb
from resnet_edge.core.providers import CPU, is_cpu_provider


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def _time_loop(call: Callable[[], None], duration: float, min_runs: int, warmup: int) -> list[float]:
    t_end = time.perf_counter() + 0.2
    n = 0
    while n < warmup or time.perf_counter() < t_end:
        call()
        n += 1
    samples: list[float] = []
    t_end = time.perf_counter() + duration
    while len(samples) < min_runs or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        call()
        samples.append(time.perf_counter() - t0)
    return samples


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _node_placement(model_path: Path, provider: str, x: np.ndarray, threads: int | None) -> dict[str, int]:
    """How many graph nodes ran on each execution provider, read from ONNX Runtime's profile."""
    import onnxruntime as ort

    from resnet_edge.core.contract import INPUT_NAME
    from resnet_edge.core.providers import provider_name

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.log_severity_level = 3
    options.profile_file_prefix = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"resnet-edge-profile-{os.getpid()}")
    if threads:
        options.intra_op_num_threads = threads
    name = provider_name(provider)
    sess = ort.InferenceSession(str(model_path), options, providers=[name, CPU])
    sess.run(None, {INPUT_NAME: x})
    profile = Path(sess.end_profiling())
    counts: dict[str, set[str]] = {}
    try:
        for event in json.loads(profile.read_text()):
            if (
                event.get("cat") == "Node"
                and event.get("name", "").endswith("_kernel_time")
                and "provider" in event.get("args", {})
            ):
                counts.setdefault(event["args"]["provider"], set()).add(event["name"].rsplit("_kernel_time", 1)[0])
    finally:
        profile.unlink(missing_ok=True)
    return {k: len(v) for k, v in counts.items()}


def measure_cell(
    variant: str,
    model_path: Path,
    provider: str,
    batch_size: int,
    duration: float,
    min_runs: int,
    warmup: int,
    threads: int | None,
) -> dict[str, Any]:
    """One cell, in this process: cold start, latency samples, memory."""
    from resnet_edge.core.mnist import load_test_split

    images, _ = load_test_split()
    reps = -(-batch_size // len(images))
    x = (
        np.ascontiguousarray(np.concatenate([images] * reps)[:batch_size])
        if reps > 1
        else np.ascontiguousarray(images[:batch_size])
    )
    rss_before = _rss_mb()
    extra: dict[str, Any] = {}
    t0 = time.perf_counter()
    if variant == TORCH:
        call, device_memory = _torch_call(model_path, provider, x, threads)
    else:
        call, device_memory, session = _onnx_call(model_path, provider, x, threads)
        extra["provider_used"] = session.get_providers()[0]
    call()
    cold_start = time.perf_counter() - t0
    samples = _time_loop(call, duration, min_runs, warmup)
    if variant != TORCH and not is_cpu_provider(provider):
        extra["nodes_per_provider"] = _node_placement(model_path, provider, x, threads)
    stats = _percentiles(samples)
    return {
        "variant": variant,
        "provider": provider,
        "batch_size": batch_size,
        **stats,
        "throughput": batch_size / (stats["p50_ms"] / 1e3),
        "runs": len(samples),
        "cold_start_ms": cold_start * 1e3,
        "rss_before_mb": rss_before,
        "peak_rss_mb": _peak_rss_mb(),
        "device_memory_mb": device_memory() if device_memory else None,
        **extra,
    }


def _onnx_call(model_path: Path, provider: str, x: np.ndarray, threads: int | None):
    import onnxruntime as ort

    from resnet_edge.core.contract import INPUT_NAME, OUTPUT_NAME
    from resnet_edge.inference.runtime import create_session

    session = create_session(model_path, provider, threads=threads, probe=False)  # the first call is timed below
    if session.get_providers()[0] == CPU:
        feed = {INPUT_NAME: x}
        return (lambda: session.run([OUTPUT_NAME], feed)), None, session
    # GPU: input copied to the device once, output left there; only the model's work is timed.
    device = "cuda" if "CUDA" in session.get_providers()[0] or "Tensorrt" in session.get_providers()[0] else "cpu"
    binding = session.io_binding()
    binding.bind_ortvalue_input(INPUT_NAME, ort.OrtValue.ortvalue_from_numpy(x, device, 0))
    binding.bind_output(OUTPUT_NAME, device)

    def call() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    return call, _gpu_memory_mb, session


def _gpu_memory_mb() -> float | None:
    return process_gpu_memory_mb()


def _torch_call(model_path: Path, provider: str, x: np.ndarray, threads: int | None):
    import torch

    from resnet_edge.training.checkpoint import load_checkpoint, model_from_checkpoint

    if threads:
        torch.set_num_threads(threads)
    from resnet_edge.core.providers import is_cuda_device_provider

    # PyTorch runs where ONNX Runtime runs: on the GPU for CUDA and TensorRT however spelled ("CUDA" too)
    device = torch.device("cuda" if is_cuda_device_provider(provider) else "cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--provider cuda: PyTorch sees no CUDA GPU for the torch variant (use --no-torch)")
    model = model_from_checkpoint(load_checkpoint(model_path), model_path).to(device)
    xt = torch.from_numpy(x).to(device)

    def call() -> None:
        with torch.inference_mode():
            model(xt)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return call, (_gpu_memory_mb if device.type == "cuda" else None)


def _worker_main() -> None:
    """Entry of ``python -m resnet_edge.bench.worker``: one cell's JSON arguments on argv, its row on stdout."""
    args = json.loads(sys.argv[1])
    try:
        row = measure_cell(
            args["variant"],
            Path(args["model"]),
            args["provider"],
            args["batch_size"],
            args["duration"],
            args["min_runs"],
            args["warmup"],
            args["threads"],
        )
    except UserError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    print(json.dumps(row))


if __name__ == "__main__":
    _worker_main()
