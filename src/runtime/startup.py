"""How the processes of an entry script start: join the job, install the stop signals' handler, seed, and
agree. At start-up every rank compares its arguments and a fingerprint of its data with the others' in one
all-gather (``first_disagreement``), so that a rank given other data or other flags stops the job with
one line instead of blocking in mismatched collectives. From then until the run starts, a check that
refuses on any process ends them all together with one line (``StartVote``). Every collective has a timeout
(``--dist_timeout``), after which the waiting ranks stop (``run_main`` in src/runtime/cli.py says so in
one line).
"""
import hashlib
import json
import random
import sys
import time
from datetime import timedelta
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from .cli import fail, hold_refusals, release_refusals
from .launch import DistError, init_distributed
from .logs import write_held_log
from .signals import PreemptionHandler

# Flags that may differ between the processes of one job (their own rank and device; a node-local copy
# of the data at another path, checked by its content instead).
PER_PROCESS_FLAGS = {"rank", "local_rank", "gpu_to_work_on", "device", "world_size", "dist_url", "data_path",
                     "workers", "download"}


def fingerprint(value) -> int:
    """A 63-bit hash of a JSON-able value or of bytes (equal on every host and Python run)."""
    data = value if isinstance(value, (bytes, bytearray, memoryview)) else \
        json.dumps(value, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def flag_fingerprints(args) -> dict:
    """{"--flag": hash of its value} for every flag that all processes of a job must share."""
    return {f"--{k}": fingerprint(v) for k, v in sorted(vars(args).items()) if k not in PER_PROCESS_FLAGS}


def first_disagreement(values: Mapping[str, int], world_size: int, device=None) -> Optional[str]:
    """Collective (one all-gather): the processes compare `values` (name -> int, the same names in the
    same order everywhere); a one-line description of the first name whose values differ, or None. Every
    rank gets the same answer, so all stop together."""
    if world_size <= 1:
        return None
    names = list(values)
    mine = torch.tensor([int(values[n]) for n in names] + [len(names)], dtype=torch.int64, device=device)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine)
    rows = [t.tolist() for t in every]
    if any(r[-1] != len(names) for r in rows):
        return "the processes run different code (their start-up checks differ); start them all alike"
    for j, name in enumerate(names):
        seen = [r[j] for r in rows]
        if len(set(seen)) > 1:
            if max(seen) < 2 ** 32:  # a count: show it
                shown = ", ".join(f"rank {rank}: {v}" for rank, v in enumerate(seen))
            else:  # a hash
                odd = [str(rank) for rank, v in enumerate(seen) if v != seen[0]]
                shown = f"rank {', '.join(odd)} differ{'s' if len(odd) == 1 else ''} from rank 0"
            return (f"the processes disagree on {name} ({shown}); every process needs the same arguments "
                    "and the same data")
    return None


def first_problem(problem: Optional[str], world_size: int, device=None, size: int = 1024) -> Optional[str]:
    """Collective: the one-line `problem` of the lowest rank that has one (e.g. rank 0 refused the run
    folder), or None; every rank gets it, so that all stop together instead of the others waiting."""
    if world_size <= 1:
        return problem
    found = first_refusal(problem, 2, world_size, device, size)
    return found and found[1]


def first_refusal(problem: Optional[str], status: int, world_size: int, device=None, size: int = 1024,
                  group=None, wait_s: Optional[float] = None):
    """Collective (one all-gather in `group`): (rank, problem, status) of the lowest rank with a one-line
    `problem` (`status`, 1 to 255, is what it exits with), or None when no rank has one. TimeoutError when
    the others have not joined within `wait_s` seconds."""
    mine = torch.zeros(size, dtype=torch.uint8, device=device)
    if problem:
        raw = problem.encode()[:size - 2]
        mine[0] = status
        mine[1:1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8, device=device)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    work = dist.all_gather(every, mine, group=group, async_op=True)
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while deadline is not None and not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError(f"the other processes did not join within {wait_s:g} s")
        time.sleep(0.01)
    work.wait()
    for rank, t in enumerate(every):
        raw = bytes(t.cpu().tolist())
        if raw[0]:
            return rank, raw[1:].rstrip(b"\0").decode(errors="replace"), raw[0]
    return None


# How long a process that refused at start-up waits for the others to refuse too or reach `agree_to_start`.
REFUSAL_WAIT_S = 30.0


class StartVote:
    """The processes of a job between their agreement on the run folder (`agree_or_fail`) and the start of
    the run (`agree_to_start`, where rank 0 writes params.json). A check that refuses there (`fail`) on one
    process or on all of them ends every process together: they exchange their problems in one collective,
    the lowest refusing rank says its line (once for the job, not once per process) and every process exits
    with its status, the others silently. Rank 0 undoes its start only then (src/runtime/refused_start.py),
    when no other process is left to write in the folder. A process refuses at a check or reaches
    `agree_to_start`: the same collective either way, in a process group of its own, so that it is never
    mistaken for another collective. A process that refused waits `wait_s` for the others at most: those
    that wait in another collective (a check that only this process failed, e.g. a node's copy of the
    data missing) then stop as when a process is lost, and this one says its own line."""

    def __init__(self, rank, world_size, group, wait_s=REFUSAL_WAIT_S):
        self.rank, self.world_size, self.group, self.wait_s = rank, world_size, group, wait_s

    def __call__(self, problem, status):
        try:
            found = first_refusal(problem, status, self.world_size, group=self.group,
                                  wait_s=None if problem is None else self.wait_s)
        except (RuntimeError, TimeoutError):
            if problem is None:
                raise
            found = None
        if found is None:
            return problem, status, True
        rank, problem, status = found
        return problem, status, rank == self.rank


def agree_to_start(logger):
    """Collective, where every process has passed its start-up checks, just before the run starts: when
    another process refused (`StartVote`), this one ends silently with that status. Then a process other
    than rank 0 writes its log (held until now: no process but rank 0 writes in the folder before the run
    has started)."""
    vote = release_refusals()
    if vote is not None:
        _, status, _ = vote(None, 0)
        if status:
            sys.exit(status)
    write_held_log(logger)


def fix_random_seeds(seed):
    """Seed torch (CPU and CUDA), NumPy's global RNG and Python's `random`, as the released code does."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


def start_processes(args):
    """The start of every entry script: join the job's processes (a bad launch is one line), install the
    stop signals' handler (acted on at the next checkpoint; a blocked collective past --dist_timeout ends
    the process with status 3), seed. Returns the handler."""
    try:
        init_distributed(args)
    except DistError as e:
        fail(str(e))
    preempt = PreemptionHandler(grace_s=args.dist_timeout).install()
    fix_random_seeds(args.seed)
    return preempt


def agree_or_fail(args, problem):
    """Every process stops with the same one line when rank 0 found `problem` in the run folder, or when the
    processes were given different arguments."""
    problem = first_problem(problem, args.world_size, args.device) or \
        first_disagreement(flag_fingerprints(args), args.world_size, args.device)
    if problem:
        fail(problem)
    if args.world_size > 1:  # from here to agree_to_start, the processes refuse together
        group = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.dist_timeout))
        hold_refusals(StartVote(args.rank, args.world_size, group))
