"""The Markdown of tools/results.py: the runs' table, the table over seeds, the semi-supervised fine-tunings
and, for a plan of scripts/reproduce_tables.sh, the published tables with ours next to them and the cells'
statuses. A number stands next to a published one only for a run that `results_runs.comparison` allows;
every other run says why not.
"""
import math
import os
import statistics
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
from table_plan import DATASETS, METHODS  # noqa: E402
from table_records import STATUSES  # noqa: E402
from published import published_top1  # noqa: E402
from results_runs import group_by_seed  # noqa: E402

DASH = "—"


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
    if e["stale"]:
        return f"stale (of an earlier checkpoint): {text}"
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
              + ["kNN top-1 (last)", "wall time", "published top-1", "Δ best − published", "not compared because"])
    rows = []
    for r in runs:
        by_label = {e["label"]: e for e in r["evals"]}
        planned = r["epochs_planned"] if r["epochs_planned"] is not None else "?"
        rows.append([r["label"], r["method"], r["dataset"], DASH if r["seed"] is None else r["seed"],
                     f"{r['epochs_done']}/{planned}", _pct(r["best_top1"]), _pct(r["last_top1"]), _linear_cell(r)]
                    + [_other_eval_cell(by_label.get(label)) for label in others]
                    + [_pct(r["knn_top1"]), fmt_duration(r["wall_seconds"]), _pct(r["published_top1"], 1),
                       DASH if r["not_compared"] else _delta(r["best_top1"], r["published_top1"]), r["not_compared"]])
    align = [":---"] * 4 + ["---:"] * 3 + [":---"] + ["---:"] * (len(others) + 4) + [":---"]
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
        compared = [r["best_top1"] for r in g["runs"] if r["best_top1"] is not None and not r["not_compared"]]
        other = [mean_std(next((e["best_top1"] for e in r["evals"] if e["label"] == label), None)
                          for r in g["runs"]) for label in others]
        epochs = DASH if g["epochs_planned"] is None else g["epochs_planned"]
        rows.append([g["label"], g["method"], g["dataset"], epochs,
                     ", ".join(DASH if r["seed"] is None else str(r["seed"]) for r in g["runs"]),
                     mean_std(best), mean_std(r["last_top1"] for r in g["runs"])] + other
                    + [mean_std(r["knn_top1"] for r in g["runs"]), _pct(g["published_top1"], 1),
                       _delta(statistics.mean(compared) if compared else None, g["published_top1"])
                       + (f" ({len(compared)} of {len(g['runs'])} runs)" if compared and len(compared) < len(g["runs"])
                          else "")])
    align = [":---"] * 3 + ["---:"] * (len(others) + 7)
    return _md_table(header, align, rows)


def finetunings_table(finetunings, runs):
    """One row per semi-supervised fine-tuning, under the label of its pretraining run (the run's folder name
    when that run is not in the report; an exported backbone whose run is not found, as such)."""
    labels = {os.path.realpath(r["path"]): r["label"] for r in runs}
    rows = []
    for f in finetunings:
        if f["dump"] is not None:
            name = os.path.basename(os.path.normpath(f["dump"]))   # a file: an export whose run is not found
            pretrained = labels.get(os.path.realpath(f["dump"]),
                                    f"{name} (exported backbone)" if os.path.isfile(f["dump"]) else name)
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
    """The number put next to the published one and its mark: the released probe's best top-1 ('†' when the
    run is not compared: another recipe, unfinished, ...); else another linear probe's of the current
    checkpoint, '*' (it is not the published protocol); (None, '') without either."""
    if run["best_top1"] is not None:
        return run["best_top1"], "†" if run["not_compared"] else ""
    other = next((e for e in run["evals"] if e["kind"] == "linear_eval" and e["best_top1"] is not None
                  and not e["stale"]), None)
    return (other["best_top1"], "*") if other else (None, "")


def plan_sections(cells, statuses, runs_by_path, cells_dir):
    """The published tables with our cells next to them, then every cell with its status."""
    lines = []
    marks_used = set()
    for ds in [d for d in DATASETS.values() if any(c.dataset == d for c in cells)]:
        epochs = sorted({c.epochs for c in cells if c.dataset == ds})
        lines += [f"## {ds}: linear top-1 (%), ours (mean ± std over seeds, n) next to the published", ""]
        rows = []
        for m in [m for m in METHODS if any(c.method == m and c.dataset == ds for c in cells)]:
            name = METHODS[m]
            ours = []
            for ep in epochs:
                values, marks = [], set()
                for c in cells:
                    run = runs_by_path.get(os.path.realpath(c.experiment_path))
                    if (c.dataset, c.method, c.epochs) == (ds, m, ep) and run is not None:
                        v, mark = _headline(run)
                        values.append(v)
                        marks |= {mark} - {""}
                marks_used |= marks
                ours.append(mean_std(values) + "".join(f" {k}" for k in sorted(marks))
                            if any(c.dataset == ds and c.method == m and c.epochs == ep for c in cells) else DASH)
            rows.append([f"{name} (ours)"] + ours)
            rows.append([f"{name} (published)"] + [_pct(published_top1(name, ds, ep), 1) for ep in epochs])
        lines += _md_table(["method"] + [f"{ep} ep" for ep in epochs], [":---"] + ["---:"] * len(epochs), rows)
        lines.append("")
    if "*" in marks_used:
        lines += ["\\* from a cached linear probe (EVAL_EXTRA_ARGS=\"--probe cached\"), not the released protocol "
                  "of the published numbers.", ""]
    if "†" in marks_used:
        lines += ["† not compared with the published number: another recipe, unfinished, or evaluated otherwise "
                  "(the column \"not compared because\" of the runs' table says why).", ""]
    counts = {s: sum(1 for st, _ in statuses.values() if st == s) for s in STATUSES}
    lines += ["## Cells", "", f"{len(cells)} cells: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + ".",
              ""]
    rows = []
    for c in cells:
        status, detail = statuses[c.name]
        run = runs_by_path.get(os.path.realpath(c.experiment_path))
        value, mark = _headline(run) if run else (None, "")
        rows.append([c.name, c.dataset, METHODS[c.method], c.epochs, c.seed,
                     status + (f" ({detail})" if detail else ""), _pct(value) + (f" {mark}" if mark else ""),
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
              "pretraining `time` and the evaluations' `seconds` (of the current checkpoint). Published top-1: the "
              "released tables (ResNet-18, batch 128) for the same method, data set and planned epochs, shown only "
              "for a run of the released recipe (the released scripts' pretraining arguments, one process); Δ only "
              "when that run is also finished and its released-probe linear evaluation is finished, the released "
              "protocol (100 epochs, batch 32, lr 0.3, ...) and of the run's current checkpoint. Otherwise "
              f"{DASH}, and the last column says why. An evaluation of an earlier checkpoint of a run is stale: "
              "its numbers are shown as such, never as the run's.",
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

