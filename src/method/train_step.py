"""Un-Mix + SwAV training (docs/released-behaviour.md, items 1-10): one object owns the method's
hyper-parameters, the network with its prototypes, the optimiser, the schedule, the Un-Mix random
stream, the queue and the training iteration, `UnmixSwAV(...).step(crops, iteration)`. The golden tests
and the training loop run it. The iteration reads top to bottom in `step` and `iterate` here, and in the
loss (src/method/swav.py, `unmix_swav_loss`); line numbers cite the released `main_swav_unmix.py`.

An iteration asks the host for nothing and launches the same operations whatever its numbers: the
learning rate and the Un-Mix draws are staged on the device ahead of time as named tensors
(`staging.StepNumbers`), the queue's "in use" checks are a host-side count made before the iteration,
and the non-finite guard decides on the device whether the step is kept (the fused SGD kernel skips it;
BN statistics and queue are restored by a select). So one captured iteration can replay any other
(src/method/cuda_graph.py). What the loop reads (loss, non-finite steps) accumulates in `meter` and is
read when logging.
"""
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .cuda_graph import CudaGraphs
from .guard import BufferGuard
from .staging import StepInputs
from .swav import EmbeddingQueue, SwavConfig, swav_loss, unmix_swav_loss
from .unmix import UnmixDraws, mix_pairs, pair_sizes


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


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, still on the device (read it only when logging)


class UnmixSwAV:
    """Un-Mix + SwAV: one object owns the method's hyper-parameters (`cfg`), the network with its
    prototypes, the optimiser (LARC around SGD), the learning-rate schedule, the Un-Mix random stream,
    the queue, the non-finite guard and the training iteration, `step(crops, iteration)`.

    net: the ResNet with projection head and prototypes. `model` (attribute) runs the forward pass: the
    network, or its DistributedDataParallel / torch.compile wrapper, set after construction (the guard
    moves the BN buffers into flat tensors first, which DDP must see). rng / lr_schedule: the NumPy stream
    of the Un-Mix draws (the released code's, seeded with --seed) and the per-iteration learning rates;
    without them every iteration is given its draws first (`give`). schedules: other per-iteration
    numbers, name -> one value per iteration, staged under a field of that name (`staging.StepNumbers`).
    scaler: a torch.amp.GradScaler for float16 autocast (None otherwise); autocast_dtype: float16 /
    bfloat16 / None; skip_nonfinite: skip a step whose loss (or, unscaled, any gradient) is not finite and
    undo its BN statistics and queue, decided on the device (needs an optimiser that takes found_inf, see
    src.method.larc.build_optimizer);
    cuda_graph: replay one captured iteration per shape of the work (src/method/cuda_graph.py); log: where
    its one line per case that falls back to eager goes."""

    def __init__(self, net, optimizer, cfg: SwavConfig, rng=None, lr_schedule=None, scaler=None,
                 autocast_dtype=None, channels_last=False, skip_nonfinite=False, cuda_graph=False, chunk=64,
                 schedules=None, log=print):
        self.net = unwrap(net)
        self.model = net
        self.optimizer = optimizer
        self.cfg = cfg
        self.scaler = scaler
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.guard = BufferGuard(self.net) if skip_nonfinite else None
        self.device = next(self.net.parameters()).device
        schedules = {**({} if lr_schedule is None else {"lr": lr_schedule}), **(schedules or {})}
        self.inputs = StepInputs(self.device, cfg.unmix_prob, cfg.unmix_beta, cfg.pair_sizes, rng, schedules,
                                 chunk, cfg.mixing_modes)
        self.queue: Optional[EmbeddingQueue] = None
        self.meter = torch.zeros(2, device=self.device)  # sum of the kept steps' losses, kept steps
        self.bad_steps = None  # per iteration of the epoch: 1 where the guard undid the step
        self.graphs = CudaGraphs(self, log=log) if cuda_graph else None

    # ------------------------------------------------------------------ epoch, queue and state

    def start_epoch(self, epoch, iters_per_epoch=1):
        """The queue appears (zeros) at --epoch_queue_starts and is 'in use' anew each epoch (released)."""
        cfg = self.cfg
        if cfg.queue_rows > 0 and epoch >= cfg.epoch_queue_starts and self.queue is None:
            # zeros: no row written yet, counted without reading the tensor back from the device
            self.queue = EmbeddingQueue(torch.zeros(len(cfg.crops_for_assign), cfg.queue_rows, cfg.feat_dim,
                                                    device=self.device), filled=[0] * len(cfg.crops_for_assign))
        if self.queue is not None:
            self.queue.in_use = False
        self.meter.zero_()
        self.inputs.iters_per_epoch = iters_per_epoch
        if self.guard is not None:  # one tensor for the run (a captured iteration writes into it)
            if self.bad_steps is None or len(self.bad_steps) != iters_per_epoch:
                self.bad_steps = torch.zeros(iters_per_epoch, device=self.device)
            self.bad_steps.zero_()

    def set_queue(self, tensor, in_use=False):
        """A queue from a checkpoint or a released queue file (its fill is counted once on the host)."""
        self.queue = EmbeddingQueue(tensor.to(self.device), in_use)

    def state_dict(self):
        """What a checkpoint keeps of the method besides network, optimiser and scaler: the queue (None
        without one) and the Un-Mix stream as it is at the first iteration not trained (a copy: draws
        staged ahead are drawn again after a restart, exactly as the uninterrupted run draws them).
        Changes nothing."""
        unmix_rng = None
        if self.inputs.rng is not None:
            unmix_rng = np.random.RandomState()
            unmix_rng.set_state(self.inputs.rng_state())
        return {"queue": None if self.queue is None else self.queue.tensor, "unmix_rng": unmix_rng}

    def load_state_dict(self, state):
        """{"queue": tensor or None} from a checkpoint, or from the released code's `queue{rank}.pth`
        (with "released": True; used only when this run has a queue)."""
        queue = state.get("queue")
        if queue is not None and (self.cfg.queue_rows > 0 or not state.get("released")):
            self.set_queue(queue)

    def loop_state(self):
        """Mid-epoch state for a checkpoint: the epoch's running loss and the queue flag."""
        return {"loss_sum": self.meter[0].cpu(), "loss_count": int(self.meter[1].item()),
                "queue_in_use": bool(self.queue is not None and self.queue.in_use)}

    def load_loop_state(self, state):
        self.meter[0] = state["loss_sum"]
        self.meter[1] = float(state["loss_count"])
        if self.queue is not None:
            self.queue.in_use = bool(state["queue_in_use"])

    # ------------------------------------------------------------------ one iteration

    def give(self, iteration: int, draws: UnmixDraws, lr: Optional[float] = None, crops=None):
        """Give iteration `iteration` its Un-Mix draws (and learning rate, else the schedule's) instead of
        drawing them from the method's stream: the golden tests. `crops`: the crops the draws' box centres
        were drawn over, when not of the configured sizes. The next `step(crops, iteration)` uses them."""
        sizes = None if crops is None or self.cfg.run_swav else pair_sizes(crops)
        self.inputs.give(iteration, draws, lr, sizes)

    def step(self, crops, iteration: int) -> StepOutput:
        """Iteration `iteration` on `crops`. Its numbers (learning rate, Un-Mix draws) come from the
        method's schedule and stream, staged ahead in chunks, or were given (`give`). The draws are made
        for plain SwAV too (the released stream consumes them, item 3)."""
        self.inputs.ensure(iteration)
        for group in self.optimizer.param_groups:  # what the logs and the checkpoint read (item 1, line 355)
            group["lr"] = self.inputs.host_lr()
        frozen = iteration < self.cfg.freeze_prototypes_niters
        n_terms = 1 if self.cfg.run_swav else 3
        plan = None if self.queue is None else self.queue.plan(n_terms, crops[0].size(0))
        if self.graphs is not None:
            loss = self.graphs.run(crops, frozen, plan)
        else:
            loss = self.iterate(crops, frozen, plan)
        self.inputs.consumed()
        if plan is not None:
            self.queue.advance(plan, crops[0].size(0))
        return StepOutput(loss=loss)

    def iterate(self, crops, frozen, plan):
        """The iteration on the device, the same operations whatever its numbers (staged by
        `self.inputs`): normalise the prototypes, mix, forward, loss, backward, drop the prototypes'
        gradients while `frozen`, LARC step, guard. `plan`: the queue's checks (`EmbeddingQueue.plan`).
        Asks the host for nothing; what the loop reads accumulates in `meter` and `bad_steps`."""
        cfg = self.cfg
        numbers = self.inputs.next_numbers()  # this iteration's lr, lam, boxes, slot, on the device
        normalize_prototypes_(self.net)  # item 2, lines 357-361
        if self.guard is not None:
            self.guard.save(self.queue)
        bs = crops[0].size(0)
        inputs = list(crops) if cfg.run_swav else mix_pairs(crops, numbers, cfg.mixing_modes)  # items 3-4
        if self.channels_last:
            inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
        with torch.autocast(inputs[0].device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None, cache_enabled=self.graphs is None):
            embedding, output = self.model(inputs)  # item 5, lines 388-393
        # Loss and Sinkhorn in float32 even under mixed precision.
        embedding, output = embedding.detach().float(), output.float()
        prototypes = self.net.prototypes.weight.detach()
        if cfg.run_swav:  # items 6-8, lines 425-435
            loss = swav_loss(embedding, output, bs, cfg, self.queue, prototypes, plan)
        else:
            loss = unmix_swav_loss(embedding, output, bs, len(crops) // 2, numbers.lam, cfg, self.queue, prototypes,
                                   cfg.unmix_loss_form, one_minus_lam=numbers.one_minus_lam, plan=plan)
        self.optimizer.zero_grad(set_to_none=True)  # item 9, lines 438-448
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if frozen:
            for name, p in self.net.named_parameters():
                if "prototypes" in name:
                    p.grad = None
        bad = self._optimizer_step(loss, numbers.lr)  # item 10, line 449
        loss = loss.detach()
        if bad is None:
            self.meter += torch.stack([loss, torch.ones_like(loss)])
        else:
            self.guard.restore_if(bad, self.queue)
            self.meter += torch.stack([torch.where(bad > 0, 0.0, loss), 1 - bad])
            if self.bad_steps is not None:
                self.bad_steps.index_copy_(0, numbers.slot.long().view(1), bad.view(1))
        return loss

    def _optimizer_step(self, loss, lr):
        """The LARC step at learning rate `lr` (a device tensor), skipped on the device when the guard
        finds the step non-finite. Returns the guard's verdict (1.0 = bad step, undone) or None without a
        guard.

        Without a scaler a step is bad when a gradient is non-finite: DDP's all-reduce makes them equal on
        all ranks, so all ranks agree (one rank's NaN reaches every rank); with one process also when the
        loss is. With a GradScaler, overflowing gradients are routine and the scaler skips those steps
        itself; only a non-finite loss counts, agreed across ranks with an all-reduce."""
        if self.guard is None:
            if self.scaler is None:
                self.optimizer.step(lr=lr)
            else:
                self.scaler.step(self.optimizer, lr=lr)
                self.scaler.update()
            return None
        loss_bad = (~torch.isfinite(loss.detach())).float()
        if self.scaler is None:
            return self.optimizer.step(found_inf=loss_bad if self.cfg.world_size == 1 else None, check_finite=True,
                                       lr=lr)
        if self.cfg.world_size > 1:
            torch.distributed.all_reduce(loss_bad, op=torch.distributed.ReduceOp.MAX)
        self.scaler.step(self.optimizer, found_inf=loss_bad, lr=lr)
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
