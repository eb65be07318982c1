"""The `export` stage's files: how a new export replaces the previous one in a run folder.

export_run makes every file in a staging folder inside the run; only when all of them passed their checks
do the previous export's files go (export.json first: it vouches for the models) and the new ones come in,
export.json last. Stopped anywhere in between, the run holds a subset of one export, never files of two.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from resnet_edge.core.contract import (
    BENCH_JSON,
    BENCH_MD,
    BENCH_PNG,
    DEPLOY_DIR,
    EXPORT_REPORT,
    FP16_MODEL,
    FP32_MODEL,
    INT8_MODEL,
    PACKAGE_MARKER,
)

log = logging.getLogger(__name__)

BENCH_FILES = (BENCH_JSON, BENCH_MD, BENCH_PNG)


def stale_files(run_dir: Path, stage: Path, report: dict[str, Any]) -> list[str]:
    """The files of the previous export in ``run_dir``, in the order they go; what goes and what stays
    (a deploy folder `package` did not write) is said in ``report``."""
    # Every file of the previous export goes before any new one comes in (the report first: it vouches
    # for the models; bench results measured other files). Stopped anywhere in between, the run holds
    # a subset of one export, never files of two.
    stale = [n for n in (EXPORT_REPORT, *BENCH_FILES, INT8_MODEL, FP16_MODEL, FP32_MODEL) if (run_dir / n).exists()]
    report["removed_stale"] = [n for n in stale if not (stage / n).exists() and n != EXPORT_REPORT]
    deploy = run_dir / DEPLOY_DIR
    if deploy.is_dir() and not deploy.is_symlink() and (deploy / PACKAGE_MARKER).is_file():
        report["removed_stale"].append(DEPLOY_DIR)  # `package` copies of the old models, in a folder it wrote
    elif deploy.exists() or deploy.is_symlink():  # not ours to delete: kept, and said
        report["kept_stale"] = [
            f"{DEPLOY_DIR} (not written by `package`, or a link): its models are of an earlier export"
        ]
        log.warning(
            "%s kept: not written by `resnet-edge package` (or a link); its models are of an earlier "
            "export: run `resnet-edge package` again",
            deploy,
        )
    return stale


def move_into_place(stage: Path, run_dir: Path, stale: list[str], *, remove_deploy: bool) -> None:
    """Remove the ``stale`` files (and the old deploy folder), then move the staged files in, export.json last."""
    for name in stale:
        (run_dir / name).unlink()
    if remove_deploy:
        shutil.rmtree(run_dir / DEPLOY_DIR)
    for name in (FP32_MODEL, INT8_MODEL, FP16_MODEL, EXPORT_REPORT):
        if (stage / name).exists():
            os.replace(stage / name, run_dir / name)
    shutil.rmtree(stage, ignore_errors=True)
