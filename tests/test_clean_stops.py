"""Clean stops with real processes and real signals: a repeated stop signal still ends with status 3, a lost
or frozen peer ends the survivor with status 5 and one line, and a file:// rendezvous works when the same
command is run again (after a clean end, and over a file left by a killed run)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from src.runtime.checkpoint import safe_load
from src.runtime.cli import LOST_PEER_EXIT_CODE, error_line
from src.runtime.files import remove_stale_temporaries
from src.runtime.rendezvous import LOCK_SUFFIX
from src.runtime.signals import PREEMPTED_EXIT_CODE
from tests.e2e_helpers import MAIN, REPO, RUN_ENV, make_fake_cifar10, tiny_args, wait_for_log

ENV = {k: v for k, v in RUN_ENV.items() if not k.startswith("SLURM_") and k not in (
    "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fake_cifar10(tmp_path_factory.mktemp("stops") / "c10")


class Run:
    """One process of `main_swav_unmix.py`, its stdout and stderr in files (nothing blocks on a full pipe)."""

    def __init__(self, args, folder, name):
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(MAIN), *map(str, args)], cwd=folder, env=ENV,
                                         stdout=out, stderr=err)

    def alive(self):
        return self.proc.poll() is None

    def finish(self, timeout=120):
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.stop()
        return self.proc.returncode, self.err.read_text(errors="replace")

    def stop(self):
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.send_signal(signal.SIGCONT)
            self.proc.wait()


def two_ranks(data, dump, url, folder, tag, *extra):
    """Ranks 0 and 1 of one job, started one by one as on two nodes."""
    args = tiny_args(data, dump, 2, "--batch_size", 8, "--log_freq", 1, *extra)
    return [Run([*args, "--dist_url", url, "--world_size", 2, "--rank", r], folder, f"{tag}{r}") for r in range(2)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------------------
# (a) a repeated stop signal
# --------------------------------------------------------------------------------------------------

def catches(pid, sig):
    """True while process `pid` has a handler for `sig` (the SigCgt mask of /proc/<pid>/status)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next(int(ln.split()[1], 16) for ln in status.splitlines() if ln.startswith("SigCgt:"))
    return bool(mask >> (sig - 1) & 1)


@pytest.mark.slow
def test_stop_signals_repeated_after_the_checkpoint_still_end_with_status_3(data, tmp_path):
    """SIGTERM; once the log says the checkpoint is saved and the process no longer handles SIGTERM
    itself (it ignores it now; before, that was Python's shutdown giving the signals their default action
    back), SIGTERM, SIGUSR1 and SIGINT every few milliseconds until it has ended: still status 3 (143 or
    138 before)."""
    dump = tmp_path / "run"
    run = Run(tiny_args(data, dump, 2, "--log_freq", 1), tmp_path, "run")
    try:
        wait_for_log(dump / "train.log", "Epoch: [0][1/6]", alive=run.alive)
        run.proc.send_signal(signal.SIGTERM)
        wait_for_log(dump / "train.log", "Preempted (signal 15): checkpoint saved", alive=run.alive)
        end = time.time() + 60
        while run.alive() and catches(run.proc.pid, signal.SIGTERM) and time.time() < end:
            time.sleep(0.001)  # until the process stops handling the signal (ignored, or shutting down)
        repeats = 0
        while run.alive() and time.time() < end:
            run.proc.send_signal((signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)[repeats % 3])
            repeats += 1
            time.sleep(0.003)
        rc, err = run.finish()
    finally:
        run.stop()
    assert rc == PREEMPTED_EXIT_CODE and repeats >= 1, (rc, repeats, err[-2000:])
    assert "Traceback" not in err, err
    saved = safe_load(dump / "checkpoint.pth.tar")
    assert saved["epoch"] == 0 and saved["iteration"] >= 2


# The checkpoint write of a stopping process, slowed down: half of the new file written, then blocked (as
# on a slow or stuck file system) until a second signal comes.
SLOW_WRITER = """import os, sys, time; sys.path.insert(0, sys.argv[1])
import torch
from src.runtime.checkpoint import atomic_save
from src.runtime.files import atomic_write
from src.runtime.signals import PreemptionHandler
path = sys.argv[2]
stop = PreemptionHandler(grace_s=60).install()
atomic_save({"epoch": 1, "weights": torch.arange(1000.)}, path)
print("saved", flush=True)
while not stop.requested:
    time.sleep(0.01)
def write(f):
    f.write(b"PK" + bytes(50000))
    f.flush()
    print("writing", flush=True)
    os.read(os.pipe()[0], 1)
atomic_write(path, write)
"""


def test_a_second_signal_during_the_checkpoint_write_stops_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """The second signal comes while the stop's checkpoint is being written (after the first by more than
    the 1 s that makes it a repeat rather than a copy): status 3 at once, one line; the checkpoint on disk is
    the previous complete one; the half-written temporary is what the next start removes."""
    path = tmp_path / "checkpoint.pth.tar"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(REPO), str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "saved"
        first = time.time()
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(max(0.0, first + 2.0 - time.time()))  # 1 s after the watchdog read SIGTERM, even if it read late
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == PREEMPTED_EXIT_CODE, err
    assert err.strip().splitlines() == ["error: SIGINT received again: stopped at once, without a new checkpoint "
                                        "(a rerun resumes from the last one, if any)"], err
    assert safe_load(path)["epoch"] == 1
    assert [Path(p).parent for p in remove_stale_temporaries(str(tmp_path))] == [tmp_path]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pth.tar"]


# --------------------------------------------------------------------------------------------------
# (b) a lost or frozen peer; (d) a killed one
# --------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("rendezvous, lost, how", [
    ("file", 1, signal.SIGSTOP),  # frozen, not killed: the survivor's collective times out
    ("tcp", 0, signal.SIGSTOP),   # the frozen one holds the TCP store
    ("file", 1, signal.SIGKILL),  # killed mid-epoch: the survivor learns at once
])
def test_a_lost_or_frozen_peer_ends_the_survivor_with_status_5_and_one_line(data, tmp_path, rendezvous, lost, how):
    """The survivor prints one line within --dist_timeout (plus a margin) and ends right after it with
    status 5: not after seconds of interpreter shutdown, not aborted by gloo's threads ("terminate called
    without an active exception", 134). Rank 0 removes a file rendezvous as it leaves."""
    timeout = 5  # 2 s: a start-up collective timed out on a machine loaded by other work (load average 8)
    store = tmp_path / "rendezvous"
    url = f"file://{store}" if rendezvous == "file" else f"tcp://127.0.0.1:{free_port()}"
    ranks = two_ranks(data, tmp_path / "run", url, tmp_path, "rank", "--dist_timeout", timeout)
    survivor = ranks[1 - lost]
    try:
        wait_for_log(tmp_path / "run" / "train.log", "Epoch: [0][1/6]", alive=ranks[0].alive)
        ranks[lost].proc.send_signal(how)
        lost_at, line_at, end = time.time(), None, time.time() + 60
        while survivor.alive() and time.time() < end:
            if line_at is None and "error:" in survivor.err.read_text(errors="replace"):
                line_at = time.time()
            time.sleep(0.005)
        ended_at = time.time()
        rc, err = survivor.finish(timeout=5)
    finally:
        for r in ranks:
            r.stop()
    line_at = line_at or ended_at
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]  # besides torch's DDP warning
    assert rc == LOST_PEER_EXIT_CODE, err[-2000:]
    assert "Traceback" not in err and "terminate called" not in err and len(errors) == 1, err
    assert errors[0].startswith("error: another process of the job stopped or hung ("), err
    if how == signal.SIGSTOP:
        assert "Timed out" in errors[0] or "timeout" in errors[0], err  # gloo words it either way
    wait = timeout if how == signal.SIGSTOP else 0
    # (the survivor's collective may have started a little before its peer stopped)
    assert wait / 2 - 0.2 < line_at - lost_at < wait + 10, (line_at - lost_at, err)
    assert ended_at - line_at < 0.5, f"ended {ended_at - line_at:.2f} s after its line"
    if rendezvous == "file":
        assert not store.exists() and not Path(f"{store}{LOCK_SUFFIX}").exists()


LOST_PEER_MAIN = """import sys; sys.path.insert(0, sys.argv[1])
import torch.distributed as dist
from src.runtime.exits import run_main
from src.runtime.startup import StartVote


def main(start):
    raise dist.DistBackendError(sys.argv[2])


run_main(main, StartVote())
"""
# what a collective of the main thread raises once torch's NCCL watchdog has aborted the communicator: a
# first line longer than 200 characters, then the lines of the C++ stack
ABORTED = ("NCCL communicator was aborted on rank 1.  Original reason for failure was: [Rank 1] Watchdog caught "
           "collective operation timeout: WorkNCCL(SeqNum=2511984, OpType=ALLREDUCE, NumelIn=25557032, "
           "NumelOut=25557032, Timeout(ms)=1800000) ran for 1809553 milliseconds before timing out.\n"
           "Exception raised from checkTimeout at /pytorch/torch/csrc/distributed/c10d/ProcessGroupNCCL.cpp:684 "
           "(most recent call first):\nframe #0: c10::Error::Error(...)")


def test_a_lost_peer_line_keeps_torchs_first_line_whole():
    """The lost-peer line of `run_main` says torch's error as `error_line` does (the one source): its first line
    uncut, nothing of the lines after it."""
    res = subprocess.run([sys.executable, "-c", LOST_PEER_MAIN, str(REPO), ABORTED], capture_output=True,
                         text=True, timeout=60, env=ENV)
    first = ABORTED.splitlines()[0]
    assert len(first) > 200
    assert res.returncode == LOST_PEER_EXIT_CODE and res.stdout == "", res.stderr
    assert res.stderr.splitlines() == [f"error: another process of the job stopped or hung (DistBackendError: "
                                       f"{first}); see its log. A rerun resumes from the last checkpoint"], res.stderr


@pytest.mark.parametrize("text, line", [
    ("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:538] Connection closed by peer [127.0.0.1]:40113",
     "Connection closed by peer [127.0.0.1]:40113"),   # a C++ source location is left out
    ("Error(s) in loading state_dict for Linear:\n\tsize mismatch for weight: copying a param with shape ...",
     "Error(s) in loading state_dict for Linear: size mismatch for weight: copying a param with shape ..."),
    ("NCCL error in: ProcessGroupNCCL.cpp:77, remote process exited or there was a network error\n"
     "ncclRemoteError: A call failed", "NCCL error in: ProcessGroupNCCL.cpp:77, remote process exited or there "
     "was a network error"),
])
def test_error_line(text, line):
    assert error_line(RuntimeError(text)) == f"RuntimeError: {line}"


# --------------------------------------------------------------------------------------------------
# (c) a file:// rendezvous used again
# --------------------------------------------------------------------------------------------------

HOLDER = """import sys, time; sys.path.insert(0, sys.argv[1])
from src.runtime import rendezvous
rendezvous.claim(sys.argv[2], 1)
print("holding", flush=True)
time.sleep(60)
"""


def test_a_rendezvous_file_is_removed_at_start_only_when_no_process_holds_its_lock(tmp_path):
    from src.runtime import rendezvous
    path = str(tmp_path / "rendezvous")
    Path(path).write_bytes(b"left by an earlier run")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(REPO), path], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        assert not Path(path).exists()  # the holder found it stale and removed it ...
        Path(path).write_bytes(b"in use")  # ... then uses a new one
        assert not rendezvous.claim(path, 0).removed_stale and Path(path).read_bytes() == b"in use"
        assert rendezvous.leave() == path  # rank 0 removes the file as it leaves
    finally:
        holder.kill()
        holder.wait()
    Path(path).write_bytes(b"left by a killed run")
    assert rendezvous.claim(path, 1).removed_stale and not Path(path).exists()
    assert rendezvous.leave() is None and Path(path + LOCK_SUFFIX).exists()  # rank 1 leaves the files alone


def finish_both(ranks):
    for rc, err in [r.finish() for r in ranks]:
        assert rc == 0, err[-3000:]
    return [r.out.read_text() for r in ranks]


@pytest.mark.slow
def test_the_same_file_rendezvous_command_runs_again_after_a_clean_end_and_after_a_kill(data, tmp_path):
    """The very same 2-process command with --dist_url file://... three times (one epoch per run,
    --epochs_run_limit 1). The first ends cleanly: rank 0 removes the rendezvous file and its lock file. The
    second is SIGKILLed (both ranks) once they have joined: the file stays. The third finds it, removes it
    (no process uses it: nobody holds its lock), says so in one line, resumes and finishes (with the file
    left in place it failed after ~35 s with "Gloo connectFullMesh failed")."""
    store, dump = tmp_path / "rendezvous", tmp_path / "run"
    command = lambda tag: two_ranks(data, dump, f"file://{store}", tmp_path, tag,  # noqa: E731
                                    "--epochs_run_limit", 1, "--dist_timeout", 5)
    finish_both(command("first"))
    assert not store.exists() and not Path(f"{store}{LOCK_SUFFIX}").exists()

    ranks = command("killed")
    try:
        for r in ranks:  # both have joined through the file
            wait_for_log(r.out, "distributed: rank", alive=r.alive)
    finally:
        for r in ranks:
            r.stop()
    assert store.exists()

    out0, out1 = finish_both(command("rerun"))
    said = [ln for ln in (out0 + out1).splitlines() if ln.startswith("distributed: removed")]
    assert said == [f"distributed: removed {store}, a rendezvous file left by an earlier run that no process "
                    "uses any more"], said
    assert "Resumed from" in out0 and "Pretraining done." in out0
    assert safe_load(dump / "checkpoint.pth.tar")["epoch"] == 2
    assert not store.exists() and not Path(f"{store}{LOCK_SUFFIX}").exists()
