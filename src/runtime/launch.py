"""Rank, world size, device and rendezvous from torchrun, Slurm or ``--dist_url``; preemption signals.

Where the values come from, first match wins (``resolve_dist_env``, a pure function of its arguments):

1. **torchrun / launcher variables**: ``RANK`` and ``WORLD_SIZE`` (both or neither), ``LOCAL_RANK``
   (else the ``--local_rank``/``--local-rank`` argument that ``python -m torch.distributed.launch``
   passes), rendezvous ``env://`` through ``MASTER_ADDR``/``MASTER_PORT`` (an explicit ``tcp://`` or
   ``file://`` ``--dist_url`` is used instead when those two are missing).
2. **Slurm task variables** (a task started by ``srun``): ``SLURM_PROCID`` -> rank, ``SLURM_NTASKS``
   (or ``SLURM_NPROCS``) -> world size, ``SLURM_LOCALID`` -> local rank. Rendezvous
   ``tcp://<master>:<port>``: master = ``MASTER_ADDR`` if exported, else the first host of
   ``SLURM_STEP_NODELIST`` / ``SLURM_JOB_NODELIST`` / ``SLURM_NODELIST`` (Slurm's compressed host-list
   syntax expanded, see ``expand_hostlist``); port = the port of a ``tcp://host:port`` ``--dist_url``
   (its host is ignored: ``tcp://localhost`` cannot join several nodes), else ``MASTER_PORT``, else
   ``10000 + SLURM_JOB_ID % 20000`` (the same on every node of the job, different for most jobs that
   share a node). The released world size (``SLURM_NNODES`` times the first character of
   ``SLURM_TASKS_PER_NODE``) is wrong from 10 tasks per node; ``SLURM_NTASKS`` is the right number.
3. **``--dist_url``** ``tcp://host:port`` or ``file:///path`` with ``--world_size``/``--rank``
   (local rank from ``LOCAL_RANK`` or ``--local_rank``).
4. Otherwise (``env://`` without the variables and ``--world_size`` <= 1): **one process**.

A Slurm batch script itself also carries ``SLURM_PROCID=0`` and ``SLURM_NTASKS=N`` but is not one of the N
tasks (no ``SLURM_STEP_ID``): python started there directly in an N-task job is refused (start it with
``srun``) instead of waiting forever for N-1 peers. A one-task job is a plain single process.

Bad or missing values raise ``DistError`` with a one-line message.
"""
import datetime
import os
import re
from dataclasses import dataclass
from typing import List, Mapping, Optional

import torch
import torch.distributed as dist

from .devices import driver_versions, needs_gpu, no_gpu_message
from . import rendezvous

DEFAULT_TIMEOUT_S = 300  # rendezvous and collective timeout of the process group (--dist_timeout)


class DistError(Exception):
    """A distributed set-up that cannot work (bad, missing or contradictory values). One-line message."""


class RendezvousTimeout(DistError):
    """Not every process of the job joined the rendezvous in time: one stopped before it or never started."""


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    init_method: str
    source: str  # 'torchrun' | 'slurm' | 'dist_url' | 'single'


_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(s: str) -> List[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
            if depth > 1:
                raise DistError(f"bad Slurm host list {s!r}: nested '['")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise DistError(f"bad Slurm host list {s!r}: ']' without '['")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise DistError(f"bad Slurm host list {s!r}: '[' without ']'")
    parts.append("".join(cur))
    return parts


def _expand_ranges(body: str, whole: str) -> List[str]:
    out = []
    for item in body.split(","):
        item = item.strip()
        m = _RANGE_RE.match(item)
        if not m:
            raise DistError(f"bad Slurm host list {whole!r}: bad range {item!r}")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise DistError(f"bad Slurm host list {whole!r}: descending range {item!r}")
        if hi - lo > 100000:
            raise DistError(f"bad Slurm host list {whole!r}: range {item!r} too large")
        width = len(lo_s)  # Slurm keeps the zero padding of the lower bound
        out.extend(str(v).zfill(width) for v in range(lo, hi + 1))
    return out


def expand_hostlist(s: str) -> List[str]:
    """Expand a Slurm compressed host list: ``gpu[01-03,07],cpu5`` -> gpu01 gpu02 gpu03 gpu07 cpu5.

    Zero padding is kept; several bracket groups in one name give their product in Slurm's order
    (``rack[1-2]-n[1-2]`` -> rack1-n1 rack1-n2 rack2-n1 rack2-n2). Errors raise ``DistError``.
    """
    if not isinstance(s, str) or not s.strip():
        raise DistError(f"empty Slurm host list {s!r}")
    s = s.strip()
    hosts: List[str] = []
    for part in _split_top_level(s):
        part = part.strip()
        if not part:
            raise DistError(f"bad Slurm host list {s!r}: empty host name")
        names = [""]
        pos = 0
        for m in re.finditer(r"\[([^\[\]]*)\]", part):
            prefix = part[pos:m.start()]
            choices = _expand_ranges(m.group(1), s)
            names = [n + prefix + c for n in names for c in choices]
            pos = m.end()
        suffix = part[pos:]
        if "[" in suffix or "]" in suffix:
            raise DistError(f"bad Slurm host list {s!r}")
        names = [n + suffix for n in names]
        for n in names:
            if any(ch.isspace() for ch in n):
                raise DistError(f"bad Slurm host list {s!r}: white space in host name {n!r}")
        hosts.extend(names)
    return hosts


def _int_var(environ: Mapping[str, str], name: str) -> int:
    raw = environ.get(name)
    try:
        return int(str(raw).strip())
    except (TypeError, ValueError):
        raise DistError(f"{name}={raw!r} is not an integer") from None


def _check_ranks(rank: int, world_size: int, local_rank: int, where: str) -> None:
    if world_size < 1:
        raise DistError(f"world size {world_size} from {where} must be >= 1")
    if not 0 <= rank < world_size:
        raise DistError(f"rank {rank} from {where} is outside [0, {world_size - 1}] (world size {world_size})")
    if not 0 <= local_rank < world_size:
        raise DistError(f"local rank {local_rank} from {where} is outside [0, {world_size - 1}]")


def parse_dist_url(dist_url: str):
    """Return ('env', None, None) | ('tcp', host, port) | ('file', path, None); DistError if malformed."""
    if not isinstance(dist_url, str) or not dist_url.strip():
        raise DistError(f"--dist_url {dist_url!r} is empty (use env://, tcp://host:port or file:///path)")
    url = dist_url.strip()
    if url == "env://":
        return "env", None, None
    if url.startswith("tcp://"):
        rest = url[len("tcp://"):].rstrip("/")
        m = re.match(r"^(\[[0-9A-Fa-f:.]+\]|[^:/\[\]\s]+):(\d+)$", rest)
        if not m:
            raise DistError(f"--dist_url {dist_url!r} is not tcp://host:port")
        port = int(m.group(2))
        if not 1 <= port <= 65535:
            raise DistError(f"--dist_url {dist_url!r}: port {port} outside 1..65535")
        return "tcp", m.group(1), port
    if url.startswith("file://"):
        path = url[len("file://"):]
        if not path.startswith("/"):
            raise DistError(f"--dist_url {dist_url!r} needs an absolute path (file:///shared/dir/file)")
        return "file", path, None
    raise DistError(f"--dist_url {dist_url!r}: use env://, tcp://host:port or file:///path")


def _slurm_port(environ: Mapping[str, str], url_kind: str, url_port: Optional[int]) -> int:
    if url_kind == "tcp":
        return url_port
    if environ.get("MASTER_PORT"):
        port = _int_var(environ, "MASTER_PORT")
        if not 1 <= port <= 65535:
            raise DistError(f"MASTER_PORT={port} outside 1..65535")
        return port
    if not environ.get("SLURM_JOB_ID"):
        return 29500  # torchrun's default; real Slurm tasks always have a job id
    job = _int_var(environ, "SLURM_JOB_ID")
    return 10000 + job % 20000


def _from_launcher(environ: Mapping[str, str], dist_url: str, url_kind: str, arg_local: int) -> DistEnv:
    """torchrun / torch.distributed.launch / any launcher exporting RANK and WORLD_SIZE."""
    has_rank, has_world = "RANK" in environ, "WORLD_SIZE" in environ
    if not (has_rank and has_world):
        missing = "RANK" if not has_rank else "WORLD_SIZE"
        present = "WORLD_SIZE" if not has_rank else "RANK"
        raise DistError(f"{present} is set but {missing} is not (launcher variables must come together)")
    r = _int_var(environ, "RANK")
    w = _int_var(environ, "WORLD_SIZE")
    lr = _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else arg_local
    _check_ranks(r, w, lr, "RANK/WORLD_SIZE/LOCAL_RANK")
    if "LOCAL_WORLD_SIZE" in environ:
        lws = _int_var(environ, "LOCAL_WORLD_SIZE")
        if not 0 <= lr < lws:
            raise DistError(f"LOCAL_RANK={lr} is outside [0, LOCAL_WORLD_SIZE-1={lws - 1}]")
    has_addr, has_port = bool(environ.get("MASTER_ADDR")), bool(environ.get("MASTER_PORT"))
    if has_addr and has_port:
        port = _int_var(environ, "MASTER_PORT")
        if not 1 <= port <= 65535:
            raise DistError(f"MASTER_PORT={port} outside 1..65535")
        init = "env://"
    elif url_kind in ("tcp", "file"):
        init = dist_url.strip()
    elif w == 1:
        init = "env://"  # one process: no rendezvous needed
    else:
        missing = " and ".join(n for n, ok in (("MASTER_ADDR", has_addr), ("MASTER_PORT", has_port)) if not ok)
        raise DistError(f"RANK/WORLD_SIZE are set (world size {w}) but {missing} is not, and --dist_url is "
                        f"{dist_url!r} (start with torchrun, or pass --dist_url tcp://host:port)")
    return DistEnv(r, w, lr, init, "torchrun")


def _from_slurm(environ: Mapping[str, str], url_kind: str, url_port: Optional[int]) -> DistEnv:
    """A Slurm task started by srun."""
    r = _int_var(environ, "SLURM_PROCID")
    if "SLURM_NTASKS" in environ:
        w = _int_var(environ, "SLURM_NTASKS")
    elif "SLURM_NPROCS" in environ:
        w = _int_var(environ, "SLURM_NPROCS")
    else:
        raise DistError("SLURM_PROCID is set but SLURM_NTASKS is not")
    if "SLURM_LOCALID" in environ:
        lr = _int_var(environ, "SLURM_LOCALID")
    elif w == 1:
        lr = 0
    else:
        raise DistError(f"SLURM_PROCID is set (world size {w}) but SLURM_LOCALID is not")
    _check_ranks(r, w, lr, "SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID")
    if (w > 1 and r == 0 and "SLURM_JOB_ID" in environ
            and "SLURM_STEP_ID" not in environ and "SLURM_STEPID" not in environ):
        # The batch script itself also has SLURM_PROCID=0 and SLURM_NTASKS=N, but it is not one of
        # the N tasks: joining a group of N would wait for N-1 processes that never come.
        raise DistError(f"this is the batch script of a {w}-task Slurm job, not a task started by srun: "
                        f"run `srun python ...` (or request --ntasks=1)")
    master = environ.get("MASTER_ADDR")
    if not master:
        nodelist = (environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
                    or environ.get("SLURM_NODELIST"))
        if not nodelist:
            if w > 1:
                raise DistError("SLURM_PROCID is set but SLURM_JOB_NODELIST is not: no master host "
                                "(export MASTER_ADDR)")
            master = "127.0.0.1"
        else:
            master = expand_hostlist(nodelist)[0]
    if w > 1:
        port = _slurm_port(environ, url_kind, url_port)
    else:
        port = url_port if url_kind == "tcp" else 29500
    if ":" in master and not master.startswith("["):
        master = f"[{master}]"  # IPv6 literal
    return DistEnv(r, w, lr, f"tcp://{master}:{port}", "slurm")


def resolve_dist_env(environ: Mapping[str, str], dist_url: str, rank: int, world_size: int,
                     local_rank: int) -> DistEnv:
    """Rank, world size, local rank and rendezvous of this process (pure: reads only its arguments).

    ``environ`` is a mapping like ``os.environ``; ``dist_url``, ``rank``, ``world_size`` and
    ``local_rank`` are the command-line values (released defaults ``env://``, 0, -1, 0).
    """
    url_kind, url_host, url_port = parse_dist_url(dist_url)
    try:
        arg_local = int(local_rank if local_rank is not None else 0)
        arg_rank = int(rank if rank is not None else 0)
        arg_world = int(world_size if world_size is not None else -1)
    except (TypeError, ValueError):
        raise DistError(f"--rank/--world_size/--local_rank must be integers "
                        f"(got {rank!r}, {world_size!r}, {local_rank!r})") from None

    # 1. torchrun / torch.distributed.launch / any launcher exporting RANK and WORLD_SIZE
    if "RANK" in environ or "WORLD_SIZE" in environ:
        return _from_launcher(environ, dist_url, url_kind, arg_local)

    # 2. a Slurm task (srun)
    if "SLURM_PROCID" in environ:
        return _from_slurm(environ, url_kind, url_port)

    # 3. explicit --dist_url (legacy: one process per GPU started by hand, rank/world from the flags)
    lr = _int_var(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else arg_local
    if url_kind in ("tcp", "file") and arg_world > 1:
        _check_ranks(arg_rank, arg_world, lr, "--rank/--world_size/--local_rank")
        return DistEnv(arg_rank, arg_world, lr, dist_url.strip(), "dist_url")

    # 4. one process
    if arg_world > 1:
        raise DistError(f"--world_size {arg_world} with --dist_url {dist_url!r} but no RANK/WORLD_SIZE or "
                        f"Slurm task variables: start with torchrun or srun, or pass --dist_url tcp://host:port")
    if arg_world == 0 or arg_world < -1:
        raise DistError(f"--world_size {arg_world} is invalid (use -1 for 'from the launcher', or >= 1)")
    if arg_rank != 0:
        raise DistError(f"--rank {arg_rank} needs --world_size > {arg_rank} (got {arg_world})")
    if lr < 0:
        raise DistError(f"local rank {lr} must be >= 0")
    return DistEnv(0, 1, lr, "env://" if url_kind == "env" else dist_url.strip(), "single")


def _pick_device(local_rank: int, requested: str = "auto"):
    """CUDA device for this process (``--device`` auto or cuda): ``cuda:local_rank``; one visible GPU per
    task (Slurm ``--gpus-per-task`` binding) means ``cuda:0``; CPU when there is no GPU, unless the run needs
    one (``src/runtime/devices.needs_gpu``: DistError naming torch's and the driver's CUDA). ``cpu``: CPU."""
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = needs_gpu(requested, os.environ)
        if why:
            raise DistError(no_gpu_message(why, torch.__version__, torch.version.cuda, *driver_versions()))
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank < n:
        return torch.device("cuda", local_rank)
    if n == 1:
        return torch.device("cuda", 0)
    raise DistError(f"local rank {local_rank} but only {n} GPUs are visible (CUDA_VISIBLE_DEVICES="
                    f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): start one process per GPU")


def init_distributed(args, timeout_s: Optional[float] = None) -> DistEnv:
    """Resolve the set-up from ``os.environ`` and the flags, fill ``args`` and join the process group.

    Sets ``args.rank``, ``args.world_size``, ``args.local_rank``, ``args.gpu_to_work_on`` (the CUDA index
    used: ``local_rank``, or 0 when each task sees a single GPU; ``local_rank`` on CPU) and ``args.device``
    (``cuda:<gpu_to_work_on>`` or ``cpu``). With world size > 1 joins the process group (NCCL on CUDA,
    gloo on CPU) with a timeout of ``timeout_s`` (default ``args.dist_timeout``, else ``DEFAULT_TIMEOUT_S``)
    for the rendezvous and every collective, after ``torch.cuda.set_device``. Exports MASTER_ADDR/PORT
    (if unset) for a ``tcp://`` rendezvous, for libraries that read them.
    """
    if timeout_s is None:
        timeout_s = getattr(args, "dist_timeout", DEFAULT_TIMEOUT_S)
    env = resolve_dist_env(os.environ, getattr(args, "dist_url", "env://"), getattr(args, "rank", 0),
                           getattr(args, "world_size", -1), getattr(args, "local_rank", 0))
    requested = getattr(args, "device", "auto")  # --device; a second call finds the device it resolved
    device = _pick_device(env.local_rank, requested.type if isinstance(requested, torch.device) else requested)
    args.rank = env.rank
    args.world_size = env.world_size
    args.local_rank = env.local_rank
    args.gpu_to_work_on = device.index if device.type == "cuda" else env.local_rank
    args.device = device
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if env.world_size > 1:
        m = re.match(r"^tcp://(\[[^\]]+\]|[^:]+):(\d+)$", env.init_method)
        if m:
            os.environ.setdefault("MASTER_ADDR", m.group(1).strip("[]"))
            os.environ.setdefault("MASTER_PORT", m.group(2))
        if not dist.is_initialized():
            if env.init_method.startswith("file://"):
                _claim_rendezvous_file(env)
            backend = "nccl" if device.type == "cuda" else "gloo"
            try:
                dist.init_process_group(backend=backend, init_method=env.init_method,
                                        world_size=env.world_size, rank=env.rank,
                                        timeout=datetime.timedelta(seconds=timeout_s))
            except RuntimeError as e:  # torch's DistNetworkError is a RuntimeError
                if isinstance(e, getattr(dist, "DistStoreError", ())) or "timeout" in str(e).lower():
                    # tcp:// says "Timed out ... 1/2 clients joined", file:// only "Wait timeout"
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                    raise RendezvousTimeout(
                        f"rank {env.rank}: not every process of the job joined the rendezvous {env.init_method} "
                        f"within --dist_timeout {timeout_s:g} s ({first}): another one stopped before it (see its "
                        "output) or was not started") from None
                if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
                    raise
                # another run on this host holds the port (the same --dist_url, or Slurm job IDs equal mod 20000)
                raise DistError(f"rank {env.rank}: the rendezvous port of {env.init_method} is already in use "
                                "on this host (another job or run there?); give this run a free port with "
                                "--dist_url tcp://HOST:PORT") from None
        # one line per process (only rank 0 logs to stdout later): shows every rank in the job output
        print(f"distributed: rank {env.rank}/{env.world_size} local_rank {env.local_rank} device {device} "
              f"({env.source}, {dist.get_backend()}, {env.init_method})", flush=True)
    return env


def _claim_rendezvous_file(env: DistEnv) -> None:
    """A file:// rendezvous: mark the file as in use, removing first one left by an earlier run that no
    process uses any more (src/runtime/rendezvous.py)."""
    path = parse_dist_url(env.init_method)[1]
    try:
        joined = rendezvous.claim(path, env.rank)
    except OSError as e:
        raise DistError(f"rank {env.rank}: cannot lock the rendezvous file {path}{rendezvous.LOCK_SUFFIX}: "
                        f"{e.strerror} (--dist_url file:// needs a folder that every process can write)") from None
    if joined.removed_stale:
        print(f"distributed: removed {path}, a rendezvous file left by an earlier run that no process uses "
              "any more", flush=True)


def barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
