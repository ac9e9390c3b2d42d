"""How long the cells left of a table run here will take, from the epochs that the cells finished so far ran.

A cell's folders record their progress in their statistics tables (`stats0.csv`: one row per finished epoch,
`time` the training seconds so far, earlier processes included). Read before and after a cell runs, they
give the epochs that this attempt ran and their seconds, a resumed cell's included (it runs only the epochs
left). The estimate is per epoch, for each data set apart, and per cell for the rest (start-up, data
loading, checks). The two data sets have as many images; their number of classes changes only the
evaluation's classifier (a few milliseconds a batch against seconds for the frozen network on a CPU) and
the optional kNN monitor, but each may have its own data path (DATASET_PATH_C10, DATASET_PATH_C100), of
another format (JPEG folder or pickled batches) or on another disk. An evaluation whose table has no `time`
(the cached probe's) counts in the rest of its cell.
Reads files only: no torch, no pandas.
"""
import csv
import math
import os
import sys
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.runtime.durations import format_eta  # noqa: E402

STATS_FILE = "stats0.csv"


@dataclass(frozen=True)
class Progress:
    """Epochs finished and their training seconds: of a cell's pretraining and of its evaluation."""
    pretraining_epochs: int = 0
    pretraining_seconds: float = 0.0
    evaluation_epochs: int = 0
    evaluation_seconds: float = 0.0


@dataclass(frozen=True)
class Attempt:
    """What one run of a cell did: its data set, the epochs it ran and their seconds, and the rest of its
    wall time."""
    dataset: str
    pretraining_epochs: int
    pretraining_seconds: float
    evaluation_epochs: int
    evaluation_seconds: float
    other_seconds: float


def epochs_and_seconds(folder):
    """(epochs finished, training seconds so far) from the statistics table of a run folder; (0, 0.0)
    without one (not started, or an unreadable table)."""
    try:
        with open(os.path.join(folder, STATS_FILE), newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return 0, 0.0
    for row in reversed(rows):
        try:
            epoch, seconds = int(float(row["epoch"])), float(row["time"])
        except (KeyError, TypeError, ValueError):
            continue
        if epoch >= 0 and math.isfinite(seconds):
            return epoch + 1, seconds
    return 0, 0.0


def read_progress(cell):
    """The Progress of a plan's cell (tools/table_plan.Cell), from its two folders."""
    return Progress(*epochs_and_seconds(cell.experiment_path), *epochs_and_seconds(cell.eval_path))


def attempt(dataset, before, after, took):
    """The Attempt of a cell of `dataset` that went from Progress `before` to `after` in `took` wall seconds.
    A part that started afresh (fewer epochs after than before: its folder was replaced) counts from zero."""
    def ran(epochs_before, seconds_before, epochs_after, seconds_after):
        if epochs_after < epochs_before or seconds_after < seconds_before:
            epochs_before, seconds_before = 0, 0.0
        return epochs_after - epochs_before, seconds_after - seconds_before
    pre = ran(before.pretraining_epochs, before.pretraining_seconds, after.pretraining_epochs,
              after.pretraining_seconds)
    ev = ran(before.evaluation_epochs, before.evaluation_seconds, after.evaluation_epochs, after.evaluation_seconds)
    return Attempt(dataset, *pre, *ev, max(took - pre[1] - ev[1], 0.0))


def _per_epoch(attempts, part, dataset):
    """Seconds per epoch of `part` ('pretraining' or 'evaluation') in the attempts of `dataset`, else in all
    attempts; None when none ran an epoch of it."""
    for group in ([a for a in attempts if a.dataset == dataset], attempts):
        epochs = sum(getattr(a, f"{part}_epochs") for a in group)
        if epochs > 0:
            return sum(getattr(a, f"{part}_seconds") for a in group) / epochs
    return None


def seconds_left(attempts, left):
    """Seconds the cells `left` will take: each as (data set, pretraining epochs left, evaluation epochs
    left), at the seconds per epoch of the `attempts` of its data set (of all attempts while its own has
    none), plus the attempts' mean other seconds once per cell. None without attempts, or when epochs are
    left of a part that no attempt ran."""
    if not attempts:
        return None
    total = sum(a.other_seconds for a in attempts) / len(attempts) * len(left)
    for dataset, *epochs_left in left:
        for part, epochs in zip(("pretraining", "evaluation"), epochs_left):
            if epochs > 0:
                rate = _per_epoch(attempts, part, dataset)
                if rate is None:
                    return None
                total += rate * epochs
    return total


@dataclass
class Pace:
    """The attempts of the cells finished here so far, and the evaluation epochs of a finished cell (the
    same evaluation in every cell, whatever its pretraining's epochs)."""
    attempts: list = field(default_factory=list)
    evaluation_epochs: int = 0

    def add(self, cell, before, after, took):
        """Cell `cell` finished in `took` seconds, from Progress `before` to `after`."""
        self.attempts.append(attempt(cell.dataset, before, after, took))
        self.evaluation_epochs = max(self.evaluation_epochs, after.evaluation_epochs)

    def time_left(self, cells_left):
        """'; about 1:40:00 for the 2 cell(s) left at this pace', each cell left from where its folders
        stand; '' when there is no estimate (see `seconds_left`)."""
        left = []
        for c in cells_left:
            p = read_progress(c)
            left.append((c.dataset, max(c.epochs - p.pretraining_epochs, 0),
                         max(self.evaluation_epochs - p.evaluation_epochs, 0)))
        seconds = seconds_left(self.attempts, left) if left else None
        return "" if seconds is None else f"; about {format_eta(seconds)} for the {len(left)} cell(s) left at this pace"
