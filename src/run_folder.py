"""What a run folder holds, and which run may write there.

Each entry script writes its own kind of folder: pretraining (main_swav_unmix.py), linear evaluation
(eval_linear.py), semi-supervised fine-tuning (eval_semisup.py). `folder_kind` tells them apart by
`params.json` (in a folder of the released code, which has none, by its files), so that no run writes
into another kind's folder. An evaluation folder records the checkpoint it evaluates (`pretrained_file`
in its params.json: path, size, modification time and SHA-256 of `--pretrained`), and
`check_evaluation_folder` lets an evaluation resume there only from the same checkpoint with the same
arguments: the numbers it reports are never another model's.
"""
import glob
import os
import time

import pandas as pd

from .checkpoint import CheckpointError, file_sha256, prepare_dump_path
from .logger import changed_params, load_params_json, params_dict

PRETRAINING, LINEAR, FINE_TUNING = "pretraining", "linear evaluation", "semi-supervised fine-tuning"
# What an evaluation leaves besides its log: set aside together when the folder is reused for another one.
EVALUATION_FILES = ("checkpoint.pth.tar", "results.json", "params.json", "params.pkl", "labelled_subset.json",
                    "tensorboard")


def folder_kind(dump_path):
    """PRETRAINING, LINEAR, FINE_TUNING, or None for a new or unrecognised folder. ValueError (one line)
    when its params.json cannot be read."""
    params = load_params_json(dump_path)
    if params is not None:
        for key, kind in (("nmb_prototypes", PRETRAINING), ("labels_perc", FINE_TUNING), ("num_labels", LINEAR)):
            if key in params:
                return kind
        return None
    if os.path.isdir(os.path.join(dump_path, "checkpoints")) or glob.glob(os.path.join(dump_path, "queue*.pth")):
        return PRETRAINING  # the released pretraining folder (params.pkl, stats0.pkl, checkpoints/)
    if os.path.isfile(os.path.join(dump_path, "labelled_subset.json")):
        return FINE_TUNING
    stats = os.path.join(dump_path, "stats0.csv")
    if os.path.isfile(stats):
        try:
            columns = list(pd.read_csv(stats, nrows=0).columns)
        except Exception:  # an unreadable table says nothing about the folder
            return None
        return LINEAR if "prec1" in columns else PRETRAINING if "loss" in columns else None
    return None


def checkpoint_identity(path):
    """What an evaluation records of its `--pretrained` file (None for random weights)."""
    if not path:
        return None
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime": st.st_mtime, "sha256": file_sha256(path)}


def _describe(identity):
    if not identity:
        return "random weights"
    return f"{identity.get('path', '?')} (sha256 {str(identity.get('sha256'))[:12]})"


def check_evaluation_folder(dump_path, kind, params, identity, ignore, allow_changed):
    """May an evaluation of kind `kind`, of the checkpoint `identity` (see `checkpoint_identity`) with the
    arguments `params` (names in `ignore` not compared), use `dump_path`? Returns (problem, afresh):
    `problem` a one-line reason to stop, or None; `afresh` True when the folder holds an evaluation of
    another checkpoint or with other arguments and `allow_changed` is set: its files are then to be set
    aside (`set_aside`) and the evaluation starts from its first epoch."""
    try:
        found, old = folder_kind(dump_path), load_params_json(dump_path)
    except ValueError as e:
        return f"{e}; cannot tell what {dump_path} holds: use another --dump_path", False
    if found is not None and found != kind:
        return (f"{dump_path} holds a {found} run, not a {kind}: nothing was written there; use another "
                "--dump_path" + (f" (e.g. {dump_path.rstrip('/')}_linear_eval)" if found == PRETRAINING else "")), False
    results = [n for n in ("checkpoint.pth.tar", "results.json", "stats0.csv")
               if os.path.exists(os.path.join(dump_path, n))]
    if not results:  # nothing to resume or report: the folder is as good as new
        return None, False
    if old is None:
        differences = [f"{', '.join(results)} without params.json: of an unknown checkpoint"]
    else:
        old_identity = old.get("pretrained_file")
        same = (old_identity or {}).get("sha256") == (identity or {}).get("sha256") and bool(old_identity) == bool(identity)
        differences = [] if same else [f"it evaluated {_describe(old_identity)}, now {_describe(identity)}"]
        differences += changed_params(old, params, ignore)
    if not differences:
        return None, False
    if allow_changed:
        return None, True
    return (f"{dump_path} holds another evaluation ({'; '.join(differences)}); use another --dump_path, or "
            "--allow_changed_args true to evaluate afresh there (the other one is moved to replaced-<time>/)"), False


def set_aside(dump_path, names=EVALUATION_FILES):
    """Move the files `names` and the statistics tables of the folder's previous evaluation into
    `<dump_path>/replaced-<time>/` (nothing is deleted); returns that folder, or None when there was nothing."""
    found = [n for n in names if os.path.lexists(os.path.join(dump_path, n))]
    found += sorted(os.path.basename(p) for p in glob.glob(os.path.join(dump_path, "stats*.csv"))
                    + glob.glob(os.path.join(dump_path, "stats*.pkl")))
    if not found:
        return None
    target = os.path.join(dump_path, time.strftime("replaced-%Y%m%d-%H%M%S"))
    suffix = 0
    while os.path.exists(target + (f"-{suffix}" if suffix else "")):
        suffix += 1
    target += f"-{suffix}" if suffix else ""
    os.makedirs(target)
    for name in found:
        os.replace(os.path.join(dump_path, name), os.path.join(target, name))
    return target


def claim_evaluation_folder(args, kind, ignore):
    """Rank 0 of an evaluation: lock `args.dump_path` (`prepare_dump_path`), check it
    (`check_evaluation_folder`) and, when allowed, set a differing earlier evaluation aside. Returns
    (lock, identity of --pretrained, folder the earlier evaluation was moved to or None, None), or
    (None, None, None, a one-line problem). The caller records the identity with its params."""
    try:
        lock = prepare_dump_path(args.dump_path)
    except CheckpointError as e:
        return None, None, None, str(e)
    identity = checkpoint_identity(args.pretrained)
    problem, afresh = check_evaluation_folder(args.dump_path, kind, params_dict(args), identity, ignore,
                                              args.allow_changed_args)
    if problem is not None:
        lock.close()
        return None, None, None, problem
    return lock, identity, set_aside(args.dump_path) if afresh else None, None
