"""The edge-box install: `pip install resnet-edge` without extras brings no torch, stays small, and
runs eval, bench --no-torch, predict and serve (answering Triton's HTTP client); train says in one line
what it needs. Slow: it builds a fresh virtual environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _du_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20


@pytest.fixture(scope="module")
def runtime_venv(tmp_path_factory):
    venv = tmp_path_factory.mktemp("edge") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(ROOT)], check=True)
    return venv


def test_runtime_only_install(runtime_venv, trained_run, tmp_path, mnist):
    import tritonclient.http as triton

    run, _, export = trained_run
    py, cli = runtime_venv / "bin" / "python", runtime_venv / "bin" / "resnet-edge"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    probe = subprocess.run([str(py), "-c", "import importlib.util as u; print(u.find_spec('torch') is None)"],
                           capture_output=True, text=True, env=env)
    assert probe.stdout.strip() == "True", "torch is installed in the runtime-only venv"
    size = _du_mb(runtime_venv)
    assert size <= 400, f"runtime-only venv is {size:.0f} MB"

    train = subprocess.run([str(cli), "train", "--epochs", "1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert train.returncode == 1 and train.stderr.strip().splitlines() == [
        'error: train needs PyTorch, which this install does not have: pip install "resnet-edge[train]"']

    ev = subprocess.run([str(cli), "eval", str(run / "model.int8.onnx")], capture_output=True, text=True, env=env)
    assert ev.returncode == 0 and f"{100 * export['int8']['test_accuracy']:.2f} %" in ev.stdout, ev.stderr

    png = tmp_path / "digit.png"
    Image.fromarray(mnist.test_images[0]).save(png)
    pred = subprocess.run([str(cli), "predict", str(png), "--model", str(run / "model.int8.onnx"), "--json"],
                          capture_output=True, text=True, env=env)
    assert pred.returncode == 0, pred.stderr
    assert f'"digit": {int(mnist.test_labels[0])}' in pred.stdout

    bench_dir = tmp_path / "bench"
    bench = subprocess.run([str(cli), "bench", "--run", str(run), "--no-torch", "--batch-sizes", "1", "--duration",
                            "0.05", "--min-runs", "5", "--out", str(bench_dir), "--quiet"],
                           capture_output=True, text=True, env=env)
    assert bench.returncode == 0 and (bench_dir / "bench.json").exists(), bench.stderr

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(cli), "serve", "--model", str(run / "model.int8.onnx"), "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        deadline = time.time() + 60
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if client.is_server_ready():
                    break
            except Exception:
                assert time.time() < deadline, "server never became ready"
                time.sleep(0.2)
        x = np.ascontiguousarray((mnist.test_images[:4, None] / np.float32(255)).astype(np.float32))
        inp = triton.InferInput("pixels", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=False)
        out = client.infer("resnet8", [inp], outputs=[triton.InferRequestedOutput("logits", binary_data=False)])
        assert out.as_numpy("logits").argmax(1).tolist() == mnist.test_labels[:4].tolist()
    finally:
        server.terminate()
        server.wait(timeout=30)
