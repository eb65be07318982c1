"""One validated config class per command: its defaults are the CLI's defaults, its checks the CLI's
checks (cli.py only maps options to these). Torch-free and light, so `--help` stays instant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from resnet_edge.core.errors import UserError

# Architecture name -> family; models.py builds exactly these. "compact": 28x28-native (3x3 stem,
# three stages); "imagenet": 7x7 stride-2 stem, max-pool, four stages.
ARCHITECTURES = {
    "resnet8": "compact",
    "resnet14": "compact",
    "resnet20": "compact",
    "resnet18": "imagenet",
    "resnet34": "imagenet",
    "resnet50": "imagenet",
    "resnet101": "imagenet",
    "resnet152": "imagenet",
}
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
VARIANTS = ("auto", "fp32", "int8", "fp16")  # which model of a run serve/predict/eval use
MIN_QUANTIZE_OPSET = 13  # per-channel QuantizeLinear/DequantizeLinear (axis) need opset 13


def check_arch(name: object) -> str:
    if not isinstance(name, str) or name not in ARCHITECTURES:
        raise UserError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    return name


def _at_least(option: str, value: float | None, low: float) -> None:
    if value is not None and not value >= low:  # also refuses NaN
        raise UserError(f"{option} must be at least {low:g}, got {value}")


def _finite(option: str, value: float) -> None:
    if not math.isfinite(value):
        raise UserError(f"{option} must be a finite number, got {value}")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Named recipes: TrainConfig's defaults, then these, then the options given (train_config).
TRAIN_RECIPES: dict[str, dict[str, object]] = {
    "default": {},
    # For a GPU: 4x the batch and half the epochs, so 1/8 of the default's steps (2,340), with the one-cycle
    # schedule matched to them (peak LR 1.5x, weight decay 2x: 3/4 of the default's decay per epoch); CUDA graphs
    # through torch.compile's reduce-overhead on one CUDA process, fused SGD, bf16 autocast, channels_last.
    # Aim: >= 99.5 % in <= 10 s of training on one H100/H200 (benchmarks/train_recipes.py); not yet measured.
    "fast": {
        "batch_size": 256,
        "epochs": 10,
        "lr": 0.3,
        "weight_decay": 1e-3,
        "warmup_fraction": 0.2,
        "compile": None,
        "compile_mode": "reduce-overhead",
    },
}


def train_config(recipe: str = "default", **options: object) -> TrainConfig:
    """The recipe's settings, overridden by every option that is not None (the CLI's "not given")."""
    if recipe not in TRAIN_RECIPES:
        raise UserError(f"--recipe must be one of {', '.join(TRAIN_RECIPES)}, got {recipe!r}")
    settings = {**TRAIN_RECIPES[recipe], **{k: v for k, v in options.items() if v is not None}}
    return TrainConfig(recipe=recipe, **settings)  # type: ignore[arg-type]


@dataclass
class TrainConfig:
    arch: str = "resnet8"  # a name from ARCHITECTURES
    epochs: int = 20  # full passes over the training set
    batch_size: int = 64
    lr: float = 0.2  # peak learning rate of the one-cycle schedule (SGD, Nesterov momentum)
    momentum: float = 0.9
    weight_decay: float = 5e-4  # on conv/linear weights only, not on BatchNorm or biases
    label_smoothing: float = 0.05
    warmup_fraction: float = 0.2  # share of the steps spent ramping the learning rate up
    augment: bool = True  # random rotation / scale / shift per batch, on the device
    clean_epochs: int = 1  # last epochs without augmentation, so the model ends on the test distribution
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    amp: str = "auto"  # auto | bf16 | off: bf16 autocast (auto: on CUDA only; fp32 measured faster on CPU)
    channels_last: bool = True
    compile: bool | None = False  # torch.compile the model; None: only on CUDA with one process (the fast recipe)
    compile_mode: str = "default"  # torch.compile's mode (COMPILE_MODES); reduce-overhead: CUDA graphs
    data_dir: str | None = None  # an MNIST-format folder; None: the bundled MNIST
    recipe: str = "default"  # the TRAIN_RECIPES entry these settings started from (recorded in train.json)
    sync_bn: bool = False  # data-parallel: BatchNorm statistics of the global batch, not of each rank's slice
    dist_timeout: float = 600.0  # seconds any collective may wait for the other ranks before the job fails
    train_limit: int | None = None  # only the first N training images (tests, rehearsals); None: all
    test_limit: int | None = None  # only the first N test images; None: all

    def __post_init__(self) -> None:
        check_arch(self.arch)
        _at_least("--epochs", self.epochs, 1)
        _at_least("--batch-size", self.batch_size, 1)
        if self.recipe not in TRAIN_RECIPES:
            raise UserError(f"--recipe must be one of {', '.join(TRAIN_RECIPES)}, got {self.recipe!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise UserError(f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        _finite("--dist-timeout", self.dist_timeout)
        _at_least("--dist-timeout", self.dist_timeout, 1)
        _at_least("--train-limit", self.train_limit, 1)
        _at_least("--test-limit", self.test_limit, 1)
        if not self.lr > 0:  # an infinite one is allowed: it is how the tests provoke a non-finite loss
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        _at_least("clean_epochs", self.clean_epochs, 0)
        if self.amp not in ("auto", "bf16", "off"):
            raise UserError(f"--amp must be auto, bf16 or off, got {self.amp!r}")


@dataclass
class QuantizationConfig:
    calibration_size: int = 512  # training images the activation ranges are calibrated on
    method: str = "minmax"  # minmax | entropy | percentile
    # "portable" (uint8 activations, int8 weights in [-64, 64]) by default: its accuracy is the same on
    # every CPU, since no int8 kernel can saturate on it (see int8.py). uint8 activations because ONNX
    # Runtime's x86 kernels fuse every QDQ Conv of our models into QLinearConv only with them
    # (benchmarks/int8_schemes.py: with int8 activations 3 of resnet8's 9 convolutions, 0.41x FP32).
    scheme: str = "portable"  # portable | vnni | s8s8 (int8.SCHEMES)
    per_channel: bool = True  # one weight scale per output channel
    max_accuracy_drop: float = 0.1  # points of test accuracy INT8 may lose against FP32
    # percent of test images on which INT8's digit must be FP32's: every case of benchmarks/int8_quality.py
    # reached 99.55-99.94 % with the search (MNIST and the three harder datasets, resnet8; AMD EPYC, AVX2)
    min_agreement: float = 99.5
    search: bool = True  # try the other calibrations too, and keep the best quantized model, before any float fallback
    selection_size: int = 2000  # training images (not the calibration's) the search chooses on
    calibration_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        from resnet_edge.core.int8 import scheme

        if self.method not in CALIBRATION_METHODS:
            raise UserError(
                f"--calibration-method must be one of {', '.join(CALIBRATION_METHODS)}, got {self.method!r}"
            )
        _at_least("--calibration-size", self.calibration_size, 1)
        scheme(self.scheme)  # validates the name
        _at_least("--max-accuracy-drop", self.max_accuracy_drop, 0)
        _finite("--min-agreement", self.min_agreement)
        if not 0 <= self.min_agreement <= 100:
            raise UserError(f"--min-agreement is a percentage of test images, 0-100, got {self.min_agreement:g}")
        _at_least("--selection-size", self.selection_size, 1)

    @property
    def activation_type(self) -> str:
        from resnet_edge.core.int8 import scheme

        return scheme(self.scheme).activation_type


@dataclass
class ExportConfig:
    opset: int = 18
    quantize: bool = False
    quantization: QuantizationConfig | None = None  # None: QuantizationConfig() when quantizing
    fp16: bool = False  # also write model.fp16.onnx (the GPU variant)

    def __post_init__(self) -> None:
        if not 7 <= self.opset <= 25:
            raise UserError(f"--opset must be between 7 and 25, got {self.opset}")
        if self.quantize and self.opset < MIN_QUANTIZE_OPSET:
            raise UserError(
                f"--quantize needs --opset {MIN_QUANTIZE_OPSET} or later (per-channel INT8), got {self.opset}"
            )
        if self.quantize and self.quantization is None:
            self.quantization = QuantizationConfig()


@dataclass
class EvalConfig:
    provider: str = "cpu"
    batch_size: int = 500  # images per inference call
    variant: str = "auto"  # auto | fp32 | int8 | fp16 | all (the checkpoint and every model)
    data_dir: Path | None = None

    def __post_init__(self) -> None:
        _at_least("--batch-size", self.batch_size, 1)
        if self.variant not in (*VARIANTS, "all"):
            raise UserError(f"--variant must be one of {', '.join((*VARIANTS, 'all'))}, got {self.variant!r}")


@dataclass
class BenchConfig:
    provider: str = "cpu"  # cpu | cuda | any ONNX Runtime provider name
    batch_sizes: tuple[int, ...] = (1, 8, 64, 256)
    duration: float = 1.0  # timed seconds per cell and repeat
    repeats: int = 3  # interleaved sweeps: each cell measured this many times, in alternating order
    min_runs: int = 100  # timed runs per cell and repeat, whatever the duration
    warmup: int = 20  # untimed runs per cell (and at least 0.2 s)
    threads: int | None = None  # intra-op threads (ONNX Runtime and torch); None: the runtime's default
    torch: bool = True  # measure PyTorch eager too
    fp16: bool | None = None  # measure model.fp16.onnx; None: on GPU providers only (ORT's CPU FP16 kernels are slow)

    @property
    def measures_fp16(self) -> bool:
        if self.fp16 is not None:
            return self.fp16
        from resnet_edge.core.providers import is_cpu_provider

        return not is_cpu_provider(self.provider)

    def __post_init__(self) -> None:
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise UserError(f"--batch-sizes must be positive integers, got {self.batch_sizes}")
        if not self.duration > 0 or not math.isfinite(self.duration):
            raise UserError(f"--duration must be a positive number of seconds, got {self.duration}")
        _at_least("--min-runs", self.min_runs, 1)
        _at_least("--repeats", self.repeats, 1)
        _at_least("--threads", self.threads, 1)


@dataclass
class ServerConfig:
    model_path: Path | None = None  # chosen by the CLI from --run/--variant or --model
    model_name: str | None = None  # the name in the URLs; None: the architecture in the model's metadata
    provider: str = "cpu"
    threads: int | None = None
    instances: int = 1  # ONNX Runtime calls (batches) at once
    max_batch_size: int = 64  # rows per ONNX Runtime call; a larger request is split into batches
    max_delay_ms: float = 0.0  # how long a batch waits for company once an instance is free (0: Triton's default)
    max_queue: int = 4096  # images (rows) accepted and not answered yet; beyond this: 503
    max_body_bytes: int = 8 * 2**20  # one request body; larger: 413
    max_pending_bytes: int = 256 * 2**20  # request bodies in flight together; beyond this: 503
    max_connections: int = 1000  # connections and requests at once (uvicorn's limit_concurrency); beyond: 503
    client_timeout: float = 10.0  # seconds for a client to send its headers, and again its body
    host: str = "127.0.0.1"
    port: int = 8000
    grpc_port: int = 0  # GRPCInferenceService; 0: no gRPC
    metrics_port: int = 0  # /metrics on a port of its own too (as Triton's :8002); 0: on --port only
    metrics: bool = True  # Prometheus metrics (--no-metrics: none, and /metrics is 404; statistics stay)
    repository: Path | None = None  # a Triton-layout model repository: every model in it (model_name: only that one)
    model_control: str = "none"  # none | explicit: whether /v2/repository/models/{name}/load and /unload are allowed

    def __post_init__(self) -> None:
        _at_least("--max-batch-size", self.max_batch_size, 1)
        _finite("--max-delay-ms", self.max_delay_ms)
        _at_least("--max-delay-ms", self.max_delay_ms, 0)
        _at_least("--max-body-bytes", self.max_body_bytes, 1024)
        _at_least("--max-queue", self.max_queue, 1)
        if self.max_queue < self.max_batch_size:
            raise UserError(
                f"--max-queue ({self.max_queue} images) must be at least --max-batch-size ({self.max_batch_size})"
            )
        _at_least("--max-pending-bytes", self.max_pending_bytes, self.max_body_bytes)
        _at_least("--max-connections", self.max_connections, 1)
        _finite("--client-timeout", self.client_timeout)
        _at_least("--client-timeout", self.client_timeout, 0.1)
        _at_least("--threads", self.threads, 1)
        _at_least("--instances", self.instances, 1)
        for option, port in (
            ("--port", self.port),
            ("--grpc-port", self.grpc_port),
            ("--metrics-port", self.metrics_port),
        ):
            if not 0 <= port <= 65535:
                raise UserError(f"{option} must be 0-65535, got {port}")
        if self.grpc_port and self.grpc_port == self.port:
            raise UserError(f"--grpc-port must differ from --port ({self.port})")
        if self.model_control not in MODEL_CONTROL:
            raise UserError(f"--model-control must be one of {', '.join(MODEL_CONTROL)}, got {self.model_control!r}")
        if self.model_control == "explicit" and self.repository is None:
            raise UserError("--model-control explicit loads and unloads models of a --repository; give one")
        if self.metrics_port and not self.metrics:
            raise UserError("--metrics-port serves the metrics that --no-metrics turns off; give one of them")
        if self.metrics_port and self.metrics_port in (self.port, self.grpc_port):
            raise UserError(f"--metrics-port must differ from --port and --grpc-port, got {self.metrics_port}")


MODEL_CONTROL = ("none", "explicit")  # Triton's --model-control-mode names (poll is not offered)


@dataclass
class PackageConfig:
    max_batch_size: int = 64
    queue_delay_us: int = 2000  # Triton's max_queue_delay_microseconds
    kind: str = "cpu"  # cpu | gpu: Triton's instance_group kind
    instances: int = 1
    threads: int = 0  # ONNX Runtime intra-op threads per instance; 0: ONNX Runtime's default
    storage_uri: str = "pvc://resnet-edge/model_repository"
    ort: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "gpu"):
            raise UserError(f"--kind must be cpu or gpu, got {self.kind!r}")
        for option, value, low in (
            ("--max-batch-size", self.max_batch_size, 1),
            ("--queue-delay-us", self.queue_delay_us, 0),
            ("--instances", self.instances, 1),
            ("--threads", self.threads, 0),
        ):
            _at_least(option, value, low)


def check_resume_epochs(run_dir: Path, epochs: int) -> None:
    """--resume continues the saved recipe (its one-cycle schedule is fixed by the epoch count)."""
    from resnet_edge.core.contract import TRAIN_REPORT
    from resnet_edge.core.files import read_report

    report = read_report(run_dir / TRAIN_REPORT)
    saved = report.get("epochs") if isinstance(report, dict) else None
    if isinstance(saved, int) and saved != epochs:
        raise UserError(
            f"--resume continues the saved recipe of {saved} epochs (its learning-rate schedule is "
            f"fixed by it), not --epochs {epochs}; train a new run with --run DIR for {epochs} epochs"
        )


def check_processes(config: TrainConfig, nproc: int, environ: dict[str, str] | None = None) -> None:
    """--nproc against the global batch and against a torchrun launch."""
    import os

    environ = dict(os.environ) if environ is None else environ
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if config.batch_size % nproc:
        raise UserError(
            f"--batch-size {config.batch_size} is the global batch; "
            f"it must divide evenly among --nproc {nproc} processes"
        )
    if nproc > 1 and "WORLD_SIZE" in environ:
        raise UserError(
            "--nproc starts its own processes; under torchrun leave it out (torchrun's --nproc-per-node says how many)"
        )
