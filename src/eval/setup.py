"""What the two evaluations share: eval_linear.py (a linear classifier on frozen features) and
eval_semisup.py (fine-tuning with 1 % or 10 % of the labels).

Their common flags and checks, the start-up phase (processes, seeds, the evaluation folder, the log), the
train/test splits and their loaders, the schedules, and resuming from a checkpoint. Their epoch loop:
src/eval/loop.py.
"""
import os

import numpy as np
import torch

from ..data.datasets import DataError, load_split
from ..method.resnet import ARCHS
from ..method.train_step import unwrap
from ..runtime import devices, launch, signals
from ..runtime.checkpoint import CheckpointError, find_resume_checkpoint, set_rng_state, strip_module_prefix
from ..runtime.cli import MAX_EPOCHS, bool_flag, check_seed, error_line, fail
from ..runtime.logs import create_logger, format_provenance, provenance
from ..runtime.run_folder import FINE_TUNING, LINEAR, claim_evaluation_folder
from ..runtime.startup import agree_or_fail, start_processes
from .export_record import read_export_record, record_path
from .pretrained import PretrainedError, network_config, not_a_file, params_beside, read_state_dict

# How the messages name each evaluation: the run, running it, to run it.
WORDS = {LINEAR: ("evaluation", "evaluating", "evaluate"), FINE_TUNING: ("fine-tuning", "fine-tuning", "fine-tune")}
# How the resume messages name it: the run, what its checkpoint holds, what to do with a checkpoint that fails.
RESUMING = {LINEAR: ("linear evaluation", "the linear classifier", "move it away to start the evaluation afresh"),
            FINE_TUNING: ("fine-tuning", "the fine-tuning", "use another --dump_path")}


def add_shared_released_flags(parser, workers):
    """Add the released flags that both evaluations have (their released defaults differ only in
    `workers`)."""
    parser.add_argument("--dump_path", type=str, default=".", help="experiment dump path for checkpoints and log")
    parser.add_argument("--seed", type=int, default=31, help="seed")
    parser.add_argument("--data_path", type=str, default="/path/to/imagenet",
                        help="cifar10 | cifar100 | a CIFAR pickle folder | an image folder with train/ and test/")
    parser.add_argument("--workers", default=workers, type=int, help="number of data loading workers")
    parser.add_argument("--arch", default="resnet50", type=str, help=f"convnet architecture: {', '.join(ARCHS)}")
    parser.add_argument("--pretrained", default="", type=str, help="path to pretrained weights ('' = random weights)")
    parser.add_argument("--dist_url", default="env://", type=str, help="url used to set up distributed training")
    parser.add_argument("--world_size", default=-1, type=int, help="number of processes (set automatically)")
    parser.add_argument("--rank", default=0, type=int, help="rank of this process (set automatically)")
    parser.add_argument("--local_rank", "--local-rank", default=0, type=int,
                        help="this argument is not used and should be ignored")


def add_shared_new_flags(parser):
    """Add a group of the new flags that both evaluations have; returns it, for the script's own."""
    g = parser.add_argument_group("new flags (defaults keep the released behaviour)")
    g.add_argument("--width_per_group", type=int, default=64,
                   help="ResNet width; with --pretrained, --arch and this are read from the checkpoint (a "
                        "value given here must agree)")
    g.add_argument("--device", default="auto", choices=devices.DEVICES,
                   help=devices.HELP)
    g.add_argument("--allow_mismatched_weights", type=bool_flag, default=False,
                   help="load --pretrained even when backbone weights are missing or mis-shaped "
                        "(the released code only logged them)")
    g.add_argument("--dist_timeout", type=float, default=launch.DEFAULT_TIMEOUT_S,
                   help="seconds a process waits for the others before the job stops, and after a stop "
                        "signal for the end of the epoch")
    g.add_argument("--download", type=bool_flag, default=True, help="download cifar10/cifar100 when missing")
    g.add_argument("--log_freq", type=int, default=50, help="log every this many iterations")
    return g


def check_shared_args(args, kind):
    """The checks of the flags both evaluations have; each script checks the lower bound of --epochs,
    --workers and --dist_timeout in its own words."""
    if args.arch not in ARCHS:
        fail(f"unknown --arch {args.arch!r}; choose one of {', '.join(ARCHS)}")
    if args.epochs > MAX_EPOCHS:
        fail(f"--epochs {args.epochs} is more than {MAX_EPOCHS}; a typo?")
    check_seed("seed", args.seed)
    for name in ("batch_size", "crop_size", "width_per_group", "log_freq"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.pretrained and not os.path.isfile(args.pretrained):
        random_weights = f" (pass '' to {WORDS[kind][2]} random weights)"
        fail(f"--pretrained {not_a_file(args.pretrained, otherwise=random_weights)}")


# The flags of an evaluation that name the network it builds: read from --pretrained unless given.
NETWORK_FLAGS = ("arch", "width_per_group")


def network_from_checkpoint(args, given):
    """Read --pretrained once and set --arch and --width_per_group to those of the network that wrote it
    (`network_config`: its weights, its `arch` entry, the params.json of its run), so that the evaluation
    builds that network and records it in its params.json. A flag in `given` (typed on the command line) that
    names another network stops the run with one line naming both values, unless --allow_mismatched_weights
    true: then the flags build the network and the weights are loaded leniently, as released. An export of
    tools/export_backbone.py records no epoch in its weights: `info["epoch"]` is then that of its description
    (`src.eval.export_record`) when it describes this network. Returns (state dict, info, a line for the
    log), or (None, None, None) without --pretrained."""
    if not args.pretrained:
        return None, None, None
    try:
        state, info = read_state_dict(args.pretrained)
    except PretrainedError as e:
        fail(str(e))
    try:
        config = network_config(args.pretrained, state, info)
    except PretrainedError as e:
        if not args.allow_mismatched_weights:
            fail(f"--pretrained {e}")
        return state, info, f"--allow_mismatched_weights true: {e}; building --arch {args.arch} at width " \
                            f"{args.width_per_group} from the flags"
    found = f"{config['arch']} at width_per_group {config['width_per_group']}"
    export = _export_of(args.pretrained, config)
    if export is not None and info["epoch"] is None:
        info = dict(info, epoch=export["epoch"])
    for name in NETWORK_FLAGS:
        value = getattr(args, name)
        if name not in given:
            setattr(args, name, config[name])
        elif value != config[name] and not args.allow_mismatched_weights:
            fail(f"--{name} {value} but {args.pretrained} holds a {found}; leave --{name} out to evaluate the "
                 "checkpoint's network")
    return state, info, (f"Network of {args.pretrained}: {found} (read from the checkpoint)"
                         f"{_pretrained_on(args.pretrained, export)}; "
                         f"building {args.arch} at width_per_group {args.width_per_group}")


def _export_of(path, config):
    """The description of the export at `path` (src/eval/export_record.py) when it describes the network
    `config` of its weights, else None (no description, a broken one, or that of other weights)."""
    export = read_export_record(path)
    if export is None or (export["arch"], export.get("width_per_group")) != (config["arch"], config["width_per_group"]):
        return None
    return export


def _pretrained_on(path, export=None):
    """', pretrained on DATA (N classes)' from the params.json of the checkpoint's run (for an export, what its
    description `export` records of that run), so that a log shows a checkpoint evaluated on other data than
    it learnt from (a CIFAR-100 run on CIFAR-10, say)."""
    run, said = params_beside(path)[1], ""
    if not isinstance(run.get("data_path"), str) and export is not None:
        run, said = export.get("pretraining") or {}, f" (as {record_path(path)} records)"
    if not isinstance(run.get("data_path"), str):
        return ""
    classes = run.get("data", {}).get("classes") if isinstance(run.get("data"), dict) else None
    return f", pretrained on {run['data_path']}" + (f" ({classes} classes)" if classes else "") + said


def set_up(args, kind, operational_flags, start):
    """Distributed set-up, the stop signals' handler (acted on after each epoch), seeds, the evaluation
    folder (locked; refused when it holds another kind of run, or an evaluation of another checkpoint or
    with other arguments unless --allow_changed_args), the processes' agreement on the arguments, the
    log (headed by the run's provenance). Returns the log, the stop signals' handler, the identity of
    --pretrained and the folder's lock (held until the process ends)."""
    preempt = start_processes(args, start)
    lock, identity, moved, problem = (claim_evaluation_folder(args, kind, operational_flags, start) if args.rank == 0
                                      else (None, None, None, None))
    agree_or_fail(args, problem, start)
    logger = create_logger(args.dump_path, args.rank, held=args.world_size > 1)  # see agree_to_start
    logger.info(devices.describe_device(args.device))
    logger.info(format_provenance(provenance(args.device, args.world_size)))
    if moved:
        run, running, _ = WORDS[kind]
        logger.info(f"The earlier {run} in this folder (another checkpoint or other arguments) is kept in "
                    f"{moved}; {running} afresh.")
    if args.rank == 0:
        logger.info("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    return logger, preempt, identity, lock


def load_splits(data_path, download):
    """((train images, labels, classes), (test images, labels, classes)); bad data is a one-line error."""
    try:
        return (load_split(data_path, train=True, download=download),
                load_split(data_path, train=False, download=download))
    except DataError as e:
        fail(str(e))


def data_loaders(train_set, test_set, args):
    """The training loader (this process's share of `train_set`, reshuffled by `sampler.set_epoch`) and
    the test loader (all of `test_set` in every process, as released)."""
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, num_replicas=args.world_size,
                                                              rank=args.rank)
    pin = args.device.type == "cuda"
    quiet = signals.ignore_preemption_signals_in_worker if args.workers > 0 else None  # the main process handles them
    train_loader = torch.utils.data.DataLoader(train_set, sampler=sampler, batch_size=args.batch_size,
                                               num_workers=args.workers, pin_memory=pin, worker_init_fn=quiet)
    test_loader = torch.utils.data.DataLoader(test_set, batch_size=args.batch_size, shuffle=False,
                                              num_workers=args.workers, pin_memory=pin, worker_init_fn=quiet)
    return train_loader, test_loader


def make_scheduler(optimizer, scheduler_type, epochs, final_lr=0.0, decay_epochs=(60, 80), gamma=0.1):
    """The released schedules, stepped once per epoch: `cosine` = CosineAnnealingLR(T_max=epochs,
    eta_min=final_lr) (the linear evaluation's default), `step` = MultiStepLR(decay_epochs, gamma) (the
    linear evaluation's other choice, and the fine-tuning's schedule)."""
    if scheduler_type == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs, eta_min=final_lr)
    if scheduler_type == "step":
        return torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(decay_epochs), gamma=gamma)
    raise ValueError(f"unknown scheduler_type {scheduler_type!r} (cosine or step)")


def resume_evaluation(args, kind, model, optimizer, scheduler, logger, no_best):
    """Continue from the evaluation's checkpoint in --dump_path: its weights into `model` (DDP unwrapped,
    `module.` prefix stripped, strictly), the optimiser's and the scheduler's states, and NumPy's random
    state where it holds one. Returns (first epoch, best test accuracy so far, whether there was a
    checkpoint); (0, `no_best`, False) without one. The best accuracy has the form of `no_best`: a number
    (the linear evaluation's top-1) or a tuple (the fine-tuning's top-1 and top-5). A checkpoint that
    cannot be used stops the run with one line."""
    run, holds, advice = RESUMING[kind]
    try:
        path, ckpt = find_resume_checkpoint(args.dump_path, log=logger.info)
    except CheckpointError as e:
        fail(f"cannot resume {holds}: {e}")
    if ckpt is None:
        return 0, no_best, False
    try:
        unwrap(model).load_state_dict(strip_module_prefix(ckpt["state_dict"]))
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])
        best = ckpt["best_acc"]
        best = tuple(float(a) for a in best) if isinstance(no_best, tuple) else float(best)
        if "rng" in ckpt:
            set_rng_state(ckpt["rng"], np.random)
    except (KeyError, RuntimeError, ValueError, TypeError) as e:
        fail(f"{path}: cannot resume {holds} ({error_line(e)}); {advice}")
    if start_epoch < 0:
        fail(f"{path}: epoch {start_epoch} cannot be negative; {advice}")
    logger.info(f"Resumed {run} from epoch {start_epoch} "
                f"(best top-1 so far {best[0] if isinstance(best, tuple) else best:.1f})")
    return start_epoch, best, True
