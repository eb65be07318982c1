"""`eval` and `predict`: ONNX Runtime on the test set or on image files (a .pt checkpoint through PyTorch)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from resnet_edge.cli.app import app
from resnet_edge.cli.console import (
    MODEL,
    PROVIDER,
    RUN,
    VARIANT_HELP,
    console,
    need_torch,
    note,
    print_to_pipe,
    torch_available,
    user_errors,
)
from resnet_edge.core.config import EvalConfig

EVAL_MODEL = typer.Argument(None, help="A .onnx or .pt file (default: the run's models).")
DATA_DIR = typer.Option(None, help="MNIST-format folder (default: the bundled MNIST).")
BATCH_SIZE = typer.Option(EvalConfig.batch_size, help="Images per inference call.")
EVAL_VARIANT = typer.Option(EvalConfig.variant, help=VARIANT_HELP + " all: the checkpoint and every model.")
VARIANT = typer.Option(EvalConfig.variant, help=VARIANT_HELP)
IMAGES = typer.Argument(..., help="Image files (PNG, JPEG, ...) of single digits.")
AS_JSON = typer.Option(False, "--json", help="Print a JSON list of {path, digit, probabilities}.")


@app.command("eval")
@user_errors
def eval_cli(
    model: Path | None = EVAL_MODEL,
    run: Path | None = RUN,
    provider: str = PROVIDER,
    data_dir: Path | None = DATA_DIR,
    batch_size: int = BATCH_SIZE,
    variant: str = EVAL_VARIANT,
) -> None:
    """Test accuracy and images/s of a model (.onnx through ONNX Runtime, no torch; .pt through PyTorch)."""
    from resnet_edge.inference.evaluate import eval_targets, evaluate_file

    config = EvalConfig(provider=provider, batch_size=batch_size, variant=variant, data_dir=data_dir)
    if model is not None and model.suffix == ".pt":
        need_torch("eval of a .pt checkpoint")
    paths, notes = eval_targets(run, model, variant, provider, with_torch=torch_available())
    for line in notes:
        note(line, style="bold yellow" if line.startswith("warning:") else None)
    table = Table(title="test accuracy")
    for col in ("model", "runtime", "test accuracy", "images/s"):
        table.add_column(col, justify="left" if col in ("model", "runtime") else "right")
    for path in paths:
        if path.suffix == ".pt":
            from resnet_edge.training.checkpoint import evaluate_checkpoint_file

            r = evaluate_checkpoint_file(path, config.data_dir, config.batch_size)
        else:
            r = evaluate_file(path, provider=config.provider, data_dir=config.data_dir, batch_size=config.batch_size)
        table.add_row(str(path), r["runtime"], f"{100 * r['accuracy']:.2f} %", f"{r['images_per_second']:,.0f}")
    console.print_table(table)


@app.command("predict")
@user_errors
def predict_cli(
    images: list[Path] = IMAGES,
    run: Path | None = RUN,
    model: Path | None = MODEL,
    variant: str = VARIANT,
    provider: str = PROVIDER,
    as_json: bool = AS_JSON,
) -> None:
    """Classify image files with the same MNIST-style preprocessing as the server's /v1/predict."""
    from resnet_edge.inference.predict import predict_files
    from resnet_edge.inference.runtime import create_session
    from resnet_edge.inference.variants import select_model

    choice, _ = select_model(run, model, variant, "latency", provider)
    if model is None:  # a file the user named needs no announcement
        note(f"using {choice.path} ({choice.reason})")
    results = predict_files(create_session(choice.path, provider), images)
    if as_json:
        print_to_pipe(json.dumps(results))
        return
    for r in results:
        console.print(f"{r['path']}: {r['digit']} ({100 * max(r['probabilities']):.1f} %)")
