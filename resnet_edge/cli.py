"""The `resnet-edge` command line: each command validates its options, calls one library function and
renders the result. Heavy imports (torch, onnxruntime) happen inside the commands, so `--help` is instant.
"""

from __future__ import annotations

import errno
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from resnet_edge import __version__
from resnet_edge.core.config import (
    BenchConfig,
    EvalConfig,
    ExportConfig,
    PackageConfig,
    QuantizationConfig,
    ServerConfig,
    TrainConfig,
    check_resume_epochs,
)
from resnet_edge.core.contract import (
    BENCH_JSON,
    BENCH_MD,
    BENCH_PNG,
    CHECKPOINT,
    DEPLOY_DIR,
    EXPORT_REPORT,
    MODEL_FILES,
)
from resnet_edge.core.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train a ResNet on MNIST, export it to ONNX and INT8, benchmark and serve it.",
)


class _TerminalConsole(Console):
    """rich's Console for text that may come from files (paths, model metadata, run reports): markup is
    never interpreted ('[/x]' in a path is text, not a closing tag) and control characters (ESC, and so
    ANSI/OSC sequences) are printed escaped, in plain prints, table cells and titles alike."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(markup=False, highlight=False, **kwargs)

    def render_str(self, text: str, **kwargs: Any) -> Any:
        from resnet_edge.core.names import terminal_text

        return super().render_str(terminal_text(text), **kwargs)

    def print_table(self, table: Table) -> None:
        """A table at its natural width even on a narrow terminal (or a pipe, which rich takes as 80
        columns): the terminal wraps long lines, but no variant name or number is cut to 'onn…'."""
        from rich.measure import Measurement

        natural = Measurement.get(self, self.options.update_width(10_000), table).maximum
        if natural <= self.width:
            self.print(table)
            return
        narrow = self._width
        self.width = natural
        try:
            self.print(table)
        finally:
            self._width = narrow


console = _TerminalConsole()
err_console = _TerminalConsole(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


# Errors of the machine rather than of the code: the disk is full, a file-size limit, a folder that
# cannot be written. Files are written to temporaries and moved into place, so none is left partial.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a mistake the user can make into one line `error: ...` and exit 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            _fail(str(exc))
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            _fail(f"{where}{exc.strerror or exc}; nothing was left half-written")
        except KeyboardInterrupt:
            err_console.print("interrupted", highlight=False)
            raise typer.Exit(130) from None

    return wrapper


def _torch_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _need_torch(command: str, *also: str) -> None:
    """Commands that run PyTorch say so in one line on an inference-only install (or one that lacks
    torchvision, or the exporter's onnxscript)."""
    import importlib.util

    missing = [m for m in ("torch", "torchvision", *also) if importlib.util.find_spec(m) is None]
    if missing == ["torch", "torchvision", *also] or "torch" in missing:
        raise UserError(f'{command} needs PyTorch, which this install does not have: pip install "resnet-edge[train]"')
    if missing:
        raise UserError(
            f"{command} needs {' and '.join(missing)}, which this install does not have: "
            'pip install "resnet-edge[train]"'
        )


def _version(value: bool) -> None:
    if value:
        console.print(f"resnet-edge {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what the library does."),
) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _resolve_run(run: Path | None) -> Path:
    from resnet_edge.core.files import latest_run

    if run is not None:
        return run
    found = latest_run()
    if found is None:
        raise UserError("no run found under exported/ (train one with `resnet-edge train`, or pass --run DIR)")
    return found


VARIANT_HELP = (
    "Which model of the run: auto (what the run's bench.json measured fastest on this CPU, else INT8 "
    "on CPUs with int8 dot-product instructions, else FP32; on a GPU provider FP16 if exported, else "
    "FP32) | fp32 | int8 | fp16."
)


# ---------------------------------------------------------------------------------------------- train
class RichTrainReporter:
    """A progress bar per epoch with loss, images/s and time left; a line with test accuracy after it."""

    def __init__(self, quiet: bool) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

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
        self.task = None
        self.last_epoch = 0  # the last epoch saved, for the message after Ctrl-C

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None:
        import time

        self.progress.start()
        self.images, self.t0 = 0, time.perf_counter()
        self.task = self.progress.add_task(f"epoch {epoch}/{epochs}", total=steps, loss="-", acc="-", ips="-")

    def step(self, loss: float | None, accuracy: float | None, images: int) -> None:
        import time

        self.images += images
        fields = {"ips": f"{self.images / max(time.perf_counter() - self.t0, 1e-9):,.0f}"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        if accuracy is not None:
            fields["acc"] = f"{100 * accuracy:.1f} %"
        self.progress.update(self.task, advance=1, **fields)

    def epoch_end(self, record: dict[str, Any]) -> None:
        self.last_epoch = record["epoch"]
        self.progress.remove_task(self.task)
        self.progress.stop()
        if not self.quiet:
            console.print(
                f"epoch {record['epoch']}: loss {record['loss']:.4f}, test accuracy "
                f"{100 * record['test_accuracy']:.2f} %, {record['images_per_second']:,.0f} img/s, "
                f"{record['seconds']:.1f} s",
                highlight=False,
            )


class EpochLineReporter:
    """One line per epoch, no progress bar: what rank 0 of `train --nproc` prints from its own process."""

    def epoch_start(self, epoch: int, epochs: int, steps: int) -> None: ...
    def step(self, loss: float | None, accuracy: float | None, images: int) -> None: ...

    def epoch_end(self, record: dict[str, Any]) -> None:
        print(
            f"epoch {record['epoch']}: loss {record['loss']:.4f}, test accuracy {100 * record['test_accuracy']:.2f} %, "
            f"{record['images_per_second']:,.0f} img/s, {record['seconds']:.1f} s",
            flush=True,
        )


RECIPE_DEFAULT = "(default: from --recipe)"


def _check_processes(config: TrainConfig, nproc: int) -> None:
    import os

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if config.batch_size % nproc:
        raise UserError(
            f"--batch-size {config.batch_size} is the global batch; it must divide evenly among --nproc {nproc} processes"
        )
    if nproc > 1 and "WORLD_SIZE" in os.environ:
        raise UserError(
            "--nproc starts its own processes; under torchrun leave it out (torchrun's --nproc-per-node says how many)"
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
            raise typer.Exit(130)
        done = reporter.last_epoch
        err_console.print(
            f"interrupted: {run_dir / CHECKPOINT} holds "
            + (
                f"epoch {done}; continue with `resnet-edge train --run {run_dir} --resume`"
                if done
                else "the last epoch saved, if any; continue with --resume"
            ),
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(130)


@app.command("train")
@user_errors
def train_cli(
    arch: str = typer.Option(TrainConfig.arch, help="Architecture (see `resnet-edge models`)."),
    recipe: str = typer.Option(
        "default",
        help="default (20 epochs, batch 64) | fast (a GPU recipe: batch 256, 10 epochs, "
        "matched one-cycle schedule, CUDA graphs through torch.compile). Options given override it.",
    ),
    epochs: int | None = typer.Option(None, help=f"Passes over the training set {RECIPE_DEFAULT}.", show_default=False),
    batch_size: int | None = typer.Option(
        None,
        help=f"Images per step: the global batch, shared among --nproc processes {RECIPE_DEFAULT}.",
        show_default=False,
    ),
    lr: float | None = typer.Option(
        None, help=f"Peak learning rate (one-cycle, SGD with Nesterov momentum) {RECIPE_DEFAULT}.", show_default=False
    ),
    device: str = typer.Option(
        TrainConfig.device, help="auto | cpu | cuda (with several processes: the GPU of each LOCAL_RANK)"
    ),
    data_dir: Path | None = typer.Option(
        None, help="A folder with the four MNIST-format IDX files (gzip or raw); default: the bundled MNIST."
    ),
    run: Path | None = typer.Option(None, help="Run folder (default: exported/<arch>)."),
    seed: int = typer.Option(TrainConfig.seed, help="Random seed."),
    resume: bool = typer.Option(
        False, help="Continue the run in --run from its checkpoint (with any number of processes)."
    ),
    augment: bool = typer.Option(
        TrainConfig.augment, help="Random rotation/scale/shift of each batch (not in the last epoch)."
    ),
    amp: str = typer.Option(
        TrainConfig.amp,
        help="auto | bf16 | off: bf16 autocast (auto: on CUDA; the CPU trains in fp32 unless bf16 is asked for).",
    ),
    compile: bool | None = typer.Option(
        None,
        "--compile/--no-compile",
        help="torch.compile the model (worth it on CUDA) (default: no; fast recipe: on CUDA with one process).",
        show_default=False,
    ),
    compile_mode: str | None = typer.Option(
        None,
        help="torch.compile mode: default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs {RECIPE_DEFAULT}.".replace(
            "{RECIPE_DEFAULT}", RECIPE_DEFAULT
        ),
        show_default=False,
    ),
    nproc: int = typer.Option(
        1,
        help="Data-parallel processes on this machine, started with torchrun's launcher (one per GPU; gloo on the CPU). Under torchrun, leave it out.",
    ),
    sync_bn: bool = typer.Option(
        False, "--sync-bn", help="With several processes: BatchNorm statistics of the global batch (SyncBatchNorm)."
    ),
    dist_timeout: float = typer.Option(
        TrainConfig.dist_timeout, help="Seconds a process waits for the others before the job fails."
    ),
    train_limit: int | None = typer.Option(
        None, hidden=True, help="Only the first N training images (tests, rehearsals)."
    ),
    test_limit: int | None = typer.Option(None, hidden=True, help="Only the first N test images (tests, rehearsals)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Train a ResNet on MNIST (GPU when there is one) and write checkpoint.pt and train.json.

    Several GPUs or machines: `torchrun --nproc-per-node N -m resnet_edge.cli -- train ...` (or --nproc N on
    one machine; the `--` keeps torchrun from reading --run as its own --run-path); only rank 0 writes."""
    _need_torch("train")
    import os

    from resnet_edge.core.config import train_config
    from resnet_edge.core.files import ensure_writable_dir, remove_stale_temporaries, run_dir_for

    config = train_config(
        recipe,
        arch=arch,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        device=device,
        seed=seed,
        augment=augment,
        amp=amp,
        compile=compile,
        compile_mode=compile_mode,
        sync_bn=sync_bn,
        dist_timeout=dist_timeout,
        train_limit=train_limit,
        test_limit=test_limit,
        data_dir=str(data_dir) if data_dir is not None else None,
    )
    _check_processes(config, nproc)
    main_rank = os.environ.get("RANK", "0") == "0"
    run_dir = run if run is not None else run_dir_for(arch)
    if resume and not (run_dir / CHECKPOINT).exists():
        raise UserError(f"--resume: no checkpoint at {run_dir / CHECKPOINT}")
    if resume and epochs is not None:
        check_resume_epochs(run_dir, epochs)
    if main_rank:
        ensure_writable_dir(run_dir)
        remove_stale_temporaries(run_dir)
    report = _train_or_launch(config, run_dir, resume, nproc, quiet, main_rank)
    if not main_rank:
        return
    acc = report["test_accuracy"]
    procs = f" x {report['world_size']} processes" if report["world_size"] > 1 else ""
    console.print(
        f"trained {report['arch']} ({report['params']:,} parameters) for {report['epochs_done']} epochs on "
        f"{report['device']}{procs} in {report['seconds']:.1f} s: test accuracy "
        f"{100 * acc:.2f} % -> {run_dir}",
        highlight=False,
    )


# --------------------------------------------------------------------------------------------- models
@app.command("models")
@user_errors
def models_cli() -> None:
    """List the architectures with their parameters and compute at 1x28x28."""
    _need_torch("models")
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


# --------------------------------------------------------------------------------------------- export
def _progress_factory(quiet: bool):
    """A rich Progress and a function that opens one bar and returns its advance callback."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet,
    )

    def open_bar(description: str, total: int):
        task = progress.add_task(description, total=total)
        return lambda n: progress.update(task, advance=n)

    return progress, open_bar


def _size(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


@app.command("export")
@user_errors
def export_cli(
    run: Path | None = typer.Option(None, help="Run folder (default: the run trained last)."),
    opset: int = typer.Option(ExportConfig.opset, help="ONNX opset (13 or later with --quantize)."),
    quantize: bool = typer.Option(
        False, "--quantize", help="Also write a static INT8 model (QDQ) and prove its accuracy."
    ),
    calibration_size: int = typer.Option(
        QuantizationConfig.calibration_size, help="Training images to calibrate activation ranges on."
    ),
    calibration_method: str = typer.Option(QuantizationConfig.method, help="minmax | entropy | percentile"),
    max_accuracy_drop: float = typer.Option(
        QuantizationConfig.max_accuracy_drop, help="Points of test accuracy INT8 may lose; worse layers stay float."
    ),
    min_agreement: float = typer.Option(
        QuantizationConfig.min_agreement, help="Percent of test images on which INT8 must give FP32's digit."
    ),
    search: bool = typer.Option(
        QuantizationConfig.search,
        help="Try every calibration (minmax, percentiles) and keep the best INT8 model, chosen on held-out training images, before keeping any layer in float.",
    ),
    scheme: str = typer.Option(
        QuantizationConfig.scheme,
        help="INT8 scheme: portable (uint8 activations, weights in [-64, 64]: same accuracy on every CPU) | vnni (8-bit weights: exact only on CPUs with VNNI/AMX/ARM dotprod) | s8s8 (int8 activations).",
    ),
    fp16: bool = typer.Option(
        False,
        "--fp16",
        help="Also write model.fp16.onnx (float16 weights and compute, float32 in and out: the GPU variant), checked against FP32 on the test set.",
    ),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Export the run to ONNX (parity-checked) and, with --quantize, to static INT8 (accuracy-guarded)."""
    _need_torch("export", "onnxscript")
    qconfig = QuantizationConfig(
        calibration_size=calibration_size,
        method=calibration_method,
        max_accuracy_drop=max_accuracy_drop,
        min_agreement=min_agreement,
        search=search,
        scheme=scheme,
    )
    config = ExportConfig(opset=opset, quantize=quantize, quantization=qconfig if quantize else None, fp16=fp16)
    run_dir = _resolve_run(run)
    from resnet_edge.export.onnx_export import export_run

    progress, open_bar = _progress_factory(quiet)
    with progress:
        report = export_run(
            run_dir,
            opset=config.opset,
            quantize=config.quantize,
            qconfig=config.quantization,
            progress=open_bar,
            fp16=config.fp16,
        )
    _print_export(report, run_dir)


def _print_export(report: dict[str, Any], run_dir: Path) -> None:
    table = Table(title=f"{report['arch']} export ({run_dir})")
    for col in ("model", "test acc.", "agreement", "size", "check"):
        table.add_column(col, justify="left" if col in ("model", "check") else "right")
    worst = max(p["max_abs_diff"] for p in report["parity"])
    fp32 = report["fp32"]
    sizes = "/".join(str(p["batch_size"]) for p in report["parity"])
    table.add_row(
        "FP32", f"{100 * fp32['test_accuracy']:.2f} %", "-", _size(fp32["bytes"]), f"parity {worst:.1e} (batch {sizes})"
    )
    if "int8" in report:
        q = report["int8"]
        table.add_row(
            "INT8",
            f"{100 * q['test_accuracy']:.2f} %",
            f"{100 * q['top1_agreement']:.2f} %",
            f"{_size(q['bytes'])} ({100 * q['size_ratio']:.0f} %)",
            f"SQNR {q['logits_sqnr_db']:.1f} dB",
        )
    if "fp16" in report:
        h = report["fp16"]
        table.add_row(
            "FP16",
            f"{100 * h['test_accuracy']:.2f} %",
            f"{100 * h['top1_agreement']:.2f} %",
            f"{_size(h['bytes'])} ({100 * h['size_ratio']:.0f} %)",
            f"max |diff| {h['max_abs_diff']:.1e}",
        )
    console.print_table(table)
    if "int8" in report and report["int8"].get("selection"):  # the search ran
        _print_search(report["int8"])
    if "int8" in report and report["int8"]["float_nodes"]:
        console.print(f"accuracy guard kept {len(report['int8']['float_nodes'])} nodes in float", highlight=False)
    console.print(f"exported in {report['seconds']:.1f} s -> {run_dir / EXPORT_REPORT}", highlight=False)


def _print_search(int8: dict[str, Any]) -> None:
    """One line per candidate of the INT8 search, judged on the selection split (export.json has them all)."""
    selection = int8.get("selection") or {}
    from rich import box

    table = Table(
        title=f"INT8 search on {selection.get('images', '?')} held-out training images (export.json: all)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
    )
    for col in ("calibration", "weights", "agreement", "drop", "s", "on test"):
        table.add_column(
            col, justify="right" if col in ("agreement", "drop", "s") else "left", no_wrap=col != "calibration"
        )
    for c in int8["candidates"]:
        drop = c.get("selection_drop_points")
        verdict = "" if "holds" not in c else ("holds" if c["holds"] else "misses")
        table.add_row(
            c["calibration"].replace("percentile ", "p").replace(" sensitive tensors", " tensors"),
            "bias corr." if c.get("weights") == "bias correction" else "nearest",
            f"{100 * c['selection_agreement']:.2f} %",
            "-" if drop is None else f"{drop:+.2f} pt",
            f"{c['seconds']:.1f}",
            verdict + (", chosen" if c.get("chosen") else ""),
        )
    console.print_table(table)


# ----------------------------------------------------------------------------------------------- eval
@app.command("eval")
@user_errors
def eval_cli(
    model: Path | None = typer.Argument(None, help="A .onnx or .pt file (default: the run's models)."),
    run: Path | None = typer.Option(None, help="Run folder (default: the run trained last)."),
    provider: str = typer.Option(
        EvalConfig.provider, help="ONNX Runtime execution provider (cpu, cuda, or a full name)."
    ),
    data_dir: Path | None = typer.Option(None, help="MNIST-format folder (default: the bundled MNIST)."),
    batch_size: int = typer.Option(EvalConfig.batch_size, help="Images per inference call."),
    variant: str = typer.Option(EvalConfig.variant, help=VARIANT_HELP + " all: the checkpoint and every model."),
) -> None:
    """Test accuracy and images/s of a model (.onnx through ONNX Runtime, no torch; .pt through PyTorch)."""
    from resnet_edge.inference.evaluate import evaluate_file

    config = EvalConfig(provider=provider, batch_size=batch_size, variant=variant, data_dir=data_dir)
    if variant == "all" and model is None:
        from resnet_edge.inference.variants import check_same_checkpoint

        run_dir = _resolve_run(run)
        check_same_checkpoint(run_dir)
        paths = [
            p
            for p in (run_dir / CHECKPOINT, *(run_dir / n for n in MODEL_FILES.values()))
            if p.exists() and (p.suffix == ".onnx" or _torch_available())
        ]
        if not paths:
            raise UserError(f"{run_dir}: nothing to evaluate (no models, and no PyTorch for the checkpoint)")
        for p in paths:
            if p.suffix == ".onnx":
                _saturation_check(p, provider, refuse=False)
    elif model is not None and model.suffix == ".pt":
        if variant != "auto":
            raise UserError("--variant chooses among a run's ONNX models; a .pt checkpoint has one")
        _need_torch("eval of a .pt checkpoint")
        paths = [model]
    else:
        paths = [_choose_model(run, model, variant, "throughput", provider, refuse_saturating=False)]
    table = Table(title="test accuracy")
    for col in ("model", "runtime", "test accuracy", "images/s"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for path in paths:
        r = evaluate_file(path, provider=config.provider, data_dir=config.data_dir, batch_size=config.batch_size)
        table.add_row(str(path), r["runtime"], f"{100 * r['accuracy']:.2f} %", f"{r['images_per_second']:,.0f}")
    console.print_table(table)


# ---------------------------------------------------------------------------------------------- bench
def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers like 1,8,64, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} takes positive integers, got {text!r}")
    return values


@app.command("bench")
@user_errors
def bench_cli(
    run: Path | None = typer.Option(None, help="Run folder (default: the run trained last)."),
    provider: str = typer.Option(
        BenchConfig.provider, help="ONNX Runtime execution provider: cpu, cuda, tensorrt or a full name."
    ),
    batch_sizes: str = typer.Option(",".join(map(str, BenchConfig.batch_sizes)), help="Comma-separated batch sizes."),
    duration: float = typer.Option(
        BenchConfig.duration, help="Timed seconds per cell and repeat (and at least --min-runs runs)."
    ),
    repeats: int = typer.Option(
        BenchConfig.repeats,
        help="Interleaved sweeps over every cell; a low-precision variant is recommended only when its repeats beat FP32's without overlap.",
    ),
    threads: int | None = typer.Option(
        None, help="Intra-op threads for ONNX Runtime and torch (default: the runtime's)."
    ),
    no_torch: bool = typer.Option(False, "--no-torch", help="Skip PyTorch (and never import it)."),
    fp16: bool | None = typer.Option(
        None,
        "--fp16/--no-fp16",
        help="Measure model.fp16.onnx (default: on GPU providers only; ONNX Runtime's CPU kernels are slow in FP16).",
    ),
    min_runs: int = typer.Option(BenchConfig.min_runs, help="Timed runs per cell and repeat, whatever the duration."),
    out: Path | None = typer.Option(None, help="Folder for bench.json/.md/.png (default: the run folder)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar."),
) -> None:
    """Latency and throughput of PyTorch eager vs ONNX Runtime FP32 vs INT8, with the machine described."""
    from resnet_edge.bench.runner import run_bench, write_reports
    from resnet_edge.core.files import ensure_writable_dir

    if not no_torch and not _torch_available():
        err_console.print(
            "note: PyTorch is not installed, so only ONNX Runtime is measured (as with --no-torch; "
            'pip install "resnet-edge[train]" adds it)',
            highlight=False,
            soft_wrap=True,
        )
        no_torch = True
    config = BenchConfig(
        provider=provider,
        batch_sizes=_int_list(batch_sizes, "--batch-sizes"),
        duration=duration,
        threads=threads,
        torch=not no_torch,
        min_runs=min_runs,
        fp16=fp16,
        repeats=repeats,
    )
    run_dir = _resolve_run(run)
    out_dir = out or run_dir
    ensure_writable_dir(out_dir)
    progress, open_bar = _progress_factory(quiet)
    with progress:
        report = run_bench(run_dir, config, progress=open_bar)
    write_reports(report, out_dir)
    _print_bench(report)
    console.print(f"-> {out_dir / BENCH_JSON}, {BENCH_MD}, {BENCH_PNG}", highlight=False)


def _print_bench(report: dict[str, Any]) -> None:
    m = report["machine"]
    table = Table(
        title=f"{report['arch']} on {report['provider']}: {m['cpu']}" + (f" / {m['gpu']}" if m["gpu"] else "")
    )
    for col in ("variant", "batch", "p50 ms", "p99 ms", "images/s", "vs torch", "vs FP32", "spread"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    speed = {(r["variant"], r["baseline"], r["batch_size"]): r["speedup_p50"] for r in report["ratios"]}
    for r in report["rows"]:
        vs_torch = speed.get((r["variant"], "torch", r["batch_size"]))
        vs_fp32 = speed.get((r["variant"], "onnx-fp32", r["batch_size"]))
        table.add_row(
            r["variant"],
            str(r["batch_size"]),
            f"{r['p50_ms']:.3f}",
            f"{r['p99_ms']:.3f}",
            f"{r['throughput']:,.0f}",
            f"{vs_torch:.2f}x" if vs_torch else "",
            f"{vs_fp32:.2f}x" if vs_fp32 else "",
            (f"{100 * r['p50_spread']:.0f} %" + (" !" if r.get("unstable") else "")) if "p50_spread" in r else "",
        )
    console.print_table(table)
    for workload, r in (report.get("recommendation") or {}).items():
        console.print(
            f"recommended for {workload} (batch {r['batch_size']}) on this machine: {r['variant']} ({r['why']})",
            highlight=False,
        )
    unstable = sum(bool(r.get("unstable")) for r in report["rows"])
    if unstable:
        console.print(
            f"note: {unstable} cells marked ! were unstable (their repeats' p50 spread over 10 %); see bench.md",
            style="yellow",
        )
    for d in report["diagnoses"]:
        console.print(f"note: {d}", highlight=False, style="yellow")


# ------------------------------------------------------------------------------------- serve, predict
def _choose_model(
    run: Path | None, model: Path | None, variant: str, workload: str, provider: str, refuse_saturating: bool = True
) -> Path:
    """--model PATH, else the run's variant chosen for this machine; says which file and why on stderr.

    An INT8 model that would saturate on this CPU is refused by serve/predict (its answers would not be
    the accuracy measured at export) and only warned about by eval/bench, which measure what happens.
    """
    from resnet_edge.inference.variants import choose_model

    if run is not None and model is not None:
        raise UserError("give --run or --model, not both")
    if model is not None and variant != "auto":
        raise UserError("give --variant or --model, not both")
    if model is not None:
        path, reason = model, ""
    else:
        choice = choose_model(_resolve_run(run), variant, workload, provider)
        path, reason = choice.path, choice.reason
    _saturation_check(path, provider, refuse=refuse_saturating)
    if model is None:  # a file the user named needs no announcement
        err_console.print(f"using {path} ({reason})", highlight=False, soft_wrap=True)
    return path


def _saturation_check(path: Path, provider: str, refuse: bool) -> None:
    from resnet_edge.core.int8 import cpu_problem
    from resnet_edge.core.machine import cpu_info
    from resnet_edge.inference.runtime import check_model_file
    from resnet_edge.inference.variants import runs_int8_on_cpu

    if not runs_int8_on_cpu(provider):
        return
    problem = cpu_problem(check_model_file(path), cpu_info())
    if problem and refuse:
        raise UserError(f"{path}: {problem}")
    if problem:
        err_console.print(f"warning: {path}: {problem}", highlight=False, soft_wrap=True, style="bold yellow")


@app.command("package")
@user_errors
def package_cli(
    run: Path | None = typer.Option(None, help="Run folder (default: the run trained last)."),
    out: Path | None = typer.Option(
        None, "--out", "-o", help="Deployment folder to write (default: <run>/deploy): triton/, kserve.yaml, ort/."
    ),
    max_batch_size: int = typer.Option(PackageConfig.max_batch_size, help="Triton max_batch_size (the dynamic batch)."),
    queue_delay_us: int = typer.Option(
        PackageConfig.queue_delay_us, help="Triton dynamic batching queue delay (microseconds)."
    ),
    kind: str = typer.Option(PackageConfig.kind, help="Triton instance_group kind: cpu | gpu."),
    instances: int = typer.Option(PackageConfig.instances, help="Model instances per Triton server."),
    threads: int = typer.Option(
        PackageConfig.threads, help="ONNX Runtime intra-op threads per instance (0: its default)."
    ),
    storage_uri: str = typer.Option(
        PackageConfig.storage_uri, help="Where KServe will find the repository (kserve.yaml)."
    ),
    ort: bool = typer.Option(
        PackageConfig.ort, help="Also write ORT-format models (parity-checked) for minimal builds."
    ),
) -> None:
    """Write a Triton model repository, a KServe InferenceService and ORT-format models from the run."""
    from resnet_edge.deploy.package import package_run

    config = PackageConfig(
        max_batch_size=max_batch_size,
        queue_delay_us=queue_delay_us,
        kind=kind,
        instances=instances,
        threads=threads,
        storage_uri=storage_uri,
        ort=ort,
    )
    run_dir = _resolve_run(run)
    report = package_run(run_dir, out or run_dir / DEPLOY_DIR, config)
    lines = [f"Triton repository ({', '.join(report['models'])}): {report['repository']}; KServe: {report['kserve']}"]
    lines += [
        f"ORT format {variant}: same outputs as the .onnx (max |diff| {diff:.1e})"
        for variant, diff in report["ort_parity_max_abs_diff"].items()
    ]
    console.print("\n".join(lines), highlight=False, soft_wrap=True)


@app.command("serve")
@user_errors
def serve_cli(
    run: Path | None = typer.Option(None, help="Run folder (default: the run trained last)."),
    model: Path | None = typer.Option(None, help="An .onnx model (default: chosen from the run, see --variant)."),
    variant: str = typer.Option("auto", help=VARIANT_HELP),
    repository: Path | None = typer.Option(
        None,
        help="A Triton model repository (`resnet-edge package` writes <run>/deploy/triton); serves --model-name from it.",
    ),
    model_name: str | None = typer.Option(
        None, help="Name in the URLs (default: the architecture; with --repository, the model to serve)."
    ),
    host: str = typer.Option(ServerConfig.host, help="Address to listen on."),
    port: int = typer.Option(ServerConfig.port, help="Port to listen on."),
    provider: str = typer.Option(ServerConfig.provider, help="ONNX Runtime execution provider."),
    threads: int | None = typer.Option(None, help="ONNX Runtime intra-op threads."),
    instances: int = typer.Option(
        ServerConfig.instances, help="Batches ONNX Runtime runs at once (a new batch gathers while they run)."
    ),
    max_batch_size: int = typer.Option(
        ServerConfig.max_batch_size, help="Most rows per ONNX Runtime call (1 turns batching off)."
    ),
    max_delay_ms: float = typer.Option(
        ServerConfig.max_delay_ms,
        help="How long a batch waits for company once an instance is free (0: it starts at once with what queued while the instances were busy).",
    ),
    max_body_bytes: int = typer.Option(ServerConfig.max_body_bytes, help="Larger request bodies get 413."),
    max_queue: int = typer.Option(
        ServerConfig.max_queue, help="Images (rows) accepted and not answered yet; beyond this: 503."
    ),
    max_pending_bytes: int = typer.Option(
        ServerConfig.max_pending_bytes, help="Request bytes in flight together; beyond this: 503."
    ),
    max_connections: int = typer.Option(
        ServerConfig.max_connections, help="Connections and requests at once; beyond this: 503."
    ),
    client_timeout: float = typer.Option(
        ServerConfig.client_timeout, help="Seconds a client has to send its headers, and its body."
    ),
    grpc_port: int = typer.Option(
        ServerConfig.grpc_port, help="Port of the gRPC GRPCInferenceService (KServe v2); 0: no gRPC."
    ),
) -> None:
    """Serve the model: Open Inference Protocol (KServe v2) over HTTP (JSON and binary tensors) and gRPC, and /v1/predict for image files."""
    from resnet_edge.serving.server import serve

    config = ServerConfig(
        model_name=model_name,
        provider=provider,
        threads=threads,
        instances=instances,
        max_batch_size=max_batch_size,
        max_delay_ms=max_delay_ms,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        max_pending_bytes=max_pending_bytes,
        max_connections=max_connections,
        client_timeout=client_timeout,
        host=host,
        port=port,
        grpc_port=grpc_port,
    )  # checked before any model is read
    from resnet_edge.core.providers import is_cpu_provider

    if not is_cpu_provider(provider):
        from resnet_edge.inference.runtime import check_provider_available

        check_provider_available(provider)  # a missing execution provider is one line, before any model is chosen
    if repository is not None:
        if run is not None or model is not None or variant != "auto":
            raise UserError(
                "--repository chooses its model with --model-name; give it without --run, --model or --variant"
            )
        from resnet_edge.inference.variants import choose_repository_model

        choice = choose_repository_model(repository, model_name, provider)
        _saturation_check(choice.path, provider, refuse=True)
        err_console.print(
            f"serving {choice.variant} of {repository} ({choice.reason})", highlight=False, soft_wrap=True
        )
        config.model_path, config.model_name = choice.path, choice.variant
    else:
        config.model_path = _choose_model(run, model, variant, "throughput", provider)

    def announce(c: ServerConfig) -> None:
        grpc = f" and gRPC on {c.host}:{c.grpc_port}" if c.grpc_port else ""
        err_console.print(
            f"serving {c.model_path} as {c.model_name!r} on http://{c.host}:{c.port}/v2/models/{c.model_name}{grpc} "
            f"(max batch {c.max_batch_size}, max delay {c.max_delay_ms:g} ms, {c.instances} instance{'s' if c.instances > 1 else ''})",
            highlight=False,
            soft_wrap=True,
        )

    serve(config, announce=announce)


def _print_to_pipe(text: str) -> None:
    """Print for a consumer that may stop reading (`| head -c1`): a closed pipe ends quietly."""
    import os
    import sys

    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise typer.Exit(0) from None


@app.command("predict")
@user_errors
def predict_cli(
    images: list[Path] = typer.Argument(..., help="Image files (PNG, JPEG, ...) of single digits."),
    run: Path | None = typer.Option(None, help="Run folder (default: the run trained last)."),
    model: Path | None = typer.Option(None, help="An .onnx model (default: chosen from the run, see --variant)."),
    variant: str = typer.Option(EvalConfig.variant, help=VARIANT_HELP),
    provider: str = typer.Option(EvalConfig.provider, help="ONNX Runtime execution provider."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {path, digit, probabilities}."),
) -> None:
    """Classify image files with the same MNIST-style preprocessing as the server's /v1/predict."""
    import json

    from resnet_edge.inference.predict import predict_files
    from resnet_edge.inference.runtime import create_session

    session = create_session(_choose_model(run, model, variant, "latency", provider), provider)
    results = predict_files(session, images)
    if as_json:
        _print_to_pipe(json.dumps(results))
        return
    for r in results:
        console.print(f"{r['path']}: {r['digit']} ({100 * max(r['probabilities']):.1f} %)", highlight=False)


if __name__ == "__main__":  # torchrun -m resnet_edge.cli train ...
    app(prog_name="resnet-edge")
