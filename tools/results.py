#!/usr/bin/env python3
"""Collect experiment folders into a results table and plots, side by side with the published numbers.

    python tools/results.py EXPERIMENTS_DIR [MORE_DIRS ...] [--out OUT_DIR]
    python tools/results.py --plan experiments/tables/_cells/plan-<hash>.tsv --out report/tables

Every folder under the given directories that holds `params.json` and/or `stats0.pkl` is a pretraining
dump, unless it is a semi-supervised fine-tuning (an eval_semisup.py folder: `params.json` with
`labels_perc`); a dump's evaluations are the sibling folders (formats: docs/CONTRACTS.md)
- `<dump>_linear_eval` (the released probe) and `<dump>_linear_eval_<tag>` (`_cached`: the cached probe);
  the probe is read from `results.json` `mode` or `params.json` `probe`;
- `<dump>_semisup` / `<dump>_semisup<tag>` (semi-supervised evaluation, `results.json` of the same shape),
so one run shows all of them. Writes into OUT_DIR (default `report/`)

- `results.md`:
  - with `--plan` (written by scripts/reproduce_tables.sh): the published tables with ours next to them
    (mean ± std over seeds (n)), and every cell of the plan with its status (done / running / pending /
    failed / interrupted / missing);
  - one row per run: method (SwAV / Un-Mix from `run_swav`), data set, seed, pretraining epochs done /
    planned, released-probe linear top-1 best (max over evaluation epochs, the released number) and last,
    one column per other evaluation (best / last), last kNN top-1, wall time (pretraining `time` plus the
    evaluations' `seconds`), and the published top-1 for the same (method, data set, planned epochs);
  - runs that differ only by seed, aggregated as mean ± std (n);
  - every semi-supervised fine-tuning, wherever its folder is, under the pretraining run its `--pretrained`
    checkpoint comes from: labels %, labelled images, epochs, top-1 best (with the top-5 of that epoch) and
    last, wall time;
- `accuracy_vs_epochs.png`: published curves per data set with our runs (and mean ± std over seeds);
- `<run>_curves.png`: training loss and kNN top-1 per epoch, numbered from 0 as the logs number them (and
  each evaluation's test top-1 when present).

Unfinished runs show what they have; anything missing is '—'. Only reads files, never loads checkpoints.
"""
import argparse
import json
import math
import os
import re
import socket
import statistics
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(TOOLS))
import reproduce_tables  # noqa: E402
from published import DATASETS, METHODS, PUBLISHED, published_top1  # noqa: E402

from src.runtime.checkpoint import atomic_write  # noqa: E402
from src.runtime.run_folder import OPERATIONAL_FLAGS  # noqa: E402

# `<dump>_linear_eval[<tag>]` / `<dump>_semisup[<tag>]`: the last such part of the name
EVAL_FOLDER = re.compile(r"^(?P<dump>.+)_(?P<kind>linear_eval|semisup)(?P<tag>[^/]*)$")
EVAL_FILES = ("params.json", "stats0.pkl", "results.json", "train.log")
DASH = "—"
MARKERS = {"SwAV": "o", "Un-Mix": "s"}
COLOURS = {"SwAV": "tab:blue", "Un-Mix": "tab:orange"}
# What params.json holds besides the settings of an experiment: the arguments that do not change what a run
# computes, the seed, the data path (the data set is compared instead) and the run's provenance (commit,
# library versions, device). Runs equal in everything else (the number of processes included) are one
# experiment.
NOT_SETTINGS = OPERATIONAL_FLAGS | {"seed", "data_path", "provenance"}


# ----------------------------------------------------------------------------------------------- reading

def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        if os.path.exists(path):
            print(f"warning: cannot read {path}: {e}", file=sys.stderr)
        return None


def _read_stats(path):
    """The stats DataFrame (duplicated epochs after a restart: last kept), or None."""
    if not os.path.isfile(path):
        return None
    try:
        df = pd.read_pickle(path)
    except Exception as e:  # a stats file half-written by a killed run
        print(f"warning: cannot read {path}: {e}", file=sys.stderr)
        return None
    if not isinstance(df, pd.DataFrame) or "epoch" not in df.columns or df.empty:
        return None
    df = df.drop_duplicates(subset="epoch", keep="last").sort_values("epoch").reset_index(drop=True)
    return df


def _truthy(v):
    if isinstance(v, str):
        return v.strip().lower() in ("on", "true", "1")
    return bool(v)


def classify(path):
    """What an experiment folder is, as (kind, dump, tag): kind 'semisup' for a semi-supervised fine-tuning
    (an eval_semisup.py folder, whose params.json names `labels_perc`, whatever its name; or a
    `<dump>_semisup[<tag>]` folder with evaluation files), 'linear_eval' for `<dump>_linear_eval[<tag>]`,
    'pretraining' for a folder with params.json or stats0.pkl, else None; dump is the pretraining dump the
    folder's name attaches it to (evaluations only), else None."""
    path = os.path.normpath(path)
    params_path = os.path.join(path, "params.json")
    params = _read_json(params_path) if os.path.isfile(params_path) else None
    m = EVAL_FOLDER.match(os.path.basename(path))
    if m and not any(os.path.isfile(os.path.join(path, f)) for f in EVAL_FILES):
        m = None
    if isinstance(params, dict) and "labels_perc" in params:
        kind = "semisup"
    elif m:
        kind = m.group("kind")
    elif params is not None or os.path.isfile(os.path.join(path, "stats0.pkl")):
        kind = "pretraining"
    else:
        return None, None, ""
    if m and m.group("kind") == kind:
        return kind, os.path.join(os.path.dirname(path), m.group("dump")), m.group("tag")
    return kind, None, ""


def find_folders(dirs):
    """Absolute paths of the pretraining dumps and of the semi-supervised fine-tunings under `dirs` (a
    folder given directly counts). An evaluation folder yields the dump its name attaches it to, even a
    missing one, so its numbers still appear; a fine-tuning is never a pretraining dump."""
    dumps, finetunings = set(), set()
    for top in dirs:
        for dirpath, dirnames, _ in os.walk(os.path.abspath(top)):
            kind, dump, _ = classify(dirpath)
            if kind is None:
                dirnames.sort()
                continue
            dirnames[:] = []   # checkpoints/ etc.
            if kind == "pretraining":
                dumps.add(os.path.normpath(dirpath))
            if dump is not None:
                dumps.add(dump)
            if kind == "semisup":
                finetunings.add(os.path.normpath(dirpath))
    return sorted(dumps), sorted(finetunings)


def _method(params, name):
    if params is not None and "run_swav" in params:
        return "SwAV" if _truthy(params["run_swav"]) else "Un-Mix"
    low = name.lower()
    if "unmix" in low or "un-mix" in low:
        return "Un-Mix"
    if "swav" in low:
        return "SwAV"
    return "?"


def _dataset_from_name(text):
    low = text.lower().replace("-", "").replace("_", "")
    if "cifar100" in low:
        return "cifar100"
    if "cifar10" in low:
        return "cifar10"
    return None


def _count_classes(data_path):
    for split in ("train", ""):
        d = os.path.join(data_path, split)
        try:
            n = sum(1 for e in os.scandir(d) if e.is_dir())
        except OSError:
            continue
        if n:
            return n
    return None


def _dataset(params, eval_params):
    """'cifar10' / 'cifar100' from `data_path` (keyword, or a folder whose path names it), else from the
    number of classes (evaluation `num_labels`, or class folders under `data_path/train`); else the
    folder's base name."""
    for p in (params, eval_params):
        data_path = (p or {}).get("data_path")
        if not data_path:
            continue
        data_path = str(data_path)
        parts = [q for q in os.path.normpath(data_path).split(os.sep) if q]
        for part in reversed(parts):
            ds = _dataset_from_name(part)
            if ds:
                return ds
    counts = []
    if eval_params and eval_params.get("num_labels"):
        counts.append(int(eval_params["num_labels"]))
    for p in (params, eval_params):
        if p and p.get("data_path") and os.path.isdir(str(p["data_path"])):
            counts.append(_count_classes(str(p["data_path"])))
    for n in counts:
        if n == 10:
            return "cifar10"
        if n == 100:
            return "cifar100"
    for p in (params, eval_params):
        if p and p.get("data_path"):
            return os.path.basename(os.path.normpath(str(p["data_path"]))) or "?"
    return "?"


def _last_valid(df, column):
    if df is None or column not in df.columns:
        return None
    s = pd.to_numeric(df[column], errors="coerce").dropna()
    return float(s.iloc[-1]) if len(s) else None


def load_evaluation(folder, kind, tag):
    """One evaluation folder: linear (`kind` 'linear_eval') or semi-supervised ('semisup')."""
    params = _read_json(os.path.join(folder, "params.json"))
    stats = _read_stats(os.path.join(folder, "stats0.pkl"))
    results = _read_json(os.path.join(folder, "results.json"))
    results = results if isinstance(results, dict) else {}
    best = last = top5 = best_top5 = seconds = mode = None
    done = int(stats["epoch"].max()) + 1 if stats is not None else None
    planned = int(params["epochs"]) if params and params.get("epochs") else None
    if results:
        best, last, top5 = results.get("best_top1"), results.get("last_top1"), results.get("last_top5")
        best_top5 = results.get("best_top5")
        seconds, mode = results.get("seconds"), results.get("mode")
        if results.get("epochs") is not None:
            done = int(results["epochs"])
            planned = planned or done
    elif stats is not None and "prec1_val" in stats.columns:
        p1 = pd.to_numeric(stats["prec1_val"], errors="coerce").dropna()
        if len(p1):
            best, last = float(p1.max()), float(p1.iloc[-1])
            best_top5 = _last_valid(stats.loc[:p1.idxmax()], "prec5_val")   # the top-5 of the best epoch
        top5 = _last_valid(stats, "prec5_val")
    if mode is None and params and isinstance(params.get("probe"), str):  # unfinished: eval_linear.py --probe
        mode = params["probe"]
    tag = tag.lstrip("_-")
    if kind == "linear_eval" and mode is None:
        mode = tag or "released"   # `<dump>_linear_eval` is the released probe, `_linear_eval_cached` cached
    return {"folder": folder, "kind": kind, "tag": tag, "mode": mode, "params": params, "stats": stats,
            "results": results, "best_top1": best, "best_top5": best_top5, "last_top1": last, "last_top5": top5,
            "seconds": seconds, "finished": bool(results),
            "epochs_done": done, "epochs_planned": planned}


def find_evaluations(dump):
    """The evaluations of `dump`, labelled: the first released linear probe is 'linear' (the published
    protocol); others are '<mode> probe' and 'semi-sup[ <tag>]' (with ' (<tag>)' where labels repeat)."""
    parent, base = os.path.split(os.path.normpath(dump))
    try:
        names = sorted(os.listdir(parent))
    except OSError:
        names = []
    evals = []
    for name in names:
        if not name.startswith(base + "_"):
            continue
        folder = os.path.join(parent, name)
        kind, of_dump, tag = classify(folder)
        if of_dump == os.path.join(parent, base):
            evals.append(load_evaluation(folder, kind, tag))
    evals.sort(key=lambda e: (e["kind"] != "linear_eval", e["mode"] != "released", e["tag"] != "", e["tag"]))
    labels = set()
    for e in evals:
        if e["kind"] == "linear_eval":
            label = "linear" if e["mode"] == "released" else f"{e['mode']} probe"
        else:
            label = "semi-sup" + (f" {e['tag']}" if e["tag"] else "")
        if label in labels:
            label += f" ({e['tag'] or 'default'})"
        labels.add(label)
        e["label"] = label
    return evals


def _settings(params):
    return {k: v for k, v in (params or {}).items() if k not in NOT_SETTINGS}


def load_run(path):
    """Everything the tables and plots need about one pretraining dump (and its evaluations)."""
    name = os.path.basename(os.path.normpath(path))
    params = _read_json(os.path.join(path, "params.json"))
    stats = _read_stats(os.path.join(path, "stats0.pkl"))
    evals = find_evaluations(path)
    linear = next((e for e in evals if e["label"] == "linear"), None)

    run = {"name": name, "label": name, "path": os.path.normpath(path), "stats": stats, "evals": evals,
           "linear": linear, "method": _method(params, name),
           "dataset": _dataset(params, next((e["params"] for e in evals if e["params"]), None)),
           "seed": params.get("seed") if params else None}
    run["epochs_planned"] = int(params["epochs"]) if params and params.get("epochs") is not None else None
    run["epochs_done"] = int(stats["epoch"].max()) + 1 if stats is not None else 0
    run["knn_top1"] = _last_valid(stats, "knn_top1")
    run["pretrain_seconds"] = _last_valid(stats, "time")
    for k in ("best_top1", "last_top1", "last_top5"):
        run[k] = linear[k] if linear else None
    secs = [s for s in [run["pretrain_seconds"]] + [e["seconds"] for e in evals] if s is not None]
    run["wall_seconds"] = sum(secs) if secs else None
    ref_epochs = run["epochs_planned"] if run["epochs_planned"] is not None else run["epochs_done"]
    run["published_top1"] = published_top1(run["method"], run["dataset"], ref_epochs)
    # runs whose pretraining arguments are equal apart from the seed are one experiment (without
    # arguments: only itself); evaluations are not compared, so a seed whose evaluation failed still counts
    run["experiment"] = json.dumps([run["method"], run["dataset"], _settings(params)] if params else run["path"],
                                   sort_keys=True, default=str)
    return run


def _order(runs):
    seen = {}
    for r in runs:   # unique names for the per-run plots
        k = seen.get(r["name"], 0)
        seen[r["name"]] = k + 1
        r["label"] = r["name"] if k == 0 else f"{r['name']}-{k + 1}"
    order = {d: i for i, d in enumerate(DATASETS)}
    runs.sort(key=lambda r: (order.get(r["dataset"], len(order)), r["dataset"], r["method"],
                             r["epochs_planned"] or 0, r["label"]))
    return runs


def load_runs(dumps):
    """The runs of the pretraining dumps `dumps` that exist (or have an evaluation)."""
    paths = {os.path.normpath(p) for p in dumps if os.path.isdir(p) or find_evaluations(p)}
    return _order([load_run(p) for p in sorted(paths)])


def _dump_of_checkpoint(path):
    """The pretraining dump a checkpoint comes from: its folder (`<dump>/checkpoint.pth.tar`), or the folder
    above `checkpoints/` (`<dump>/checkpoints/ckp-N.pth`)."""
    folder = os.path.dirname(os.path.normpath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def load_finetuning(folder):
    """One semi-supervised fine-tuning (load_evaluation) with its labelled subset, and `dump`: the pretraining
    dump of its `--pretrained` checkpoint, or without arguments the dump its name attaches it to."""
    _, name_dump, tag = classify(folder)
    e = load_evaluation(folder, "semisup", tag)
    params = e["params"] if isinstance(e["params"], dict) else {}
    subset = _read_json(os.path.join(folder, "labelled_subset.json"))
    subset = subset if isinstance(subset, dict) else {}
    classes = subset.get("classes")
    pretrained = params.get("pretrained")   # '' is a random init, None unknown (no arguments)
    if pretrained is None:
        dump = name_dump
    else:
        dump = _dump_of_checkpoint(str(pretrained)) if pretrained else None
    e.update(name=os.path.basename(os.path.normpath(folder)), pretrained=pretrained, dump=dump,
             labels_perc=params.get("labels_perc", e["results"].get("labels_perc")),
             num_labelled=e["results"].get("num_labelled", subset.get("num_labelled")),
             dataset=_dataset(params, {"num_labels": len(classes)} if isinstance(classes, list) else None))
    return e


def group_by_seed(runs):
    """Runs that differ only by seed, as groups (run order kept); each group's label drops 'seed<N>'."""
    groups = {}
    for r in runs:
        groups.setdefault(r["experiment"], []).append(r)
    out = []
    for members in groups.values():
        label = re.sub(r"[_-]?seed\d+", "", members[0]["label"]) or members[0]["label"]
        out.append({"label": label, "runs": members, **{k: members[0][k] for k in
                                                         ("method", "dataset", "epochs_planned", "published_top1")}})
    return out


# ----------------------------------------------------------------------------------------------- table

def _pct(v, digits=2):
    return DASH if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def mean_std(values):
    """'mean ± std (n)' of the values that exist (sample std, n - 1); 'v (1)' for one; '—' for none."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return DASH
    if len(vals) == 1:
        return f"{vals[0]:.2f} (1)"
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f} ({len(vals)})"


def fmt_duration(seconds):
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _eval_progress(e):
    done, planned = e["epochs_done"], e["epochs_planned"]
    if e["finished"]:
        return f"{done if done is not None else planned} ep"
    return f"{done or 0}/{planned if planned is not None else '?'} ep (unfinished)"


def _linear_cell(r):
    e = r["linear"]
    return DASH if e is None else f"{e['mode']}, {_eval_progress(e)}"


def _other_eval_cell(e):
    if e is None:
        return DASH
    text = f"{_pct(e['best_top1'])} / {_pct(e['last_top1'])}"
    return text if e["finished"] else f"{text} ({_eval_progress(e)})"


def other_eval_labels(runs):
    labels = []
    for r in runs:
        for e in r["evals"]:
            if e["label"] != "linear" and e["label"] not in labels:
                labels.append(e["label"])
    return labels


def _delta(best, published):
    return DASH if best is None or published is None else f"{best - published:+.2f}"


def _md_table(header, align, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    if not rows:
        lines.append("| " + " | ".join([DASH] * len(header)) + " |")
    return lines


def runs_table(runs):
    others = other_eval_labels(runs)
    header = (["run", "method", "data set", "seed", "epochs (done/planned)", "linear top-1 best", "linear top-1 last",
               "linear eval"] + [f"{label} top-1 best / last" for label in others]
              + ["kNN top-1 (last)", "wall time", "published top-1", "Δ best − published"])
    rows = []
    for r in runs:
        by_label = {e["label"]: e for e in r["evals"]}
        planned = r["epochs_planned"] if r["epochs_planned"] is not None else "?"
        rows.append([r["label"], r["method"], r["dataset"], DASH if r["seed"] is None else r["seed"],
                     f"{r['epochs_done']}/{planned}", _pct(r["best_top1"]), _pct(r["last_top1"]), _linear_cell(r)]
                    + [_other_eval_cell(by_label.get(label)) for label in others]
                    + [_pct(r["knn_top1"]), fmt_duration(r["wall_seconds"]), _pct(r["published_top1"], 1),
                       _delta(r["best_top1"], r["published_top1"])])
    align = [":---"] * 4 + ["---:"] * 3 + [":---"] + ["---:"] * (len(others) + 4)
    return _md_table(header, align, rows)


def seeds_table(groups):
    runs = [r for g in groups for r in g["runs"]]
    others = other_eval_labels(runs)
    header = (["experiment", "method", "data set", "epochs", "seeds", "linear top-1 best", "linear top-1 last"]
              + [f"{label} top-1 best" for label in others]
              + ["kNN top-1 (last)", "published top-1", "Δ mean best − published"])
    rows = []
    for g in groups:
        best = [r["best_top1"] for r in g["runs"] if r["best_top1"] is not None]
        other = [mean_std(next((e["best_top1"] for e in r["evals"] if e["label"] == label), None)
                          for r in g["runs"]) for label in others]
        epochs = DASH if g["epochs_planned"] is None else g["epochs_planned"]
        rows.append([g["label"], g["method"], g["dataset"], epochs,
                     ", ".join(DASH if r["seed"] is None else str(r["seed"]) for r in g["runs"]),
                     mean_std(best), mean_std(r["last_top1"] for r in g["runs"])] + other
                    + [mean_std(r["knn_top1"] for r in g["runs"]), _pct(g["published_top1"], 1),
                       _delta(statistics.mean(best) if best else None, g["published_top1"])])
    align = [":---"] * 3 + ["---:"] * (len(others) + 7)
    return _md_table(header, align, rows)


def finetunings_table(finetunings, runs):
    """One row per semi-supervised fine-tuning, under the label of its pretraining run (the run's folder name
    when that run is not in the report)."""
    labels = {r["path"]: r["label"] for r in runs}
    rows = []
    for f in finetunings:
        if f["dump"] is not None:
            pretrained = labels.get(os.path.normpath(f["dump"]), os.path.basename(f["dump"]))
        else:
            pretrained = "random init" if f["pretrained"] == "" else DASH
        planned = f["epochs_planned"] if f["epochs_planned"] is not None else "?"
        epochs = f"{f['epochs_done'] or 0}/{planned}" + ("" if f["finished"] else " (unfinished)")
        rows.append([f["name"], pretrained, f["dataset"], DASH if f["labels_perc"] is None else f"{f['labels_perc']} %",
                     DASH if f["num_labelled"] is None else f["num_labelled"], epochs, _pct(f["best_top1"]),
                     _pct(f["best_top5"]), _pct(f["last_top1"]), fmt_duration(f["seconds"])])
    rows.sort(key=lambda row: (row[1], row[0]))
    header = ["fine-tuning", "pretrained run", "data set", "labels", "labelled images", "epochs (done/planned)",
              "top-1 best", "top-5 at best", "top-1 last", "wall time"]
    return _md_table(header, [":---"] * 3 + ["---:"] * 7, rows)


def _headline(run):
    """The number put next to the published one: the released probe's best top-1; else another linear
    probe's, flagged (it is not the published protocol)."""
    if run["best_top1"] is not None:
        return run["best_top1"], False
    other = next((e for e in run["evals"] if e["kind"] == "linear_eval" and e["best_top1"] is not None), None)
    return (other["best_top1"], True) if other else (None, False)


def plan_sections(cells, statuses, runs_by_path, cells_dir):
    """The published tables with our cells next to them, then every cell with its status."""
    lines = []
    flagged_any = False
    for ds in [d for d in reproduce_tables.DATASETS.values() if any(c.dataset == d for c in cells)]:
        epochs = sorted({c.epochs for c in cells if c.dataset == ds})
        lines += [f"## {ds}: linear top-1 (%), ours (mean ± std over seeds, n) next to the published", ""]
        rows = []
        for m in [m for m in reproduce_tables.METHODS if any(c.method == m and c.dataset == ds for c in cells)]:
            name = reproduce_tables.METHODS[m]
            ours = []
            for ep in epochs:
                values, flagged = [], False
                for c in cells:
                    run = runs_by_path.get(os.path.normpath(c.experiment_path))
                    if (c.dataset, c.method, c.epochs) == (ds, m, ep) and run is not None:
                        v, f = _headline(run)
                        values.append(v)
                        flagged |= f and v is not None
                flagged_any |= flagged
                ours.append(mean_std(values) + (" *" if flagged else "")
                            if any(c.dataset == ds and c.method == m and c.epochs == ep for c in cells) else DASH)
            rows.append([f"{name} (ours)"] + ours)
            rows.append([f"{name} (published)"] + [_pct(published_top1(name, ds, ep), 1) for ep in epochs])
        lines += _md_table(["method"] + [f"{ep} ep" for ep in epochs], [":---"] + ["---:"] * len(epochs), rows)
        lines.append("")
    if flagged_any:
        lines += ["\\* from a cached linear probe (EVAL_EXTRA_ARGS=\"--probe cached\"), not the released protocol "
                  "of the published numbers.", ""]
    counts = {s: sum(1 for st, _ in statuses.values() if st == s) for s in reproduce_tables.STATUSES}
    lines += ["## Cells", "", f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".",
              ""]
    rows = []
    for c in cells:
        status, detail = statuses[c.name]
        run = runs_by_path.get(os.path.normpath(c.experiment_path))
        value, flagged = _headline(run) if run else (None, False)
        rows.append([c.name, c.dataset, reproduce_tables.METHODS[c.method], c.epochs, c.seed,
                     status + (f" ({detail})" if detail else ""), _pct(value) + (" *" if flagged else ""),
                     os.path.relpath(os.path.join(cells_dir, f"{c.name}.log"), os.path.dirname(cells_dir))])
    lines += _md_table(["cell", "data set", "method", "epochs", "seed", "status", "linear top-1 best", "log"],
                       [":---"] * 3 + ["---:"] * 2 + [":---", "---:", ":---"], rows)
    return lines + [""]


def markdown(runs, plan_lines=(), finetunings=()):
    groups = group_by_seed(runs)
    lines = ["# Results", ""] + list(plan_lines)
    lines += ["## Runs", ""] + runs_table(runs)
    lines += ["",
              "Linear top-1 best is the maximum test top-1 over the evaluation epochs of the released probe "
              "(`<run>_linear_eval`; the released protocol, which selects on the test set); last is the final "
              "evaluation epoch. Other evaluations (cached probe, semi-supervised) have a column each. kNN top-1 "
              "is the last weighted-kNN value logged during pretraining (`--knn_k`, `--knn_temperature`). Wall time adds the "
              "pretraining `time` and the evaluations' `seconds`. Published top-1: the released tables (ResNet-18, "
              f"batch 128) for the same method, data set and planned epochs; {DASH} when the table has no such row.",
              ""]
    if any(len(g["runs"]) > 1 for g in groups):
        lines += ["## Over seeds", "", "Runs whose pretraining arguments differ only in the seed (and the data path, "
                  "the settings that do not change what is computed, and where and from which commit they ran; "
                  "not the number of processes): mean ± sample standard deviation (number of runs with a value).",
                  ""]
        lines += seeds_table(groups) + [""]
    if finetunings:
        lines += ["## Semi-supervised fine-tuning", ""] + finetunings_table(finetunings, runs)
        lines += ["", "Every semi-supervised fine-tuning found (eval_semisup.py folders wherever they are, and "
                  "`<run>_semisup*` folders), under the pretraining run its `--pretrained` checkpoint comes from: the "
                  "whole network fine-tuned on a class-balanced labelled subset. Top-1 best "
                  "is the best test top-1 over the epochs (the released report), with the top-5 of that epoch.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots

def _save(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_accuracy_vs_epochs(runs, path):
    datasets = list(DATASETS) + sorted({r["dataset"] for r in runs} - set(DATASETS))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    groups = group_by_seed(runs)
    for ax, ds in zip(axes[0], datasets):
        for m in METHODS:
            pub = PUBLISHED.get(ds, {}).get(m)
            if pub:
                ep = sorted(pub)
                ax.plot(ep, [pub[e] for e in ep], linestyle="--", marker=MARKERS[m], color=COLOURS[m],
                        alpha=0.6, label=f"{m} (published)")
        for m in sorted({r["method"] for r in runs if r["dataset"] == ds}):
            mine = [r for r in runs if r["dataset"] == ds and r["method"] == m and r["best_top1"] is not None]
            if not mine:
                continue
            colour, marker = COLOURS.get(m, "tab:gray"), MARKERS.get(m, "^")
            ax.scatter([r["epochs_done"] for r in mine], [r["best_top1"] for r in mine], s=40, marker=marker,
                       color=colour, edgecolors="black", alpha=0.7, zorder=3, label=f"{m} (ours, best)")
            last = [r for r in mine if r["last_top1"] is not None]
            ax.scatter([r["epochs_done"] for r in last], [r["last_top1"] for r in last], s=40, marker=marker,
                       facecolors="none", edgecolors=colour, zorder=3, label=f"{m} (ours, last)")
            label = f"{m} (ours, mean ± std over seeds)"
            for g in groups:
                best = [r for r in g["runs"] if r["best_top1"] is not None]
                if g["dataset"] == ds and g["method"] == m and len(best) > 1:
                    values = [r["best_top1"] for r in best]
                    ax.errorbar(max(r["epochs_done"] for r in best), statistics.mean(values),
                                yerr=statistics.stdev(values), fmt="_", markersize=16, capsize=5, color="black",
                                zorder=4, label=label)
                    label = None
        ax.set_title(ds)
        ax.set_xlabel("pretraining epochs")
        ax.set_ylabel("linear top-1 (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, path)


def run_curves_figure(run):
    """Training loss, kNN top-1 and each evaluation's top-1 against the epoch numbers of the logs."""
    stats = run["stats"]
    evals = [e for e in run["evals"] if e["stats"] is not None and "prec1_val" in e["stats"].columns]
    panels = 3 if evals else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    if stats is not None and "loss" in stats.columns:
        ax.plot(stats["epoch"], pd.to_numeric(stats["loss"], errors="coerce"), marker=".", color="tab:red")
    else:
        ax.text(0.5, 0.5, "no training stats yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch (from 0, as logged)")
    ax.set_ylabel("training loss")
    ax.set_title(f"{run['label']}: loss")
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    knn = None
    if stats is not None and "knn_top1" in stats.columns:
        knn = stats[["epoch", "knn_top1"]].assign(knn_top1=pd.to_numeric(stats["knn_top1"], errors="coerce"))
        knn = knn.dropna()
    if knn is not None and len(knn):
        ax.plot(knn["epoch"], knn["knn_top1"], marker="o", color="tab:green")
    else:
        ax.text(0.5, 0.5, "no kNN values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch (from 0, as logged)")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("kNN monitor")
    ax.grid(alpha=0.3)
    if evals:
        ax = axes[0][2]
        for e in evals:
            ev = e["stats"]
            ax.plot(ev["epoch"], pd.to_numeric(ev["prec1_val"], errors="coerce"), marker=".",
                    label=f"{e['label']}: test top-1")
            if "prec1" in ev.columns:
                ax.plot(ev["epoch"], pd.to_numeric(ev["prec1"], errors="coerce"), marker=".", linestyle=":",
                        label=f"{e['label']}: train top-1")
        ax.set_xlabel("evaluation epoch (from 0, as logged)")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def _safe(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"


def write_report(dirs, out_dir, plan=None, queue=None):
    """Write results.md and the plots; returns (runs, list of written paths). With `plan` (a plan file of
    scripts/reproduce_tables.sh), its cells are reported too; `queue` ({job id: state}, see
    reproduce_tables.slurm_queue) tells which of them are still pending or running."""
    os.makedirs(out_dir, exist_ok=True)
    dumps, finetuning_paths = find_folders(dirs)
    plan_lines = []
    if plan is not None:
        cells = reproduce_tables.read_plan(plan)
        cells_dir = os.path.dirname(os.path.abspath(plan))
        runs = load_runs(dumps + [c.experiment_path for c in cells])
        host = socket.gethostname()
        statuses = {c.name: reproduce_tables.cell_status(c, cells_dir, queue, host) for c in cells}
        plan_lines = plan_sections(cells, statuses, {r["path"]: r for r in runs}, cells_dir)
    else:
        runs = load_runs(dumps)
    finetunings = [load_finetuning(p) for p in finetuning_paths]
    written = []
    md = os.path.join(out_dir, "results.md")
    text = markdown(runs, plan_lines, finetunings)
    atomic_write(md, lambda f: f.write(text.encode()))
    written.append(md)
    p = os.path.join(out_dir, "accuracy_vs_epochs.png")
    plot_accuracy_vs_epochs(runs, p)
    written.append(p)
    for r in runs:
        p = os.path.join(out_dir, f"{_safe(r['label'])}_curves.png")
        _save(run_curves_figure(r), p)
        written.append(p)
    return runs, written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", help="experiment folders (searched recursively)")
    parser.add_argument("--plan", help="a plan of scripts/reproduce_tables.sh (experiments/tables/_cells/plan-*.tsv): "
                                       "report its cells, with their status")
    parser.add_argument("--out", default="report", help="output folder for results.md and the PNG plots "
                                                        "(default: report)")
    args = parser.parse_args(argv)
    if not args.dirs and not args.plan:
        parser.error("give experiment folders, or --plan")
    if args.plan is not None and not os.path.isfile(args.plan):
        parser.error(f"--plan {args.plan}: no such file")
    queue = reproduce_tables.slurm_queue(dict(os.environ)) if args.plan else None
    runs, written = write_report(args.dirs, args.out, args.plan, queue)
    with open(written[0]) as f:
        print(f.read())
    print(f"{len(runs)} run(s); wrote {len(written)} file(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
