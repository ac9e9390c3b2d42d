"""Preemption and stop signals (``PreemptionHandler``): the SBATCH scripts ask for ``--signal=USR1@120``,
which Slurm sends to the tasks of every job step (the python processes under ``srun``), not to the batch
shell; ``scancel``, ``timeout`` and Ctrl-C send SIGTERM or SIGINT. The signal handler only sets a flag;
the training loop asks ``should_stop`` once per iteration (all ranks agree through an all-reduce MAX),
saves a checkpoint, rank 0 calls ``requeue()`` (``scontrol requeue``) under Slurm, and every rank exits
with ``PREEMPTED_EXIT_CODE`` (3). The scripts pass that status through. A process that cannot get there
(blocked in a collective whose peer is gone or stopped) is ended by a watchdog thread, status 3 as well,
after a second signal or after a grace period, leaving the last checkpoint as it is. Once the checkpoint
is written (``stop_listening``), and once an entry script's ``main`` has ended (``run_main``), further
stop signals are ignored: the status is decided, and during the interpreter's shutdown Python gives them
back their default action, which would end the process with 128 + N (138, 143) instead. During an entry
script's start-up, from the claim of its run folder to the start of its run, SIGTERM and SIGINT end it at
once instead (``StartUpStopped``; rank 0 first puts its folder back as it was): nothing is trained yet.
"""
import os
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Mapping, Optional

import torch
import torch.distributed as dist

# Exit status of a run that stopped early because of a preemption/termination signal after writing a
# checkpoint; re-running the same command resumes. 3 is not used by Python itself (0 ok, 1 uncaught
# exception, 2 argparse/usage error, 120 flush error at exit, 128+N killed by signal N) and differs
# from the statuses the SBATCH scripts use for failures (11 pretraining, 21 evaluation).
PREEMPTED_EXIT_CODE = 3


STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


# The stop signals that end an entry script's start-up at once (`PreemptionHandler.stop_start_up`): torchrun
# SIGTERMs the other workers when one fails, and SIGKILLs them 30 s later. SIGUSR1, Slurm's notice before a
# time limit, still lets the run start and stop at its first checkpoint, which requeues the job.
START_UP_STOPS = (signal.SIGTERM, signal.SIGINT)


class StartUpStopped(BaseException):
    """Raised in the main thread by a stop signal (`signum`) that comes during the start-up of an entry script:
    nothing has been trained, so there is nothing to save (src/runtime/startup.py, `StartVote`, undoes the start;
    src/runtime/exits.py, `run_main`, ends the process with 128 + `signum`). A BaseException, as KeyboardInterrupt:
    no `except Exception` of the start-up swallows it."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class PreemptionHandler:
    """Turns SIGUSR1/SIGTERM/SIGINT into a flag that the training loop polls once per iteration.

    The handler does nothing but set the flag (safe at any point of the iteration); only during an entry
    script's start-up (``stop_start_up``) do SIGTERM and SIGINT raise ``StartUpStopped`` too. ``should_stop``
    makes every rank agree (all-reduce MAX), so all ranks stop after the same iteration even when
    only some received the signal. The caller then saves a checkpoint, rank 0 calls ``requeue()``,
    and every rank exits with ``PREEMPTED_EXIT_CODE``.

    With ``grace_s``, a watchdog thread ends the process (status ``PREEMPTED_EXIT_CODE``, one line on
    stderr, no new checkpoint) when it has not stopped ``grace_s`` seconds after the first signal, or at
    once on a second signal. A copy of the first signal that comes within ``repeat_s`` (Ctrl-C reaches
    the process group and the launching shell forwards it too) does not count as a second one. The
    watchdog learns of signals through ``signal.set_wakeup_fd``, so it acts even while the main thread
    is blocked in C code (a collective whose peer is gone), where Python signal handlers cannot run.
    """

    def __init__(self, grace_s: Optional[float] = None, repeat_s: float = 1.0):
        self.requested = False
        self.signum: Optional[int] = None
        self.grace_s, self.repeat_s = grace_s, repeat_s
        self._previous = {}
        self._wakeup = None  # (read end, write end, previous wakeup fd) while the watchdog runs
        self.start_up = False  # see stop_start_up

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self.requested = True
        self.signum = signum
        if self.start_up and signum in START_UP_STOPS:
            self.start_up = False
            raise StartUpStopped(signum)

    def stop_start_up(self, armed=True) -> None:
        """`armed`: from now on SIGTERM and SIGINT raise `StartUpStopped` in the main thread (at once when one
        came already), instead of only setting the flag; not armed: they only set it again, as in training.
        From the main thread only."""
        self.start_up = armed
        if armed and self.requested and self.signum in START_UP_STOPS:
            self.start_up = False
            raise StartUpStopped(self.signum)

    def install(self, signals=STOP_SIGNALS) -> "PreemptionHandler":
        """Install the flag-setting handler, and the watchdog with ``grace_s`` (from the main thread)."""
        for s in signals:
            self._previous[s] = signal.signal(s, self._handle)
        if self.grace_s is not None:
            r, w = os.pipe()
            os.set_blocking(w, False)
            self._wakeup = (r, w, signal.set_wakeup_fd(w, warn_on_full_buffer=False))
            threading.Thread(target=self._watch, args=(r, {int(s) for s in signals}), daemon=True,
                             name="stop-signal-watchdog").start()
        return self

    def uninstall(self) -> None:
        for s, prev in self._previous.items():
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous = {}
        if self._wakeup is not None:
            r, w, previous = self._wakeup
            signal.set_wakeup_fd(previous)
            os.close(w)  # the watchdog reads end-of-file and ends
            self._wakeup = None

    def _watch(self, fd, signals):
        first = first_signal = None
        while True:
            wait = None if first is None else max(0.0, first + self.grace_s - time.monotonic())
            ready, _, _ = select.select([fd], [], [], wait)
            if not ready:
                _exit_at_once(f"not stopped {self.grace_s:g} s after {signal.Signals(first_signal).name} "
                              "(blocked waiting for another process?)")
            data = os.read(fd, 512)
            if not data:
                os.close(fd)
                return
            for signum in data:
                if signum not in signals:
                    continue  # e.g. SIGCHLD of DataLoader workers
                if first is None:
                    first, first_signal = time.monotonic(), signum
                elif time.monotonic() - first >= self.repeat_s:
                    _exit_at_once(f"{signal.Signals(signum).name} received again")

    def stop_listening(self) -> None:
        """The stop's checkpoint is written (or deliberately not): from now on stop signals are ignored,
        so that a repeated one cannot turn the exit status 3 into 128 + N (see ``ignore_stop_signals``)."""
        ignore_stop_signals()

    def should_stop(self, world_size: int = 1, device=None) -> bool:
        """True when any rank got a signal. Collective when world_size > 1: every rank must call it
        at the same point (e.g. once per iteration)."""
        if world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
            return self.requested
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
                else torch.device("cpu")
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        stop = bool(flag.item())
        if stop and not self.requested:
            self.requested = True  # another rank was signalled
        return stop

    def requeue(self, environ: Optional[Mapping[str, str]] = None) -> bool:
        """Under Slurm (``SLURM_JOB_ID`` set) run ``scontrol requeue $SLURM_JOB_ID``; True if it worked.

        Call from rank 0 only, after the checkpoint is written: Slurm then stops the job and puts it
        back in the queue; the rerun starts the batch script again (``SLURM_RESTART_COUNT`` >= 1).
        """
        environ = os.environ if environ is None else environ
        job_id = environ.get("SLURM_JOB_ID")
        if not job_id:
            return False
        # array jobs: requeue this array task, not the whole array
        if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
            job_id = f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
        try:
            res = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            print(f"scontrol requeue {job_id} failed: {e}", file=sys.stderr, flush=True)
            return False
        if res.returncode != 0:
            print(f"scontrol requeue {job_id} failed (exit {res.returncode}): {res.stderr.strip()}",
                  file=sys.stderr, flush=True)
            return False
        return True


def _exit_at_once(reason: str) -> None:
    """End the process from the watchdog thread: one line on stderr (written directly: the main thread
    may hold the lock of sys.stderr), status PREEMPTED_EXIT_CODE; files keep their last complete version."""
    os.write(2, f"error: {reason}: stopped at once, without a new checkpoint (a rerun resumes from the "
                f"last one, if any)\n".encode())
    os._exit(PREEMPTED_EXIT_CODE)


def ignore_stop_signals(signals=STOP_SIGNALS) -> None:
    """Ignore the stop signals from here on (a process that is ending with its status decided). Python's
    shutdown restores the default action of signals that have a Python handler (ending the process with
    128 + N) but leaves ignored ones ignored. From the main thread only; elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return
    for s in signals:
        signal.signal(s, signal.SIG_IGN)


def ignore_preemption_signals_in_worker(worker_id: int = 0) -> None:
    """``worker_init_fn`` helper for DataLoader workers: ignore SIGUSR1/SIGTERM/SIGINT there.

    Slurm signals every process of a step, and Ctrl-C the whole process group, DataLoader workers
    included; a worker that dies on SIGUSR1 (default action: terminate) makes the main process fail
    before it can save. With the ``fork`` start method the workers inherit the flag handler and the
    watchdog's wakeup pipe (whose bytes would count as signals of the main process), so both go; with
    ``spawn``/``forkserver`` they would not, so chain this into ``worker_init_fn``.
    """
    for s in STOP_SIGNALS:
        try:
            signal.signal(s, signal.SIG_IGN)
        except (ValueError, OSError):
            pass
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
