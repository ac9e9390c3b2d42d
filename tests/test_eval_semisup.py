"""eval_semisup.py end to end on tiny data: fine-tuning on the labelled subset, its records, resume after a
preemption (bit for bit), reruns, other data layouts, torchrun, the results table, and bad input.

One real one-epoch pretraining (narrow resnet18) provides the weights; most runs go through the ForkRunner
(the script forked from an interpreter that imported torch once), two as real `python` commands."""
import json
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import eval_semisup
from src.data.datasets import load_split
from src.eval.subset import balanced_subset
from tests.e2e_helpers import MAIN, RUN_ENV, kill, run_script, tiny_args, wait_for_log
from tests.fake_cifar import write_cifar10, write_cifar100, write_image_folder

REPO = Path(__file__).resolve().parents[1]
SEMISUP = REPO / "eval_semisup.py"
STATS_COLUMNS = ["epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val", "prec5_val"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory, fork_runner):
    root = tmp_path_factory.mktemp("semisup")
    runner = fork_runner
    e = {"root": root, "runner": runner, "data": root / "c10"}
    write_cifar10(e["data"], n_train_per_batch=40, n_test=40)  # 200 training images, 20 per class
    res = runner.run(MAIN, tiny_args(e["data"], root / "pre", 1), cwd=root)
    assert res.returncode == 0, res.explain()
    e["ckpt"] = root / "pre" / "checkpoint.pth.tar"
    return e


def semisup_args(e, dump, *extra, epochs=3, data=None, pretrained=None):
    return ["--data_path", data or e["data"], "--dump_path", e["root"] / dump, "--arch", "resnet18",
            "--width_per_group", 8, "--epochs", epochs, "--batch_size", 8, "--workers", 0, "--log_freq", 1,
            "--pretrained", e["ckpt"] if pretrained is None else pretrained, "--lr", 0.01, "--lr_last_layer", 0.05,
            "--decay_epochs", 2, "--gamma", 0.5, *extra]


def run_ok(e, args, real=False):
    res = run_script(SEMISUP, args, cwd=e["root"]) if real else e["runner"].run(SEMISUP, args, cwd=e["root"])
    assert res.returncode == 0, res.explain()
    return res


def load_ckpt(path):
    return torch.load(path, weights_only=True)


# The released eval_semisup.py's flags and defaults (facebookresearch/swav, eval_semisup.py)
RELEASED_SEMISUP = {
    "labels_perc": "10", "dump_path": ".", "seed": 31, "data_path": "/path/to/imagenet", "workers": 10,
    "arch": "resnet50", "pretrained": "", "epochs": 20, "batch_size": 32, "lr": 0.01, "lr_last_layer": 0.2,
    "decay_epochs": [12, 16], "gamma": 0.2, "dist_url": "env://", "world_size": -1, "rank": 0, "local_rank": 0,
}


def test_released_flags_and_defaults():
    parser = eval_semisup.get_parser()
    args, text = vars(parser.parse_args([])), parser.format_help()
    for name, default in RELEASED_SEMISUP.items():
        assert args[name] == default and f"--{name}" in text, name
    assert parser.parse_args(["--labels_perc", "1", "--local-rank=2"]).local_rank == 2


def test_optimiser_groups_are_the_released_ones():
    model = eval_semisup.build_model("resnet18", output_dim=10, width_per_group=8)
    trunk, head = eval_semisup.trunk_and_head_groups(model, 0.01, 0.2)
    assert [p.shape for p in head["params"]] == [model.projection_head.weight.shape, model.projection_head.bias.shape]
    assert head["lr"] == 0.2 and "lr" not in trunk
    assert len(trunk["params"]) + 2 == len(list(model.parameters()))


def test_fine_tunes_the_whole_network_on_the_labelled_subset(env):
    dump = env["root"] / "ft"
    res = run_ok(env, semisup_args(env, "ft"), real=True)
    out = res.stdout

    # the labelled subset: balanced, the one src/eval/subset.py draws from --subset_seed 0, recorded
    _, labels, classes = load_split(env["data"], train=True)
    record = json.loads((dump / "labelled_subset.json").read_text())
    assert record["indices"] == balanced_subset(labels, 10, 10, seed=0).tolist()
    assert np.bincount(labels[record["indices"]]).tolist() == [2] * 10
    assert record["classes"] == classes and record["num_labelled"] == 20 and record["num_train_images"] == 200
    assert "Building data done with 20 labelled images loaded" in out

    # released schedule: trunk and head learning rates, both decayed by gamma at epoch 2
    assert "LR trunk 0.01\tLR head 0.05" in out and "LR trunk 0.005\tLR head 0.025" in out
    assert "Epoch[2] - Iter: [0/3]\tTime" in out and "LR trunk 0.01\tLR head 0.05" not in out.split("Epoch[2]")[1]

    # the whole network was trained: backbone weights and BN statistics moved away from the pretrained ones
    pre = {k[len("module."):]: v for k, v in load_ckpt(env["ckpt"])["state_dict"].items()}
    ckpt = load_ckpt(dump / "checkpoint.pth.tar")
    ft = {k[len("module."):]: v for k, v in ckpt["state_dict"].items()}
    assert all(k.startswith("module.") for k in ckpt["state_dict"])
    trunk = [k for k in pre if k in ft and not k.startswith(("projection_head", "prototypes"))
             and not k.endswith("num_batches_tracked")]
    moved = [k for k in trunk if not torch.equal(ft[k], pre[k])]
    assert len(moved) > 0.9 * len(trunk), sorted(set(trunk) - set(moved))  # a few dead 1-channel units at width 8
    assert {"conv1.weight", "bn1.running_mean", "layer4.1.conv3.weight"} <= set(moved)
    assert ft["projection_head.weight"].shape == (10, 256) and "prototypes.weight" not in ft
    assert ckpt["epoch"] == 3 and ckpt["arch"] == "resnet18"

    # stats, the released report line and results.json agree
    stats = pd.read_pickle(dump / "stats0.pkl")
    assert list(stats.columns) == STATS_COLUMNS + ["time"] and stats["epoch"].tolist() == [0, 1, 2]
    best_row = stats.loc[stats["prec1_val"].idxmax()]
    results = json.loads((dump / "results.json").read_text())
    assert results["best_top1"] == best_row["prec1_val"] and results["best_top5"] == best_row["prec5_val"]
    assert results["last_top1"] == stats["prec1_val"].iloc[-1] and results["num_labelled"] == 20
    assert results["mode"] == "semisup" and results["labels_perc"] == "10"
    assert ckpt["best_acc"] == [results["best_top1"], results["best_top5"]]
    m = re.search(r"Fine-tuning with 10% of labels completed.\n\s*Test accuracies: top-1 ([\d.]+), top-5 ([\d.]+)", out)
    assert m and float(m.group(1)) == pytest.approx(results["best_top1"], abs=0.05)
    last = out.rstrip().splitlines()[-1]   # where the results are, and how to list them beside the other runs
    assert f"Fine-tuning done. Results: {dump / 'results.json'} (every run side by side: python " in last
    assert last.endswith(f"tools/results.py {dump.parent})"), last

    # the results tool lists it, attached to the pretraining run it started from
    report = env["root"] / "report"
    subprocess.run([sys.executable, str(REPO / "tools" / "results.py"), str(env["root"] / "pre"), str(dump),
                    "--out", str(report)], check=True, capture_output=True, env=RUN_ENV)
    md = (report / "results.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| ft |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:6] == ["ft", "pre", "cifar10", "10 %", "20", "3/3"]
    assert cells[6] == f"{results['best_top1']:.2f}"
    assert "| pre |" in md  # the pretraining run keeps its row in the main table


def test_resume_after_preemption_is_bit_exact(env):
    args_a = semisup_args(env, "whole", epochs=8, data=None)
    run_ok(env, args_a)
    args_b = semisup_args(env, "preempted", epochs=8)
    handle = env["runner"].start(SEMISUP, args_b, cwd=env["root"])
    wait_for_log(env["root"] / "preempted" / "train.log", "Starting epoch 0")
    kill(handle.pid, signal.SIGUSR1)
    res = env["runner"].wait(handle)
    assert res.returncode == 3, res.explain()
    saved = load_ckpt(env["root"] / "preempted" / "checkpoint.pth.tar")["epoch"]
    assert 1 <= saved < 8 and f"fine-tuning saved after epoch {saved - 1}" in res.stdout
    res = run_ok(env, args_b)
    assert f"Resumed fine-tuning from epoch {saved}" in res.stdout
    a = load_ckpt(env["root"] / "whole" / "checkpoint.pth.tar")
    b = load_ckpt(env["root"] / "preempted" / "checkpoint.pth.tar")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["best_acc"] == b["best_acc"]
    sa, sb = pd.read_csv(env["root"] / "whole" / "stats0.csv"), pd.read_csv(env["root"] / "preempted" / "stats0.csv")
    pd.testing.assert_frame_equal(sa.drop(columns="time"), sb.drop(columns="time"))   # seconds differ

    # a rerun of the finished command reports the stored numbers and changes no file; other arguments are refused
    finished = {p.name: p.read_bytes() for p in (env["root"] / "whole").iterdir()
                if p.is_file() and p.name not in ("train.log", "run.lock")}
    res = run_ok(env, args_a)
    assert "This evaluation finished earlier (8 epochs" in res.stdout
    assert f"Fine-tuning done. Results: {env['root'] / 'whole' / 'results.json'}" in res.stdout.rstrip().splitlines()[-1]
    assert {name: (env["root"] / "whole" / name).read_bytes() for name in finished} == finished
    assert json.loads((env["root"] / "whole" / "results.json").read_text())["last_top1"] == sa["prec1_val"].iloc[-1]
    res = env["runner"].run(SEMISUP, args_a + ["--labels_perc", "1"], cwd=env["root"])
    assert res.returncode == 2 and "labels_perc: '10' -> '1'" in res.stderr, res.explain()
    # allowed: the earlier fine-tuning moves to replaced-<time>/ whole, and this one starts afresh
    before = {p.name: p.read_bytes() for p in (env["root"] / "whole").iterdir() if p.is_file() and p.name != "train.log"}
    res = run_ok(env, args_a + ["--subset_seed", 1, "--allow_changed_args", "true"])
    assert "Resumed" not in res.stdout and "fine-tuning afresh" in res.stdout
    kept = next((env["root"] / "whole").glob("replaced-*"))
    assert {p.name: p.read_bytes() for p in kept.iterdir()} == {k: v for k, v in before.items() if k != "run.lock"}
    assert json.loads((env["root"] / "whole" / "labelled_subset.json").read_text())["subset_seed"] == 1


@pytest.mark.parametrize("layout", ["image_folder", "cifar100"])
def test_other_data_layouts(env, layout):
    if layout == "image_folder":
        data = write_image_folder(env["root"] / "imgs", 10, 4, classes=("cat", "dog", "frog"), fmt="png")
        expected_classes, per_class = ["cat", "dog", "frog"], 1
    else:
        data = write_cifar100(env["root"] / "c100", n_train=200, n_test=100).parent
        expected_classes, per_class = None, 1
    dump = f"layout_{layout}"
    run_ok(env, semisup_args(env, dump, "--labels_perc", "1", epochs=1, data=data, pretrained=""))
    record = json.loads((env["root"] / dump / "labelled_subset.json").read_text())
    n_classes = len(record["classes"])
    assert record["per_class"] == per_class and record["num_labelled"] == n_classes * per_class
    if expected_classes:
        assert record["classes"] == expected_classes
    else:
        assert n_classes == 100
    ckpt = load_ckpt(env["root"] / dump / "checkpoint.pth.tar")
    assert ckpt["state_dict"]["module.projection_head.weight"].shape[0] == n_classes


def test_torchrun_two_processes(env):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dump = env["root"] / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           str(SEMISUP)] + [str(a) for a in semisup_args(env, "two", epochs=1)]
    res = subprocess.run(cmd, cwd=env["root"], capture_output=True, text=True, timeout=300, env=RUN_ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    log = (dump / "train.log").read_text()
    assert "world_size: 2" in log and "Building data done with 20 labelled images" in log
    assert "20 of 200 training images" in (dump / "train.log-1").read_text()  # every rank: the same subset
    assert json.loads((dump / "results.json").read_text())["epochs"] == 1


@pytest.fixture(scope="module")
def bad(env):
    root = env["root"]
    data = write_image_folder(root / "uneven", 60, 2, classes=("cat", "dog", "frog"), fmt="png")
    for f in sorted((data / "train" / "frog").iterdir())[2:]:
        f.unlink()  # 60 + 60 + 2 images: 10 % takes 4 of each class
    run_ok(env, semisup_args(env, "corrupt", epochs=1))  # a fine-tuning whose checkpoint is then damaged
    (root / "corrupt" / "checkpoint.pth.tar").write_bytes(b"\x00not a checkpoint\n" * 20)
    (root / "corrupt" / "results.json").unlink()   # unfinished: it has to resume (a finished one is only reported)
    (root / "afile").write_text("a regular file: nothing can be created below it")
    return {"uneven": data}


BAD = {
    "unknown_arch": (lambda e, b: semisup_args(e, "x", "--arch", "resnet7"), "unknown --arch 'resnet7'"),
    "zero_epochs": (lambda e, b: semisup_args(e, "x", epochs=0), "--epochs must be at least 1"),
    "bad_subset_seed": (lambda e, b: semisup_args(e, "x", "--subset_seed", -1), "--subset_seed must be in"),
    "pretrained_missing": (lambda e, b: semisup_args(e, "x", pretrained=e["root"] / "none.pth"), "no such file"),
    "pretrained_other_width": (lambda e, b: semisup_args(e, "x", "--width_per_group", 16),
                               "--width_per_group 16 but"),
    "class_too_small": (lambda e, b: semisup_args(e, "x", data=b["uneven"], pretrained=""),
                        "class 2 has 2 training images, fewer than the 4 per class"),
    "missing_data": (lambda e, b: semisup_args(e, "x", data=e["root"] / "nothing"), "does not exist"),
    "corrupt_checkpoint": (lambda e, b: semisup_args(e, "corrupt", epochs=1), "no readable checkpoint"),
    "unwritable_dump_path": (lambda e, b: semisup_args(e, "afile/sub"), "is not writable"),
    "into_the_pretraining_folder": (lambda e, b: semisup_args(e, "pre"),
                                    "holds a pretraining run, not a semi-supervised fine-tuning"),
    "seed_too_large": (lambda e, b: semisup_args(e, "x", "--seed", 2 ** 32), "--seed must be in [0, 2**32)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_gives_one_clear_line(env, bad, case):
    build, phrase = BAD[case]
    res = env["runner"].run(SEMISUP, build(env, bad), cwd=env["root"])
    assert res.returncode == 2, res.explain()
    assert "Traceback" not in res.stderr + res.stdout, res.explain()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and phrase in lines[0], res.explain()


def test_labels_perc_is_the_released_choice(env):
    res = env["runner"].run(SEMISUP, semisup_args(env, "x", "--labels_perc", "5"), cwd=env["root"])
    assert res.returncode == 2 and "invalid choice: '5'" in res.stderr, res.explain()
