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
The cells and the plan: tools/table_plan.py; the records: tools/table_records.py (state, liveness, status),
tools/table_settings.py (settings); running them: tools/table_submit.py.
"""
import os
import shutil
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tools"))
from src.runtime.cli import ArgumentParser, fail  # noqa: E402
from table_plan import (DATASETS, METHODS, dataset_path_for, eval_folder_suffix, parse_counts,  # noqa: E402
                        parse_names, plan_cells, write_plan)
from table_records import STATUSES, cell_status, slurm_queue  # noqa: E402
from table_settings import (cell_settings, compare_with_records, data_identity, format_1_note,  # noqa: E402
                            processes_as_set, refuse_other_settings, write_settings)
from table_submit import array_spec, download_once, run_here, submit_to_slurm  # noqa: E402

RESULTS = os.path.join(ROOT, "tools", "results.py")
PUBLISHED_EPOCHS = "200,400,600,800,1000"
# What a cell sets itself: the same setting given for every cell would silently lose.
SET_PER_CELL = {"EPOCHS": "--epochs", "RUN_SWAV": "--methods", "EXPERIMENT_PATH": "--experiments"}
FLAGS_PER_CELL = ("--seed", "--epochs", "--run_swav", "--dump_path", "--data_path", "--pretrained")


def print_cells(cells, statuses):
    width = max(len(c.name) for c in cells)
    for c in cells:
        status, detail = statuses[c.name]
        print(f"  {c.name:<{width}}  {c.dataset:<8}  {METHODS[c.method]:<6}  {c.epochs:>5} ep  seed {c.seed:<5}  "
              f"{status}{f' ({detail})' if detail else ''}")
    counts = {s: sum(1 for v in statuses.values() if v[0] == s) for s in STATUSES}
    print(f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))


def get_parser():
    p = ArgumentParser(
        prog="scripts/reproduce_tables.sh",
        description="Run every cell (data set x method x pretraining epochs x seed) of the published tables "
                    "and write the report. Environment overrides (DATASET_PATH, EXTRA_ARGS, ...) pass to every "
                    "cell as in script_unmix_c10.sh; see the header of scripts/reproduce_tables.sh.")
    p.add_argument("--datasets", default="c10,c100", help="comma-separated: c10, c100 (default: both)")
    p.add_argument("--methods", default="swav,unmix", help="comma-separated: swav, unmix (default: both)")
    p.add_argument("--epochs", default=PUBLISHED_EPOCHS, help=f"pretraining epochs (default {PUBLISHED_EPOCHS})")
    p.add_argument("--seeds", default="31", help="comma-separated seeds (default 31, the released seed)")
    p.add_argument("--experiments", default="experiments/tables",
                   help="folder of the cells' experiment folders (default experiments/tables)")
    p.add_argument("--report", default="report/tables",
                   help="folder of the report: results.md, plots (default report/tables)")
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
    settings = {ds: cell_settings(environ, path, data_identity(path), use_slurm)
                for ds, path in dataset_paths.items()}
    changes, format_1 = compare_with_records(cells, cells_dir, settings, processes_as_set(environ))
    if format_1:
        print(format_1_note(format_1))
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
