"""Logs, per-epoch statistics and run parameters, in the released file names.

`train.log` (rank 0; `train.log-{rank}` for the others), `stats{rank}.pkl` (pandas), `params.pkl`.
Alongside: `stats{rank}.csv` and `params.json`, which are what resuming and tools read (no pickle from a
run folder is ever loaded back). Stats and parameter files are replaced atomically, so a kill while they
are written leaves the previous complete version."""
import json
import logging
import os
import pickle
import sys
import time
from datetime import timedelta

import pandas as pd

from .checkpoint import atomic_write


class _ElapsedFormatter(logging.Formatter):
    def __init__(self):
        super().__init__()
        self.start = time.time()

    def format(self, record):
        elapsed = timedelta(seconds=round(record.created - self.start))
        prefix = f"{record.levelname} - {time.strftime('%x %X')} - {elapsed} - "
        return prefix + record.getMessage().replace("\n", "\n" + " " * len(prefix))


def create_logger(dump_path, rank, name="unmix"):
    """Log to `train.log` (rank 0) or `train.log-{rank}`, appending across restarts; rank 0 also to stdout."""
    path = os.path.join(dump_path, "train.log" if rank == 0 else f"train.log-{rank}")
    logger = logging.getLogger(f"{name}.{rank}.{path}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for h in list(logger.handlers):  # a second call for the same file: close, don't leak, the old handler
        logger.removeHandler(h)
        h.close()
    fmt = _ElapsedFormatter()
    fh = logging.FileHandler(path, mode="a")
    fh.setFormatter(fmt)
    logger.addHandler(fh)
    if rank == 0:
        sh = logging.StreamHandler(sys.stdout)
        sh.setFormatter(fmt)
        logger.addHandler(sh)
    return logger


class Stats:
    """One row per epoch, written after each update to `{name}.pkl` (released) and `{name}.csv`.

    On restart the rows are read back from the CSV and rows at or past the resumed epoch are dropped,
    so a resumed run's table has each epoch once. An unreadable CSV is reported (`log`), kept aside as
    `{name}.csv.unreadable` and the table starts empty."""

    def __init__(self, path_without_ext, columns, resume_before_epoch=None, log=print):
        self.pkl, self.csv = path_without_ext + ".pkl", path_without_ext + ".csv"
        self.columns = list(columns)
        self.df = pd.DataFrame(columns=self.columns)
        if resume_before_epoch is not None and os.path.isfile(self.csv):
            try:
                old = pd.read_csv(self.csv)
                if "epoch" in old:
                    old = old[pd.to_numeric(old["epoch"]) < resume_before_epoch]
                self.df = old.reindex(columns=self.columns)
            except Exception as e:  # pandas raises several types for a damaged file
                os.replace(self.csv, self.csv + ".unreadable")
                log(f"{self.csv} is unreadable ({type(e).__name__}); moved to {self.csv}.unreadable, "
                    "the statistics table starts empty")

    def update(self, row):
        new = pd.DataFrame([[row.get(c, float("nan")) for c in self.columns]], columns=self.columns)
        self.df = new if self.df.empty else pd.concat([self.df, new], ignore_index=True)
        atomic_write(self.pkl, self.df.to_pickle)
        atomic_write(self.csv, lambda f: f.write(self.df.to_csv(index=False).encode()))

    def last(self, column, default=0.0):
        if self.df.empty or column not in self.df:
            return default
        return float(self.df[column].iloc[-1])


def save_params(args, dump_path):
    """`params.pkl` (released) and `params.json` (readable, compared on resume), each replaced atomically."""
    atomic_write(os.path.join(dump_path, "params.pkl"), lambda f: pickle.dump(args, f))
    write_json(os.path.join(dump_path, "params.json"), params_dict(args), indent=1, sort_keys=True)


def write_json(path, obj, **kw):
    """json.dump to `path`, replaced atomically."""
    atomic_write(path, lambda f: f.write(json.dumps(obj, **kw).encode()))


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


def format_eta(seconds):
    seconds = max(0, int(seconds))
    return str(timedelta(seconds=seconds))


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
