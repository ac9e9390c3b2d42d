"""End to end: the real entry scripts as subprocesses on tiny data in the real on-disk formats.

CIFAR-10 and CIFAR-100 in torchvision's pickled-batch format, the small real CIFAR-10 image folder
(tests/data/cifar10_jpg_small), and a 2-process torchrun (gloo). Each run is a few seconds on 2 cores: a
narrow network (--width_per_group 8) on a few hundred images."""
import importlib.util
import json
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from tests.fake_cifar import CIFAR10_JPG_SMALL, write_cifar10, write_cifar100
from tests.released_format import RELEASED_STATS_PKL, RELEASED_STATS_ROWS, released_checkpoint, save_like_numpy1

REPO = Path(__file__).resolve().parents[1]
TINY = ["--arch", "resnet18", "--width_per_group", "8", "--hidden_mlp", "32", "--feat_dim", "16",
        "--nmb_prototypes", "10", "--batch_size", "16", "--workers", "0", "--warmup_epochs", "1",
        "--base_lr", "0.6", "--final_lr", "0.0006", "--freeze_prototypes_niters", "3", "--log_freq", "2"]
TINY_EVAL = ["--arch", "resnet18", "--width_per_group", "8", "--batch_size", "16", "--workers", "0",
             "--lr", "0.01", "--log_freq", "5"]

pytestmark = pytest.mark.slow

TENSORBOARD = importlib.util.find_spec("tensorboard") is not None


def run(script, args, cwd, launcher=None, timeout=300):
    cmd = (launcher or [sys.executable]) + [str(REPO / script)] + [str(a) for a in args]
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res.stdout + res.stderr


def top1_lines(out):
    best = re.search(r"Top-1 test accuracy: ([\d.]+)", out)
    last = re.search(r"Last-epoch test accuracy: top-1 ([\d.]+) top-(\d) ([\d.]+)", out)
    assert best and last, out[-2000:]
    return float(best.group(1)), float(last.group(1)), float(last.group(3))


def check_pretrain_dump(dump, epochs):
    assert (dump / "checkpoint.pth.tar").is_file()
    assert (dump / "params.pkl").is_file() and (dump / "params.json").is_file()
    assert (dump / "train.log").is_file()
    recorded = json.loads((dump / "params.json").read_text())["provenance"]
    assert recorded["torch"] == torch.__version__ and recorded["git_commit"]
    assert f"Code: git {recorded['git_commit']}" in (dump / "train.log").read_text()
    ckpt = torch.load(dump / "checkpoint.pth.tar", weights_only=True)
    assert ckpt["epoch"] == epochs
    assert all(k.startswith("module.") for k in ckpt["state_dict"])  # released names, DDP prefix
    assert "module.prototypes.weight" in ckpt["state_dict"]
    stats = pd.read_pickle(dump / "stats0.pkl")
    assert list(stats["epoch"]) == list(range(epochs))
    assert stats["loss"].notna().all() and (stats["loss"].abs() < 1e3).all()
    return stats


@pytest.fixture(scope="module")
def c10_runs(tmp_path_factory):
    """On CIFAR-10 pickles: a pretraining paused after 2 of 3 epochs (a copy of its folder kept) and resumed,
    then both probes' evaluations of it (2 epochs, --tensorboard true when tensorboard is installed). Shared
    by the test of the runs and the test of the evaluations' TensorBoard curves (one set of runs for both)."""
    tmp_path = tmp_path_factory.mktemp("c10_runs")
    write_cifar10(tmp_path / "c10", n_train_per_batch=20, n_test=40)
    dump = tmp_path / "exp"
    common = ["--data_path", tmp_path / "c10", "--dump_path", dump, "--epochs", 3] + TINY
    runs = {"tmp_path": tmp_path, "dump": dump, "paused_dump": tmp_path / "exp_paused", "evals": {}}
    runs["paused_out"] = run("main_swav_unmix.py", common + ["--epochs_run_limit", 2], tmp_path)
    shutil.copytree(dump, runs["paused_dump"])
    runs["resumed_out"] = run("main_swav_unmix.py", common, tmp_path)
    for probe in ("released", "cached"):
        ev = tmp_path / f"exp_linear_eval_{probe}"
        out = run("eval_linear.py", ["--data_path", tmp_path / "c10", "--pretrained", dump / "checkpoint.pth.tar",
                                     "--dump_path", ev, "--epochs", 2, "--num_labels", 10, "--probe", probe,
                                     "--tensorboard", str(TENSORBOARD).lower()] + TINY_EVAL, tmp_path)
        runs["evals"][probe] = (ev, out)
    return runs


def test_cifar10_pickles_pretrain_resume_and_linear_eval(c10_runs):
    paused = c10_runs["paused_dump"]
    assert "Pretraining paused" in c10_runs["paused_out"]
    check_pretrain_dump(paused, 2)
    assert {p.name for p in (paused / "checkpoints").iterdir()} == {"ckp-0.pth"}  # epoch % checkpoint_freq == 0 or the last epoch
    dump, out = c10_runs["dump"], c10_runs["resumed_out"]
    assert "Resumed from" in out and "epoch 2" in out
    stats = check_pretrain_dump(dump, 3)
    assert len(stats) == 3
    assert (dump / "checkpoints" / "ckp-2.pth").is_file()

    for probe, (ev, out) in c10_runs["evals"].items():
        best, last1, last5 = top1_lines(out)
        assert 0 <= last1 <= best <= 100 and last1 <= last5 <= 100
        res = json.loads((ev / "results.json").read_text())
        assert res["best_top1"] == pytest.approx(best, abs=0.05) and res["mode"] == probe
        ev_stats = pd.read_pickle(ev / "stats0.pkl")
        assert list(ev_stats.columns) == ["epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val", "prec5_val"] + (
            ["time"] if probe == "released" else [])   # the released loop's seconds so far, across restarts
        assert len(ev_stats) == 2
        assert "missing" not in out.lower() or "missing_keys=[]" in out
        # the last line says where the results are, and how to list them beside the other runs
        last = (ev / "train.log").read_text().rstrip().splitlines()[-1]
        assert f"Linear evaluation done. Results: {ev / 'results.json'} (every run side by side: python " in last
        assert last.endswith(f"tools/results.py {ev.parent})"), last


def test_cifar100_pickles_swav_only(tmp_path):
    write_cifar100(tmp_path / "c100", n_train=200, n_test=100)
    dump = tmp_path / "swav"
    run("main_swav_unmix.py", ["--data_path", tmp_path / "c100", "--dump_path", dump, "--epochs", 2,
                               "--run_swav", "true"] + TINY, tmp_path)
    check_pretrain_dump(dump, 2)
    out = run("eval_linear.py", ["--data_path", tmp_path / "c100", "--pretrained", dump / "checkpoint.pth.tar",
                                 "--dump_path", tmp_path / "swav_linear_eval", "--epochs", 2, "--num_labels", 100,
                                 "--probe", "cached"] + TINY_EVAL, tmp_path)
    best, last1, last5 = top1_lines(out)
    assert 0 <= last1 <= best <= 100


def test_jpeg_image_folder_with_knn_and_results_table(tmp_path):
    root = CIFAR10_JPG_SMALL
    dump = tmp_path / "runs" / "unmix"
    out = run("main_swav_unmix.py", ["--data_path", root, "--dump_path", dump, "--epochs", 2,
                                     "--knn_freq", 1, "--knn_k", 400] + TINY, tmp_path)
    assert "Building data done with 300 images" in out
    assert "kNN monitor (k=300: --knn_k 400 but 300 training images): top-1" in out  # the k it used
    assert f"Pretraining done. Checkpoint: {dump / 'checkpoint.pth.tar'} (2 epochs)" in out
    assert json.loads((dump / "params.json").read_text())["data"] == {"train_images": 300, "classes": 10}
    stats = check_pretrain_dump(dump, 2)
    assert stats["knn_top1"].between(0, 100).all()
    assert re.search(r"ETA \d+:\d\d:\d\d", out) and "img/s" in out
    out = run("eval_linear.py", ["--data_path", root, "--pretrained", dump / "checkpoint.pth.tar",
                                 "--dump_path", tmp_path / "runs" / "unmix_linear_eval", "--epochs", 2,
                                 "--probe", "cached"] + TINY_EVAL, tmp_path)
    top1_lines(out)
    recorded = json.loads((tmp_path / "runs" / "unmix_linear_eval" / "params.json").read_text())["data"]
    assert recorded == {"train_images": 300, "test_images": 100, "classes": 10}
    run("tools/results.py", [tmp_path / "runs", "--out", tmp_path / "report"], tmp_path)
    table = (tmp_path / "report" / "results.md").read_text()
    assert "Un-Mix" in table and "cifar10" in table
    assert (tmp_path / "report" / "accuracy_vs_epochs.png").stat().st_size > 1000


def test_linear_eval_tensorboard_curves(c10_runs):
    """--tensorboard true: per-epoch train loss, test top-1/top-5 and lr of both probes, readable by
    TensorBoard's own reader, equal to the stats table (the evaluations of `c10_runs`)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    assert set(c10_runs["evals"]) == {"released", "cached"}
    for probe, (ev, _) in c10_runs["evals"].items():
        acc = EventAccumulator(str(ev / "tensorboard"))
        acc.Reload()
        stats = pd.read_csv(ev / "stats0.csv")
        for tag, column in (("linear/train_loss", "loss"), ("linear/test_top1", "prec1_val"),
                            ("linear/test_top5", "prec5_val")):
            events = acc.Scalars(tag)
            assert [e.step for e in events] == [0, 1], (probe, tag)
            assert [e.value for e in events] == pytest.approx(stats[column].tolist(), rel=1e-6), (probe, tag)
        lrs = [e.value for e in acc.Scalars("linear/lr")]
        assert lrs[0] == pytest.approx(0.01) and lrs[1] < lrs[0]  # cosine over 2 epochs


def test_pretraining_tensorboard_curves(tmp_path):
    """--tensorboard true in pretraining: one point per epoch of each stats column, equal to the stats
    table, and the loss of each log line against the global iteration."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    write_cifar10(tmp_path / "c10", n_train_per_batch=20, n_test=40)
    dump = tmp_path / "pre"
    run("main_swav_unmix.py", ["--data_path", tmp_path / "c10", "--dump_path", dump, "--epochs", 2, "--knn_freq", 1,
                               "--knn_k", 10, "--log_freq", 2, "--tensorboard", "true"] + TINY, tmp_path)
    acc = EventAccumulator(str(dump / "tensorboard"))
    acc.Reload()
    stats = pd.read_csv(dump / "stats0.csv")
    for column in ("loss", "lr", "knn_top1", "images_per_s"):
        events = acc.Scalars(f"pretrain/{column}")
        assert [e.step for e in events] == [0, 1], column
        assert [e.value for e in events] == pytest.approx(stats[column].tolist(), rel=1e-6), column
    per_iteration = acc.Scalars("pretrain/loss_per_iteration")
    assert [e.step for e in per_iteration] == [0, 2, 4, 6, 8, 10]  # 6 iterations per epoch, every 2nd logged
    assert "pretrain/max_memory_mb" not in acc.Tags()["scalars"]  # CPU: not measured, not written


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes(tmp_path):
    write_cifar10(tmp_path / "c10", n_train_per_batch=20, n_test=40)
    dump = tmp_path / "exp2"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                f"--master_port={free_port()}"]
    run("main_swav_unmix.py", ["--data_path", tmp_path / "c10", "--dump_path", dump, "--epochs", 2,
                               "--batch_size", 8] + TINY[:TINY.index("--batch_size")]
        + TINY[TINY.index("--batch_size") + 2:], tmp_path, launcher=launcher)
    log = (dump / "train.log").read_text()
    assert "world_size: 2" in log and "rank: 0" in log
    assert "Process rank 1 of world size 2" in (dump / "train.log-1").read_text()
    assert "Building data done with 100 images loaded (10 classes, 6 iterations per epoch, released" in log
    check_pretrain_dump(dump, 2)
    out = run("eval_linear.py", ["--data_path", tmp_path / "c10", "--pretrained", dump / "checkpoint.pth.tar",
                                 "--dump_path", tmp_path / "exp2_linear_eval", "--epochs", 1] + TINY_EVAL,
              tmp_path, launcher=launcher[:-1] + [f"--master_port={free_port()}"])
    top1_lines(out)


def test_batched_augmentation_learns_and_resumes_exactly(tmp_path):
    """The fast path (--augment batched, crops made on the device, here the CPU): finite, decreasing loss,
    and an epoch-boundary restart gives the uninterrupted run's weights bit for bit."""
    write_cifar10(tmp_path / "c10", n_train_per_batch=20, n_test=40)
    common = ["--data_path", tmp_path / "c10", "--epochs", 3, "--augment", "batched"] + TINY
    out = run("main_swav_unmix.py", common + ["--dump_path", tmp_path / "a"], tmp_path)
    assert "batched augmentation" in out
    losses = check_pretrain_dump(tmp_path / "a", 3)["loss"].tolist()
    assert losses[2] < losses[0], losses
    run("main_swav_unmix.py", common + ["--dump_path", tmp_path / "b", "--epochs_run_limit", 1], tmp_path)
    run("main_swav_unmix.py", common + ["--dump_path", tmp_path / "b"], tmp_path)
    a = torch.load(tmp_path / "a" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "b" / "checkpoint.pth.tar", weights_only=True)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_linear_eval_preempted_saves_requeues_and_resumes(tmp_path, tiny_checkpoint):
    """SIGUSR1 during linear evaluation: the epoch's classifier is saved, exit status 3, and the same
    command resumes after that epoch. (The checkpoint evaluated: the session's tiny pretraining.) The signal
    lands during the first epoch (sent at its first iteration's log line), so a few epochs are margin
    enough: the run would end without stopping only if the signal came after its fifth epoch."""
    import signal

    from src.runtime.signals import PREEMPTED_EXIT_CODE
    from tests.e2e_helpers import wait_for_log
    epochs = 6
    write_cifar10(tmp_path / "c10", n_train_per_batch=20, n_test=40)
    ev = tmp_path / "exp_linear_eval"
    args = ["--data_path", tmp_path / "c10", "--pretrained", tiny_checkpoint, "--dump_path", ev,
            "--epochs", epochs] + TINY_EVAL
    cmd = [sys.executable, str(REPO / "eval_linear.py")] + [str(a) for a in args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_log(ev / "train.log", "Epoch[0] - Iter: [0/", timeout=240, alive=lambda: proc.poll() is None)
    finally:
        proc.send_signal(signal.SIGUSR1)
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-2000:]
    saved = torch.load(ev / "checkpoint.pth.tar", weights_only=True)["epoch"]
    assert 1 <= saved < epochs and f"saved after epoch {saved - 1}" in out
    out = run("eval_linear.py", args, tmp_path)
    assert f"Resumed linear evaluation from epoch {saved}" in out
    top1_lines(out)
    assert len(pd.read_pickle(ev / "stats0.pkl")) == epochs


def test_resumes_from_a_released_format_checkpoint_and_evaluates_it(tmp_path, tiny_checkpoint):
    """A run folder as the released code leaves it: `checkpoint.pth.tar` with only `epoch`, the
    module.-prefixed `state_dict`, the optimizer with NumPy float64 learning rates and apex's `amp` state,
    pickled with NumPy 1's names; `stats0.pkl` written by pandas 1.x; no params.json or stats0.csv.
    Pretraining resumes from it and keeps the statistics history; eval_linear.py --pretrained loads it.
    (Its weights and optimizer state: the session's tiny pretraining, same network, stored as at epoch 2.)"""
    write_cifar10(tmp_path / "c10", n_train_per_batch=20, n_test=40)
    dump = tmp_path / "exp"
    dump.mkdir()
    common = ["--data_path", tmp_path / "c10", "--dump_path", dump, "--epochs", 4] + TINY
    ours = torch.load(tiny_checkpoint, weights_only=True)
    released = released_checkpoint(2, ours["state_dict"], ours["optimizer"],
                                    lr=ours["optimizer"]["param_groups"][0]["lr"])
    save_like_numpy1(released, dump / "checkpoint.pth.tar")
    shutil.copy(dump / "checkpoint.pth.tar", tmp_path / "released.pth.tar")
    # its rows: epochs 0, 1 and 2; the checkpoint has 2 epochs done (killed between the two writes)
    shutil.copy(RELEASED_STATS_PKL, dump / "stats0.pkl")

    out = run("main_swav_unmix.py", common, tmp_path)
    assert "Resumed from" in out and "epoch 2, iteration 0" in out and "Pretraining done" in out
    assert "3 rows of the released run's statistics read" in out
    for stats in (pd.read_pickle(dump / "stats0.pkl"), pd.read_csv(dump / "stats0.csv")):
        assert stats["epoch"].tolist() == [0, 1, 2, 3]
        assert stats["loss"].tolist()[:2] == [loss for _, loss in RELEASED_STATS_ROWS[:2]]
        assert stats["loss"].tolist()[2] != RELEASED_STATS_ROWS[2][1] and stats["loss"].notna().all()
    assert torch.load(dump / "checkpoint.pth.tar", weights_only=True)["epoch"] == 4

    out = run("eval_linear.py", ["--data_path", tmp_path / "c10", "--pretrained", tmp_path / "released.pth.tar",
                                 "--dump_path", tmp_path / "ev", "--epochs", 1, "--probe", "cached"] + TINY_EVAL, tmp_path)
    assert "missing_keys=[]" in out
    top1_lines(out)
