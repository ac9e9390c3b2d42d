"""Fast linear probe on cached features: separable data, schedules, stats, feature extraction."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.eval.linear_probe import extract_frozen_features, train_linear_on_features  # noqa: E402
from src.eval.setup import make_scheduler  # noqa: E402

COLUMNS = ["epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val", "prec5_val"]


def _separable(n_train=600, n_test=200, c=10, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(c, d, generator=g)
    ytr, yte = torch.arange(n_train) % c, torch.arange(n_test) % c
    xtr = centres[ytr] + 0.3 * torch.randn(n_train, d, generator=g)
    xte = centres[yte] + 0.3 * torch.randn(n_test, d, generator=g)
    return xtr, ytr, xte, yte


def test_separable_features_reach_100_percent_and_stats_shape():
    xtr, ytr, xte, yte = _separable()
    logs = []
    torch.manual_seed(7)
    state = torch.get_rng_state()
    res = train_linear_on_features(xtr, ytr, xte, yte, num_labels=10, epochs=8, batch_size=32, lr=0.3,
                                   wd=1e-6, log_fn=logs.append)
    assert torch.equal(torch.get_rng_state(), state)    # own generator: global RNG untouched
    assert res["best_top1"] >= 99.0 and res["last_top1"] >= 99.0 and res["last_top5"] == 100.0
    stats = res["stats"]
    assert len(stats) == 8 and len(logs) == 8 and len(res["lrs"]) == 8
    assert all(list(row) == COLUMNS for row in stats)
    assert [row["epoch"] for row in stats] == list(range(8))
    assert res["best_top1"] == max(row["prec1_val"] for row in stats)
    assert res["last_top1"] == stats[-1]["prec1_val"] and res["last_top5"] == stats[-1]["prec5_val"]
    assert stats[-1]["loss"] < stats[0]["loss"]
    assert res["seconds"] >= 0.0


def test_deterministic_given_seed_and_seed_matters():
    xtr, ytr, xte, yte = _separable(n_train=100, n_test=40, c=4, d=8, seed=1)
    kw = dict(num_labels=4, epochs=2, batch_size=16, lr=0.1, wd=1e-4, nesterov=True)
    a = train_linear_on_features(xtr, ytr, xte, yte, seed=5, **kw)
    b = train_linear_on_features(xtr, ytr, xte, yte, seed=5, **kw)
    c = train_linear_on_features(xtr, ytr, xte, yte, seed=6, **kw)
    assert a["stats"] == b["stats"]
    assert a["stats"][0]["loss"] != c["stats"][0]["loss"]


@pytest.mark.parametrize("kind", ["cosine", "step"])
def test_schedule_matches_torch_scheduler(kind):
    xtr, ytr, xte, yte = _separable(n_train=20, n_test=10, c=2, d=4)
    epochs, lr, final_lr = 12, 0.3, 0.001
    res = train_linear_on_features(xtr, ytr, xte, yte, num_labels=2, epochs=epochs, batch_size=8, lr=lr,
                                   wd=0.0, scheduler_type=kind, final_lr=final_lr, decay_epochs=(5, 9),
                                   gamma=0.1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr, momentum=0.9)
    if kind == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs, eta_min=final_lr)
        closed = [final_lr + 0.5 * (lr - final_lr) * (1 + math.cos(math.pi * e / epochs)) for e in range(epochs)]
    else:
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5, 9], gamma=0.1)
        closed = [lr * 0.1 ** ((e >= 5) + (e >= 9)) for e in range(epochs)]
    expected = []
    for _ in range(epochs):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert res["lrs"] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert res["lrs"] == pytest.approx(closed, rel=1e-9, abs=1e-12)
    assert len(res["stats"]) == epochs and res["last_top5"] == 100.0   # 2 classes: top-5 is top-2
    with pytest.raises(ValueError):
        make_scheduler(opt, "linear", epochs)


def test_extract_frozen_features_pools_maps():
    imgs = torch.randn(7, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    conv = torch.nn.Conv2d(3, 6, 3, padding=1).eval()
    feats = extract_frozen_features(conv, imgs, batch_size=3, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(feats, conv(imgs).mean(dim=(2, 3)))
    pooled = extract_frozen_features(lambda x: conv(x).mean(dim=(2, 3)), imgs, batch_size=4, device="cpu")
    torch.testing.assert_close(pooled, feats)
    assert not feats.requires_grad and feats.dtype == torch.float32
