"""Logs, per-epoch statistics and run parameters, in the released file names.

`train.log` (rank 0; `train.log-{rank}` for the others), `stats{rank}.pkl` (pandas), `params.pkl`.
Alongside: `stats{rank}.csv` and `params.json`, which are what resuming and tools read. The one pickle
ever read back is a released run's `stats{rank}.pkl` when resuming its folder (it has no CSV), through an
unpickler that accepts only the classes of a pandas table of numbers. Stats and parameter files are
replaced atomically, so a kill while they are written leaves the previous complete version.
"""
import importlib.metadata
import importlib.util
import logging
import math
import os
import pickle
import platform
import re
import subprocess
import sys
import time
import warnings
from datetime import timedelta
from pathlib import Path

import pandas as pd
import torch

from .cli import error_line, fail
from .durations import format_eta
from .files import atomic_write


class _ElapsedFormatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.start = time.time()

    def format(self, record):
        elapsed = timedelta(seconds=round(record.created - self.start))
        prefix = f"{record.levelname} - {time.strftime('%x %X')} - {elapsed} - "
        return prefix + record.getMessage().replace("\n", "\n" + " " * len(prefix))


def create_logger(dump_path, rank, name="unmix", held=False):
    """Log to `train.log` (rank 0) or `train.log-{rank}`, appending across restarts; rank 0 also to stdout.
    `held`: a process other than rank 0 keeps its lines in memory until `write_held_log` (its job's run has
    started), so that no file of it is in the folder of a start that is refused."""
    path = os.path.join(dump_path, "train.log" if rank == 0 else f"train.log-{rank}")
    logger = logging.getLogger(f"{name}.{rank}.{path}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):  # a second call for the same file: close, don't leak, the old handler
        logger.removeHandler(h)
        h.close()
    fmt = _ElapsedFormatter()
    fh = _HeldLines(path) if held and rank != 0 else logging.FileHandler(path, mode="a")
    fh.setFormatter(fmt)
    logger.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        logger.addHandler(sh)
    return logger


class _HeldLines(logging.Handler):
    """The records of a log whose file is not written yet (`create_logger` with `held`)."""

    def __init__(self, path):
        super().__init__()
        self.path, self.records = path, []

    def emit(self, record):
        self.records.append(record)


def write_held_log(logger):
    """The lines `logger` held (`create_logger` with `held`) go to its file, and the next ones as they come."""
    for h in list(logger.handlers):
        if isinstance(h, _HeldLines):
            fh = logging.FileHandler(h.path, mode="a")
            fh.setFormatter(h.formatter)
            for record in h.records:
                fh.handle(record)
            logger.removeHandler(h)
            logger.addHandler(fh)


class Stats:
    """One row per epoch, written after each update to `{name}.pkl` (released) and `{name}.csv`.

    On restart the rows are read back from the CSV and rows at or past the resumed epoch are dropped,
    so a resumed run's table has each epoch once. An unreadable CSV is reported (`log`), kept aside as
    `{name}.csv.unreadable` and the table starts empty. A folder of the released code has only the
    pickle: its rows are read with `read_released_stats` and the original file is first copied to
    `{name}.pkl.released` (our writes then replace `{name}.pkl`); a pickle that this refuses is moved
    there (the table then starts empty). The released file is never lost."""

    def __init__(self, path_without_ext, columns, resume_before_epoch=None, log=print):
        self.pkl, self.csv = path_without_ext + ".pkl", path_without_ext + ".csv"
        self.columns = list(columns)
        self.df = pd.DataFrame(columns=self.columns)
        if resume_before_epoch is None:
            return
        if os.path.isfile(self.csv):
            try:
                old = pd.read_csv(self.csv)
            except Exception as e:  # pandas raises several types for a damaged file
                os.replace(self.csv, self.csv + ".unreadable")
                log(f"{self.csv} is unreadable ({type(e).__name__}); moved to {self.csv}.unreadable, "
                    "the statistics table starts empty")
                return
        elif os.path.isfile(self.pkl):
            try:
                old = read_released_stats(self.pkl)
            except ValueError as e:
                os.replace(self.pkl, self.pkl + ".released")
                log(f"{e}; kept as {self.pkl}.released, the statistics table starts empty")
                return
            if not os.path.exists(self.pkl + ".released"):
                with open(self.pkl, "rb") as f:
                    original = f.read()
                atomic_write(self.pkl + ".released", lambda f: f.write(original))
            log(f"{self.pkl}: {len(old)} rows of the released run's statistics read (the file is kept as "
                f"{self.pkl}.released)")
        else:
            return
        if "epoch" in old:
            old = old[pd.to_numeric(old["epoch"]) < resume_before_epoch]
        self.df = old.reindex(columns=self.columns).reset_index(drop=True)

    def update(self, row):
        new = pd.DataFrame([[row.get(c, float("nan")) for c in self.columns]], columns=self.columns)
        self.df = new if self.df.empty else pd.concat([self.df, new], ignore_index=True)
        atomic_write(self.pkl, self.df.to_pickle)
        atomic_write(self.csv, lambda f: f.write(self.df.to_csv(index=False).encode()))

    def last(self, column, default=0.0):
        """The column's value in the last row; `default` when there is none or it is NaN (e.g. a column
        the released code did not write)."""
        if self.df.empty or column not in self.df:
            return default
        value = float(self.df[column].iloc[-1])
        return default if math.isnan(value) else value


# What a pickled pandas table of numbers names, from pandas 1.x (the released code's) to today's: the
# table, its block manager and indexes, NumPy arrays and dtypes. Nothing that can run other code.
_STATS_PICKLE_GLOBALS = {
    ("pandas.core.frame", "DataFrame"), ("pandas", "DataFrame"),
    ("pandas.core.internals.managers", "BlockManager"),
    ("pandas.core.internals.blocks", "new_block"), ("pandas._libs.internals", "_unpickle_block"),
    ("pandas.core.indexes.base", "_new_Index"), ("pandas.core.indexes.base", "Index"), ("pandas", "Index"),
    ("pandas.core.indexes.range", "RangeIndex"), ("pandas", "RangeIndex"),
    ("pandas.core.indexes.numeric", "Int64Index"), ("pandas.core.indexes.numeric", "Float64Index"),
    ("pandas.core.indexes.numeric", "UInt64Index"),
    ("pandas", "StringDtype"), ("pandas.arrays", "StringArray"),
    ("pandas._libs.arrays", "__pyx_unpickle_NDArrayBacked"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "slice"), ("builtins", "object"), ("copyreg", "_reconstructor"), ("functools", "partial"),
    ("_codecs", "encode"),
}


def read_released_stats(path):
    """The DataFrame in a `stats{rank}.pkl` written by the released code (pandas' `to_pickle`), read by an
    unpickler that resolves only `_STATS_PICKLE_GLOBALS` (pandas' own compatibility unpickler underneath,
    for tables written by older pandas). ValueError (one line) for anything else."""
    try:
        from pandas.compat.pickle_compat import Unpickler as PandasUnpickler
    except ImportError:  # not every pandas has it; the plain unpickler reads tables of the same version
        PandasUnpickler = pickle._Unpickler

    class TableUnpickler(PandasUnpickler):
        def find_class(self, module, name):
            if (module, name) not in _STATS_PICKLE_GLOBALS:
                raise pickle.UnpicklingError(f"{module}.{name} is not part of a statistics table")
            return super().find_class(module, name)

    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # NumPy 1 names (numpy.core) resolve with a warning
            table = TableUnpickler(f).load()
    except Exception as e:  # refused global, truncated or foreign file
        raise ValueError(f"{path} is not a readable statistics table ({error_line(e)})") from None
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{path} is not a readable statistics table (a {type(table).__name__})")
    return table


class CurveWriter:
    """Training curves for TensorBoard: event files in `<dump_path>/tensorboard/` (view with
    `tensorboard --logdir <dump_path>`; a resumed run appends, TensorBoard joins them by step).
    Writes only when `enabled` and on rank 0; otherwise every call does nothing. Enabled without the
    tensorboard package installed: a one-line error (exit 2) on every rank, so that none waits for another."""

    def __init__(self, dump_path, enabled, rank=0):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises this when the tensorboard package is missing
            fail("--tensorboard true needs the tensorboard package (pip install tensorboard)")
        if rank == 0:
            self.writer = SummaryWriter(log_dir=os.path.join(dump_path, "tensorboard"))

    def scalars(self, step, values):
        """Write `{tag: value}` at `step` (NaN and None skipped), then flush: curves stay current."""
        if self.writer is None:
            return
        for tag, value in values.items():
            if value is not None and not math.isnan(float(value)):
                self.writer.add_scalar(tag, float(value), step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def git_commit(repo_dir):
    """(commit hash, whether tracked files differ from it) of the checkout at `repo_dir`, or
    ("unknown", None) when it is not a git checkout or git is missing."""
    def git(*cmd):
        return subprocess.run(["git", "-C", str(repo_dir), *cmd], capture_output=True, text=True, timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown", None
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown", None
    return head.stdout.strip(), bool(status.stdout.strip()) if status.returncode == 0 else None


def provenance(device, world_size, repo_dir=Path(__file__).resolve().parents[1]):
    """What produced a run: the code's git commit ("unknown" outside a checkout) and whether it had
    uncommitted changes, Python/torch/torchvision versions, the CUDA and cuDNN versions torch was built
    with, the device and the number of processes."""
    commit, dirty = git_commit(repo_dir)
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{device.type} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "torch": torch.__version__, "torchvision": torchvision_version(),
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "device": name, "world_size": int(world_size)}


def torchvision_version():
    """torchvision's `__version__` without importing it (the import takes ~2 s, which `--help` and the
    one-line errors of every entry script would pay)."""
    module = sys.modules.get("torchvision")
    if module is not None:
        return module.__version__
    try:
        spec = importlib.util.find_spec("torchvision")
        text = Path(spec.submodule_search_locations[0], "version.py").read_text()
        return re.search(r"__version__\s*=\s*['\"]([^'\"]+)", text).group(1)
    except Exception:  # a build without version.py: its distribution's version
        try:
            return importlib.metadata.version("torchvision")
        except importlib.metadata.PackageNotFoundError:
            return "not installed"


def format_provenance(p):
    """One log line from `provenance()`."""
    dirty = " with uncommitted changes" if p["git_dirty"] else ""
    return (f"Code: git {p['git_commit']}{dirty}; Python {p['python']}, torch {p['torch']}, torchvision "
            f"{p['torchvision']}, CUDA {p['cuda']}, cuDNN {p['cudnn']}; device {p['device']}; "
            f"world size {p['world_size']}")


class Clock:
    """Training time of a run of `epochs` epochs of `iterations_per_epoch` iterations, for its log lines and
    statistics. A resumed run continues: `offset` is the training time of its earlier processes (the stats'
    `time` column goes on from it), and the ETA counts only the iterations of this process, which starts at
    iteration `start_iteration` of epoch `start_epoch`."""

    def __init__(self, epochs, iterations_per_epoch, start_epoch=0, start_iteration=0, offset=0.0):
        self.total, self.per_epoch = epochs * iterations_per_epoch, iterations_per_epoch
        self.first = start_epoch * iterations_per_epoch + start_iteration
        self.offset, self.start = offset, time.time()

    def elapsed(self):
        """Seconds of training of the run so far, its earlier processes included."""
        return self.offset + time.time() - self.start

    def eta(self, epoch, it):
        """Time left after iteration `it` of epoch `epoch` (H:MM:SS), from the mean time per iteration of
        this process."""
        iteration = epoch * self.per_epoch + it
        per_iteration = (time.time() - self.start) / max(iteration + 1 - self.first, 1)
        return format_eta(per_iteration * (self.total - iteration - 1))


class AverageMeter:
    """Running average of a scalar (value of the last update, average of all)."""

    def __init__(self):
        self.val = self.avg = self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        self.val = val
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count
