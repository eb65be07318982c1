"""`package`: a run's models laid out for the serving engines that scale out, and for minimal runtimes.

Writes, from a run folder (torch-free), into one deployment folder (default ``<run>/deploy``):
- ``triton/``, a Triton model repository: ``<name>/config.pbtxt``, ``<name>/1/model.onnx`` and ``<name>/labels.txt``
  for every model of the run: FP32 (``<arch>``), INT8 (``<arch>_int8``), FP16 (``<arch>_fp16``);
  platform onnxruntime_onnx, the dynamic batch as max_batch_size (dims without the batch dimension),
  dynamic batching with a queue delay, an instance group for CPU or GPU, ONNX Runtime thread settings;
- ``kserve.yaml``: a KServe InferenceService (protocol v2, model format onnx) for that repository
  (beside it, not in it: Triton takes every folder of a repository for a model);
- ``ort/``: the models in ONNX Runtime's ORT format for minimal and mobile builds, with the
  required-operators config, each checked to give the same outputs as its .onnx.
``resnet-edge serve --repository DIR/triton`` serves the same layout.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from resnet_edge.core.config import PackageConfig
from resnet_edge.core.contract import (
    DEPLOY_DIR,
    INPUT_NAME,
    INPUT_SHAPE,
    KSERVE_FILE,
    LABELS,
    LABELS_FILE,
    MODEL_FILES,
    NUM_CLASSES,
    ORT_DIR,
    OUTPUT_NAME,
    PACKAGE_MARKER,
    TRITON_CONFIG,
    TRITON_DIR,
    TRITON_MODEL_FILE,
    VARIANT_TABLE,
)
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import write_bytes
from resnet_edge.core.names import check_name
from resnet_edge.core.providers import CPU

log = logging.getLogger(__name__)

REPOSITORY_MODEL = TRITON_MODEL_FILE
PACKAGE_ENTRIES = {PACKAGE_MARKER, TRITON_DIR, KSERVE_FILE, ORT_DIR}  # all that a package folder holds
ORT_PARITY_ATOL = 1e-5


def _pbtxt_string(value: str) -> str:
    """A string value of protobuf's text format, quoted and escaped by protobuf itself (what its text
    printer does), never by string formatting."""
    from google.protobuf import text_encoding

    return '"' + text_encoding.CEscape(value, as_utf8=False) + '"'


def triton_config(name: str, config: PackageConfig) -> str:
    """config.pbtxt (protobuf text format of Triton's ModelConfig) for one of our ONNX models. ``name``
    has passed :func:`names.check_name`, and every string goes through protobuf's own escaping too."""
    dims = ", ".join(str(d) for d in INPUT_SHAPE)
    kind = "KIND_GPU" if config.kind == "gpu" else "KIND_CPU"
    q = _pbtxt_string
    lines = [
        f"name: {q(name)}",
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {config.max_batch_size}",
        "input [",
        f"  {{ name: {q(INPUT_NAME)} data_type: TYPE_FP32 dims: [ {dims} ] }}",
        "]",
        "output [",
        f"  {{ name: {q(OUTPUT_NAME)} data_type: TYPE_FP32 dims: [ {NUM_CLASSES} ] label_filename: {q(LABELS_FILE)} }}",
        "]",
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {config.queue_delay_us}",
        "}",
        f"instance_group [ {{ count: {config.instances} kind: {kind} }} ]",
    ]
    if config.threads:
        lines.append(
            f"parameters {{ key: {q('intra_op_thread_count')} value: {{ string_value: {q(str(config.threads))} }} }}"
        )
    return "\n".join(lines) + "\n"


def kserve_manifest(arch: str, names: list[str], config: PackageConfig) -> str:
    """A KServe InferenceService for the repository, served by KServe's Triton runtime (protocol v2),
    written by a YAML emitter (values are never formatted into the text; the comment names only names
    that passed :func:`names.check_name`)."""
    import yaml

    for name in (arch, *names):
        check_name(name, "model name")
    limits: dict[str, Any] = {"cpu": "2", "memory": "2Gi"}
    if config.kind == "gpu":
        limits["nvidia.com/gpu"] = "1"
    manifest = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {"name": _dns_label("resnet-edge-" + arch)},
        "spec": {
            "predictor": {
                "model": {
                    "modelFormat": {"name": "onnx"},
                    "protocolVersion": "v2",
                    "storageUri": config.storage_uri,
                    "resources": {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": limits},
                }
            }
        },
    }
    header = (
        f"# KServe InferenceService for the Triton model repository triton/ beside this file ({', '.join(names)}).\n"
        "# Copy the contents of triton/ to the storage named below, then: kubectl apply -f kserve.yaml\n"
    )
    return header + yaml.safe_dump(manifest, sort_keys=False, default_flow_style=False, allow_unicode=False)


def _dns_label(name: str) -> str:
    """A Kubernetes object name (DNS-1035 label): lower case letters, digits and '-', at most 63."""
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:63].rstrip("-")
    return label if label and label[0].isalpha() else f"m-{label}"[:63]


def _out_dir(run_dir: Path, out_dir: Path, names: list[str]) -> tuple[Path, bool]:
    """The folder ``package`` writes (a symbolic link is followed to its folder), and whether an earlier
    package is there to replace. ``package`` replaces only what it wrote: a folder that holds nothing but
    a package (its marker file, triton/, kserve.yaml, ort/) whose triton/ holds only models it names, or
    an earlier package of this run from before the marker (triton/ holding only ``names``); an empty
    folder is used as it is. Anything else is refused, and nothing is ever deleted from it."""
    from resnet_edge.core.files import ensure_writable_dir, read_report

    out, run = out_dir.resolve(), run_dir.resolve()
    if out == run or out in run.parents:
        raise UserError(
            f"--out {out_dir}: it holds the run itself; give a folder of its own (default: <run>/{DEPLOY_DIR})"
        )
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out_dir}: a file is there, not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        ensure_writable_dir(out.parent)
        return out, False
    marker = out / PACKAGE_MARKER
    ours = marker.is_file() and not marker.is_symlink()
    written = read_report(marker) if ours else None
    known = set(names) | set(
        written.get("models", []) if isinstance(written, dict) and isinstance(written.get("models"), list) else []
    )
    entries = {p.name for p in out.iterdir()}
    triton = out / TRITON_DIR
    models = {p.name for p in triton.iterdir()} if triton.is_dir() and not triton.is_symlink() else set()
    if not (entries <= PACKAGE_ENTRIES and models <= known and (TRITON_DIR not in entries or triton.is_dir())):
        what = (
            "files that `resnet-edge package` did not write"
            if not ours
            else "files besides the package it wrote ("
            + ", ".join(sorted((entries - PACKAGE_ENTRIES) | (models - known))[:5])
            + ")"
        )
        raise UserError(
            f"--out {out_dir}: the folder holds {what}; give an empty or new folder "
            f"(a package is replaced only when the folder holds nothing else)"
        )
    ensure_writable_dir(out.parent)
    return out, True


def _ort_parity(onnx_path: Path, ort_path: Path, x: np.ndarray) -> float:
    from resnet_edge.inference.runtime import create_session

    expected = create_session(onnx_path).run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    import onnxruntime as ort  # an .ort file is not an ONNX protobuf: ONNX Runtime reads it directly

    session = ort.InferenceSession(str(ort_path), providers=[CPU])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
    diff = float(np.abs(got - expected).max())
    if got.shape != expected.shape or diff > ORT_PARITY_ATOL:
        raise UserError(
            f"{ort_path.name}: the ORT-format model differs from {onnx_path.name} (max |diff| {diff:.3g}, "
            f"tolerance {ORT_PARITY_ATOL:g}); nothing was written"
        )
    return diff


def _convert_to_ort(models: dict[str, Path], work: Path) -> dict[str, Any]:
    """ONNX Runtime's own converter, on copies named after the variant; returns parity per model."""
    src = work / "onnx"
    src.mkdir()
    for variant, path in models.items():
        shutil.copyfile(path, src / f"model.{variant}.onnx")
    out = work / "ort"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxruntime.tools.convert_onnx_models_to_ort",
            str(src),
            "--output_dir",
            str(out),
            "--optimization_style",
            "Fixed",
        ],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"ORT-format conversion failed: {tail[:200]}")
    from resnet_edge.core.mnist import load_test_split

    x = np.ascontiguousarray(load_test_split()[0][:64])
    parity = {}
    for variant in models:
        ort_path = out / f"model.{variant}.ort"
        if not ort_path.exists():
            raise UserError(f"ORT-format conversion wrote no {ort_path.name}")
        parity[variant] = _ort_parity(src / f"model.{variant}.onnx", ort_path, x)
    for leftover in out.glob("*.onnx"):
        leftover.unlink()
    return parity


def package_run(run_dir: Path, out_dir: Path, config: PackageConfig) -> dict[str, Any]:
    """Write the Triton repository (``out_dir/triton``), the KServe manifest and the ORT models for
    ``run_dir`` into ``out_dir`` (built aside and moved into place whole)."""
    from resnet_edge.inference.runtime import check_model_file
    from resnet_edge.inference.variants import check_same_checkpoint

    models = {v: run_dir / n for v, n in MODEL_FILES.items() if (run_dir / n).exists()}
    if not models:
        raise UserError(f"{run_dir}: no model to package (run `resnet-edge export --quantize` first)")
    check_same_checkpoint(run_dir)
    shown_out = out_dir
    props = {p.key: p.value for p in check_model_file(next(iter(models.values()))).metadata_props}
    arch = props.get("architecture") or run_dir.resolve().name
    where = "the model's 'architecture' metadata" if props.get("architecture") else "the run folder's name"
    check_name(arch, where)  # it becomes folder names, config values and a Kubernetes name: refused, not cleaned
    names = [arch + VARIANT_TABLE[variant].repository_suffix for variant in models]
    for name in names:
        check_name(name, f"the Triton model name made from {where}")
    out_dir, replace = _out_dir(run_dir, out_dir, names)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}-") as tmp:
        stage = Path(tmp) / "deploy"
        stage.mkdir()
        write_bytes(
            stage / PACKAGE_MARKER,
            (json.dumps({"written_by": "resnet-edge package", "run": str(run_dir), "models": names}) + "\n").encode(),
        )
        for variant, path in models.items():
            name = arch + VARIANT_TABLE[variant].repository_suffix
            model_dir = stage / TRITON_DIR / name
            (model_dir / "1").mkdir(parents=True)
            shutil.copyfile(path, model_dir / "1" / REPOSITORY_MODEL)
            write_bytes(model_dir / TRITON_CONFIG, triton_config(name, config).encode())
            write_bytes(model_dir / LABELS_FILE, ("\n".join(LABELS) + "\n").encode())
        write_bytes(stage / KSERVE_FILE, kserve_manifest(arch, names, config).encode())
        parity = _convert_to_ort(models, Path(tmp)) if config.ort else {}
        if config.ort:
            shutil.move(str(Path(tmp) / "ort"), str(stage / ORT_DIR))
        try:
            if replace:  # an earlier package, nothing else (checked above): replaced whole
                shutil.rmtree(out_dir)
            elif out_dir.exists():
                out_dir.rmdir()  # empty (checked above); fails rather than delete anything that appeared since
        except OSError as exc:
            raise UserError(
                f"--out {shown_out}: cannot replace it ({exc.strerror or exc}); nothing was written"
            ) from None
        stage.rename(out_dir)
    return {
        "repository": str(shown_out / TRITON_DIR),
        "models": names,
        "ort_parity_max_abs_diff": parity,
        "kserve": str(shown_out / KSERVE_FILE),
    }
