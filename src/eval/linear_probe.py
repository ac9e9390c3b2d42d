"""Fast linear evaluation: train the released linear classifier on cached frozen features.

The released protocol (`eval_linear.py`) runs the frozen backbone on randomly cropped and flipped
training images every epoch. The fast mode extracts the features of the un-augmented train and test
splits once, then trains the same classifier (`Linear(D, num_labels)`, weights N(0, 0.01), bias 0) with
the same optimiser (SGD, momentum 0.9, weight decay, optional Nesterov), the same schedule (cosine over
the epochs, stepped once per epoch, or multi-step), the same epochs and batch size, on tensors kept on
the device. Like the released code it reports the best test top-1 over all epochs ("Top-1 test
accuracy") and, in addition, the last epoch's top-1/top-5.

Results differ from the released mode because the classifier never sees augmented crops (training
features are those of the full, centred 32x32 image), not because of the optimiser.
"""
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import correct_counts
from .setup import make_scheduler

__all__ = ["extract_frozen_features", "train_linear_on_features"]


@torch.no_grad()
def extract_frozen_features(model_fn, images, batch_size, device):
    """N x D float32 features on `device`. `model_fn(x)` returns the layer4 map (B x C x H x W), which is
    average-pooled and flattened as the released classifier does, or an already pooled B x D tensor.
    The caller puts the model in eval mode (frozen BN statistics). Features are not normalised."""
    device = torch.device(device)
    feats = []
    for start in range(0, images.shape[0], batch_size):
        out = model_fn(images[start:start + batch_size].to(device, non_blocking=True))
        if out.dim() == 4:
            out = F.adaptive_avg_pool2d(out, 1)
        feats.append(out.flatten(1).float())
    if not feats:
        raise ValueError("extract_frozen_features: no images")
    return torch.cat(feats)


@torch.no_grad()
def _evaluate(linear, x, y, batch_size, maxk):
    loss_sum = c1 = c5 = 0.0
    n = x.shape[0]
    for start in range(0, n, batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        out = linear(xb)
        loss_sum += F.cross_entropy(out, yb).item() * xb.shape[0]
        a1, a5 = correct_counts(out, yb, (1, maxk)).tolist()
        c1 += a1
        c5 += a5
    n = max(n, 1)
    return loss_sum / n, 100.0 * c1 / n, 100.0 * c5 / n


def train_linear_on_features(train_x, train_y, test_x, test_y, num_labels, epochs, batch_size, lr, wd,
                             nesterov=False, scheduler_type="cosine", final_lr=0.0, decay_epochs=(60, 80),
                             gamma=0.1, seed=31, device="cpu", log_fn=None):
    """Train `Linear(D, num_labels)` on the cached features and test it after every epoch.

    Returns a dict: `best_top1` (max test top-1 over epochs, the released number), `last_top1`,
    `last_top5` (final epoch), `stats` (one dict per epoch: epoch, loss, prec1, prec5, loss_val,
    prec1_val, prec5_val; averages weighted by batch size as the released AverageMeter does), `lrs`
    (learning rate used in each epoch) and `seconds`. Top-5 is top-min(5, num_labels).
    The classifier init and the per-epoch reshuffling use their own generator seeded with `seed`
    (order of epoch e: randperm with seed + e), so the global RNG streams are not consumed.
    """
    t0 = time.time()
    device = torch.device(device)
    train_x = train_x.to(device).float()
    test_x = test_x.to(device).float()
    train_y = torch.as_tensor(train_y, dtype=torch.long).to(device)
    test_y = torch.as_tensor(test_y, dtype=torch.long).to(device)
    n, dim = train_x.shape
    maxk = min(5, num_labels)

    linear = torch.nn.utils.skip_init(nn.Linear, dim, num_labels)   # no default init: no global RNG draw
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        linear.weight.copy_(torch.empty(num_labels, dim).normal_(0.0, 0.01, generator=gen))
        linear.bias.zero_()
    linear = linear.to(device)
    linear.train()

    optimizer = torch.optim.SGD(linear.parameters(), lr=lr, nesterov=nesterov, momentum=0.9, weight_decay=wd)
    scheduler = make_scheduler(optimizer, scheduler_type, epochs, final_lr, decay_epochs, gamma)

    stats, lrs = [], []
    best_top1 = -math.inf
    for epoch in range(epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).to(device)
        loss_sum = c1 = c5 = 0.0
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            xb, yb = train_x[idx], train_y[idx]
            out = linear(xb)
            loss = F.cross_entropy(out, yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.item() * xb.shape[0]
            a1, a5 = correct_counts(out.detach(), yb, (1, maxk)).tolist()
            c1 += a1
            c5 += a5
        loss_val, prec1_val, prec5_val = _evaluate(linear, test_x, test_y, batch_size, maxk)
        row = {"epoch": epoch, "loss": loss_sum / max(n, 1), "prec1": 100.0 * c1 / max(n, 1),
               "prec5": 100.0 * c5 / max(n, 1), "loss_val": loss_val, "prec1_val": prec1_val,
               "prec5_val": prec5_val}
        stats.append(row)
        best_top1 = max(best_top1, prec1_val)
        scheduler.step()
        if log_fn is not None:
            log_fn(f"Epoch [{epoch + 1}/{epochs}] lr {lrs[-1]:.6g} loss {row['loss']:.4f} "
                   f"train top-1 {row['prec1']:.2f} test loss {loss_val:.4f} test top-1 {prec1_val:.2f} "
                   f"top-5 {prec5_val:.2f} best top-1 {best_top1:.2f}")
    last = stats[-1] if stats else {"prec1_val": float("nan"), "prec5_val": float("nan")}
    return {"best_top1": best_top1 if stats else float("nan"), "last_top1": last["prec1_val"],
            "last_top5": last["prec5_val"], "stats": stats, "lrs": lrs, "seconds": time.time() - t0}
