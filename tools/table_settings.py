"""A cell's settings record, `<experiments>/_cells/<cell>.settings`: the settings and the data a cell was
started with, so that a cell started with other ones is not taken for this one's (nor resumed with others).
"""
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from src.runtime.files import atomic_write  # noqa: E402
from src.runtime.cli import fail  # noqa: E402
from table_plan import CIFAR_FOLDERS  # noqa: E402

# What makes a cell's numbers besides its data set, method, epochs and seed: the environment settings that
# reach its runs (scripts/table_cell.sh -> script_unmix_c10.sh -> scripts/unmix_job.sh; at their defaults
# when unset), the number of its processes, and its data.
#   WORKERS: DataLoader workers make the released pipeline's crops (pretraining, the released linear probe,
#     fine-tuning) from streams seeded base + worker id, each worker making every n-th batch: another count
#     gives other crops (tests/test_reproduce_tables.py shows it).
#   SEMISUP_LABELS, SEMISUP_EXTRA_ARGS: the fine-tunings reported with the cell. DEVICE: other kernels.
#   The processes, hence the global batch, as many as will run (`processes`): through sbatch the task options
#     of SBATCH_ARGS (`tasks (SBATCH_ARGS)`; NPROC is ignored there, so not recorded); run here, the count
#     scripts/unmix_job.sh starts (`NPROC`: as set, else one per visible GPU, at least 1; SBATCH_ARGS unused).
# Left out on purpose: PYTHON and CODE_DIR (which software runs, not a setting of the cell), SBATCH_ARGS
# otherwise (partition, time, memory, CPUs: where and how long), REPORT_SBATCH_ARGS (the report job).
CELL_SETTINGS = {"BATCH_SIZE": "128", "ARCH": "resnet18", "EVAL_EPOCHS": "100", "AUGMENT": "",
                 "EXTRA_ARGS": "", "EVAL_EXTRA_ARGS": "", "WORKERS": "2", "SEMISUP_LABELS": "",
                 "SEMISUP_EXTRA_ARGS": "", "DEVICE": ""}
TASKS = "tasks (SBATCH_ARGS)"
TASK_OPTIONS = (("-N", "--nodes"), ("-n", "--ntasks"), (None, "--ntasks-per-node"))
# The record's format. 1 (no "format" in it; earlier versions): CELL_SETTINGS up to EVAL_EXTRA_ARGS, NPROC,
# and the data's identity from each file's first 64 KiB. 2: all of the above, the data's identity from every
# byte. 3: the processes as `processes` gives them; formats 1 and 2 recorded NPROC and the task options of
# SBATCH_ARGS as set, wherever the cell ran (`processes_as_set`), and are compared on those.
FORMAT = 3
FORMAT_1_SETTINGS = ("BATCH_SIZE", "ARCH", "EVAL_EPOCHS", "AUGMENT", "NPROC", "EXTRA_ARGS", "EVAL_EXTRA_ARGS",
                     "DATASET_PATH", "data")
FORMAT_1_HEAD = 1 << 16


def data_identity(path, head=None):
    """A data-set keyword as it is; a folder: SHA-1 over its files' relative paths, sizes and contents
    (another data set, subset, export or any changed byte changes it; a copy elsewhere does not). With
    `head`, each file's first `head` bytes only (format 1 of the record)."""
    if path in CIFAR_FOLDERS:
        return path
    digest = hashlib.sha1()
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            try:
                with open(full, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    content = hashlib.sha1(f.read(1 << 20 if head is None else head))  # then the rest:
                    while head is None and (piece := f.read(1 << 20)):
                        content.update(piece)
            except OSError:
                continue
            digest.update(f"{os.path.relpath(full, path)}\0{size}\0".encode() + content.digest())
    return digest.hexdigest()


def slurm_tasks(sbatch_args):
    """The options of `sbatch_args` that set a job's number of tasks, as `--nodes=2 --ntasks-per-node=4`
    (the last of each wins, as in sbatch); '' when none."""
    try:
        words = shlex.split(sbatch_args)
    except ValueError:  # unbalanced quotes: sbatch is never reached (shlex.split fails there too)
        words = sbatch_args.split()
    found = {}
    for i, word in enumerate(words):
        for short, long in TASK_OPTIONS:
            if word in (short, long):
                found[long] = words[i + 1] if i + 1 < len(words) else ""
            elif word.startswith(long + "="):
                found[long] = word[len(long) + 1:]
            elif short and word.startswith(short) and not word.startswith("--"):
                found[long] = word[len(short):]
    return " ".join(f"{k}={v}" for k, v in sorted(found.items()))


def _visible_gpus(environ):
    """The GPUs scripts/unmix_job.sh counts: CUDA_VISIBLE_DEVICES's entries where it is set, else nvidia-smi's."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        devices = environ["CUDA_VISIBLE_DEVICES"]
        return 0 if devices in ("", "-1") else len(devices.split(","))
    smi = shutil.which("nvidia-smi", path=environ.get("PATH"))
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=60).stdout if smi else ""
    except (OSError, subprocess.SubprocessError):
        listed = ""
    return sum(1 for line in listed.splitlines() if line.startswith("GPU"))


def processes(environ, through_sbatch):
    """What sets the number of a cell's processes where it runs, the other entry '' (ignored there): through
    sbatch the task options of SBATCH_ARGS; run here the count scripts/unmix_job.sh starts (NPROC as set,
    else one per visible GPU and at least 1; inside a Slurm allocation srun's SLURM_NTASKS)."""
    if through_sbatch:
        return {"NPROC": "", TASKS: slurm_tasks(environ.get("SBATCH_ARGS", ""))}
    if environ.get("SLURM_JOB_ID"):
        return {"NPROC": environ.get("SLURM_NTASKS") or "1", TASKS: ""}
    nproc = " ".join(environ.get("NPROC", "").split())
    return {"NPROC": nproc or str(max(_visible_gpus(environ), 1)), TASKS: ""}


def processes_as_set(environ):
    """NPROC and the task options of SBATCH_ARGS as records of formats 1 and 2 hold them."""
    return {"NPROC": " ".join(environ.get("NPROC", "").split()), TASKS: slurm_tasks(environ.get("SBATCH_ARGS", ""))}


def cell_settings(environ, dataset_path, data_id, through_sbatch):
    """The settings a cell of the data at `dataset_path` (identity `data_id`) runs with, through sbatch or here."""
    out = {k: " ".join(environ.get(k, "").split()) or default for k, default in CELL_SETTINGS.items()}
    out.update(processes(environ, through_sbatch), DATASET_PATH=dataset_path, data=data_id)
    return out


def settings_path(cells_dir, cell):
    return os.path.join(cells_dir, f"{cell.name}.settings")


def write_settings(cells_dir, cell, settings):
    text = json.dumps(dict(settings, format=FORMAT), indent=1, sort_keys=True) + "\n"
    atomic_write(settings_path(cells_dir, cell), lambda f: f.write(text.encode()))


def read_settings(cells_dir, cell):
    """The cell's record, or None when there is none readable (a cell of a version before the records)."""
    try:
        with open(settings_path(cells_dir, cell)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None


def changed_settings(recorded, settings, format_1_data, as_set=None):
    """`["NAME: recorded -> now", ...]` for the settings in `recorded` that differ from `settings`; [] when
    they are the same or nothing was recorded. A record of format 1 or 2 is compared on what it holds: its
    processes against `as_set` (`processes_as_set`), a format 1's data against `format_1_data()` (the data's
    identity as that format computed it)."""
    if recorded is None:
        return []
    now = dict(settings)
    if recorded.get("format", 1) < 3 and as_set is not None:
        now.update(as_set)
    if recorded.get("format", 1) == 1:
        now = {k: v for k, v in now.items() if k in FORMAT_1_SETTINGS}
        now["data"] = format_1_data()

    def shown(name, value):  # the data's digest in short
        return f"{value[:12]}..." if name == "data" and isinstance(value, str) and len(value) > 15 else repr(value)
    return [f"{k}: {shown(k, recorded.get(k))} -> {shown(k, v)}" for k, v in now.items() if recorded.get(k) != v]


def compare_with_records(cells, cells_dir, settings, as_set=None):
    """({cell: changed_settings}, [cells recorded in format 1]) for `settings` ({data set: cell_settings});
    `as_set`: `processes_as_set`, for records of formats 1 and 2."""
    format_1_data = {}  # the data's identity as format 1 computed it, per data set, only where needed

    def earlier(ds):
        if ds not in format_1_data:
            format_1_data[ds] = data_identity(settings[ds]["DATASET_PATH"], head=FORMAT_1_HEAD)
        return format_1_data[ds]
    recorded = {c.name: read_settings(cells_dir, c) for c in cells}
    changes = {c.name: changed_settings(recorded[c.name], settings[c.dataset], lambda ds=c.dataset: earlier(ds),
                                        as_set) for c in cells}
    return changes, [c.name for c in cells if recorded[c.name] is not None and recorded[c.name].get("format", 1) == 1]


def format_1_note(names):
    """One line for the cells recorded in format 1 (a table begun by an earlier version), or ''."""
    if not names:
        return ""
    unchecked = [k for k in CELL_SETTINGS if k not in FORMAT_1_SETTINGS] + [TASKS]
    return (f"{len(names)} cell(s) recorded by an earlier version ({names[0]}{', ...' if len(names) > 1 else ''}): "
            f"their {', '.join(unchecked)} and the data past each file's first 64 KiB are not checked")


def refuse_other_settings(cells, statuses, changes, cells_dir):
    """Stop (one line) when a started cell ran with other settings: its results would be taken for these
    settings', and resuming it would mix both."""
    other = [c for c in cells if changes[c.name] and statuses[c.name][0] != "missing"]
    if other:
        c, more = other[0], f" (and {len(other) - 1} more cell(s))" if len(other) > 1 else ""
        fail(f"cell {c.name} was started with other settings ({'; '.join(changes[c.name])}){more}; rerun with "
             f"the same settings, use another --experiments folder, or move {c.experiment_path}, {c.eval_path} "
             f"and {cells_dir}/{c.name}.* away to run it again")
