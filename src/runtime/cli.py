"""Small helpers shared by the entry scripts: boolean flags, one-line errors, running averages, seeding,
and how an entry script ends (`run_main`).
"""
import argparse
import difflib
import logging
import os
import re
import sys

import torch.distributed as dist

from . import rendezvous
from .checkpoint import WRITE_ERRNOS, error_line
from .signals import ignore_stop_signals

# Exit statuses of the entry scripts besides 0, 2 (bad input, `fail`), 3 (preempted, see
# src/runtime/signals.PREEMPTED_EXIT_CODE) and 4 (non-finite losses).
LOST_PEER_EXIT_CODE = 5     # a collective failed: another process of the job died or hung past --dist_timeout


CANNOT_WRITE_EXIT_CODE = 6  # disk full, read-only or unwritable folder


INTERRUPTED_EXIT_CODE = 130  # Ctrl-C before the stop-signal handler was installed (128 + SIGINT)


MAX_EPOCHS = 10000  # a bound on --epochs that catches typos (the published tables stop at 1000)


_TRUE = {"on", "true", "1"}


_FALSE = {"off", "false", "0"}


def bool_flag(s):
    """Parse a boolean command-line value the released way: on/true/1 and off/false/0, any case."""
    if isinstance(s, bool):
        return s
    if s.lower() in _TRUE:
        return True
    if s.lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {s!r} (use on/true/1 or off/false/0)")


class Refusal(SystemExit):
    """Bad input, said in one line on stderr (`fail`): the process ends with `status` (the exit's code) where
    nothing catches it. During a job's start-up `StartVote` (src/runtime/startup.py) catches it, so that the
    processes agree on one refusal."""

    def __init__(self, problem, status=2):
        super().__init__(status)
        self.problem = problem

    @property
    def line(self):
        return f"error: {self.problem}\n"


def fail(msg, status=2):
    """Bad input: one line on stderr, exit status 2 (or `status`), no traceback (raises `Refusal`)."""
    refusal = Refusal(msg, status)
    sys.stderr.write(refusal.line)
    sys.stderr.flush()
    raise refusal


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`error: argument --epochs: invalid int value: '2e9' ...`,
    status 2) instead of the usage block."""

    def error(self, message):
        fail(f"{message}{self._closest_flags(message)} (see {self.prog} --help)")

    def _closest_flags(self, message):
        """'; did you mean --width_per_group?' for a mistyped flag (often one in the scripts' EXTRA_ARGS)."""
        if not message.startswith("unrecognized arguments:"):
            return ""
        known = [o for o in self._option_string_actions if o.startswith("--")]
        meant = [difflib.get_close_matches(word.split("=")[0].replace("-", "_").replace("__", "--", 1), known, 1, 0.8)
                 for word in message.split(":", 1)[1].split() if word.startswith("--")]
        meant = [m[0] for m in meant if m]
        return f"; did you mean {', '.join(meant)}?" if meant else ""


def parse_given(parser, argv=None):
    """`(args, given)`: the parsed arguments, and the names of those given on the command line (a flag left at
    its default is not in `given`, even when its default is what was typed)."""
    args = parser.parse_args(argv)
    unset = object()
    probe = argparse.Namespace(**{name: unset for name in vars(args)})
    parser.parse_args(argv, namespace=probe)  # argparse fills in a default only where the namespace has no value
    return args, {name for name, value in vars(probe).items() if value is not unset}


def check_seed(name, value):
    """Seeds go to NumPy's RandomState, which takes [0, 2**32)."""
    if not 0 <= value < 2 ** 32:
        fail(f"--{name} must be in [0, 2**32), got {value}")


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
    Ctrl-C before the stop-signal handler is installed (130). Anything else keeps its traceback. Once `main`
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
    except RuntimeError as e:  # after `start` has given back the process's stderr
        if not lost_peer(e):
            raise
        exit_at_once(f"another process of the job stopped or hung ({error_line(e)}); see its log. A rerun "
                     "resumes from the last checkpoint", LOST_PEER_EXIT_CODE)
