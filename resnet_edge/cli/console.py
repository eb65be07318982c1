"""What every command shares: the terminal consoles, one-line errors, progress bars, common options.

Text that may come from files (paths, model metadata, run reports) is printed as text: no rich markup is
interpreted and control characters are escaped.
"""

from __future__ import annotations

import errno
import functools
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from resnet_edge.core.errors import UserError


class TerminalConsole(Console):
    """rich's Console for untrusted text: markup is never interpreted ('[/x]' in a path is text, not a
    closing tag) and control characters (ESC, and so ANSI/OSC sequences) are printed escaped, in plain
    prints, table cells and titles alike."""

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


console = TerminalConsole()
err_console = TerminalConsole(stderr=True)


def fail(message: str) -> None:
    err_console.print(f"error: {message}", soft_wrap=True)
    raise typer.Exit(1)


def note(message: str, style: str | None = None) -> None:
    """A line for the user on stderr (which file is used and why, warnings): stdout stays the result."""
    err_console.print(message, soft_wrap=True, style=style)


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
            fail(str(exc))
        except OSError as exc:
            if exc.errno not in _WRITE_ERRNOS:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            fail(f"{where}{exc.strerror or exc}; nothing was left half-written")
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def torch_available() -> bool:
    return importlib.util.find_spec("torch") is not None


def need_torch(command: str, *also: str) -> None:
    """Commands that run PyTorch say so in one line on an inference-only install (or one that lacks
    torchvision, or the exporter's onnxscript)."""
    missing = [m for m in ("torch", "torchvision", *also) if importlib.util.find_spec(m) is None]
    if "torch" in missing:
        raise UserError(f'{command} needs PyTorch, which this install does not have: pip install "resnet-edge[train]"')
    if missing:
        raise UserError(
            f"{command} needs {' and '.join(missing)}, which this install does not have: "
            'pip install "resnet-edge[train]"'
        )


def progress_bars(quiet: bool) -> tuple[Any, Callable[[str, int], Callable[[int], None]]]:
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

    def open_bar(description: str, total: int) -> Callable[[int], None]:
        task = progress.add_task(description, total=total)
        return lambda n: progress.update(task, advance=n)

    return progress, open_bar


def print_to_pipe(text: str) -> None:
    """Print for a consumer that may stop reading (`| head -c1`): a closed pipe ends quietly."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        raise typer.Exit(0) from None


def int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UserError(f"{option} takes comma-separated integers like 1,8,64, got {text!r}") from None
    if not values or min(values) < 1:
        raise UserError(f"{option} takes positive integers, got {text!r}")
    return values


def size_text(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


# Options several commands share.
RUN = typer.Option(None, help="Run folder (default: the run trained last).")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
VARIANT_HELP = (
    "Which model of the run: auto (what the run's bench.json measured fastest on this CPU, else INT8 "
    "on CPUs with int8 dot-product instructions, else FP32; on a GPU provider FP16 if exported, else "
    "FP32) | fp32 | int8 | fp16."
)
MODEL = typer.Option(None, help="An .onnx model (default: chosen from the run, see --variant).")
PROVIDER = typer.Option("cpu", help="ONNX Runtime execution provider (cpu, cuda, tensorrt or a full name).")
