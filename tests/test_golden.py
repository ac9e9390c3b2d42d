"""One training iteration and Sinkhorn reproduce the released code's outputs (tests/data/golden), within
the float32 round-off rule of tests/golden.py; and that rule still fails a real difference (a 0.1 %
change of lr, lam or Sinkhorn's epsilon, a box moved by one pixel)."""
import dataclasses

import pytest
import torch

from src.method.larc import LARC, build_optimizer
from src.method.resnet import build_model
from src.method.sinkhorn import sinkhorn
from src.method.swav import SwavConfig
from src.method.train_step import UnmixSwAV
from src.method.staging import StepInputs
from src.method.unmix import UnmixDraws, mix_pairs, pair_sizes
from tests.reference_unmix import unmix_inputs
from tests.golden import NOISE_NORM, entries_mismatch, load_golden, loss_mismatch, summary_mismatches

GOLDEN = None


def golden():
    global GOLDEN
    if GOLDEN is None:
        GOLDEN = load_golden()
    return GOLDEN


def case_names():
    return [c["name"] for c in golden()["cases"]]


def get_case(name):
    return next(c for c in golden()["cases"] if c["name"] == name)


def build(case, device="cpu", fused=False):
    cfg = case["config"]
    model = build_model(cfg["arch"], width_per_group=cfg["width_per_group"], normalize=True,
                        hidden_mlp=cfg["hidden_mlp"], output_dim=cfg["feat_dim"],
                        nmb_prototypes=cfg["nmb_prototypes"])
    model.load_state_dict(golden()["init_state_dicts"][case["init_key"]])
    model.to(device)
    if fused:  # what the training loop builds
        opt = build_optimizer(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["wd"],
                              trust_coefficient=cfg["trust_coefficient"], clip=cfg["larc_clip"])
    else:
        sgd = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["wd"])
        opt = LARC(sgd, trust_coefficient=cfg["trust_coefficient"], clip=cfg["larc_clip"])
    return model, opt


def draws_of(case):
    d = case["draws"]
    centers = d.get("centers")
    if centers is not None:  # flat [cx, cy, cx, cy, ...] in draw order
        centers = [tuple(centers[i:i + 2]) for i in range(0, len(centers), 2)]
    return UnmixDraws(r=d["r"], lam=d["lam"], centers=centers)


def run_case(case, device="cpu", fast_path=False, lr_factor=1.0, draws=None, cfg_changes=None):
    """One iteration; `fast_path`: as the training loop runs it (fused SGD, the device-side non-finite
    guard with its flat buffers), else with a plain SGD inside LARC and no guard. `lr_factor`, `draws`
    and `cfg_changes` alter the case (the negative tests)."""
    cfg = case["config"]
    model, opt = build(case, device, fused=fast_path)
    model.train()
    queue = None if case["queue_in"] is None else case["queue_in"].clone().to(device)
    grads = {}
    # record the raw gradients before LARC rescales them in place

    def hook_larc_step(orig=opt.step):
        def step(*a, **k):
            for n, p in model.named_parameters():
                grads[n] = None if p.grad is None else p.grad.detach().to("cpu", copy=True)
            return orig(*a, **k)
        return step

    opt.step = hook_larc_step()
    swav_cfg = dataclasses.replace(SwavConfig.from_dict(cfg), **(cfg_changes or {}))
    method = UnmixSwAV(model, opt, swav_cfg, skip_nonfinite=fast_path)
    if queue is not None:
        method.set_queue(queue)
    method.give(cfg["iteration"], draws or draws_of(case), lr=cfg["lr"] * lr_factor)
    out = method.step([c.clone().to(device) for c in case["crops"]], iteration=cfg["iteration"])
    queue = None if method.queue is None else method.queue.tensor
    return model, out, grads, queue


def noise_gradient_params(case):
    """Parameters whose exact gradient is zero (the Linear bias in front of BatchNorm1d): their computed
    gradient is float round-off (~1e-9) that differs between kernels and thread counts, and LARC scales
    any gradient to a step of lr * trust * ||p||, so the step itself is round-off and cannot be matched
    by recomputing it. Their released gradient is matched by being round-off too, and their step by
    test_larc_step_on_released_noise_gradients."""
    return {n for n, ref in case["grads"].items() if ref is not None and ref["norm"] < NOISE_NORM}


def iteration_mismatches(case, device="cpu", fast_path=False, **changes):
    """Every way one iteration departs from the released one (tests/golden.py's rule), as messages."""
    model, out, grads, queue = run_case(case, device, fast_path, **changes)
    found = [loss_mismatch(out.loss.item(), case["loss"])]
    if set(grads) != set(case["grads"]):
        found.append(f"parameters with gradients: {sorted(set(grads) ^ set(case['grads']))}")
    noise = noise_gradient_params(case)
    for n, ref in case["grads"].items():
        if ref is None:
            found.append(None if grads.get(n) is None else f"{n}: gradient should have been dropped (frozen)")
        elif grads.get(n) is None:
            found.append(f"{n}: no gradient")
        elif n in noise:
            found.append(None if grads[n].norm() < NOISE_NORM else f"grad {n}: not round-off")
        else:
            found += summary_mismatches(grads[n], ref, f"grad {n}")
    init = golden()["init_state_dicts"][case["init_key"]]
    state = {n: t.cpu() for n, t in model.state_dict().items()}
    for n, ref in case["state_dict_after"].items():
        if n not in noise:  # checked by test_larc_step_on_released_noise_gradients
            found += summary_mismatches(state[n], ref, f"state {n}", before=init[n])
    if case["queue_out"] is None:
        found.append(None if queue is None else "a queue appeared")
    else:
        found.append(entries_mismatch(queue, case["queue_out"], "queue"))
    return [m for m in found if m]


def check_iteration(case, device, fast_path=False):
    found = iteration_mismatches(case, device, fast_path)
    assert not found, f"{case['name']}: {len(found)} mismatches, e.g.\n" + "\n".join(found[:10])


@pytest.mark.parametrize("name", case_names())
def test_network_inputs(name):
    """The released arithmetic as written (tests/reference_unmix.py) and the device mixing from staged
    numbers (what the iteration runs) both give the released network inputs."""
    case = get_case(name)
    cfg, crops = case["config"], case["crops"]
    if cfg["run_swav"]:
        candidates = [list(crops)]
    else:
        staged = StepInputs("cpu", cfg["unmix_prob"], 1.0, pair_sizes(crops))
        staged.give(0, draws_of(case), cfg["lr"])
        candidates = [unmix_inputs(crops, draws_of(case), cfg["unmix_prob"])[0],
                      mix_pairs(crops, staged.next_numbers())]
    for inputs in candidates:
        assert len(inputs) == len(case["network_inputs"])
        for k, (ours, ref) in enumerate(zip(inputs, case["network_inputs"])):
            assert not entries_mismatch(ours, ref, f"input {k}")


@pytest.mark.parametrize("fast_path", [False, True], ids=["plain", "fast_path"])
@pytest.mark.parametrize("name", case_names())
def test_iteration_matches_released(name, fast_path):
    check_iteration(get_case(name), "cpu", fast_path)


def moved_box(case):
    """The draws with the first box centre one pixel to the right (or left at the edge)."""
    d = draws_of(case)
    (cx, cy), rest = d.centers[0], d.centers[1:]
    w = case["crops"][0].size(2)
    return dataclasses.replace(d, centers=[(cx + 1 if cx + 1 < w else cx - 1, cy)] + rest)


PERTURBATIONS = {
    "lr": lambda case: {"lr_factor": 1.001},
    "lam": lambda case: {"draws": dataclasses.replace(draws_of(case), lam=draws_of(case).lam * 1.001)},
    "epsilon": lambda case: {"cfg_changes": {"epsilon": case["config"]["epsilon"] * 1.001}},
    "box": lambda case: {"draws": moved_box(case)},
}


def touches(case, what):
    """Whether the released iteration uses the perturbed quantity. lam: global mixing only; in region
    mixing the drawn lam only sizes the box, in whole pixels (a 0.1 % change leaves it where it is), and
    the loss weighs by the box's area. box: region mixing."""
    mixing = not case["config"]["run_swav"]
    region = mixing and bool(case["draws"].get("centers"))
    return {"lr": True, "epsilon": True, "lam": mixing and not region, "box": region}[what]


@pytest.mark.parametrize("what", sorted(PERTURBATIONS))
def test_rule_fails_a_real_difference(what):
    """The round-off rule is not so loose that it hides a change of method: a 0.1 % change of lr, lam or
    Sinkhorn's epsilon, or a box moved by one pixel, fails every case it touches."""
    touched = [c for c in golden()["cases"] if touches(c, what)]
    assert touched
    for case in touched:
        found = iteration_mismatches(case, **PERTURBATIONS[what](case))
        assert found, f"{case['name']}: a 0.1 % change of {what} went unnoticed"


@pytest.mark.parametrize("name", case_names())
def test_larc_step_on_released_noise_gradients(name):
    """For the noise-gradient parameters, our LARC + SGD step applied to the released gradient (its
    stored entries, the other entries filled to the stored norm) gives the released updated weights."""
    case = get_case(name)
    cfg = case["config"]
    init = golden()["init_state_dicts"][case["init_key"]]
    noise = noise_gradient_params(case)
    assert noise == {"projection_head.0.bias"}
    for n in noise:
        ref_g, ref_after = case["grads"][n], case["state_dict_after"][n]
        assert torch.equal(ref_g["idx"], ref_after["idx"])
        p = torch.nn.Parameter(init[n].clone().float())
        rest = torch.ones(p.numel(), dtype=torch.bool)
        rest[ref_g["idx"]] = False
        known = ref_g["values"].double()
        fill = ((ref_g["norm"] ** 2 - known.pow(2).sum()) / rest.sum()).clamp(min=0).sqrt()
        g = torch.full((p.numel(),), fill.item(), dtype=torch.float64)
        g[ref_g["idx"]] = known
        p.grad = g.float().view_as(p)
        opt = LARC(torch.optim.SGD([p], lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["wd"]),
                   trust_coefficient=cfg["trust_coefficient"], clip=cfg["larc_clip"])
        opt.step()
        # only the stored entries of the update are known exactly (the rest of the gradient was filled)
        ref_update = ref_after["values"].double() - init[n].double().flatten()[ref_after["idx"]]
        ours = p.detach().double().flatten()[ref_after["idx"]] - init[n].double().flatten()[ref_after["idx"]]
        assert not entries_mismatch(ours, ref_update, f"{n} update",
                                    floor=2 * torch.finfo(torch.float32).eps * ref_after["values"].double().abs())


def test_golden_covers_each_branch():
    """The public cases exercise global and region mixing, frozen prototypes, plain SwAV and the queue."""
    cases = golden()["cases"]
    assert any(c["draws"]["r"] < c["config"]["unmix_prob"] and not c["config"]["run_swav"] for c in cases)
    assert any(c["draws"].get("centers") for c in cases)
    assert any(c["config"]["run_swav"] for c in cases)
    assert any(c["queue_in"] is not None for c in cases)


@pytest.mark.parametrize("epsilon_factor", [1.0, 1.001], ids=["released", "epsilon+0.1%"])
def test_sinkhorn_matches_released(epsilon_factor):
    cases = golden()["sinkhorn"]
    assert cases
    found = [entries_mismatch(sinkhorn(s["scores"], s["epsilon"] * epsilon_factor, s["iterations"],
                                       s["improve_numerical_stability"]), s["assignments"], f"sinkhorn {k}")
             for k, s in enumerate(cases)]
    if epsilon_factor == 1.0:
        assert not any(found), found
    else:  # every case notices a 0.1 % change of epsilon
        assert all(found)
