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
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn

from src.data.transforms import LabeledDataset, eval_transforms
from src.eval.pretrained import PretrainedError, epochs_done, load_weights
from src.eval.finished import finished_results, report_finished
from src.eval.setup import (TIMED_STATS_COLUMNS, EpochMeters, add_shared_new_flags, add_shared_released_flags,
                            check_shared_args, data_loaders, evaluate, load_splits, make_scheduler,
                            network_from_checkpoint, resume_evaluation, set_up, stop_if_preempted)
from src.eval.subset import SubsetError, balanced_subset, images_per_class
from src.method.resnet import build_model
from src.method.train_step import unwrap
from src.runtime import devices, launch
from src.runtime.checkpoint import atomic_save, rng_state
from src.runtime.cli import ArgumentParser, bool_flag, fail, parse_given, run_main
from src.runtime.logs import AverageMeter, Clock, Stats, format_eta
from src.runtime.run_folder import FINE_TUNING, OPERATIONAL_FLAGS, save_params, write_json
from src.runtime.startup import StartVote

SUBSET_FILE = "labelled_subset.json"


def get_parser():
    p = ArgumentParser(description="Evaluate models: Fine-tuning with 1% or 10% labels on CIFAR")
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
                        "move it to <dump_path>/replaced-<time>/ and fine-tune afresh (default: stop)")
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
        launch.cleanup()
        return

    # ============ data ============
    (train_images, train_labels, classes), (test_images, test_labels, _) = load_splits(args.data_path, args.download)
    indices = labelled_subset(train_labels, classes, args, logger)
    train_tf, test_tf = eval_transforms(args.crop_size)
    train_loader, test_loader = data_loaders(LabeledDataset(train_images[indices], train_labels[indices], train_tf),
                                             LabeledDataset(test_images, test_labels, test_tf), args)
    maxk = min(5, len(classes))
    logger.info(f"Building data done with {len(train_loader.dataset)} labelled images loaded "
                f"({len(test_loader.dataset)} test images, {len(classes)} classes).")

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
    stats = Stats(os.path.join(args.dump_path, f"stats{args.rank}"), TIMED_STATS_COLUMNS,
                  resume_before_epoch=start_epoch if resumed else None, log=logger.info)
    last = (float("nan"), float("nan"))
    # the time of the earlier processes up to their last checkpoint, and this one's start-up
    clock = Clock(args.epochs, len(train_loader), start_epoch, offset=stats.last("time", 0.0) + time.time() - t_start)
    eta = clock.eta
    pace = devices.CpuPace.of_run(args, len(train_loader), logger.info)

    # ============ epoch loop ============
    for epoch in range(start_epoch, args.epochs):
        logger.info(f"============ Starting epoch {epoch} ... ============")
        train_loader.sampler.set_epoch(epoch)
        loss, top1, top5 = train(model, optimizer, train_loader, epoch, maxk, args, logger, eta, pace)
        loss_val, *last = validate(test_loader, model, maxk, args.device)
        if last[0] > best_acc[0]:
            best_acc = tuple(last)
        logger.info(f"Test:\tLoss {loss_val:.4f}\tAcc@1 {last[0]:.3f}\tAcc@{maxk} {last[1]:.3f}\t"
                    f"Best Acc@1 so far {best_acc[0]:.1f}")
        stats.update({"epoch": epoch, "loss": loss, "prec1": top1, "prec5": top5,
                      "loss_val": loss_val, "prec1_val": last[0], "prec5_val": last[1], "time": clock.elapsed()})
        scheduler.step()
        if args.rank == 0:
            atomic_save({"epoch": epoch + 1,
                         "state_dict": {"module." + k: v for k, v in unwrap(model).state_dict().items()},
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "best_acc": list(best_acc), "rng": rng_state(np.random), "arch": args.arch},
                        os.path.join(args.dump_path, "checkpoint.pth.tar"))
        stop_if_preempted(preempt, epoch, args, logger, "fine-tuning")
    if start_epoch >= args.epochs:  # already finished: report the stored numbers
        last = (stats.last("prec1_val", float("nan")), stats.last("prec5_val", float("nan")))

    seconds = clock.elapsed()
    logger.info(f"Fine-tuning with {args.labels_perc}% of labels completed.\n"
                f"Test accuracies: top-1 {best_acc[0]:.1f}, top-{maxk} {best_acc[1]:.1f}")
    logger.info(f"Last-epoch test accuracy: top-1 {last[0]:.1f} top-{maxk} {last[1]:.1f} ({format_eta(seconds)})")
    if args.rank == 0:
        write_json(os.path.join(args.dump_path, "results.json"),
                   {"best_top1": best_acc[0], "best_top5": best_acc[1], "last_top1": last[0],
                    "last_top5": last[1], "epochs": args.epochs, "mode": "semisup",
                    "labels_perc": args.labels_perc, "num_labelled": len(indices), "seconds": seconds}, indent=1)
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
        logger.info(f"Loaded pretrained weights from {args.pretrained}, {epochs_done(info['epoch'])}; "
                    f"{len(notes)} tensors kept as initialised (listed above)")
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


def train(model, optimizer, loader, epoch, maxk, args, logger, eta, pace):
    """One epoch of fine-tuning, network in train mode; returns its (loss, top-1, top-k) averages. `pace`
    times the first iterations on the CPU (`src.runtime.devices.CpuPace`)."""
    model.train()
    criterion = nn.CrossEntropyLoss()
    batch_time, data_time = AverageMeter(), AverageMeter()
    meters = EpochMeters(maxk)
    end = time.perf_counter()
    for it, (inp, target) in enumerate(loader):
        data_time.update(time.perf_counter() - end)
        inp, target = inp.to(args.device, non_blocking=True), target.to(args.device, non_blocking=True)
        output = model(inp)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        meters.update(loss, output, target)
        pace.step()
        batch_time.update(time.perf_counter() - end)
        end = time.perf_counter()
        if args.rank == 0 and it % args.log_freq == 0:
            logger.info(f"Epoch[{epoch}] - Iter: [{it}/{len(loader)}]\t"
                        f"Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                        f"Data {data_time.val:.3f} ({data_time.avg:.3f})\t"
                        f"Loss {meters.loss.val:.4f} ({meters.loss.avg:.4f})\t"
                        f"Prec {meters.top1.val:.3f} ({meters.top1.avg:.3f})\tLR trunk {optimizer.param_groups[0]['lr']}\t"
                        f"LR head {optimizer.param_groups[1]['lr']}\t"
                        f"ETA {eta(epoch, it)}")
    return meters.averages()


def validate(loader, model, maxk, device):
    """(loss, top-1, top-k) on the whole test split, network in eval mode (every rank evaluates all of it,
    as released)."""
    model.eval()
    return evaluate(model, loader, maxk, device)


if __name__ == "__main__":
    run_main(main, StartVote())
