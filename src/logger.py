"""Logs, per-epoch statistics and run parameters, in the released file names.

`train.log` (rank 0; `train.log-{rank}` for the others), `stats{rank}.pkl` (pandas), `params.pkl`.
Alongside: `stats{rank}.csv` and `params.json`, which are what resuming and tools read (no pickle from a
run folder is ever loaded back)."""
import json
import logging
import os
import pickle
import sys
import time
from datetime import timedelta

import pandas as pd


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
    logger.handlers.clear()
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
    so a resumed run's table has each epoch once."""

    def __init__(self, path_without_ext, columns, resume_before_epoch=None):
        self.pkl, self.csv = path_without_ext + ".pkl", path_without_ext + ".csv"
        self.columns = list(columns)
        self.df = pd.DataFrame(columns=self.columns)
        if resume_before_epoch is not None and os.path.isfile(self.csv):
            old = pd.read_csv(self.csv)
            old = old[old["epoch"] < resume_before_epoch] if "epoch" in old else old
            self.df = old.reindex(columns=self.columns)

    def update(self, row):
        new = pd.DataFrame([[row.get(c, float("nan")) for c in self.columns]], columns=self.columns)
        self.df = new if self.df.empty else pd.concat([self.df, new], ignore_index=True)
        self.df.to_pickle(self.pkl)
        self.df.to_csv(self.csv, index=False)

    def last(self, column, default=0.0):
        if self.df.empty or column not in self.df:
            return default
        return float(self.df[column].iloc[-1])


def save_params(args, dump_path):
    """`params.pkl` (released) and `params.json` (readable, compared on resume)."""
    with open(os.path.join(dump_path, "params.pkl"), "wb") as f:
        pickle.dump(args, f)
    with open(os.path.join(dump_path, "params.json"), "w") as f:
        json.dump(params_dict(args), f, indent=1, sort_keys=True)


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
    path = os.path.join(dump_path, "params.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def format_eta(seconds):
    seconds = max(0, int(seconds))
    return str(timedelta(seconds=seconds))
