"""eval_linear.py: the linear classifier (released `RegLog`), and `--augment batched` end to end on the
small real CIFAR-10 image folder: its results, statistics and checkpoint, a resume after an epoch killed
half-way (the same numbers and weights as the run that was not interrupted), and two processes."""
import json
import signal
import socket
import subprocess
import sys

import pandas as pd
import pytest
import torch

from eval_linear import RegLog
from tests.e2e_helpers import EVAL, RUN_ENV, run_script, wait_for_log
from tests.fake_cifar import CIFAR10_JPG_SMALL

STATS_COLUMNS = ["epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val", "prec5_val"]


@pytest.mark.parametrize("use_bn", [False, True])
def test_reglog_with_global_pooling_has_no_batchnorm_as_released(use_bn):
    """Released: the BatchNorm of --use_bn exists only without global pooling; with it, pooling + linear."""
    torch.manual_seed(0)
    head = RegLog(10, 64, global_avg=True, use_bn=use_bn)
    assert head.bn is None
    assert set(head.state_dict()) == {"linear.weight", "linear.bias"}
    assert head.linear.weight.std().item() == pytest.approx(0.01, rel=0.1) and not head.linear.bias.any()
    x = torch.randn(4, 64, 5, 5)
    expected = x.mean(dim=(2, 3)) @ head.linear.weight.T + head.linear.bias
    assert torch.allclose(head(x), expected, atol=1e-6)


def test_reglog_without_global_pooling_is_refused():
    with pytest.raises(ValueError, match="--global_pooling true"):
        RegLog(10, 64, global_avg=False, use_bn=True)


def batched_args(dump, pretrained, epochs=3, *extra):
    """300 training images in batches of 16: 19 iterations per epoch, one per chunk of crops."""
    return ["--data_path", CIFAR10_JPG_SMALL, "--pretrained", pretrained, "--dump_path", dump, "--arch", "resnet18",
            "--width_per_group", 8, "--batch_size", 16, "--workers", 0, "--lr", 0.01, "--epochs", epochs,
            "--augment", "batched", "--crops_per_chunk", 16, "--log_freq", 1, *extra]


def load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.slow
def test_batched_crops_results_stats_and_resume_after_an_interrupted_epoch(tmp_path, tiny_checkpoint):
    whole = tmp_path / "whole"
    res = run_script(EVAL, batched_args(whole, tiny_checkpoint), cwd=tmp_path)
    assert res.returncode == 0, res.explain()
    assert "Batched crops: 16 per chunk on cpu; test features computed once (100, 256)" in res.stdout
    assert "Epoch[2] - Iter: [18/19]" in res.stdout and "(released probe, batched crops," in res.stdout
    stats = pd.read_pickle(whole / "stats0.pkl")
    assert list(stats.columns) == STATS_COLUMNS + ["time"] and stats["epoch"].tolist() == [0, 1, 2]
    percentages = stats[["prec1", "prec5", "prec1_val", "prec5_val"]].stack()
    assert stats.notna().all().all() and percentages.between(0, 100).all()
    assert (stats["prec1"] <= stats["prec5"]).all() and (stats["prec1_val"] <= stats["prec5_val"]).all()
    results = json.loads((whole / "results.json").read_text())
    assert results["mode"] == "released" and results["augment"] == "batched" and results["epochs"] == 3
    assert results["best_top1"] == stats["prec1_val"].max()
    assert (results["last_top1"], results["last_top5"]) == (stats["prec1_val"].iloc[-1], stats["prec5_val"].iloc[-1])
    assert f"Top-1 test accuracy: {results['best_top1']:.1f}" in res.stdout
    ckpt = load(whole / "checkpoint.pth.tar")
    assert ckpt["epoch"] == 3 and set(ckpt["state_dict"]) == {"linear.weight", "linear.bias"}
    assert ckpt["best_acc"] == results["best_top1"] and len(ckpt["optimizer"]["state"]) == 2

    # the same evaluation killed during its second epoch, then run again
    killed = tmp_path / "killed"
    cmd = [sys.executable, str(EVAL)] + [str(a) for a in batched_args(killed, tiny_checkpoint)]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=RUN_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_log(killed / "train.log", "Epoch[1] - Iter: [0/19]", alive=lambda: proc.poll() is None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert load(killed / "checkpoint.pth.tar")["epoch"] == 1  # killed within epoch 1
    res = run_script(EVAL, batched_args(killed, tiny_checkpoint), cwd=tmp_path)
    assert res.returncode == 0 and "Resumed linear evaluation from epoch 1" in res.stdout, res.explain()
    resumed = load(killed / "checkpoint.pth.tar")
    assert all(torch.equal(resumed["state_dict"][k], v) for k, v in ckpt["state_dict"].items())
    for i, state in ckpt["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][i]["momentum_buffer"], state["momentum_buffer"])
    pd.testing.assert_frame_equal(pd.read_csv(killed / "stats0.csv").drop(columns="time"),
                                  pd.read_csv(whole / "stats0.csv").drop(columns="time"))
    assert json.loads((killed / "results.json").read_text())["best_top1"] == results["best_top1"]


@pytest.mark.slow
def test_batched_crops_on_two_processes(tmp_path, tiny_checkpoint):
    """torchrun, 2 processes (gloo): each trains on its half of the loader's order with gradients averaged
    over both, so both hold the same classifier; rank 0 writes the checkpoint and results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dump = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(EVAL)]
    res = subprocess.run(cmd + [str(a) for a in batched_args(dump, tiny_checkpoint, 2)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300, env=RUN_ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "Epoch[1] - Iter: [9/10]" in (dump / "train.log").read_text()  # 150 images per process
    stats = [pd.read_csv(dump / f"stats{rank}.csv") for rank in (0, 1)]
    pd.testing.assert_frame_equal(stats[0][["loss_val", "prec1_val"]], stats[1][["loss_val", "prec1_val"]])
    assert not stats[0]["loss"].equals(stats[1]["loss"])  # other images, other crops
    assert json.loads((dump / "results.json").read_text())["best_top1"] == stats[0]["prec1_val"].max()
