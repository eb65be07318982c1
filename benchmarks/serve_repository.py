"""Several models in one `resnet-edge serve --repository`, under a mixed load: every request's digit checked.

The repository is what `resnet-edge package` writes for each --run, merged into one folder and cut to
--models (default resnet8, resnet8_int8 and resnet18_int8: FP32 and INT8 side by side, two architectures).
The expected digits come from the files themselves, as `predict` and `eval` run them: for the tensor
protocols the argmax of ONNX Runtime on the same test images (UINT8 pixels scaled as the server scales
them), for /v1/predict `resnet-edge predict --json` on the same PNG files. Then --clients closed-loop
clients for --seconds, each taking the next (model, protocol) of a shuffled mix of every model with
json, binary, grpc and predict, one image a request; a request that does not answer 200 with the
expected digit is an error. Reported per model and protocol: requests, errors, req/s, p50 and p99; and
the server's RSS before and after. The digits are the point here; the load generator (httpx and
grpc.aio, checking every answer) is not the light one of serve_loadgen.py, so req/s here are not for
comparing with the other serving figures.

    python benchmarks/serve_repository.py --run exported/resnet8 --run exported/resnet18 \
        --out benchmarks/results/cpu/serve_repository

Runs: `resnet-edge train --arch resnet18 --epochs 1 && resnet-edge export --quantize` makes
exported/resnet18 (as the README's commands make exported/resnet8).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from serve_loadgen import free_port, machine_line, save_report, stop, wait_ready  # noqa: E402

from resnet_edge.core.machine import machine  # noqa: E402

PROTOCOLS = ("json", "binary", "grpc", "predict")


def build_repository(runs: list[Path], models: list[str], work: Path) -> Path:
    """`resnet-edge package` for each run, the --models folders of their triton/ merged into one."""
    repo = work / "repository"
    repo.mkdir()
    for run in runs:
        out = work / f"deploy-{run.name}"
        subprocess.run([sys.executable, "-m", "resnet_edge", "package", "--run", str(run), "--out", str(out)],
                       check=True, capture_output=True, text=True)
        for folder in (out / "triton").iterdir():
            if folder.name in models:
                shutil.copytree(folder, repo / folder.name)
    missing = set(models) - {p.name for p in repo.iterdir()}
    if missing:
        raise SystemExit(f"no run gave {', '.join(sorted(missing))}")
    return repo


def expected_digits(repo: Path, models: list[str], images: np.ndarray, pngs: list[Path]) -> dict:
    """Per model: the tensor protocols' digits (ONNX Runtime on the file) and /v1/predict's (`predict`)."""
    from resnet_edge.inference.runtime import create_session

    expected = {}
    pixels = (images.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28)
    for name in models:
        path = repo / name / "1" / "model.onnx"
        logits = create_session(path, "cpu").run(["logits"], {"pixels": pixels})[0]
        out = subprocess.run([sys.executable, "-m", "resnet_edge", "predict", *map(str, pngs), "--model", str(path),
                              "--json"], check=True, capture_output=True, text=True).stdout
        answers = json.loads(out)
        answers = answers if isinstance(answers, list) else [answers]
        expected[name] = {"tensor": logits.argmax(1).tolist(), "predict": [a["digit"] for a in answers]}
    return expected


def write_pngs(images: np.ndarray, folder: Path) -> list[Path]:
    from PIL import Image

    folder.mkdir()
    paths = []
    for i, img in enumerate(images):
        paths.append(folder / f"{i}.png")
        Image.fromarray(img.reshape(28, 28)).save(paths[-1])
    return paths


async def client(mix, http, grpc_stub, images, pngs, expected, stop_at, tally):
    from resnet_edge.serving.proto import messages

    i = random.randrange(len(mix))
    while time.perf_counter() < stop_at:
        model, protocol = mix[i % len(mix)]
        k = i % len(images)
        i += 1
        t0 = time.perf_counter()
        try:
            if protocol == "predict":
                r = await http.post(f"/v1/predict?model={model}", content=pngs[k])
                digit = r.json()["digit"] if r.status_code == 200 else f"HTTP {r.status_code}: {r.text[:200]}"
                want = expected[model]["predict"][k]
            elif protocol == "grpc":
                request = messages()["ModelInferRequest"](model_name=model)
                request.inputs.add(name="pixels", datatype="UINT8", shape=[1, 784])
                request.raw_input_contents.append(images[k].tobytes())
                answer = await grpc_stub(request.SerializeToString(), timeout=30)
                response = messages()["ModelInferResponse"].FromString(answer)
                digit = int(np.frombuffer(response.raw_output_contents[0], "<f4").argmax())
                want = expected[model]["tensor"][k]
            else:
                tensor = {"name": "pixels", "datatype": "UINT8", "shape": [1, 784]}
                if protocol == "json":
                    r = await http.post(f"/v2/models/{model}/infer",
                                        json={"inputs": [{**tensor, "data": images[k].tolist()}]})
                    digit = (int(np.argmax(r.json()["outputs"][0]["data"])) if r.status_code == 200
                             else f"HTTP {r.status_code}: {r.text[:200]}")
                else:
                    head = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 784}}],
                                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
                    r = await http.post(f"/v2/models/{model}/infer", content=head + images[k].tobytes(),
                                        headers={"inference-header-content-length": str(len(head))})
                    n = int(r.headers.get("inference-header-content-length", 0))
                    digit = (int(np.frombuffer(r.content[n:], "<f4").argmax()) if r.status_code == 200
                             else f"HTTP {r.status_code}: {r.text[:200]}")
                want = expected[model]["tensor"][k]
        except Exception as exc:  # a transport error is an error of the run, kept with its kind
            digit, want = f"{type(exc).__name__}: {str(exc)[:200]}", None
        cell = tally.setdefault(f"{model} {protocol}", {"latencies": [], "errors": []})
        if digit == want:
            cell["latencies"].append(time.perf_counter() - t0)
        else:
            cell["errors"].append(f"image {k}: got {digit}, expected {want}")


async def load(models, clients, seconds, port, grpc_port, images, pngs, expected):
    import grpc
    import httpx

    mix = [(m, p) for m in models for p in PROTOCOLS]
    random.Random(0).shuffle(mix)
    png_bytes = [p.read_bytes() for p in pngs]
    tally: dict = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=30) as http, \
            grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                   request_serializer=lambda b: b, response_deserializer=lambda b: b)
        started = time.perf_counter()
        await asyncio.gather(*(client(mix, http, stub, images, png_bytes, expected, started + seconds, tally)
                               for _ in range(clients)))
        elapsed = time.perf_counter() - started
    return tally, elapsed


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, action="append", required=True, help="A run folder (repeatable).")
    parser.add_argument("--models", default="resnet8,resnet8_int8,resnet18_int8")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/cpu/serve_repository"))
    args = parser.parse_args()
    models = args.models.split(",")
    from serve_loadgen import test_images

    images = test_images(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        repo = build_repository(args.run, models, work)
        pngs = write_pngs(images, work / "png")
        expected = expected_digits(repo, models, images, pngs)
        port, grpc_port = free_port(), free_port()
        log = work / "serve.log"
        proc = subprocess.Popen([sys.executable, "-m", "resnet_edge", "serve", "--repository", str(repo), "--port",
                                 str(port), "--grpc-port", str(grpc_port)], stdout=log.open("w"),
                                stderr=subprocess.STDOUT)
        try:
            for m in models:
                wait_ready(proc, f"http://127.0.0.1:{port}/v2/models/{m}/ready", lambda: log.read_text()[-2000:])
            rss_before = rss_mb(proc.pid)
            tally, elapsed = asyncio.run(load(models, args.clients, args.seconds, port, grpc_port, images, pngs,
                                              expected))
            rss_after = rss_mb(proc.pid)
            announced = log.read_text().strip().splitlines()
        finally:
            stop([proc])
    cells = {}
    for key, cell in sorted(tally.items()):
        lat = np.array(cell["latencies"]) * 1e3
        cells[key] = {"ok": len(lat), "errors": len(cell["errors"]), "first_errors": cell["errors"][:5],
                      "req_s": len(lat) / elapsed, "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
                      "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None}
    report = {"machine": machine(), "models": models, "clients": args.clients, "seconds": elapsed,
              "images": args.images, "rss_mb": {"before": rss_before, "after": rss_after}, "cells": cells,
              "total_ok": sum(c["ok"] for c in cells.values()), "total_errors": sum(c["errors"] for c in cells.values()),
              "server_said": announced}
    lines = [f"# Several models in one server ({', '.join(models)})", "",
             f"Machine: {machine_line(report['machine'])}. `python benchmarks/serve_repository.py "
             f"{' '.join('--run ' + str(r) for r in args.run)} --clients {args.clients} --seconds {args.seconds:g}`.",
             f"{args.clients} clients for {elapsed:.1f} s, each request one of {args.images} test images, its "
             "digit checked against the model file's own (ONNX Runtime for the tensors, `predict` for "
             "/v1/predict); server RSS {:.0f} MB before the load, {:.0f} MB after.".format(rss_before, rss_after),
             "", f"**{report['total_ok']:,} requests with the expected digit, {report['total_errors']} errors.**", "",
             "| model | protocol | requests | errors | req/s | p50 ms | p99 ms |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, c in cells.items():
        model, protocol = key.split()
        lines.append(f"| {model} | {protocol} | {c['ok']:,} | {c['errors']} | {c['req_s']:.0f} | "
                     f"{c['p50_ms'] or 0:.1f} | {c['p99_ms'] or 0:.1f} |")
    cpu = (report["machine"].get("cpu") or "cpu").lower().replace(" ", "-")[:40]
    save_report(args.out, f"serve_repository-{cpu}", report, "\n".join(lines) + "\n")
    print("\n".join(lines))
    if report["total_errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
