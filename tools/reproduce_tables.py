#!/usr/bin/env python3
"""Reproduce the published tables: one run per cell (data set x method x pretraining epochs x seed).

Each cell is one run of script_unmix_c10.sh / script_unmix_c100.sh (pretraining, then linear evaluation)
in its own folder `<experiments>/<data set>_<method>_<epochs>ep_seed<seed>`. Under Slurm the cells go
into one job array (scripts/table_cell.sh) and a final job, once every task has ended (afterany), runs
tools/results.py over them into the report folder; without Slurm (or with --local) the cells run here one
after another, then the report is written. Finished cells are skipped and interrupted ones resume.

Usage, options and environment: scripts/reproduce_tables.sh (its header), or --help.

Book-keeping lives in `<experiments>/_cells/`: the plan (one row per cell; a job array task reads its row
by index), and per cell `<cell>.log` (output of every attempt), `<cell>.state` (one line:
`queued JOB`, `running JOB` or `exit STATUS JOB`, then the time), written atomically, and `<cell>.settings`
(the settings and data it was started with: a cell started with other ones is not taken for this one's).
"""
import argparse
import hashlib
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from src.runtime.checkpoint import atomic_write  # noqa: E402
from src.runtime.cli import fail  # noqa: E402

TABLE_CELL = os.path.join(ROOT, "scripts", "table_cell.sh")
RESULTS = os.path.join(ROOT, "tools", "results.py")

DATASETS = {"c10": "cifar10", "c100": "cifar100"}        # short name (cell names) -> data set
SHORT = {v: k for k, v in DATASETS.items()}
SCRIPTS = {"cifar10": "script_unmix_c10.sh", "cifar100": "script_unmix_c100.sh"}
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {"cifar10": ("data_batch_1", "batches.meta"), "cifar100": ("train", "meta")}  # found inside them
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}
METHODS = {"swav": "SwAV", "unmix": "Un-Mix"}            # short name -> name in tools/published.py
RUN_SWAV = {"swav": "True", "unmix": "False"}
PUBLISHED_EPOCHS = "200,400,600,800,1000"

# What a cell sets itself: the same setting given for every cell would silently lose.
SET_PER_CELL = {"EPOCHS": "--epochs", "RUN_SWAV": "--methods", "EXPERIMENT_PATH": "--experiments"}
FLAGS_PER_CELL = ("--seed", "--epochs", "--run_swav", "--dump_path", "--data_path", "--pretrained")
EXIT_MEANING = {2: "bad input", 11: "pretraining failed", 21: "linear evaluation failed"}
PLAN_COLUMNS = ("index", "cell", "data_set", "method", "epochs", "seed", "script", "run_swav",
                "experiment_path", "eval_path", "dataset_path")
STATUSES = ("done", "running", "pending", "failed", "interrupted", "missing")
# What makes a cell's numbers besides its data set, method, epochs and seed: the environment settings that
# reach its runs (at the SBATCH scripts' defaults when unset; not WORKERS, PYTHON, SBATCH_ARGS: they do not
# change the numbers, nor SEMISUP_*: a cell is done by its linear evaluation), and its data.
CELL_SETTINGS = {"BATCH_SIZE": "128", "ARCH": "resnet18", "EVAL_EPOCHS": "100", "AUGMENT": "", "NPROC": "",
                 "EXTRA_ARGS": "", "EVAL_EXTRA_ARGS": ""}


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


# ----------------------------------------------------------------------------------------------- the plan

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


# ----------------------------------------------------------------------------------------------- settings

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


# ----------------------------------------------------------------------------------------------- states

def state_path(cells_dir, cell):
    return os.path.join(cells_dir, f"{cell.name}.state")


def write_state(cells_dir, cell, text):
    line = f"{text} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
    atomic_write(state_path(cells_dir, cell), lambda f: f.write(line.encode()))


def read_state(cells_dir, cell):
    """(word, job, exit status or None) of the cell's last record, or None."""
    try:
        with open(state_path(cells_dir, cell)) as f:
            words = f.read().split()
    except OSError:
        return None
    if len(words) >= 3 and words[0] == "exit" and words[1].lstrip("-").isdigit():
        return "exit", words[2], int(words[1])
    if len(words) >= 2 and words[0] in ("queued", "running"):
        return words[0], words[1], None
    return None


def slurm_queue(environ):
    """{job id: 'pending' | 'running'} for every job and array task in the queue (array tasks as
    ARRAYID_INDEX); None when squeue is missing or fails (then no job is known to be alive)."""
    if shutil.which("squeue", path=environ.get("PATH")) is None:
        return None
    try:
        r = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T"], env=environ, capture_output=True, text=True,
                           timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if r.returncode != 0:
        return None
    queue = {}
    for line in r.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            queue[parts[0]] = "running" if parts[1] in ("RUNNING", "COMPLETING", "CONFIGURING") else "pending"
    return queue


def _local_job_alive(job, host):
    """A job id `local:PID.START@HOST` (START: the process's start time in clock ticks after boot, field 22
    of /proc/PID/stat; absent in older records) of this host whose process still runs and is still that
    cell's shell: a PID that a later process reuses has another start time, or another command line."""
    pid_start, _, job_host = job[len("local:"):].partition("@")
    pid, _, start = pid_start.partition(".")
    if job_host != host or not pid.isdigit():
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    if fields[0] == "Z" or (start and fields[19] != start):
        return False
    return any(os.path.basename(a) == b"table_cell.sh" for a in argv)


def cell_status(cell, cells_dir, queue, host):
    """(status, detail): done (its evaluation wrote results.json), running / pending (its job is in the
    queue, or its local process runs), failed (the job body ended with an error status), interrupted
    (started, neither finished nor alive: preempted, killed, cancelled), missing (never started)."""
    if os.path.isfile(os.path.join(cell.eval_path, "results.json")):
        return "done", ""
    state = read_state(cells_dir, cell)
    if state is not None:
        word, job, rc = state
        if queue is not None and job in queue:
            return queue[job], f"job {job}"
        if job.startswith("local:") and word == "running" and _local_job_alive(job, host):
            return "running", f"pid {job[len('local:'):].partition('@')[0].partition('.')[0]}"
        if word == "exit" and rc not in (0, 3):
            return "failed", f"exit {rc}: {EXIT_MEANING.get(rc, 'error')}, job {job}"
        return "interrupted", f"last record: {word}{'' if rc is None else f' {rc}'}, job {job}"
    if os.path.isdir(cell.experiment_path):
        return "interrupted", "its folder exists"
    return "missing", ""


def array_spec(indices):
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (sbatch --array)."""
    parts, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


# ----------------------------------------------------------------------------------------------- running

def _sbatch(argv, environ):
    try:
        r = subprocess.run(["sbatch", "--parsable", *argv], env=environ, capture_output=True, text=True,
                           timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        fail(f"sbatch could not run ({e}); use --local to run the cells on this machine")
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["no message"])[-1]
        fail(f"sbatch failed: {msg}; use --local to run the cells on this machine")
    return r.stdout.strip().split(";")[0]


def print_cells(cells, statuses):
    width = max(len(c.name) for c in cells)
    for c in cells:
        status, detail = statuses[c.name]
        print(f"  {c.name:<{width}}  {c.dataset:<8}  {METHODS[c.method]:<6}  {c.epochs:>5} ep  seed {c.seed:<5}  "
              f"{status}{f' ({detail})' if detail else ''}")
    counts = {s: sum(1 for v in statuses.values() if v[0] == s) for s in STATUSES}
    print(f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))


def get_parser():
    p = argparse.ArgumentParser(
        prog="scripts/reproduce_tables.sh",
        description="Run every cell (data set x method x pretraining epochs x seed) of the published tables "
                    "and write the report. Environment overrides (DATASET_PATH, EXTRA_ARGS, ...) pass to every "
                    "cell as in script_unmix_c10.sh; see the header of scripts/reproduce_tables.sh.")
    p.add_argument("--datasets", default="c10,c100", help="comma-separated: c10, c100 (default: both)")
    p.add_argument("--methods", default="swav,unmix", help="comma-separated: swav, unmix (default: both)")
    p.add_argument("--epochs", default=PUBLISHED_EPOCHS, help=f"pretraining epochs (default {PUBLISHED_EPOCHS})")
    p.add_argument("--seeds", default="31", help="comma-separated seeds (default 31, the released seed)")
    p.add_argument("--experiments", default="experiments/tables", help="folder of the cells' experiment folders")
    p.add_argument("--report", default="report/tables", help="folder of the report (results.md, plots)")
    p.add_argument("--local", action="store_true", help="run the cells here one after another even if sbatch exists")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the plan; submit and run nothing")
    mode.add_argument("--status", action="store_true", help="show done / running / pending / failed / "
                                                            "interrupted / missing per cell")
    return p


def plan_from_args(args, environ):
    """The cells the options and the environment ask for, and each data set's path; bad input is one line."""
    try:
        datasets = [DATASETS[d] for d in parse_names(args.datasets.replace("cifar", "c"), "--datasets", DATASETS)]
        methods = parse_names(args.methods.replace("-", ""), "--methods", METHODS)
        epochs = parse_counts(args.epochs, "--epochs", 1)
        seeds = parse_counts(args.seeds, "--seeds", 0)
    except ValueError as e:
        fail(str(e))
    for var, option in SET_PER_CELL.items():
        if environ.get(var):
            fail(f"{var} is set per cell (by {option}); unset it")
    for var in ("EXTRA_ARGS", "EVAL_EXTRA_ARGS"):
        for word in environ.get(var, "").split():
            if word.split("=")[0] in FLAGS_PER_CELL:
                fail(f"{var} sets {word.split('=')[0]}, which each cell sets itself (use the options of this script)")
    try:
        dataset_paths = {ds: dataset_path_for(ds, environ) for ds in datasets}
    except ValueError as e:
        fail(str(e))
    experiments = os.path.abspath(args.experiments)
    if any(ch in experiments + "".join(dataset_paths.values()) for ch in "\t\n"):
        fail("folder names with tabs or newlines are not supported")
    cells = plan_cells(datasets, methods, epochs, seeds, experiments, dataset_paths,
                       eval_folder_suffix(environ.get("EVAL_EXTRA_ARGS", "")))
    print(f"{len(cells)} cells ({len(datasets)} data set(s) x {len(methods)} method(s) x {len(epochs)} epoch "
          f"count(s) x {len(seeds)} seed(s)) in {experiments}:")
    return cells, dataset_paths


def download_once(dataset_paths, todo):
    """Data-set keywords are downloaded here, once, before the cells start (not by every cell at once)."""
    for ds, path in dataset_paths.items():
        if path in CIFAR_FOLDERS and any(c.dataset == ds for c in todo):
            from src.data.datasets import DataError, load_split
            try:
                for train in (True, False):
                    load_split(path, train, download=True)
            except DataError as e:
                fail(str(e))


def submit_to_slurm(cells, todo, cells_dir, plan, queue, report, report_cmd, env, environ):
    """One job array for the cells to run, then a report job after every task of this table has ended."""
    states = [read_state(cells_dir, c) for c in cells]
    waiting = sorted({s[1] for s in states if s is not None and queue is not None and s[1] in queue})
    if todo:
        # held until every task has its "queued" record, so a task's own record is never overwritten
        array = _sbatch(["--hold", f"--array={array_spec([c.index for c in todo])}",
                         f"--output={cells_dir}/slurm-%A_%a.out",
                         *shlex.split(environ.get("SBATCH_ARGS", "")), TABLE_CELL, plan], env)
        for c in todo:
            write_state(cells_dir, c, f"queued {array}_{c.index}")
        r = subprocess.run(["scontrol", "release", array], env=env, capture_output=True, text=True)
        if r.returncode != 0:
            fail(f"job array {array} submitted held but 'scontrol release {array}' failed: {r.stderr.strip()}")
        print(f"submitted job array {array}: {len(todo)} cell(s), logs in {cells_dir}/<cell>.log")
        waiting.append(array)
    dependency = [f"--dependency=afterany:{':'.join(waiting)}"] if waiting else []
    job = _sbatch(["--job-name=unmix_table_report", f"--output={cells_dir}/report-%j.out", "--ntasks=1",
                   "--cpus-per-task=1", "--mem=1G", "--time=30", *dependency,
                   *shlex.split(environ.get("REPORT_SBATCH_ARGS", "")), "--wrap", shlex.join(report_cmd)], env)
    print(f"submitted report job {job}" + (f" (after {', '.join(waiting)})" if waiting else "")
          + f": {report}/results.md")
    return 0


def run_here(todo, cells_dir, plan, host, report, report_cmd, env):
    """The cells one after another on this machine, then the report. Returns 1 when a cell failed."""
    failed = []
    for k, c in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] {c.name}: running, log {cells_dir}/{c.name}.log", flush=True)
        rc = subprocess.run(["bash", TABLE_CELL, plan, str(c.index)], env=env).returncode
        status, detail = cell_status(c, cells_dir, None, host)
        print(f"[{k}/{len(todo)}] {c.name}: {status}{f' ({detail})' if detail else ''}", flush=True)
        if rc != 0:
            failed.append(c.name)
    rc = subprocess.run(report_cmd, env=env, stdout=subprocess.DEVNULL).returncode
    if rc != 0:
        fail(f"the report failed (exit {rc}): {shlex.join(report_cmd)}")
    print(f"report: {report}/results.md" + (f"; {len(failed)} cell(s) failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def main(argv=None, environ=None):
    environ = dict(os.environ if environ is None else environ)
    args = get_parser().parse_args(argv)

    # ============ the cells and their statuses ============
    cells, dataset_paths = plan_from_args(args, environ)
    cells_dir = os.path.join(os.path.abspath(args.experiments), "_cells")
    report = os.path.abspath(args.report)
    use_slurm = not args.local and shutil.which("sbatch", path=environ.get("PATH")) is not None
    queue = slurm_queue(environ) if use_slurm else None
    host = socket.gethostname()
    statuses = {c.name: cell_status(c, cells_dir, queue, host) for c in cells}
    todo = [c for c in cells if statuses[c.name][0] in ("missing", "failed", "interrupted")]
    print_cells(cells, statuses)
    settings = {ds: cell_settings(environ, path, data_identity(path)) for ds, path in dataset_paths.items()}
    changes = {c.name: changed_settings(cells_dir, c, settings[c.dataset]) for c in cells}
    if args.status:
        for c in cells:
            if changes[c.name]:
                print(f"  {c.name}: started with other settings ({'; '.join(changes[c.name])})")
        return 0
    refuse_other_settings(cells, statuses, changes, cells_dir)
    if args.dry_run:
        where = "as one Slurm job array" if use_slurm else "here, one after another"
        how = f" (sbatch --array={array_spec([c.index for c in todo])} ...)" if use_slurm and todo else ""
        print(f"dry run: would run {len(todo)} cell(s) {where}{how}, then write the report into {report}")
        return 0
    if use_slurm and queue is None:  # a queued or running cell would look interrupted and run twice
        fail("squeue failed, so the cells queued or running cannot be told apart; retry, or use --local")

    # ============ data, plan ============
    download_once(dataset_paths, todo)
    os.makedirs(cells_dir, exist_ok=True)
    plan = write_plan(cells_dir, cells)
    for c in todo:
        write_settings(cells_dir, c, settings[c.dataset])
    env = dict(environ, CODE_DIR=ROOT)
    report_cmd = [environ.get("PYTHON") or sys.executable, RESULTS, "--plan", plan, "--out", report]

    # ============ run: a Slurm job array and a report job, or here one cell after another ============
    if use_slurm:
        return submit_to_slurm(cells, todo, cells_dir, plan, queue, report, report_cmd, env, environ)
    return run_here(todo, cells_dir, plan, host, report, report_cmd, env)


if __name__ == "__main__":
    sys.exit(main())
