"""The published linear-evaluation top-1 accuracies (%) of the released Un-Mix + SwAV CIFAR code.

Source: the "Results from this repo" tables of the released README:
ResNet-18 (Bottleneck variant), batch size 128, 1 GPU, linear evaluation with the released protocol
(best test top-1 over 100 epochs). Keyed by data set, then method, then pretraining epochs.
Also the released recipe those numbers came from, and how a run's arguments differ from it: a run is put
next to a published number only when it is that recipe.
"""
import math

PUBLISHED = {
    "cifar10": {
        "SwAV": {200: 84.9, 400: 88.8, 600: 90.1, 800: 90.8, 1000: 91.5},
        "Un-Mix": {200: 86.8, 400: 90.4, 600: 92.0, 800: 92.5, 1000: 93.0},
    },
    "cifar100": {
        "SwAV": {200: 57.9, 400: 64.5, 600: 65.7, 800: 67.2, 1000: 67.5},
        "Un-Mix": {200: 61.1, 400: 66.1, 600: 68.5, 800: 69.1, 1000: 69.9},
    },
}

METHODS = ("SwAV", "Un-Mix")
DATASETS = ("cifar10", "cifar100")


def published_top1(method, dataset, epochs):
    """Published top-1 (%) for (method, data set, pretraining epochs), or None when the table has no such row."""
    try:
        return PUBLISHED[dataset][method][int(epochs)]
    except (KeyError, TypeError, ValueError):
        return None


# The released recipe behind those numbers (script_unmix_c10.sh / script_unmix_c100.sh, scripts/unmix_job.sh):
# pretraining arguments that change what is computed. Speed and precision choices (--augment, --use_fp16,
# --amp_dtype, --compile, --cuda_graph, ...) are not part of it; Un-Mix's own arguments only count with Un-Mix.
RELEASED_PRETRAINING = {
    "arch": "resnet18", "width_per_group": 64, "hidden_mlp": 512, "feat_dim": 128, "nmb_prototypes": 100,
    "batch_size": 128, "world_size": 1, "nmb_crops": [2], "size_crops": [32], "min_scale_crops": [0.14],
    "max_scale_crops": [1.0], "crops_for_assign": [0, 1], "base_lr": 0.6, "final_lr": 0.0006, "warmup_epochs": 5,
    "start_warmup": 0, "wd": 1e-6, "freeze_prototypes_niters": 5005, "temperature": 0.1, "epsilon": 0.05,
    "sinkhorn_iterations": 3, "improve_numerical_stability": False,
}
RELEASED_UNMIX = {"unmix_prob": 0.5, "unmix_beta": 1.0, "unmix_loss_form": "released"}
# Every other pretraining flag, and why it is not compared with a released value: speed and precision choices;
# the kNN monitor; what the table itself distinguishes (method, data set, epochs) or every run may vary (seed);
# the queue (checked apart: the released length is shorter than a batch, so no queue is used); no effect on
# CIFAR (use_pil_blur); and src/runtime/cli.OPERATIONAL_FLAGS. A new flag that changes what is computed
# belongs in RELEASED_PRETRAINING or RELEASED_UNMIX (with its default in NEW_FLAG_DEFAULTS) instead.
NOT_IN_THE_RECIPE = frozenset({
    "amp_dtype", "augment", "channels_last", "compile", "cuda_graph", "use_fp16", "sync_bn",
    "syncbn_process_group_size", "knn_k", "knn_temperature", "run_swav", "data_path", "epochs", "seed",
    "queue_length", "epoch_queue_starts", "use_pil_blur"})
# The released linear evaluation (eval_linear.py's defaults, as the scripts run it); `num_labels` is the data set's.
RELEASED_LINEAR = {
    "arch": "resnet18", "width_per_group": 64, "probe": "released", "epochs": 100, "batch_size": 32, "world_size": 1,
    "lr": 0.3, "wd": 1e-6, "nesterov": False, "scheduler_type": "cosine", "final_lr": 0.0, "crop_size": 32,
    "global_pooling": True,
}
# Every other flag of eval_linear.py: the data (data_path; num_labels, compared with the data set's), the seed,
# speed choices (augment, crops_per_chunk), flags without effect in the protocol (use_bn with global pooling,
# decay_epochs and gamma with the cosine schedule), allow_mismatched_weights (the network is compared through
# arch and width_per_group) and src/runtime/cli.OPERATIONAL_FLAGS.
NOT_IN_THE_LINEAR_PROTOCOL = frozenset({"data_path", "num_labels", "seed", "augment", "crops_per_chunk", "use_bn",
                                        "decay_epochs", "gamma", "allow_mismatched_weights"})
NUM_LABELS = {"cifar10": 10, "cifar100": 100}
# The sizes of CIFAR-10's and CIFAR-100's splits, which the published runs used whole; runs record theirs in
# params.json (`data`), so a run on a part of the data set (the test fixture, a subset folder) is not compared.
FULL_SPLITS = {"train_images": 50000, "test_images": 10000}
# Flags newer than the released code: a params.json written before they existed ran with their default.
NEW_FLAG_DEFAULTS = {"width_per_group": 64, "unmix_loss_form": "released", "probe": "released"}


def _same(value, released):
    if isinstance(released, bool):
        return str(value).strip().lower() in ("on", "true", "1") if released else \
            str(value).strip().lower() in ("off", "false", "0")
    if isinstance(released, list):
        return isinstance(value, list) and len(value) == len(released) and all(map(_same, value, released))
    if isinstance(released, (int, float)):
        try:
            return math.isclose(float(value), released, rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return value == released


def _world_size(params):
    if params.get("world_size") not in (None, -1):
        return params["world_size"]
    return (params.get("provenance") or {}).get("world_size")


def differences(params, released):
    """The arguments of `params` (a params.json) that are not the released ones, as 'name value' strings
    ('name not recorded' for one missing)."""
    out = []
    for name, want in released.items():
        value = _world_size(params) if name == "world_size" else params.get(name, NEW_FLAG_DEFAULTS.get(name))
        if value is None:
            out.append(f"{name} not recorded")
        elif not _same(value, want):
            out.append(f"{name} {value}")
    return out


def data_differences(params):
    """'train_images 300 (of 50000)' for each split size recorded in params.json's `data` that is not the
    whole CIFAR split (nothing for a run that recorded none)."""
    data = params.get("data") if isinstance(params.get("data"), dict) else {}
    return [f"{name} {data[name]} (of {size})" for name, size in FULL_SPLITS.items()
            if name in data and data[name] != size]


def pretraining_differences(params, swav):
    """How a pretraining's arguments differ from the released recipe (first: a part of the data set; also: a
    queue in use, which the released settings leave at 0); `swav` for plain SwAV, whose runs ignore Un-Mix's
    arguments."""
    out = data_differences(params)
    out += differences(params, RELEASED_PRETRAINING if swav else {**RELEASED_PRETRAINING, **RELEASED_UNMIX})
    try:
        queue = int(params.get("queue_length", 0))
        queue -= queue % (int(params.get("batch_size", 1)) * int(_world_size(params) or 1))
    except (TypeError, ValueError):
        queue = None
    if queue:
        out.append(f"queue_length {params['queue_length']} (a queue in use)")
    return out


def linear_eval_differences(params, dataset):
    """How a linear evaluation's arguments differ from the released protocol on `dataset`."""
    released = {**RELEASED_LINEAR, "num_labels": NUM_LABELS.get(dataset, 0)}
    return data_differences(params) + differences(params, released)
