"""The cells of a published table (data set x method x pretraining epochs x seed) and the plan file that
lists them (`<experiments>/_cells/plan-<hash>.tsv`, one row per cell; a job array task reads its row by
index): which data sets and methods there are, each data set's --data_path, the evaluation folder's name.
"""
import hashlib
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from src.runtime.files import atomic_write  # noqa: E402

DATASETS = {"c10": "cifar10", "c100": "cifar100"}        # short name (cell names) -> data set
SHORT = {v: k for k, v in DATASETS.items()}
SCRIPTS = {"cifar10": "script_unmix_c10.sh", "cifar100": "script_unmix_c100.sh"}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {"cifar10": ("data_batch_1", "batches.meta"), "cifar100": ("train", "meta")}  # found inside them
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
METHODS = {"swav": "SwAV", "unmix": "Un-Mix"}            # short name -> name in tools/published.py
RUN_SWAV = {"swav": "True", "unmix": "False"}
PLAN_COLUMNS = ("index", "cell", "data_set", "method", "epochs", "seed", "script", "run_swav",
                "experiment_path", "eval_path", "dataset_path")


@dataclass(frozen=True)
class Cell:
    index: int
    name: str
    dataset: str          # cifar10 | cifar100
    method: str           # swav | unmix
    epochs: int
    seed: int
    experiment_path: str  # pretraining dump (absolute)
    eval_path: str        # its linear evaluation (absolute)
    dataset_path: str     # --data_path of the cell


def parse_names(text, option, choices):
    """'a,b' -> ['a', 'b'] (order kept, duplicates dropped); ValueError names the unknown entry."""
    names = []
    for name in (t.strip().lower() for t in text.split(",")):
        if name not in choices:
            raise ValueError(f"{option}: unknown {name!r} (choose from {', '.join(choices)})")
        if name not in names:
            names.append(name)
    return names


def parse_counts(text, option, minimum):
    """'200,400' -> [200, 400]; ValueError for a non-integer or a value below `minimum`."""
    out = []
    for t in (t.strip() for t in text.split(",")):
        try:
            v = int(t)
        except ValueError:
            raise ValueError(f"{option}: {t!r} is not an integer") from None
        if v < minimum:
            raise ValueError(f"{option}: {v} must be {'positive' if minimum == 1 else f'>= {minimum}'}")
        if v not in out:
            out.append(v)
    return out


def _class_folders(folder):
    try:
        return sum(1 for e in os.scandir(folder) if e.is_dir())
    except OSError:
        return 0


def dataset_path_for(dataset, environ):
    """The --data_path of `dataset`'s cells from DATASET_PATH_C10 / DATASET_PATH_C100, else DATASET_PATH
    (a keyword, a folder holding or being the python-version CIFAR folder, or an image folder with the
    data set's number of classes), else the keyword (the SBATCH scripts' default). A folder holding both
    CIFAR folders gives each data set its own. ValueError (one line) when the path lacks the data set."""
    own = f"DATASET_PATH_{SHORT[dataset].upper()}"
    name = own if environ.get(own) else "DATASET_PATH"
    value = environ.get(name, "")
    if not value:
        return dataset
    hint = f"; set {own} to the folder of {dataset}" if name == "DATASET_PATH" else ""
    if value in CIFAR_FOLDERS:
        if value != dataset:
            raise ValueError(f"{name}={value} lacks {dataset} (the keyword names {value}){hint}")
        return value
    path = os.path.abspath(value)
    if not os.path.isdir(path):
        raise ValueError(f"{name}={value} is not a folder nor a keyword (cifar10, cifar100)")
    folder = CIFAR_FOLDERS[dataset]
    if os.path.isdir(os.path.join(path, folder)):
        return os.path.join(path, folder)
    if os.path.basename(path) == folder or all(os.path.isfile(os.path.join(path, f)) for f in CIFAR_FILES[dataset]):
        return path
    if os.path.isdir(os.path.join(path, "test")) and \
            _class_folders(os.path.join(path, "train")) == NUM_CLASSES[dataset]:
        return path
    raise ValueError(f"{name}={value} lacks {dataset}: expected {folder}/ in it, or an image folder whose "
                     f"train/ holds {NUM_CLASSES[dataset]} class folders{hint}")


def eval_folder_suffix(eval_extra_args):
    """The job body's evaluation folder suffix: `_linear_eval`, or `_linear_eval_cached` when
    EVAL_EXTRA_ARGS asks for the cached probe (the last --probe wins, as in argparse)."""
    probe, words = "released", eval_extra_args.split()
    for i, w in enumerate(words):
        if w == "--probe" and i + 1 < len(words):
            probe = words[i + 1]
        elif w.startswith("--probe="):
            probe = w[len("--probe="):]
    return "_linear_eval_cached" if probe == "cached" else "_linear_eval"


def plan_cells(datasets, methods, epochs, seeds, experiments, dataset_paths, eval_suffix):
    """Every cell, data set-major as in the published tables."""
    cells = []
    for ds in datasets:
        for m in methods:
            for ep in epochs:
                for seed in seeds:
                    name = f"{SHORT[ds]}_{m}_{ep}ep_seed{seed}"
                    folder = os.path.join(experiments, name)
                    cells.append(Cell(len(cells), name, ds, m, ep, seed, folder, folder + eval_suffix,
                                      dataset_paths[ds]))
    return cells


def plan_text(cells):
    rows = ["\t".join(PLAN_COLUMNS)]
    for c in cells:
        rows.append("\t".join(str(v) for v in (c.index, c.name, c.dataset, c.method, c.epochs, c.seed,
                                                 SCRIPTS[c.dataset], RUN_SWAV[c.method], c.experiment_path,
                                                 c.eval_path, c.dataset_path)))
    return "\n".join(rows) + "\n"


def write_plan(cells_dir, cells):
    """Write the plan as `plan-<hash of its content>.tsv`: the same cells always give the same file, so
    rewriting it never changes a file that queued tasks will read. Returns its path."""
    text = plan_text(cells)
    path = os.path.join(cells_dir, f"plan-{hashlib.sha1(text.encode()).hexdigest()[:10]}.tsv")
    atomic_write(path, lambda f: f.write(text.encode()))
    return path


def read_plan(path):
    with open(path) as f:
        lines = f.read().splitlines()
    if not lines or tuple(lines[0].split("\t")) != PLAN_COLUMNS:
        raise ValueError(f"{path} is not a plan of scripts/reproduce_tables.sh")
    cells = []
    for line in lines[1:]:
        v = dict(zip(PLAN_COLUMNS, line.split("\t")))
        cells.append(Cell(int(v["index"]), v["cell"], v["data_set"], v["method"], int(v["epochs"]),
                          int(v["seed"]), v["experiment_path"], v["eval_path"], v["dataset_path"]))
    return cells
