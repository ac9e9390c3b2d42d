"""The layout of src/: layers that import in one direction, and modules and functions of a readable size."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
# What each layer may import from src: the method and the data know nothing else of the project; the
# runtime runs them; the evaluations use all three. Nothing in src imports an entry script or the tests.
ALLOWED = {
    "method": {"method"},
    "data": {"data"},
    "runtime": {"runtime", "method", "data"},
    "eval": {"eval", "runtime", "method", "data"},
}
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 80


def modules():
    return sorted(p for p in SRC.rglob("*.py"))


def imported_layers(path):
    """The src layers a module imports (absolute `src.x` and relative `..x` / `.x` imports)."""
    layer = path.relative_to(SRC).parts[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.split(".")[0] == "src":
                parts = node.module.split(".")[1:]
                found.add(parts[0] if parts else "?")
            elif node.level == 1:
                found.add(layer)
            elif node.level == 2:
                found.add((node.module or "").split(".")[0] or "?")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if top in ("src", "tests", "main_swav_unmix", "eval_linear", "eval_semisup", "tools", "benchmarks"):
                    found.add(alias.name.split(".")[1] if top == "src" and "." in alias.name else top)
    return found


@pytest.mark.parametrize("path", [p for p in modules() if p.parent != SRC], ids=lambda p: str(p.relative_to(SRC)))
def test_layers_import_in_one_direction(path):
    layer = path.relative_to(SRC).parts[0]
    assert layer in ALLOWED, f"{path}: a module outside the four layers"
    wrong = imported_layers(path) - ALLOWED[layer]
    assert not wrong, f"{path.relative_to(SRC)} ({layer}) imports {sorted(wrong)}"


def test_every_layer_says_what_it_owns():
    for layer in ALLOWED:
        doc = ast.get_docstring(ast.parse((SRC / layer / "__init__.py").read_text()))
        assert doc and len(doc) > 80, f"src/{layer}/__init__.py has no docstring saying what it owns"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_modules_and_functions_are_short(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path}: {len(text.splitlines())} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name} has {length} lines"
