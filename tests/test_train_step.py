"""One pretraining iteration: schedule, prototype normalisation and freezing, inputs, non-finite guard,
autocast, wrappers."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.larc import LARC
from src.resnet import resnet18
from src.train_step import cosine_schedule, normalize_prototypes_, train_step, unwrap
from src.unmix import SwavConfig, UnmixDraws

torch.set_num_threads(1)
BS = 4


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return resnet18(width_per_group=8, output_dim=16, hidden_mlp=32, nmb_prototypes=10, normalize=True)


def make_opt(model, lr=0.5):
    sgd = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1e-6)
    return LARC(sgd, trust_coefficient=0.001, clip=False)


def crops(n=2, seed=1, size=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(BS, 3, size, size, generator=g) for _ in range(n)]


def step(model, opt, cs, **kw):
    args = dict(draws=UnmixDraws(r=0.2, lam=0.6), cfg=SwavConfig(), lr=0.5, iteration=100,
                freeze_prototypes_niters=0, run_swav=False, unmix_prob=0.5)
    args.update(kw)
    draws = args.pop("draws")
    cfg = args.pop("cfg")
    return train_step(model, opt, cs, draws, cfg, **args)


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
    out = step(m, opt, crops(), iteration=3, freeze_prototypes_niters=4)
    assert m.prototypes.weight.grad is None
    assert torch.equal(m.prototypes.weight.detach(), F.normalize(before["prototypes.weight"], dim=1, p=2))
    assert m.prototypes.weight not in opt.state or not opt.state[m.prototypes.weight]
    changed = [k for k, v in m.named_parameters() if not torch.equal(v.detach(), before[k])]
    assert "conv1.weight" in changed and "projection_head.3.weight" in changed
    assert out.finite and torch.isfinite(out.loss)


def test_prototypes_update_once_the_freeze_is_over():
    m = tiny_model()
    before = m.prototypes.weight.detach().clone()
    step(m, make_opt(m), crops(), iteration=4, freeze_prototypes_niters=4)
    assert m.prototypes.weight.grad is not None
    assert not torch.allclose(m.prototypes.weight.detach(), F.normalize(before, dim=1, p=2), atol=1e-7)


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
    rec = Recorder(tiny_model())
    cs = crops()
    out = step(rec, make_opt(rec.module), cs, run_swav=True, draws=UnmixDraws(r=0.9, lam=0.3))
    assert len(rec.calls) == 1 and len(rec.calls[0]) == 2
    assert all(torch.equal(a, b) for a, b in zip(rec.calls[0], cs))
    assert out.lam == 0.3


def test_unmix_feeds_three_inputs_per_pair():
    rec = Recorder(tiny_model())
    cs = crops(4)
    out = step(rec, make_opt(rec.module), cs, draws=UnmixDraws(r=0.2, lam=0.6))
    seen = rec.calls[0]
    assert len(seen) == 6
    assert torch.equal(seen[0], cs[0]) and torch.equal(seen[1], cs[1])
    assert torch.equal(seen[3], cs[2]) and torch.equal(seen[4], cs[3])
    assert torch.allclose(seen[2], 0.6 * cs[0] + 0.4 * torch.flip(cs[0], dims=[0]))
    assert torch.allclose(seen[5], 0.6 * cs[2] + 0.4 * torch.flip(cs[2], dims=[0]))
    assert out.lam == 0.6


def test_region_mode_returns_the_adjusted_lam():
    m = tiny_model()
    out = step(m, make_opt(m), crops(), draws=UnmixDraws(r=0.9, lam=0.75, centers=[(0, 0)]))
    # 16x16 crop, cut 0.5 -> 8, box (0, 0, 4, 4) -> lam = 1 - 16 / 256
    assert out.lam == pytest.approx(1 - 16 / 256)


def test_lr_is_set_on_the_groups():
    m = tiny_model()
    opt = make_opt(m, lr=123.0)
    step(m, opt, crops(), lr=0.0)
    assert all(g["lr"] == 0.0 for g in opt.param_groups)


# ---------------------------------------------------------------- non-finite guard

def nan_crops():
    cs = crops()
    cs[1][0] = float("nan")
    return cs


def test_skip_nonfinite_skips_the_parameter_update():
    m = tiny_model()
    opt = make_opt(m)
    before = params_of(m)
    out = step(m, opt, nan_crops(), skip_nonfinite=True)
    assert out.finite is False and not torch.isfinite(out.loss)
    for k, v in m.named_parameters():
        if k == "prototypes.weight":  # normalised at step start, before the loss is known
            assert torch.equal(v.detach(), F.normalize(before[k], dim=1, p=2))
        else:
            assert torch.equal(v.detach(), before[k]), k
        assert v.grad is None, k
    assert len(opt.state) == 0  # no momentum buffer was created
    # the forward pass ran in training mode, but a skipped step restores every buffer it touched
    assert m.bn1.num_batches_tracked.item() == 0


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
    out = step(m, make_opt(m), nan_crops(), skip_nonfinite=True, queue=queue)
    assert out.finite is False
    assert torch.equal(queue, before)


def test_skip_nonfinite_also_catches_nonfinite_gradients():
    m = tiny_model()
    # what DistributedDataParallel's gradient all-reduce delivers when another rank's loss was NaN
    m.conv1.weight.register_hook(lambda g: g + float("nan"))
    before = params_of(m)
    out = step(m, make_opt(m), crops(), skip_nonfinite=True)
    assert torch.isfinite(out.loss)  # the local loss is fine
    assert out.finite is False
    assert torch.equal(m.conv1.weight.detach(), before["conv1.weight"])


def test_without_skip_the_nonfinite_step_happens():
    m = tiny_model()
    out = step(m, make_opt(m), nan_crops(), skip_nonfinite=False)
    assert out.finite is True  # not checked
    assert not torch.isfinite(m.conv1.weight).all()


def test_finite_loss_with_skip_nonfinite_steps_normally():
    a, b = tiny_model(), tiny_model()
    step(a, make_opt(a), crops(), skip_nonfinite=True)
    step(b, make_opt(b), crops(), skip_nonfinite=False)
    for (k, va), vb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(va, vb), k


# ---------------------------------------------------------------- precision, scaler, queue

def test_autocast_bfloat16_on_cpu():
    m = tiny_model()
    before = m.conv1.weight.detach().clone()
    out = step(m, make_opt(m), crops(), autocast_dtype=torch.bfloat16)
    assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
    assert m.conv1.weight.dtype == torch.float32
    assert not torch.equal(m.conv1.weight.detach(), before)


def test_cpu_grad_scaler_gives_the_same_step():
    a, b = tiny_model(), tiny_model()
    out_a = step(a, make_opt(a), crops())
    out_b = step(b, make_opt(b), crops(), scaler=torch.amp.GradScaler("cpu"))
    assert out_a.loss.item() == pytest.approx(out_b.loss.item(), rel=1e-6)
    for (k, va), vb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(va, vb, rtol=1e-5, atol=1e-7), k


def test_queue_is_filled_and_flag_returned():
    m = tiny_model()
    opt = make_opt(m)
    queue = torch.zeros(2, 3 * BS, 16)
    out = step(m, opt, crops(), queue=queue)
    assert out.queue_in_use is False
    assert torch.all(queue.abs().sum(dim=2) > 0)  # three loss calls x bs rows each
    assert torch.allclose(queue.norm(dim=2), torch.ones(2, 3 * BS), atol=1e-5)  # normalised embeddings
    out = step(m, opt, crops(seed=2), queue=queue)
    assert out.queue_in_use is True


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
