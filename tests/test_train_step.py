"""One pretraining iteration: schedule, prototype normalisation and freezing, inputs, non-finite guard,
autocast, wrappers."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from src.method.larc import build_optimizer
from src.method.resnet import resnet18
from src.method.train_step import UnmixSwAV, cosine_schedule, normalize_prototypes_, unwrap
from src.method.swav import SwavConfig
from src.method.unmix import UnmixDraws, draw_unmix

THREADS = 1  # small tensors: one intra-op thread (tests/conftest.py)
BS = 4


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return resnet18(width_per_group=8, output_dim=16, hidden_mlp=32, nmb_prototypes=10, normalize=True)


def make_opt(model, lr=0.5):
    return build_optimizer(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-6)


def crops(n=2, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BS, 3, size, size, generator=g) for _ in range(n)]


def method_for(model, opt, queue=None, scaler=None, autocast_dtype=None, skip_nonfinite=False, wrap=None,
               **cfg):
    cfg = SwavConfig(**{"freeze_prototypes_niters": 0, "unmix_prob": 0.5, "batch_size": BS, **cfg})
    method = UnmixSwAV(model, opt, cfg, scaler=scaler, autocast_dtype=autocast_dtype,
                       skip_nonfinite=skip_nonfinite)
    if wrap is not None:
        method.model = wrap(method.net)
    method.start_epoch(0, iters_per_epoch=4)
    if queue is not None:
        method.set_queue(queue)  # the same tensor on the CPU: the tests see it change in place
    return method


def step(model, opt, cs, draws=None, lr=0.5, iteration=100, **kw):
    """One iteration of a fresh UnmixSwAV; returns (output, method)."""
    method = method_for(model, opt, **kw)
    out = run(method, cs, draws or UnmixDraws(r=0.2, lam=0.6), lr, iteration)
    return out, method


def run(method, cs, draws, lr, iteration):
    """One iteration with given draws and learning rate (staged like the method's own), as the golden tests."""
    method.give(iteration, draws, lr, crops=cs)
    return method.step(cs, iteration)


def next_numbers(method):
    """The staged numbers of the next iteration, read without consuming them."""
    numbers = method.inputs.next_numbers()
    method.inputs.pos.sub_(1)
    return numbers


def staged_lam(method):
    """The lam of the loss the last iteration used (staged on the device, float32)."""
    method.inputs.pos.sub_(1)  # back to that iteration's row; reading it advances again
    return method.inputs.next_numbers().lam.item()


def params_of(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


# ---------------------------------------------------------------- schedule

def test_cosine_schedule_values():
    base, final, epochs, ipe, warm, start = 1.0, 0.1, 5, 4, 2, 0.05
    s = cosine_schedule(base, final, epochs, ipe, warm, start)
    assert len(s) == epochs * ipe
    np.testing.assert_allclose(s[:8], np.linspace(start, base, 8))
    assert s[0] == start and s[7] == base
    T = ipe * (epochs - warm)
    for t in range(T):
        assert s[8 + t] == pytest.approx(final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / T)))
    assert s[8] == pytest.approx(base)
    assert np.all(np.diff(s[8:]) < 0)
    assert final < s[-1] < final + (base - final) * 0.02  # approaches final_lr at the end


def test_cosine_schedule_without_warmup():
    s = cosine_schedule(0.6, 0.0006, 3, 10)
    assert len(s) == 30 and s[0] == pytest.approx(0.6)
    assert s[15] == pytest.approx(0.0006 + 0.5 * (0.6 - 0.0006))


# ---------------------------------------------------------------- prototypes

def test_prototypes_are_normalised_at_step_start():
    m = tiny_model()
    with torch.no_grad():
        m.prototypes.weight.mul_(5.0)
    w0 = m.prototypes.weight.detach().clone()
    step(m, make_opt(m), crops(), iteration=0, freeze_prototypes_niters=10)
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(10), atol=1e-6)
    assert torch.equal(m.prototypes.weight.detach(), F.normalize(w0, dim=1, p=2))


def test_normalize_prototypes_helper():
    m = tiny_model()
    with torch.no_grad():
        m.prototypes.weight.mul_(3.0)
    normalize_prototypes_(m)
    assert torch.allclose(m.prototypes.weight.norm(dim=1), torch.ones(10), atol=1e-6)


def test_frozen_prototypes_get_no_update_but_the_rest_does():
    m = tiny_model()
    opt = make_opt(m)
    before = params_of(m)
    out, _ = step(m, opt, crops(), iteration=3, freeze_prototypes_niters=4)
    assert m.prototypes.weight.grad is None
    assert torch.equal(m.prototypes.weight.detach(), F.normalize(before["prototypes.weight"], dim=1, p=2))
    assert m.prototypes.weight not in opt.state or not opt.state[m.prototypes.weight]
    changed = [k for k, v in m.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert "conv1.weight" in changed and "projection_head.3.weight" in changed
    assert torch.isfinite(out.loss)


def test_prototypes_update_once_the_freeze_is_over():
    m = tiny_model()
    before = m.prototypes.weight.detach().clone()
    step(m, make_opt(m), crops(), iteration=4, freeze_prototypes_niters=4)
    assert m.prototypes.weight.grad is not None
    assert not torch.allclose(m.prototypes.weight.detach(), F.normalize(before, dim=1, p=2), atol=1e-7)


@pytest.mark.parametrize("skip_nonfinite", [False, True], ids=["no_guard", "guard"])
def test_prototypes_unfreeze_mid_run_with_and_without_the_guard(skip_nonfinite):
    """The first unfrozen step gives the prototypes their first gradient while the other parameters have
    momentum already (`--max_nonfinite_steps 0` runs without the guard)."""
    m = tiny_model()
    method = method_for(m, make_opt(m), skip_nonfinite=skip_nonfinite, freeze_prototypes_niters=1)
    run(method, crops(), UnmixDraws(r=0.2, lam=0.6), 0.5, 0)
    frozen = m.prototypes.weight.detach().clone()
    run(method, crops(seed=2), UnmixDraws(r=0.2, lam=0.6), 0.5, 1)
    assert not torch.allclose(m.prototypes.weight.detach(), frozen, atol=1e-7)


# ---------------------------------------------------------------- inputs seen by the model

class Recorder(nn.Module):
    """A DDP-like wrapper (`.module`) that records what the network is called with."""

    def __init__(self, net):
        super().__init__()
        self.module = net
        self.calls = []

    def forward(self, inputs):
        self.calls.append([x.detach().clone() for x in inputs])
        return self.module(inputs)


def test_run_swav_feeds_the_crops_only():
    m = tiny_model()
    cs = crops()
    out, method = step(m, make_opt(m), cs, run_swav=True, draws=UnmixDraws(r=0.9, lam=0.3), wrap=Recorder)
    calls = method.model.calls
    assert len(calls) == 1 and len(calls[0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(calls[0], cs))
    assert staged_lam(method) == pytest.approx(0.3)


def test_unmix_feeds_three_inputs_per_pair():
    m = tiny_model()
    cs = crops(4)
    out, method = step(m, make_opt(m), cs, draws=UnmixDraws(r=0.2, lam=0.6), wrap=Recorder, nmb_crops=[4],
                       crops_for_assign=[0, 1])
    seen = method.model.calls[0]
    assert len(seen) == 6
    assert torch.equal(seen[0], cs[0]) and torch.equal(seen[1], cs[1])
    assert torch.equal(seen[3], cs[2]) and torch.equal(seen[4], cs[3])
    assert torch.allclose(seen[2], 0.6 * cs[0] + 0.4 * torch.flip(cs[0], dims=[0]))
    assert torch.allclose(seen[5], 0.6 * cs[2] + 0.4 * torch.flip(cs[2], dims=[0]))
    assert staged_lam(method) == pytest.approx(0.6)


def test_region_mode_returns_the_adjusted_lam():
    m = tiny_model()
    _, method = step(m, make_opt(m), crops(), draws=UnmixDraws(r=0.9, lam=0.75, centers=[(0, 0)]))
    # 16x16 crop, cut 0.5 -> 8, box (0, 0, 4, 4) -> lam = 1 - 16 / 256
    assert staged_lam(method) == 1 - 16 / 256


def test_lr_is_set_on_the_groups():
    m = tiny_model()
    opt = make_opt(m, lr=123.0)
    step(m, opt, crops(), lr=0.0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)


# ---------------------------------------------------------------- non-finite guard (decided on the device)

def nan_crops():
    cs = crops()
    cs[1][0] = float("nan")
    return cs


def bad_steps(method):
    return method.read_meter()["bad_steps"]


def test_skip_nonfinite_skips_the_parameter_update():
    m = tiny_model()
    opt = make_opt(m)
    before = params_of(m)
    out, method = step(m, opt, nan_crops(), skip_nonfinite=True, iteration=2)
    assert not torch.isfinite(out.loss)
    assert bad_steps(method) == [0.0, 0.0, 1.0, 0.0]  # iteration 2 of the epoch was undone
    for k, v in m.named_parameters():
        if k == "prototypes.weight":  # normalised at step start, before the loss is known
            assert torch.equal(v.detach(), F.normalize(before[k], dim=1, p=2))
        else:
            assert torch.equal(v.detach(), before[k]), k
    # momentum buffers exist (zeros, made before the first step) and were not touched
    assert opt.state and all(torch.equal(st["momentum_buffer"], torch.zeros_like(st["momentum_buffer"]))
                             for st in opt.state.values())
    # the forward pass ran in training mode, but a skipped step restores every buffer it touched
    assert m.bn1.num_batches_tracked.item() == 0
    assert method.read_meter()["kept"] == 0


def test_skipped_step_leaves_batchnorm_buffers_finite():
    m = tiny_model()
    step(m, make_opt(m), nan_crops(), skip_nonfinite=True)
    bad = [k for k, b in m.named_buffers() if b.is_floating_point() and not torch.isfinite(b).all()]
    assert bad == []


def test_skipped_step_leaves_the_queue_unchanged():
    m = tiny_model()
    queue = torch.zeros(2, 3 * BS, 16)
    queue[:, :, 0] = 1.0  # a full queue from earlier steps
    before = queue.clone()
    _, method = step(m, make_opt(m), nan_crops(), skip_nonfinite=True, queue=queue)
    assert bad_steps(method)[100 % 4] == 1.0
    assert torch.equal(queue, before)


def test_skip_nonfinite_also_catches_nonfinite_gradients():
    m = tiny_model()
    # what DistributedDataParallel's gradient all-reduce delivers when another rank's loss was NaN
    m.conv1.weight.register_hook(lambda g: g + float("nan"))
    before = params_of(m)
    out, method = step(m, make_opt(m), crops(), skip_nonfinite=True)
    assert torch.isfinite(out.loss)  # the local loss is fine
    assert any(bad_steps(method))
    assert torch.equal(m.conv1.weight.detach(), before["conv1.weight"])


def test_without_skip_the_nonfinite_step_happens():
    m = tiny_model()
    _, method = step(m, make_opt(m), nan_crops(), skip_nonfinite=False)
    assert bad_steps(method) is None  # not checked
    assert not torch.isfinite(m.conv1.weight).all()


def test_finite_loss_with_skip_nonfinite_steps_normally():
    a, b = tiny_model(), tiny_model()
    out_a, method = step(a, make_opt(a), crops(), skip_nonfinite=True)
    step(b, make_opt(b), crops(), skip_nonfinite=False)
    for (k, va), vb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(va, vb), k
    assert not any(bad_steps(method))
    assert method.read_meter()["loss"] == out_a.loss.item()


def test_a_bad_step_between_good_ones_is_undone_exactly():
    """good, bad, good with the guard equals good, good without it: the bad step leaves no trace (weights,
    momentum, BN statistics) but for its prototype normalisation at the step's start (as released), and
    the meter averages the kept losses only."""
    a, b = tiny_model(), tiny_model()
    opt_a, opt_b = make_opt(a), make_opt(b)
    guarded = method_for(a, opt_a, skip_nonfinite=True)
    plain = method_for(b, opt_b)
    draws = UnmixDraws(r=0.2, lam=0.6)
    losses = [run(guarded, crops(seed=1), draws, 0.5, 0).loss.item(),
              run(guarded, nan_crops(), draws, 0.5, 1).loss.item(),
              run(guarded, crops(seed=3), draws, 0.5, 2).loss.item()]
    run(plain, crops(seed=1), draws, 0.5, 0)
    normalize_prototypes_(b)
    run(plain, crops(seed=3), draws, 0.5, 2)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(opt_a.state[pa]["momentum_buffer"], opt_b.state[pb]["momentum_buffer"])
    meter = guarded.read_meter()
    assert meter["bad_steps"] == [0.0, 1.0, 0.0, 0.0] and meter["kept"] == 2
    assert meter["loss"] == pytest.approx((losses[0] + losses[2]) / 2, rel=1e-6)


def test_guard_with_a_grad_scaler_skips_a_nonfinite_loss():
    m = tiny_model()
    before = params_of(m)
    out, method = step(m, make_opt(m), nan_crops(), skip_nonfinite=True, scaler=torch.amp.GradScaler("cpu"))
    assert any(bad_steps(method))
    assert torch.equal(m.conv1.weight.detach(), before["conv1.weight"])
    assert m.bn1.num_batches_tracked.item() == 0


def test_buffers_live_in_one_flat_tensor_per_dtype():
    m = tiny_model()
    guard_method = method_for(m, make_opt(m), skip_nonfinite=True)
    flat = guard_method.guard.flat
    assert sorted(str(f.dtype) for f in flat) == sorted({str(b.dtype) for b in m.buffers()})
    for b in m.buffers():
        assert any(b.untyped_storage().data_ptr() == f.untyped_storage().data_ptr() for f in flat)
    # the state dict still holds every buffer under its released name, with its own values
    names = [k for k, _ in tiny_model().named_buffers()]
    assert [k for k, _ in m.named_buffers()] == names


# ---------------------------------------------------------------- precision, scaler, queue

def test_autocast_bfloat16_on_cpu():
    m = tiny_model()
    before = m.conv1.weight.detach().clone()
    out, _ = step(m, make_opt(m), crops(), autocast_dtype=torch.bfloat16)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert m.conv1.weight.dtype == torch.float32
    assert not torch.equal(m.conv1.weight.detach(), before)


def test_cpu_grad_scaler_gives_the_same_step():
    a, b = tiny_model(), tiny_model()
    out_a, _ = step(a, make_opt(a), crops())
    out_b, _ = step(b, make_opt(b), crops(), scaler=torch.amp.GradScaler("cpu"))
    assert out_a.loss.item() == pytest.approx(out_b.loss.item(), rel=1e-6)
    for (k, va), vb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(va, vb, rtol=1e-5, atol=1e-7), k


def test_queue_is_filled_and_flag_returned():
    m = tiny_model()
    opt = make_opt(m)
    queue = torch.zeros(2, 3 * BS, 16)
    method = method_for(m, opt, queue=queue)
    run(method, crops(), UnmixDraws(r=0.2, lam=0.6), 0.5, 100)
    assert method.queue.in_use is False
    assert torch.all(queue.abs().sum(dim=2) > 0)  # three loss calls x bs rows each
    assert torch.allclose(queue.norm(dim=2), torch.ones(2, 3 * BS), atol=1e-5)  # normalised embeddings
    run(method, crops(seed=2), UnmixDraws(r=0.2, lam=0.6), 0.5, 101)
    assert method.queue.in_use is True
    method.start_epoch(1, 4)  # 'in use' starts afresh each epoch, and turns on at the first check
    assert method.queue.in_use is False


def test_queue_appears_at_its_epoch():
    m = tiny_model()
    method = method_for(m, make_opt(m), queue_length=3 * BS, epoch_queue_starts=2, feat_dim=16)
    method.start_epoch(1, 4)
    assert method.queue is None
    method.start_epoch(2, 4)
    assert method.queue.tensor.shape == (2, 3 * BS, 16) and not method.queue.tensor.any()


def test_state_dict_changes_nothing_and_records_the_stream_at_the_first_iteration_not_trained():
    """A checkpoint's Un-Mix stream is the one-at-a-time stream after the iterations trained, though draws
    are staged ahead in chunks; reading it leaves the stream and the staged draws as they were."""
    m = tiny_model()
    method = UnmixSwAV(m, make_opt(m), SwavConfig(batch_size=BS, size_crops=(16,)), rng=np.random.RandomState(5),
                       lr_schedule=np.linspace(0.5, 0.1, 10), chunk=8)
    method.start_epoch(0, iters_per_epoch=10)
    for it in range(3):
        method.step(crops(seed=it), it)
    stream, staged = method.inputs.rng.get_state(), (method.inputs.first, method.inputs.count, method.inputs.used)
    state = method.state_dict()
    assert all(np.array_equal(a, b) for a, b in zip(method.inputs.rng.get_state(), stream))
    assert (method.inputs.first, method.inputs.count, method.inputs.used) == staged
    one_at_a_time = np.random.RandomState(5)
    for _ in range(3):
        draw_unmix(one_at_a_time, 1.0, 0.5, [(16, 16)])
    assert all(np.array_equal(a, b) for a, b in zip(state["unmix_rng"].get_state(), one_at_a_time.get_state()))


# ---------------------------------------------------------------- wrappers

def test_unwrap():
    net = nn.Linear(2, 2)

    class DDP:
        def __init__(self, module):
            self.module = module

    class Compiled:
        def __init__(self, orig):
            self._orig_mod = orig

    assert unwrap(net) is net
    assert unwrap(DDP(net)) is net
    assert unwrap(Compiled(net)) is net
    assert unwrap(Compiled(DDP(net))) is net
    assert unwrap(DDP(Compiled(DDP(net)))) is net


# ---------------------------------------------------------------- one trace: a capturable iteration

class OpTrace(TorchDispatchMode):
    """Every op (views included) with what it was given: tensors by shape, stride, dtype and device,
    everything else by value; and the reads of a tensor's value on the host."""

    HOST_READS = {"_local_scalar_dense", "is_nonzero", "equal", "item"}

    def __init__(self):
        super().__init__()
        self.ops, self.host_reads = [], []

    @staticmethod
    def describe(x):
        if isinstance(x, torch.Tensor):
            return ("T", tuple(x.shape), x.stride(), str(x.dtype), str(x.device))
        if isinstance(x, (list, tuple)):
            return tuple(OpTrace.describe(y) for y in x)
        return repr(x)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__
        if func.namespace == "profiler":  # record_function markers of optimizer.step: no kernel
            return func(*args, **kwargs)
        self.ops.append((name, self.describe(args), self.describe(sorted(kwargs.items()))))
        if name.split(".")[0] in self.HOST_READS:
            self.host_reads.append(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("run_swav", [False, True], ids=["unmix", "swav"])
def test_steady_state_iterations_launch_one_trace(run_swav):
    """Iterations with other draws (global and region mixing, other boxes) and other learning rates launch
    the very same operations with the same arguments: one trace while the prototypes are frozen, one
    after, and no read of a device value on the host inside a step. So one captured iteration (a CUDA
    graph) replays any other. With the queue in use and the non-finite guard on, as the loop runs it."""
    m = tiny_model()
    iters = 12
    lrs = np.linspace(0.6, 0.01, iters)
    cfg = SwavConfig(freeze_prototypes_niters=6, run_swav=run_swav, batch_size=BS, feat_dim=16, size_crops=(16,))
    method = UnmixSwAV(m, make_opt(m), cfg, rng=np.random.RandomState(3), lr_schedule=lrs, skip_nonfinite=True,
                       chunk=4)
    method.start_epoch(0, iters_per_epoch=iters)
    full = F.normalize(torch.randn(2, 3 * BS, 16, generator=torch.Generator().manual_seed(5)), dim=2)
    method.set_queue(full)
    traces, modes = [], []
    for it in range(iters):
        method.inputs.ensure(it)  # chunks of 4 are staged outside the traced steps
        modes.append(next_numbers(method).mode.item())
        cs = crops(seed=it)
        with OpTrace() as t:
            method.step(cs, iteration=it)
        assert t.host_reads == [], f"iteration {it} read {t.host_reads} on the host"
        traces.append(tuple(t.ops))
    if not run_swav:
        assert 0.0 in modes[1:6] and 1.0 in modes[1:6] and 0.0 in modes[7:] and 1.0 in modes[7:]
    # the first iteration of each phase creates momentum buffers (of the prototypes when they unfreeze)
    frozen, unfrozen = set(traces[1:6]), set(traces[7:])
    assert len(frozen) == 1 and len(unfrozen) == 1 and frozen != unfrozen


def test_cuda_graphs_need_a_cuda_device():
    m = tiny_model()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        UnmixSwAV(m, make_opt(m), SwavConfig(), cuda_graph=True)
