"""Un-Mix + SwAV training (docs/released-behaviour.md, items 1-9): one object owns the method's
hyper-parameters, the network with its prototypes, the optimiser, the queue and one training iteration,
`UnmixSwAV(...).step(crops, draws, lr, iteration)`. The golden tests and the training loop run it.

An iteration asks the host for nothing: the learning rate and the Un-Mix draws come from the host, the
queue's "in use" check is a host-side count, and the non-finite guard decides on the device whether the
step is kept (the fused SGD kernel skips it; BN statistics and queue are restored by a select). What the
loop reads (loss, non-finite steps) accumulates in `meter` and is read when logging.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .unmix import EmbeddingQueue, SwavConfig, UnmixDraws, swav_loss, unmix_inputs, unmix_swav_loss


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


class BufferGuard:
    """Undo a step's side effects on the network's buffers (BN running statistics) and on the queue, on
    the device. The buffers are moved into one flat tensor per dtype, each module keeping a view of its
    part, so saving them is one copy and undoing a step one select per dtype."""

    def __init__(self, net):
        by_dtype = {}
        for module in net.modules():
            for name, buf in module._buffers.items():
                if buf is not None:
                    by_dtype.setdefault(buf.dtype, []).append((module, name, buf))
        self.flat = []
        for items in by_dtype.values():
            flat = torch.cat([buf.detach().reshape(-1) for _, _, buf in items])
            offset = 0
            for module, name, buf in items:
                module._buffers[name] = flat[offset:offset + buf.numel()].view_as(buf)
                offset += buf.numel()
            self.flat.append(flat)
        self.saved = [torch.empty_like(f) for f in self.flat]
        self.saved_queue = None

    def save(self, queue: Optional[EmbeddingQueue]):
        live, saved = list(self.flat), list(self.saved)
        if queue is not None:
            if self.saved_queue is None or self.saved_queue.shape != queue.tensor.shape:
                self.saved_queue = torch.empty_like(queue.tensor)
            live.append(queue.tensor)
            saved.append(self.saved_queue)
        torch._foreach_copy_(saved, live)

    def restore_if(self, bad: torch.Tensor, queue: Optional[EmbeddingQueue]):
        live, saved = list(self.flat), list(self.saved)
        if queue is not None:
            live.append(queue.tensor)
            saved.append(self.saved_queue)
        keep = bad == 0
        torch._foreach_copy_(live, [torch.where(keep, x, s) for x, s in zip(live, saved)])


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, still on the device (read it only when logging)
    lam: float          # the lam the loss used (after region adjustment)


class UnmixSwAV:
    """Un-Mix + SwAV on `model` (a ResNet with projection head and prototypes, possibly wrapped by
    DistributedDataParallel or torch.compile), trained by `optimizer` (LARC around SGD).

    scaler: a torch.amp.GradScaler for float16 autocast (None otherwise); autocast_dtype: float16 /
    bfloat16 / None; skip_nonfinite: skip a step whose loss (or, unscaled, any gradient) is not finite
    and restore the BN statistics and queue it changed, decided on the device (needs an optimiser that
    takes found_inf, see src.larc.build_optimizer)."""

    def __init__(self, net, optimizer, cfg: SwavConfig, scaler=None, autocast_dtype=None,
                 channels_last=False, skip_nonfinite=False, wrap=None):
        self.net = unwrap(net)
        self.optimizer = optimizer
        self.cfg = cfg
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        # before any wrapper (DistributedDataParallel keeps a list of the buffers it synchronises)
        self.guard = BufferGuard(self.net) if skip_nonfinite else None
        self.model = wrap(self.net) if wrap is not None else net  # what runs the forward pass
        self.queue: Optional[EmbeddingQueue] = None
        self.device = next(self.net.parameters()).device
        self.meter = torch.zeros(2, device=self.device)  # sum of the kept steps' losses, kept steps
        self.bad_steps = None  # per iteration of the epoch: 1 where the guard undid the step

    # ------------------------------------------------------------------ epoch and queue

    def start_epoch(self, epoch, iters_per_epoch=1):
        """The queue appears (zeros) at --epoch_queue_starts and is 'in use' anew each epoch (released)."""
        cfg = self.cfg
        if cfg.queue_length > 0 and epoch >= cfg.epoch_queue_starts and self.queue is None:
            self.queue = EmbeddingQueue(torch.zeros(len(cfg.crops_for_assign), cfg.queue_length // cfg.world_size,
                                                    cfg.feat_dim, device=self.device), filled=None)
        if self.queue is not None:
            self.queue.in_use = False
        self.meter.zero_()
        if self.guard is not None:
            self.bad_steps = torch.zeros(iters_per_epoch, device=self.device)

    def set_queue(self, tensor, in_use=False):
        """A queue from a checkpoint or a released queue file (its fill is counted once on the host)."""
        self.queue = EmbeddingQueue(tensor.to(self.device), in_use)

    # ------------------------------------------------------------------ one iteration

    def step(self, crops, draws: UnmixDraws, lr: float, iteration: int) -> StepOutput:
        """Set lr, normalise the prototypes, mix, forward, loss, backward, drop the prototypes' gradients
        while frozen, LARC step. `draws` must be drawn even for plain SwAV (the released RNG stream
        consumes them)."""
        cfg = self.cfg
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        normalize_prototypes_(self.net)
        if self.guard is not None:
            self.guard.save(self.queue)

        bs = crops[0].size(0)
        if cfg.run_swav:
            inputs, lam = list(crops), draws.lam
        else:
            inputs, lam = unmix_inputs(crops, draws, cfg.unmix_prob)
        if self.channels_last:
            inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        with torch.autocast(inputs[0].device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            embedding, output = self.model(inputs)
        # Loss and Sinkhorn in float32 even under mixed precision.
        embedding, output = embedding.detach().float(), output.float()
        prototypes = self.net.prototypes.weight.detach()
        if cfg.run_swav:
            loss, _ = swav_loss(embedding, output, bs, cfg, self.queue, prototypes)
        else:
            loss, _ = unmix_swav_loss(embedding, output, bs, len(crops) // 2, lam, cfg, self.queue, prototypes,
                                      loss_form=cfg.unmix_loss_form)

        self.optimizer.zero_grad(set_to_none=True)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if iteration < cfg.freeze_prototypes_niters:
            for name, p in self.net.named_parameters():
                if "prototypes" in name:
                    p.grad = None
        bad = self._optimizer_step(loss)
        loss = loss.detach()
        if bad is None:
            self.meter += torch.stack([loss, torch.ones_like(loss)])
        else:
            self.guard.restore_if(bad, self.queue)
            self.meter += torch.stack([torch.where(bad > 0, 0.0, loss), 1 - bad])
            if self.bad_steps is not None:
                self.bad_steps[iteration % len(self.bad_steps)] = bad
        return StepOutput(loss=loss, lam=lam)

    def _optimizer_step(self, loss):
        """The LARC step, skipped on the device when the guard finds the step non-finite. Returns the
        guard's verdict (1.0 = bad step, undone) or None without a guard.

        Without a scaler a step is bad when a gradient is non-finite: DDP's all-reduce makes them equal on
        all ranks, so all ranks agree (one rank's NaN reaches every rank); with one process also when the
        loss is. With a GradScaler, overflowing gradients are routine and the scaler skips those steps
        itself; only a non-finite loss counts, agreed across ranks with an all-reduce."""
        if self.guard is None:
            if self.scaler is None:
                self.optimizer.step()
            else:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            return None
        loss_bad = (~torch.isfinite(loss.detach())).float()
        if self.scaler is None:
            return self.optimizer.step(found_inf=loss_bad if self.cfg.world_size == 1 else None, check_finite=True)
        if self.cfg.world_size > 1:
            torch.distributed.all_reduce(loss_bad, op=torch.distributed.ReduceOp.MAX)
        self.scaler.step(self.optimizer, found_inf=loss_bad)
        self.scaler.update()
        return loss_bad

    # ------------------------------------------------------------------ what the loop reads

    def read_meter(self):
        """The epoch so far, on the host (one device sync): mean loss of the kept steps (NaN when none was
        kept), kept steps, and per iteration whether the guard undid the step (None without a guard). When
        steps were undone, the queue's fill is counted again from the tensor."""
        parts = [self.meter] if self.bad_steps is None else [self.meter, self.bad_steps]
        values = torch.cat(parts).tolist()
        bad_steps = values[2:] if self.bad_steps is not None else None
        if bad_steps and any(bad_steps) and self.queue is not None:
            self.queue.recount()
        # no kept step (every one non-finite): no mean loss, not 0.0
        loss = values[0] / values[1] if values[1] > 0 else float("nan")
        return {"loss": loss, "kept": int(values[1]), "bad_steps": bad_steps}

    def loop_state(self):
        """Mid-epoch state for a checkpoint: the epoch's running loss and the queue flag."""
        return {"loss_sum": self.meter[0].cpu(), "loss_count": int(self.meter[1].item()),
                "queue_in_use": bool(self.queue is not None and self.queue.in_use)}

    def load_loop_state(self, state):
        self.meter[0] = state["loss_sum"]
        self.meter[1] = float(state["loss_count"])
        if self.queue is not None:
            self.queue.in_use = bool(state["queue_in_use"])
