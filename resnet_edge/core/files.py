"""Files written whole or not at all, and the run folders that hold one model's artifacts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from resnet_edge.core.errors import UserError

EXPORTED = Path("exported")

# A test hook, never set in use: RESNET_EDGE_FAIL_AT_WRITE=N crashes the process at its Nth atomic write
# (counted from 1 in each process), with the new content complete in the temporary file and before the
# rename, as a crash at that moment would. "N" or "N:SIGKILL" kills it (a power loss: nothing is cleaned
# up); "N:SIGINT" is Ctrl-C, "N:SIGTERM" a scheduler's stop. Tests use it to interrupt a stage exactly at
# each of its writes, on any machine, however fast (tests/test_bad_inputs.py).
FAIL_AT_WRITE_ENV = "RESNET_EDGE_FAIL_AT_WRITE"
_writes_done = 0


def _fault_point() -> None:
    """The RESNET_EDGE_FAIL_AT_WRITE hook, called by each atomic write just before its rename."""
    global _writes_done
    _writes_done += 1
    setting = os.environ.get(FAIL_AT_WRITE_ENV)
    if not setting:
        return
    count, _, name = setting.partition(":")
    if _writes_done == int(count):
        signal.raise_signal(signal.Signals[name or "SIGKILL"])


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success fsync it and move it over ``path``.

    On any exception (Ctrl-C included) the temporary file is removed and ``path`` keeps its old
    content, so a reader never sees a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts are read by service users too
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        _fault_point()
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def file_sha256(path: str | Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


MAX_REPORT_BYTES = 16 * 2**20  # a run's JSON reports are kilobytes; larger is not ours


def read_report(path: str | Path) -> Any | None:
    """A run's JSON report (export.json, bench.json, train.json) as parsed, or None when it is missing,
    unreadable, too large, not JSON, or nested too deep to parse (RecursionError). The caller still checks
    the type of every value it uses: a report is a file anyone may have edited."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_REPORT_BYTES + 1)
        if len(data) > MAX_REPORT_BYTES:
            return None
        return json.loads(data)
    except (OSError, ValueError, RecursionError):
        return None


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def run_dir_for(arch: str, base: Path = EXPORTED) -> Path:
    return base / arch


def latest_run(base: Path = EXPORTED) -> Path | None:
    """The run folder whose training finished last (newest train.json), if any."""
    from resnet_edge.core.contract import TRAIN_REPORT

    runs = [p.parent for p in base.glob(f"*/{TRAIN_REPORT}")]
    return max(runs, key=lambda p: (p / TRAIN_REPORT).stat().st_mtime, default=None)


def resolve_run(run: Path | None, base: Path = EXPORTED) -> Path:
    """--run DIR as given, else the run trained last under exported/."""
    if run is not None:
        return run
    found = latest_run(base)
    if found is None:
        raise UserError("no run found under exported/ (train one with `resnet-edge train`, or pass --run DIR)")
    return found


def remove_stale_temporaries(run_dir: Path) -> list[str]:
    """Temporaries that a killed process (SIGKILL, power loss) left in a run folder: our atomic writes'
    ``.<name>.*.tmp`` files and the ``.export-*`` / ``.quantize-*`` staging folders. A run folder has one
    writer at a time, so whatever of these is there when a stage starts is dead. Returns their names."""
    import shutil

    removed: list[str] = []
    if not run_dir.is_dir():
        return removed
    for p in run_dir.iterdir():
        if p.name.startswith(".") and (p.name.endswith(".tmp") or p.name.startswith((".export-", ".quantize-"))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p.name)
    return removed


def ensure_writable_dir(path: Path) -> None:
    """Create ``path`` if needed and check that files can be created in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UserError(f"{path}: cannot write to this folder ({exc.strerror or exc})") from None
