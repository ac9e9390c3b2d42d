"""The command line of the entry scripts and tools: boolean flags, which flags are operational
(`OPERATIONAL_FLAGS`), one-line errors and exit statuses, seeds.
Standard library only: the tools import it without torch. How an entry script runs and ends (`run_main`):
src/runtime/exits.py.
"""
import argparse
import difflib
import re
import sys

# Exit statuses of the entry scripts besides 0, 2 (bad input, `fail`), 3 (preempted, see
# src/runtime/signals.PREEMPTED_EXIT_CODE) and 4 (non-finite losses).
LOST_PEER_EXIT_CODE = 5     # a collective failed: another process of the job died or hung past --dist_timeout


CANNOT_WRITE_EXIT_CODE = 6  # disk full, read-only or unwritable folder


INTERRUPTED_EXIT_CODE = 130  # Ctrl-C before the stop-signal handler was installed (128 + SIGINT)


# The arguments of the three entry scripts that do not change what a run computes: a resumed run may differ
# in these, and runs that differ only in these (and the seed) are seeds of one experiment. Not --world_size:
# --batch_size is per process, so the number of processes sets the global batch. An evaluation's
# --pretrained is compared by the checkpoint's content (`checkpoint_identity`), not its path.
OPERATIONAL_FLAGS = frozenset({
    "dump_path", "workers", "dist_url", "rank", "local_rank", "gpu_to_work_on", "device", "dist_timeout",
    "download", "allow_changed_args", "log_freq", "tensorboard", "checkpoint_freq", "knn_freq",
    "max_nonfinite_steps", "preempt_check_freq", "epochs_run_limit", "pretrained"})


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


def error_line(e):
    """An exception in one line that keeps what is wrong, uncut: its type and first line, with the next line
    when the first only introduces it (load_state_dict's 'Error(s) in loading state_dict for Linear:'). The
    C++ source location that starts torch's distributed errors ('[.../gloo/transport/tcp/pair.cc:534] ')
    is left out: it says nothing to a user."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    lines[0] = re.sub(r"^\[[^\]\s]+:\d+\]\s*", "", lines[0])
    text = lines[0] + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")
    return f"{type(e).__name__}: {text}"


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

