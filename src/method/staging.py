"""The numbers of an iteration, staged on the device ahead of time: the one module that knows how they
are laid out.

Everything that changes from one iteration to the next enters the iteration as a `StepNumbers`: named
device tensors (the learning rate, Un-Mix's mode, weights, boxes and the lam of the loss, the guard's
slot), views of one row of a staged table. So every iteration launches the same operations with the same
arguments, and one captured iteration (a CUDA graph) can replay any other. A new per-iteration number is
one field of `StepNumbers` (and its width in `PER_PAIR` when it has several per crop pair), given by name
on the host (`host_numbers`, or a schedule: an array of one value per iteration).

The Un-Mix random numbers are drawn on the host from the NumPy stream the released code used, in the
released order (`draw_unmix`), `chunk` iterations at a time, and copied to the device in one transfer that
does not wait for it. The stream's state before each staged iteration is kept, so a checkpoint records
the state at the first iteration not yet trained (`rng_state()`), exactly as if the numbers had been drawn
one iteration at a time, and reading it changes nothing.
"""
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch

from .unmix import RELEASED_MODES, UnmixDraws, draw_unmix, mixing_numbers


class StepNumbers(NamedTuple):
    """One iteration's numbers on the device (0-d tensors; per-pair fields: one row per crop pair)."""
    lr: torch.Tensor             # learning rate (item 1), rounded to float32 as the fused SGD kernel takes it
    mode: torch.Tensor           # the mixing mode picked by r (index into the modes, src/method/unmix.py)
    mix_a: torch.Tensor          # global mixing weights: the drawn lam ...
    mix_b: torch.Tensor          # ... and 1 - lam
    lam: torch.Tensor            # the lam of the loss (after the boxes, item 4) ...
    one_minus_lam: torch.Tensor  # ... and 1 - lam, in float64 on the host as the released Python float
    slot: torch.Tensor           # the iteration's index in its epoch (where the non-finite guard writes)
    boxes: torch.Tensor          # n_pairs x 4: each pair's box (x1, y1, x2, y2) in pixels


PER_PAIR = {"boxes": 4}  # fields with this many numbers per crop pair; every other field is one number


def layout(n_pairs: int) -> Dict[str, slice]:
    """Where each field sits in a row."""
    where, start = {}, 0
    for name in StepNumbers._fields:
        width = PER_PAIR[name] * n_pairs if name in PER_PAIR else 1
        where[name], start = slice(start, start + width), start + width
    return where


def row_width(n_pairs: int) -> int:
    return max(s.stop for s in layout(n_pairs).values())


def pack(values: dict, n_pairs: int) -> List[float]:
    """The row of one iteration from its numbers by name (per-pair fields: one sequence per pair)."""
    row = [0.0] * row_width(n_pairs)
    for name, where in layout(n_pairs).items():
        value = values[name]
        row[where] = [float(x) for pair in value for x in pair] if name in PER_PAIR else [float(value)]
    return row


def unpack(row: torch.Tensor, n_pairs: int) -> StepNumbers:
    """The named views of a row (no copy: what the row holds when the iteration runs)."""
    where = layout(n_pairs)
    return StepNumbers(**{name: row[s].view(-1, PER_PAIR[name]) if name in PER_PAIR else row[s.start]
                          for name, s in where.items()})


def host_numbers(draws: UnmixDraws, slot: int, unmix_prob: float, pair_sizes: Sequence[Tuple[int, int]],
                 schedules: Dict[str, float], modes=RELEASED_MODES) -> dict:
    """One iteration's numbers by name, on the host: its schedules' values (the learning rate, ...), its
    slot in the epoch, and the Un-Mix numbers of its draws."""
    return {**schedules, "slot": slot, **mixing_numbers(draws, unmix_prob, pair_sizes, modes)}


class StepInputs:
    """The staged numbers of upcoming iterations and the device index of the next one.

    `table` (chunk x row_width, float32) and `pos` (int64) keep their storage for the whole run: an
    iteration reads its numbers with `next_numbers()`, which advances `pos` on the device. `ensure(iteration)`
    draws and stages a chunk from the method's own stream unless `iteration` is staged; `give(iteration,
    draws, lr)` stages one iteration of given draws (the golden tests) through the same path.
    `schedules`: name -> one value per iteration ("lr" at least), staged under that name."""

    def __init__(self, device, unmix_prob: float, unmix_beta: float, pair_sizes: Sequence[Tuple[int, int]],
                 rng: Optional[np.random.RandomState] = None, schedules: Optional[dict] = None, chunk: int = 64,
                 modes=RELEASED_MODES):
        self.device = torch.device(device)
        self.unmix_prob, self.unmix_beta = float(unmix_prob), float(unmix_beta)
        self.pair_sizes = [tuple(s) for s in pair_sizes]
        self.rng, self.schedules, self.modes = rng, dict(schedules or {}), modes
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

    def _stage(self, first: int, numbers: List[dict], states=None):
        """Numbers of iterations first, first + 1, ..., copied to the device without waiting for it."""
        if not 0 < len(numbers) <= self.chunk:
            raise ValueError(f"stage 1 to {self.chunk} iterations, got {len(numbers)}")
        host = torch.tensor([pack(n, len(self.pair_sizes)) for n in numbers], dtype=torch.float32)
        if self.device.type == "cuda":
            host = host.pin_memory()
        self.table[:len(numbers)].copy_(host, non_blocking=True)
        self.pos.zero_()
        self._keep = host  # alive until the copy has run (the next stage comes after it in stream order)
        self.first, self.count, self.used = first, len(numbers), 0
        self.states = list(states) if states is not None else []
        self.host_lrs = [float(n["lr"]) for n in numbers]

    def _numbers(self, iteration: int, draws: UnmixDraws, pair_sizes=None, **given) -> dict:
        schedules = {name: float(values[iteration]) for name, values in self.schedules.items()}
        return host_numbers(draws, iteration % self.iters_per_epoch, self.unmix_prob,
                            self.pair_sizes if pair_sizes is None else pair_sizes, {**schedules, **given},
                            self.modes)

    def give(self, iteration: int, draws: UnmixDraws, lr: Optional[float] = None, pair_sizes=None):
        """Stage `iteration` with given draws (and learning rate, else the schedule's): the golden tests.
        `pair_sizes`: the (W, H) the draws' centres were drawn over, when not the configured crops'."""
        self._rewind()
        given = {} if lr is None else {"lr": float(lr)}
        self._stage(iteration, [self._numbers(iteration, draws, pair_sizes, **given)])

    def staged(self, iteration: int) -> bool:
        """Whether `iteration` is the next staged row."""
        return self.used < self.count and iteration == self.first + self.used

    def ensure(self, iteration: int):
        """Stage a chunk drawn from the method's stream, starting at `iteration`, unless it is staged."""
        if self.staged(iteration):
            return
        if self.rng is None or "lr" not in self.schedules:
            raise ValueError("iteration without draws: the method was built without a random stream and a "
                             "learning-rate schedule (give the iteration its draws)")
        self._rewind()
        n = max(1, min(self.chunk, len(self.schedules["lr"]) - iteration))
        numbers, states = [], []
        for k in range(n):
            states.append(self.rng.get_state())
            draws = draw_unmix(self.rng, self.unmix_beta, self.unmix_prob, self.pair_sizes, self.modes)
            numbers.append(self._numbers(iteration + k, draws))
        self._stage(iteration, numbers, states)

    def consumed(self):
        """The host's count of the device's `pos` after an iteration read its numbers."""
        self.used += 1

    def host_lr(self) -> float:
        return self.host_lrs[self.used]

    def _rewind(self):
        """Put the stream back to the first iteration not consumed (draws made ahead are drawn again) and
        drop the staged rows: before staging anew."""
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

    def next_numbers(self) -> StepNumbers:
        """This iteration's numbers (views of its row on the device); advances `pos` on the device."""
        row = self.table.index_select(0, self.pos).squeeze(0)
        self.pos.add_(1)
        return unpack(row, len(self.pair_sizes))
