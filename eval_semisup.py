"""Semi-supervised evaluation: fine-tune the whole network with 1 % or 10 % of the labels (the released
eval_semisup.py, on CIFAR).

The released recipe: the pretrained backbone with a linear classifier `projection_head` on its pooled
features (PyTorch's default init), trained end to end in train mode (batch norm included) with
cross-entropy; SGD with momentum 0.9 and no weight decay, learning rate `--lr` for the trunk and
`--lr_last_layer` for the classifier, both multiplied by `--gamma` at each of `--decay_epochs` (stepped
once per epoch); training images `RandomResizedCrop` + horizontal flip, test images unchanged; the test
split evaluated after every epoch and the best top-1 (with its top-5) reported. On CIFAR the labelled
images are a class-balanced subset drawn from `--subset_seed` (src/eval/subset.py; the released code
downloads SimCLR's ImageNet lists), written to `labelled_subset.json`, and the normalisation is
eval_linear.py's.
Reads top to bottom: arguments -> data -> model -> optimiser -> resume -> epoch loop.
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn

from src.data.transforms import LabeledDataset, eval_transforms
from src.eval.pretrained import PretrainedError, load_weights, loaded_line
from src.eval.finished import finished_results, report_finished, results_line
from src.eval.loop import EvalLoop, epoch_records, evaluate, record_epoch, stop_if_preempted, train_epoch
from src.eval.setup import (add_shared_new_flags, add_shared_released_flags, check_shared_args, data_loaders,
                            load_splits, make_scheduler, network_from_checkpoint, resume_evaluation, set_up)
from src.eval.subset import SubsetError, balanced_subset, images_per_class
from src.method.resnet import build_model
from src.method.train_step import unwrap
from src.runtime import launch
from src.runtime.checkpoint import atomic_save, rng_state
from src.runtime.cli import OPERATIONAL_FLAGS, ArgumentParser, bool_flag, fail, parse_given
from src.runtime.durations import format_eta
from src.runtime.exits import run_main
from src.runtime.files import write_json
from src.runtime.run_folder import FINE_TUNING, save_params
from src.runtime.startup import StartVote

SUBSET_FILE = "labelled_subset.json"


def get_parser():
    p = ArgumentParser(description="Evaluate models: Fine-tuning with 1% or 10% labels on CIFAR",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_released_flags(p, workers=10)  # --dump_path ... --pretrained, --dist_url ... --local_rank
    # released flags of the fine-tuning
    p.add_argument("--labels_perc", type=str, default="10", choices=["1", "10"],
                   help="fine-tune on either 1%% or 10%% of labels")
    p.add_argument("--epochs", default=20, type=int, help="number of total epochs to run")
    p.add_argument("--batch_size", default=32, type=int, help="batch size per process")
    p.add_argument("--lr", default=0.01, type=float, help="initial learning rate - trunk")
    p.add_argument("--lr_last_layer", default=0.2, type=float, help="initial learning rate - head")
    p.add_argument("--decay_epochs", type=int, nargs="+", default=[12, 16],
                   help="Epochs at which to decay learning rate.")
    p.add_argument("--gamma", type=float, default=0.2, help="lr decay factor")
    g = add_shared_new_flags(p)  # --width_per_group, --allow_mismatched_weights, --dist_timeout, --download, --log_freq
    g.add_argument("--subset_seed", type=int, default=0,
                   help="seed of the class-balanced labelled subset (independent of --seed, so runs that "
                        "differ in --seed or in the pretrained weights fine-tune on the same images)")
    g.add_argument("--crop_size", type=int, default=32, help="crop size of RandomResizedCrop")
    g.add_argument("--allow_changed_args", type=bool_flag, default=False,
                   help="when --dump_path holds a fine-tuning of another checkpoint or with other arguments, "
                        "move it to <dump_path>/replaced-<time>/ and fine-tune afresh (when false: stop)")
    return p


def check_args(args):
    if args.epochs < 1:
        fail(f"--epochs must be at least 1, got {args.epochs}")
    check_shared_args(args, FINE_TUNING)
    if args.dist_timeout <= 0:
        fail(f"--dist_timeout must be positive, got {args.dist_timeout}")
    if args.workers < 0:
        fail(f"--workers must not be negative, got {args.workers}")
    if args.lr < 0 or args.lr_last_layer < 0 or args.gamma <= 0:
        fail(f"--lr and --lr_last_layer must not be negative and --gamma must be positive "
             f"(got {args.lr}, {args.lr_last_layer}, {args.gamma})")
    if not 0 <= args.subset_seed < 2 ** 32:
        fail(f"--subset_seed must be in [0, 2**32), got {args.subset_seed}")


def trunk_and_head_groups(model, lr, lr_last_layer):
    """The released optimiser groups: parameters whose name contains 'head' (the classifier
    `projection_head`) at `lr_last_layer`, all others (the trunk) at the optimiser's `lr`."""
    trunk, head = [], []
    for name, param in model.named_parameters():
        (head if "head" in name else trunk).append(param)
    return [{"params": trunk}, {"params": head, "lr": lr_last_layer}]


def labelled_subset(train_labels, classes, args, logger):
    """The labelled indices; `labelled_subset.json` records them (and a resumed run checks them)."""
    percent = float(args.labels_perc)
    try:
        indices = balanced_subset(train_labels, len(classes), percent, args.subset_seed)
    except SubsetError as e:
        fail(f"--labels_perc {args.labels_perc}: {e}")
    record = {"labels_perc": args.labels_perc, "subset_seed": args.subset_seed,
              "per_class": images_per_class(len(train_labels), len(classes), percent),
              "num_labelled": len(indices), "num_train_images": len(train_labels), "classes": list(classes),
              "indices": indices.tolist()}
    path = os.path.join(args.dump_path, SUBSET_FILE)
    if os.path.isfile(path):
        try:
            with open(path) as f:
                old = json.load(f)["indices"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            fail(f"{path} is unreadable ({type(e).__name__}); move it away to write it again")
        if old != record["indices"]:
            fail(f"{path} records another labelled subset than these data and flags give "
                 f"({len(old)} vs {len(indices)} images): the training data, --labels_perc or --subset_seed "
                 "changed; use another --dump_path")
    elif args.rank == 0:
        write_json(path, record)
    logger.info(f"Labelled subset: {len(indices)} of {len(train_labels)} training images "
                f"({record['per_class']} per class, {len(classes)} classes, --subset_seed {args.subset_seed}), "
                f"indices in {path}")
    return indices


def main(start):
    args, given = parse_given(get_parser())
    check_args(args)
    pretrained = network_from_checkpoint(args, given)  # (state, info, log line); --arch, --width_per_group: its own
    logger, preempt, identity, run_lock = set_up(args, FINE_TUNING, OPERATIONAL_FLAGS, start)  # locked to the end
    if pretrained[2]:
        logger.info(pretrained[2])
    t_start = time.time()
    finished = finished_results(args.dump_path)  # this fine-tuning (set_up checked its checkpoint and arguments)
    if finished is not None:
        report_finished(finished, args.dump_path, logger)
        logger.info(results_line("Fine-tuning", args.dump_path))
        launch.cleanup()
        return

    # ============ data ============
    train_loader, test_loader, classes, num_labelled = build_data(args, logger)

    # ============ model ============
    model = build_network(args, len(classes), pretrained, logger, start)

    # ============ optimiser ============
    optimizer = torch.optim.SGD(trunk_and_head_groups(model, args.lr, args.lr_last_layer), lr=args.lr,
                                momentum=0.9, weight_decay=0)
    scheduler = make_scheduler(optimizer, "step", args.epochs, decay_epochs=args.decay_epochs, gamma=args.gamma)

    # ============ resume ============
    start_epoch, best_acc, resumed = resume_evaluation(args, FINE_TUNING, model, optimizer, scheduler, logger,
                                                       no_best=(0.0, 0.0))
    start.agree_to_start(logger)  # every process passed its checks: the fine-tuning starts
    if args.rank == 0:
        save_params(args, args.dump_path, extra={"pretrained_file": identity})
    stats, clock, pace = epoch_records(args, len(train_loader), start_epoch if resumed else None, t_start, logger)
    loop = EvalLoop(args, model, maxk=min(5, len(classes)), logger=logger, optimizer=optimizer, scheduler=scheduler,
                    train_loader=train_loader, test_loader=test_loader, preempt=preempt, stats=stats, clock=clock,
                    pace=pace)

    # ============ epoch loop ============
    last = (float("nan"), float("nan"))
    for epoch in range(start_epoch, args.epochs):
        best_acc, last = train_and_test(loop, epoch, best_acc)
    if start_epoch >= args.epochs:  # already finished: report the stored numbers
        last = (stats.last("prec1_val", float("nan")), stats.last("prec5_val", float("nan")))
    report(loop, best_acc, last, num_labelled)


def build_data(args, logger):
    """The loaders of the labelled subset and of the test split; returns them, the class names and the
    number of labelled images."""
    (train_images, train_labels, classes), (test_images, test_labels, _) = load_splits(args.data_path, args.download)
    indices = labelled_subset(train_labels, classes, args, logger)
    train_tf, test_tf = eval_transforms(args.crop_size)
    train_loader, test_loader = data_loaders(LabeledDataset(train_images[indices], train_labels[indices], train_tf),
                                             LabeledDataset(test_images, test_labels, test_tf), args)
    logger.info(f"Building data done with {len(train_loader.dataset)} labelled images loaded "
                f"({len(test_loader.dataset)} test images, {len(classes)} classes).")
    return train_loader, test_loader, classes, len(indices)


def report(loop, best_acc, last, num_labelled):
    """The closing lines, and `results.json` (rank 0): the best top-1 (with its top-k) and the last epoch's."""
    args, maxk, seconds = loop.args, loop.maxk, loop.clock.elapsed()
    loop.logger.info(f"Fine-tuning with {args.labels_perc}% of labels completed.\n"
                     f"Test accuracies: top-1 {best_acc[0]:.1f}, top-{maxk} {best_acc[1]:.1f}")
    loop.logger.info(f"Last-epoch test accuracy: top-1 {last[0]:.1f} top-{maxk} {last[1]:.1f} ({format_eta(seconds)})")
    if args.rank == 0:
        write_json(os.path.join(args.dump_path, "results.json"),
                   {"best_top1": best_acc[0], "best_top5": best_acc[1], "last_top1": last[0],
                    "last_top5": last[1], "epochs": args.epochs, "mode": "semisup",
                    "labels_perc": args.labels_perc, "num_labelled": num_labelled, "seconds": seconds}, indent=1)
    loop.logger.info(results_line("Fine-tuning", args.dump_path))
    launch.cleanup()


def build_network(args, num_classes, pretrained, logger, start):
    """The released network with a `num_classes`-way `projection_head`, the weights of --pretrained
    (`pretrained` = (state, info, _) from `network_from_checkpoint`) loaded (the head keeps its
    initialisation), SyncBatchNorm with several CUDA processes, on the device, in DDP with several."""
    model = build_model(args.arch, output_dim=num_classes, width_per_group=args.width_per_group)
    if args.pretrained:
        state, info, _ = pretrained
        try:
            notes = load_weights(model, state, allow_mismatch=args.allow_mismatched_weights)
        except PretrainedError as e:
            fail(f"--pretrained: {e}; check --arch/--width_per_group, or --allow_mismatched_weights true")
        for note in notes:
            logger.info(note)
        logger.info(loaded_line(args.pretrained, info["epoch"], len(notes)))
    else:
        logger.info("No pretrained weights given => training from random weights")
    device = args.device
    if args.world_size > 1 and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif args.world_size > 1:
        logger.info("CPU: SyncBatchNorm needs CUDA, batch-norm statistics stay per process")
    model = model.to(device)
    logger.info(f"Building model done: {args.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                f"parameters, {num_classes}-way classifier, device {device}.")
    if args.world_size > 1:
        start.agree_so_far()  # before DDP's first collective (src/runtime/startup.py, `StartVote`)
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    return model


def train_and_test(loop, epoch, best_acc):
    """Epoch `epoch`: train, test, record, checkpoint (rank 0), stop here on a signal. Returns the best
    (top-1, top-k) so far and this epoch's."""
    args = loop.args
    loop.logger.info(f"============ Starting epoch {epoch} ... ============")
    loop.train_loader.sampler.set_epoch(epoch)
    scores = train(loop, epoch)
    loss_val, *last = validate(loop)
    if last[0] > best_acc[0]:
        best_acc = tuple(last)
    record_epoch(loop, epoch, scores, (loss_val, *last), best_acc[0])
    loop.scheduler.step()
    if args.rank == 0:
        atomic_save({"epoch": epoch + 1,
                     "state_dict": {"module." + k: v for k, v in unwrap(loop.model).state_dict().items()},
                     "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
                     "best_acc": list(best_acc), "rng": rng_state(np.random), "arch": args.arch},
                    os.path.join(args.dump_path, "checkpoint.pth.tar"))
    stop_if_preempted(loop, epoch, "fine-tuning")
    return best_acc, tuple(last)


def learning_rates(optimizer):
    """The released log's learning rates: the trunk's and the classifier's."""
    return f"LR trunk {optimizer.param_groups[0]['lr']}\tLR head {optimizer.param_groups[1]['lr']}"


def train(loop, epoch):
    """One epoch of fine-tuning, network in train mode; returns its (loss, top-1, top-k) averages."""
    loop.model.train()
    return train_epoch(loop, epoch, loop.model, learning_rates, timed=True)


def validate(loop):
    """(loss, top-1, top-k) on the whole test split, network in eval mode (every rank evaluates all of it,
    as released)."""
    loop.model.eval()
    return evaluate(loop.model, loop.test_loader, loop.maxk, loop.args.device)


if __name__ == "__main__":
    run_main(main, StartVote())
