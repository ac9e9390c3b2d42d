"""The epoch loop of both evaluations, eval_linear.py (a linear classifier on frozen features) and
eval_semisup.py (fine-tuning with 1 % or 10 % of the labels).

`EvalLoop` holds what every epoch works with (built by the script's main()); `epoch_records` opens the
statistics table, the clock and the CPU pace of a run; `train_epoch` is the released training epoch (one
SGD step per batch) and `TrainingLog` its per-iteration accounting (the released running averages, the CPU
pace, the log line with its ETA); `evaluate` scores a classifier on the test split; `record_epoch` writes
the `Test:` line and the statistics row of an epoch; `stop_if_preempted` ends the process after an
epoch's checkpoint when a stop signal came.
"""
import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..runtime import devices, signals
from ..runtime.logs import AverageMeter, Clock, CurveWriter, Stats
from .metrics import correct_counts

STATS_COLUMNS = ["epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val", "prec5_val"]  # released
# ours after them: `time`, the evaluation's seconds up to the end of the epoch, its earlier processes included
TIMED_STATS_COLUMNS = STATS_COLUMNS + ["time"]


@dataclass
class EvalLoop:
    """What the epochs of an evaluation work with. `model` is the network: frozen in the linear evaluation
    (whose script adds its classifier), fine-tuned in the semi-supervised one. A part the run does not use
    (the loaders of `--augment batched`, the curves of the fine-tuning) stays None."""
    args: argparse.Namespace
    model: nn.Module
    maxk: int
    logger: logging.Logger
    optimizer: Optional[torch.optim.Optimizer] = None
    scheduler: Any = None
    train_loader: Any = None
    test_loader: Any = None
    preempt: Optional[signals.PreemptionHandler] = None
    stats: Optional[Stats] = None
    clock: Optional[Clock] = None
    pace: Optional[devices.CpuPace] = None
    curves: Optional[CurveWriter] = None


def epoch_records(args, iterations, resumed_at, t_start, logger):
    """(statistics table, clock, CPU pace) of a run of `iterations` per epoch that starts at epoch
    `resumed_at` of its checkpoint (None: afresh). The table keeps the rows before that epoch; the clock
    goes on from the time of the earlier processes up to their last checkpoint, plus this one's start-up
    since `t_start`."""
    stats = Stats(os.path.join(args.dump_path, f"stats{args.rank}"), TIMED_STATS_COLUMNS,
                  resume_before_epoch=resumed_at, log=logger.info)
    clock = Clock(args.epochs, iterations, resumed_at or 0, offset=stats.last("time", 0.0) + time.time() - t_start)
    pace = devices.CpuPace.of_run(args, iterations, logger.info)
    return stats, clock, pace


class EpochMeters:
    """The released running averages of an epoch, weighted by batch size: the loss, and the top-1 and
    top-k accuracies in percent (`val`: the last batch's, `avg`: the average so far)."""

    def __init__(self, maxk):
        self.maxk = maxk
        self.loss, self.top1, self.topk = AverageMeter(), AverageMeter(), AverageMeter()

    def update(self, loss, output, target):
        n = target.shape[0]
        c1, ck = correct_counts(output.detach(), target, (1, self.maxk)).tolist()
        self.loss.update(loss.item(), n)
        self.top1.update(100.0 * c1 / n, n)
        self.topk.update(100.0 * ck / n, n)

    def averages(self):
        return self.loss.avg, self.top1.avg, self.topk.avg


class TrainingLog:
    """The per-iteration accounting of training epoch `epoch` of `iterations` iterations: the released
    running averages (`meters`), the CPU pace (`loop.pace`, when there is one), and on rank 0 every
    --log_freq iterations the released line `Epoch[e] - Iter: [it/n]\\t...\\tETA h:mm:ss`, whose learning
    rates `lr_text(optimizer)` writes. `timed` (the fine-tuning's line): it also has the time per batch and
    the wait for data, from `loaded()` at each batch's arrival."""

    def __init__(self, loop, epoch, iterations, lr_text, timed=False):
        self.loop, self.epoch, self.iterations, self.lr_text, self.timed = loop, epoch, iterations, lr_text, timed
        self.meters = EpochMeters(loop.maxk)
        self.batch_time, self.data_time = AverageMeter(), AverageMeter()
        self.end = time.perf_counter()

    def loaded(self):
        """A batch has arrived: the wait for it."""
        if self.timed:
            self.data_time.update(time.perf_counter() - self.end)

    def step(self, it, loss, output, target):
        """Iteration `it` is done (its step taken): count its `loss` and the accuracy of `output`."""
        self.meters.update(loss, output, target)
        if self.loop.pace is not None:
            self.loop.pace.step()
        if self.timed:
            self.batch_time.update(time.perf_counter() - self.end)
            self.end = time.perf_counter()
        if self.loop.args.rank == 0 and it % self.loop.args.log_freq == 0:
            m = self.meters
            times = [f"Time {self.batch_time.val:.3f} ({self.batch_time.avg:.3f})",
                     f"Data {self.data_time.val:.3f} ({self.data_time.avg:.3f})"] if self.timed else []
            self.write(it, times + [f"Loss {m.loss.val:.4f} ({m.loss.avg:.4f})",
                                    f"Prec {m.top1.val:.3f} ({m.top1.avg:.3f})"])

    def write(self, it, fields):
        """The log line of iteration `it`: its `fields`, the learning rates and the ETA."""
        self.loop.logger.info(f"Epoch[{self.epoch}] - Iter: [{it}/{self.iterations}]\t" + "\t".join(fields)
                              + f"\t{self.lr_text(self.loop.optimizer)}\tETA {self.loop.clock.eta(self.epoch, it)}")


def train_epoch(loop, epoch, forward, lr_text, timed=False):
    """Epoch `epoch` of the released training: over `loop.train_loader`, one SGD step of `loop.optimizer` per
    batch on the cross-entropy of the scores `forward(images)`, with the accounting of `TrainingLog` (its
    `lr_text` and `timed`). The caller sets the modules' train/eval modes. Returns the epoch's (loss, top-1,
    top-k) averages."""
    optimizer, device = loop.optimizer, loop.args.device
    criterion = nn.CrossEntropyLoss()
    log = TrainingLog(loop, epoch, len(loop.train_loader), lr_text, timed)
    for it, (inp, target) in enumerate(loop.train_loader):
        log.loaded()
        inp, target = inp.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = forward(inp)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        log.step(it, loss, output, target)
    return log.meters.averages()


@torch.no_grad()
def evaluate(forward, loader, maxk, device):
    """(loss, top-1, top-k) of the classifier `forward(images)` on the whole test split of `loader` (every
    process evaluates all of it, as released)."""
    meters = EpochMeters(maxk)
    for inp, target in loader:
        inp, target = inp.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = forward(inp)
        meters.update(F.cross_entropy(output, target), output, target)
    return meters.averages()


def record_epoch(loop, epoch, train, test, best_top1):
    """The released `Test:` line of `epoch` and its row of the statistics table (returned); `train` and
    `test` are (loss, top-1, top-k) averages."""
    (loss, top1, top5), (loss_val, last1, last5) = train, test
    loop.logger.info(f"Test:\tLoss {loss_val:.4f}\tAcc@1 {last1:.3f}\tAcc@{loop.maxk} {last5:.3f}\t"
                     f"Best Acc@1 so far {best_top1:.1f}")
    row = {"epoch": epoch, "loss": loss, "prec1": top1, "prec5": top5,
           "loss_val": loss_val, "prec1_val": last1, "prec5_val": last5, "time": loop.clock.elapsed()}
    loop.stats.update(row)
    return row


def stop_if_preempted(loop, epoch, saved):
    """After the checkpoint of `epoch` (not the last one): exit with status 3, requeued under Slurm, when a
    stop signal reached any process. `saved` names what the checkpoint holds."""
    args, preempt, logger = loop.args, loop.preempt, loop.logger
    if epoch < args.epochs - 1 and preempt.should_stop(args.world_size, args.device):
        preempt.stop_listening()  # a repeated signal from here on must not turn status 3 into 128 + N
        logger.info(f"Preempted (signal {preempt.signum}): {saved} saved after epoch {epoch}.")
        if args.rank == 0 and preempt.requeue():
            logger.info("Job requeued with scontrol; it will resume from the checkpoint.")
        sys.exit(signals.PREEMPTED_EXIT_CODE)
