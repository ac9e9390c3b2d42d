"""What an iteration takes from the host, staged on the device ahead of time.

Everything that changes from one iteration to the next enters the iteration as values in one row of a
device table: the learning rate, Un-Mix's lam and global-or-region choice, the region boxes (as pixel
bounds, turned into masks on the device) and the iteration's slot in the epoch (where the non-finite
guard writes). So every iteration launches the same operations with the same arguments, and one captured
iteration (a CUDA graph) can replay any other.

The Un-Mix random numbers are drawn on the host from the NumPy stream the released code used, in the
released order (`draw_unmix`), `chunk` iterations at a time, and copied to the device in one transfer that
does not wait for it. The stream's state before each staged iteration is kept, so a checkpoint records
the state at the first iteration not yet trained (`rng_state()`), exactly as if the numbers had been drawn
one iteration at a time.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from .unmix import UnmixDraws, draw_unmix, host_row, row_width


class StepInputs:
    """The staged rows of upcoming iterations and the device index of the next one.

    `table` (chunk x row_width, float32) and `pos` (int64 scalar) keep their storage for the whole run:
    an iteration reads `table[pos]` and advances `pos` on the device (`next_row`). `stage(first, rows)`
    writes rows for iterations `first, first + 1, ...`; `ensure(iteration)` draws and stages a new chunk
    from the method's own stream when `iteration` is not staged."""

    def __init__(self, device, unmix_prob: float, unmix_beta: float, pair_sizes: Sequence[Tuple[int, int]],
                 rng: Optional[np.random.RandomState] = None, lr_schedule=None, chunk: int = 64):
        self.device = torch.device(device)
        self.unmix_prob, self.unmix_beta = float(unmix_prob), float(unmix_beta)
        self.pair_sizes = [tuple(s) for s in pair_sizes]
        self.rng, self.lr_schedule = rng, lr_schedule
        self.chunk = int(chunk)
        self.table = torch.zeros(self.chunk, row_width(len(self.pair_sizes)), device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self.iters_per_epoch = 1
        self.first = 0          # iteration of row 0
        self.count = 0          # rows staged
        self.used = 0           # rows consumed (host count of `pos`)
        self.states = []        # the stream's state before drawing row k (own draws only)
        self.host_lrs = []      # the learning rate of row k, for the optimiser's param_groups (logs, checkpoints)
        self._keep = None       # the host buffer of the transfer in flight

    # ------------------------------------------------------------------ host side

    def stage(self, first: int, rows: List[List[float]], lrs: List[float], states=None):
        """Rows for iterations first, first + 1, ..., copied to the device without waiting for it."""
        if not 0 < len(rows) <= self.chunk:
            raise ValueError(f"stage 1 to {self.chunk} rows, got {len(rows)}")
        host = torch.tensor(rows, dtype=torch.float32)
        if self.device.type == "cuda":
            host = host.pin_memory()
        self.table[:len(rows)].copy_(host, non_blocking=True)
        self.pos.zero_()
        self._keep = host  # alive until the copy has run (the next stage comes after it in stream order)
        self.first, self.count, self.used = first, len(rows), 0
        self.states = list(states) if states is not None else []
        self.host_lrs = list(lrs)

    def stage_one(self, iteration: int, draws: UnmixDraws, lr: float, pair_sizes=None):
        """One iteration with given draws and learning rate (the golden tests, outside callers)."""
        self.stage(iteration, [self.row_of(iteration, draws, lr, pair_sizes)], [float(lr)])

    def row_of(self, iteration: int, draws: UnmixDraws, lr: float, pair_sizes=None) -> List[float]:
        return host_row(draws, lr, iteration % self.iters_per_epoch, self.unmix_prob,
                        self.pair_sizes if pair_sizes is None else pair_sizes)

    def staged(self, iteration: int) -> bool:
        """Whether `iteration` is the next staged row."""
        return self.used < self.count and iteration == self.first + self.used

    def ensure(self, iteration: int):
        """Stage a chunk drawn from the method's stream, starting at `iteration`, unless it is staged."""
        if self.staged(iteration):
            return
        if self.rng is None or self.lr_schedule is None:
            raise ValueError("iteration without draws: the method was built without a random stream and a "
                             "learning-rate schedule")
        self.rewind()
        n = max(1, min(self.chunk, len(self.lr_schedule) - iteration))
        rows, lrs, states = [], [], []
        for k in range(n):
            states.append(self.rng.get_state())
            draws = draw_unmix(self.rng, self.unmix_beta, self.unmix_prob, self.pair_sizes)
            lr = float(self.lr_schedule[iteration + k])
            rows.append(self.row_of(iteration + k, draws, lr))
            lrs.append(lr)
        self.stage(iteration, rows, lrs, states)

    def consumed(self):
        """The host's count of the device's `pos` after an iteration read its row."""
        self.used += 1

    def host_lr(self) -> float:
        return self.host_lrs[self.used]

    def rewind(self):
        """Put the stream back to the first iteration not consumed (draws made ahead are drawn again) and
        drop the staged rows."""
        if self.states and self.used < len(self.states):
            self.rng.set_state(self.states[self.used])
        self.count = self.used = 0
        self.states = []

    def rng_state(self):
        """The stream's state at the first iteration not yet consumed (what a checkpoint records)."""
        if self.states and self.used < len(self.states):
            return self.states[self.used]
        return None if self.rng is None else self.rng.get_state()

    # ------------------------------------------------------------------ device side (captured)

    def next_row(self) -> torch.Tensor:
        """This iteration's row (a `row_width` vector on the device); advances `pos` on the device."""
        row = self.table.index_select(0, self.pos).squeeze(0)
        self.pos.add_(1)
        return row
