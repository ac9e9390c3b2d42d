"""The experiment folders that tools/results.py reports, and their evaluations.

Which folders are pretraining runs and which are evaluations (by the keys of their params.json, else by
their names), the run each evaluation belongs to (the checkpoint it evaluated, recorded in its params.json;
without a record, the run its name attaches it to) and whether it evaluated that run's current checkpoint.
Folders are found through symbolic links too, each real folder once. Only reads files, never loads
checkpoints. tools/results_runs.py makes runs of them. pandas is imported where a stats file is read, so
that `tools/results.py --help` and its argument errors answer without it.
"""
import functools
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.eval.export_record import read_export_record  # noqa: E402
from src.runtime.files import file_sha256  # noqa: E402

# `<dump>_linear_eval[<tag>]` / `<dump>_semisup[<tag>]`: the last such part of the name
EVAL_FOLDER = re.compile(r"^(?P<dump>.+)_(?P<kind>linear_eval|semisup)(?P<tag>[^/]*)$")
EVAL_FILES = ("params.json", "stats0.pkl", "results.json", "train.log")
# The kind of a folder whose params.json holds these keys (src/runtime/run_folder.folder_kind), whatever its name.
PARAMS_KINDS = (("nmb_prototypes", "pretraining"), ("labels_perc", "semisup"), ("num_labels", "linear_eval"))
CHECKPOINT = "checkpoint.pth.tar"


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
    import pandas as pd
    try:
        df = pd.read_pickle(path)
    except Exception as e:  # a stats file half-written by a killed run
        print(f"warning: cannot read {path}: {e}", file=sys.stderr)
        return None
    if not isinstance(df, pd.DataFrame) or "epoch" not in df.columns or df.empty:
        return None
    return df.drop_duplicates(subset="epoch", keep="last").sort_values("epoch").reset_index(drop=True)


def _truthy(v):
    if isinstance(v, str):
        return v.strip().lower() in ("on", "true", "1")
    return bool(v)


def _last_valid(df, column):
    if df is None or column not in df.columns:
        return None
    import pandas as pd
    s = pd.to_numeric(df[column], errors="coerce").dropna()
    return float(s.iloc[-1]) if len(s) else None


def classify(path):
    """What an experiment folder is, as (kind, dump, tag): kind from its params.json's keys when they tell
    ('pretraining', 'semisup' for eval_semisup.py, 'linear_eval' for eval_linear.py), else from its name
    (`<dump>_linear_eval[<tag>]`, `<dump>_semisup[<tag>]` with evaluation files), else 'pretraining' for a
    folder with params.json or stats0.pkl, else None; dump is the pretraining dump the folder's name
    attaches it to (evaluations only), else None."""
    path = os.path.normpath(path)
    params_path = os.path.join(path, "params.json")
    params = _read_json(params_path) if os.path.isfile(params_path) else None
    m = EVAL_FOLDER.match(os.path.basename(path))
    if m and not any(os.path.isfile(os.path.join(path, f)) for f in EVAL_FILES):
        m = None
    kind = next((k for key, k in PARAMS_KINDS if key in params), None) if isinstance(params, dict) else None
    if kind is None and m:
        kind = m.group("kind")
    if kind is None and (params is not None or os.path.isfile(os.path.join(path, "stats0.pkl"))):
        kind = "pretraining"
    if kind is None:
        return None, None, ""
    if kind != "pretraining" and m and m.group("kind") == kind:
        return kind, os.path.join(os.path.dirname(path), m.group("dump")), m.group("tag")
    return kind, None, ""


def _real(path):
    return os.path.realpath(path)


def find_folders(dirs):
    """({real path: path as found} of the pretraining dumps, {real path: (path, kind, name dump, tag)} of the
    evaluations) under `dirs` (a folder given directly counts). Symbolic links are followed, each real folder
    is taken once (under a name that is not a link where it has one)."""
    found = {}
    for top in dirs:
        for dirpath, dirnames, _ in os.walk(os.path.abspath(top), followlinks=True):
            real = _real(dirpath)
            if real in found:   # reached again through a link (or a link loop): its own name wins
                if found[real][1] and not os.path.islink(dirpath):
                    found[real] = (dirpath, False, found[real][2])
                dirnames[:] = []
                continue
            what = classify(dirpath)
            found[real] = (dirpath, os.path.islink(dirpath), what)
            dirnames[:] = [] if what[0] is not None else sorted(dirnames)   # checkpoints/ etc.
    dumps, evals = {}, {}
    for real, (path, _, (kind, dump, tag)) in sorted(found.items()):
        if kind == "pretraining":
            dumps[real] = path
        elif kind is not None:
            evals[real] = (path, kind, dump, tag)
    return dumps, evals


# ----------------------------------------------------------------------------------------------- evaluations

def _dump_of_checkpoint(path):
    """The pretraining dump a checkpoint comes from: its folder (`<dump>/checkpoint.pth.tar`), or the folder
    above `checkpoints/` (`<dump>/checkpoints/ckp-N.pth`)."""
    folder = os.path.dirname(os.path.normpath(path))
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def checkpoint_home(path):
    """What the weights at `path` are reported under: for an export of tools/export_backbone.py (its
    description beside it), the run folder of the checkpoint it was exported from while that folder exists,
    else the export file itself (reported as an exported backbone, not as a run); for a checkpoint, its
    run's folder (`_dump_of_checkpoint`)."""
    export = read_export_record(path)
    if export is None:
        return _dump_of_checkpoint(path)
    source_dump = _dump_of_checkpoint(export["source"])
    return source_dump if os.path.isdir(source_dump) else os.path.normpath(path)


def evaluated_checkpoint(params):
    """The checkpoint an evaluation evaluated, from its params.json: `pretrained_file` path, else its
    `--pretrained` ('' = random weights); None when not recorded."""
    if not isinstance(params, dict):
        return None
    record = params.get("pretrained_file")
    if isinstance(record, dict) and record.get("path"):
        return str(record["path"])
    if "pretrained_file" in params and record is None:
        return ""
    pretrained = params.get("pretrained")
    return None if pretrained is None else str(pretrained)


def run_of_evaluation(params, name_dump):
    """The real path of the pretraining dump an evaluation belongs to: the `checkpoint_home` of the checkpoint
    it evaluated (an absolute recorded path; unless it is gone, e.g. the experiments were moved, and the name
    tells), else the dump its name attaches it to; None for random weights or when neither tells. An exported
    backbone whose run is not found is its own 'dump' (the export file)."""
    checkpoint = evaluated_checkpoint(params)
    if checkpoint == "":
        return None
    if checkpoint and os.path.isabs(checkpoint):
        dump = checkpoint_home(checkpoint)
        if os.path.exists(dump) or not name_dump:
            return _real(dump)
    return _real(name_dump) if name_dump else None


@functools.lru_cache(maxsize=None)
def _sha256(real_path, size, mtime_ns):
    """The checkpoint's SHA-256, computed once per (path, size, modification time)."""
    return file_sha256(real_path)


def evaluated_current_checkpoint(params, dump):
    """True when the evaluation recorded in `params` evaluated the current `dump/checkpoint.pth.tar` (same
    SHA-256; the file is hashed only when its size or modification time differ from the recorded ones),
    False when it evaluated another checkpoint, None when it cannot be told (nothing recorded, or no
    checkpoint in `dump`). An evaluation of an export of the run's checkpoint compares the SHA-256 of the export's
    source (its description) instead; an export reported as itself (`dump` the file) is its own checkpoint."""
    record = params.get("pretrained_file") if isinstance(params, dict) else None
    path = dump if os.path.isfile(dump) else os.path.join(dump, CHECKPOINT)
    if not isinstance(record, dict) or not record.get("sha256") or not os.path.isfile(path):
        return None
    export = read_export_record(str(record.get("path", ""))) if path != dump else None
    if export is not None:
        if not export.get("source_sha256"):
            return None
        st = os.stat(path)
        return _sha256(_real(path), st.st_size, st.st_mtime_ns) == export["source_sha256"]
    st = os.stat(path)
    if (_real(str(record.get("path", ""))) == _real(path) and record.get("size") == st.st_size
            and record.get("mtime") == st.st_mtime):
        return True
    return _sha256(_real(path), st.st_size, st.st_mtime_ns) == record["sha256"]


def load_evaluation(folder, kind, tag):
    """One evaluation folder: linear (`kind` 'linear_eval') or semi-supervised ('semisup')."""
    params = _read_json(os.path.join(folder, "params.json"))
    stats = _read_stats(os.path.join(folder, "stats0.pkl"))
    results = _read_json(os.path.join(folder, "results.json"))
    results = results if isinstance(results, dict) else {}
    best = last = top5 = best_top5 = seconds = mode = None
    done = int(stats["epoch"].max()) + 1 if stats is not None else None
    planned = int(params["epochs"]) if isinstance(params, dict) and params.get("epochs") else None
    if results:
        best, last, top5 = results.get("best_top1"), results.get("last_top1"), results.get("last_top5")
        best_top5 = results.get("best_top5")
        seconds, mode = results.get("seconds"), results.get("mode")
        if results.get("epochs") is not None:
            done = int(results["epochs"])
            planned = planned or done
    elif stats is not None and "prec1_val" in stats.columns:
        import pandas as pd
        p1 = pd.to_numeric(stats["prec1_val"], errors="coerce").dropna()
        if len(p1):
            best, last = float(p1.max()), float(p1.iloc[-1])
            best_top5 = _last_valid(stats.loc[:p1.idxmax()], "prec5_val")   # the top-5 of the best epoch
        top5 = _last_valid(stats, "prec5_val")
    if mode is None and isinstance(params, dict) and isinstance(params.get("probe"), str):  # unfinished
        mode = params["probe"]
    tag = tag.lstrip("_-")
    if kind == "linear_eval" and mode is None:
        mode = tag or "released"   # `<dump>_linear_eval` is the released probe, `_linear_eval_cached` cached
    return {"folder": folder, "kind": kind, "tag": tag, "mode": mode, "params": params, "stats": stats,
            "results": results, "best_top1": best, "best_top5": best_top5, "last_top1": last, "last_top5": top5,
            "seconds": seconds, "finished": bool(results), "current": None, "stale": False,
            "epochs_done": done, "epochs_planned": planned}


def evaluations_of(dump, evaluations):
    """The evaluations (`find_folders`) that belong to the pretraining dump `dump`, labelled: the first
    released linear probe of its current checkpoint is 'linear' (the published protocol); others are
    '<mode> probe' and 'semi-sup[ <tag>]' (with ' (<tag>)' where labels repeat). An evaluation of another
    checkpoint of the run is `stale`."""
    key = _real(dump)
    evals = []
    for path, kind, name_dump, tag in evaluations.values():
        e_params = _read_json(os.path.join(path, "params.json"))
        if run_of_evaluation(e_params, name_dump) != key:
            continue
        if not (name_dump and _real(name_dump) == key):   # paired by its checkpoint, named otherwise
            tag = "_" + os.path.basename(os.path.normpath(path))
        e = load_evaluation(path, kind, tag)
        e["current"] = evaluated_current_checkpoint(e_params, dump)
        e["stale"] = e["current"] is False
        evals.append(e)
    evals.sort(key=lambda e: (e["kind"] != "linear_eval", e["stale"], e["mode"] != "released", e["tag"] != "",
                              e["tag"], e["folder"]))
    labels = set()
    for e in evals:
        if e["kind"] == "linear_eval":
            label = "linear" if e["mode"] == "released" and not e["stale"] else f"{e['mode']} probe"
        else:
            label = "semi-sup" + (f" {e['tag']}" if e["tag"] else "")
        if label in labels:
            label += f" ({e['tag'] or 'default'})"
        n = 2
        while label in labels:   # still taken: the folder's name decides
            label = f"{label.split(' #')[0]} #{n}"
            n += 1
        labels.add(label)
        e["label"] = label
    return evals
