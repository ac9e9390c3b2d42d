"""Who imports whom: src/data and src/method <- src/runtime <- src/eval <- the entry scripts; tools/ and
benchmarks/ import from src (and tools/); nothing but the tests imports from tests/."""
import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# what each place may import from the repository
ALLOWED = {
    "src/data": {"src.data"},
    "src/method": {"src.data", "src.method"},
    "src/runtime": {"src.data", "src.method", "src.runtime"},
    "src/eval": {"src.data", "src.method", "src.runtime", "src.eval"},
    "tools": {"src", "tools"},
    "benchmarks": {"src", "tools", "benchmarks", "main_swav_unmix"},
}
OURS = ("src", "tools", "benchmarks", "tests", "main_swav_unmix", "eval_linear", "eval_semisup")


def repository_imports(path, package):
    """The repository modules a file imports, relative imports resolved against `package`."""
    names = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                names.append(".".join(base + ([node.module] if node.module else [])))
            else:
                names.append(node.module)
    return [n for n in names if n.split(".")[0] in OURS]


def files(folder):
    for dirpath, _, filenames in os.walk(os.path.join(ROOT, folder)):
        yield from (os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))


@pytest.mark.parametrize("folder", list(ALLOWED))
def test_layers_import_only_from_below(folder):
    wrong = []
    for path in files(folder):
        package = os.path.relpath(os.path.dirname(path), ROOT).replace(os.sep, ".")
        wrong += [f"{os.path.relpath(path, ROOT)}: {name}" for name in repository_imports(path, package)
                  if not any(name == a or name.startswith(a + ".") for a in ALLOWED[folder])]
    assert wrong == []


def test_the_check_sees_a_wrong_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\nfrom tests.fake_cifar import write_cifar10\nfrom ..eval import setup\n")
    assert repository_imports(str(bad), "src.runtime") == ["tests.fake_cifar", "src.eval"]


# The tools that read files and start jobs load no checkpoint: importing torch (and with it NumPy) would
# double their start-up. tools/results.py imports pandas and matplotlib only where it reads stats and draws
# (about half a second), so its --help and argument errors answer at once.
def imported_modules(tool, *args):
    """(the process, the modules that `python -X importtime TOOL ARGS` imported)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, tool), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    lines = proc.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert "src.runtime.cli" in imported  # the listing was read
    return proc, imported


@pytest.mark.parametrize("tool, heavy", [("tools/reproduce_tables.py", {"torch", "numpy", "pandas"}),
                                         ("tools/results.py", {"torch", "numpy", "pandas", "matplotlib"}),
                                         ("tools/synthetic_cifar.py", {"torch"})])
def test_tools_start_without_torch(tool, heavy):
    proc, imported = imported_modules(tool, "--help")
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stderr[-2000:]
    assert sorted(heavy & imported) == []


@pytest.mark.parametrize("args", [["--no-such-flag"], [], ["no_such_folder"], ["--plan", "no_such_plan.tsv"]])
def test_results_tool_refuses_bad_arguments_without_pandas(args):
    proc, imported = imported_modules("tools/results.py", *args)
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 2 and errors and errors[-1].startswith("error:"), errors
    assert sorted({"pandas", "matplotlib", "numpy"} & imported) == []
