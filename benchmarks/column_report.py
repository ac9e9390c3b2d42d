"""The column's report (benchmarks/gpu_check.sh, phase e): the pretraining's statistics and the linear
probe's top-1 next to the published number, as markdown.

    python benchmarks/column_report.py RUN_DIR --method unmix --epochs 200

Reads RUN_DIR/stats0.csv (one row per epoch: loss, lr, time, kNN top-1, images/s, peak memory) and
RUN_DIR_linear_eval/results.json when the probe ran.
"""
import argparse
import json
import math
import os
import statistics
import sys

import pandas as pd

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from published import published_top1  # noqa: E402

METHODS = {"unmix": "Un-Mix", "swav": "SwAV"}


def fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report(run_dir, method, epochs, published_epochs=None):
    lines = []
    try:
        stats = pd.read_csv(os.path.join(run_dir, "stats0.csv"))
    except (OSError, ValueError):
        return [f"no statistics in {run_dir} (the pretraining did not finish an epoch)"]
    done = int(stats["epoch"].max()) + 1
    seconds = stats["time"].diff().fillna(stats["time"]).tolist()
    lines.append(f"Pretraining: {done} of {epochs} epochs, {fmt(stats['time'].iloc[-1] / 60, 1)} min of training; "
                 f"median {fmt(statistics.median(seconds), 1)} s per epoch (kNN and checkpoint included), "
                 f"median {fmt(stats['images_per_s'].median(), 0)} images/s in the loop.")
    lines += ["", "| epoch | loss | kNN top-1 | images/s | peak memory (MiB) |", "|---:|---:|---:|---:|---:|"]
    shown = stats[stats["knn_top1"].notna() | (stats["epoch"] == stats["epoch"].max())]
    for _, row in shown.iterrows():
        lines.append(f"| {int(row['epoch'])} | {fmt(row['loss'], 4)} | {fmt(row['knn_top1'])} | "
                     f"{fmt(row['images_per_s'], 0)} | {fmt(row.get('max_memory_mb'), 0)} |")
    published_epochs = published_epochs or epochs
    published = published_top1(METHODS[method], "cifar10", published_epochs)
    results = os.path.join(os.path.normpath(run_dir) + "_linear_eval", "results.json")
    try:
        with open(results) as f:
            r = json.load(f)
        lines += ["", f"Linear probe (released protocol, {r['epochs']} epochs, batched crops) of the epoch-{done} "
                      f"checkpoint: top-1 best {fmt(r['best_top1'])} %, last {fmt(r['last_top1'])} % in "
                      f"{fmt(r['seconds'], 0)} s; published {METHODS[method]} {published_epochs} epochs: "
                      f"{fmt(published, 1)} %."]
    except (OSError, ValueError, KeyError):
        lines += ["", f"Linear probe: no result (published {METHODS[method]} {published_epochs} epochs: "
                      f"{fmt(published, 1)} %)."]
    return lines


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--method", choices=sorted(METHODS), default="unmix")
    p.add_argument("--epochs", type=int, default=200, help="epochs the pretraining is to train")
    p.add_argument("--published_epochs", type=int, default=None, help="the table's row (default: --epochs)")
    a = p.parse_args()
    print("\n".join(report(a.run_dir, a.method, a.epochs, a.published_epochs)))


if __name__ == "__main__":
    main()
