"""A cell's state record and whether it still runs: `<experiments>/_cells/<cell>.state` (one line,
`queued JOB`, `running JOB` or `exit STATUS JOB`, then the time; written atomically by this module and by
scripts/table_cell.sh), the Slurm queue, a local cell's process, and from them the cell's status.
"""
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from src.runtime.files import atomic_write  # noqa: E402

EXIT_MEANING = {2: "bad input", 11: "pretraining failed", 21: "linear evaluation failed"}
STATUSES = ("done", "running", "pending", "failed", "interrupted", "missing")


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
