"""`--compile true` through inductor on the CPU, as main_swav_unmix.py builds the fast path (--augment
batched, --channels_last true, the non-finite guard's flat BN buffers; bf16 autocast is CUDA's, see
tests/test_cuda.py): one training step of the compiled network equals the eager one.

The network runs in float64 here (the loss and Sinkhorn stay float32, as in every run). In float32, at this
tiny width, batch norm's backward turns rounding into large differences: two correct eager runs whose
convolutions only sum in another order (oneDNN on and off) give updates of some BN weights that differ by
more than their own size, so a float32 comparison can either pass a real error or fail a correct compile.
In float64 the compiled step's distance from eager is measured at most ~1e-8 of a tensor's update; the
tolerance is TOL = 1e-6 of each float tensor's change (weights, BN statistics) and of the loss, and the
same rule refuses an eager step with a 0.1 % larger learning rate (checked below). Compiling makes this
test slow: about a minute of CPU time (measured 200 s of wall time on a busy 2-core machine).
"""
import logging

import numpy as np
import pytest
import torch

import main_swav_unmix as M
from tests.fake_cifar import write_cifar10

pytestmark = pytest.mark.slow  # compiling

TOL = 1e-6


def fast_path(data, dump, *extra):
    """A method as main_swav_unmix.py builds it, at tiny width, learning rate 0.6 from the first step."""
    log = logging.getLogger("test_compile")
    log.addHandler(logging.NullHandler())
    log.propagate = False
    args = M.get_parser().parse_args([
        "--data_path", str(data), "--dump_path", str(dump), "--arch", "resnet18", "--width_per_group", "8",
        "--hidden_mlp", "32", "--feat_dim", "16", "--nmb_prototypes", "10", "--batch_size", "16",
        "--workers", "0", "--warmup_epochs", "0", "--epochs", "2", "--freeze_prototypes_niters", "0",
        "--augment", "batched", "--channels_last", "true", *extra])
    M.launch.init_distributed(args)
    train = M.build_data(args, log, M.StartVote())
    torch.manual_seed(0)
    net = M.build_network(args, log).double()
    method = M.build_method(args, net, train.iters_per_epoch, np.random.RandomState(args.seed))
    method.start_epoch(0, train.iters_per_epoch)
    return method, train


def one_step(method, crops):
    before = {k: v.detach().clone() for k, v in method.net.state_dict().items() if v.is_floating_point()}
    loss = method.step([c.double() for c in crops], iteration=0).loss.item()
    after = {k: v.detach().clone() for k, v in method.net.state_dict().items() if k in before}
    return loss, before, after


def distances(ref, other):
    """Per float tensor: |other's change - ref's change| / |ref's change| (the loss: relative to itself)."""
    (l_ref, before, a_ref), (l_other, _, a_other) = ref, other
    out = {"loss": abs(l_other - l_ref) / abs(l_ref)}
    for k in a_ref:
        change = a_ref[k] - before[k]
        out[k] = ((a_other[k] - a_ref[k]).norm() / change.norm().clamp_min(1e-30)).item()
    return out


def beyond_tolerance(ref, other):
    """The loss / tensors where `other` differs from `ref` by more than TOL (relative to ref's change)."""
    return {k: d for k, d in distances(ref, other).items() if d > TOL}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_cifar10(tmp_path_factory.mktemp("c10"), n_train_per_batch=20, n_test=20)


def test_compiled_step_equals_eager(data, tmp_path):
    import torch._dynamo
    torch._dynamo.reset()
    eager, train = fast_path(data, tmp_path / "eager")
    crops = next(iter(train.epoch_crops(0, 0)))
    assert crops[0].is_contiguous(memory_format=torch.channels_last)
    ref = one_step(eager, crops)
    compiled, _ = fast_path(data, tmp_path / "compiled", "--compile", "true")
    assert isinstance(compiled.model, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.net is not compiled.model  # the state dict keeps its names (no _orig_mod.)
    result = one_step(compiled, crops)
    assert all(torch.equal(result[1][k], v) for k, v in ref[1].items())  # the same start
    assert beyond_tolerance(ref, result) == {}
    # not blind: an eager step with a 0.1 % larger learning rate is refused for every weight
    wrong_lr = one_step(fast_path(data, tmp_path / "lr", "--base_lr", str(0.6 * 1.001))[0], crops)
    weights = [k for k, _ in eager.net.named_parameters()]
    assert set(weights) <= set(beyond_tolerance(ref, wrong_lr))
