"""A finished evaluation (eval_linear.py, eval_semisup.py): its `results.json`, written once when the last
epoch is done. A rerun of the same command finds the results and reports them, changing nothing in the
folder (its `seconds` stay those of the evaluation, counted across restarts by the statistics table's
`time` column, see `src.runtime.logs.Clock`).
"""
import json
import os

from ..runtime.durations import format_eta

RESULTS_FILE = "results.json"
RESULTS_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                            "results.py")


def finished_results(dump_path):
    """The results of the evaluation that finished in `dump_path` (its `results.json`), or None when there
    is none (or it cannot be read: the evaluation then resumes from its checkpoint and writes it again)."""
    try:
        with open(os.path.join(dump_path, RESULTS_FILE)) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    return results if isinstance(results, dict) and "best_top1" in results else None


def report_finished(results, dump_path, logger):
    """Log that the evaluation in `dump_path` is finished, with its stored numbers (nothing is written)."""
    seconds = results.get("seconds")
    took = f" in {format_eta(seconds)}" if isinstance(seconds, (int, float)) else ""
    epochs = results.get("epochs", "?")
    logger.info(f"This evaluation finished earlier ({epochs} epoch{'' if epochs == 1 else 's'}{took}); its results in "
                f"{os.path.join(dump_path, RESULTS_FILE)} are kept as they are: best top-1 "
                f"{results['best_top1']:.1f}, last-epoch top-1 {results.get('last_top1', float('nan')):.1f}.")


def results_line(what, dump_path):
    """The last line of a finished evaluation `what` ("Linear evaluation"): where its results are and the
    command that lists it beside the other runs of its parent folder (as the pretraining's names its
    checkpoint)."""
    return (f"{what} done. Results: {os.path.join(dump_path, RESULTS_FILE)} (every run side by side: "
            f"python {RESULTS_TOOL} {os.path.dirname(os.path.abspath(dump_path))})")
