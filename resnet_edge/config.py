"""The training recipe: a small validated dataclass whose defaults the CLI shows (no torch import here)."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import UserError


@dataclass
class TrainConfig:
    arch: str = "resnet8"  # a name from models.MODELS
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
    compile: bool = False  # torch.compile the model (CUDA)
    data_dir: str | None = None  # an MNIST-format folder; None: the bundled MNIST

    def __post_init__(self) -> None:
        from .models import MODELS  # imports torch; only a run that trains gets here

        if self.arch not in MODELS:
            raise UserError(f"unknown architecture {self.arch!r}; choose one of {', '.join(MODELS)}")
        if self.epochs < 1:
            raise UserError(f"--epochs must be at least 1, got {self.epochs}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if not self.lr > 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.clean_epochs < 0:
            raise UserError(f"clean_epochs must be >= 0, got {self.clean_epochs}")
        if self.amp not in ("auto", "bf16", "off"):
            raise UserError(f"--amp must be auto, bf16 or off, got {self.amp!r}")
