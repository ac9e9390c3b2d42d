"""The layout of src/: four layers that say what they own, and modules and functions of a readable size."""
import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = ("method", "data", "runtime", "eval")  # who imports whom: tests/test_imports.py
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 80


def modules():
    return sorted(p for p in SRC.rglob("*.py"))


def test_every_layer_says_what_it_owns():
    for layer in LAYERS:
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
