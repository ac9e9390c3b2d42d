"""Fixtures shared by several test modules."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import slurm_cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A private one-node Slurm (tests/slurm_cluster.py), or a skip with the reason when Slurm is missing."""
    reason = slurm_cluster.missing_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster.SlurmCluster.start() as c:
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
