"""Linear evaluation on frozen features (faithful to the released eval_linear.py).

Default (`--probe released`): the released protocol — frozen backbone in eval mode, a linear classifier
on average-pooled layer4 features trained with augmented crops, cosine schedule stepped per epoch, the
test split evaluated after every epoch, and the best test top-1 over epochs reported as
"Top-1 test accuracy". Its crops come from the released DataLoader of PIL transforms (`--augment
released`) or are made on the device and run through the network many at once (`--augment batched`,
src/eval/batched_probe.py, which lists how that differs). `--probe cached`: extract the un-augmented
train/test features once and train the same classifier with the same optimiser, schedule and epochs on
those tensors (much faster; see README).
Reads top to bottom: arguments -> data -> model -> optimiser -> resume -> epoch loop.
"""
import argparse
import os
import time
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn as nn

from src.data.constants import CIFAR_MEAN, EVAL_STD
from src.data.transforms import LabeledDataset, eval_transforms, plain_tensor
from src.eval.finished import finished_results, report_finished, results_line
from src.eval.loop import (STATS_COLUMNS, EvalLoop, TrainingLog, epoch_records, evaluate, record_epoch,
                           stop_if_preempted, train_epoch)
from src.eval.pretrained import loaded_line
from src.eval.setup import (add_shared_new_flags, add_shared_released_flags, check_shared_args, data_loaders,
                            load_splits, make_scheduler, network_from_checkpoint, resume_evaluation, set_up)
from src.method.resnet import build_model
from src.runtime import launch
from src.runtime.checkpoint import atomic_save
from src.runtime.cli import OPERATIONAL_FLAGS, ArgumentParser, bool_flag, fail, parse_given
from src.runtime.durations import format_eta
from src.runtime.exits import run_main
from src.runtime.files import write_json
from src.runtime.logs import CurveWriter, Stats
from src.runtime.run_folder import LINEAR, save_params
from src.runtime.startup import StartVote


def get_parser():
    p = ArgumentParser(description="Evaluate models: Linear classification on CIFAR",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_shared_released_flags(p, workers=20)  # --dump_path ... --pretrained, --dist_url ... --local_rank
    # released flags of the linear evaluation
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
    g = add_shared_new_flags(p)  # --width_per_group, --allow_mismatched_weights, --dist_timeout, --download, --log_freq
    g.add_argument("--probe", default="released", choices=["released", "cached"],
                   help="released: augmented crops through the frozen network every epoch; "
                        "cached: un-augmented features extracted once, classifier trained on them")
    g.add_argument("--augment", default="released", choices=["released", "batched"],
                   help="crops of --probe released: released = the DataLoader of PIL transforms, one batch "
                        "through the network at a time; batched = made on the device, the network run on "
                        "--crops_per_chunk crops at once (bfloat16 on CUDA; see src/eval/batched_probe.py)")
    g.add_argument("--crops_per_chunk", type=int, default=0,
                   help="--augment batched: crops made and run through the network at once, rounded down to "
                        "whole batches (0: 32768 on CUDA, 2048 on the CPU)")
    g.add_argument("--tensorboard", type=bool_flag, default=False,
                   help="write the curves (train loss, test top-1/top-5, lr per epoch) for TensorBoard to "
                        "<dump_path>/tensorboard (needs the tensorboard package)")
    g.add_argument("--allow_changed_args", type=bool_flag, default=False,
                   help="when --dump_path holds an evaluation of another checkpoint or with other arguments, "
                        "move it to <dump_path>/replaced-<time>/ and evaluate afresh (when false: stop)")
    return p


def check_args(args):
    if args.epochs <= 0:
        fail(f"--epochs must be positive, got {args.epochs}")
    check_shared_args(args, LINEAR)
    if args.num_labels < 1:
        fail(f"--num_labels must be at least 1, got {args.num_labels}")
    if args.workers < 0 or args.dist_timeout <= 0:
        fail(f"--workers must not be negative and --dist_timeout must be positive "
             f"(got {args.workers}, {args.dist_timeout})")
    if args.augment == "batched" and args.probe == "cached":
        fail("--augment batched makes the crops of --probe released; --probe cached trains on un-augmented images")
    if args.lr < 0 or args.wd < 0:  # what SGD refuses, said before anything is built
        fail(f"--lr and --wd must not be negative (got {args.lr}, {args.wd})")
    if args.crops_per_chunk < 0:
        fail(f"--crops_per_chunk must not be negative, got {args.crops_per_chunk}")


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


def load_pretrained(model, path, state, epoch, allow_mismatch, logger):
    """The weights `state` of `path`, read by src/eval/pretrained.py (ours, released or exported; `module.`
    stripped), loaded as released: non-strictly, with every missing or mis-shaped backbone tensor and the released
    `Load pretrained model with msg: ...` line logged (hence not `src.eval.pretrained.load_weights`); keys of
    the projection head and prototypes are ignored. Unlike the released code, a backbone tensor that does
    not fit is an error unless allowed. Then the fine-tuning's line with the checkpoint's `epoch` entry
    (`loaded_line`), which tells the checkpoints of one run apart."""
    if not path:
        logger.info("No pretrained weights given => training with random weights")
        return
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
    logger.info(loaded_line(path, epoch, len(problems)))


def main(start):
    args, given = parse_given(get_parser())
    check_args(args)
    state, info, network = network_from_checkpoint(args, given)  # --arch, --width_per_group: the checkpoint's
    logger, preempt, identity, run_lock = set_up(args, LINEAR, OPERATIONAL_FLAGS, start)  # locked until the end
    if network:
        logger.info(network)
    t_start = time.time()
    finished = finished_results(args.dump_path)  # this evaluation (set_up checked its checkpoint and arguments)
    if finished is not None:
        report_finished(finished, args.dump_path, logger)
        logger.info(f"Top-1 test accuracy: {finished['best_top1']:.1f}")
        logger.info(results_line("Linear evaluation", args.dump_path))
        launch.cleanup()
        return

    # ============ data ============
    train_data, test_data, classes = build_data(args, logger)

    # ============ model ============
    model, linear = build_network(args, state, info, logger)
    loop = LinearLoop(args, model, maxk=min(5, args.num_labels), logger=logger, preempt=preempt, linear=linear)

    # ============ crops, optimiser, resume (--probe released) ============
    resumed_at = prepare_released(loop, train_data, test_data, start) if args.probe == "released" else None
    start.agree_to_start(logger)  # every process passed its checks, the resume too: the evaluation starts
    if args.rank == 0:  # every check passed: the folder is this evaluation's, of this checkpoint
        save_params(args, args.dump_path, extra={"pretrained_file": identity, "data": {
            "train_images": len(train_data[0]), "test_images": len(test_data[0]), "classes": len(classes)}})
    loop.curves = CurveWriter(args.dump_path, args.tensorboard, args.rank)

    # ============ training (epoch loop) ============
    if args.probe == "cached":
        best, last1, last5 = train_cached(loop, train_data, test_data, t_start)
        seconds = time.time() - t_start
    else:
        best, last1, last5 = train_released(loop, resumed_at, t_start)
        seconds = loop.clock.elapsed()
    report(loop, best, last1, last5, seconds)


@dataclass
class LinearLoop(EvalLoop):
    """What the epochs of the linear evaluation work with: `EvalLoop` (its `model` the frozen network) with the
    classifier trained on its features (in DDP with several processes and the released crops) and, with
    --augment batched, the probe that makes the crops."""
    linear: Optional[nn.Module] = None
    probe: Any = None
    iterations: int = 0  # per epoch, of --probe released


def build_data(args, logger):
    """((train images, labels), (test images, labels), class names); --num_labels must be their number."""
    (train_images, train_labels, classes), (test_images, test_labels, _) = load_splits(args.data_path, args.download)
    if len(classes) != args.num_labels:
        fail(f"--num_labels {args.num_labels} but {args.data_path} has {len(classes)} classes")
    logger.info(f"Building data done: {len(train_images)} train / {len(test_images)} test images")
    return (train_images, train_labels), (test_images, test_labels), classes


def build_network(args, state, info, logger):
    """The frozen network (the weights `state` of --pretrained loaded, eval mode, no gradients; `info`: what
    `network_from_checkpoint` read beside them) and the classifier, both on the device."""
    model = build_model(args.arch, output_dim=0, eval_mode=True, width_per_group=args.width_per_group)
    load_pretrained(model, args.pretrained, state, (info or {}).get("epoch"), args.allow_mismatched_weights, logger)
    model = model.to(args.device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        linear = RegLog(args.num_labels, model.feature_dim, args.global_pooling, args.use_bn).to(args.device)
    except ValueError as e:
        fail(str(e))
    if args.use_bn:
        logger.info("--use_bn true: no BatchNorm with global pooling (as released, it belongs to the 6x6 pooling)")
    return model, linear


def report(loop, best, last1, last5, seconds):
    """The closing lines, and `results.json` (rank 0): the best test top-1 over epochs and the last epoch's."""
    args, logger = loop.args, loop.logger
    logger.info("Training of the supervised linear classifier on frozen features completed.\n"
                f"Top-1 test accuracy: {best:.1f}")
    crops = "" if args.probe == "cached" else f", {args.augment} crops"
    logger.info(f"Last-epoch test accuracy: top-1 {last1:.1f} top-{loop.maxk} {last5:.1f} "
                f"({args.probe} probe{crops}, {format_eta(seconds)})")
    if args.rank == 0:
        write_json(os.path.join(args.dump_path, "results.json"),
                   {"best_top1": best, "last_top1": last1, "last_top5": last5, "epochs": args.epochs,
                    "mode": args.probe, "augment": args.augment, "seconds": seconds}, indent=1)
    logger.info(results_line("Linear evaluation", args.dump_path))
    loop.curves.close()
    launch.cleanup()


def curve_values(row, lr):
    """TensorBoard tags of one epoch of the statistics table."""
    return {"linear/train_loss": row["loss"], "linear/train_top1": row["prec1"], "linear/test_loss": row["loss_val"],
            "linear/test_top1": row["prec1_val"], "linear/test_top5": row["prec5_val"], "linear/lr": lr}


def train_cached(loop, train_data, test_data, t_start):
    """--probe cached: the frozen features of the un-augmented images extracted once, the classifier
    trained on them (src/eval/linear_probe.py). Returns (best top-1, last top-1, last top-k)."""
    from src.eval.linear_probe import extract_frozen_features, train_linear_on_features
    args, model = loop.args, loop.model
    (train_images, train_labels), (test_images, test_labels) = train_data, test_data
    tr = extract_frozen_features(model, plain_tensor(train_images, CIFAR_MEAN, EVAL_STD), 256, args.device)
    te = extract_frozen_features(model, plain_tensor(test_images, CIFAR_MEAN, EVAL_STD), 256, args.device)
    loop.logger.info(f"Features extracted once in {time.time() - t_start:.1f}s: {tuple(tr.shape)} / {tuple(te.shape)}")
    res = train_linear_on_features(tr, train_labels, te, test_labels, args.num_labels, args.epochs,
                                   args.batch_size * args.world_size, args.lr, args.wd, args.nesterov,
                                   args.scheduler_type, args.final_lr, args.decay_epochs, args.gamma,
                                   seed=args.seed, device=args.device, log_fn=loop.logger.info)
    stats = Stats(os.path.join(args.dump_path, f"stats{args.rank}"), STATS_COLUMNS)
    for row, lr in zip(res["stats"], res["lrs"]):
        stats.update(row)
        loop.curves.scalars(row["epoch"], curve_values(row, lr))
    return res["best_top1"], res["last_top1"], res["last_top5"]


def prepare_released(loop, train_data, test_data, start):
    """The released loop's set-up, before the evaluation starts: the crops' source, the optimiser, the
    schedule, and the resume from the evaluation's checkpoint (a checkpoint that cannot be resumed is refused
    by every process together, `start`). Fills them in `loop`; returns (first epoch, best top-1 so far,
    whether a checkpoint was resumed)."""
    args = loop.args
    loop.iterations = released_crops(loop, train_data, test_data, start)

    # ============ optimiser ============
    loop.optimizer = torch.optim.SGD(loop.linear.parameters(), lr=args.lr, nesterov=args.nesterov, momentum=0.9,
                                     weight_decay=args.wd)
    loop.scheduler = make_scheduler(loop.optimizer, args.scheduler_type, args.epochs, args.final_lr,
                                    args.decay_epochs, args.gamma)

    # ============ resume ============
    return resume_evaluation(args, LINEAR, loop.linear, loop.optimizer, loop.scheduler, loop.logger, no_best=0.0)


def train_released(loop, resumed_at, t_start):
    """The released loop: augmented crops, test after every epoch, best-of-epochs top-1, from where
    `prepare_released` left it (`resumed_at`: its answer). Fills in `loop` the records (`t_start`: when this
    process started, for the evaluation's time across its processes). Returns (best top-1, last top-1, last
    top-k)."""
    args, logger = loop.args, loop.logger
    start_epoch, best_acc, resumed = resumed_at
    loop.stats, loop.clock, loop.pace = epoch_records(args, loop.iterations, start_epoch if resumed else None,
                                                      t_start, logger)

    # ============ epoch loop ============
    last1 = last5 = float("nan")
    for epoch in range(start_epoch, args.epochs):
        best_acc, last1, last5 = train_and_test(loop, epoch, best_acc)
    if start_epoch >= args.epochs:  # already finished: report the stored numbers
        last1 = loop.stats.last("prec1_val", float("nan"))
        last5 = loop.stats.last("prec5_val", float("nan"))
    return best_acc, last1, last5


def released_crops(loop, train_data, test_data, start):
    """The source of the crops, set in `loop`: the released loaders (the classifier in DDP with several
    processes; `start`: met before DDP's first collective) or, with --augment batched, the probe that makes
    them on the device (src/eval/batched_probe.py). Returns the iterations per epoch."""
    args = loop.args
    if args.augment == "batched":
        from src.eval.batched_probe import BatchedProbe
        loop.probe = BatchedProbe(loop.model, train_data, test_data, args.crop_size, args.batch_size, args.seed,
                                  args.rank, args.world_size, args.crops_per_chunk)
        loop.logger.info(f"Batched crops: {loop.probe.chunk} per chunk on {args.device}; test features computed "
                         f"once {tuple(loop.probe.test_features.shape)}")
        return loop.probe.iterations
    train_tf, test_tf = eval_transforms(args.crop_size)
    loop.train_loader, loop.test_loader = data_loaders(LabeledDataset(*train_data, train_tf),
                                                       LabeledDataset(*test_data, test_tf), args)
    if args.world_size > 1:
        start.agree_so_far()  # before DDP's first collective (src/runtime/startup.py, `StartVote`)
        loop.linear = nn.parallel.DistributedDataParallel(
            loop.linear, device_ids=[args.device.index] if args.device.type == "cuda" else None)
    return len(loop.train_loader)


def train_and_test(loop, epoch, best_acc):
    """Epoch `epoch`: train, test, record, checkpoint (rank 0), stop here on a signal. Returns the best
    top-1 so far and this epoch's test top-1 and top-k."""
    args = loop.args
    if args.augment == "batched":
        scores = train_batched(loop, epoch)
        test = loop.probe.test(loop.linear.linear, loop.maxk)
    else:
        loop.train_loader.sampler.set_epoch(epoch)
        scores = train(loop, epoch)
        test = validate(loop)
    best_acc = max(best_acc, test[1])
    row = record_epoch(loop, epoch, scores, test, best_acc)
    loop.curves.scalars(epoch, curve_values(row, loop.optimizer.param_groups[0]["lr"]))  # the lr of this epoch
    loop.scheduler.step()
    if args.rank == 0:
        classifier = loop.linear.module if hasattr(loop.linear, "module") else loop.linear
        atomic_save({"epoch": epoch + 1, "state_dict": classifier.state_dict(),
                     "optimizer": loop.optimizer.state_dict(), "scheduler": loop.scheduler.state_dict(),
                     "best_acc": best_acc}, os.path.join(args.dump_path, "checkpoint.pth.tar"))
    stop_if_preempted(loop, epoch, "linear classifier")
    return best_acc, test[1], test[2]


def learning_rate(optimizer):
    """The released log's learning rate."""
    return f"LR {optimizer.param_groups[0]['lr']:.4f}"


def train(loop, epoch):
    """One epoch of the classifier on the frozen network's features; returns its (loss, top-1, top-k)
    averages."""
    loop.linear.train()

    def classify(images):
        with torch.no_grad():
            features = loop.model(images)
        return loop.linear(features)

    return train_epoch(loop, epoch, classify, learning_rate)


def train_batched(loop, epoch):
    """One epoch of the classifier on the features of crops made on the device; returns its (loss, top-1,
    top-k) averages. Logs after each chunk of crops that holds an iteration divisible by --log_freq."""
    log = TrainingLog(loop, epoch, loop.probe.iterations, learning_rate)

    def line(it, loss, top1):
        log.write(it, [f"Loss ({loss:.4f})", f"Prec ({top1:.3f})"])

    return loop.probe.train_epoch(loop.linear.linear, loop.optimizer, epoch, loop.maxk, loop.args.log_freq,
                                  line if loop.args.rank == 0 else None)


def validate(loop):
    """(loss, top-1, top-k) of the classifier on the whole test split (in every process, as released)."""
    loop.linear.eval()
    return evaluate(lambda images: loop.linear(loop.model(images)), loop.test_loader, loop.maxk, loop.args.device)


if __name__ == "__main__":
    run_main(main, StartVote())
