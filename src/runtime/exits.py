"""How an entry script runs and ends (`run_main`): what a user can meet becomes one line on stderr and a
documented exit status (src/runtime/cli.py), a collective whose peer is gone (`lost_peer`) ends the process
at once (`exit_at_once`), and the process group is left before the interpreter's shutdown.
"""
import logging
import os
import re
import signal
import sys

import torch.distributed as dist

from . import rendezvous
from .cli import CANNOT_WRITE_EXIT_CODE, INTERRUPTED_EXIT_CODE, LOST_PEER_EXIT_CODE, error_line, fail
from .files import WRITE_ERRNOS
from .signals import StartUpStopped, ignore_stop_signals


def lost_peer(e):
    """True for the errors of a collective whose peers are gone: a process of the job died (gloo:
    "Connection closed by peer") or hung past the process group's timeout ("Timed out waiting ...",
    "Application timeout caused pair closure")."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    return isinstance(e, RuntimeError) and dist.is_available() and dist.is_initialized() and bool(
        re.search(r"Connection (closed|reset) by peer|Timed out waiting|[Tt]imeout|pair closure|Broken pipe|"
                  r"NCCL error|gloo", str(e)))


def leave_process_group():
    """Destroy the process group before the process exits (a one-line error, a preemption, a lost peer):
    left to the interpreter's shutdown, gloo's threads can abort the process ("terminate called without
    an active exception"), turning status 2 or 3 into 134."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a group whose peers are gone: the exit goes on
            pass
    rendezvous.leave()


def exit_at_once(msg, status):
    """One line on stderr, the logs flushed, rank 0's rendezvous file removed, then `os._exit(status)`:
    for a collective that failed. Not the interpreter's shutdown: the process group's C++ threads (gloo,
    NCCL's watchdog) still wait on the lost or frozen peer, and destroying the group or leaving it to the
    shutdown can hang or abort the process ("terminate called without an active exception", 134)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    logging.shutdown()
    rendezvous.leave()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def run_main(main, start):
    """Run an entry script's `main(start)` inside `start`, its start-up (src/runtime/startup.py, `StartVote`:
    until the run starts, the processes of a job agree on a refusal), turning what a user can meet into one line
    on stderr and a documented status instead of a traceback: a collective that failed because another process
    died or hung (5), a file that could not be written (6; atomic writes keep the previous complete files),
    Ctrl-C before the stop-signal handler is installed (130), SIGTERM or SIGINT later in the start-up
    (128 + N, `StartUpStopped`). Anything else keeps its traceback. Once `main`
    has ended its status is decided: stop signals are ignored from then on (during the interpreter's shutdown
    one would end the process with 128 + N)."""
    try:
        _run_main(main, start)
    finally:
        leave_process_group()
        ignore_stop_signals()


def _run_main(main, start):
    try:
        with start:  # the refusals below too: the job's processes end together, with one line
            try:
                main(start)
            except KeyboardInterrupt:
                fail("interrupted (SIGINT) during start-up, before anything was trained; nothing to save",
                     INTERRUPTED_EXIT_CODE)
            except OSError as e:
                if e.errno not in WRITE_ERRNOS:
                    raise
                fail(f"cannot write {e.filename or 'a file'}: {e.strerror}; the files written before are complete "
                     "and kept (free some space or fix the permissions, then rerun to resume)", CANNOT_WRITE_EXIT_CODE)
    except StartUpStopped as e:  # after `start` has undone rank 0's start and given back the process's stderr
        exit_at_once(f"stopped by {signal.Signals(e.signum).name} during start-up, before anything was trained; "
                     "nothing to save (rerun the same command to start, or resume)", 128 + e.signum)
    except RuntimeError as e:  # after `start` has given back the process's stderr
        if not lost_peer(e):
            raise
        exit_at_once(f"another process of the job stopped or hung ({error_line(e)}); see its log. A rerun "
                     "resumes from the last checkpoint", LOST_PEER_EXIT_CODE)
