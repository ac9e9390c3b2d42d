"""One pretraining iteration of Un-Mix + SwAV (behaviour doc, items 1-9), callable with given crops
and given random draws, so the golden tests and the training loop run the same code."""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .unmix import SwavConfig, UnmixDraws, swav_loss, unmix_inputs, unmix_swav_loss


def cosine_schedule(base_lr, final_lr, epochs, iters_per_epoch, warmup_epochs=0, start_warmup=0.0):
    """Per-iteration learning rates (item 1): linear warm-up, then
    final + 0.5 (base - final)(1 + cos(pi t / T)), T = iters_per_epoch * (epochs - warmup_epochs)."""
    warmup = np.linspace(start_warmup, base_lr, iters_per_epoch * warmup_epochs)
    iters = np.arange(iters_per_epoch * (epochs - warmup_epochs))
    cosine = np.array([final_lr + 0.5 * (base_lr - final_lr)
                       * (1 + math.cos(math.pi * t / len(iters))) for t in iters])
    return np.concatenate((warmup, cosine))


def unwrap(model):
    """The network inside DistributedDataParallel / torch.compile wrappers."""
    while hasattr(model, "module") or hasattr(model, "_orig_mod"):
        model = getattr(model, "module", None) or getattr(model, "_orig_mod")
    return model


@torch.no_grad()
def normalize_prototypes_(net):
    """L2-normalise each prototype vector in place (item 2)."""
    w = net.prototypes.weight
    w.copy_(F.normalize(w.detach().clone(), dim=1, p=2))


def _all_finite(net, loss, scaled, world_size):
    """Whether this step is finite, decided the same way on every rank.

    Without a scaler: from the gradients, which DDP's all-reduce makes identical on all ranks (one rank's
    NaN reaches every rank there), plus the loss with one process. With a GradScaler, overflowing scaled
    gradients are routine and the scaler skips those steps itself; only a non-finite loss counts, agreed
    across ranks with an all-reduce."""
    if scaled:
        ok = torch.isfinite(loss.detach()).float()
        if world_size > 1:
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        return ok > 0
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    ok = torch.isfinite(torch.stack(torch._foreach_norm(grads))).all() if grads else torch.tensor(True)
    if world_size == 1:
        ok = ok & torch.isfinite(loss.detach())
    return ok


@dataclass
class StepOutput:
    loss: torch.Tensor          # scalar, still on the device (read it only when logging)
    lam: float                  # the lam the loss used (after region adjustment)
    queue_in_use: bool
    finite: bool = True         # False: the loss was NaN/inf and the step was skipped


def train_step(model, optimizer, crops, draws: UnmixDraws, cfg: SwavConfig, *, lr: float,
               iteration: int, freeze_prototypes_niters: int, run_swav: bool, unmix_prob: float,
               queue: Optional[torch.Tensor] = None, queue_in_use: bool = False, scaler=None,
               autocast_dtype=None, loss_form: str = "released", channels_last: bool = False,
               skip_nonfinite: bool = False) -> StepOutput:
    """Set lr, normalise prototypes, mix, forward, loss, backward, drop prototype gradients while frozen,
    step. `draws` must be drawn even for plain SwAV (the released RNG stream consumes them).

    skip_nonfinite: find out whether the step is finite (one host sync, see `_all_finite`) and, when
    not, skip it and undo what the forward changed (BN running statistics, the queue)."""
    net = unwrap(model)
    for group in optimizer.param_groups:
        group["lr"] = lr
    normalize_prototypes_(net)

    if skip_nonfinite:  # device-side copies, no sync: restored if this step turns out non-finite
        saved_buffers = [b.detach().clone() for b in net.buffers()]
        saved_queue = None if queue is None else queue.clone()

    bs = crops[0].size(0)
    if run_swav:
        inputs, lam = list(crops), draws.lam
    else:
        inputs, lam = unmix_inputs(crops, draws, unmix_prob)
    if channels_last:
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]

    device_type = inputs[0].device.type
    with torch.autocast(device_type, dtype=autocast_dtype or torch.float32,
                        enabled=autocast_dtype is not None):
        embedding, output = model(inputs)
    # Loss and Sinkhorn in float32 even under mixed precision.
    embedding, output = embedding.detach().float(), output.float()
    prototypes = net.prototypes.weight.detach()
    if run_swav:
        loss, queue_in_use = swav_loss(embedding, output, bs, cfg, queue, prototypes, queue_in_use)
    else:
        loss, queue_in_use = unmix_swav_loss(embedding, output, bs, len(crops) // 2, lam, cfg, queue,
                                             prototypes, queue_in_use, loss_form)

    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    finite = True
    if skip_nonfinite:
        finite = bool(_all_finite(net, loss, scaler is not None, cfg.world_size))
        if not finite:
            with torch.no_grad():
                for b, saved in zip(net.buffers(), saved_buffers):
                    b.copy_(saved)
                if queue is not None:
                    queue.copy_(saved_queue)
    if iteration < freeze_prototypes_niters:
        for name, p in net.named_parameters():
            if "prototypes" in name:
                p.grad = None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    elif finite:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return StepOutput(loss=loss.detach(), lam=lam, queue_in_use=queue_in_use, finite=finite)
