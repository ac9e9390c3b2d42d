"""Checkpoints that survive kills and disks: atomic saves, safe loads, RNG state, resume discovery, and
the lock that keeps one run per folder.

A kill at any instant leaves either the previous or the new file, never a torn one (`atomic_write` of
src/runtime/files.py: temporary file in the same folder, flush + fsync, rename, fsync of the folder).
Everything is loaded with `torch.load(weights_only=True)`: tensors, numbers, strings, lists and dicts
only (plus NumPy float64 scalars, which the released code's optimizer state holds), so a downloaded or
tampered file cannot run code; and the CRC-32 that a checkpoint's zip archive keeps of every record is
checked first, so that flipped bits inside a tensor are found instead of trained on.
"""
import glob
import os
import random
import re
import zipfile

import numpy as np
import torch

from .cli import error_line
from .files import atomic_write


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message is one line."""


def atomic_save(obj, path):
    """torch.save `obj` to `path` so that readers see the old file or the complete new one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def numpy_scalar_globals():
    """What a weights_only load needs beyond tensors for the released checkpoints: their optimizer's
    `lr` is a NumPy float64 (set from a NumPy learning-rate schedule). Its pickle names the scalar
    constructor (`numpy.core.multiarray.scalar` when written with NumPy 1, `numpy._core...` with NumPy 2),
    `numpy.dtype` and the float64 dtype's class; nothing else is allowed."""
    try:
        from numpy._core.multiarray import scalar  # NumPy >= 2
    except ImportError:
        from numpy.core.multiarray import scalar
    return [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
            np.dtype, type(np.dtype(np.float64))]


def verify_records(path):
    """Recompute the CRC-32 that torch's zip format keeps of every record (the pickle and each tensor's
    bytes); CheckpointError naming the first record that fails. Files in the legacy format (torch < 1.6,
    e.g. the released checkpoints) carry no checksum and pass, as do archives written with torch's CRC-32
    switched off (every stored checksum 0)."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not any(info.CRC for info in archive.infolist() if info.file_size):
                return
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError):
        return  # not a complete zip archive: torch.load says what it is
    if bad is not None:
        raise CheckpointError(f"{path}: record {bad} fails its CRC-32 check (the file is corrupted)")


def safe_load(path, map_location="cpu"):
    """torch.load with weights_only=True (and NumPy float64 scalars allowed, `numpy_scalar_globals`), after
    checking the records' CRC-32 (`verify_records`); any failure becomes a one-line CheckpointError."""
    verify_records(path)
    try:
        with torch.serialization.safe_globals(numpy_scalar_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except Exception as e:  # truncated zip, garbage, pickled code refused by weights_only, ...
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({load_error(e)})") from None


def load_error(e):
    """torch.load's exception in one line (`error_line`). weights_only's refusals keep only what was refused
    (their text is mostly advice to load the file unsafely, which is not ours to give)."""
    text = str(e).strip()
    if "Weights only load failed" in text and "WeightsUnpickler error:" in text:
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[1].split())
        return f"refused by weights_only: {detail.split('. Please', 1)[0].split(' Check the documentation')[0]}"
    return error_line(e)


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
            if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict) or "epoch" not in ckpt:
                raise CheckpointError(f"{path}: not a training checkpoint (no 'state_dict'/'epoch')")
        except CheckpointError as e:
            log(f"unreadable checkpoint, skipped: {e}")
            errors.append(str(e))
            continue
        if path != main:
            why = "is unreadable" if os.path.exists(main) else "is missing"
            log(f"resuming from the epoch copy {path} because {main} {why}")
        return path, ckpt
    raise CheckpointError(f"no readable checkpoint in {dump_path} ({len(errors)} tried; first: {errors[0]}); "
                          "move the folder away to start afresh")


def save_checkpoint(dump_path, epoch, iteration, net, optimizer, np_rng, arch, scaler=None, queue=None,
                    rank=0, world_size=1, loop=None, copy_path=None, device="cpu", writer=None, elapsed=None):
    """The released checkpoint (`epoch`, `state_dict` with the `module.` prefix, `optimizer`, `amp`) plus
    what an exact restart needs: `iteration` (0 = epoch boundary), every RNG stream, every rank's queue
    ("queues": None without one) and every rank's mid-epoch `loop` state ("loops"; "loop" is rank 0's),
    and `elapsed`, the run's training seconds up to this checkpoint (where a resumed run's clock goes on).
    Collective with several processes (`device`: where this rank's collectives run).

    Rank 0 writes `checkpoint.pth.tar`, and first the epoch copy `copy_path` if asked, so a kill between
    the two never leaves an epoch without its copy; each rank also writes its `queue{rank}.pth` (released).
    `writer`: a src.runtime.async_save.BackgroundWriter that writes the files from a host snapshot in the
    background (same files); None writes them here."""
    jobs = []
    queues = None
    if queue is not None:  # every rank's queue goes into rank 0's single atomic file
        if world_size > 1:
            queues = [torch.zeros_like(queue) for _ in range(world_size)]
            torch.distributed.all_gather(queues, queue)
        else:
            queues = [queue]
        jobs.append(({"queue": queue}, os.path.join(dump_path, f"queue{rank}.pth")))
    loops = None if loop is None else gather_loop_states(loop, world_size, device)
    if rank == 0:
        save_dict = {"epoch": epoch, "iteration": iteration,
                     # clone: the buffers may be views into one flat tensor (see BufferGuard)
                     "state_dict": {"module." + k: v.clone() for k, v in net.state_dict().items()},
                     "optimizer": optimizer.state_dict(), "rng": rng_state(np_rng), "arch": arch,
                     "queues": None if queues is None else [q.cpu() for q in queues]}
        if scaler is not None:
            save_dict["amp"] = scaler.state_dict()
        if loops is not None:
            save_dict["loop"], save_dict["loops"] = loops[0], loops
        if elapsed is not None:
            save_dict["elapsed"] = float(elapsed)
        if copy_path is not None:
            jobs.append((save_dict, copy_path))
        jobs.append((save_dict, os.path.join(dump_path, "checkpoint.pth.tar")))
    if writer is not None:
        writer.submit(jobs)
    else:
        for obj, path in jobs:
            atomic_save(obj, path)
    if world_size > 1:
        torch.distributed.barrier()


def gather_loop_states(loop, world_size, device="cpu"):
    """Every rank's mid-epoch state `{"loss_sum": 0-d float32 tensor, "loss_count": int, "queue_in_use":
    bool}`, in rank order (collective with several processes): each rank resumes its own running loss."""
    if world_size <= 1:
        return [loop]
    mine = torch.tensor([float(loop["loss_sum"]), loop["loss_count"], float(loop["queue_in_use"])],
                        dtype=torch.float64, device=device)  # float64 holds the float32 sum exactly
    every = [torch.empty_like(mine) for _ in range(world_size)]
    torch.distributed.all_gather(every, mine)
    return [{"loss_sum": torch.tensor(float(t[0]), dtype=torch.float32), "loss_count": int(t[1]),
             "queue_in_use": bool(t[2])} for t in (x.cpu() for x in every)]


class Restart:
    """What a resumed run continues from (see `restart_from_checkpoint`); `rank` picks its own mid-epoch
    state. CheckpointError for fields that make no sense (a negative epoch or iteration)."""

    def __init__(self, path, ckpt, rank=0):
        self.path = path
        try:
            self.epoch, self.iteration = int(ckpt["epoch"]), int(ckpt.get("iteration", 0))
        except (TypeError, ValueError):
            raise CheckpointError(f"{path}: epoch {ckpt['epoch']!r} / iteration {ckpt.get('iteration')!r} "
                                  "are not whole numbers") from None
        if self.epoch < 0 or self.iteration < 0:
            raise CheckpointError(f"{path}: epoch {self.epoch} / iteration {self.iteration} cannot be negative "
                                  "(a damaged or foreign checkpoint)")
        self.torch_rng = ckpt["rng"]["torch"] if "rng" in ckpt else None
        self.has_queues = "queues" in ckpt  # our checkpoints say so even when there was no queue
        self.queues = ckpt.get("queues")
        loops = ckpt.get("loops")
        own = loops[rank] if isinstance(loops, list) and rank < len(loops) else ckpt.get("loop")
        self.loop = own if self.iteration > 0 else None
        elapsed = ckpt.get("elapsed")  # None in released checkpoints and older ones of ours
        self.elapsed = float(elapsed) if isinstance(elapsed, (int, float)) else None

    def method_state(self, dump_path, rank, world_size):
        """The method's state for `UnmixSwAV.load_state_dict`: this rank's queue from the checkpoint, or
        from the released `queue{rank}.pth` for a released checkpoint (the queue lived only there) or one
        of another world size. Our checkpoints hold the queue ("queues": None when there was none), so a
        queue{rank}.pth written after them (a kill before the checkpoint) is newer than it and not used."""
        if self.queues is not None and len(self.queues) == world_size:
            return {"queue": self.queues[rank]}
        path = os.path.join(dump_path, f"queue{rank}.pth")
        if (self.queues is None and self.has_queues) or not os.path.isfile(path):
            return {"queue": None}
        try:
            return {"queue": safe_load(path)["queue"], "released": True}
        except (CheckpointError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{path}: cannot restore the queue ({e})") from None


def check_optimizer_state(optimizer, path):
    """Every momentum buffer has its parameter's shape (optimizer.load_state_dict does not check)."""
    for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"]):
        buf = optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None and (not isinstance(buf, torch.Tensor) or buf.shape != p.shape):
            shape = tuple(buf.shape) if isinstance(buf, torch.Tensor) else type(buf).__name__
            raise CheckpointError(f"{path}: the optimizer's momentum buffer {i} is {shape}, its parameter "
                                  f"{tuple(p.shape)} (a damaged checkpoint, or one of another model)")


def restart_from_checkpoint(dump_path, net, optimizer, scaler=None, np_rng=None, what="the model", log=print,
                            rank=0):
    """Load the run's checkpoint into `net`, `optimizer` (keeping its own implementation choice, e.g. the
    fused kernel), `scaler` and the RNG streams (like swav's `restart_from_checkpoint`). Returns a
    `Restart`, or None for a fresh run; a checkpoint that does not fit raises a one-line CheckpointError.
    `what` names the model in that message (e.g. "--arch resnet18")."""
    path, ckpt = find_resume_checkpoint(dump_path, log=log)
    if ckpt is None:
        return None
    try:
        missing = net.load_state_dict(strip_module_prefix(ckpt["state_dict"]), strict=False)
        if missing.missing_keys or missing.unexpected_keys:
            raise CheckpointError(f"{path} does not fit {what} (missing {missing.missing_keys[:3]}, "
                                  f"unexpected {missing.unexpected_keys[:3]})")
        impl = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, flags in zip(optimizer.param_groups, impl):
            group.update(flags)
        check_optimizer_state(optimizer, path)
        if scaler is not None and isinstance(ckpt.get("amp"), dict) and "scale" in ckpt["amp"]:
            scaler.load_state_dict(ckpt["amp"])
        elif scaler is not None and ckpt.get("amp"):  # a released checkpoint: apex's loss-scaler state
            log("apex loss-scaler state in the checkpoint not used: the GradScaler starts afresh")
        restart = Restart(path, ckpt, rank)
        if "rng" in ckpt and np_rng is not None:
            set_rng_state(ckpt["rng"], np_rng)
    except (KeyError, RuntimeError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{path} cannot be resumed with these arguments ({error_line(e)}); "
                              "check --arch/--width_per_group/--hidden_mlp/--feat_dim/--nmb_prototypes, "
                              "or use another --dump_path") from None
    return restart
