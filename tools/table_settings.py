"""A cell's settings record, `<experiments>/_cells/<cell>.settings`: the settings and the data a cell was
started with, so that a cell started with other ones is not taken for this one's (nor resumed with others).
"""
import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from src.runtime.checkpoint import atomic_write  # noqa: E402
from src.runtime.cli import fail  # noqa: E402
from table_plan import CIFAR_FOLDERS  # noqa: E402

# What makes a cell's numbers besides its data set, method, epochs and seed: the environment settings that
# reach its runs (at the SBATCH scripts' defaults when unset; not WORKERS, PYTHON, SBATCH_ARGS: they do not
# change the numbers, nor SEMISUP_*: a cell is done by its linear evaluation), and its data.
CELL_SETTINGS = {"BATCH_SIZE": "128", "ARCH": "resnet18", "EVAL_EPOCHS": "100", "AUGMENT": "", "NPROC": "",
                 "EXTRA_ARGS": "", "EVAL_EXTRA_ARGS": ""}


def data_identity(path):
    """A data-set keyword as it is; a folder: SHA-1 over its files' relative paths, sizes and first 64 KiB
    (another data set, subset or export changes it; a copy elsewhere does not)."""
    if path in CIFAR_FOLDERS:
        return path
    digest = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                with open(full, "rb") as f:
                    head, size = f.read(1 << 16), os.fstat(f.fileno()).st_size
            except OSError:
                continue
            digest.update(f"{os.path.relpath(full, path)}\0{size}\0".encode() + hashlib.sha1(head).digest())
    return digest.hexdigest()


def cell_settings(environ, dataset_path, data_id):
    """The settings a cell of the data at `dataset_path` (identity `data_id`) runs with."""
    out = {k: " ".join(environ.get(k, "").split()) or default for k, default in CELL_SETTINGS.items()}
    out.update(DATASET_PATH=dataset_path, data=data_id)
    return out


def settings_path(cells_dir, cell):
    return os.path.join(cells_dir, f"{cell.name}.settings")


def write_settings(cells_dir, cell, settings):
    text = json.dumps(settings, indent=1, sort_keys=True) + "\n"
    atomic_write(settings_path(cells_dir, cell), lambda f: f.write(text.encode()))


def changed_settings(cells_dir, cell, settings):
    """`["NAME: recorded -> now", ...]` for the settings the cell was started with that differ from
    `settings`; [] when they are the same or nothing (readable) was recorded (a cell of an earlier version)."""
    try:
        with open(settings_path(cells_dir, cell)) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return []
    if not isinstance(old, dict):
        return []

    def shown(name, value):  # the data's digest in short
        return f"{value[:12]}..." if name == "data" and isinstance(value, str) and len(value) > 15 else repr(value)
    return [f"{k}: {shown(k, old.get(k))} -> {shown(k, v)}" for k, v in settings.items() if old.get(k) != v]


def refuse_other_settings(cells, statuses, changes, cells_dir):
    """Stop (one line) when a started cell ran with other settings: its results would be taken for these
    settings', and resuming it would mix both."""
    other = [c for c in cells if changes[c.name] and statuses[c.name][0] != "missing"]
    if other:
        c, more = other[0], f" (and {len(other) - 1} more cell(s))" if len(other) > 1 else ""
        fail(f"cell {c.name} was started with other settings ({'; '.join(changes[c.name])}){more}; rerun with "
             f"the same settings, use another --experiments folder, or move {c.experiment_path}, {c.eval_path} "
             f"and {cells_dir}/{c.name}.* away to run it again")
