"""The figures a run records stay true across reruns and restarts: a rerun of a finished evaluation changes
none of its files, and the seconds a resumed evaluation or pretraining records count the work of every
process it took (a stretch of wall time spent inside the first process, made here by pausing it with
SIGSTOP, is not lost when that process is stopped and the run resumed).

Tiny CPU runs on 100 fake CIFAR-10 images, through the ForkRunner (tests/e2e_helpers.py).
"""
import json
import math
import os
import signal
import time

import pandas as pd
import pytest
import torch

from tests.e2e_helpers import EVAL, MAIN, forked_run_fixtures, pid_alive, tiny_args, wait_for_log

pytestmark = pytest.mark.slow

PAUSE = 3.0  # seconds a first process is held (SIGSTOP) before it is stopped


work, data, runner = forked_run_fixtures("recorded_times")


def eval_args(data, dump, pretrained, epochs, *extra):
    return ["--data_path", data, "--pretrained", pretrained, "--dump_path", dump, "--epochs", epochs, "--arch",
            "resnet18", "--width_per_group", 8, "--batch_size", 16, "--workers", 0, "--lr", 0.01, *extra]


def folder_files(folder):
    """{name: bytes} of the files an evaluation leaves (its log, appended by every run, and lock aside)."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.is_file() and p.name not in ("train.log", "run.lock")}


def pause_then_stop(runner, handle, log, needle):
    """Wait for `needle` in the log, hold the process for PAUSE seconds, then send it the stop signal."""
    wait_for_log(log, needle, alive=lambda: pid_alive(handle.pid))
    os.kill(handle.pid, signal.SIGSTOP)
    time.sleep(PAUSE)
    os.kill(handle.pid, signal.SIGCONT)
    os.kill(handle.pid, signal.SIGUSR1)
    return runner.wait(handle)


@pytest.mark.parametrize("probe", ["released", "cached"])
def test_a_rerun_of_a_finished_evaluation_changes_nothing(work, data, runner, tiny_checkpoint, probe):
    dump = work / f"finished_{probe}"
    args = eval_args(data, dump, tiny_checkpoint, 2, "--probe", probe)
    res = runner.run(EVAL, args, cwd=work)
    assert res.returncode == 0, res.explain()
    before = folder_files(dump)
    best = json.loads(before["results.json"])["best_top1"]
    time.sleep(1.0)   # a file written again would have another time, and other seconds
    for again in (args, args + ["--log_freq", 7]):   # the same command; an operational flag changed
        res = runner.run(EVAL, again, cwd=work)
        assert res.returncode == 0, res.explain()
        after = folder_files(dump)
        assert [name for name in before if after.get(name) != before[name]] == []
        assert after == before
        assert "This evaluation finished earlier (2 epochs" in res.stdout
        assert f"Top-1 test accuracy: {best:.1f}" in res.stdout
        assert f"Linear evaluation done. Results: {dump / 'results.json'}" in res.stdout.rstrip().splitlines()[-1]
        assert {p.name for p in dump.iterdir()} >= set(before)


def test_a_resumed_evaluation_counts_the_seconds_of_every_process(work, data, runner, tiny_checkpoint):
    dump = work / "resumed_eval"
    args = eval_args(data, dump, tiny_checkpoint, 3, "--log_freq", 1)
    res = pause_then_stop(runner, runner.start(EVAL, args, cwd=work), dump / "train.log", "Epoch[0] - Iter: [0/")
    assert res.returncode == 3, res.explain()
    stopped_after = torch.load(dump / "checkpoint.pth.tar", weights_only=True)["epoch"]
    assert 1 <= stopped_after < 3
    t0 = time.time()
    res = runner.run(EVAL, args, cwd=work)
    second = time.time() - t0
    assert res.returncode == 0 and f"Resumed linear evaluation from epoch {stopped_after}" in res.stdout, res.explain()
    seconds = json.loads((dump / "results.json").read_text())["seconds"]
    assert PAUSE <= seconds <= PAUSE + second + 60
    times = pd.read_csv(dump / "stats0.csv")["time"].tolist()
    assert len(times) == 3 and times[0] >= PAUSE and all(a < b for a, b in zip(times, times[1:]))
    assert times[-1] <= seconds


def test_a_resumed_pretraining_counts_the_seconds_of_every_process(work, data, runner):
    """Stopped in the middle of epoch 1 after a pause, resumed for one epoch (--epochs_run_limit), then to the
    end: `time` goes on from the first process's, its pause included; images/s stay those of each epoch."""
    dump = work / "resumed_pretraining"
    args = tiny_args(data, dump, 3, "--log_freq", 1)
    res = pause_then_stop(runner, runner.start(MAIN, args, cwd=work), dump / "train.log", "Epoch: [1][0/")
    assert res.returncode == 3, res.explain()
    first = pd.read_csv(dump / "stats0.csv")
    assert first["epoch"].tolist() == [0]
    res = runner.run(MAIN, args + ["--epochs_run_limit", 1], cwd=work)
    assert res.returncode == 0 and "Pretraining paused" in res.stdout, res.explain()
    res = runner.run(MAIN, args, cwd=work)
    assert res.returncode == 0 and "Pretraining done" in res.stdout, res.explain()
    stats = pd.read_csv(dump / "stats0.csv")
    assert stats["epoch"].tolist() == [0, 1, 2]
    times = stats["time"].tolist()
    assert times[0] == first["time"].iloc[0]
    assert times[1] - times[0] >= PAUSE, times   # epoch 1 took the pause of the first process and more
    assert all(a < b for a, b in zip(times, times[1:])), times
    assert all(math.isfinite(v) and v > 0 for v in stats["images_per_s"])
    assert torch.load(dump / "checkpoint.pth.tar", weights_only=True)["elapsed"] >= times[-1]
