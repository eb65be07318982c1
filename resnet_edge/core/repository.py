"""A Triton-layout model repository as `serve --repository` (and `package`'s reader) sees it:
``<repository>/<model>/config.pbtxt`` and ``<repository>/<model>/<version>/model.onnx``.

What is wrong with the repository as a whole is one UserError (not a folder; a model folder whose name
is not a valid model name; a version folder in digits Triton would not read): the server refuses to start
on it. What is wrong with one model is that model's ``problem``: a config.pbtxt missing, unreadable or
not UTF-8 text, no version with a model.onnx, a folder or file that leads outside the repository (a
symlink). Such a model fails to load, is reported by the repository index and by its readiness, and the
others are served. Nothing outside the repository is opened: every path is resolved and checked first.
No torch here.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from resnet_edge.core.contract import TRITON_CONFIG, TRITON_MODEL_FILE
from resnet_edge.core.errors import UserError
from resnet_edge.core.names import check_name, is_version, printable, shown

MAX_CONFIG_BYTES = 2**20  # a config.pbtxt is a few hundred bytes; a larger one is not read


@dataclass
class RepositoryModel:
    """One model folder: its versions (version -> model.onnx, inside the repository), or why it cannot load."""

    name: str
    versions: dict[str, Path] = field(default_factory=dict)
    problem: str | None = None


def _outside(path: Path, root: Path) -> str | None:
    """Why ``path``, symlinks followed, is not ``root`` or below it (None when it is): it leads outside the
    repository, it is a symlink loop, or it cannot be resolved."""
    try:
        try:
            resolved = path.resolve(strict=True)
        except FileNotFoundError:  # a dangling link: judged by where it points
            resolved = path.resolve()
    except RecursionError:  # a RuntimeError too: a chain of links too long to follow
        return "cannot be resolved (too many links)"
    except RuntimeError:  # Python before 3.13 reports a symlink loop so
        return "is a symlink loop"
    except OSError as exc:
        return "is a symlink loop" if exc.errno == errno.ELOOP else f"cannot be resolved ({exc.strerror})"
    return None if resolved.is_relative_to(root) else "leads outside the repository"


def _check_config(model_dir: Path, root: Path) -> str | None:
    config = model_dir / TRITON_CONFIG
    if not (config.exists() or config.is_symlink()):
        return f"no {TRITON_CONFIG}"
    why = _outside(config, root)
    if why:
        return f"its {TRITON_CONFIG} {why}"
    try:
        if not config.is_file():
            return f"its {TRITON_CONFIG} is not a file"
        with config.open("rb") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        return f"its {TRITON_CONFIG} cannot be read ({exc.strerror or type(exc).__name__})"
    if len(text) > MAX_CONFIG_BYTES:
        return f"its {TRITON_CONFIG} is over {MAX_CONFIG_BYTES} bytes"
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return f"its {TRITON_CONFIG} is not UTF-8 text"
    return None


def _versions(model_dir: Path, root: Path, where: str) -> tuple[dict[str, Path], str | None]:
    folders = [v for v in model_dir.iterdir() if v.is_dir()]
    for v in folders:  # Python reads '²' or '٣' as digits, Triton does not: refused, not guessed at
        if v.name.isnumeric() and not v.name.isascii():
            raise UserError(f"{where}: the version folder {shown(v.name)} is not a version number in ASCII digits")
    versions: dict[str, Path] = {}
    outside: list[str] = []
    # versions as Triton reads them: ASCII digits without a leading zero; other folders are not versions
    for v in sorted((v for v in folders if is_version(v.name)), key=lambda v: int(v.name)):
        model = v / TRITON_MODEL_FILE
        if not (model.exists() or model.is_symlink()):
            continue
        why = _outside(v, root) or _outside(model, root)
        if why:
            outside.append(f"version {v.name} {why}")
        elif model.is_file():
            versions[v.name] = model.resolve()  # opened by this path: no link left in it to swap
    if outside:
        return {}, outside[0]
    if not versions:
        return {}, f"no <version>/{TRITON_MODEL_FILE} in it"
    return versions, None


def scan_model(repository: Path, model_dir: Path) -> RepositoryModel:
    """One model folder of ``repository`` (its name already checked by the caller)."""
    root = repository.resolve()
    where = f"{printable(repository)}: model {shown(model_dir.name)}"
    model = RepositoryModel(model_dir.name)
    why = _outside(model_dir, root)
    if why:
        model.problem = f"its folder {why}"
        return model
    versions, problem = _versions(model_dir, root, where)
    model.problem = _check_config(model_dir, root) or problem
    if model.problem is None:
        model.versions = versions
    return model


def model_folders(repository: Path) -> list[Path]:
    """The repository's model folders (a folder holding a config.pbtxt or a version folder), their names
    not yet checked. Hidden folders (a leading '.', as .git) are not models."""
    if not repository.is_dir():
        raise UserError(f"{printable(repository)}: no model repository there")
    try:
        folders = sorted(p for p in repository.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError as exc:
        raise UserError(f"{printable(repository)}: cannot read the repository ({exc.strerror})") from None
    found, root = [], repository.resolve()
    for model_dir in folders:
        if _outside(model_dir, root):  # a link out: a model that cannot load (scan_model says why), never listed
            found.append(model_dir)
            continue
        try:
            is_model = (model_dir / TRITON_CONFIG).exists() or any(
                is_version(v.name) or (v.name.isnumeric() and v.is_dir()) for v in model_dir.iterdir()
            )
        except OSError:
            is_model = True  # unreadable: reported as that model's problem by scan_model
        if is_model:
            found.append(model_dir)
    return found


def scan_repository(repository: Path) -> dict[str, RepositoryModel]:
    """Every model folder of the repository, scanned, by name; a folder whose name breaks the rule of
    names.py (it becomes the served name, in URLs) refuses the whole repository."""
    found: dict[str, RepositoryModel] = {}
    for model_dir in model_folders(repository):
        name = check_name(model_dir.name, f"{printable(repository)}: the folder")
        try:
            found[name] = scan_model(repository, model_dir)
        except OSError as exc:
            found[name] = RepositoryModel(name, problem=f"its folder cannot be read ({exc.strerror})")
    if not found:
        raise UserError(
            f"{printable(repository)}: no <model>/{TRITON_CONFIG} with a <version>/{TRITON_MODEL_FILE} in it"
        )
    return found
