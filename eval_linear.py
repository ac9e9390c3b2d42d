"""Linear evaluation on frozen features (faithful to the released eval_linear.py).

Default (`--probe released`): the released protocol — frozen backbone in eval mode, a linear classifier
on average-pooled layer4 features trained with augmented crops, cosine schedule stepped per epoch, the
test split evaluated after every epoch, and the best test top-1 over epochs reported as
"Top-1 test accuracy". `--probe cached`: extract the un-augmented train/test features once and train the
same classifier with the same optimiser, schedule and epochs on those tensors (much faster; see README).
Reads top to bottom: arguments -> data -> model -> optimiser -> resume -> epoch loop.
"""
import argparse
import os
import sys
import time

import torch
import torch.nn as nn

from src import distributed as D
from src.checkpoint import CheckpointError, atomic_save, safe_load, strip_module_prefix
from src.data import CIFAR_MEAN, EVAL_STD, DataError, LabeledDataset, eval_transforms, load_split, plain_tensor
from src.logger import (CurveWriter, Stats, create_logger, format_eta, format_provenance, provenance, save_params,
                        write_json)
from src.resnet import ARCHS, build_model
from src.run_folder import LINEAR, claim_evaluation_folder
from src.utils import AverageMeter, ArgumentParser, bool_flag, check_seed, fail, fix_random_seeds, run_main

# Flags that do not change what is computed (the checkpoint is compared by its content, not its path).
OPERATIONAL_FLAGS = {"dump_path", "workers", "dist_url", "rank", "local_rank", "gpu_to_work_on", "device",
                     "log_freq", "download", "allow_changed_args", "tensorboard", "pretrained", "dist_timeout"}
MAX_EPOCHS = 10000  # a bound that catches typos


def get_parser():
    p = ArgumentParser(description="Evaluate models: Linear classification on CIFAR",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # released flags
    p.add_argument("--dump_path", type=str, default=".", help="experiment dump path for checkpoints and log")
    p.add_argument("--seed", type=int, default=31, help="seed")
    p.add_argument("--data_path", type=str, default="/path/to/imagenet",
                   help="cifar10 | cifar100 | a CIFAR pickle folder | an image folder with train/ and test/")
    p.add_argument("--workers", default=20, type=int, help="number of data loading workers")
    p.add_argument("--arch", default="resnet50", type=str, help=f"convnet architecture: {', '.join(ARCHS)}")
    p.add_argument("--pretrained", default="", type=str, help="path to pretrained weights ('' = random weights)")
    p.add_argument("--global_pooling", default=True, type=bool_flag, help="if True, we use the resnet50 global average pooled feature")
    p.add_argument("--use_bn", default=False, type=bool_flag,
                   help="batchnorm before the linear classifier; as released only without global pooling, so "
                        "no effect here")
    p.add_argument("--epochs", default=100, type=int, help="number of total epochs to run")
    p.add_argument("--batch_size", default=32, type=int, help="batch size per process")
    p.add_argument("--num_labels", default=10, type=int, help="number of classes")
    p.add_argument("--crop_size", default=32, type=int, help="crop size of RandomResizedCrop")
    p.add_argument("--lr", default=0.3, type=float, help="initial learning rate")
    p.add_argument("--wd", default=1e-6, type=float, help="weight decay")
    p.add_argument("--nesterov", default=False, type=bool_flag, help="nesterov momentum")
    p.add_argument("--scheduler_type", default="cosine", type=str, choices=["step", "cosine"],
                   help="learning-rate schedule, stepped once per epoch")
    p.add_argument("--decay_epochs", type=int, nargs="+", default=[60, 80], help="epochs at which to decay lr (step)")
    p.add_argument("--gamma", type=float, default=0.1, help="decay factor (step)")
    p.add_argument("--final_lr", type=float, default=0, help="final learning rate (cosine)")
    p.add_argument("--dist_url", default="env://", type=str, help="url used to set up distributed training")
    p.add_argument("--world_size", default=-1, type=int, help="number of processes (set automatically)")
    p.add_argument("--rank", default=0, type=int, help="rank of this process (set automatically)")
    p.add_argument("--local_rank", "--local-rank", default=0, type=int, help="this argument is not used and should be ignored")
    g = p.add_argument_group("new flags (defaults keep the released behaviour)")
    g.add_argument("--probe", default="released", choices=["released", "cached"],
                   help="released: augmented crops through the frozen network every epoch; "
                        "cached: un-augmented features extracted once, classifier trained on them")
    g.add_argument("--width_per_group", type=int, default=64, help="ResNet width of the pretrained model")
    g.add_argument("--allow_mismatched_weights", type=bool_flag, default=False,
                   help="load --pretrained even when backbone weights are missing or mis-shaped "
                        "(the released code only logged them)")
    g.add_argument("--download", type=bool_flag, default=True, help="download cifar10/cifar100 when missing")
    g.add_argument("--log_freq", type=int, default=50, help="log every this many iterations")
    g.add_argument("--tensorboard", type=bool_flag, default=False,
                   help="write the curves (train loss, test top-1/top-5, lr per epoch) for TensorBoard to "
                        "<dump_path>/tensorboard (needs the tensorboard package)")
    g.add_argument("--allow_changed_args", type=bool_flag, default=False,
                   help="when --dump_path holds an evaluation of another checkpoint or with other arguments, "
                        "move it to <dump_path>/replaced-<time>/ and evaluate afresh (default: stop)")
    g.add_argument("--dist_timeout", type=float, default=D.DEFAULT_TIMEOUT_S,
                   help="seconds a process waits for the others before the job stops, and after a stop "
                        "signal for the end of the epoch")
    return p


def check_args(args):
    if args.arch not in ARCHS:
        fail(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    if not 0 < args.epochs <= MAX_EPOCHS:
        fail(f"--epochs must be positive, got {args.epochs}" if args.epochs <= 0 else
             f"--epochs {args.epochs} is more than {MAX_EPOCHS}; a typo?")
    check_seed("seed", args.seed)
    for name in ("batch_size", "crop_size", "width_per_group", "log_freq", "num_labels"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.workers < 0 or args.dist_timeout <= 0:
        fail(f"--workers must not be negative and --dist_timeout must be positive "
             f"(got {args.workers}, {args.dist_timeout})")
    if args.pretrained and not os.path.isfile(args.pretrained):
        fail(f"--pretrained {args.pretrained}: no such file (pass '' to evaluate random weights)")


class RegLog(nn.Module):
    """Linear classifier on the frozen layer4 map (released `RegLog`). As released, `use_bn` adds a
    BatchNorm only to the 6x6-pooling branch (no global pooling), which CIFAR cannot use: with global
    pooling the classifier is pooling + linear whatever `use_bn` says."""

    def __init__(self, num_labels, feature_dim, global_avg=True, use_bn=False):
        super().__init__()
        self.bn = None
        if not global_avg:
            raise ValueError("--global_pooling false is the released ImageNet-only 6x6 pooling of 224px inputs; "
                             "CIFAR maps are 5x5: use --global_pooling true")
        self.av_pool = nn.AdaptiveAvgPool2d((1, 1))
        self.linear = nn.Linear(feature_dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        x = self.av_pool(x)
        if self.bn is not None:
            x = self.bn(x)
        return self.linear(x.view(x.size(0), -1))


def load_pretrained(model, path, allow_mismatch, logger):
    """Weights from `path` (`state_dict` entry, `module.` stripped). Missing/mis-shaped backbone keys are an
    error unless allowed; keys of the projection head and prototypes are ignored."""
    if not path:
        logger.info("No pretrained weights given => training with random weights")
        return
    if not os.path.isfile(path):
        fail(f"--pretrained {path}: no such file (pass '' to evaluate random weights)")
    try:
        state = safe_load(path)
    except CheckpointError as e:
        fail(str(e))
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        fail(f"--pretrained {path}: no state dict inside")
    state = strip_module_prefix(state)
    problems = []
    for k, v in model.state_dict().items():
        if k not in state:
            problems.append(f'key "{k}" could not be found in provided state dict')
        elif state[k].shape != v.shape:
            problems.append(f'key "{k}" is of different shape in model and provided state dict')
            state[k] = v
    for msg in problems:
        logger.info(msg)
    if problems and not allow_mismatch:
        fail(f"--pretrained {path} does not fit --arch with this width ({len(problems)} backbone keys missing or "
             f"mis-shaped, first: {problems[0]}); check --arch/--width_per_group or pass --allow_mismatched_weights true")
    msg = model.load_state_dict(state, strict=False)
    logger.info(f"Load pretrained model with msg: {msg}")


def accuracy(output, target, topk=(1,)):
    """Precision@k in percent for each k."""
    maxk = max(topk)
    _, pred = output.topk(maxk, 1, True, True)
    correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
    return [correct[:k].reshape(-1).float().sum(0) * 100.0 / target.size(0) for k in topk]


def main():
    args = get_parser().parse_args()
    check_args(args)
    logger, preempt, identity, run_lock = set_up(args)  # the folder stays locked until the process ends
    device = args.device
    t_start = time.time()

    # ============ data ============
    try:
        train_images, train_labels, classes = load_split(args.data_path, train=True, download=args.download)
        test_images, test_labels, _ = load_split(args.data_path, train=False, download=args.download)
    except DataError as e:
        fail(str(e))
    if len(classes) != args.num_labels:
        fail(f"--num_labels {args.num_labels} but {args.data_path} has {len(classes)} classes")
    maxk = min(5, args.num_labels)
    logger.info(f"Building data done: {len(train_images)} train / {len(test_images)} test images")

    # ============ model ============
    model = build_model(args.arch, output_dim=0, eval_mode=True, width_per_group=args.width_per_group)
    load_pretrained(model, args.pretrained, args.allow_mismatched_weights, logger)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        linear = RegLog(args.num_labels, model.feature_dim, args.global_pooling, args.use_bn).to(device)
    except ValueError as e:
        fail(str(e))
    if args.use_bn:
        logger.info("--use_bn true: no BatchNorm with global pooling (as released, it belongs to the 6x6 pooling)")
    if args.rank == 0:  # every check passed: the folder is this evaluation's, of this checkpoint
        save_params(args, args.dump_path, extra={"pretrained_file": identity})
    curves = CurveWriter(args.dump_path, args.tensorboard, args.rank)

    if args.probe == "cached":
        from src.linear_probe import extract_frozen_features, train_linear_on_features
        tr = extract_frozen_features(model, plain_tensor(train_images, CIFAR_MEAN, EVAL_STD), 256, device)
        te = extract_frozen_features(model, plain_tensor(test_images, CIFAR_MEAN, EVAL_STD), 256, device)
        logger.info(f"Features extracted once in {time.time() - t_start:.1f}s: {tuple(tr.shape)} / {tuple(te.shape)}")
        res = train_linear_on_features(tr, train_labels, te, test_labels, args.num_labels, args.epochs,
                                       args.batch_size * args.world_size, args.lr, args.wd, args.nesterov,
                                       args.scheduler_type, args.final_lr, args.decay_epochs, args.gamma,
                                       seed=args.seed, device=device, log_fn=logger.info)
        stats = Stats(os.path.join(args.dump_path, f"stats{args.rank}"),
                      ["epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val", "prec5_val"])
        for row, lr in zip(res["stats"], res["lrs"]):
            stats.update(row)
            curves.scalars(row["epoch"], curve_values(row, lr))
        best, last1, last5 = res["best_top1"], res["last_top1"], res["last_top5"]
    else:
        best, last1, last5 = train_released(args, model, linear, train_images, train_labels, test_images,
                                            test_labels, maxk, device, logger, curves, preempt)
    seconds = time.time() - t_start
    logger.info("Training of the supervised linear classifier on frozen features completed.\n"
                f"Top-1 test accuracy: {best:.1f}")
    logger.info(f"Last-epoch test accuracy: top-1 {last1:.1f} top-{maxk} {last5:.1f} "
                f"({args.probe} probe, {format_eta(seconds)})")
    if args.rank == 0:
        write_json(os.path.join(args.dump_path, "results.json"),
                   {"best_top1": best, "last_top1": last1, "last_top5": last5, "epochs": args.epochs,
                    "mode": args.probe, "seconds": seconds}, indent=1)
    curves.close()
    D.cleanup()


def set_up(args):
    """Distributed set-up, the stop signals' handler, seeds, the evaluation folder (locked; refused when it
    holds another kind of run, or an evaluation of another checkpoint or with other arguments unless
    --allow_changed_args), the processes' agreement on the arguments, the log. Returns the log, the stop
    signals' handler, the identity of --pretrained and the folder's lock."""
    try:
        D.init_distributed(args)
    except D.DistError as e:
        fail(str(e))
    preempt = D.PreemptionHandler(grace_s=args.dist_timeout).install()  # acted on after each epoch
    fix_random_seeds(args.seed)
    lock, identity, moved, problem = (claim_evaluation_folder(args, LINEAR, OPERATIONAL_FLAGS) if args.rank == 0
                                      else (None, None, None, None))
    problem = D.first_problem(problem, args.world_size, args.device) or \
        D.first_disagreement(D.flag_fingerprints(args), args.world_size, args.device)
    if problem:
        fail(problem)
    logger = create_logger(args.dump_path, args.rank)
    logger.info(format_provenance(provenance(args.device, args.world_size)))
    if moved:
        logger.info(f"The earlier evaluation in this folder (another checkpoint or other arguments) is kept in "
                    f"{moved}; evaluating afresh.")
    if args.rank == 0:
        logger.info("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    return logger, preempt, identity, lock


def curve_values(row, lr):
    """TensorBoard tags of one epoch of the statistics table."""
    return {"linear/train_loss": row["loss"], "linear/train_top1": row["prec1"], "linear/test_loss": row["loss_val"],
            "linear/test_top1": row["prec1_val"], "linear/test_top5": row["prec5_val"], "linear/lr": lr}


def train_released(args, model, linear, train_images, train_labels, test_images, test_labels, maxk, device, logger,
                   curves, preempt):
    """The released loop: augmented crops, DDP classifier, test after every epoch, best-of-epochs top-1."""
    train_tf, test_tf = eval_transforms(args.crop_size)
    train_set = LabeledDataset(train_images, train_labels, train_tf)
    test_set = LabeledDataset(test_images, test_labels, test_tf)
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, num_replicas=args.world_size, rank=args.rank)
    pin = device.type == "cuda"
    quiet = D.ignore_preemption_signals_in_worker if args.workers > 0 else None  # the main process handles them
    train_loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size,
                                               num_workers=args.workers, pin_memory=pin, worker_init_fn=quiet)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.batch_size, shuffle=False,
                                              num_workers=args.workers, pin_memory=pin, worker_init_fn=quiet)
    if args.world_size > 1:
        linear = nn.parallel.DistributedDataParallel(
            linear, device_ids=[device.index] if device.type == "cuda" else None)

    # ============ optimiser ============
    optimizer = torch.optim.SGD(linear.parameters(), lr=args.lr, nesterov=args.nesterov, momentum=0.9,
                                weight_decay=args.wd)
    if args.scheduler_type == "step":
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, args.decay_epochs, gamma=args.gamma)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=args.final_lr)

    # ============ resume ============
    start_epoch, best_acc = resume_classifier(args, linear, optimizer, scheduler, logger)
    stats = Stats(os.path.join(args.dump_path, f"stats{args.rank}"),
                  ["epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val", "prec5_val"],
                  resume_before_epoch=start_epoch if start_epoch else None, log=logger.info)
    criterion = nn.CrossEntropyLoss()
    last1 = last5 = float("nan")
    t0 = time.time()

    # ============ epoch loop ============
    for epoch in range(start_epoch, args.epochs):
        sampler.set_epoch(epoch)
        linear.train()
        losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
        for it, (inp, target) in enumerate(train_loader):
            inp, target = inp.to(device, non_blocking=True), target.to(device, non_blocking=True)
            with torch.no_grad():
                feats = model(inp)
            output = linear(feats)
            loss = criterion(output, target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            acc1, acc5 = accuracy(output, target, topk=(1, maxk))
            losses.update(loss.item(), inp.size(0))
            top1.update(acc1.item(), inp.size(0))
            top5.update(acc5.item(), inp.size(0))
            if args.rank == 0 and it % args.log_freq == 0:
                done = (epoch - start_epoch) * len(train_loader) + it + 1
                remaining = (args.epochs - epoch) * len(train_loader) - it - 1
                logger.info(f"Epoch[{epoch}] - Iter: [{it}/{len(train_loader)}]\tLoss {losses.val:.4f} "
                            f"({losses.avg:.4f})\tPrec {top1.val:.3f} ({top1.avg:.3f})\t"
                            f"LR {optimizer.param_groups[0]['lr']:.4f}\t"
                            f"ETA {format_eta((time.time() - t0) / done * remaining)}")
        loss_val, last1, last5 = validate(test_loader, model, linear, criterion, maxk, device)
        best_acc = max(best_acc, last1)
        logger.info(f"Test:\tLoss {loss_val:.4f}\tAcc@1 {last1:.3f}\tAcc@{maxk} {last5:.3f}\t"
                    f"Best Acc@1 so far {best_acc:.1f}")
        row = {"epoch": epoch, "loss": losses.avg, "prec1": top1.avg, "prec5": top5.avg,
               "loss_val": loss_val, "prec1_val": last1, "prec5_val": last5}
        stats.update(row)
        curves.scalars(epoch, curve_values(row, optimizer.param_groups[0]["lr"]))  # the lr of this epoch
        scheduler.step()
        if args.rank == 0:
            target_module = linear.module if hasattr(linear, "module") else linear
            atomic_save({"epoch": epoch + 1, "state_dict": target_module.state_dict(),
                         "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                         "best_acc": best_acc}, os.path.join(args.dump_path, "checkpoint.pth.tar"))
        if epoch < args.epochs - 1 and preempt.should_stop(args.world_size, device):
            logger.info(f"Preempted (signal {preempt.signum}): linear classifier saved after epoch {epoch}.")
            if args.rank == 0 and preempt.requeue():
                logger.info("Job requeued with scontrol; it will resume from the checkpoint.")
            sys.exit(D.PREEMPTED_EXIT_CODE)
    if start_epoch >= args.epochs:  # already finished: report the stored numbers
        last1 = stats.last("prec1_val", float("nan"))
        last5 = stats.last("prec5_val", float("nan"))
    return best_acc, last1, last5


def resume_classifier(args, linear, optimizer, scheduler, logger):
    """(first epoch, best top-1 so far) from the evaluation's checkpoint; (0, 0.0) without one."""
    ckpt_path = os.path.join(args.dump_path, "checkpoint.pth.tar")
    if not os.path.isfile(ckpt_path):
        return 0, 0.0
    try:
        ckpt = safe_load(ckpt_path)
        target = linear.module if hasattr(linear, "module") else linear
        target.load_state_dict(strip_module_prefix(ckpt["state_dict"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch, best_acc = int(ckpt["epoch"]), float(ckpt["best_acc"])
    except (CheckpointError, KeyError, RuntimeError, TypeError, ValueError) as e:
        fail(f"{ckpt_path}: cannot resume the linear classifier ({(str(e).splitlines() or [type(e).__name__])[0]}); "
             "move it away to start the evaluation afresh")
    if start_epoch < 0:
        fail(f"{ckpt_path}: epoch {start_epoch} cannot be negative; move it away to start the evaluation afresh")
    logger.info(f"Resumed linear evaluation from epoch {start_epoch} (best so far {best_acc:.1f})")
    return start_epoch, best_acc


@torch.no_grad()
def validate(loader, model, linear, criterion, maxk, device):
    linear.eval()
    losses, top1, top5 = AverageMeter(), AverageMeter(), AverageMeter()
    for inp, target in loader:
        inp, target = inp.to(device, non_blocking=True), target.to(device, non_blocking=True)
        output = linear(model(inp))
        loss = criterion(output, target)
        acc1, acc5 = accuracy(output, target, topk=(1, maxk))
        losses.update(loss.item(), inp.size(0))
        top1.update(acc1.item(), inp.size(0))
        top5.update(acc5.item(), inp.size(0))
    return losses.avg, top1.avg, top5.avg


if __name__ == "__main__":
    run_main(main)
