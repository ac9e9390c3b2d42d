#!/usr/bin/env python3
"""Collect experiment folders into a results table and plots, side by side with the published numbers.

    python tools/results.py EXPERIMENTS_DIR [MORE_DIRS ...] --out OUT_DIR

Every folder under the given directories that holds `params.json` and/or `stats0.pkl` (and whose name does
not end in `_linear_eval`) is a pretraining dump; its linear evaluation is the sibling folder
`<dump>_linear_eval` (formats: docs/CONTRACTS.md). Writes

- `OUT_DIR/results.md`: one row per run: method (SwAV / Un-Mix from `run_swav`), data set, pretraining
  epochs done / planned, linear top-1 best (max over evaluation epochs, the released number) and last,
  last kNN top-1, wall time (pretraining `time` + evaluation `seconds`), evaluation mode, and the seed's
  published top-1 for the same (method, data set, planned epochs), with the difference;
- `OUT_DIR/accuracy_vs_epochs.png`: published curves per data set with our runs as points;
- `OUT_DIR/<run>_curves.png`: training loss and kNN top-1 (and linear-eval test top-1 when present) per epoch.

Semi-supervised fine-tunings (`eval_semisup.py` folders: `params.json` with `labels_perc`) get a table of
their own in `results.md`, whatever their folder name: labels %, labelled images, epochs, top-1 (best,
with its top-5, and last) and the pretraining run their `--pretrained` checkpoint comes from.

Unfinished runs show what they have; anything missing is '—'. Only reads files, never loads checkpoints.
"""
import argparse
import json
import math
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from published import DATASETS, METHODS, PUBLISHED, published_top1  # noqa: E402

EVAL_SUFFIX = "_linear_eval"
DASH = "—"
MARKERS = {"SwAV": "o", "Un-Mix": "s"}
COLOURS = {"SwAV": "tab:blue", "Un-Mix": "tab:orange"}


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


def _is_semisup(path):
    """An eval_semisup.py folder: its arguments name the labelled percentage."""
    params_path = os.path.join(path, "params.json")
    params = _read_json(params_path) if os.path.isfile(params_path) else None
    return isinstance(params, dict) and "labels_perc" in params


def _is_dump(path):
    return (not os.path.basename(os.path.normpath(path)).endswith(EVAL_SUFFIX) and not _is_semisup(path)
            and (os.path.isfile(os.path.join(path, "params.json"))
                 or os.path.isfile(os.path.join(path, "stats0.pkl"))))


def _is_eval(path):
    return (os.path.basename(os.path.normpath(path)).endswith(EVAL_SUFFIX)
            and any(os.path.isfile(os.path.join(path, f))
                    for f in ("params.json", "stats0.pkl", "results.json", "train.log")))


def find_runs(dirs):
    """Absolute paths of the pretraining dumps under `dirs` (a dump given directly counts; an evaluation
    folder whose dump is missing yields the dump path too, so its numbers still appear)."""
    found = set()
    for top in dirs:
        for dirpath, dirnames, _ in os.walk(os.path.abspath(top)):
            if _is_semisup(dirpath):
                dirnames[:] = []
            elif _is_eval(dirpath):
                found.add(os.path.normpath(dirpath)[:-len(EVAL_SUFFIX)])
                dirnames[:] = []
            elif _is_dump(dirpath):
                found.add(os.path.normpath(dirpath))
                dirnames[:] = []   # checkpoints/ etc.
            else:
                dirnames.sort()
    return sorted(found)


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


def load_run(path):
    """Everything the table and plots need about one pretraining dump (and its evaluation)."""
    name = os.path.basename(os.path.normpath(path))
    params = _read_json(os.path.join(path, "params.json"))
    stats = _read_stats(os.path.join(path, "stats0.pkl"))
    eval_dir = os.path.normpath(path) + EVAL_SUFFIX
    eval_params = _read_json(os.path.join(eval_dir, "params.json"))
    eval_stats = _read_stats(os.path.join(eval_dir, "stats0.pkl"))
    results = _read_json(os.path.join(eval_dir, "results.json"))

    run = {"name": name, "path": path, "stats": stats, "eval_stats": eval_stats,
           "method": _method(params, name), "dataset": _dataset(params, eval_params)}
    run["epochs_planned"] = int(params["epochs"]) if params and params.get("epochs") is not None else None
    run["epochs_done"] = int(stats["epoch"].max()) + 1 if stats is not None else 0
    run["knn_top1"] = _last_valid(stats, "knn_top1")
    run["pretrain_seconds"] = _last_valid(stats, "time")

    best = last = top5 = eval_seconds = None
    mode = None
    eval_epochs_done = int(eval_stats["epoch"].max()) + 1 if eval_stats is not None else None
    eval_epochs_planned = int(eval_params["epochs"]) if eval_params and eval_params.get("epochs") else None
    if results:
        best, last, top5 = results.get("best_top1"), results.get("last_top1"), results.get("last_top5")
        eval_seconds = results.get("seconds")
        mode = results.get("mode")
        if results.get("epochs") is not None:
            eval_epochs_done = int(results["epochs"])
            eval_epochs_planned = eval_epochs_planned or eval_epochs_done
    elif eval_stats is not None and "prec1_val" in eval_stats.columns:
        p1 = pd.to_numeric(eval_stats["prec1_val"], errors="coerce").dropna()
        if len(p1):
            best, last = float(p1.max()), float(p1.iloc[-1])
        top5 = _last_valid(eval_stats, "prec5_val")
    if mode is None and eval_params:   # an unfinished evaluation: the mode from its arguments, if named
        if isinstance(eval_params.get("probe"), str):  # eval_linear.py --probe released|cached
            mode = eval_params["probe"]
    run.update(best_top1=best, last_top1=last, last_top5=top5, eval_seconds=eval_seconds, eval_mode=mode,
               eval_finished=bool(results), has_eval=bool(results or eval_stats is not None or eval_params),
               eval_epochs_done=eval_epochs_done, eval_epochs_planned=eval_epochs_planned)
    secs = [s for s in (run["pretrain_seconds"], eval_seconds) if s is not None]
    run["wall_seconds"] = sum(secs) if secs else None
    ref_epochs = run["epochs_planned"] if run["epochs_planned"] is not None else run["epochs_done"]
    run["published_top1"] = published_top1(run["method"], run["dataset"], ref_epochs)
    return run


def load_runs(dirs):
    runs = [load_run(p) for p in find_runs(dirs)]
    seen = {}
    for r in runs:   # unique names for the per-run plots
        k = seen.get(r["name"], 0)
        seen[r["name"]] = k + 1
        r["label"] = r["name"] if k == 0 else f"{r['name']}-{k + 1}"
    order = {d: i for i, d in enumerate(DATASETS)}
    runs.sort(key=lambda r: (order.get(r["dataset"], len(order)), r["dataset"], r["method"],
                             r["epochs_planned"] or 0, r["label"]))
    return runs


def find_semisup(dirs):
    """Absolute paths of the eval_semisup.py folders under `dirs`."""
    found = set()
    for top in dirs:
        for dirpath, dirnames, _ in os.walk(os.path.abspath(top)):
            if _is_semisup(dirpath):
                found.add(os.path.normpath(dirpath))
                dirnames[:] = []
            dirnames.sort()
    return sorted(found)


def _run_of_checkpoint(path):
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.basename(folder) == "checkpoints":
        folder = os.path.dirname(folder)
    return os.path.basename(folder)


def load_semisup(path):
    """What the semi-supervised table shows about one eval_semisup.py folder."""
    params = _read_json(os.path.join(path, "params.json")) or {}
    stats = _read_stats(os.path.join(path, "stats0.pkl"))
    results = _read_json(os.path.join(path, "results.json")) or {}
    subset = _read_json(os.path.join(path, "labelled_subset.json")) or {}
    pretrained = str(params.get("pretrained") or "")
    classes = {"num_labels": len(subset["classes"])} if isinstance(subset.get("classes"), list) else None
    run = {"name": os.path.basename(os.path.normpath(path)), "path": path, "dataset": _dataset(params, classes),
           "labels_perc": params.get("labels_perc"),
           "num_labelled": results.get("num_labelled", subset.get("num_labelled")),
           "epochs_planned": params.get("epochs"),
           "epochs_done": int(stats["epoch"].max()) + 1 if stats is not None else 0,
           # the pretraining dump is the folder of the checkpoint (checkpoint.pth.tar or checkpoints/ckp-N.pth)
           "pretrained_run": _run_of_checkpoint(pretrained) if pretrained else "random init",
           "finished": bool(results), "seconds": results.get("seconds")}
    if results:
        run.update(best_top1=results.get("best_top1"), best_top5=results.get("best_top5"),
                   last_top1=results.get("last_top1"))
    else:   # unfinished: what the stats have so far
        p1 = pd.to_numeric(stats["prec1_val"], errors="coerce") if stats is not None and "prec1_val" in stats else None
        best = int(p1.idxmax()) if p1 is not None and p1.notna().any() else None
        run.update(best_top1=None if best is None else float(p1[best]),
                   best_top5=None if best is None else _last_valid(stats.iloc[:best + 1], "prec5_val"),
                   last_top1=_last_valid(stats, "prec1_val"))
    return run


# ----------------------------------------------------------------------------------------------- table

def _pct(v, digits=2):
    return DASH if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def fmt_duration(seconds):
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def _eval_cell(r):
    if not r["has_eval"]:
        return DASH
    mode = r["eval_mode"] or "?"
    done, planned = r["eval_epochs_done"], r["eval_epochs_planned"]
    if done is None and planned is None:
        return mode
    if r["eval_finished"]:
        return f"{mode}, {done if done is not None else planned} ep"
    return f"{mode}, {done or 0}/{planned if planned is not None else '?'} ep (unfinished)"


HEADER = ["run", "method", "data set", "epochs (done/planned)", "linear top-1 best", "linear top-1 last",
          "kNN top-1 (last)", "wall time", "linear eval", "published top-1", "Δ best − published"]


def table_rows(runs):
    rows = []
    for r in runs:
        delta = None
        if r["best_top1"] is not None and r["published_top1"] is not None:
            delta = r["best_top1"] - r["published_top1"]
        planned = r["epochs_planned"] if r["epochs_planned"] is not None else "?"
        rows.append([r["label"], r["method"], r["dataset"], f"{r['epochs_done']}/{planned}",
                     _pct(r["best_top1"]), _pct(r["last_top1"]), _pct(r["knn_top1"]),
                     fmt_duration(r["wall_seconds"]), _eval_cell(r), _pct(r["published_top1"], 1),
                     DASH if delta is None else f"{delta:+.2f}"])
    return rows


SEMISUP_HEADER = ["fine-tuning", "pretrained run", "data set", "labels", "labelled images", "epochs (done/planned)",
                  "top-1 best", "top-5 at best", "top-1 last", "wall time"]


def semisup_markdown(runs):
    lines = ["## Semi-supervised fine-tuning", "",
             "| " + " | ".join(SEMISUP_HEADER) + " |",
             "|" + "|".join([":---"] * 3 + ["---:"] * 7) + "|"]
    for r in runs:
        planned = r["epochs_planned"] if r["epochs_planned"] is not None else "?"
        done = f"{r['epochs_done']}/{planned}" + ("" if r["finished"] else " (unfinished)")
        row = [r["name"], r["pretrained_run"], r["dataset"], f"{r['labels_perc']} %",
               DASH if r["num_labelled"] is None else str(r["num_labelled"]), done, _pct(r["best_top1"]),
               _pct(r["best_top5"]), _pct(r["last_top1"]), fmt_duration(r["seconds"])]
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    lines += ["", "Whole network fine-tuned on a class-balanced labelled subset (eval_semisup.py); top-1 best is "
              "the best test top-1 over the epochs (the released report), with the top-5 of that epoch.", ""]
    return "\n".join(lines)


def markdown(runs):
    lines = ["# Results", "",
             "| " + " | ".join(HEADER) + " |",
             "|" + "|".join([":---"] * 3 + ["---:"] * 5 + [":---"] + ["---:"] * 2) + "|"]
    for row in table_rows(runs):
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    if not runs:
        lines.append("| " + " | ".join([DASH] * len(HEADER)) + " |")
    lines += ["",
              "Linear top-1 best is the maximum test top-1 over the evaluation epochs (the released protocol, "
              "which selects on the test set); last is the final evaluation epoch. kNN top-1 is the last "
              "weighted-kNN value (k=200, T=0.1) logged during pretraining. Wall time adds the pretraining "
              "`time` and the evaluation `seconds`. Published top-1: the seed's tables (ResNet-18, batch 128) "
              f"for the same method, data set and planned epochs; {DASH} when the table has no such row.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- plots

def plot_accuracy_vs_epochs(runs, path):
    datasets = list(DATASETS) + sorted({r["dataset"] for r in runs} - set(DATASETS))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
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
            ax.scatter([r["epochs_done"] for r in mine], [r["best_top1"] for r in mine], s=70, marker=marker,
                       color=colour, edgecolors="black", zorder=3, label=f"{m} (ours, best)")
            last = [r for r in mine if r["last_top1"] is not None]
            ax.scatter([r["epochs_done"] for r in last], [r["last_top1"] for r in last], s=70, marker=marker,
                       facecolors="none", edgecolors=colour, zorder=3, label=f"{m} (ours, last)")
        ax.set_title(ds)
        ax.set_xlabel("pretraining epochs")
        ax.set_ylabel("linear top-1 (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_run_curves(run, path):
    stats, ev = run["stats"], run["eval_stats"]
    panels = 3 if ev is not None and "prec1_val" in ev.columns else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
    ax = axes[0][0]
    if stats is not None and "loss" in stats.columns:
        ax.plot(stats["epoch"] + 1, pd.to_numeric(stats["loss"], errors="coerce"), marker=".", color="tab:red")
    else:
        ax.text(0.5, 0.5, "no training stats yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss")
    ax.set_title(f"{run['label']}: loss")
    ax.grid(alpha=0.3)
    ax = axes[0][1]
    knn = None
    if stats is not None and "knn_top1" in stats.columns:
        knn = stats[["epoch", "knn_top1"]].assign(knn_top1=pd.to_numeric(stats["knn_top1"], errors="coerce"))
        knn = knn.dropna()
    if knn is not None and len(knn):
        ax.plot(knn["epoch"] + 1, knn["knn_top1"], marker="o", color="tab:green")
    else:
        ax.text(0.5, 0.5, "no kNN values", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (%)")
    ax.set_title("kNN monitor")
    ax.grid(alpha=0.3)
    if panels == 3:
        ax = axes[0][2]
        ax.plot(ev["epoch"] + 1, pd.to_numeric(ev["prec1_val"], errors="coerce"), marker=".", label="test top-1")
        if "prec1" in ev.columns:
            ax.plot(ev["epoch"] + 1, pd.to_numeric(ev["prec1"], errors="coerce"), marker=".", label="train top-1")
        ax.set_xlabel("linear-eval epoch")
        ax.set_ylabel("top-1 (%)")
        ax.set_title("linear evaluation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _safe(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"


def write_report(dirs, out_dir):
    """Write results.md and the plots; returns (runs, list of written paths)."""
    os.makedirs(out_dir, exist_ok=True)
    runs = load_runs(dirs)
    semisup = [load_semisup(p) for p in find_semisup(dirs)]
    written = []
    md = os.path.join(out_dir, "results.md")
    with open(md, "w") as f:
        f.write(markdown(runs) + ("\n" + semisup_markdown(semisup) if semisup else ""))
    written.append(md)
    p = os.path.join(out_dir, "accuracy_vs_epochs.png")
    plot_accuracy_vs_epochs(runs, p)
    written.append(p)
    for r in runs:
        p = os.path.join(out_dir, f"{_safe(r['label'])}_curves.png")
        plot_run_curves(r, p)
        written.append(p)
    return runs, written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="experiment folders (searched recursively)")
    parser.add_argument("--out", required=True, help="output folder for results.md and the PNG plots")
    args = parser.parse_args(argv)
    runs, written = write_report(args.dirs, args.out)
    with open(written[0]) as f:
        print(f.read())
    print(f"{len(runs)} run(s); wrote {len(written)} file(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
