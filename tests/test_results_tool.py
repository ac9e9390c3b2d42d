"""tools/results.py on hand-made experiment folders in the docs/CONTRACTS.md formats."""
import json
import math
import os
import pickle
import subprocess
import sys
from argparse import Namespace

import pandas as pd
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import published  # noqa: E402
import results  # noqa: E402


def _pretrain_params(**kw):
    p = dict(data_path="cifar10", epochs=400, batch_size=128, base_lr=0.6, final_lr=0.0006, arch="resnet18",
             run_swav=False, unmix_prob=0.5, unmix_beta=1.0, seed=31, dump_path=".", knn_freq=0)
    p.update(kw)
    return p


def _dump(folder, params, stats):
    os.makedirs(folder, exist_ok=True)
    if params is not None:
        with open(os.path.join(folder, "params.json"), "w") as f:
            json.dump(params, f)
        with open(os.path.join(folder, "params.pkl"), "wb") as f:
            pickle.dump(Namespace(**params), f)
    if stats is not None:
        stats.to_pickle(os.path.join(folder, "stats0.pkl"))
    with open(os.path.join(folder, "train.log"), "w") as f:
        f.write("INFO - fixture\n")


def _pretrain_stats(epochs, knn_every=None, seconds_per_epoch=30.0, knn_start=20.0):
    rows = []
    for e in range(epochs):
        knn = knn_start + e * 0.2 if knn_every and (e + 1) % knn_every == 0 else float("nan")
        rows.append({"epoch": e, "loss": 8.0 - 0.01 * e, "lr": 0.6, "time": seconds_per_epoch * (e + 1),
                     "knn_top1": knn})
    return pd.DataFrame(rows, columns=["epoch", "loss", "lr", "time", "knn_top1"])


def _eval_stats(epochs, top1s):
    rows = [{"epoch": e, "loss": 1.0, "prec1": 50.0, "prec5": 90.0, "loss_val": 1.1, "prec1_val": t,
             "prec5_val": 95.0 + e} for e, t in zip(range(epochs), top1s)]
    return pd.DataFrame(rows, columns=["epoch", "loss", "prec1", "prec5", "loss_val", "prec1_val", "prec5_val"])


@pytest.fixture
def experiments(tmp_path):
    exp = tmp_path / "experiments"
    # 1. finished SwAV run on CIFAR-10, 200 epochs, kNN every 50 epochs, finished fast linear evaluation
    swav = exp / "swav_c10_200ep"
    _dump(swav, _pretrain_params(run_swav=True, epochs=200), _pretrain_stats(200, knn_every=50))
    ev = str(swav) + "_linear_eval"
    _dump(ev, dict(num_labels=10, data_path="cifar10", epochs=100, batch_size=32, lr=0.3), 
          _eval_stats(100, [60.0 + 0.25 * e for e in range(98)] + [85.25, 84.5]))
    with open(os.path.join(ev, "results.json"), "w") as f:
        json.dump({"best_top1": 85.25, "last_top1": 84.5, "last_top5": 99.4, "epochs": 100, "mode": "fast",
                   "seconds": 600.0}, f)
    # 2. unfinished Un-Mix run on CIFAR-100 (data as a folder path), 37 of 400 epochs, no kNN, no evaluation;
    #    a restart wrote epoch 36 twice
    stats = _pretrain_stats(37, knn_every=None, seconds_per_epoch=60.0)
    stats = pd.concat([stats, stats.tail(1)], ignore_index=True)
    _dump(exp / "sub" / "unmix_c100_400ep",
          _pretrain_params(run_swav="False", data_path="/data/sets/CIFAR-100/", epochs=400), stats)
    os.makedirs(exp / "sub" / "unmix_c100_400ep" / "checkpoints")
    # 3. tiny Un-Mix run on an image folder (class count decides), unfinished released-mode evaluation
    data = tmp_path / "jpeg_set"
    for c in range(10):
        os.makedirs(data / "train" / f"class{c}")
    tiny = exp / "tiny_unmix"
    _dump(tiny, _pretrain_params(data_path=str(data), epochs=3), _pretrain_stats(3, knn_every=1, seconds_per_epoch=5))
    _dump(str(tiny) + "_linear_eval", dict(num_labels=10, data_path=str(data), epochs=5),
          _eval_stats(2, [31.0, 29.5]))
    # 4. SwAV CIFAR-100 run that has only written its arguments
    _dump(exp / "swav_c100_fresh", _pretrain_params(run_swav=True, data_path="cifar100", epochs=1000), None)
    return exp


def _parse_table(md):
    lines = [l for l in md.splitlines() if l.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return {r[0]: dict(zip(header, r)) for r in
            ([c.strip() for c in l.strip("|").split("|")] for l in lines[2:])}


def _check_png(path):
    assert os.path.isfile(path) and os.path.getsize(path) > 1000, path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
        im.verify()


def test_table_and_plots(experiments, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "results.py"), str(experiments),
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (out / "results.md").read_text()
    rows = _parse_table(md)
    assert set(rows) == {"swav_c10_200ep", "unmix_c100_400ep", "tiny_unmix", "swav_c100_fresh"}

    r = rows["swav_c10_200ep"]
    assert (r["method"], r["data set"], r["epochs (done/planned)"]) == ("SwAV", "cifar10", "200/200")
    assert (r["linear top-1 best"], r["linear top-1 last"]) == ("85.25", "84.50")    # from results.json
    assert r["kNN top-1 (last)"] == f"{20.0 + 199 * 0.2:.2f}"
    assert r["wall time"] == f"{(200 * 30.0 + 600.0) / 3600:.2f} h"
    assert r["linear eval"] == "fast, 100 ep"
    assert r["published top-1"] == "84.9" and r["Δ best − published"] == "+0.35"

    r = rows["unmix_c100_400ep"]
    assert (r["method"], r["data set"], r["epochs (done/planned)"]) == ("Un-Mix", "cifar100", "37/400")
    assert r["linear top-1 best"] == r["linear top-1 last"] == r["kNN top-1 (last)"] == "—"
    assert r["linear eval"] == "—" and r["Δ best − published"] == "—"
    assert r["published top-1"] == "66.1"
    assert r["wall time"] == "37.0 min"

    r = rows["tiny_unmix"]
    assert (r["method"], r["data set"], r["epochs (done/planned)"]) == ("Un-Mix", "cifar10", "3/3")
    assert (r["linear top-1 best"], r["linear top-1 last"]) == ("31.00", "29.50")    # from eval stats0.pkl
    assert r["kNN top-1 (last)"] == "20.40"
    assert r["published top-1"] == "—"                                             # no 3-epoch row
    assert "2/5" in r["linear eval"] and "unfinished" in r["linear eval"]
    assert r["wall time"] == "15 s"

    r = rows["swav_c100_fresh"]
    assert (r["method"], r["data set"], r["epochs (done/planned)"]) == ("SwAV", "cifar100", "0/1000")
    assert r["published top-1"] == "67.5" and r["wall time"] == "—"

    for name in ["accuracy_vs_epochs"] + [f"{n}_curves" for n in rows]:
        _check_png(str(out / f"{name}.png"))


def test_in_process_api_and_edge_cases(experiments, tmp_path):
    runs = results.load_runs([str(experiments / "sub" / "unmix_c100_400ep"), str(experiments / "swav_c10_200ep")])
    assert [r["name"] for r in runs] == ["swav_c10_200ep", "unmix_c100_400ep"]
    assert runs[1]["epochs_done"] == 37 and runs[1]["stats"]["epoch"].is_unique
    # an evaluation folder given alone finds its (missing) dump's numbers; empty folder gives an empty table
    lone = tmp_path / "lone"
    _dump(str(lone / "gone") + "_linear_eval", dict(num_labels=100, epochs=2), _eval_stats(2, [10.0, 12.0]))
    runs, written = results.write_report([str(lone)], str(tmp_path / "out2"))
    assert len(runs) == 1 and runs[0]["dataset"] == "cifar100" and runs[0]["best_top1"] == 12.0
    assert all(os.path.getsize(p) > 0 for p in written)
    runs, written = results.write_report([str(tmp_path / "nothing_here")], str(tmp_path / "out3"))
    assert runs == [] and "—" in open(written[0]).read()
    _check_png(written[1])


def test_published_tables():
    assert published.published_top1("Un-Mix", "cifar10", 400) == 90.4
    assert published.published_top1("SwAV", "cifar100", 1000) == 67.5
    assert published.published_top1("SwAV", "cifar10", 300) is None
    assert published.published_top1("?", "svhn", 200) is None
    for ds in published.DATASETS:
        for m in published.METHODS:
            assert sorted(published.PUBLISHED[ds][m]) == [200, 400, 600, 800, 1000]
            # Un-Mix is ahead of SwAV at every epoch count in both tables
            assert all(published.PUBLISHED[ds]["Un-Mix"][e] > published.PUBLISHED[ds]["SwAV"][e]
                       for e in published.PUBLISHED[ds]["SwAV"])
    assert not math.isnan(sum(published.PUBLISHED["cifar10"]["SwAV"].values()))


def test_semisup_table(tmp_path):
    """eval_semisup.py folders get their own table (finished: results.json; unfinished: stats so far) and are
    not taken for pretraining runs."""
    exp = tmp_path / "exp"
    _dump(exp / "unmix_c10", _pretrain_params(epochs=2), _pretrain_stats(2))
    semi = dict(labels_perc="10", data_path="cifar10", epochs=20, pretrained=str(exp / "unmix_c10" / "checkpoint.pth.tar"))
    done = exp / "unmix_c10_semisup_10pct"
    _dump(done, semi, _eval_stats(20, [40.0 + e for e in range(20)]))
    with open(done / "results.json", "w") as f:
        json.dump({"best_top1": 59.0, "best_top5": 95.5, "last_top1": 59.0, "last_top5": 96.0, "epochs": 20,
                   "mode": "semisup", "labels_perc": "10", "num_labelled": 5000, "seconds": 90.0}, f)
    running = tmp_path / "elsewhere" / "ft1"
    _dump(running, dict(semi, labels_perc="1", pretrained=str(exp / "unmix_c10" / "checkpoints" / "ckp-1.pth")),
          _eval_stats(3, [20.0, 25.0, 24.0]))
    out = tmp_path / "report"
    runs, _ = results.write_report([str(exp), str(running)], str(out))
    assert [r["name"] for r in runs] == ["unmix_c10"]
    md = (out / "results.md").read_text()
    section = md.split("## Semi-supervised fine-tuning")[1]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")]
                                          for line in section.splitlines()[3:] if line.startswith("|"))}
    assert rows["unmix_c10_semisup_10pct"] == ["unmix_c10_semisup_10pct", "unmix_c10", "cifar10", "10 %", "5000",
                                               "20/20", "59.00", "95.50", "59.00", "1.5 min"]
    # unfinished: best so far 25.0 at epoch 1, whose top-5 is 96.0 (95 + epoch)
    assert rows["ft1"] == ["ft1", "unmix_c10", "cifar10", "1 %", "—", "3/20 (unfinished)", "25.00", "96.00",
                           "24.00", "—"]
