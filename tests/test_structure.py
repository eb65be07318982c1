"""The shape of the code that the README and docs/DESIGN.md promise: subpackages by stage whose imports
run one way (cli -> stages -> core), torch only in training and export, short modules and functions,
each vocabulary defined once, and uvicorn used only within the releases serve was tested with."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "resnet_edge"

# Which subpackage may import which: the inference side (core, inference, serving, deploy, bench's ONNX
# Runtime cells) never needs torch; training and export do. The CLI may import them all.
ALLOWED = {
    "core": set(),
    "inference": {"core"},
    "training": {"core"},
    "export": {"core", "inference", "training"},
    "bench": {"core", "inference", "training"},  # training: only to load a checkpoint for its PyTorch cells
    "serving": {"core", "inference"},
    "deploy": {"core", "inference"},
    "cli": {"core", "inference", "training", "export", "bench", "serving", "deploy"},
}
TORCH_AT_MODULE_LEVEL = {"training", "export"}
MAX_MODULE_LINES = 400
# Loose modules kept at an old import path, each an alias of the module that moved (with a
# DeprecationWarning): old path -> new home.
DEPRECATED_ALIASES = {"proto": "resnet_edge.serving.proto"}
MAX_FUNCTION_LINES = 60


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _subpackage(path: Path) -> str | None:
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def _imported_subpackages(path: Path) -> set[str]:
    """Every resnet_edge subpackage that the module imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        assert not (isinstance(node, ast.ImportFrom) and node.level), f"{path}: relative import"
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("resnet_edge."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("resnet_edge."))
    return found


def test_the_tree_has_its_rooms():
    rooms = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert rooms == set(ALLOWED), rooms
    loose = {p.name for p in PACKAGE.glob("*.py")} - {"__init__.py", "__main__.py"}
    assert loose == {f"{name}.py" for name in DEPRECATED_ALIASES}, f"modules outside a subpackage: {loose}"


@pytest.mark.parametrize("old", sorted(DEPRECATED_ALIASES))
def test_a_deprecated_alias_is_the_moved_module_and_warns(old):
    """`from resnet_edge.<old> import ...` (what a client program written before the rooms does) gets the
    very module that moved, and a DeprecationWarning naming the new home; the alias holds no code."""
    new = DEPRECATED_ALIASES[old]
    code = (
        "import importlib, warnings\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        f"    old = importlib.import_module('resnet_edge.{old}')\n"
        f"assert old is importlib.import_module('{new}'), old\n"
        f"assert [str(w.message) for w in seen if w.category is DeprecationWarning and '{new}' in str(w.message)], "
        "[str(w.message) for w in seen]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    body = ast.parse((PACKAGE / f"{old}.py").read_text()).body
    assert not [n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


@pytest.mark.parametrize("room", sorted(ALLOWED))
def test_subpackages_import_only_what_they_may(room):
    for path in _modules():
        if _subpackage(path) == room:
            bad = _imported_subpackages(path) - ALLOWED[room] - {room}
            assert not bad, f"{path.relative_to(PACKAGE)} imports {bad}; {room} may import {ALLOWED[room] or 'none'}"


def test_no_import_cycle_between_subpackages():
    """The allowed graph itself is acyclic, so code that obeys it has no cycle."""
    order: list[str] = []
    remaining = dict(ALLOWED)
    while remaining:
        ready = [room for room, deps in remaining.items() if deps <= set(order)]
        assert ready, f"cycle among {sorted(remaining)}"
        order += ready
        for room in ready:
            del remaining[room]


def _top_level_imports(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_torch_is_imported_at_module_level_only_in_training_and_export():
    offenders = [
        str(path.relative_to(PACKAGE))
        for path in _modules()
        if _subpackage(path) not in TORCH_AT_MODULE_LEVEL
        and {"torch", "torchvision"} & _top_level_imports(ast.parse(path.read_text()))
    ]
    assert not offenders, offenders


def test_modules_and_functions_are_short():
    long_modules, long_functions = [], []
    for path in _modules():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long_modules.append(f"{path.relative_to(PACKAGE)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}: {length} lines")
    assert not long_modules and not long_functions, long_modules + long_functions


def test_inference_side_imports_no_torch():
    """What an edge box runs (eval of .onnx, bench --no-torch, serve, predict, package) imports no torch."""
    inference_side = [
        "resnet_edge." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts)
        for p in _modules()
        if _subpackage(p) in {"core", "inference", "serving", "deploy", "bench"} and p.name != "__main__.py"
    ]
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in inference_side)
        + "from resnet_edge.cli import app\n"
        + "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# Literal -> the one module allowed to spell it (docstrings and comments aside).
VOCABULARY = {
    **dict.fromkeys([28, 784, "pixels", "logits", "checkpoint.pt", "train.json", "export.json", "bench.json"], "contract"),
    # one variant table: file names, bench names, repository suffixes
    **dict.fromkeys(["model.onnx", "model.int8.onnx", "model.fp16.onnx", "onnx-fp32", "onnx-int8", "onnx-fp16"],
                    "contract"),
    **dict.fromkeys(["_int8", "_fp16"], "contract"),
    # one provider vocabulary
    **dict.fromkeys(["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"], "providers"),
}


def _code_constants(tree: ast.Module):
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and id(n) not in docstrings
            and not isinstance(n.value, bool) and isinstance(n.value, (int, str))]


def test_the_contract_variant_and_provider_vocabularies_are_each_defined_once():
    """Code spells no tensor name, input size, run-folder file name, variant name or provider name outside
    the one module that defines it (core/contract.py, core/providers.py)."""
    offenders = []
    for path in _modules():
        for node in _code_constants(ast.parse(path.read_text())):
            home = VOCABULARY.get(node.value)
            if home is not None and path.stem != home:
                offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.value!r} (belongs in {home})")
    assert not offenders, offenders


def test_uvicorn_is_a_release_serve_was_tested_with():
    """serve subclasses uvicorn's httptools protocol and reads private fields (cycle, server_state): a
    release outside pyproject's range may break it silently, so this says which and why."""
    import importlib.metadata

    from uvicorn.protocols.http import httptools_impl

    from resnet_edge.serving.uvicorn_fence import UVICORN_INTERNALS, UVICORN_TESTED

    version = importlib.metadata.version("uvicorn")
    major_minor = tuple(int(p) for p in version.split(".")[:2])
    low, high = UVICORN_TESTED
    assert low <= major_minor <= high, (f"uvicorn {version} is outside the releases serve was tested with "
                                        f"({low} to {high}); check resnet_edge/serving/uvicorn_fence.py before widening the range")
    missing = [name for name in UVICORN_INTERNALS if not hasattr(httptools_impl, name)]
    assert not missing, f"uvicorn {version} no longer has {missing}, which resnet_edge/serving/uvicorn_fence.py uses"
    proto = httptools_impl.HttpToolsProtocol
    assert all(hasattr(proto, m) for m in ("connection_made", "data_received", "on_headers_complete",
                                            "on_message_complete", "on_response_complete", "send_400_response"))
