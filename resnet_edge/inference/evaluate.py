"""`eval`: which models to evaluate, and the test accuracy and throughput of a .onnx model (ONNX Runtime,
no torch). A .pt checkpoint is evaluated by training/checkpoint.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from resnet_edge.core.contract import CHECKPOINT, MODEL_FILES
from resnet_edge.core.errors import UserError
from resnet_edge.core.files import resolve_run
from resnet_edge.core.mnist import load_test_split
from resnet_edge.inference.runtime import create_session, evaluate_session
from resnet_edge.inference.variants import check_same_checkpoint, saturation_problem, select_model


def evaluate_file(
    path: Path, provider: str = "cpu", data_dir: Path | None = None, batch_size: int = 500
) -> dict[str, Any]:
    """Test accuracy and images/s of an .onnx model through ONNX Runtime."""
    path = Path(path)
    if path.suffix != ".onnx":
        raise UserError(f"{path}: expected a .onnx model or a .pt checkpoint")
    session = create_session(path, provider)
    images, labels = load_test_split(data_dir)
    r = evaluate_session(session, images, labels, batch_size=batch_size)
    return {
        "accuracy": r.accuracy,
        "images_per_second": r.images_per_second,
        "runtime": f"onnxruntime {session.get_providers()[0]}",
    }


def eval_targets(
    run: Path | None, model: Path | None, variant: str, provider: str, with_torch: bool
) -> tuple[list[Path], list[str]]:
    """The files `eval` measures and the notes to show (which file and why, warnings): --model, the run's
    chosen variant, or with --variant all the checkpoint (when PyTorch is here) and every model of the run."""
    if model is not None and model.suffix == ".pt":
        if variant != "auto":
            raise UserError("--variant chooses among a run's ONNX models; a .pt checkpoint has one")
        return [model], []
    if variant != "all" or model is not None:
        choice, warning = select_model(run, model, variant, "throughput", provider, refuse_saturating=False)
        notes = [f"warning: {warning}"] if warning else []
        if model is None:  # a file the user named needs no announcement
            notes.append(f"using {choice.path} ({choice.reason})")
        return [choice.path], notes
    run_dir = resolve_run(run)
    check_same_checkpoint(run_dir)
    candidates = (run_dir / CHECKPOINT, *(run_dir / n for n in MODEL_FILES.values()))
    paths = [p for p in candidates if p.exists() and (p.suffix == ".onnx" or with_torch)]
    if not paths:
        raise UserError(f"{run_dir}: nothing to evaluate (no models, and no PyTorch for the checkpoint)")
    problems = [saturation_problem(p, provider) if p.suffix == ".onnx" else None for p in paths]
    return paths, [f"warning: {p}: {problem}" for p, problem in zip(paths, problems, strict=True) if problem]
