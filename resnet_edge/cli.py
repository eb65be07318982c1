"""The `resnet-edge` command line: each command validates its options, calls one library function and
renders the result. Heavy imports (torch, onnxruntime) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import functools
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Train a ResNet on MNIST, export it to ONNX and INT8, benchmark and serve it.")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a mistake the user can make into one line `error: ...` and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _fail(str(exc))
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130)

    return wrapper


def _version(value: bool) -> None:
    if value:
        console.print(f"resnet-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does."),
) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def _resolve_run(run: Optional[Path]) -> Path:
    from .files import latest_run

    if run is not None:
        return run
    found = latest_run()
    if found is None:
        raise UserError("no run found under exported/ (train one with `resnet-edge train`, or pass --run DIR)")
    return found


# ---------------------------------------------------------------------------------------------- train
class RichTrainReporter:
    """A progress bar per epoch with loss, images/s and time left; a line with test accuracy after it."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.quiet = quiet
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[ips]} img/s"),
                                 TimeRemainingColumn(), console=console, transient=True, disable=quiet)
        self.task = None

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        import time

        self.progress.start()
        self.images, self.t0 = 0, time.perf_counter()
        self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, loss="-", ips="-")

    def step(self, loss: float | None, images: int) -> None:
        import time

        self.images += images
        fields = {"ips": f"{self.images / max(time.perf_counter() - self.t0, 1e-9):,.0f}"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        self.progress.update(self.task, advance=1, **fields)

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.progress.remove_task(self.task)
        self.progress.stop()
        if not self.quiet:
            console.print(f"epoch {record['epoch']}: loss {record['loss']:.4f}, test accuracy "
                          f"{100 * record['test_accuracy']:.2f} %, {record['images_per_second']:,.0f} img/s, "
                          f"{record['seconds']:.1f} s", highlight=False)


@app.command("train")
@user_errors
def train_cli(
    arch: str = typer.Option("resnet8", help="Architecture (see `resnet-edge models`)."),
    epochs: int = typer.Option(4, help="Passes over the training set."),
    batch_size: int = typer.Option(128, help="Images per step."),
    lr: float = typer.Option(0.2, help="Peak learning rate (one-cycle, SGD with Nesterov momentum)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    data_dir: Optional[Path] = typer.Option(None, help="A folder with the four MNIST-format IDX files (gzip or raw); default: the bundled MNIST."),
    run: Optional[Path] = typer.Option(None, help="Run folder (default: exported/<arch>)."),
    seed: int = typer.Option(0, help="Random seed."),
    resume: bool = typer.Option(False, help="Continue the run in --run from its checkpoint."),
    augment: bool = typer.Option(True, help="Random rotation/scale/shift of each batch."),
    amp: str = typer.Option("auto", help="auto | bf16 | off: bf16 autocast (auto: CUDA, and CPUs with AMX)."),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the model (worth it on CUDA)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a ResNet on MNIST (GPU when there is one) and write checkpoint.pt and train.json."""
    from .files import ensure_writable_dir, run_dir_for
    from .train import TrainConfig, train

    config = TrainConfig(arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, device=device, seed=seed,
                         augment=augment, amp=amp, compile=compile,
                         data_dir=str(data_dir) if data_dir is not None else None)
    run_dir = run if run is not None else run_dir_for(arch)
    if resume and not (run_dir / "checkpoint.pt").exists():
        raise UserError(f"--resume: no checkpoint at {run_dir / 'checkpoint.pt'}")
    ensure_writable_dir(run_dir)
    report = train(config, run_dir, resume=resume, reporter=RichTrainReporter(quiet))
    acc = report["test_accuracy"]
    console.print(f"trained {report['arch']} ({report['params']:,} parameters) for {report['epochs_done']} epochs on "
                  f"{report['device']} in {report['seconds']:.1f} s: test accuracy "
                  f"{100 * acc:.2f} % -> {run_dir}", highlight=False)


# --------------------------------------------------------------------------------------------- models
@app.command("models")
@user_errors
def models_cli() -> None:
    """List the architectures with their parameters and compute at 1x28x28."""
    from .models import MODELS, count_macs, count_parameters, create_model

    table = Table(title="ResNet family (input 1x28x28, 10 classes)")
    for col in ("name", "family", "parameters", "MMACs", "MFLOPs"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")
    for name, spec in MODELS.items():
        model = create_model(name)
        macs = count_macs(model)
        table.add_row(name, spec.family, f"{count_parameters(model):,}", f"{macs / 1e6:,.1f}", f"{2 * macs / 1e6:,.1f}")
    console.print(table)
    console.print("MFLOPs = 2 x multiply-accumulates of convolutions and linear layers.", style="dim")
