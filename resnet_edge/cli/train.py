"""`train` and `models`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from resnet_edge.cli.app import app
from resnet_edge.cli.console import console, err_console, need_torch, user_errors
from resnet_edge.core.config import TrainConfig, check_processes, check_resume_epochs
from resnet_edge.core.contract import CHECKPOINT
from resnet_edge.core.errors import UserError


class RichTrainReporter:
    """A progress bar per epoch with loss, images/s and time left; a line with test accuracy after it."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn

        self.quiet = quiet
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("train acc {task.fields[acc]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
            disable=quiet,
        )
        self.task = TaskID(-1)
        self.images, self.t0 = 0, 0.0
        self.last_epoch = 0  # the last epoch saved, for the message after Ctrl-C

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        self.progress.start()
        self.images, self.t0 = 0, time.perf_counter()
        self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, loss="-", acc="-", ips="-")

    def step(self, loss: float | None, accuracy: float | None, images: int) -> None:
        self.images += images
        fields = {"ips": f"{self.images / max(time.perf_counter() - self.t0, 1e-9):,.0f}"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if accuracy is not None:
            fields["acc"] = f"{100 * accuracy:.1f} %"
        self.progress.update(self.task, advance=1, **fields)  # type: ignore[arg-type]  # fields go to task.fields

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.last_epoch = record["epoch"]
        self.progress.remove_task(self.task)
        self.progress.stop()
        if not self.quiet:
            console.print(_epoch_line(record))


class EpochLineReporter:
    """One line per epoch, no progress bar: what rank 0 of `train --nproc` prints from its own process."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float | None, accuracy: float | None, images: int) -> None: ...

    def epoch_end(self, record: dict[str, Any]) -> None:
        print(_epoch_line(record), flush=True)


def _epoch_line(record: dict[str, Any]) -> str:
    return (
        f"epoch {record['epoch']}: loss {record['loss']:.4f}, test accuracy {100 * record['test_accuracy']:.2f} %, "
        f"{record['images_per_second']:,.0f} img/s, {record['seconds']:.1f} s"
    )


def _train_or_launch(
    config: TrainConfig, run_dir: Path, resume: bool, nproc: int, quiet: bool, main_rank: bool
) -> dict[str, Any]:
    """Train in this process (alone or as a torchrun rank), or start --nproc ranks; Ctrl-C exits 130 with
    what the checkpoint holds."""
    reporter = RichTrainReporter(quiet or not main_rank or nproc > 1)
    try:
        if nproc > 1:
            from resnet_edge.training.distributed import launch
            from resnet_edge.training.train import train_worker

            return launch(nproc, train_worker, config, run_dir, resume, None if quiet else EpochLineReporter)
        from resnet_edge.training.train import train

        return train(config, run_dir, resume=resume, reporter=reporter)
    except KeyboardInterrupt:
        reporter.progress.stop()
        if not main_rank:
            raise typer.Exit(130) from None
        done = reporter.last_epoch
        err_console.print(
            f"interrupted: {run_dir / CHECKPOINT} holds "
            + (
                f"epoch {done}; continue with `resnet-edge train --run {run_dir} --resume`"
                if done
                else "the last epoch saved, if any; continue with --resume"
            ),
            soft_wrap=True,
        )
        raise typer.Exit(130) from None


def _prepare_run(run_dir: Path, resume: bool, epochs: int | None, main_rank: bool) -> None:
    from resnet_edge.core.files import ensure_writable_dir, remove_stale_temporaries

    if resume and not (run_dir / CHECKPOINT).exists():
        raise UserError(f"--resume: no checkpoint at {run_dir / CHECKPOINT}")
    if resume and epochs is not None:
        check_resume_epochs(run_dir, epochs)
    if main_rank:
        ensure_writable_dir(run_dir)
        remove_stale_temporaries(run_dir)


RECIPE_DEFAULT = "(default: from --recipe)"
ARCH = typer.Option(TrainConfig.arch, help="Architecture (see `resnet-edge models`).")
RECIPE = typer.Option(
    "default",
    help="default (20 epochs, batch 64) | fast (a GPU recipe: batch 256, 10 epochs, matched one-cycle schedule, "
    "CUDA graphs through torch.compile). Options given override it.",
)
EPOCHS = typer.Option(None, help=f"Passes over the training set {RECIPE_DEFAULT}.", show_default=False)
BATCH_SIZE = typer.Option(
    None,
    help=f"Images per step: the global batch, shared among --nproc processes {RECIPE_DEFAULT}.",
    show_default=False,
)
LR = typer.Option(
    None, help=f"Peak learning rate (one-cycle, SGD with Nesterov momentum) {RECIPE_DEFAULT}.", show_default=False
)
DEVICE = typer.Option(TrainConfig.device, help="auto | cpu | cuda (with several processes: the GPU of each LOCAL_RANK)")
DATA_DIR = typer.Option(
    None, help="A folder with the four MNIST-format IDX files (gzip or raw); default: the bundled MNIST."
)
TRAIN_RUN = typer.Option(None, help="Run folder (default: exported/<arch>).")
SEED = typer.Option(TrainConfig.seed, help="Random seed.")
RESUME = typer.Option(False, help="Continue the run in --run from its checkpoint (with any number of processes).")
AUGMENT = typer.Option(TrainConfig.augment, help="Random rotation/scale/shift of each batch (not in the last epoch).")
AMP = typer.Option(
    TrainConfig.amp,
    help="auto | bf16 | off: bf16 autocast (auto: on CUDA; the CPU trains in fp32 unless bf16 is asked for).",
)
COMPILE = typer.Option(
    None,
    "--compile/--no-compile",
    help="torch.compile the model (worth it on CUDA) (default: no; fast recipe: on CUDA with one process).",
    show_default=False,
)
COMPILE_MODE = typer.Option(
    None,
    help="torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs "
    + RECIPE_DEFAULT
    + ".",
    show_default=False,
)
NPROC = typer.Option(
    1,
    help="Data-parallel processes on this machine, started with torchrun's launcher (one per GPU; gloo on the "
    "CPU). Under torchrun, leave it out.",
)
SYNC_BN = typer.Option(
    False, "--sync-bn", help="With several processes: BatchNorm statistics of the global batch (SyncBatchNorm)."
)
DIST_TIMEOUT = typer.Option(
    TrainConfig.dist_timeout, help="Seconds a process waits for the others before the job fails."
)
TRAIN_LIMIT = typer.Option(None, hidden=True, help="Only the first N training images (tests, rehearsals).")
TEST_LIMIT = typer.Option(None, hidden=True, help="Only the first N test images (tests, rehearsals).")
QUIET_TRAIN = typer.Option(False, "--quiet", "-q", help="No progress bar.")


@app.command("train")
@user_errors
def train_cli(
    arch: str = ARCH,
    recipe: str = RECIPE,
    epochs: int | None = EPOCHS,
    batch_size: int | None = BATCH_SIZE,
    lr: float | None = LR,
    device: str = DEVICE,
    data_dir: Path | None = DATA_DIR,
    run: Path | None = TRAIN_RUN,
    seed: int = SEED,
    resume: bool = RESUME,
    augment: bool = AUGMENT,
    amp: str = AMP,
    compile: bool | None = COMPILE,
    compile_mode: str | None = COMPILE_MODE,
    nproc: int = NPROC,
    sync_bn: bool = SYNC_BN,
    dist_timeout: float = DIST_TIMEOUT,
    train_limit: int | None = TRAIN_LIMIT,
    test_limit: int | None = TEST_LIMIT,
    quiet: bool = QUIET_TRAIN,
) -> None:
    """Train a ResNet on MNIST (GPU when there is one) and write checkpoint.pt and train.json.

    Several GPUs or machines: `torchrun --nproc-per-node N -m resnet_edge.cli -- train ...` (or --nproc N on
    one machine; the `--` keeps torchrun from reading --run as its own --run-path); only rank 0 writes."""
    need_torch("train")
    from resnet_edge.core.config import train_config
    from resnet_edge.core.files import run_dir_for

    config = train_config(
        recipe, arch=arch, epochs=epochs, batch_size=batch_size, lr=lr, device=device, seed=seed, augment=augment,
        amp=amp, compile=compile, compile_mode=compile_mode, sync_bn=sync_bn, dist_timeout=dist_timeout,
        train_limit=train_limit, test_limit=test_limit, data_dir=str(data_dir) if data_dir is not None else None,
    )  # fmt: skip
    check_processes(config, nproc)
    main_rank = os.environ.get("RANK", "0") == "0"
    run_dir = run if run is not None else run_dir_for(arch)
    _prepare_run(run_dir, resume, epochs, main_rank)
    report = _train_or_launch(config, run_dir, resume, nproc, quiet, main_rank)
    if main_rank:
        procs = f" x {report['world_size']} processes" if report["world_size"] > 1 else ""
        console.print(
            f"trained {report['arch']} ({report['params']:,} parameters) for {report['epochs_done']} epochs on "
            f"{report['device']}{procs} in {report['seconds']:.1f} s: test accuracy "
            f"{100 * report['test_accuracy']:.2f} % -> {run_dir}"
        )


@app.command("models")
@user_errors
def models_cli() -> None:
    """List the architectures with their parameters and compute at 1x28x28."""
    need_torch("models")
    from resnet_edge.training.models import MODELS, count_macs, count_parameters, create_model

    table = Table(title="ResNet family (input 1x28x28, 10 classes)")
    for col in ("name", "family", "parameters", "MMACs", "MFLOPs"):
        table.add_column(col, justify="left" if col in ("name", "family") else "right")
    for name, spec in MODELS.items():
        model = create_model(name)
        macs = count_macs(model)
        table.add_row(name, spec.family, f"{count_parameters(model):,}", f"{macs / 1e6:,.1f}", f"{2 * macs / 1e6:,.1f}")
    console.print_table(table)
    console.print("MFLOPs = 2 x multiply-accumulates of convolutions and linear layers.", style="dim")
