"""Un-Mix + SwAV self-supervised pretraining on CIFAR-10/100 (faithful to the released main_swav_unmix.py).

Runs as `python main_swav_unmix.py ...` (one process, CUDA if present else CPU), under `torchrun`, the
legacy `python -m torch.distributed.launch`, or `srun` (see README, "Running on a cluster").
Reads top to bottom: arguments -> data -> model -> optimiser -> resume -> epoch loop.
"""
import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from src.data.augment import GPUMultiCrop
from src.data.constants import CIFAR_MEAN, PRETRAIN_STD
from src.data.datasets import DataError, load_split
from src.data.sampling import BatchedCrops, DistributedBatchSampler, ResumableDistributedSampler
from src.data.transforms import MultiCropDataset, MultiCropTransform, plain_tensor
from src.method.larc import build_optimizer
from src.method.resnet import ARCHS, build_model
from src.method.train_step import UnmixSwAV, cosine_schedule
from src.method.swav import LOSS_FORMS, SwavConfig
from src.runtime import devices, launch, signals, startup
from src.runtime.async_save import BackgroundWriter
from src.runtime.checkpoint import CheckpointError, restart_from_checkpoint, save_checkpoint
from src.runtime.cli import MAX_EPOCHS, OPERATIONAL_FLAGS, ArgumentParser, bool_flag, check_seed, fail
from src.runtime.durations import format_eta
from src.runtime.exits import run_main
from src.runtime.logs import AverageMeter, Clock, CurveWriter, Stats, create_logger, format_provenance, provenance
from src.runtime.run_folder import claim_pretraining_folder, load_params_json, save_params
from src.runtime.startup import StartVote, agree_or_fail, start_processes


def get_parser():
    p = ArgumentParser(description="Implementation of Un-Mix + SwAV on CIFAR",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # data (released)
    p.add_argument("--data_path", type=str, default="/path/to/data",
                   help="cifar10 | cifar100 (torchvision data under data/CIFAR-10 | data/CIFAR-100), a folder "
                        "holding cifar-10-batches-py / cifar-100-python, or an image folder with train/ and test/")
    p.add_argument("--nmb_crops", type=int, default=[2], nargs="+", help="list of number of crops (example: [2, 6])")
    p.add_argument("--size_crops", type=int, default=[32], nargs="+", help="crops resolutions (example: [224, 96])")
    p.add_argument("--min_scale_crops", type=float, default=[0.14], nargs="+", help="argument in RandomResizedCrop")
    p.add_argument("--max_scale_crops", type=float, default=[1], nargs="+", help="argument in RandomResizedCrop")
    p.add_argument("--use_pil_blur", type=bool_flag, default=True,
                   help="kept for compatibility: CIFAR crops have no blur")
    # SwAV (released)
    p.add_argument("--crops_for_assign", type=int, nargs="+", default=[0, 1], help="crops used for computing assignments")
    p.add_argument("--temperature", default=0.1, type=float, help="temperature parameter in training loss")
    p.add_argument("--epsilon", default=0.05, type=float, help="regularization parameter for Sinkhorn-Knopp")
    p.add_argument("--improve_numerical_stability", default=False, type=bool_flag,
                   help="subtract the global max of the scores before exp (Sinkhorn)")
    p.add_argument("--sinkhorn_iterations", default=3, type=int, help="number of iterations in Sinkhorn-Knopp")
    p.add_argument("--feat_dim", default=128, type=int, help="feature dimension")
    p.add_argument("--nmb_prototypes", default=3000, type=int, help="number of prototypes")
    p.add_argument("--queue_length", type=int, default=0, help="length of the queue (0 for no queue)")
    p.add_argument("--epoch_queue_starts", type=int, default=15, help="from this epoch, we start using a queue")
    # optimisation (released)
    p.add_argument("--epochs", default=100, type=int, help="number of total epochs to run")
    p.add_argument("--batch_size", default=64, type=int, help="batch size per process")
    p.add_argument("--base_lr", default=4.8, type=float, help="base learning rate")
    p.add_argument("--final_lr", type=float, default=0, help="final learning rate")
    p.add_argument("--freeze_prototypes_niters", default=313, type=int,
                   help="freeze the prototypes during this many iterations from the start")
    p.add_argument("--wd", default=1e-6, type=float, help="weight decay")
    p.add_argument("--warmup_epochs", default=10, type=int, help="number of warmup epochs")
    p.add_argument("--start_warmup", default=0, type=float, help="initial warmup learning rate")
    # distributed (released; set by the launcher)
    p.add_argument("--dist_url", default="env://", type=str, help="url used to set up distributed training")
    p.add_argument("--world_size", default=-1, type=int, help="number of processes (set automatically)")
    p.add_argument("--rank", default=0, type=int, help="rank of this process (set automatically)")
    p.add_argument("--local_rank", "--local-rank", default=0, type=int, help="this argument is not used and should be ignored")
    # other (released)
    p.add_argument("--arch", default="resnet50", type=str, help=f"convnet architecture: {', '.join(ARCHS)}")
    p.add_argument("--hidden_mlp", default=2048, type=int, help="hidden layer dimension in projection head")
    p.add_argument("--workers", default=10, type=int, help="number of data loading workers")
    p.add_argument("--checkpoint_freq", type=int, default=25, help="save the model every this many epochs")
    p.add_argument("--use_fp16", type=bool_flag, default=True,
                   help="mixed precision on CUDA (torch.amp autocast + GradScaler; CPU trains in float32)")
    p.add_argument("--sync_bn", type=str, default="pytorch", help="synchronize bn: pytorch | apex")
    p.add_argument("--syncbn_process_group_size", type=int, default=8, help="apex SyncBN group size")
    p.add_argument("--dump_path", type=str, default=".", help="experiment dump path for checkpoints and log")
    p.add_argument("--seed", type=int, default=31, help="seed")
    # Un-Mix (released)
    p.add_argument("--run_swav", type=bool_flag, default=False, help="True: plain SwAV, no Un-Mix")
    p.add_argument("--unmix_prob", type=float, default=0.5, help="probability of global (mixup) vs region (CutMix) mixing")
    p.add_argument("--unmix_beta", type=float, default=1.0, help="lam ~ Beta(unmix_beta, unmix_beta)")
    # new in this implementation (defaults keep the released behaviour)
    g = p.add_argument_group("new flags (defaults keep the released behaviour)")
    g.add_argument("--width_per_group", type=int, default=64, help="ResNet width (small values for quick CPU runs)")
    g.add_argument("--unmix_loss_form", type=str, default="released", choices=LOSS_FORMS,
                   help="released: reverse only the mixture's codes; paper: the authors' later formula")
    g.add_argument("--amp_dtype", type=str, default="float16", choices=["float16", "bfloat16"],
                   help="autocast dtype when --use_fp16 is on (float16 uses a GradScaler)")
    g.add_argument("--augment", type=str, default="released", choices=["released", "batched", "auto"],
                   help="released: torchvision/PIL crops in DataLoader workers (as released); batched: the data "
                        "set as a uint8 tensor on the device and all crops of a batch made there at once (much "
                        "faster on a GPU, colour statistics within 1-2/255 of PIL's); auto: batched on CUDA, "
                        "released on CPU")
    g.add_argument("--channels_last", type=bool_flag, default=False, help="channels_last memory format (CUDA speed)")
    g.add_argument("--compile", type=bool_flag, default=False, help="torch.compile the model")
    g.add_argument("--cuda_graph", type=bool_flag, default=False,
                   help="capture the whole training iteration as CUDA graphs and replay them (one process on a "
                        "CUDA device, bfloat16 or float32: not with the float16 GradScaler)")
    g.add_argument("--download", type=bool_flag, default=True,
                   help="for --data_path cifar10/cifar100: download when missing (the released code always tried)")
    g.add_argument("--log_freq", type=int, default=50, help="log every this many iterations")
    g.add_argument("--knn_freq", type=int, default=0, help="weighted kNN monitor every this many epochs (0: off)")
    g.add_argument("--knn_k", type=int, default=200, help="neighbours of the kNN monitor")
    g.add_argument("--knn_temperature", type=float, default=0.1, help="temperature of the kNN monitor")
    g.add_argument("--max_nonfinite_steps", type=int, default=20,
                   help="stop after this many consecutive non-finite losses (their steps are skipped); "
                        "0: no guard (it decides on the device: no host synchronisation either way)")
    g.add_argument("--preempt_check_freq", type=int, default=10,
                   help="with several processes, agree on preemption every this many iterations")
    g.add_argument("--allow_changed_args", type=bool_flag, default=False,
                   help="resume a dump path whose params.json differs from these arguments")
    g.add_argument("--tensorboard", type=bool_flag, default=False,
                   help="write the curves (loss, lr, kNN top-1, images/s, peak memory per epoch; the loss at "
                        "each log line) for TensorBoard to <dump_path>/tensorboard (needs the tensorboard package)")
    g.add_argument("--epochs_run_limit", type=int, default=0,
                   help="stop (resumably) after this many epochs in this process; 0: no limit")
    g.add_argument("--dist_timeout", type=float, default=launch.DEFAULT_TIMEOUT_S,
                   help="seconds a process waits for the others (rendezvous, every collective) before the job "
                        "stops, and after a stop signal for the next point where it can save")
    g.add_argument("--device", default="auto", choices=devices.DEVICES,
                   help=devices.HELP)
    return p


def check_args(args):
    if args.arch not in ARCHS:
        fail(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    n = len(args.nmb_crops)
    if not (len(args.size_crops) == len(args.min_scale_crops) == len(args.max_scale_crops) == n):
        fail(f"--nmb_crops, --size_crops, --min_scale_crops, --max_scale_crops need the same length; got "
             f"{n}, {len(args.size_crops)}, {len(args.min_scale_crops)}, {len(args.max_scale_crops)}")
    total = sum(args.nmb_crops)
    if any(c < 0 or c >= total for c in args.crops_for_assign):
        fail(f"--crops_for_assign {args.crops_for_assign} out of range: there are {total} crops (0..{total - 1})")
    if total < 2:
        fail(f"SwAV needs at least 2 crops; --nmb_crops gives {total}")
    if not args.run_swav and total % 2:
        fail(f"Un-Mix mixes crops in pairs: --nmb_crops total must be even, got {total} (or --run_swav true)")
    if args.batch_size < 2:
        fail(f"--batch_size {args.batch_size} is too small: batch norm and Un-Mix need at least 2 per process")
    if not 0 < args.epochs <= MAX_EPOCHS:
        fail(f"--epochs must be positive, got {args.epochs}" if args.epochs <= 0 else
             f"--epochs {args.epochs} is more than {MAX_EPOCHS}; a typo?")
    check_seed("seed", args.seed)
    if args.sync_bn not in ("pytorch", "apex"):
        fail(f"--sync_bn must be pytorch or apex, got {args.sync_bn!r}")
    if not 0 <= args.unmix_prob <= 1 or args.unmix_beta <= 0:
        fail(f"--unmix_prob must be in [0, 1] and --unmix_beta > 0 (got {args.unmix_prob}, {args.unmix_beta})")
    for name in ("feat_dim", "width_per_group", "checkpoint_freq", "log_freq", "preempt_check_freq",
                 "sinkhorn_iterations", "knn_k"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    for name in ("hidden_mlp", "queue_length", "epoch_queue_starts", "warmup_epochs", "workers", "knn_freq",
                 "epochs_run_limit", "max_nonfinite_steps"):
        if getattr(args, name) < 0:
            fail(f"--{name} must not be negative, got {getattr(args, name)}")
    if min(args.size_crops) < 1 or not all(0 < lo <= hi <= 1 for lo, hi in zip(args.min_scale_crops,
                                                                                args.max_scale_crops)):
        fail("--size_crops must be positive and 0 < --min_scale_crops <= --max_scale_crops <= 1")
    if args.temperature <= 0 or args.epsilon <= 0 or args.knn_temperature <= 0:
        fail(f"--temperature, --epsilon and --knn_temperature must be positive (got {args.temperature}, "
             f"{args.epsilon}, {args.knn_temperature})")
    if args.base_lr < 0 or args.wd < 0:  # what SGD refuses, said before anything is built
        fail(f"--base_lr and --wd must not be negative (got {args.base_lr}, {args.wd})")
    if args.nmb_prototypes < 2:
        fail(f"--nmb_prototypes must be at least 2, got {args.nmb_prototypes}: with one prototype every code "
             "is the same and the loss is 0")
    if args.dist_timeout <= 0:
        fail(f"--dist_timeout must be positive, got {args.dist_timeout}")


def main(start):
    args = get_parser().parse_args()
    check_args(args)
    logger, np_rng, preempt, run_lock = set_up(args, start)  # the run folder stays locked until the process ends

    # ============ data ============
    data = build_data(args, logger, start)
    check_same_data(args, data.sizes, log=logger.warning)

    # ============ model, optimiser, method ============
    net = build_network(args, logger, start)
    start.agree_so_far()  # DDP's first collective comes next
    method = build_method(args, net, data.iters_per_epoch, np_rng, log=logger.warning)
    logger.info("Building optimizer done.")

    # ============ resume ============
    restart = resume(args, method, data.iters_per_epoch, logger)
    start.agree_to_start(logger)  # every process passed its checks: the run starts
    if args.rank == 0:
        save_params(args, args.dump_path, extra={"data": data.sizes})
    stats = Stats(os.path.join(args.dump_path, f"stats{args.rank}"), STATS_COLUMNS,
                  resume_before_epoch=restart.epoch if restart else None, log=logger.info)

    # ============ epoch loop ============
    start_epoch, start_iter = (restart.epoch, restart.iteration) if restart else (0, 0)
    # the training time of the earlier processes, up to the checkpoint resumed (mid-epoch work included)
    elapsed = restart.elapsed if restart is not None and restart.elapsed is not None else stats.last("time", 0.0)
    clock = Clock(args.epochs, data.iters_per_epoch, start_epoch, start_iter, offset=elapsed)
    loop = Loop(args, data, method, guard=NonfiniteWatch(args, logger), preempt=preempt,
                save=Saver(args, method, clock), clock=clock, stats=stats,
                curves=CurveWriter(args.dump_path, args.tensorboard, args.rank), logger=logger)
    if start_epoch >= args.epochs:
        logger.info(f"Nothing to do: the checkpoint is at epoch {start_epoch} of {args.epochs}.")
    epoch, epochs_this_process = start_epoch - 1, 0
    for epoch in range(start_epoch, args.epochs):
        resumed_here = restart is not None and epoch == restart.epoch and restart.iteration > 0
        first_iter = restart.iteration if resumed_here else 0
        method.start_epoch(epoch, data.iters_per_epoch)
        if resumed_here and restart.loop is not None:
            method.load_loop_state(restart.loop)
        crops = data.epoch_crops(epoch, first_iter, restart.torch_rng if resumed_here else None)
        meter = train_one_epoch(loop, epoch, first_iter, crops)
        end_of_epoch(loop, epoch, meter)
        epochs_this_process += 1
        if args.epochs_run_limit and epochs_this_process >= args.epochs_run_limit and epoch < args.epochs - 1:
            logger.info(f"Stopping after {epochs_this_process} epochs (--epochs_run_limit); rerun to resume.")
            break
    loop.save.wait()  # the last checkpoint is on disk (a write error: exit 6)
    loop.curves.close()
    guard = loop.guard
    if guard.unsaved_epoch is not None:
        print(f"error: training stopped with non-finite losses at epoch {guard.unsaved_epoch}; its checkpoint was "
              f"not written, {guard.kept()} (lower --base_lr or check the data)", file=sys.stderr, flush=True)
        sys.exit(4)
    checkpoint = os.path.join(args.dump_path, "checkpoint.pth.tar")
    logger.info(f"Pretraining done. Checkpoint: {checkpoint} ({args.epochs} epoch{'s' * (args.epochs != 1)})"
                if epoch >= args.epochs - 1
                else f"Pretraining paused. Checkpoint: {checkpoint} ({epoch + 1} of {args.epochs} epochs); rerun "
                     f"the same command to resume")
    launch.cleanup()


# ------------------------------------------------------------------ set-up

def set_up(args, start):
    """Distributed set-up, the stop signals' handler (from here on SIGTERM, SIGINT and SIGUSR1 stop the
    run at its next checkpoint), seeds, the run folder (locked; checked against an earlier run's kind and
    arguments), the processes' agreement on the arguments, the log. Returns the log, the Un-Mix draws'
    random stream, the stop signals' handler and the folder's lock."""
    preempt = start_processes(args, start)
    np_rng = np.random.RandomState(args.seed)  # the released code drew lam, r and box centres here
    lock, problem = claim_pretraining_folder(args, OPERATIONAL_FLAGS, start) if args.rank == 0 else (None, None)
    agree_or_fail(args, problem, start)
    logger = create_logger(args.dump_path, args.rank, held=args.world_size > 1)  # see agree_to_start
    logger.info(devices.describe_device(args.device))
    logger.info(f"Process rank {args.rank} of world size {args.world_size} (local rank {args.local_rank}) "
                f"on {args.device}")
    logger.info(format_provenance(provenance(args.device, args.world_size)))
    if args.rank == 0:
        logger.info("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
        logger.info(f"The experiment will be stored in {args.dump_path}")
    if args.device.type == "cpu" and args.use_fp16:
        logger.info("CPU: training in float32 (--use_fp16 applies on CUDA only)")
    if args.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as released: fixed input shapes
    if args.cuda_graph:
        check_cuda_graph_args(args)
    return logger, np_rng, preempt, lock


def check_cuda_graph_args(args):
    """--cuda_graph needs what a captured iteration can hold (src/method/cuda_graph.py)."""
    if args.device.type != "cuda":
        fail(f"--cuda_graph true needs a CUDA device; this run is on {args.device.type}")
    if args.world_size > 1:
        fail(f"--cuda_graph true runs one process, this job has {args.world_size} (use --cuda_graph false)")
    if args.use_fp16 and args.amp_dtype == "float16":
        fail("--cuda_graph true cannot hold float16's GradScaler: add --amp_dtype bfloat16 (or --use_fp16 false)")


# ------------------------------------------------------------------ data

@dataclass
class TrainData:
    iters_per_epoch: int
    epoch_crops: Callable  # (epoch, first_iter, torch_rng) -> iterator over lists of crops on the device
    knn: Optional[tuple]   # (train images, labels, test images, labels, classes) for the kNN monitor
    sizes: dict            # params.json's `data`: the data set's size, so reports can tell a part of it


def build_data(args, logger, start):
    """The training crops, made by the released pipeline (torchvision on PIL images in DataLoader workers)
    or on the device in batches (--augment batched), and the plain images of the kNN monitor."""
    device = args.device
    try:
        train_images, train_labels, classes = load_split(args.data_path, train=True, download=args.download)
    except DataError as e:
        fail(str(e))
    transform = MultiCropTransform(args.size_crops, args.nmb_crops, args.min_scale_crops, args.max_scale_crops)
    train_dataset = MultiCropDataset(train_images, transform)
    sampler = ResumableDistributedSampler(train_dataset, num_replicas=args.world_size, rank=args.rank,
                                          batch_size=args.batch_size)
    iters_per_epoch = len(sampler) // args.batch_size
    if iters_per_epoch == 0:
        fail(f"{len(train_dataset)} training images give no full batch of {args.batch_size} on each of "
             f"{args.world_size} processes; lower --batch_size")
    augment = args.augment if args.augment != "auto" else ("batched" if device.type == "cuda" else "released")
    if augment == "batched":  # same epoch order and batches as the sampler above, crops made on the device
        multicrop = GPUMultiCrop(torch.from_numpy(train_images).to(device), args.size_crops, args.nmb_crops,
                                 args.min_scale_crops, args.max_scale_crops, CIFAR_MEAN, PRETRAIN_STD,
                                 channels_last=args.channels_last)
        batch_sampler = DistributedBatchSampler(len(train_images), args.batch_size, args.world_size, args.rank,
                                                seed=0, device=device)
        assert len(batch_sampler) == iters_per_epoch
        batched = BatchedCrops(multicrop, batch_sampler, seed=args.seed, rank=args.rank)

        def epoch_crops(epoch, first_iter, torch_rng=None):
            return batched.epoch(epoch, first_iter)
    else:
        loader = torch.utils.data.DataLoader(
            train_dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.workers,
            pin_memory=device.type == "cuda", drop_last=True,
            worker_init_fn=signals.ignore_preemption_signals_in_worker if args.workers > 0 else None)

        def epoch_crops(epoch, first_iter, torch_rng=None):
            sampler.set_epoch(epoch, first_iter)
            batches = iter(loader)  # draws the workers' base seed from the torch RNG
            if torch_rng is not None and args.workers == 0:
                # resumed mid-epoch: the uninterrupted run drew that seed before the saved state, so
                # in-process crops continue the very same random stream
                torch.set_rng_state(torch_rng)
            for crops in batches:
                yield [c.to(device, non_blocking=True) for c in crops]
    if args.world_size > 1:  # e.g. a node-local copy of the data with fewer images: stop, not hang
        start.agree_so_far()  # a process that could not read its data is met here, not in the comparison
        seen = startup.data_fingerprint(train_images, train_labels, classes, iters_per_epoch)
        problem = startup.first_disagreement(seen, args.world_size, device)
        if problem:
            fail(problem)
    logger.info(f"Building data done with {len(train_dataset)} images loaded ({len(classes)} classes, "
                f"{iters_per_epoch} iterations per epoch, {augment} augmentation).")
    knn = None
    if args.knn_freq > 0:
        try:
            test_images, test_labels, _ = load_split(args.data_path, train=False, download=args.download)
        except DataError as e:
            fail(str(e))
        from src.eval.knn import monitor_images  # CUDA: bfloat16, on the device under --augment batched
        knn = (monitor_images(plain_tensor(train_images, CIFAR_MEAN, PRETRAIN_STD), device, augment == "batched"),
               train_labels, monitor_images(plain_tensor(test_images, CIFAR_MEAN, PRETRAIN_STD), device,
                                            augment == "batched"), test_labels, len(classes))
    return TrainData(iters_per_epoch, epoch_crops, knn, {"train_images": len(train_images), "classes": len(classes)})


def check_same_data(args, sizes, log):
    """A run resumes on the data it started on: not, say, on a partial node-local copy after a requeue
    (the sizes its params.json records; runs from before they were recorded are not checked, which `log`
    says)."""
    params = load_params_json(args.dump_path)
    recorded = (params or {}).get("data")
    if recorded is None and (params is not None or os.path.isfile(os.path.join(args.dump_path, "checkpoint.pth.tar"))):
        why = ("predates its record in params.json" if params is not None
               else "has no params.json (a folder of the released code?)")
        log(f"the data's size could not be checked: the run in {args.dump_path} {why}; "
            f"resuming on {sizes['train_images']} training images in {sizes['classes']} classes")
    if isinstance(recorded, dict) and recorded != sizes and not args.allow_changed_args:
        fail(f"--data_path {args.data_path} gives {sizes['train_images']} training images in {sizes['classes']} "
             f"classes, but the run in {args.dump_path} started on {recorded.get('train_images')} in "
             f"{recorded.get('classes')} classes; check the data, or --allow_changed_args true to resume on it anyway")


# ------------------------------------------------------------------ model

def build_network(args, logger, start=None):
    """The released ResNet with head and prototypes, batch norm synchronised across processes, on the device."""
    model = build_model(args.arch, normalize=True, hidden_mlp=args.hidden_mlp, output_dim=args.feat_dim,
                        nmb_prototypes=args.nmb_prototypes, width_per_group=args.width_per_group)
    if args.world_size > 1:
        if args.sync_bn == "apex":
            try:
                import apex
            except ImportError:
                fail("--sync_bn apex needs NVIDIA apex, which is not installed; use --sync_bn pytorch")
            if start is not None:  # the start-up's vote: apex's groups are a collective, met after any refusal
                start.agree_so_far()
            pg = apex.parallel.create_syncbn_process_group(args.syncbn_process_group_size)
            model = apex.parallel.convert_syncbn_model(model, process_group=pg)
        elif args.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            logger.info("CPU: SyncBatchNorm needs CUDA, batch-norm statistics stay per process")
    model = model.to(args.device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    logger.info(f"Building model done: {args.arch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M "
                f"parameters, {model.feature_dim}-d features, device {args.device}.")
    return model


def build_method(args, net, iters_per_epoch, np_rng, log=print):
    """LARC around fused SGD (released settings), the learning-rate schedule, mixed precision, and the
    Un-Mix + SwAV method object that owns the step, the Un-Mix draws (`np_rng`), the queue and the
    non-finite guard; then the network's DDP / torch.compile wrapper runs its forward pass."""
    optimizer = build_optimizer(net.parameters(), lr=args.base_lr, momentum=0.9, weight_decay=args.wd,
                                trust_coefficient=0.001, clip=False)
    lr_schedule = cosine_schedule(args.base_lr, args.final_lr, args.epochs, iters_per_epoch, args.warmup_epochs,
                                  args.start_warmup)
    use_amp = args.device.type == "cuda" and args.use_fp16
    amp_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[args.amp_dtype] if use_amp else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    method = UnmixSwAV(net, optimizer, SwavConfig.from_dict(vars(args)), rng=np_rng, lr_schedule=lr_schedule,
                       scaler=scaler, autocast_dtype=amp_dtype, channels_last=args.channels_last,
                       skip_nonfinite=args.max_nonfinite_steps > 0, cuda_graph=args.cuda_graph,
                       log=log)  # where a failed CUDA-graph capture is said (train.log in a run)
    method.model = wrap_for_training(net, args)  # after the guard has laid out the BN buffers DDP keeps
    return method


def wrap_for_training(net, args):
    """DistributedDataParallel with several processes, then torch.compile if asked."""
    model = net
    if args.world_size > 1:
        device = args.device
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
    return torch.compile(model) if args.compile else model


# ------------------------------------------------------------------ resume and checkpoints

def resume(args, method, iters_per_epoch, logger):
    """Weights, optimiser, scaler, RNG streams and queue from the run's checkpoint; None for a fresh run."""
    try:
        restart = restart_from_checkpoint(args.dump_path, method.net, method.optimizer, method.scaler,
                                          method.inputs.rng, what=f"--arch {args.arch}", log=logger.info,
                                          rank=args.rank)
        method.load_state_dict(restart.method_state(args.dump_path, args.rank, args.world_size) if restart else {})
    except CheckpointError as e:
        fail(str(e))
    if restart is None:
        return None
    if restart.iteration > iters_per_epoch:
        fail(f"{restart.path} stopped at iteration {restart.iteration} of an epoch, but an epoch has "
             f"{iters_per_epoch} iterations here (other data, --batch_size or number of processes?)")
    logger.info(f"Resumed from {restart.path}: epoch {restart.epoch}, iteration {restart.iteration}.")
    return restart


class Saver:
    """save(epoch, iteration, loop=None, copy=False, background=False): the training checkpoint (and the
    epoch copy checkpoints/ckp-{epoch - 1}.pth when `copy`), each written atomically, with the training time
    of `clock` so far; collective. With `background`, from a host snapshot in a background thread
    (src/runtime/async_save.py); `wait()` joins that write and raises its error. Not with DataLoader workers
    (the released pipeline): they are forked at each epoch's start, and a fork while a thread writes copies
    the locks that thread holds."""

    def __init__(self, args, method, clock=None):
        self.args, self.method, self.clock = args, method, clock
        forks_workers = args.workers > 0 and (args.augment == "released"
                                              or (args.augment == "auto" and args.device.type != "cuda"))
        self.writer = None if forks_workers else BackgroundWriter()

    def __call__(self, epoch, iteration, loop=None, copy=False, background=False):
        a, m = self.args, self.method
        copy_path = os.path.join(a.dump_path, "checkpoints", f"ckp-{epoch - 1}.pth") if copy else None
        self.wait()  # one write at a time, in order
        state = m.state_dict()  # the queue, and the Un-Mix stream at the first iteration not trained
        save_checkpoint(a.dump_path, epoch, iteration, m.net, m.optimizer, state["unmix_rng"], a.arch, scaler=m.scaler,
                        queue=state["queue"], rank=a.rank, world_size=a.world_size, loop=loop,
                        copy_path=copy_path, device=a.device, writer=self.writer if background else None,
                        elapsed=None if self.clock is None else self.clock.elapsed())

    def wait(self):
        if self.writer is not None:
            self.writer.wait()


# ------------------------------------------------------------------ training

class NonfiniteWatch:
    """Reads the steps the device-side guard skipped, when logging and at the end of an epoch (never in
    between, so no iteration waits for the device), logs each one, and stops the run after
    --max_nonfinite_steps in a row. Every rank sees the same steps skipped (see UnmixSwAV)."""

    def __init__(self, args, logger):
        self.args, self.logger = args, logger
        self.streak = 0           # non-finite steps in a row, up to the last check
        self.checked = 0          # iterations of this epoch already checked
        self.unsaved_epoch = None

    def start_epoch(self, first_iter):
        self.checked = first_iter

    def check(self, method, epoch, upto):
        """Read the meter (one device sync) and handle the skipped steps of iterations [checked, upto)."""
        meter = method.read_meter()
        for it in range(self.checked, upto):
            if meter["bad_steps"] and meter["bad_steps"][it]:
                self.streak += 1
                self.logger.info(f"non-finite loss at epoch {epoch} iteration {it}: step skipped "
                                 f"({self.streak} in a row)")
                if self.streak >= self.args.max_nonfinite_steps:
                    self.stop(epoch, it)
            else:
                self.streak = 0
        self.checked = max(self.checked, upto)
        return meter

    def kept(self):
        """What the run leaves to resume from (no promise of a checkpoint that does not exist)."""
        path = os.path.join(self.args.dump_path, "checkpoint.pth.tar")
        return f"last good checkpoint kept ({path})" if os.path.isfile(path) else "no checkpoint was written yet"

    def stop(self, epoch, it):
        self.logger.info(f"error: {self.streak} consecutive non-finite losses; stopping, {self.kept()}")
        print(f"error: {self.streak} consecutive non-finite losses at epoch {epoch} iteration {it}; stopped, "
              f"{self.kept()} (lower --base_lr or check the data)", file=sys.stderr, flush=True)
        sys.exit(4)


@dataclass
class Loop:
    """What the epoch loop works with, built once by main()."""
    args: argparse.Namespace
    data: TrainData
    method: UnmixSwAV
    guard: NonfiniteWatch
    preempt: signals.PreemptionHandler
    save: Saver
    clock: Clock
    stats: Optional[Stats] = None
    curves: Optional[CurveWriter] = None
    logger: logging.Logger = logging.getLogger("unmix")


def train_one_epoch(loop, epoch, first_iter, crops_of_epoch):
    """One epoch of training from iteration `first_iter` (like swav's `train()`). Returns the meter read
    at its end, with the epoch's images/s; exits the process (status 3) after saving when preempted."""
    args, method, guard, clock, logger = loop.args, loop.method, loop.guard, loop.clock, loop.logger
    iters_per_epoch = loop.data.iters_per_epoch
    batch_time, data_time = AverageMeter(), AverageMeter()
    if args.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(args.device)
    guard.start_epoch(first_iter)
    first_epoch_here = epoch == loop.clock.first // iters_per_epoch  # of this process: the pace is logged once
    pace = devices.CpuPace.of_run(args, iters_per_epoch, logger.info, first_epoch_here)
    images = args.batch_size * args.world_size
    end = window_start = epoch_start = time.time()
    window = 0
    for it, crops in enumerate(crops_of_epoch, start=first_iter):
        data_time.update(time.time() - end)
        iteration = epoch * iters_per_epoch + it
        out = method.step(crops, iteration=iteration)
        pace.step()  # on the CPU at full width, once: the time an epoch takes
        window += 1
        if it % args.log_freq == 0:
            # the only wait for the device in an iteration: the time per iteration is averaged over
            # the iterations since the last log line
            meter = guard.check(method, epoch, it + 1)
            now = time.time()
            batch_time.update((now - window_start) / window, window)
            window_start, window = now, 0
            if args.rank == 0:
                loss = out.loss.item()
                if loop.curves is not None:
                    loop.curves.scalars(iteration, {"pretrain/loss_per_iteration": loss})
                logger.info(
                    f"Epoch: [{epoch}][{it}/{iters_per_epoch}]\t"
                    f"Time {batch_time.val:.3f} ({batch_time.avg:.3f})\t"
                    f"Data {data_time.val:.3f} ({data_time.avg:.3f})\t"
                    f"Loss {loss:.4f} ({meter['loss']:.4f})\t"
                    f"Lr: {method.optimizer.param_groups[0]['lr']:.4f}\t"
                    f"{images / max(batch_time.avg, 1e-9):.0f} img/s\t"
                    f"ETA {clock.eta(epoch, it)}")
        end = time.time()
        preempt = loop.preempt
        stop = preempt.requested if args.world_size == 1 else (
            it % args.preempt_check_freq == 0 and preempt.should_stop(args.world_size, args.device))
        if stop:
            meter = guard.check(method, epoch, it + 1)
            if guard.streak > 0:
                logger.info(f"Preempted (signal {preempt.signum}) during non-finite losses: no checkpoint "
                            "written, a rerun resumes from the last good one.")
            else:
                loop.save(epoch, it + 1, loop=method.loop_state())
                logger.info(f"Preempted (signal {preempt.signum}): checkpoint saved at epoch {epoch}, "
                            f"iteration {it + 1}.")
            preempt.stop_listening()  # a repeated signal from here on must not turn status 3 into 128 + N
            if args.rank == 0 and preempt.requeue():
                logger.info("Job requeued with scontrol; it will resume from the checkpoint.")
            sys.exit(signals.PREEMPTED_EXIT_CODE)
    meter = guard.check(method, epoch, iters_per_epoch)
    meter["images_per_s"] = (iters_per_epoch - first_iter) * images / max(time.time() - epoch_start, 1e-9)
    return meter


STATS_COLUMNS = ["epoch", "loss", "lr", "time", "knn_top1", "images_per_s", "max_memory_mb"]


def end_of_epoch(loop, epoch, meter):
    """Stats, curves, the kNN monitor, and the checkpoint (not over weights in a run of non-finite losses)."""
    args, method, guard, logger, data = loop.args, loop.method, loop.guard, loop.logger, loop.data
    row = {"epoch": epoch, "loss": meter["loss"], "lr": method.optimizer.param_groups[0]["lr"],
           "time": loop.clock.elapsed(), "images_per_s": meter["images_per_s"]}
    if args.device.type == "cuda":
        row["max_memory_mb"] = torch.cuda.max_memory_allocated(args.device) / 2**20
    if data.knn is not None and ((epoch + 1) % args.knn_freq == 0 or epoch == args.epochs - 1):
        from src.eval.knn import knn_monitor
        net = method.net
        net.eval()
        tr_x, tr_y, te_x, te_y, n_cls = data.knn
        row["knn_top1"] = knn_monitor(net.forward_backbone, tr_x, tr_y, te_x, te_y, n_cls, batch_size=512,
                                      device=args.device, rank=args.rank, world_size=args.world_size,
                                      k=args.knn_k, temperature=args.knn_temperature,
                                      autocast_dtype=torch.bfloat16 if args.device.type == "cuda" else None)
        net.train()
        k = min(args.knn_k, len(tr_y))  # as knn_scores takes it
        fewer = f": --knn_k {args.knn_k} but {len(tr_y)} training images" if k < args.knn_k else ""
        logger.info(f"kNN monitor (k={k}{fewer}): top-1 {row['knn_top1']:.2f}% at epoch {epoch}")
    loop.stats.update(row)
    loop.curves.scalars(epoch, {f"pretrain/{k}": v for k, v in row.items() if k != "epoch"})
    if meter["kept"] == 0:
        logger.info(f"Epoch {epoch}: no finite step, its loss is recorded as NaN")
    knn_text = f"kNN top-1 {row['knn_top1']:.2f}%, " if "knn_top1" in row else ""
    logger.info(f"Epoch {epoch} done: loss {meter['loss']:.4f}, {knn_text}{row['images_per_s']:.0f} img/s, "
                f"elapsed {format_eta(row['time'])}")
    if guard.streak > 0:
        guard.unsaved_epoch = epoch
        logger.info(f"Epoch {epoch} ends with {guard.streak} non-finite losses in a row: its checkpoint is not "
                    f"written, {guard.kept()}.")
    else:
        guard.unsaved_epoch = None
        loop.save(epoch + 1, 0, copy=epoch % args.checkpoint_freq == 0 or epoch == args.epochs - 1,
                  background=True)


if __name__ == "__main__":
    run_main(main, StartVote())
