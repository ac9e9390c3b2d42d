"""How the processes of an entry script start: join the job, install the stop signals' handler, seed, and
agree. At start-up every rank compares its arguments and a fingerprint of its data with the others' in one
all-gather (``first_disagreement``), so that a rank given other data or other flags stops the job with
one line instead of blocking in mismatched collectives. From then until the run starts, a check that
refuses on any process ends them all together with one line (``StartVote``). Every collective has a timeout
(``--dist_timeout``), after which the waiting ranks stop (``run_main`` in src/runtime/exits.py says so in
one line).
"""
import hashlib
import io
import json
import random
import sys
from datetime import timedelta
from typing import Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist

from .cli import LOST_PEER_EXIT_CODE, Refusal, fail
from .exits import lost_peer
from .launch import DistError, RendezvousTimeout, init_distributed
from .logs import write_held_log
from .signals import PreemptionHandler, StartUpStopped

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


def data_fingerprint(images, labels, classes, iters_per_epoch):
    """What every process must see alike: counts, and hashes of the class names, labels and pixels."""
    return {"the number of training images": len(images), "the number of classes": len(classes),
            "the iterations per epoch": iters_per_epoch, "the class names": fingerprint(list(classes)),
            "the labels": fingerprint(np.ascontiguousarray(labels).tobytes()),
            "the training images": fingerprint(np.ascontiguousarray(images).data)}


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
                  group=None):
    """Collective (one all-gather in `group`): (rank, problem, status) of the lowest rank with a one-line
    `problem` (`status`, 1 to 255, is what it exits with), or None when no rank has one."""
    mine = torch.zeros(size, dtype=torch.uint8, device=device)
    if problem:
        raw = problem.encode()[:size - 2]
        mine[0] = status
        mine[1:1 + len(raw)] = torch.tensor(list(raw), dtype=torch.uint8, device=device)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine, group=group)
    for rank, t in enumerate(every):
        raw = bytes(t.cpu().tolist())
        if raw[0]:
            return rank, raw[1:].rstrip(b"\0").decode(errors="replace"), raw[0]
    return None


class StartVote:
    """The start-up of one process of an entry script, from its launch to the start of its run: `run_main`
    (src/runtime/exits.py) runs `main(start)` inside it. With several processes, from their agreement on the run
    folder (`agree_or_fail`, which calls `join`) to the start of the run (`agree_to_start`, where rank 0 writes
    params.json), a refusal (`fail`, which raises `Refusal`) on one process or on all of them ends every process
    together: they exchange their problems in one collective, the lowest refusing rank says its line (once for
    the job, not once per process) and every process exits with its status, the others silently. Rank 0 undoes
    its start only then (src/runtime/refused_start.py), when no other process is left to write in the folder.
    The collective is in a process group of its own, so that it is never mistaken for another collective. The
    processes are never out of step: each calls `agree_so_far` before every other collective of its start-up,
    where it meets a process that refused (which then waits for the others at most --dist_timeout). Until the
    vote, a process other than rank 0 holds what it says on stderr, as it holds its log: a refusal of rank 0's
    is the one said, the others learn whether theirs is only from the vote. From `join` to `agree_to_start`,
    SIGTERM or SIGINT ends the start-up at once (`watch_stops`), rank 0 undoing its start first."""

    def __init__(self):
        self.rank, self.world_size, self.group = 0, 1, None  # until `join`: this process refuses alone
        self.held, self.stderr = None, None
        self.undo = None  # rank 0's claim of its run folder (`undo_if_lost`)
        self.preempt = None  # the stop signals' handler (`watch_stops`)

    def watch_stops(self, preempt):
        """`preempt` (src/runtime/signals.PreemptionHandler) is this process's stop signals' handler: from `join`
        to the start of the run it ends the start-up on SIGTERM or SIGINT (`StartUpStopped`) instead of setting
        a flag that only the training loop reads (torchrun SIGTERMs the other workers when one fails, and
        SIGKILLs them 30 s later: rank 0 then undoes its start before it is killed)."""
        self.preempt = preempt

    def _stops_end_start_up(self, armed):
        if self.preempt is not None:
            self.preempt.stop_start_up(armed)

    def undo_if_lost(self, undo):
        """Rank 0 claimed its run folder (`undo`, a src/runtime/refused_start.StartUndo): should another process
        be lost before the run starts, this one undoes its start before it ends with status 5 (`run_main` ends
        it with os._exit, without the undo at exit; the others have written nothing in the folder)."""
        self.undo = undo

    def join(self, args):
        """Collective: from here to `agree_to_start` the processes of the job refuse together, and a stop signal
        ends the start-up (rank 0's run folder is claimed by now: it is undone)."""
        if args.world_size > 1:
            self.rank, self.world_size = args.rank, args.world_size
            self.group = dist.new_group(backend="gloo", timeout=timedelta(seconds=args.dist_timeout))
            if self.rank != 0:
                self.held, self.stderr = io.StringIO(), sys.stderr
                sys.stderr = self.held
        self._stops_end_start_up(True)

    def agree_so_far(self):
        """Collective, before each other collective of the start-up: when another process refused, this one
        ends with its status, silently."""
        if self.group is None:
            return
        found = first_refusal(None, 0, self.world_size, group=self.group)
        if found is not None:
            self._end()
            raise SystemExit(found[2])

    def agree_to_start(self, logger):
        """Collective, where every process has passed its start-up checks, just before the run starts: when
        another process refused, this one ends silently with that status. Then a process other than rank 0
        writes its log (held until now: no process but rank 0 writes in the folder before the run has
        started). From here a stop signal stops the run at its next checkpoint."""
        self._stops_end_start_up(False)
        self.agree_so_far()
        self._end()
        self.undo = None  # the run starts: its folder is kept whatever happens
        write_held_log(logger)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        self._stops_end_start_up(False)  # the status is being decided
        if self.undo is not None and (lost_peer(error) or isinstance(error, StartUpStopped)):
            self.undo.undo()
        if self.group is None:  # one process, or the start-up is over
            return False
        if not isinstance(error, Refusal):  # a lost peer, a bug: said by run_main or by the traceback
            self._end()
            return False
        try:
            found = first_refusal(error.problem, error.code, self.world_size, group=self.group)
        except RuntimeError:  # the others are gone: this process says its own line
            found = None
        rank, problem, status = found or (self.rank, error.problem, error.code)
        self._end(unsaid=None if rank == self.rank else error.line)
        if found is None:
            return False
        raise Refusal(problem, status) from None

    def _end(self, unsaid=None):
        """The start-up is over: stderr as it was, with what was held of it written (but the line `unsaid`)."""
        self.group = None
        if self.held is not None:
            text, self.held, sys.stderr = self.held.getvalue(), None, self.stderr
            if unsaid is not None:
                before, found, after = text.rpartition(unsaid)
                text = before + after if found else text
            sys.stderr.write(text)
            sys.stderr.flush()


def fix_random_seeds(seed):
    """Seed torch (CPU and CUDA), NumPy's global RNG and Python's `random`, as the released code does."""
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    np.random.seed(seed)
    random.seed(seed)


def start_processes(args, start=None):
    """The start of every entry script: join the job's processes (a bad launch is one line), install the
    stop signals' handler (acted on at the next checkpoint; a blocked collective past --dist_timeout ends
    the process with status 3; during the start-up `start`, see `StartVote.watch_stops`), seed. Returns the
    handler."""
    try:
        init_distributed(args)
    except DistError as e:  # a process that never joined counts as one lost (status 5), as in a collective
        fail(str(e), LOST_PEER_EXIT_CODE if isinstance(e, RendezvousTimeout) else 2)
    preempt = PreemptionHandler(grace_s=args.dist_timeout).install()
    if start is not None:
        start.watch_stops(preempt)
    fix_random_seeds(args.seed)
    return preempt


def agree_or_fail(args, problem, start):
    """Every process stops with the same one line when rank 0 found `problem` in the run folder, or when the
    processes were given different arguments. From here to `start.agree_to_start` they refuse together."""
    start.join(args)
    problem = first_problem(problem, args.world_size, args.device) or \
        first_disagreement(flag_fingerprints(args), args.world_size, args.device)
    if problem:
        fail(problem)
