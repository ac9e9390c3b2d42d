"""Pretrained weights: read them from any checkpoint this project or the released code writes, tell
which network they belong to, and load them into one.

Accepted files (all read with `torch.load(weights_only=True)`): a pretraining checkpoint (ours or the
released one: the weights under `state_dict`, named `module.<name>`), a fine-tuning checkpoint of
`eval_semisup.py`, and a plain state dict such as `tools/export_backbone.py` writes. The `module.` prefix
is stripped. Errors are `PretrainedError` with a one-line message.
"""
import json
import os

import torch

from ..runtime.checkpoint import CheckpointError, safe_load, strip_module_prefix

# Blocks per stage and widening factor of each architecture of `src.resnet.ARCHS`, to recognise one from
# its weights (tests/test_pretrained.py checks this table against the constructors).
LAYOUTS = {
    "resnet18": ([2, 2, 2, 2], 1),
    "resnet50": ([3, 4, 6, 3], 1),
    "resnet50w2": ([3, 4, 6, 3], 2),
    "resnet50w4": ([3, 4, 6, 3], 4),
    "resnet50w5": ([3, 4, 6, 3], 5),
}

# Parameters outside the backbone: the projection head (or a fine-tuning classifier) and the prototypes.
HEAD_PREFIXES = ("projection_head.", "prototypes")


class PretrainedError(ValueError):
    """Weights that cannot be used; the message is one line."""


def not_a_file(path, otherwise=""):
    """Why `path` (no file) cannot be read, in words for `--pretrained`: a run folder given instead of its
    checkpoint is named as such, with the checkpoint it holds; `otherwise` ends the words when there is no
    checkpoint to name."""
    checkpoint = os.path.join(path, "checkpoint.pth.tar")
    if not os.path.isdir(path):
        return f"{path}: no such file{otherwise}"
    if os.path.isfile(checkpoint):
        return f"{path} is a folder, not a checkpoint file: pass {checkpoint}"
    return f"{path} is a folder, not a checkpoint file, and holds no checkpoint.pth.tar{otherwise}"


def read_state_dict(path):
    """`(state_dict, info)` from the file at `path`: tensors by name without the `module.` prefix, and
    `info` = {"arch", "epoch"} as recorded in the checkpoint (None when it does not say)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedError(not_a_file(path))
    try:
        ckpt = safe_load(path)  # NumPy scalars allowed (the released optimizer's learning rates)
    except CheckpointError as e:
        raise PretrainedError(str(e)) from None
    info = {"arch": None, "epoch": None}
    state = ckpt
    if isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict):
        state = ckpt["state_dict"]
        info = {"arch": ckpt.get("arch"), "epoch": ckpt.get("epoch")}
    if not isinstance(state, dict) or not state or not all(torch.is_tensor(v) for v in state.values()):
        raise PretrainedError(f"{path}: holds no state dict (a dict of tensors, or one under 'state_dict')")
    return strip_module_prefix(state), info


def epochs_done(epoch):
    """A checkpoint's `epoch` entry (the number of epochs done) in the logs' words, which count epochs from 0:
    'after 2 epochs (epochs 0-1)'."""
    if epoch is None:
        return "after an unrecorded number of epochs"
    try:
        n = int(epoch)
    except (TypeError, ValueError):  # a foreign checkpoint's entry: said as it is (a log line, not a traceback)
        return f"with the epoch entry {epoch!r}"
    if n <= 0:
        return "before the end of epoch 0"
    return f"after {n} epoch{'s' if n > 1 else ''} ({'epoch 0' if n == 1 else f'epochs 0-{n - 1}'})"


def loaded_line(path, epoch, kept):
    """The evaluations' log line for the weights of `path` loaded (its `epoch` entry, `kept` tensors of the
    network left as initialised, each named on a line above), so that the log of an evaluation says which of a
    run's checkpoints it read."""
    return f"Loaded pretrained weights from {path}, {epochs_done(epoch)}; {kept} tensors kept as initialised " \
           "(listed above)"


def _blocks(state, stage):
    return len({k.split(".")[1] for k in state if k.startswith(f"layer{stage}.")})


def _fits(state):
    """[(arch, width_per_group), ...]: the architectures of LAYOUTS whose layout fits the weights `state`."""
    try:
        stem = state["conv1.weight"].shape[0]
        first = state["layer1.0.conv1.weight"].shape[0]
    except KeyError:
        what = ": a linear classifier alone (eval_linear.py's checkpoint): pass the pretraining checkpoint it " \
               "evaluated" if {k.split(".")[0] for k in state} == {"linear"} else ""
        raise PretrainedError(f"no ResNet backbone in these weights (no conv1.weight / layer1.0.conv1.weight){what}") \
            from None
    blocks = [_blocks(state, s) for s in range(1, 5)]
    fits = []
    for arch, (layout, widen) in LAYOUTS.items():
        if layout != blocks or stem % widen:
            continue
        width = stem // widen
        if int(width * widen * (width / 64.0)) == first:  # Bottleneck width of layer1 (src.resnet)
            fits.append((arch, width))
    return fits


def infer_arch(state, named=None):
    """`(arch, width_per_group)` of the backbone whose weights are in `state`; PretrainedError when no
    architecture of LAYOUTS fits, or several do and none of them is `named` (e.g. the checkpoint's `arch`)."""
    fits = _fits(state)
    if len(fits) > 1:
        fits = [f for f in fits if f[0] == named] or fits
    if len(fits) != 1:
        blocks = [_blocks(state, s) for s in range(1, 5)]
        what = "no architecture" if not fits else "several architectures (" + ", ".join(a for a, _ in fits) + ")"
        raise PretrainedError(f"{what} of {', '.join(LAYOUTS)} fits these weights "
                              f"(stages of {blocks} blocks, stem width {state['conv1.weight'].shape[0]})")
    return fits[0]


def head_config(state):
    """The `hidden_mlp`, `output_dim` and `nmb_prototypes` keywords of the network that wrote `state`
    (those it has: a backbone alone gives {})."""
    out = {}
    if "projection_head.0.weight" in state and "projection_head.3.weight" in state:
        out["hidden_mlp"] = state["projection_head.0.weight"].shape[0]
        out["output_dim"] = state["projection_head.3.weight"].shape[0]
    elif "projection_head.weight" in state:
        out["hidden_mlp"] = 0
        out["output_dim"] = state["projection_head.weight"].shape[0]
    if "prototypes.weight" in state:
        out["nmb_prototypes"] = state["prototypes.weight"].shape[0]
    else:
        heads = sorted((int(k[len("prototypes.prototypes"):].split(".")[0]), v.shape[0])
                       for k, v in state.items() if k.startswith("prototypes.prototypes"))
        if heads:
            out["nmb_prototypes"] = [n for _, n in heads]
    return out


# Entries of a run's params.json that name the network it trained, by the keyword of `build_model` each sets.
RECORDED = {"arch": "arch", "width_per_group": "width_per_group", "hidden_mlp": "hidden_mlp",
            "feat_dim": "output_dim", "nmb_prototypes": "nmb_prototypes"}


def params_beside(path):
    """(path, dict) of the params.json of the run that wrote the checkpoint at `path` (in its folder, or
    above it for an epoch copy in `checkpoints/`); (None, {}) when there is none or it is unreadable."""
    folder = os.path.dirname(os.path.abspath(path))
    for candidate in (folder, os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None):
        params = os.path.join(candidate, "params.json") if candidate else None
        if params and os.path.isfile(params):
            try:
                with open(params) as f:
                    out = json.load(f)
            except (OSError, ValueError):
                return None, {}
            return (params, out) if isinstance(out, dict) else (None, {})
    return None, {}


def network_config(path, state, info):
    """The `build_model` keywords of the network whose weights `state` the checkpoint at `path` holds
    (`info` from `read_state_dict`): `arch` and `width_per_group` from the weights, and `hidden_mlp`,
    `output_dim` (pretraining's --feat_dim) and `nmb_prototypes` where they have a projection head and
    prototypes. The checkpoint's own `arch` entry and the params.json of its run (`params_beside`) settle an
    architecture the weights leave open, and must agree with them: PretrainedError (one line) otherwise."""
    params_path, params = params_beside(path)
    try:
        arch, width = infer_arch(state, named=info.get("arch") or params.get("arch"))
    except PretrainedError as e:
        raise PretrainedError(f"{path}: {e}") from None
    config = {"arch": arch, "width_per_group": width, **head_config(state)}
    records = [(f"{path} (its 'arch' entry)", {"arch": info.get("arch")})]
    records.append((params_path, {RECORDED[k]: v for k, v in params.items() if k in RECORDED}))
    for where, recorded in records:
        for key, value in recorded.items():
            if value is not None and key in config and not isinstance(config[key], list) and value != config[key]:
                raise PretrainedError(f"{where} records {key} {value!r} but the weights in {path} are of "
                                      f"{key} {config[key]!r}: that record is of another network")
    return config


def describe(state):
    """'resnet18 at width 64' for weights whose architecture can be told, else 'unknown architecture'."""
    try:
        arch, width = infer_arch(state)
        return f"{arch} at width {width}"
    except PretrainedError:
        return "an unknown architecture"


def load_weights(model, state, optional=HEAD_PREFIXES, allow_mismatch=False):
    """Copy the tensors of `state` into `model` by name.

    Every parameter and buffer of `model` must be in `state` with the same shape, except those whose name
    starts with one of `optional` (a missing or mis-shaped one keeps its initial value); with
    `allow_mismatch` nothing is required (the released code's leniency). Returns the list of notes on what
    was not loaded (for the log); raises PretrainedError when a required tensor is missing or mis-shaped."""
    notes, problems, usable = [], [], {}
    for name, value in model.state_dict().items():
        if name not in state:
            why = f'key "{name}" could not be found in provided state dict'
        elif state[name].shape != value.shape:
            why = f'key "{name}" is of different shape in model and provided state dict'
        else:
            usable[name] = state[name]
            continue
        (notes if name.startswith(tuple(optional)) or allow_mismatch else problems).append(why)
    if problems:
        raise PretrainedError(f"the weights ({describe(state)}) do not fit this network: {len(problems)} tensors "
                              f"missing or mis-shaped, first: {problems[0]}")
    model.load_state_dict(usable, strict=False)
    return notes
