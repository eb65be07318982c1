"""The one home of the model contract and of a run folder's files. Torch-free; everything reads it.

The ONNX contract: one input ``pixels``, float32 [batch, 1, 28, 28], grayscale intensities in [0, 1]
(white digit on black, as MNIST); normalization is inside the graph. One output ``logits``, float32
[batch, 10], whose argmax is the digit. The batch dimension is dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ------------------------------------------------------------------------------------------ tensors
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
CHANNELS = 1
IMAGE_SIZE = 28
IMAGE_PIXELS = IMAGE_SIZE * IMAGE_SIZE
INPUT_SHAPE = (CHANNELS, IMAGE_SIZE, IMAGE_SIZE)  # after the batch dimension
NUM_CLASSES = 10
LABELS = tuple(str(i) for i in range(NUM_CLASSES))
BATCH_DIM = "batch"
INPUT_DTYPE = np.float32
# MNIST's training-set pixel statistics (fractions of 255), the default normalization of a new model.
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


def to_pixels(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, 28, 28] (or [N, 784], or [N, 1, 28, 28]) -> the model input, float32
    [N, 1, 28, 28] in [0, 1]. The one place where 0-255 becomes 0-1."""
    images = np.asarray(images)
    return images.reshape(len(images), *INPUT_SHAPE).astype(INPUT_DTYPE) / np.float32(255.0)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def digit_prediction(logits_row: np.ndarray) -> dict[str, object]:
    """One image's logits -> {"digit", "probabilities"}: what predict and /v1/predict answer."""
    probs = softmax(np.asarray(logits_row, dtype=np.float64).reshape(NUM_CLASSES))
    return {"digit": int(probs.argmax()), "probabilities": [round(float(p), 6) for p in probs]}


# ------------------------------------------------------------------------------------------ run folder
@dataclass(frozen=True)
class Artifact:
    name: str  # file name inside the run folder
    stage: str  # the command that writes it
    what: str


ARTIFACTS = {
    "checkpoint": Artifact("checkpoint.pt", "train", "weights, config, optimizer, scheduler, RNG states, epoch"),
    "train_report": Artifact("train.json", "train", "recipe, per-epoch history, test accuracy, machine"),
    "fp32": Artifact("model.onnx", "export", "FP32 ONNX model, parity-checked against PyTorch"),
    "int8": Artifact("model.int8.onnx", "export --quantize", "static INT8 (QDQ) model, accuracy-guarded"),
    "fp16": Artifact(
        "model.fp16.onnx", "export --fp16", "FP16 model for GPUs (float32 in and out), checked against FP32"
    ),
    "export_report": Artifact("export.json", "export", "parity, accuracy, agreement, sizes, INT8 scheme, machine"),
    "bench_json": Artifact("bench.json", "bench", "every cell, ratios, recommendation, machine"),
    "bench_md": Artifact("bench.md", "bench", "the same as a Markdown report"),
    "bench_png": Artifact("bench.png", "bench", "latency and throughput plot"),
    "deploy": Artifact(
        "deploy", "package", "folder: Triton repository (triton/), kserve.yaml, ORT-format models (ort/)"
    ),
}
CHECKPOINT = ARTIFACTS["checkpoint"].name
TRAIN_REPORT = ARTIFACTS["train_report"].name
FP32_MODEL = ARTIFACTS["fp32"].name
INT8_MODEL = ARTIFACTS["int8"].name
FP16_MODEL = ARTIFACTS["fp16"].name
EXPORT_REPORT = ARTIFACTS["export_report"].name
BENCH_JSON = ARTIFACTS["bench_json"].name
BENCH_MD = ARTIFACTS["bench_md"].name
BENCH_PNG = ARTIFACTS["bench_png"].name
DEPLOY_DIR = ARTIFACTS["deploy"].name


# ------------------------------------------------------------------------------------------ variants
@dataclass(frozen=True)
class Variant:
    """A deployable model of a run. The one table of variant names: --variant, export.json's section,
    the run-folder file, bench.json's name, and the suffix of its model in a Triton repository."""

    key: str  # --variant and export.json's section: fp32 | int8 | fp16
    file: str  # in the run folder
    bench: str  # bench.json's variant name
    repository_suffix: str  # package writes <arch><suffix>/ into triton/
    export_flag: str  # the `export` option that writes it


VARIANT_TABLE = {
    "fp32": Variant("fp32", FP32_MODEL, "onnx-fp32", "", ""),
    "int8": Variant("int8", INT8_MODEL, "onnx-int8", "_int8", "--quantize"),
    "fp16": Variant("fp16", FP16_MODEL, "onnx-fp16", "_fp16", "--fp16"),
}
TORCH = "torch"  # bench.json's name for the PyTorch checkpoint (eager)
BENCH_FP32, BENCH_INT8, BENCH_FP16 = (VARIANT_TABLE[k].bench for k in ("fp32", "int8", "fp16"))
BENCH_VARIANTS = (TORCH, BENCH_FP32, BENCH_INT8, BENCH_FP16)
MODEL_FILES = {k: v.file for k, v in VARIANT_TABLE.items()}  # deployable variants
# Inside deploy/ (written by `package`): a Triton repository, a KServe manifest, ORT-format models.
TRITON_DIR = "triton"
TRITON_CONFIG = "config.pbtxt"
TRITON_MODEL_FILE = "model.onnx"  # what Triton's onnxruntime_onnx platform loads from <model>/<version>/
LABELS_FILE = "labels.txt"
KSERVE_FILE = "kserve.yaml"
PACKAGE_MARKER = ".resnet-edge-package"  # `package` writes it into its folder: only such a folder is ever replaced
ORT_DIR = "ort"
