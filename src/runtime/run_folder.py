"""What a run folder holds, and which run may write there.

Each entry script writes its own kind of folder: pretraining (main_swav_unmix.py), linear evaluation
(eval_linear.py), semi-supervised fine-tuning (eval_semisup.py). `folder_kind` tells them apart by
`params.json` (in a folder of the released code, which has none, by its files), so that no run writes
into another kind's folder. An evaluation folder records the checkpoint it evaluates (`pretrained_file`
in its params.json: path, size, modification time and SHA-256 of `--pretrained`), and
`check_evaluation_folder` lets an evaluation resume there only from the same checkpoint with the same
arguments: the numbers it reports are never another model's. A pretraining resumes its folder only with the same
arguments (`check_pretraining_folder`). `OPERATIONAL_FLAGS` (src/runtime/cli.py) names the arguments that
these comparisons, and tools/results.py when it groups seeds, leave out.
"""
import errno
import fcntl
import glob
import json
import os
import pickle
import socket
import time

import pandas as pd

from .checkpoint import CheckpointError
from .files import atomic_write, file_sha256, remove_stale_temporaries, write_json
from .logs import provenance
from .refused_start import StartUndo

LOCK_FILE = "run.lock"


# Files a run writes in its folder: something else in their place (a folder, say) stops the run at start.
RUN_FILES = ("checkpoint.pth.tar", "params.json", "params.pkl", "stats0.csv", "stats0.pkl", "results.json",
             "train.log")


def lock_run_folder(dump_path, wait_for_dead_holder_s=10.0, on_locked=None):
    """Take an exclusive `flock` on `<dump_path>/run.lock` and hold it for the life of this process (the
    returned file object; it is released when the process ends, however it ends), so that two runs never
    write one folder. The file names the holder (host, pid). CheckpointError (one line) when another run
    holds it. A holder on this host that has died (its DataLoader workers may hold the lock a few seconds
    longer) is waited for up to `wait_for_dead_holder_s`. On a file system without locks: a warning, no lock.
    `on_locked()` runs once the lock is taken, before the file names its new holder."""
    path = os.path.join(dump_path, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise CheckpointError(f"--dump_path {dump_path!r} is not writable ({e.strerror})") from None
    lock = os.fdopen(fd, "r+")
    deadline = time.time() + wait_for_dead_holder_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read(200).split()
            if _holder_is_dead(holder) and time.time() < deadline:
                time.sleep(0.2)
                continue
            lock.close()
            who = f"process {holder[1]} on {holder[0]}" if len(holder) == 2 else "another process"
            raise CheckpointError(f"{dump_path} is in use by another run ({who} holds {path}); wait for it to "
                                  "end, or use another --dump_path") from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            print(f"warning: cannot lock {path} ({e.strerror}): nothing keeps another run out of this folder",
                  flush=True)
            return lock
    if on_locked is not None:
        on_locked()
    lock.seek(0)
    lock.truncate()
    lock.write(f"{socket.gethostname()} {os.getpid()}\n")
    lock.flush()
    return lock


def _holder_is_dead(holder):
    """`holder` = [host, pid] from a lock file: True when that process is on this host and has ended."""
    if len(holder) != 2 or holder[0] != socket.gethostname() or not holder[1].isdigit():
        return False
    try:
        os.kill(int(holder[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def prepare_dump_path(dump_path, *subfolders, undo=None):
    """Create the run folder, lock it (`lock_run_folder`), prove it writable, check that the run's files
    are files, and remove the temporaries of atomic writes that a kill interrupted, there and in the
    existing `subfolders` (only now: under the lock, no other run is writing them). Call on rank 0 before
    any process of the run writes; returns the lock, to be kept for the life of the run. CheckpointError
    (one line) otherwise. With `undo` (a `StartUndo` made before), the folder is recorded under the lock and
    a refusal here leaves it as it was."""
    if os.path.exists(dump_path) and not os.path.isdir(dump_path):
        raise CheckpointError(f"--dump_path {dump_path!r} is a file, not a folder")
    try:
        os.makedirs(dump_path, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"--dump_path {dump_path!r} is not writable ({e.strerror})") from None
    lock = lock_run_folder(dump_path, on_locked=undo.note_folder if undo else None)
    if undo is not None:
        undo.hold(lock)
    let_go = undo.undo if undo is not None else lock.close
    try:
        probe = os.path.join(dump_path, f".write_test.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        let_go()
        raise CheckpointError(f"--dump_path {dump_path!r} is not writable ({e.strerror})") from None
    for name in RUN_FILES:
        path = os.path.join(dump_path, name)
        if os.path.lexists(path) and not os.path.isfile(path):
            let_go()
            raise CheckpointError(f"{path} is not a regular file (a folder?); move it away")
    remove_stale_temporaries(dump_path, *(os.path.join(dump_path, s) for s in subfolders
                                          if os.path.isdir(os.path.join(dump_path, s))))
    return lock


def save_params(args, dump_path, extra=None):
    """`params.pkl` (released) and `params.json` (readable, compared on resume), each replaced atomically.
    `params.json` also records the run's `provenance` (code version, libraries, device, world size) and
    the entries of `extra` (e.g. the checkpoint an evaluation evaluates)."""
    atomic_write(os.path.join(dump_path, "params.pkl"), lambda f: pickle.dump(args, f))
    params = dict(params_dict(args), provenance=provenance(getattr(args, "device", "cpu"),
                                                          getattr(args, "world_size", 1)), **(extra or {}))
    write_json(os.path.join(dump_path, "params.json"), params, indent=1, sort_keys=True)


def params_dict(args):
    out = {}
    for k, v in vars(args).items():
        if isinstance(v, (int, float, str, bool, type(None))):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (int, float, str, bool)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def load_params_json(dump_path):
    """The arguments of the run in `dump_path` (dict), None when there is none; ValueError (one line) when
    `params.json` cannot be read."""
    path = os.path.join(dump_path, "params.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            out = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is unreadable ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} is unreadable (not a JSON object)")
    return out


def changed_params(old, new, ignore=()):
    """`["name: old -> new", ...]` for the arguments whose values differ between the `params.json` dict
    `old` and the dict `new` (names in `ignore`, or present in only one of them, are not compared;
    tuples equal lists, and numbers are compared as numbers)."""
    diffs = []
    for k in sorted(set(old) & set(new) - set(ignore)):
        a, b = old[k], list(new[k]) if isinstance(new[k], tuple) else new[k]
        same_number = (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b))
        if a != b and not same_number:
            diffs.append(f"{k}: {a!r} -> {b!r}")
    return diffs


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


def _another_kind(dump_path, found, kind, labels_perc=None):
    """The one-line problem of a folder that holds a `found` run (`folder_kind`) when a `kind` run was to use
    it; None when it is new or of that kind."""
    if found is None or found == kind:
        return None
    suffix = {LINEAR: "_linear_eval", FINE_TUNING: f"_semisup_{labels_perc}pct"}.get(kind)  # the SBATCH scripts' names
    hint = f" (e.g. {dump_path.rstrip('/')}{suffix})" if found == PRETRAINING and suffix else ""
    return f"{dump_path} holds a {found} run, not a {kind}: nothing was written there; use another --dump_path{hint}"


def check_pretraining_folder(dump_path, params, ignore, allow_changed):
    """May a pretraining with the arguments `params` (names in `ignore` not compared) use `dump_path`: is it
    new, or does it hold this very run? A one-line problem, else None. With `allow_changed`, a pretraining
    with other arguments, or whose params.json is unreadable, is resumed anyway."""
    try:
        found, old = folder_kind(dump_path), load_params_json(dump_path)
    except ValueError as e:
        if allow_changed:
            return None
        return (f"{e}; cannot check that {dump_path} holds a run with these arguments; "
                "use --allow_changed_args true to resume it anyway")
    problem = _another_kind(dump_path, found, PRETRAINING)
    if problem is not None:
        return problem
    differences = changed_params(old or {}, params, ignore)
    if differences and not allow_changed:
        return (f"{dump_path} holds a run with other arguments ({'; '.join(differences)}); "
                "use another --dump_path, or --allow_changed_args true to resume it anyway")
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
    problem = _another_kind(dump_path, found, kind, params.get("labels_perc"))
    if problem is not None:
        return problem, False
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


def _claim(dump_path, check, *subfolders):
    """Lock `dump_path` (`prepare_dump_path`), then `check()` -> (a one-line problem or None, what it found)
    under the lock. Returns (lock, what it found, None, the folder's `StartUndo`), or (None, None, the problem,
    None) with the folder as it was and the lock released. Until the run writes its params.json, the process's
    end puts the folder back as it was (src/runtime/refused_start.py)."""
    undo = StartUndo(dump_path, LOCK_FILE)
    try:
        lock = prepare_dump_path(dump_path, *subfolders, undo=undo)
    except CheckpointError as e:
        return None, None, str(e), None
    problem, found = check()
    if problem is not None:
        undo.undo()
        return None, None, problem, None
    return lock, found, None, undo


def claim_pretraining_folder(args, ignore, start=None):
    """Rank 0 of a pretraining: lock `args.dump_path` (a second run on it stops before touching a file), check
    that it is new or holds this very run (`check_pretraining_folder`), and create its checkpoints/.
    Returns (lock, None), or (None, a one-line problem). `start` (src/runtime/startup.py, `StartVote`) gets the
    claim's `StartUndo`, for a start that ends because another process was lost."""
    def check():
        problem = check_pretraining_folder(args.dump_path, params_dict(args), ignore, args.allow_changed_args)
        if problem is None:
            try:
                os.makedirs(os.path.join(args.dump_path, "checkpoints"), exist_ok=True)
            except OSError as e:
                problem = f"--dump_path {args.dump_path!r} is not writable ({e.strerror})"
        return problem, None

    lock, _, problem, undo = _claim(args.dump_path, check, "checkpoints")
    if start is not None and undo is not None:
        start.undo_if_lost(undo)
    return lock, problem


def claim_evaluation_folder(args, kind, ignore, start=None):
    """Rank 0 of an evaluation: lock `args.dump_path` (`prepare_dump_path`), check it
    (`check_evaluation_folder`) and, when allowed, set a differing earlier evaluation aside. Returns
    (lock, identity of --pretrained, folder the earlier evaluation was moved to or None, None), or
    (None, None, None, a one-line problem). The caller records the identity with its params. `start`: as for
    `claim_pretraining_folder`."""
    identity = checkpoint_identity(args.pretrained)
    lock, afresh, problem, undo = _claim(args.dump_path, lambda: check_evaluation_folder(
        args.dump_path, kind, params_dict(args), identity, ignore, args.allow_changed_args))
    if problem is not None:
        return None, None, None, problem
    moved = set_aside(args.dump_path) if afresh else None
    undo.set_aside_into(moved)  # moved back should the start stop before the evaluation starts
    if start is not None:
        start.undo_if_lost(undo)
    return lock, identity, moved, None
