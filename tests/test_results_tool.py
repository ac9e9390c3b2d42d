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


def _script_arguments(array):
    """The arguments of the bash array `array` (PRETRAIN or EVAL) in scripts/unmix_job.sh, with the script's
    defaults for its variables: the released settings as the scripts run them."""
    text = open(os.path.join(ROOT, "scripts", "unmix_job.sh")).read()
    body = text.split(f"\n{array}=(\n", 1)[1].split("\n)\n", 1)[0]
    values = {"$ARCH": "resnet18", "$DATASET_PATH": "cifar10", "$EPOCHS": "400", "$BATCH_SIZE": "128",
              "$RUN_SWAV": "False", "$WORKERS": "2", "$EXPERIMENT_PATH": "exp", "$EVAL_PATH": "exp_linear_eval",
              "$NUM_LABELS": "10", "$EVAL_EPOCHS": "100",
              "$EXPERIMENT_PATH/checkpoint.pth.tar": "exp/checkpoint.pth.tar"}
    argv = []
    for line in body.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith('"$'):   # the launcher, the script, EXTRA_ARGS, "$@"
            continue
        argv += [values.get(w.strip('"'), w.strip('"')) for w in line.split()]
    return argv


def _released_params(parser_module, array, **kw):
    """params.json of a run with the released scripts' arguments (one process), changed by `kw`."""
    from src.runtime.run_folder import params_dict
    args = parser_module.get_parser().parse_args(_script_arguments(array))
    args.world_size = 1
    p = params_dict(args)
    p.update(kw)
    return p


def _pretrain_params(**kw):
    import main_swav_unmix
    return _released_params(main_swav_unmix, "PRETRAIN", **kw)


def _eval_params(**kw):
    import eval_linear
    return _released_params(eval_linear, "EVAL", **kw)


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


def _results(folder, best, last, epochs, mode=None, seconds=1.0):
    res = {"best_top1": best, "last_top1": last, "last_top5": 99.4, "epochs": epochs, "seconds": seconds}
    if mode is not None:
        res["mode"] = mode
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(res, f)


@pytest.fixture
def experiments(tmp_path):
    exp = tmp_path / "experiments"
    # 1. finished SwAV run on CIFAR-10, 200 epochs, kNN every 50 epochs, finished fast linear evaluation
    swav = exp / "swav_c10_200ep"
    _dump(swav, _pretrain_params(run_swav=True, epochs=200), _pretrain_stats(200, knn_every=50))
    ev = str(swav) + "_linear_eval"
    _dump(ev, _eval_params(),
          _eval_stats(100, [60.0 + 0.25 * e for e in range(98)] + [85.25, 84.5]))
    _results(ev, 85.25, 84.5, epochs=100, mode="released", seconds=600.0)
    #    ... and the cached probe in its own folder, and a semi-supervised evaluation (another tool's folder)
    _dump(ev + "_cached", _eval_params(probe="cached"),
          _eval_stats(100, [70.0] * 99 + [80.0]))
    _results(ev + "_cached", 81.0, 80.0, epochs=100, mode="cached", seconds=60.0)
    semisup = str(swav) + "_semisup_10pct"
    os.makedirs(semisup)
    _results(semisup, 70.5, 69.0, epochs=20, seconds=30.0)
    # 2. unfinished Un-Mix run on CIFAR-100 (data as a folder path), 37 of 400 epochs, no kNN, no evaluation;
    #    a restart wrote epoch 36 twice
    stats = _pretrain_stats(37, knn_every=None, seconds_per_epoch=60.0)
    stats = pd.concat([stats, stats.tail(1)], ignore_index=True)
    _dump(exp / "sub" / "unmix_c100_400ep",
          _pretrain_params(run_swav="False", data_path="/data/sets/CIFAR-100/", epochs=400), stats)
    os.makedirs(exp / "sub" / "unmix_c100_400ep" / "checkpoints")
    # 3. tiny Un-Mix run on a CIFAR-10 image folder (its path says so), unfinished released-mode evaluation
    data = tmp_path / "cifar10_jpeg"
    for c in range(10):
        os.makedirs(data / "train" / f"class{c}")
    tiny = exp / "tiny_unmix"
    _dump(tiny, _pretrain_params(data_path=str(data), epochs=3), _pretrain_stats(3, knn_every=1, seconds_per_epoch=5))
    _dump(str(tiny) + "_linear_eval", dict(num_labels=10, data_path=str(data), epochs=5),
          _eval_stats(2, [31.0, 29.5]))
    # 4. SwAV CIFAR-100 run that has only written its arguments
    _dump(exp / "swav_c100_fresh", _pretrain_params(run_swav=True, data_path="cifar100", epochs=1000), None)
    # 5. two seeds of one Un-Mix CIFAR-10 experiment (the data path and workers differ too), a third run with
    #    another width, each with the released probe
    for name, seed, width, best, data in (("unmix_c10_seed31", 31, 64, 80.0, "cifar10"),
                                          ("unmix_c10_seed32", 32, 64, 82.0, "/elsewhere/cifar-10-batches-py"),
                                          ("unmix_c10_w8_seed31", 31, 8, 50.0, "cifar10")):
        _dump(exp / "seeds" / name, _pretrain_params(seed=seed, width_per_group=width, data_path=data, epochs=200,
                                                     workers=seed - 30), _pretrain_stats(200, knn_every=100))
        _dump(str(exp / "seeds" / name) + "_linear_eval", _eval_params(), None)
        _results(str(exp / "seeds" / name) + "_linear_eval", best, best - 1, epochs=100, mode="released")
    # 6. a cached probe written into `<dump>_linear_eval` (as eval_linear.py --probe cached --dump_path ... can)
    cached_only = exp / "cached_only"
    _dump(cached_only, _pretrain_params(epochs=2), _pretrain_stats(2))
    _dump(str(cached_only) + "_linear_eval", dict(num_labels=10, epochs=2, probe="cached"),
          _eval_stats(2, [24.0, 22.0]))
    _results(str(cached_only) + "_linear_eval", 24.0, 22.0, epochs=2, mode="cached")
    return exp


def _parse_table(md, section="## Runs"):
    """The first Markdown table after the heading `section`: {first column: {header: cell}}."""
    text = md.split(section + "\n", 1)[1]
    lines = []
    for line in text.splitlines()[1:]:
        if line.startswith("|"):
            lines.append(line)
        elif lines:
            break
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
    assert set(rows) == {"swav_c10_200ep", "unmix_c100_400ep", "tiny_unmix", "swav_c100_fresh", "unmix_c10_seed31",
                         "unmix_c10_seed32", "unmix_c10_w8_seed31", "cached_only"}

    # one run, three evaluations: the released probe in the linear columns, the others a column each
    r = rows["swav_c10_200ep"]
    assert (r["method"], r["data set"], r["seed"], r["epochs (done/planned)"]) == ("SwAV", "cifar10", "31", "200/200")
    assert (r["linear top-1 best"], r["linear top-1 last"]) == ("85.25", "84.50")    # from results.json
    assert r["linear eval"] == "released, 100 ep"
    assert r["cached probe top-1 best / last"] == "81.00 / 80.00"
    assert r["semi-sup 10pct top-1 best / last"] == "70.50 / 69.00"
    assert r["kNN top-1 (last)"] == f"{20.0 + 199 * 0.2:.2f}"
    assert r["wall time"] == f"{(200 * 30.0 + 600.0 + 60.0 + 30.0) / 3600:.2f} h"
    assert r["published top-1"] == "84.9" and r["Δ best − published"] == "+0.35"

    r = rows["unmix_c100_400ep"]
    assert (r["method"], r["data set"], r["epochs (done/planned)"]) == ("Un-Mix", "cifar100", "37/400")
    assert r["linear top-1 best"] == r["linear top-1 last"] == r["kNN top-1 (last)"] == "—"
    assert r["linear eval"] == "—" and r["Δ best − published"] == "—"
    assert r["cached probe top-1 best / last"] == r["semi-sup 10pct top-1 best / last"] == "—"
    assert r["published top-1"] == "66.1" and r["not compared because"] == "pretraining unfinished (37/400 epochs)"
    assert r["wall time"] == "37.0 min"

    r = rows["tiny_unmix"]
    assert (r["method"], r["data set"], r["epochs (done/planned)"]) == ("Un-Mix", "cifar10", "3/3")
    assert (r["linear top-1 best"], r["linear top-1 last"]) == ("31.00", "29.50")    # from eval stats0.pkl
    assert r["kNN top-1 (last)"] == "20.40"
    assert r["published top-1"] == "—"                                             # no 3-epoch row
    assert r["Δ best − published"] == "—" and r["not compared because"] == "no published row for 3 epochs"
    assert r["linear eval"] == "released, 2/5 ep (unfinished)"
    assert r["wall time"] == "15 s"

    r = rows["swav_c100_fresh"]
    assert (r["method"], r["data set"], r["epochs (done/planned)"]) == ("SwAV", "cifar100", "0/1000")
    assert r["published top-1"] == "67.5" and r["wall time"] == "—"

    # a cached probe is never put next to the published (released-protocol) numbers
    r = rows["cached_only"]
    assert r["linear top-1 best"] == "—" and r["linear eval"] == "—" and r["Δ best − published"] == "—"
    assert r["cached probe top-1 best / last"] == "24.00 / 22.00"

    # runs that differ only by seed: one row, mean ± sample std (n); the other width stays apart
    seeds = _parse_table(md, "## Over seeds")
    g = seeds["unmix_c10"]
    assert (g["method"], g["data set"], g["epochs"], g["seeds"]) == ("Un-Mix", "cifar10", "200", "31, 32")
    assert g["linear top-1 best"] == "81.00 ± 1.41 (2)" and g["linear top-1 last"] == "80.00 ± 1.41 (2)"
    assert g["kNN top-1 (last)"] == f"{20.0 + 199 * 0.2:.2f} ± 0.00 (2)"
    assert g["published top-1"] == "86.8" and g["Δ mean best − published"] == "-5.80"
    assert seeds["unmix_c10_w8"]["linear top-1 best"] == "50.00 (1)" and seeds["unmix_c10_w8"]["seeds"] == "31"
    assert seeds["swav_c10_200ep"]["semi-sup 10pct top-1 best"] == "70.50 (1)"

    for name in ["accuracy_vs_epochs"] + [f"{n}_curves" for n in rows]:
        _check_png(str(out / f"{name}.png"))
    assert sorted(os.listdir(out)) == sorted(["results.md", "accuracy_vs_epochs.png"]
                                             + [f"{n}_curves.png" for n in rows])     # no temporaries left


def test_curves_number_epochs_as_the_logs(experiments):
    run = results.load_run(str(experiments / "swav_c10_200ep"))
    fig = results.run_curves_figure(run)
    loss, knn, evaluation = fig.axes
    assert list(loss.lines[0].get_xdata()) == list(range(200))              # stats epochs 0..199
    assert list(knn.lines[0].get_xdata()) == [49, 99, 149, 199]               # kNN logged after epochs 49, ...
    assert [line.get_xdata()[0] for line in evaluation.lines] == [0, 0, 0, 0]  # released and cached, test/train
    assert [line.get_label() for line in evaluation.lines][::2] == ["linear: test top-1", "cached probe: test top-1"]


def test_in_process_api_and_edge_cases(experiments, tmp_path):
    runs = results.load_runs([str(experiments / "sub" / "unmix_c100_400ep"), str(experiments / "swav_c10_200ep")])
    assert [r["name"] for r in runs] == ["swav_c10_200ep", "unmix_c100_400ep"]
    assert runs[1]["epochs_done"] == 37 and runs[1]["stats"]["epoch"].is_unique
    # an evaluation folder given alone finds its (missing) dump's numbers; empty folder gives an empty table
    lone = tmp_path / "lone"
    _dump(str(lone / "gone") + "_linear_eval", dict(num_labels=100, epochs=2, data_path="cifar100"),
          _eval_stats(2, [10.0, 12.0]))
    runs, written = results.write_report([str(lone)], str(tmp_path / "out2"))
    assert len(runs) == 1 and runs[0]["dataset"] == "cifar100" and runs[0]["best_top1"] == 12.0
    assert all(os.path.getsize(p) > 0 for p in written)
    _check_png(written[1])
    os.makedirs(tmp_path / "nothing_here")  # no run: an error, not an empty report over an earlier one
    with pytest.raises(FileNotFoundError, match="no run or evaluation under .*nothing_here"):
        results.write_report([str(tmp_path / "nothing_here")], str(tmp_path / "out3"))
    with pytest.raises(FileNotFoundError, match="no_such_folder: no such folder"):
        results.write_report([str(tmp_path / "no_such_folder")], str(tmp_path / "out3"))
    assert not os.path.exists(tmp_path / "out3")


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
    """Semi-supervised fine-tunings get a table of their own wherever their folder is (finished: results.json;
    unfinished: stats so far), under the pretraining run of their --pretrained checkpoint; a `<run>_semisup*`
    one is also a column of its run, and a fine-tuning is never taken for a pretraining run."""
    exp = tmp_path / "exp"
    _dump(exp / "unmix_c10", _pretrain_params(epochs=2), _pretrain_stats(2))
    semi = dict(labels_perc="10", data_path="cifar10", epochs=20,
                pretrained=str(exp / "unmix_c10" / "checkpoint.pth.tar"))
    done = exp / "unmix_c10_semisup_10pct"
    _dump(done, semi, _eval_stats(20, [40.0 + e for e in range(20)]))
    with open(done / "results.json", "w") as f:
        json.dump({"best_top1": 59.0, "best_top5": 95.5, "last_top1": 59.0, "last_top5": 96.0, "epochs": 20,
                   "mode": "semisup", "labels_perc": "10", "num_labelled": 5000, "seconds": 90.0}, f)
    running = tmp_path / "elsewhere" / "ft1"
    _dump(running, dict(semi, labels_perc="1", pretrained=str(exp / "unmix_c10" / "checkpoints" / "ckp-1.pth")),
          _eval_stats(3, [20.0, 25.0, 24.0]))
    scratch = tmp_path / "elsewhere" / "scratch"      # random init, CIFAR-100 told by its recorded sizes
    _dump(scratch, dict(semi, pretrained="", data_path=str(tmp_path / "data")), None)
    with open(scratch / "labelled_subset.json", "w") as f:
        json.dump({"classes": [f"c{i}" for i in range(100)], "num_labelled": 500, "num_train_images": 50000}, f)
    out = tmp_path / "report"
    runs, _ = results.write_report([str(exp), str(tmp_path / "elsewhere")], str(out))
    assert [r["name"] for r in runs] == ["unmix_c10"]
    md = (out / "results.md").read_text()
    assert _parse_table(md)["unmix_c10"]["semi-sup 10pct top-1 best / last"] == "59.00 / 59.00"
    rows = {name: list(row.values()) for name, row in _parse_table(md, "## Semi-supervised fine-tuning").items()}
    assert list(rows) == ["scratch", "ft1", "unmix_c10_semisup_10pct"]
    assert rows["unmix_c10_semisup_10pct"] == ["unmix_c10_semisup_10pct", "unmix_c10", "cifar10", "10 %", "5000",
                                               "20/20", "59.00", "95.50", "59.00", "1.5 min"]
    # unfinished: best so far 25.0 at epoch 1, whose top-5 is 96.0 (95 + epoch)
    assert rows["ft1"] == ["ft1", "unmix_c10", "cifar10", "1 %", "—", "3/20 (unfinished)", "25.00", "96.00",
                           "24.00", "—"]
    assert rows["scratch"][:6] == ["scratch", "random init", "cifar100", "10 %", "500", "0/20 (unfinished)"]


def test_plan_report_tables_and_cell_statuses(tmp_path):
    """A plan of scripts/reproduce_tables.sh: the published grid with ours as mean ± std over seeds, and every
    cell with its status (finished, failed, interrupted, never started)."""
    import table_plan
    import table_records
    exp = tmp_path / "exp"
    cells = table_plan.plan_cells(["cifar10"], ["swav", "unmix"], [200, 400], [31, 32], str(exp),
                                  {"cifar10": "cifar10"}, "_linear_eval")
    cells_dir = str(exp / "_cells")
    os.makedirs(cells_dir)
    plan = table_plan.write_plan(cells_dir, cells)
    by_name = {c.name: c for c in cells}
    finished = {"c10_unmix_200ep_seed31": 86.0, "c10_unmix_200ep_seed32": 87.0, "c10_swav_200ep_seed31": 84.0,
                "c10_swav_400ep_seed31": 88.0}
    for name, best in finished.items():
        c = by_name[name]
        _dump(c.experiment_path, _pretrain_params(run_swav=c.method == "swav", epochs=c.epochs, seed=c.seed),
              _pretrain_stats(c.epochs))
        _dump(c.eval_path, _eval_params(), None)
        _results(c.eval_path, best, best - 1, epochs=100, mode="released")
        table_records.write_state(cells_dir, c, f"exit 0 7_{c.index}")
    # seed 32 of SwAV 200: pretraining failed; Un-Mix 400 seed 31: only a cached probe; seed 32: killed
    table_records.write_state(cells_dir, by_name["c10_swav_200ep_seed32"], "exit 11 7_1")
    c = by_name["c10_unmix_400ep_seed31"]
    _dump(c.experiment_path, _pretrain_params(epochs=400), _pretrain_stats(400))
    _dump(c.experiment_path + "_linear_eval_cached", dict(num_labels=10, epochs=100, probe="cached"), None)
    _results(c.experiment_path + "_linear_eval_cached", 75.0, 74.0, epochs=100, mode="cached")
    table_records.write_state(cells_dir, by_name["c10_unmix_400ep_seed32"], "running 7_7")

    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "results.py"), "--plan", plan, "--out",
                           str(tmp_path / "report")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (tmp_path / "report" / "results.md").read_text()
    grid = _parse_table(md, "## cifar10: linear top-1 (%), ours (mean ± std over seeds, n) next to the published")
    assert grid["SwAV (ours)"]["200 ep"] == "84.00 (1)" and grid["SwAV (ours)"]["400 ep"] == "88.00 (1)"
    assert grid["Un-Mix (ours)"]["200 ep"] == "86.50 ± 0.71 (2)"
    assert grid["Un-Mix (ours)"]["400 ep"] == "75.00 (1) *"        # a cached probe only, flagged
    assert grid["SwAV (published)"]["200 ep"] == "84.9" and grid["Un-Mix (published)"]["400 ep"] == "90.4"
    assert "\\* from a cached linear probe" in md and "`--knn_k`" in md
    table = _parse_table(md, "## Cells")
    assert list(table) == [c.name for c in cells]
    status = {name: row["status"] for name, row in table.items()}
    assert status["c10_swav_200ep_seed32"] == "failed (exit 11: pretraining failed, job 7_1)"
    assert status["c10_unmix_400ep_seed32"].startswith("interrupted")          # no such job in any queue
    assert status["c10_unmix_400ep_seed31"] == "interrupted (its folder exists)"
    assert status["c10_swav_400ep_seed32"] == "missing"
    assert [status[n] for n in finished] == ["done"] * 4
    assert table["c10_unmix_200ep_seed32"]["linear top-1 best"] == "87.00"
    assert table["c10_swav_400ep_seed32"]["log"] == "_cells/c10_swav_400ep_seed32.log"
    assert "8 cells: 4 done, 1 failed, 2 interrupted, 1 missing." in md
    runs = _parse_table(md)                                           # the runs that exist, nothing else
    assert set(runs) == set(finished) | {"c10_unmix_400ep_seed31"}


def test_seeds_are_one_experiment_across_provenance_and_operational_flags(tmp_path):
    """Two seeds of one experiment, from another commit on another card, one with other log flags and curves
    for TensorBoard: one row, mean ± std (2). Another number of processes (another global batch) stays apart."""
    import main_swav_unmix
    from src.runtime.logs import provenance
    from src.runtime.run_folder import params_dict

    def params(argv, world_size, **origin):
        args = main_swav_unmix.get_parser().parse_args(["--data_path", "cifar10", "--epochs", "200"] + argv)
        args.world_size = world_size
        return dict(params_dict(args), provenance=dict(provenance("cpu", world_size), **origin))

    exp = tmp_path / "exp"
    for name, argv, world_size, origin, best in (
            ("unmix_seed31", ["--seed", "31"], 1, dict(device="NVIDIA H200", git_commit="a" * 40), 80.0),
            ("unmix_seed32", ["--seed", "32", "--tensorboard", "true", "--log_freq", "10", "--dist_timeout", "60"],
             1, dict(device="NVIDIA A100-SXM4-40GB", git_commit="b" * 40, git_dirty=True, torch="2.3.0"), 82.0),
            ("unmix_4gpus_seed31", ["--seed", "31"], 4, dict(device="NVIDIA H200"), 70.0)):
        _dump(exp / name, params(argv, world_size, **origin), _pretrain_stats(200))
        _dump(str(exp / name) + "_linear_eval", dict(num_labels=10, epochs=100), None)
        _results(str(exp / name) + "_linear_eval", best, best - 1, epochs=100, mode="released")
    out = tmp_path / "report"
    results.write_report([str(exp)], str(out))
    md = (out / "results.md").read_text()
    assert "## Over seeds" in md, "no two runs were taken for seeds of one experiment"
    seeds = _parse_table(md, "## Over seeds")
    assert set(seeds) == {"unmix", "unmix_4gpus"}
    assert seeds["unmix"]["seeds"] == "31, 32" and seeds["unmix"]["linear top-1 best"] == "81.00 ± 1.41 (2)"
    assert seeds["unmix_4gpus"]["linear top-1 best"] == "70.00 (1)"


def _evaluated(folder, checkpoint, best, seconds=1.0, **eval_kw):
    """A finished released-probe evaluation in `folder` of `checkpoint` (recorded as eval_linear.py records
    it: path, size, modification time, SHA-256)."""
    from src.runtime.run_folder import checkpoint_identity
    _dump(folder, _eval_params(pretrained=str(checkpoint), pretrained_file=checkpoint_identity(str(checkpoint)),
                               **eval_kw), None)
    _results(str(folder), best, best - 1, epochs=eval_kw.get("epochs", 100), mode="released", seconds=seconds)


def _run_with_checkpoint(folder, content=b"weights of epoch 200", **kw):
    _dump(folder, _pretrain_params(**{"epochs": 200, **kw}), _pretrain_stats(200))
    (folder / "checkpoint.pth.tar").write_bytes(content)
    return folder / "checkpoint.pth.tar"


def _report(dirs, out):
    """tools/results.py's report of `dirs` into `out`: (runs, the text of results.md)."""
    runs, written = results.write_report([str(d) for d in dirs], str(out))
    return runs, open(written[0]).read()


def test_released_recipe_is_the_scripts():
    """tools/published.py's recipe is what scripts/unmix_job.sh runs, for both methods and data sets."""
    assert published.pretraining_differences(_pretrain_params(), swav=False) == []
    assert published.pretraining_differences(_pretrain_params(run_swav=True), swav=True) == []
    assert published.linear_eval_differences(_eval_params(), "cifar10") == []
    assert published.linear_eval_differences(_eval_params(num_labels=100), "cifar100") == []
    assert published.pretraining_differences(_pretrain_params(queue_length=3840), swav=False) == [
        "queue_length 3840 (a queue in use)"]


def test_published_numbers_only_next_to_the_released_recipe(tmp_path):
    """A published number and a Δ only for a finished run of the released recipe evaluated by the released
    protocol; every other run says why not."""
    exp = tmp_path / "exp"
    for name, kw, eval_kw in (("released", {}, {}), ("w8", dict(width_per_group=8), {}),
                              ("b512", dict(batch_size=512), {}), ("two_procs", dict(batch_size=64, world_size=2), {}),
                              ("hidden", dict(hidden_mlp=2048, nmb_prototypes=3000, feat_dim=64), {}),
                              ("short_eval", {}, dict(epochs=5)), ("eval_w8", {}, dict(width_per_group=8))):
        checkpoint = _run_with_checkpoint(exp / name, **kw)
        _evaluated(exp / f"{name}_linear_eval", checkpoint, 88.0, **eval_kw)
    rows = _parse_table(_report([exp], tmp_path / "report")[1])
    reason = {name: row["not compared because"] for name, row in rows.items()}
    assert (rows["released"]["published top-1"], rows["released"]["Δ best − published"], reason["released"]) == (
        "86.8", "+1.20", "")
    assert reason["w8"] == "not the released recipe: width_per_group 8"
    assert reason["b512"] == "not the released recipe: batch_size 512"
    assert reason["two_procs"] == "not the released recipe: batch_size 64, world_size 2"
    assert reason["hidden"] == "not the released recipe: hidden_mlp 2048, feat_dim 64 (+1 more)"
    assert reason["short_eval"] == "evaluation not the released protocol: epochs 5"
    assert reason["eval_w8"] == "evaluation not the released protocol: width_per_group 8"
    for name in ("w8", "b512", "two_procs", "hidden"):
        assert (rows[name]["published top-1"], rows[name]["Δ best − published"]) == ("—", "—"), name
    for name in ("short_eval", "eval_w8"):   # the recipe's published number, but no Δ
        assert (rows[name]["published top-1"], rows[name]["Δ best − published"]) == ("86.8", "—"), name
        assert rows[name]["linear top-1 best"] == "88.00"


def test_a_part_of_the_data_set_stands_next_to_no_published_number(tmp_path):
    """The released recipe on a part of CIFAR (the 400-image fixture, a subset folder whose path says
    cifar10) is not the published run: the data sizes the runs record in params.json (`data`) decide, and
    runs that recorded none (older ones) are compared as before."""
    full_train, full_eval = {"train_images": 50000, "classes": 10}, {"train_images": 50000, "test_images": 10000,
                                                                     "classes": 10}
    exp = tmp_path / "exp"
    for name, data, eval_data in (("full", full_train, full_eval), ("unrecorded", None, None),
                                  ("subset", {"train_images": 300, "classes": 10}, full_eval),
                                  ("small_test", full_train, {**full_eval, "test_images": 100})):
        checkpoint = _run_with_checkpoint(exp / name, **({"data": data} if data else {}))
        _evaluated(exp / f"{name}_linear_eval", checkpoint, 88.0, **({"data": eval_data} if eval_data else {}))
    rows = _parse_table(_report([exp], tmp_path / "report")[1])
    for name in ("full", "unrecorded"):
        assert (rows[name]["published top-1"], rows[name]["Δ best − published"]) == ("86.8", "+1.20"), name
    assert rows["subset"]["not compared because"] == "not the released recipe: train_images 300 (of 50000)"
    assert (rows["subset"]["published top-1"], rows["subset"]["Δ best − published"]) == ("—", "—")
    assert rows["small_test"]["not compared because"] == \
        "evaluation not the released protocol: test_images 100 (of 10000)"
    assert (rows["small_test"]["published top-1"], rows["small_test"]["Δ best − published"]) == ("86.8", "—")


def test_a_data_set_not_told_cifar_by_its_record_is_unknown(tmp_path):
    """A 10-class image folder is not CIFAR-10 for its class count: a run is labelled CIFAR by its recorded data
    path (its name, or torchvision's CIFAR files in it) or its recorded sizes (a whole CIFAR set's), else it is
    an unknown data set, next to no published number; an older run that recorded no sizes included."""
    images = tmp_path / "stl_like"
    for c in range(10):
        os.makedirs(images / "train" / f"class{c}")
    os.makedirs(tmp_path / "c10" / "cifar-10-batches-py")
    whole = {"train_images": 50000, "test_images": 10000, "classes": 10}
    exp = tmp_path / "exp"
    for name, data_path, data in (("ten_classes", str(images), {"train_images": 300, "classes": 10}),
                                  ("unrecorded", str(images), None),
                                  ("whole_cifar_as_images", "/scratch/images", {"train_images": 50000, "classes": 10}),
                                  ("cifar_files", str(tmp_path / "c10"), {"train_images": 300, "classes": 10})):
        checkpoint = _run_with_checkpoint(exp / name, data_path=data_path, **({"data": data} if data else {}))
        _evaluated(exp / f"{name}_linear_eval", checkpoint, 88.0, data_path=data_path, data=whole)
    rows = _parse_table(_report([exp], tmp_path / "report")[1])
    for name in ("ten_classes", "unrecorded"):
        assert rows[name]["data set"] == "stl_like", name
        assert (rows[name]["published top-1"], rows[name]["Δ best − published"]) == ("—", "—"), name
        assert rows[name]["not compared because"] == \
            "unknown data set (not CIFAR-10 or CIFAR-100 by its recorded path or sizes)", name
    assert rows["whole_cifar_as_images"]["data set"] == "cifar10"
    assert rows["whole_cifar_as_images"]["Δ best − published"] == "+1.20"
    assert rows["cifar_files"]["data set"] == "cifar10"
    assert rows["cifar_files"]["not compared because"] == "not the released recipe: train_images 300 (of 50000)"


def test_a_run_folder_given_directly_keeps_its_evaluations(tmp_path):
    """`tools/results.py experiments/run` (the run itself, not the folder above it) reports the run with the
    evaluations beside it, linear evaluations and fine-tunings alike, as `tools/results.py experiments/`
    does; not as a run never evaluated, and without the other runs' evaluations."""
    exp = tmp_path / "exp"
    _evaluated(exp / "released_linear_eval", _run_with_checkpoint(exp / "released"), 88.0)
    _evaluated(exp / "other_linear_eval", _run_with_checkpoint(exp / "other"), 80.0)
    for name, run in (("ft_of_released", "released"), ("ft_of_other", "other")):
        _dump(exp / name, dict(labels_perc="10", data_path="cifar10", epochs=20,
                               pretrained=str(exp / run / "checkpoint.pth.tar")), _eval_stats(2, [40.0, 41.0]))
    whole_md = _report([exp], tmp_path / "report")[1]
    alone_md = _report([exp / "released"], tmp_path / "report_one")[1]
    whole, alone = _parse_table(whole_md), _parse_table(alone_md)
    assert list(alone) == ["released"]
    assert alone["released"] == {k: v for k, v in whole["released"].items() if "ft_of_other" not in k}
    assert alone["released"]["Δ best − published"] == "+1.20"
    section = "## Semi-supervised fine-tuning"
    assert section in alone_md, "the fine-tuning beside the run is not listed"
    assert _parse_table(alone_md, section) == {"ft_of_released": _parse_table(whole_md, section)["ft_of_released"]}


def test_an_evaluation_of_an_earlier_checkpoint_is_stale(tmp_path):
    """An evaluation counts for its run only while the run's checkpoint.pth.tar is the one it evaluated (the
    same bytes, even rewritten); after the pretraining went on it is shown as stale, not as the result."""
    exp = tmp_path / "exp"
    checkpoint = _run_with_checkpoint(exp / "unmix")
    _evaluated(exp / "unmix_linear_eval", checkpoint, 88.0, seconds=600.0)

    def row():
        return _parse_table(_report([exp], tmp_path / "report")[1])["unmix"]

    assert (row()["linear top-1 best"], row()["Δ best − published"]) == ("88.00", "+1.20")
    checkpoint.write_bytes(b"weights of epoch 200")   # the same bytes written again: hashed, still current
    os.utime(checkpoint, (1e9, 1e9))
    assert (row()["linear top-1 best"], row()["wall time"]) == ("88.00", f"{(200 * 30 + 600) / 3600:.2f} h")
    checkpoint.write_bytes(b"weights of epoch 200, trained further")
    r = row()
    assert (r["linear top-1 best"], r["linear top-1 last"], r["linear eval"]) == ("—",) * 3
    assert r["Δ best − published"] == "—"
    assert r["released probe top-1 best / last"] == "stale (of an earlier checkpoint): 88.00 / 87.00"
    assert r["not compared because"] == "linear evaluation stale (of an earlier checkpoint)"
    assert r["wall time"] == f"{200 * 30 / 3600:.2f} h"
    # a new evaluation of the current checkpoint is the result again, the stale one stays shown as such
    _evaluated(exp / "unmix_linear_eval_again", checkpoint, 89.0)
    r = row()
    assert (r["linear top-1 best"], r["Δ best − published"]) == ("89.00", "+2.20")
    assert r["released probe top-1 best / last"] == "stale (of an earlier checkpoint): 88.00 / 87.00"


def _cli(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "results.py"), *map(str, argv)],
                          capture_output=True, text=True, timeout=120)


def test_a_missing_folder_is_one_line_and_keeps_the_report(tmp_path):
    exp = tmp_path / "exp"
    _evaluated(exp / "unmix_linear_eval", _run_with_checkpoint(exp / "unmix"), 88.0)
    out = tmp_path / "report"
    _report([exp], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "unmix" in before["results.md"].decode()
    os.makedirs(tmp_path / "exp_typo_empty" / "notes")  # a folder without runs would empty the report
    for argv in ([exp, tmp_path / "exp_typo"], ["--plan", tmp_path / "plan-typo.tsv"], [tmp_path / "exp_typo_empty"]):
        proc = _cli(*argv, "--out", out)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
        assert "typo" in proc.stderr and "Traceback" not in proc.stderr
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_linked_runs_and_evaluations_are_found(tmp_path):
    """A run folder or an evaluation folder that is a symbolic link inside the experiments folder is
    found (each real folder once; a link loop ends)."""
    store, exp = tmp_path / "store", tmp_path / "exp"
    checkpoint = _run_with_checkpoint(store / "unmix_real")
    _evaluated(store / "unmix_real_linear_eval", checkpoint, 88.0)
    os.makedirs(exp)
    os.symlink(store / "unmix_real", exp / "unmix_linked")
    os.symlink(store / "unmix_real_linear_eval", exp / "unmix_linked_linear_eval")
    _evaluated(store / "somewhere_else", _run_with_checkpoint(exp / "swav_here", run_swav=True), 86.0)
    os.symlink(store / "somewhere_else", exp / "swav_here_linear_eval")
    os.symlink(exp, exp / "loop")
    runs = _report([exp], tmp_path / "report")[0]
    assert {r["name"]: r["best_top1"] for r in runs} == {"unmix_linked": 88.0, "swav_here": 86.0}


def test_every_run_keeps_its_own_outputs_whatever_its_name(tmp_path):
    """Evaluations go with the run whose checkpoint they evaluated, whatever the folders' names: a
    pretraining named like an evaluation (`x_linear_eval`) is a run of its own, an evaluation folder named
    after one run that evaluated another's checkpoint is the other's; runs whose names differ only in
    characters a file name cannot hold keep a plot each."""
    exp = tmp_path / "exp"
    _run_with_checkpoint(exp / "x")
    _evaluated(exp / "x_linear_eval_linear_eval", _run_with_checkpoint(exp / "x_linear_eval"), 70.0)
    _run_with_checkpoint(exp / "a")
    _evaluated(exp / "a_linear_eval", _run_with_checkpoint(exp / "b"), 80.0)   # b's checkpoint, a's name
    _evaluated(exp / "run a_linear_eval", _run_with_checkpoint(exp / "run a"), 81.0)
    _evaluated(exp / "run_a_linear_eval", _run_with_checkpoint(exp / "run_a"), 82.0)
    _evaluated(exp / "r|1_linear_eval", _run_with_checkpoint(exp / "r|1"), 83.0)
    out = tmp_path / "report"
    runs, written = results.write_report([str(exp)], str(out))
    best = {r["name"]: r["best_top1"] for r in runs}
    assert best == {"x": None, "x_linear_eval": 70.0, "a": None, "b": 80.0, "run a": 81.0, "run_a": 82.0,
                    "r|1": 83.0}
    assert all(not r["evals"] for r in runs if r["name"] in ("x", "a"))
    md = (out / "results.md").read_text()
    assert "| r\\|1 | Un-Mix |" in md and _parse_table(md)["b"]["linear top-1 best"] == "80.00"
    plots = sorted(p.name for p in out.iterdir() if p.name.endswith("_curves.png"))
    assert len(plots) == len(runs) == 7 and len(written) == 9


def test_moved_experiments_keep_their_evaluations(tmp_path):
    """Experiments moved elsewhere after they ran: the recorded checkpoint path is gone, the evaluation is
    paired by its name, and it is still of the run's current checkpoint (the same bytes)."""
    exp = tmp_path / "exp"
    _evaluated(exp / "unmix_linear_eval", _run_with_checkpoint(exp / "unmix"), 88.0)
    os.rename(exp, tmp_path / "moved")
    runs = _report([tmp_path / "moved"], tmp_path / "report")[0]
    assert [(r["name"], r["best_top1"], r["not_compared"]) for r in runs] == [("unmix", 88.0, "")]


def _export(path, source, epoch=200, **pretraining):
    """An exported backbone at `path` as tools/export_backbone.py writes it (docs/CONTRACTS.md): its weights
    (bytes here: the tool never loads them) and its description, of the checkpoint `source`."""
    from src.runtime.files import file_sha256
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"backbone of " + str(source).encode())
    path.with_suffix(".json").write_text(json.dumps(
        {"arch": "resnet18", "width_per_group": 64, "feature_dim": 512, "source": str(source),
         "source_sha256": file_sha256(source) if source.exists() else "0" * 64, "epoch": epoch,
         "pretraining": {"run": str(source.parent), **pretraining}}))
    return path


def test_an_evaluation_of_an_exported_backbone_belongs_to_the_run_it_came_from(tmp_path):
    """Failed before: an evaluation of an export (tools/export_backbone.py) was the result of a made-up run
    named after the export's folder (method '?', epochs '0/?'). Its description ties it to its run (stale once
    the run's checkpoint moved on); an export whose run is not found is a row labelled as an exported
    backbone, with what its description records; fine-tunings of exports likewise."""
    exp, exports = tmp_path / "exp", tmp_path / "exports"
    checkpoint = _run_with_checkpoint(exp / "unmix")
    backbone = _export(exports / "unmix_backbone.pth", checkpoint)
    _evaluated(exp / "backbone_eval", backbone, 88.0)
    lost = _export(exports / "lost.pth", tmp_path / "gone" / "checkpoint.pth.tar", epoch=150, epochs=400,
                   run_swav=True, data_path="/data/cifar-100-python", seed=32)
    _evaluated(exp / "lost_eval", lost, 70.0)
    for name, weights in (("ft_backbone", backbone), ("ft_lost", lost)):
        _dump(exp / name, dict(labels_perc="10", data_path="cifar10", epochs=20, pretrained=str(weights)),
              _eval_stats(2, [40.0, 41.0]))
    md = _report([exp, exports], tmp_path / "report")[1]
    rows = _parse_table(md)
    assert sorted(rows) == ["lost.pth (exported backbone)", "unmix"]
    assert (rows["unmix"]["linear top-1 best"], rows["unmix"]["Δ best − published"]) == ("88.00", "+1.20")
    row = rows["lost.pth (exported backbone)"]
    assert [row[k] for k in ("method", "data set", "seed", "epochs (done/planned)", "linear top-1 best")] == \
        ["SwAV", "cifar100", "32", "150/400", "70.00"]
    assert row["not compared because"].startswith("exported backbone: its run") and row["published top-1"] == "—"
    finetunings = _parse_table(md, "## Semi-supervised fine-tuning")
    assert finetunings["ft_backbone"]["pretrained run"] == "unmix"
    assert finetunings["ft_lost"]["pretrained run"] == "lost.pth (exported backbone)"
    checkpoint.write_bytes(b"weights of epoch 200, trained further")   # the export is of an earlier checkpoint
    r = _parse_table(_report([exp, exports], tmp_path / "report")[1])["unmix"]
    assert (r["linear top-1 best"], r["not compared because"]) == ("—", "linear evaluation stale (of an earlier "
                                                                         "checkpoint)")


def test_every_pretraining_flag_is_in_the_recipe_or_named_outside_it():
    """A new pretraining flag (a mixing mode, an augmentation, a loss option: docs/extending.md) must say whether
    it is part of the released recipe; left out of RELEASED_PRETRAINING, runs with it on would be put next to the
    published numbers. The same for a flag of the linear evaluation and the released protocol."""
    import main_swav_unmix
    from src.runtime.cli import OPERATIONAL_FLAGS
    classified = (set(published.RELEASED_PRETRAINING) | set(published.RELEASED_UNMIX) | published.NOT_IN_THE_RECIPE
                  | OPERATIONAL_FLAGS)
    flags = {a.dest for a in main_swav_unmix.get_parser()._actions if a.dest != "help"}
    assert flags - classified == set(), "add them to tools/published.py (RELEASED_PRETRAINING or NOT_IN_THE_RECIPE)"
    assert set(published.NEW_FLAG_DEFAULTS) <= classified | set(published.RELEASED_LINEAR)
    import eval_linear
    protocol = set(published.RELEASED_LINEAR) | published.NOT_IN_THE_LINEAR_PROTOCOL | OPERATIONAL_FLAGS
    flags = {a.dest for a in eval_linear.get_parser()._actions if a.dest != "help"}
    assert flags - protocol == set(), "add them to RELEASED_LINEAR or NOT_IN_THE_LINEAR_PROTOCOL"
