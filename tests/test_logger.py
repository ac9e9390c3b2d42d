"""Log files, per-epoch statistics, run parameters, ETA."""
import argparse
import logging
import math
import os
import pickle
import time
from pathlib import Path

import pandas as pd
import pytest

from src.runtime.durations import format_eta
from src.runtime.logs import (Clock, CurveWriter, Stats, create_logger, format_provenance, provenance,
                              read_released_stats)
from src.runtime.run_folder import load_params_json, params_dict, save_params
from tests.released_format import RELEASED_STATS_PKL, RELEASED_STATS_ROWS

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


def released_style_stats(path, rows):
    """stats0.pkl as the released code writes it (SwAV's PD_Stats): rows appended with .loc, to_pickle."""
    df = pd.DataFrame(columns=["epoch", "loss"])
    for row in rows:
        df.loc[len(df.index)] = row
    df.to_pickle(path)


@pytest.mark.parametrize("writer", ["pandas 1.1.5 (file)", "this pandas"])
def test_resume_reads_the_released_stats_pickle(tmp_path, writer):
    """A released run folder has stats0.pkl and no CSV: resuming keeps its rows before the resumed epoch."""
    base = str(tmp_path / "stats0")
    if writer == "this pandas":
        released_style_stats(base + ".pkl", RELEASED_STATS_ROWS)
    else:
        Path(base + ".pkl").write_bytes(RELEASED_STATS_PKL.read_bytes())
    original = Path(base + ".pkl").read_bytes()
    logs = []
    s = Stats(base, COLUMNS, resume_before_epoch=2, log=logs.append)  # the checkpoint says 2 epochs done
    assert s.df["epoch"].tolist() == [0, 1] and s.df["loss"].tolist() == [9.2575, 9.0178]
    assert "3 rows of the released run's statistics read" in logs[0]
    assert s.last("time", 0.0) == 0.0  # the released table has no time column
    s.update({"epoch": 2, "loss": 8.5, "lr": 0.1, "time": 60.0})
    for df in (pd.read_csv(base + ".csv"), pd.read_pickle(base + ".pkl")):
        assert list(df.columns) == COLUMNS
        assert df["epoch"].tolist() == [0, 1, 2] and df["loss"].tolist() == [9.2575, 9.0178, 8.5]
    # the released file itself, with its row of epoch 2, is kept as it was
    assert Path(base + ".pkl.released").read_bytes() == original and "stats0.pkl.released" in logs[0]


def test_released_stats_reader_refuses_other_pickles(tmp_path):
    """A stats0.pkl that names anything but a table's classes is not executed, and is kept aside."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    base = str(tmp_path / "stats0")
    with open(base + ".pkl", "wb") as f:
        pickle.dump({"epoch": Evil()}, f)
    with pytest.raises(ValueError, match="not a readable statistics table.*io.open|builtins.open"):
        read_released_stats(base + ".pkl")
    logs = []
    s = Stats(base, COLUMNS, resume_before_epoch=2, log=logs.append)
    assert s.df.empty and not marker.exists()
    assert not os.path.exists(base + ".pkl") and os.path.exists(base + ".pkl.released")
    assert "kept as" in logs[0] and "\n" not in logs[0]
    with open(base + ".pkl", "wb") as f:
        pickle.dump([1, 2], f)
    with pytest.raises(ValueError, match="a list"):
        read_released_stats(base + ".pkl")


def test_params_json_round_trip(tmp_path):
    args = argparse.Namespace(nmb_crops=[2, 6], size_crops=(32, 16), base_lr=0.6, arch="resnet18",
                              use_fp16=True, rank=0, sync_bn=None, dump_path=Path("/x/y"), nested=[[1, 2]])
    save_params(args, str(tmp_path))
    got = load_params_json(str(tmp_path))
    assert got.pop("provenance")["git_commit"]  # see test_provenance
    assert got == {"nmb_crops": [2, 6], "size_crops": [32, 16], "base_lr": 0.6, "arch": "resnet18",
                   "use_fp16": True, "rank": 0, "sync_bn": None, "dump_path": "/x/y", "nested": "[[1, 2]]"}
    assert got == params_dict(args)
    with open(tmp_path / "params.pkl", "rb") as f:  # released file: the namespace itself
        assert pickle.load(f) == args
    assert load_params_json(str(tmp_path / "missing")) is None


def test_provenance(tmp_path):
    import subprocess

    import torch
    import torchvision
    repo = Path(__file__).resolve().parents[1]
    p = provenance(torch.device("cpu"), 3)
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert p["git_commit"] == (head.stdout.strip() if head.returncode == 0 else "unknown")
    assert (p["torch"], p["torchvision"], p["cuda"]) == (torch.__version__, torchvision.__version__, torch.version.cuda)
    assert p["device"].startswith("cpu") and p["world_size"] == 3
    assert provenance("cpu", 1, repo_dir=tmp_path)["git_commit"] == "unknown"  # not a checkout
    line = format_provenance(p)
    assert "\n" not in line and p["git_commit"] in line and f"torch {torch.__version__}" in line
    assert "world size 3" in line and "cuDNN" in line
    args = argparse.Namespace(arch="resnet18", device=torch.device("cpu"), world_size=2)
    save_params(args, str(tmp_path))
    recorded = load_params_json(str(tmp_path))["provenance"]
    assert recorded == dict(p, world_size=2)


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


def test_clock_of_a_resumed_run():
    """The run's time goes on from its earlier processes'; the ETA counts this process's iterations only."""
    clock = Clock(epochs=2, iterations_per_epoch=10, start_epoch=1, start_iteration=4, offset=100.0)
    clock.start = time.time() - 30  # 30 s for iterations 4, 5, 6 of epoch 1: 10 s each
    assert clock.eta(1, 6) == "0:00:30"  # 3 iterations left
    assert clock.eta(1, 9) == "0:00:00"
    assert 130 <= clock.elapsed() < 131


def read_curves(folder):
    """{tag: [(step, value), ...]} from the TensorBoard event files in `folder`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_curve_writer_writes_event_files_tensorboard_reads(tmp_path):
    pytest.importorskip("tensorboard")
    curves = CurveWriter(str(tmp_path), enabled=True)
    curves.scalars(0, {"train/loss": 9.25, "train/lr": 0.1, "knn/top1": float("nan")})
    curves.scalars(1, {"train/loss": 9.0, "train/lr": 0.05, "knn/top1": 31.5})
    got = read_curves(tmp_path / "tensorboard")  # flushed after each call: readable before close
    assert got["train/loss"] == [(0, 9.25), (1, 9.0)]
    assert got["knn/top1"] == [(1, 31.5)]  # NaN (not measured that epoch) is not written
    assert [s for s, _ in got["train/lr"]] == [0, 1] and got["train/lr"][1][1] == pytest.approx(0.05)
    curves.close()
    resumed = CurveWriter(str(tmp_path), enabled=True)  # a resumed run appends a new event file
    resumed.scalars(2, {"train/loss": 8.5})
    resumed.close()
    assert read_curves(tmp_path / "tensorboard")["train/loss"][-1] == (2, 8.5)


@pytest.mark.parametrize("enabled, rank", [(False, 0), (True, 1)])
def test_curve_writer_off_or_other_rank_writes_nothing(tmp_path, enabled, rank):
    if enabled:  # without tensorboard, enabled is a one-line error on every rank (the next test)
        pytest.importorskip("tensorboard")
    curves = CurveWriter(str(tmp_path), enabled=enabled, rank=rank)
    curves.scalars(0, {"train/loss": 1.0})
    curves.close()
    assert os.listdir(tmp_path) == []


def test_curve_writer_without_tensorboard_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import sys
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package gives
    with pytest.raises(SystemExit) as e:
        CurveWriter(str(tmp_path), enabled=True)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "pip install tensorboard" in err
    with pytest.raises(SystemExit):  # every rank stops, not only the one that writes
        CurveWriter(str(tmp_path), enabled=True, rank=1)
    assert CurveWriter(str(tmp_path), enabled=False).writer is None  # off: no import, no error


def test_changed_params():
    from src.runtime.run_folder import changed_params
    old = {"lr": 0.1, "epochs": 20, "decay_epochs": [12, 16], "workers": 10, "only_old": 1}
    new = {"lr": 0.1, "epochs": 20.0, "decay_epochs": (12, 16), "workers": 2, "only_new": 2}
    assert changed_params(old, new, ignore={"workers"}) == []
    assert changed_params(old, dict(new, lr=0.2, decay_epochs=(12,)), ignore={"workers"}) == [
        "decay_epochs: [12, 16] -> [12]", "lr: 0.1 -> 0.2"]
    assert changed_params(old, new) == ["workers: 10 -> 2"]
