"""The golden tests under other kernels and thread counts, and independent of the tests run before them.

Each environment below sums float32 values in another order, the way another CPU would (1 or 2 threads,
ATen's AVX2 kernels instead of AVX-512, oneDNN capped at AVX2): tests/test_golden.py must pass in all of
them (tests/data/golden/README.md). Each run also checks that its environment took effect."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# The child: it first prints what shows that the environment took effect, ATen's kernel level and the ISA
# oneDNN reports (verbose for one primitive only), then runs the golden tests in the same process.
CHILD = """
import sys
import pytest
import torch
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    x = torch.nn.functional.conv2d(torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3))
print("threads", torch.get_num_threads(), "aten", torch.backends.cpu.get_cpu_capability(), flush=True)
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_golden.py"]))
"""


def cpu_flags():
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []


def child_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA",
                        "ONEDNN_MAX_CPU_ISA")}
    env.update(extra)
    return env


# The AVX2 runs use one thread, so that only the kernels differ from the "1 thread" run. The 2-thread run's
# threads sleep when they wait (OMP_WAIT_POLICY, no effect on the sums): spinning beside the other pytest
# worker made it ~5 times slower on 2 cores.
ENVIRONMENTS = {
    "1 thread": ({"OMP_NUM_THREADS": "1"}, "threads 1 "),
    "2 threads": ({"OMP_NUM_THREADS": "2", "OMP_WAIT_POLICY": "PASSIVE"}, "threads 2 "),
    "ATen AVX2": ({"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}, "aten AVX2"),
    "oneDNN AVX2": ({"DNNL_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "1"}, "isa:Intel AVX2"),
}


@pytest.mark.parametrize("name", list(ENVIRONMENTS))
def test_golden_under_other_kernels(name):
    extra, evidence = ENVIRONMENTS[name]
    if "AVX2" in name and "avx2" not in cpu_flags():
        pytest.skip("this CPU has no AVX2")
    res = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=child_env(**extra), capture_output=True,
                         text=True, timeout=600)
    assert evidence in res.stdout, f"{name} did not take effect: {res.stdout[:1500]}{res.stderr[-500:]}"
    assert res.returncode == 0, f"golden tests under {name}:\n{res.stdout[-3000:]}{res.stderr[-2000:]}"


DIGEST_TEST = """
import hashlib, os
import torch
from tests.test_golden import get_case, run_case


def test_write_digest():
    h = hashlib.sha256()
    for fast_path in (False, True):
        model, out, grads, queue = run_case(get_case("unmix_with_filled_queue"), "cpu", fast_path)
        tensors = [out.loss] + [g for _, g in sorted(grads.items()) if g is not None] + list(model.state_dict().values())
        for t in tensors:
            h.update(t.detach().contiguous().cpu().numpy().tobytes())
    with open(os.environ["DIGEST_FILE"], "a") as f:
        f.write(h.hexdigest() + "\\n")
"""

# Everything a test could leave changed, at import and while it runs.
INTRUDER_TEST = """
import random
import numpy as np
import torch

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)


def test_change_everything():
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True)
    torch.set_float32_matmul_precision("medium")
    torch.backends.mkldnn.enabled = False
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
"""


def run_session(folder, files, digest):
    """A pytest session in a child, with tests/conftest.py as a plugin, over `files` in that order. The
    child keeps this process's environment (kernel and thread settings included), so its digest can be
    compared with one computed here."""
    env = dict(os.environ, DIGEST_FILE=str(digest), PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                          "--rootdir", str(folder), *[str(folder / f) for f in files]],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


def test_golden_results_do_not_depend_on_earlier_tests(tmp_path):
    """The same golden iteration gives bit for bit the same results alone, after a test that changed
    thread count, default dtype, backend flags and RNGs (at import and while running), and before it."""
    (tmp_path / "test_a_digest.py").write_text(textwrap.dedent(DIGEST_TEST))
    (tmp_path / "test_b_intruder.py").write_text(textwrap.dedent(INTRUDER_TEST))
    digests = []
    for k, files in enumerate([["test_a_digest.py"], ["test_b_intruder.py", "test_a_digest.py"],
                               ["test_a_digest.py", "test_b_intruder.py"]]):
        digest = tmp_path / f"digest{k}.txt"
        run_session(tmp_path, files, digest)
        digests.append(digest.read_text().split())
    assert [len(d) for d in digests] == [1, 1, 1]
    assert digests[0] == digests[1] == digests[2]
    # and the same as in this process, whatever the suite ran before this test
    ns = {}
    exec(textwrap.dedent(DIGEST_TEST), ns)
    own = tmp_path / "own.txt"
    os.environ["DIGEST_FILE"] = str(own)  # restored by tests/conftest.py
    ns["test_write_digest"]()
    assert own.read_text().split() == digests[0]
