"""Running the cells of a plan: as one Slurm job array and a report job after it, or here one cell after
another and then the report.
"""
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from src.runtime.cli import fail  # noqa: E402
from src.runtime.durations import format_eta  # noqa: E402
from table_pace import Pace, read_progress  # noqa: E402
from table_plan import CIFAR_FOLDERS  # noqa: E402
from table_records import cell_status, read_state, write_state  # noqa: E402

TABLE_CELL = os.path.join(ROOT, "scripts", "table_cell.sh")


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
    failed, pace = [], Pace()
    for k, c in enumerate(todo, 1):
        print(f"[{k}/{len(todo)}] {c.name}: running, log {cells_dir}/{c.name}.log", flush=True)
        before, start = read_progress(c), time.monotonic()
        rc = subprocess.run(["bash", TABLE_CELL, plan, str(c.index)], env=env).returncode
        took = time.monotonic() - start
        status, detail = cell_status(c, cells_dir, None, host)
        if status == "done":
            pace.add(c, before, read_progress(c), took)
        print(f"[{k}/{len(todo)}] {c.name}: {status}{f' ({detail})' if detail else ''} after {format_eta(took)}"
              f"{pace.time_left(todo[k:])}", flush=True)
        if rc != 0:
            failed.append(c.name)
    rc = subprocess.run(report_cmd, env=env, stdout=subprocess.DEVNULL).returncode
    if rc != 0:
        fail(f"the report failed (exit {rc}): {shlex.join(report_cmd)}")
    print(f"report: {report}/results.md" + (f"; {len(failed)} cell(s) failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0
