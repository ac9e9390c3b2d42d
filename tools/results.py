#!/usr/bin/env python3
"""Collect experiment folders into a results table and plots, side by side with the published numbers.

    python tools/results.py EXPERIMENTS_DIR [MORE_DIRS ...] [--out OUT_DIR]
    python tools/results.py --plan experiments/tables/_cells/plan-<hash>.tsv --out report/tables

Every folder under the given directories (symbolic links followed, each real folder once) is classified
by its `params.json` (pretraining, linear evaluation, semi-supervised fine-tuning), else by its name
(`<dump>_linear_eval[<tag>]`, `<dump>_semisup[<tag>]`), else it is a pretraining dump when it holds
`stats0.pkl` (formats: docs/CONTRACTS.md). An evaluation belongs to the run whose checkpoint it evaluated
(`pretrained_file` in its params.json; for an exported backbone, the run of the checkpoint its .json names,
else a row of its own labelled as an export); without that record, to the run its name attaches it to. An
evaluation of another checkpoint than the run's current `checkpoint.pth.tar` is shown as stale, never as
the run's result. Writes into OUT_DIR (default `report/`; a missing experiment folder is a one-line error,
exit 2, and nothing is written):

- `results.md`:
  - with `--plan` (written by scripts/reproduce_tables.sh): the published tables with ours next to them
    (mean ± std over seeds (n)), and every cell of the plan with its status (done / running / pending /
    failed / interrupted / missing);
  - one row per run: method (SwAV / Un-Mix from `run_swav`), data set, seed, pretraining epochs done /
    planned, released-probe linear top-1 best (max over evaluation epochs, the released number) and last,
    one column per other evaluation (best / last), last kNN top-1, wall time (pretraining `time` plus the
    evaluations' `seconds`), the published top-1 and Δ for the same (method, data set, planned epochs),
    and, where no Δ is shown, why: only a finished run of the released recipe (tools/published.py),
    evaluated to the end by the released protocol on its current checkpoint, is compared;
  - runs that differ only by seed, aggregated as mean ± std (n);
  - every semi-supervised fine-tuning, wherever its folder is, under the pretraining run its `--pretrained`
    checkpoint comes from: labels %, labelled images, epochs, top-1 best (with the top-5 of that epoch) and
    last, wall time;
- `accuracy_vs_epochs.png`: published curves per data set with our runs (and mean ± std over seeds);
- `<run>_curves.png`: training loss and kNN top-1 per epoch, numbered from 0 as the logs number them (and
  each evaluation's test top-1 when present); one file per run, whatever its name.

Every file is replaced atomically, results.md last. Unfinished runs show what they have; anything missing
is '—'. Folders: tools/results_folders.py; runs: tools/results_runs.py; Markdown: tools/results_tables.py;
plots: tools/results_plots.py.
"""
import os
import socket
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(TOOLS))
from table_plan import read_plan  # noqa: E402
from table_records import cell_status, slurm_queue  # noqa: E402
from results_plots import plot_accuracy_vs_epochs, run_curves_figure, save_figure  # noqa: E402,F401
from results_runs import load_run, load_runs, runs_under  # noqa: E402,F401
from results_tables import markdown, plan_sections  # noqa: E402

from src.runtime.files import atomic_write  # noqa: E402
from src.runtime.cli import ArgumentParser, fail  # noqa: E402


def missing_folders(dirs):
    """The given experiment folders that are not folders (a typo, an unmounted disk)."""
    return [d for d in dirs if not os.path.isdir(d)]


def write_report(dirs, out_dir, plan=None, queue=None):
    """Write results.md and the plots; returns (runs, list of written paths). With `plan` (a plan file of
    scripts/reproduce_tables.sh), its cells are reported too; `queue` ({job id: state}, see
    table_records.slurm_queue) tells which of them are still pending or running. A folder in `dirs` that
    does not exist, or folders without a run when there is no plan, is a FileNotFoundError, before anything
    is written."""
    missing = missing_folders(dirs)
    if missing:
        raise FileNotFoundError(f"{missing[0]}: no such folder")
    cells = read_plan(plan) if plan is not None else []
    runs, finetunings = runs_under(dirs, [c.experiment_path for c in cells])
    if plan is None and not runs and not finetunings:  # a wrong folder must not empty an earlier report
        raise FileNotFoundError(f"no run or evaluation under {', '.join(map(str, dirs))} (a run folder holds "
                                "the params.json its script wrote)")
    plan_lines = []
    if plan is not None:
        cells_dir = os.path.dirname(os.path.abspath(plan))
        host = socket.gethostname()
        statuses = {c.name: cell_status(c, cells_dir, queue, host) for c in cells}
        plan_lines = plan_sections(cells, statuses, {os.path.realpath(r["path"]): r for r in runs}, cells_dir)
    text = markdown(runs, plan_lines, finetunings)
    os.makedirs(out_dir, exist_ok=True)
    written = []
    p = os.path.join(out_dir, "accuracy_vs_epochs.png")
    plot_accuracy_vs_epochs(runs, p)
    written.append(p)
    for r in runs:
        p = os.path.join(out_dir, f"{r['file_stem']}_curves.png")
        save_figure(run_curves_figure(r), p)
        written.append(p)
    md = os.path.join(out_dir, "results.md")   # last: a report is complete when its results.md is new
    atomic_write(md, lambda f: f.write(text.encode()))
    return runs, [md] + written


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="*", help="experiment folders (searched recursively, links followed)")
    parser.add_argument("--plan", help="a plan of scripts/reproduce_tables.sh (experiments/tables/_cells/plan-*.tsv): "
                                       "report its cells, with their status")
    parser.add_argument("--out", default="report", help="output folder for results.md and the PNG plots "
                                                        "(default: report)")
    args = parser.parse_args(argv)
    if not args.dirs and not args.plan:
        fail("give experiment folders, or --plan")
    if args.plan is not None and not os.path.isfile(args.plan):
        fail(f"--plan {args.plan}: no such file; nothing was written")
    missing = missing_folders(args.dirs)
    if missing:
        fail(f"{missing[0]}: no such folder; nothing was written (the report in {args.out} is unchanged)")
    queue = slurm_queue(dict(os.environ)) if args.plan else None
    try:
        runs, written = write_report(args.dirs, args.out, args.plan, queue)
    except FileNotFoundError as e:
        fail(f"{e}; nothing was written (the report in {args.out} is unchanged)")
    with open(written[0]) as f:
        print(f.read())
    print(f"{len(runs)} run(s); wrote {len(written)} file(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
