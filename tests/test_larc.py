"""LARC with apex semantics: adaptive rate, weight decay folded in, clipping, state, GradScaler."""
import io

import pytest
import torch

from src.method.larc import LARC
from tests.golden import EPS32, entries_mismatch


def params():
    p1 = torch.nn.Parameter(torch.tensor([[0.5, -1.0], [2.0, 0.25]]))
    p2 = torch.nn.Parameter(torch.zeros(3))             # zero norm: gradient used as is, no decay
    p3 = torch.nn.Parameter(torch.tensor([1.0, 2.0]))   # no gradient: untouched
    p4 = torch.nn.Parameter(torch.tensor([3.0, -4.0]))  # zero gradient: untouched (no decay either)
    p1.grad = torch.tensor([[0.1, 0.2], [-0.3, 0.4]])
    p2.grad = torch.tensor([1.0, -2.0, 0.5])
    p4.grad = torch.zeros(2)
    return p1, p2, p3, p4


def test_step_matches_hand_computation():
    lr, wd, trust, eps = 0.1, 0.01, 0.001, 1e-8
    p1, p2, p3, p4 = params()
    w1, g1, g2 = p1.detach().clone(), p1.grad.clone(), p2.grad.clone()
    opt = LARC(torch.optim.SGD([p1, p2, p3, p4], lr=lr, momentum=0.9, weight_decay=wd),
               trust_coefficient=trust, clip=False)
    opt.step()
    pn, gn = w1.norm().item(), g1.norm().item()
    a = trust * pn / (gn + wd * pn + eps)
    scaled = (g1 + wd * w1) * a
    # first SGD step with momentum: buffer = gradient, update = lr * gradient
    assert torch.allclose(p1.detach(), w1 - lr * scaled, atol=1e-7)
    assert torch.allclose(p1.grad, scaled)
    assert torch.equal(p2.detach(), -lr * g2)
    assert torch.equal(p3.detach(), torch.tensor([1.0, 2.0]))
    assert torch.equal(p4.detach(), torch.tensor([3.0, -4.0]))
    assert opt.param_groups[0]["weight_decay"] == wd  # restored after the step
    assert torch.allclose(opt.state[p1]["momentum_buffer"], scaled)


@pytest.mark.parametrize("lr", [1e-4, 10.0])
def test_clip_mode(lr):
    wd, trust = 0.01, 0.02
    p1 = params()[0]
    w1, g1 = p1.detach().clone(), p1.grad.clone()
    opt = LARC(torch.optim.SGD([p1], lr=lr, weight_decay=wd), trust_coefficient=trust, clip=True)
    opt.step()
    pn, gn = w1.norm().item(), g1.norm().item()
    a = trust * pn / (gn + wd * pn + 1e-8)
    ratio = min(a / lr, 1.0)
    assert (ratio == 1.0) == (lr == 1e-4)  # both branches of the min are exercised
    assert torch.allclose(p1.detach(), w1 - lr * ratio * (g1 + wd * w1), atol=1e-7)


def test_weight_decay_restored_even_if_the_inner_step_fails():
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    sgd = torch.optim.SGD([p], lr=0.1, weight_decay=0.5)

    def boom(*a, **k):
        raise RuntimeError("inner step failed")

    sgd.step = boom
    opt = LARC(sgd, trust_coefficient=0.001, clip=False)
    with pytest.raises(RuntimeError, match="inner step failed"):
        opt.step()
    assert sgd.param_groups[0]["weight_decay"] == 0.5


def test_inner_step_sees_zero_weight_decay():
    seen = []
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.ones(2)
    sgd = torch.optim.SGD([p], lr=0.1, weight_decay=0.5)
    inner = sgd.step
    sgd.step = lambda *a, **k: (seen.append(sgd.param_groups[0]["weight_decay"]), inner())[1]
    LARC(sgd, trust_coefficient=0.001, clip=False).step()
    assert seen == [0]


def test_state_dict_round_trip_and_views():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    opt_a = LARC(torch.optim.SGD([a], lr=0.5, momentum=0.9, weight_decay=1e-4), trust_coefficient=0.001, clip=False)
    for _ in range(2):
        a.grad = torch.randn(4, 3)
        opt_a.step()
    buf = io.BytesIO()  # through a file, as a checkpoint does (load_state_dict would share tensors)
    torch.save(opt_a.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    assert "momentum_buffer" in sd["state"][0]
    b.data.copy_(a.detach())
    opt_b = LARC(torch.optim.SGD([b], lr=0.1, momentum=0.9, weight_decay=1e-4), trust_coefficient=0.001, clip=False)
    opt_b.load_state_dict(sd)
    assert opt_b.param_groups[0]["lr"] == 0.5
    g = torch.randn(4, 3)
    a.grad, b.grad = g.clone(), g.clone()
    opt_a.step()
    opt_b.step()
    assert torch.equal(a.detach(), b.detach())
    # the wrapper exposes the inner optimiser's groups: setting lr there changes the step
    opt_b.param_groups[0]["lr"] = 0.0
    before = b.detach().clone()
    b.grad = g.clone()
    opt_b.zero_grad()
    assert b.grad is None
    assert opt_b.optim.param_groups[0]["lr"] == 0.0
    assert torch.equal(b.detach(), before)


def test_grad_scaler_gives_the_unscaled_update():
    try:
        scaler = torch.amp.GradScaler("cpu")
    except Exception as e:  # pragma: no cover - depends on the torch build
        pytest.skip(f"GradScaler('cpu') unsupported here: {e}")
    torch.manual_seed(0)
    lin_a = torch.nn.Linear(5, 3)
    lin_b = torch.nn.Linear(5, 3)
    lin_b.load_state_dict(lin_a.state_dict())
    x = torch.randn(8, 5)

    def make(m):
        return LARC(torch.optim.SGD(m.parameters(), lr=0.3, momentum=0.9, weight_decay=1e-2),
                    trust_coefficient=0.001, clip=False)

    opt_a, opt_b = make(lin_a), make(lin_b)
    initial = [p.detach().clone() for p in lin_a.parameters()]
    (lin_a(x) ** 2).mean().backward()
    grad_a = lin_a.weight.grad.clone()
    opt_a.step()
    scaler.scale((lin_b(x) ** 2).mean()).backward()
    assert torch.allclose(lin_b.weight.grad, grad_a * scaler.get_scale())  # really scaled
    scaler.step(opt_b)
    scaler.update()
    for pa, pb, p0 in zip(lin_a.parameters(), lin_b.parameters(), initial):
        assert not torch.equal(pa, p0)
        assert torch.allclose(pa, pb, rtol=1e-6, atol=1e-8)

    # non-finite gradients: the scaler skips the LARC step and lowers the scale
    before = [p.detach().clone() for p in lin_b.parameters()]
    scale = scaler.get_scale()
    opt_b.zero_grad()
    scaler.scale((lin_b(x) * float("inf")).mean()).backward()
    scaler.step(opt_b)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(lin_b.parameters(), before))
    assert scaler.get_scale() < scale


def loop_larc_step(params, lr, wd, trust, eps, clip):
    """apex's LARC, one parameter at a time (the reference for the multi-tensor version)."""
    for p in params:
        if p.grad is None:
            continue
        pn, gn = torch.norm(p), torch.norm(p.grad)
        a = trust * pn / (gn + pn * wd + eps)
        if clip:
            a = torch.clamp(a / lr, max=1)
        apply = (pn != 0) & (gn != 0)
        p.grad.copy_(torch.where(apply, (p.grad + wd * p) * a, p.grad))


@pytest.mark.parametrize("clip", [False, True])
def test_multi_tensor_larc_is_bit_identical_to_the_loop(clip):
    from src.method.resnet import resnet18
    torch.manual_seed(0)
    net = resnet18(width_per_group=8, output_dim=16, hidden_mlp=32, nmb_prototypes=10, normalize=True)
    net(torch.randn(4, 3, 16, 16))[1].pow(2).sum().backward()
    ps = [p for p in net.parameters() if p.grad is not None] + list(params())  # + zero norms, no gradient
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    for r, p in zip(ref, ps):
        r.grad = None if p.grad is None else p.grad.clone()
    opt = LARC(torch.optim.SGD(ps, lr=0.3, weight_decay=1e-6), trust_coefficient=0.001, clip=clip)
    opt.scale_gradients(opt.param_groups[0], 1e-6)
    loop_larc_step(ref, 0.3, 1e-6, 0.001, 1e-8, clip)
    for r, p in zip(ref, ps):
        assert (r.grad is None) == (p.grad is None)
        if p.grad is not None:
            assert torch.equal(r.grad, p.grad)


def fused_and_plain_updates_differ(lr_plain):
    """Three steps of the fused SGD inside LARC and of the plain one (lr `lr_plain`) on the same gradients.
    Returns (the first mismatch of the updates under the golden rule or None, the fused optimiser, its
    parameters). The fused CPU kernel rounds the momentum update its own way, which depends on the CPU's
    vector kernels: on an AVX-512 Xeon 79 of 200 seeds end one ulp away from plain SGD. So the two agree
    to float32 rounding, not bit for bit."""
    from src.method.larc import build_optimizer
    ps = [torch.nn.Parameter(t) for t in (torch.randn(5, 3), torch.randn(7), torch.zeros(2))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fused = build_optimizer(ps, lr=0.3)
    plain = LARC(torch.optim.SGD(qs, lr=lr_plain, momentum=0.9, weight_decay=1e-6), trust_coefficient=0.001,
                 clip=False)
    for k in range(3):
        g = [torch.randn_like(p) for p in ps]
        before = [q.detach().clone() for q in qs]
        for p, q, gi in zip(ps, qs, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        fused.step(found_inf=torch.tensor(0.0), check_finite=True)
        plain.step()
        for i, (p, q, b) in enumerate(zip(ps, qs, before)):
            msg = entries_mismatch(p - b, q - b, f"step {k} parameter {i} update", floor=2 * EPS32 * q.abs())
            if msg:
                return msg, fused, ps
    return None, fused, ps


def test_fused_sgd_inside_larc_equals_plain_sgd_and_skips_on_found_inf():
    msg, fused, ps = fused_and_plain_updates_differ(lr_plain=0.3)
    assert msg is None, msg
    assert fused_and_plain_updates_differ(lr_plain=0.3 * 1.001)[0], "the rule must catch a 0.1 % lr change"
    before = [p.detach().clone() for p in ps]
    momentum = [fused.state[p]["momentum_buffer"].clone() for p in ps]
    for p in ps:
        p.grad = torch.full_like(p, float("nan"))
    flag = fused.step(check_finite=True)
    assert flag.item() == 1.0
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert all(torch.equal(fused.state[p]["momentum_buffer"], m) for p, m in zip(ps, momentum))


@pytest.mark.parametrize("guarded", [False, True], ids=["no_guard", "guard"])
def test_fused_sgd_steps_a_parameter_whose_first_gradient_comes_late(guarded):
    """The prototypes get no gradient while frozen, then one: the fused SGD kernel takes all momentum
    buffers or none, so LARC creates the late parameter's buffer (zeros: the same update as SGD's copy of
    the first gradient) with or without a device-side guard (`--max_nonfinite_steps 0` runs without one)."""
    from src.method.larc import build_optimizer
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(4))]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    fused = build_optimizer(ps, lr=0.3)
    plain = LARC(torch.optim.SGD(qs, lr=0.3, momentum=0.9, weight_decay=1e-6), trust_coefficient=0.001, clip=False)
    kw = {"found_inf": torch.tensor(0.0), "check_finite": True} if guarded else {}
    for k in range(3):
        g = [torch.randn_like(p) for p in ps]
        for i, (p, q, gi) in enumerate(zip(ps, qs, g)):
            late = i == 1 and k == 0  # the second parameter has no gradient in the first step
            p.grad, q.grad = (None, None) if late else (gi.clone(), gi.clone())
        fused.step(**kw)
        plain.step()
    for i, (p, q) in enumerate(zip(ps, qs)):
        assert not entries_mismatch(p.detach(), q.detach(), f"parameter {i}", floor=2 * EPS32 * q.abs())
    assert all(fused.state[p]["momentum_buffer"] is not None for p in ps)


def test_momentum_buffers_loaded_contiguous_take_their_channels_last_parameters_layout():
    """A checkpoint may hold contiguous momentum buffers (a released one, a run started without
    --channels_last): loaded beside channels_last parameters they are laid out as the parameters, since the
    fused SGD kernel steps equal strides (on the CPU it mixed up their elements; CUDA refuses them). The
    step then equals the one from channels_last buffers of the same values."""
    from src.method.larc import build_optimizer
    torch.manual_seed(0)
    weight = torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last)
    grad, momentum = torch.randn_like(weight), torch.randn_like(weight)
    steps = []
    for layout in (torch.channels_last, torch.contiguous_format):
        p = torch.nn.Parameter(weight.clone())
        opt = build_optimizer([p], lr=0.3)
        state = opt.state_dict()
        state["state"] = {0: {"momentum_buffer": momentum.clone(memory_format=layout)}}
        opt.load_state_dict(state)
        assert opt.state[p]["momentum_buffer"].stride() == p.stride()
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum)
        p.grad = grad.clone()
        opt.step()
        steps.append(p.detach().clone())
    assert torch.equal(steps[0], steps[1])
