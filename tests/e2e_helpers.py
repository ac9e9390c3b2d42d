"""End-to-end helpers: a tiny fake CIFAR-10, the tiny-run arguments, and two ways to run the entry scripts.

`run_script` starts a real `python <script>` (what a user runs). `ForkRunner` is a faster equivalent for
the many short runs of the fault tests: one helper interpreter imports the entry scripts once (torch,
torchvision, pandas: seconds of CPU each time otherwise), then runs each command in a forked child that
executes the script as `__main__` with its own argv, working folder, stdout/stderr files and exit status
(an uncaught exception prints its traceback and gives status 1, as the interpreter does). The child is a
real process: its pid can be signalled (SIGUSR1, SIGKILL) like that of a real run.
"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fake_cifar import write_cifar10

REPO = Path(__file__).resolve().parents[1]
MAIN = REPO / "main_swav_unmix.py"
EVAL = REPO / "eval_linear.py"

N_TRAIN = 100  # 5 batches of 20: 6 iterations of 16 per epoch

# One torch thread per run: on a few shared cores, idle OpenMP threads spin and slow everything down.
# Runs compared with each other all use this setting.
RUN_ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")


def make_fake_cifar10(root):
    """A tiny CIFAR-10 in torchvision's format under `root` (100 train, 20 test images); returns `root`."""
    write_cifar10(root, n_train_per_batch=N_TRAIN // 5, n_test=20)
    return Path(root)


def tiny_args(data, dump, epochs, *extra):
    """The common tiny-run arguments of main_swav_unmix.py (a few seconds per run on a CPU)."""
    return ["--data_path", str(data), "--dump_path", str(dump), "--arch", "resnet18", "--width_per_group", "8",
            "--hidden_mlp", "32", "--feat_dim", "16", "--nmb_prototypes", "10", "--batch_size", "16",
            "--workers", "0", "--warmup_epochs", "1", "--base_lr", "0.6", "--final_lr", "0.0006",
            "--epochs", str(epochs), *map(str, extra)]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str

    def explain(self):
        return (f"exit {self.returncode}\n--- stdout (tail) ---\n{self.stdout[-3000:]}\n"
                f"--- stderr ---\n{self.stderr[-3000:]}")


def run_script(script, args, cwd, timeout=180):
    """A real `python <script> args` in `cwd`."""
    p = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=RUN_ENV)
    return Result(p.returncode, p.stdout, p.stderr)


_RUNNER_CODE = r'''
import atexit, json, os, runpy, sys, time, traceback
repo = sys.argv[1]
sys.path.insert(0, repo)
proto_out = os.fdopen(os.dup(1), "w", buffering=1)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 1)
import main_swav_unmix, eval_linear, eval_semisup, torchvision.transforms  # noqa: F401  (the expensive imports, once)
sys.stdout.flush()


def child(req):
    code = 1
    try:
        os.setpgid(0, 0)
        os.chdir(req["cwd"])
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        os.dup2(devnull, 0)
        sys.argv = [req["script"]] + req["args"]
        sys.path[0] = os.path.dirname(req["script"])
        try:
            runpy.run_path(req["script"], run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None:
                code = 0
            elif isinstance(e.code, int):
                code = e.code
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


for line in sys.stdin:
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            child(req)
        proto_out.write(json.dumps({"pid": pid}) + "\n")
    elif req["op"] == "wait":
        deadline, timed_out = time.time() + req["timeout"], False
        while True:
            done, status = os.waitpid(req["pid"], os.WNOHANG)
            if done:
                break
            if time.time() > deadline:
                timed_out = True
                try:
                    os.killpg(req["pid"], 9)
                except OSError:
                    pass
                done, status = os.waitpid(req["pid"], 0)
                break
            time.sleep(0.01)
        proto_out.write(json.dumps({"rc": os.waitstatus_to_exitcode(status), "timed_out": timed_out}) + "\n")
'''


class ForkRunner:
    """Runs entry scripts in children forked from one interpreter that imported them once (see module doc)."""

    def __init__(self, workdir):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen([sys.executable, "-c", _RUNNER_CODE, str(REPO)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, env=RUN_ENV)
        self._lock = threading.Lock()
        self._count = 0

    def warm_up(self, cwd):
        """Wait until the helper has imported the scripts (a quick failing run)."""
        self.run(MAIN, ["--arch", "none"], cwd)

    def _ask(self, req):
        with self._lock:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork runner died (exit {self.proc.poll()})")
        return json.loads(line)

    def start(self, script, args, cwd):
        """Start `script args` in `cwd`; returns a handle with `.pid` (wait on it with `wait`)."""
        self._count += 1
        out, err = self.workdir / f"{self._count}.out", self.workdir / f"{self._count}.err"
        pid = self._ask({"op": "start", "script": str(script), "args": [str(a) for a in args], "cwd": str(cwd),
                         "stdout": str(out), "stderr": str(err)})["pid"]
        return _Handle(pid, out, err)

    def wait(self, handle, timeout=180):
        r = self._ask({"op": "wait", "pid": handle.pid, "timeout": timeout})
        if r["timed_out"]:
            raise TimeoutError(f"run {handle.pid} did not finish in {timeout} s")
        return Result(r["rc"], handle.out.read_text(errors="replace"), handle.err.read_text(errors="replace"))

    def run(self, script, args, cwd, timeout=180):
        return self.wait(self.start(script, args, cwd), timeout)

    def close(self):
        if self.proc.poll() is None:  # idle, every child reaped: nothing to flush
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


@dataclass
class _Handle:
    pid: int
    out: Path
    err: Path


def forked_run_fixtures(name):
    """Module-scoped fixtures `work` (a folder named `name`), `data` (the fake CIFAR-10 in it) and `runner`
    (the session's warmed-up ForkRunner, `fork_runner` in tests/conftest.py) for a module of tiny runs:
    `work, data, runner = forked_run_fixtures("...")`."""
    @pytest.fixture(scope="module")
    def work(tmp_path_factory):
        return tmp_path_factory.mktemp(name)

    @pytest.fixture(scope="module")
    def data(work):
        return make_fake_cifar10(work / "cifar")

    @pytest.fixture(scope="module")
    def runner(fork_runner):
        return fork_runner

    return work, data, runner


def wait_for_log(path, needle, timeout=120, poll=0.005, alive=None):
    """Wait until the text file `path` contains `needle`; returns the text. `alive()` False stops waiting."""
    end = time.time() + timeout
    while time.time() < end:
        try:
            text = Path(path).read_text(errors="replace")
            if needle in text:
                return text
        except FileNotFoundError:
            pass
        if alive is not None and not alive():
            break
        time.sleep(poll)
    raise TimeoutError(f"{needle!r} did not appear in {path}")


def pid_alive(pid):
    """True while `pid` runs (a zombie waiting to be reaped counts as finished)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill(pid, sig=signal.SIGKILL):
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
