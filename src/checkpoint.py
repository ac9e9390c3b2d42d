"""Checkpoints that survive kills and disks: atomic writes, safe loads, RNG state, resume discovery.

A kill at any instant leaves either the previous or the new file, never a torn one (temporary file in
the same folder, flush + fsync, rename, fsync of the folder). Everything is loaded with
`torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts only, so a downloaded or
tampered file cannot run code, and nothing in a run folder is ever unpickled.
"""
import glob
import os
import random
import re
import tempfile

import numpy as np
import torch


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line."""


def atomic_save(obj, path):
    """torch.save `obj` to `path` so that readers see the old file or the complete new one."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def safe_load(path, map_location="cpu"):
    """torch.load with weights_only=True; any failure becomes a one-line CheckpointError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # truncated zip, garbage, pickled code refused by weights_only, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(e).__name__}: {first[:200]})") from None


def strip_module_prefix(state_dict):
    """Released checkpoints name weights `module.<name>` (DistributedDataParallel)."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}


def rng_state(np_rng):
    """Every random stream a run draws from, in a weights_only-loadable form."""
    name, keys, pos, has_gauss, cached = np_rng.get_state()
    version, py_state, gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(py_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, np_rng):
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np_rng.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                      n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def epoch_copies(dump_path):
    """`checkpoints/ckp-{epoch}.pth` files, newest epoch first."""
    found = []
    for p in glob.glob(os.path.join(dump_path, "checkpoints", "ckp-*.pth")):
        m = re.fullmatch(r"ckp-(\d+)\.pth", os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found, reverse=True)]


def find_resume_checkpoint(dump_path, log=print):
    """(path, checkpoint dict) to resume from, or (None, None) for a fresh run.

    `checkpoint.pth.tar` first; if it cannot be read, say so in one line and fall back to the newest
    readable epoch copy; if there is a checkpoint but none is readable, raise CheckpointError, never
    start from scratch over it."""
    main = os.path.join(dump_path, "checkpoint.pth.tar")
    candidates = ([main] if os.path.exists(main) else []) + epoch_copies(dump_path)
    if not candidates:
        return None, None
    errors = []
    for path in candidates:
        try:
            ckpt = safe_load(path)
            if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "epoch" not in ckpt:
                raise CheckpointError(f"{path}: not a training checkpoint (no 'state_dict'/'epoch')")
        except CheckpointError as e:
            log(f"unreadable checkpoint, skipped: {e}")
            errors.append(str(e))
            continue
        if path != main and os.path.exists(main):
            log(f"resuming from the epoch copy {path} because {main} is unreadable")
        return path, ckpt
    raise CheckpointError(f"no readable checkpoint in {dump_path} ({len(errors)} tried; first: {errors[0]}); "
                          "move the folder away to start afresh")
