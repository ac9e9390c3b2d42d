"""The GPU check's short real run (benchmarks/gpu_check.sh, phase c) as markdown: what it trained on (the
number of training images, from the run's log), how far it got, and per epoch the loss, the kNN monitor,
the wall time (kNN monitor and checkpoint included), the loop's images/s and the peak GPU memory.

    python benchmarks/real_run_report.py RUN_DIR --schedule 200 [--dry_run]

Exit status 1 when no epoch finished, or (outside a dry run) when the run trained on fewer than
CIFAR's 50,000 images: such a run says nothing about the recipe.
"""
import argparse
import math
import os
import re
import sys

import pandas as pd

CIFAR_TRAIN_IMAGES = 50000


def fmt(x, digits=2):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{digits}f}"


def training_images(run_dir):
    """The number of training images the run's log reports (None when it did not get that far)."""
    try:
        with open(os.path.join(run_dir, "train.log")) as f:
            found = re.findall(r"Building data done with (\d+) images loaded", f.read())
    except OSError:
        return None
    return int(found[-1]) if found else None


def report(run_dir, schedule, dry_run=False):
    """(markdown lines, ok)."""
    n = training_images(run_dir)
    lines, ok = [], True
    if n is None:
        return [f"- c: no training images reported in {run_dir}/train.log (the run did not start)"], False
    lines.append(f"- c: trained on {n:,} training images")
    if n < CIFAR_TRAIN_IMAGES and not dry_run:
        lines.append(f"- error: only {n:,} training images; CIFAR has {CIFAR_TRAIN_IMAGES:,}: not a real run")
        ok = False
    try:
        stats = pd.read_csv(os.path.join(run_dir, "stats0.csv"))
    except (OSError, ValueError):
        return lines + ["- error: no epoch finished (no stats0.csv)"], False
    done = int(stats["epoch"].max()) + 1
    seconds = stats["time"].diff().fillna(stats["time"]).tolist()
    lines.append(f"- c: {done} epoch(s) of the {schedule}-epoch schedule; a check of the loop on real data, not "
                 "a result to compare with the published table")
    lines += ["", "| epoch | loss | kNN top-1 (%) | s (kNN, checkpoint included) | images/s in the loop | "
                  "peak GPU memory (MiB) |", "|---:|---:|---:|---:|---:|---:|"]
    for (_, row), s in zip(stats.iterrows(), seconds):
        lines.append(f"| {int(row['epoch'])} | {fmt(row['loss'], 4)} | {fmt(row.get('knn_top1'))} | {fmt(s, 1)} | "
                     f"{fmt(row['images_per_s'], 0)} | {fmt(row.get('max_memory_mb'), 0)} |")
    return lines, ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="the pretraining folder of the real run")
    p.add_argument("--schedule", type=int, default=200, help="epochs of the run's schedule (--epochs)")
    p.add_argument("--dry_run", action="store_true", help="the test fixture is expected")
    a = p.parse_args()
    lines, ok = report(a.run_dir, a.schedule, a.dry_run)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
