"""The plots of tools/results.py: accuracy against pretraining epochs next to the published curves, and
each run's curves (loss, kNN top-1, its evaluations' top-1). Every file is written atomically. matplotlib
and pandas are imported when a figure is drawn, so that `tools/results.py --help` and its argument errors
answer without them (about half a second).
"""
import os
import statistics
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(TOOLS))
from published import DATASETS, METHODS, PUBLISHED  # noqa: E402
from results_runs import group_by_seed  # noqa: E402

from src.runtime.files import atomic_write  # noqa: E402

MARKERS = {"SwAV": "o", "Un-Mix": "s"}
COLOURS = {"SwAV": "tab:blue", "Un-Mix": "tab:orange"}


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    pyplot().close(fig)


def plot_accuracy_vs_epochs(runs, path):
    """The published curves per data set, with our runs that are compared with them (see
    results_runs.comparison): best and last top-1, and mean ± std over seeds."""
    datasets = list(DATASETS) + sorted({r["dataset"] for r in runs} - set(DATASETS))
    fig, axes = pyplot().subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    groups = group_by_seed(runs)
    for ax, ds in zip(axes[0], datasets):
        for m in METHODS:
            pub = PUBLISHED.get(ds, {}).get(m)
            if pub:
                ep = sorted(pub)
                ax.plot(ep, [pub[e] for e in ep], linestyle="--", marker=MARKERS[m], color=COLOURS[m],
                        alpha=0.6, label=f"{m} (published)")
        for m in sorted({r["method"] for r in runs if r["dataset"] == ds}):
            mine = [r for r in runs if r["dataset"] == ds and r["method"] == m and r["best_top1"] is not None
                    and not r["not_compared"]]   # only runs that may stand next to the published curves
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
                best = [r for r in g["runs"] if r["best_top1"] is not None and not r["not_compared"]]
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
    save_figure(fig, path)


def run_curves_figure(run):
    """Training loss, kNN top-1 and each evaluation's top-1 against the epoch numbers of the logs."""
    import pandas as pd
    from matplotlib.ticker import MaxNLocator
    stats = run["stats"]
    evals = [e for e in run["evals"] if e["stats"] is not None and "prec1_val" in e["stats"].columns]
    panels = 3 if evals else 2
    fig, axes = pyplot().subplots(1, panels, figsize=(5 * panels, 3.8), squeeze=False)
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
            stale = " (stale: of an earlier checkpoint)" if e["stale"] else ""
            ax.plot(ev["epoch"], pd.to_numeric(ev["prec1_val"], errors="coerce"), marker=".",
                    label=f"{e['label']}: test top-1{stale}")
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

