"""The shape of the code that the README and docs/DESIGN.md promise: imports run one way
(cli -> stages -> library), stages do not reach into each other, and the inference side never
imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_edge"

# Each stage is the module(s) behind one command; a stage may use the library, never another stage.
STAGES = {
    "train": {"train", "distributed"},
    "export": {"export"},
    "eval": {"evaluate"},
    "bench": {"bench", "bench_worker", "bench_report"},
    "serve": {"serve", "serve_v2", "serve_grpc"},
    "package": {"package"},
    "predict": {"predict"},
}
LIBRARY = {"contract", "config", "errors", "files", "names", "machine", "int8", "data", "models", "checkpoint", "runtime",
           "quantize", "fp16", "preprocess", "variants"}
# What an edge box runs: eval of .onnx, bench --no-torch, serve, predict.
INFERENCE = ["contract", "config", "errors", "files", "names", "machine", "int8", "data", "runtime", "quantize", "fp16", "preprocess",
             "variants", "evaluate", "bench", "bench_worker", "bench_report", "serve", "serve_v2", "serve_grpc", "package", "predict"]


def _internal_imports(module: str) -> set[str]:
    """Every resnet_edge module that ``module`` imports, at the top or inside a function."""
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.update(a.name for a in node.names)
            elif node.module and node.module.startswith("resnet_edge."):
                found.add(node.module.split(".")[1])
    return found - {module}


def test_every_module_is_classified():
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__", "cli"}
    assert modules == set().union(*STAGES.values()) | LIBRARY


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stages_do_not_import_each_other(stage):
    others = set().union(*(mods for name, mods in STAGES.items() if name != stage))
    for module in STAGES[stage]:
        assert not (_internal_imports(module) & others), f"{module} imports {_internal_imports(module) & others}"


def test_library_imports_no_stage_and_not_the_cli():
    stages = set().union(*STAGES.values())
    for module in LIBRARY:
        bad = _internal_imports(module) & (stages | {"cli"})
        assert not bad, f"library module {module} imports {bad}"


def test_inference_modules_import_no_torch():
    code = ("import sys\n"
            + "".join(f"import resnet_edge.{m}\n" for m in INFERENCE)
            + "from resnet_edge.cli import app\n"
            + "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n")
    subprocess.run([sys.executable, "-c", code], check=True)


CONTRACT_LITERALS = {28, 784, "pixels", "logits", "model.onnx", "model.int8.onnx", "checkpoint.pt", "export.json",
                     "train.json", "bench.json"}


def test_contract_literals_live_in_the_contract_module_only():
    """Code (docstrings and comments aside) spells no tensor name, input size or run-folder file name."""
    offenders = []
    for path in PACKAGE.glob("*.py"):
        if path.stem == "contract":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                      if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                      and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Constant) and id(node) not in docstrings and not isinstance(node.value, bool)
                    and node.value in CONTRACT_LITERALS):
                offenders.append(f"{path.name}:{node.lineno} {node.value!r}")
    assert not offenders, offenders


def test_uvicorn_is_a_release_serve_was_tested_with():
    """serve subclasses uvicorn's httptools protocol and reads private fields (cycle, server_state): a
    release outside pyproject's range may break it silently, so this says which and why."""
    import importlib.metadata

    from uvicorn.protocols.http import httptools_impl

    from resnet_edge.serving.server import UVICORN_INTERNALS, UVICORN_TESTED

    version = importlib.metadata.version("uvicorn")
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    low, high = UVICORN_TESTED
    assert low <= major_minor <= high, (f"uvicorn {version} is outside the releases serve was tested with "
                                        f"({low} to {high}); check serve._guarded_http before widening the range")
    missing = [name for name in UVICORN_INTERNALS if not hasattr(httptools_impl, name)]
    assert not missing, f"uvicorn {version} no longer has {missing}, which serve._guarded_http uses"
    proto = httptools_impl.HttpToolsProtocol
    assert all(hasattr(proto, m) for m in ("connection_made", "data_received", "on_headers_complete",
                                            "on_message_complete", "on_response_complete", "send_400_response"))
