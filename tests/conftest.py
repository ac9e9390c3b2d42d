"""Fixtures shared by several test modules, and the global state every test starts from."""
import os
import random
import signal
import sys
import threading

# With pytest-xdist (`-n N`, docs/tests.md) N workers share the CPUs: each worker's torch, and the processes
# its tests start with its environment, get cpu_count / N threads unless OMP_NUM_THREADS is set (N workers
# of cpu_count threads each would spin against each other). In the environment, before torch is imported:
# a child compares bit for bit with its worker (tests/test_golden_kernels.py) only with the same threads.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slurm_cluster  # noqa: E402


# Left ignored by one test, they would be ignored in the processes the next tests start: a shell that starts
# with a signal ignored cannot trap it (tests/test_slurm.py sends SIGINT to the scripts).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def _global_state():
    """What a test could change for the tests after it: float results depend on the thread count and
    the backend flags, drawn numbers on the RNGs, signals on their handlers. (Denormal flushing cannot be
    read; it is reset below.)"""
    cudnn = torch.backends.cudnn
    return {
        "threads": torch.get_num_threads(),
        "default_dtype": torch.get_default_dtype(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "grad": torch.is_grad_enabled(),
        "matmul_precision": torch.get_float32_matmul_precision(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "cudnn": (cudnn.enabled, cudnn.benchmark, cudnn.deterministic),
        "environ": _environ(),
        "stop_signals": {s: signal.getsignal(s) for s in STOP_SIGNALS},
    }


def _environ():
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}  # pytest's own, per phase


def _set_global_state(state):
    torch.set_num_threads(state["threads"])
    torch.set_default_dtype(state["default_dtype"])
    torch.use_deterministic_algorithms(state["deterministic"][0], warn_only=state["deterministic"][1])
    torch.set_grad_enabled(state["grad"])
    torch.set_float32_matmul_precision(state["matmul_precision"])
    torch.backends.mkldnn.enabled = state["mkldnn"]
    cudnn = torch.backends.cudnn
    cudnn.enabled, cudnn.benchmark, cudnn.deterministic = state["cudnn"]
    torch.set_flush_denormal(False)
    for s, handler in state["stop_signals"].items():
        if handler is not None and signal.getsignal(s) is not handler:
            signal.signal(s, handler)
    environ = _environ()
    if environ != state["environ"]:
        for k in environ:
            if k not in state["environ"]:
                del os.environ[k]
        os.environ.update(state["environ"])


# Python turns SIGINT into KeyboardInterrupt unless it started with SIGINT ignored, as a command that a script
# runs in the background (`pytest ... &`) does: the tests expect the former, however pytest was started.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGINT, signal.default_int_handler)
# Read when pytest loads this file, before any test module is imported (a module that changed the
# thread count when imported once made every test of the session run with one thread).
START_STATE = _global_state()
# torch's generator starts from a fixed seed; NumPy's and Python's from the OS. Seed them too, so that a
# test that draws without seeding sees the same numbers in every session (a failure can be rerun).
# UNMIX_TEST_SEED=N reseeds all three: a test that passes only for some numbers shows itself.
TEST_SEED = os.environ.get("UNMIX_TEST_SEED")
if TEST_SEED is not None:
    torch.manual_seed(int(TEST_SEED))
np.random.seed(int(TEST_SEED or 0))
random.seed(int(TEST_SEED or 0))
RNG = (torch.get_rng_state(), np.random.get_state(), random.getstate())


@pytest.fixture(autouse=True)
def same_start_for_every_test(request):
    """Every test starts from the same global state and RNG streams, whatever ran before it, and leaves
    them as it found them: results cannot depend on the order of the tests. A module of small tensors
    may ask for its own intra-op thread count with a module-level THREADS (one thread is faster and
    steadier there on a shared 2-core machine)."""
    threads = getattr(request.module, "THREADS", None)
    _set_global_state(START_STATE if threads is None else dict(START_STATE, threads=threads))
    torch.set_rng_state(RNG[0])
    np.random.set_state(RNG[1])
    random.setstate(RNG[2])
    yield
    _set_global_state(START_STATE)


@pytest.fixture(scope="module")
def cluster():
    """A private one-node Slurm (tests/slurm_cluster.py), or a skip with the reason when Slurm is missing.
    One at a time on this machine, whatever runs the tests (``slurm_cluster.one_at_a_time``)."""
    reason = slurm_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster.one_at_a_time(), slurm_cluster.SlurmCluster.start() as c:
        yield c


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The checkpoint of a real one-epoch pretraining on fake CIFAR-10 (resnet18 at width 8, hidden_mlp 32,
    feat_dim 16, 10 prototypes), shared by the modules that only read it."""
    from tests.e2e_helpers import MAIN, make_fake_cifar10, run_script, tiny_args
    root = tmp_path_factory.mktemp("tiny_pretraining")
    data = make_fake_cifar10(root / "c10")
    res = run_script(MAIN, tiny_args(data, root / "pre", 1), cwd=root)
    assert res.returncode == 0, res.explain()
    return root / "pre" / "checkpoint.pth.tar"


@pytest.fixture(scope="session")
def fork_runner(tmp_path_factory):
    """One warmed-up ForkRunner (tests/e2e_helpers.py) per test process, shared by the modules of tiny runs:
    its interpreter imports the entry scripts (seconds of CPU) once, not once per module."""
    from tests.e2e_helpers import ForkRunner
    root = tmp_path_factory.mktemp("fork_runner")
    runner = ForkRunner(root / "runs")
    runner.warm_up(root)
    yield runner
    runner.close()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """For `pytest -n 2 --dist loadgroup` (docs/tests.md): the tests that start a private Slurm run on one
    worker, one after another; the tests of a module that share one of its module-scoped fixtures (often
    a real pretraining) run on one worker, which builds it once. Without pytest-xdist the marks do nothing."""
    for item in items:
        if item.get_closest_marker("slurm") or "cluster" in item.fixturenames:
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif any(defs[-1].scope == "module" for defs in item._fixtureinfo.name2fixturedefs.values()):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
