"""Log files, per-epoch statistics, run parameters, ETA."""
import argparse
import logging
import math
import os
import pickle
from pathlib import Path

import pandas as pd
import pytest

from src.logger import Stats, create_logger, format_eta, load_params_json, params_dict, save_params

COLUMNS = ["epoch", "loss", "lr", "time", "knn_top1"]


def fill(stats, epochs):
    for e in epochs:
        row = {"epoch": e, "loss": 10.0 - e, "lr": 0.1 * (e + 1), "time": 60.0 * (e + 1)}
        if e == 1:
            row["knn_top1"] = 42.5
        stats.update(row)


def test_stats_writes_pkl_and_csv(tmp_path):
    base = str(tmp_path / "stats0")
    s = Stats(base, COLUMNS)
    fill(s, range(3))
    pkl = pd.read_pickle(base + ".pkl")
    csv = pd.read_csv(base + ".csv")
    for df in (pkl, csv):
        assert list(df.columns) == COLUMNS
        assert df["epoch"].tolist() == [0, 1, 2]
        assert df["loss"].tolist() == [10.0, 9.0, 8.0]
        assert df["time"].tolist() == [60.0, 120.0, 180.0]
        assert math.isnan(df["knn_top1"][0]) and df["knn_top1"][1] == 42.5 and math.isnan(df["knn_top1"][2])
    assert s.last("loss") == 8.0 and s.last("time") == 180.0
    assert s.last("nope", default=-1.0) == -1.0
    assert sorted(os.listdir(tmp_path)) == ["stats0.csv", "stats0.pkl"]


def test_stats_last_on_empty_table(tmp_path):
    s = Stats(str(tmp_path / "stats0"), COLUMNS)
    assert s.last("time", 0.0) == 0.0
    assert not (tmp_path / "stats0.csv").exists()  # nothing written before the first update


def test_stats_resume_drops_rows_at_and_after_the_resumed_epoch(tmp_path):
    base = str(tmp_path / "stats0")
    fill(Stats(base, COLUMNS), range(5))  # the run got to epoch 4, but the checkpoint says epoch 2
    s = Stats(base, COLUMNS, resume_before_epoch=2)
    assert s.df["epoch"].tolist() == [0, 1]
    assert s.last("time") == 120.0
    fill(s, [2, 3])
    for df in (pd.read_csv(base + ".csv"), pd.read_pickle(base + ".pkl")):
        assert df["epoch"].tolist() == [0, 1, 2, 3]
        assert df["knn_top1"][1] == 42.5


def test_stats_resume_without_files_and_fresh_start_ignores_old_rows(tmp_path):
    base = str(tmp_path / "stats0")
    s = Stats(base, COLUMNS, resume_before_epoch=3)
    assert s.df.empty
    fill(s, range(2))
    fresh = Stats(base, COLUMNS)  # not resuming: the old table is not read back
    assert fresh.df.empty


def test_params_json_round_trip(tmp_path):
    args = argparse.Namespace(nmb_crops=[2, 6], size_crops=(32, 16), base_lr=0.6, arch="resnet18",
                              use_fp16=True, rank=0, sync_bn=None, dump_path=Path("/x/y"), nested=[[1, 2]])
    save_params(args, str(tmp_path))
    got = load_params_json(str(tmp_path))
    assert got == {"nmb_crops": [2, 6], "size_crops": [32, 16], "base_lr": 0.6, "arch": "resnet18",
                   "use_fp16": True, "rank": 0, "sync_bn": None, "dump_path": "/x/y", "nested": "[[1, 2]]"}
    assert got == params_dict(args)
    with open(tmp_path / "params.pkl", "rb") as f:  # released file: the namespace itself
        assert pickle.load(f) == args
    assert load_params_json(str(tmp_path / "missing")) is None


def read_log(path):
    return Path(path).read_text().splitlines()


def close(logger):
    for h in list(logger.handlers):
        h.close()
        logger.removeHandler(h)


def test_create_logger_files_per_rank_and_appends(tmp_path, capsys):
    log0 = create_logger(str(tmp_path), 0)
    log1 = create_logger(str(tmp_path), 1)
    log0.info("first from rank 0")
    log1.info("first from rank 1")
    out = capsys.readouterr().out
    assert "first from rank 0" in out and "rank 1" not in out  # only rank 0 prints
    close(log0)
    close(log1)
    # a restart: a new logger for the same folder appends
    log0 = create_logger(str(tmp_path), 0)
    log0.info("second from rank 0\ncontinued")
    close(log0)
    assert sorted(os.listdir(tmp_path)) == ["train.log", "train.log-1"]
    lines0 = read_log(tmp_path / "train.log")
    assert len(lines0) == 3
    assert lines0[0].endswith("first from rank 0") and lines0[1].endswith("second from rank 0")
    assert lines0[0].startswith("INFO - ")
    assert lines0[2].strip() == "continued" and lines0[2].startswith(" ")  # continuation indented
    assert len(lines0[2]) - len("continued") == lines0[1].index("second")
    lines1 = read_log(tmp_path / "train.log-1")
    assert len(lines1) == 1 and lines1[0].endswith("first from rank 1")


def test_create_logger_twice_does_not_duplicate_lines(tmp_path):
    a = create_logger(str(tmp_path), 2)
    b = create_logger(str(tmp_path), 2)
    b.info("once")
    for h in a.handlers + b.handlers:
        h.flush()
    lines = read_log(tmp_path / "train.log-2")
    assert len(lines) == 1 and lines[0].endswith("once")
    close(a)
    close(b)
    assert not logging.getLogger(a.name).propagate


def test_stats_unreadable_csv_is_moved_aside(tmp_path):
    base = str(tmp_path / "stats0")
    (tmp_path / "stats0.csv").write_bytes(b'"epoch,loss\n\x00\x01 torn')
    logs = []
    s = Stats(base, COLUMNS, resume_before_epoch=3, log=logs.append)
    assert s.df.empty
    assert (tmp_path / "stats0.csv.unreadable").exists() and not (tmp_path / "stats0.csv").exists()
    assert len(logs) == 1 and "unreadable" in logs[0]


def test_load_params_json_unreadable(tmp_path):
    (tmp_path / "params.json").write_text('{"arch": "resnet18",')
    with pytest.raises(ValueError, match="params.json") as info:
        load_params_json(str(tmp_path))
    assert "\n" not in str(info.value)
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a JSON object"):
        load_params_json(str(tmp_path))


@pytest.mark.parametrize("seconds,text", [(0, "0:00:00"), (59.9, "0:00:59"), (3661, "1:01:01"),
                                          (-5, "0:00:00"), (90061.7, "1 day, 1:01:01")])
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_changed_params():
    from src.logger import changed_params
    old = {"lr": 0.1, "epochs": 20, "decay_epochs": [12, 16], "workers": 10, "only_old": 1}
    new = {"lr": 0.1, "epochs": 20.0, "decay_epochs": (12, 16), "workers": 2, "only_new": 2}
    assert changed_params(old, new, ignore={"workers"}) == []
    assert changed_params(old, dict(new, lr=0.2, decay_epochs=(12,)), ignore={"workers"}) == [
        "decay_epochs: [12, 16] -> [12]", "lr: 0.1 -> 0.2"]
    assert changed_params(old, new) == ["workers: 10 -> 2"]
