"""NVIDIA Triton Inference Server as a peer of `resnet-edge serve` in serve_peers.py, run without a container.

`nvidia-pytriton` (PyPI) bundles a tritonserver build (2.51 in PyTriton 0.7.0) with its Python backend:
Triton's C++ HTTP and gRPC front ends and its dynamic batcher take the requests, and each batch goes
through the Python backend's stub process to a Python function bound with PyTriton, here an ONNX Runtime
InferenceSession on our .onnx model. Triton's own ONNX Runtime backend (C++, no Python on the path) is
NOT in the wheel; it ships in NVIDIA's container images, which these machines cannot run. So this peer is
Triton's front ends + batcher + Python backend + ONNX Runtime's Python API, not Triton's fastest
configuration for an ONNX model.

The model as Triton sees it: "m", input `pixels` UINT8 [784] with batching (max_batch_size 64: a request
is [n, 784], as serve_loadgen sends [1, 784]), output `logits` FP32 [10]; pixels are scaled to [0, 1]
and reshaped to [n, 1, 28, 28] before ONNX Runtime, as `serve` does.

PyTriton needs numpy < 2, so it gets its own virtual environment (ensure_venv; never ours, never in the
repository). Two facts about this wheel on these machines: the Python backend's stub may load the
system's libpython instead of the venv's (the model then fails with "'_thread.RLock' object has no
attribute '_recursion_count'"), so LD_LIBRARY_PATH starts with the running interpreter's LIBDIR; and a
server started in the background ignores SIGINT, so SIGTERM stops it here (Triton.stop(): tritonserver,
the stubs, the workspace).

Used two ways: serve_peers.py imports ensure_venv() and command() (with our venv's Python, no PyTriton
there); serve_peers.py then runs this file with the Triton venv's Python to serve:

    /tmp/peers/triton/bin/python benchmarks/triton_peer.py --model exported/resnet8/model.int8.onnx \
        --http-port 8000 --grpc-port 8001 --workspace /tmp/triton-ws
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

PYTRITON_VERSION = "0.7.0"
# The processes of a Triton served by this file, by name (as serve_loadgen.cpu_by_process keys them): this file's
# process (ONNX Runtime and PyTriton's proxy), PyTriton's tensor store (a multiprocessing manager process handing out
# the shared-memory blocks that carry inputs and outputs), the Python backend's stub, and tritonserver (HTTP, gRPC,
# dynamic batcher, Python backend).
PROCESSES = {
    "python": "PyTriton+ONNX Runtime",
    "python3": "PyTriton tensor store",
    "triton_python_backend_stub": "Python backend stub",
    "tritonserver": "tritonserver",
}


def ensure_venv(venv: Path, version: str = PYTRITON_VERSION) -> Path:
    """The Python of a virtual environment with nvidia-pytriton==``version``, numpy < 2 and onnxruntime,
    created (pip) unless it has them already."""
    python = venv / "bin" / "python"
    check = [
        str(python),
        "-c",
        "import importlib.metadata as m, onnxruntime, numpy; "
        f"assert m.version('nvidia-pytriton') == '{version}' and numpy.__version__ < '2'",
    ]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"nvidia-pytriton=={version}", "numpy<2", "onnxruntime"], check=True
    )
    return python


def command(
    python: Path,
    model: Path,
    http: int,
    grpc: int,
    workspace: Path,
    delay_us: int,
    instances: int,
    threads: int,
    max_batch_size: int = 64,
    http_threads: int = 0,
) -> list[str]:
    """The command line that serves ``model`` with Triton on ``http`` and ``grpc`` (127.0.0.1)."""
    return [
        str(python),
        str(Path(__file__).resolve()),
        "--model",
        str(model.resolve()),
        "--http-port",
        str(http),
        "--grpc-port",
        str(grpc),
        "--workspace",
        str(workspace),
        "--delay-us",
        str(delay_us),
        "--instances",
        str(instances),
        "--threads",
        str(threads),
        "--max-batch-size",
        str(max_batch_size),
        "--http-threads",
        str(http_threads),
    ]


def serve(args: argparse.Namespace) -> None:
    """Triton with the model bound, until SIGTERM (or SIGINT)."""
    import sysconfig

    libdir = sysconfig.get_config_var("LIBDIR")  # the stub must load this interpreter's libpython
    os.environ["LD_LIBRARY_PATH"] = ":".join(p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p)

    import numpy as np
    import onnxruntime as ort
    from pytriton.decorators import batch
    from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    def instance():
        options = ort.SessionOptions()
        if args.threads:
            options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])

        @batch
        def infer(pixels: np.ndarray) -> dict:
            x = pixels.reshape(-1, 1, 28, 28).astype(np.float32) * np.float32(1 / 255)
            return {"logits": session.run(["logits"], {"pixels": x})[0]}

        return infer

    def on_term(*_):
        raise KeyboardInterrupt  # Triton.serve() stops the server and cleans the workspace on it

    signal.signal(signal.SIGTERM, on_term)
    config = TritonConfig(
        http_address="127.0.0.1",
        http_port=args.http_port,
        grpc_address="127.0.0.1",
        grpc_port=args.grpc_port,
        allow_metrics=False,
        log_verbose=0,
        **({"http_thread_count": args.http_threads} if args.http_threads else {}),
    )
    # statistics (/v2/models/m/stats, for the batch sizes) open without a token: this server is on 127.0.0.1
    triton = Triton(
        config=config, workspace=args.workspace, security_config=TritonSecurityConfig(restricted_endpoints=[])
    )
    try:
        triton.bind(
            model_name="m",
            infer_func=[instance() for _ in range(args.instances)],
            inputs=[Tensor(name="pixels", dtype=np.uint8, shape=(784,))],
            outputs=[Tensor(name="logits", dtype=np.float32, shape=(10,))],
            config=ModelConfig(
                max_batch_size=args.max_batch_size, batcher=DynamicBatcher(max_queue_delay_microseconds=args.delay_us)
            ),
        )
        triton.serve()
    except KeyboardInterrupt:
        pass
    finally:
        triton.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--http-port", type=int, required=True)
    p.add_argument("--grpc-port", type=int, required=True)
    p.add_argument(
        "--workspace", required=True, help="a folder that does not exist yet (PyTriton makes and removes it)"
    )
    p.add_argument("--delay-us", type=int, default=0, help="dynamic batcher's max_queue_delay_microseconds")
    p.add_argument("--instances", type=int, default=1, help="model instances (each its stub and ONNX Runtime session)")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads per instance (0: its default)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--http-threads", type=int, default=0, help="Triton's HTTP threads (0: Triton's default)")
    serve(p.parse_args())


if __name__ == "__main__":
    main()
