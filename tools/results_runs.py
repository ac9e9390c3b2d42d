"""The runs of tools/results.py: one pretraining dump with its evaluations (tools/results_folders.py), what it
is (method, data set, seed, epochs), its numbers, whether they may stand next to a published number (the
released recipe, finished, evaluated by the released protocol on its current checkpoint), runs that are
one experiment over seeds, and the semi-supervised fine-tunings.
"""
import json
import os
import re
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOOLS)
sys.path.insert(0, os.path.dirname(TOOLS))
from published import (DATASETS, FULL_SPLITS, METHODS, NUM_LABELS, linear_eval_differences,  # noqa: E402
                       pretraining_differences, published_top1)
from results_folders import (_last_valid, _read_json, _read_stats, _real, _truthy,  # noqa: E402
                             checkpoint_home, classify, evaluated_checkpoint, evaluations_of, find_folders,
                             load_evaluation, run_of_evaluation)
from table_plan import CIFAR_FILES, CIFAR_FOLDERS  # noqa: E402

from src.eval.export_record import read_export_record  # noqa: E402
from src.runtime.cli import OPERATIONAL_FLAGS  # noqa: E402

# What params.json holds besides the settings of an experiment: the arguments that do not change what a run
# computes, the seed, the data path (the data set is compared instead) and the run's provenance (commit,
# library versions, device). Runs equal in everything else (the number of processes included) are one
# experiment.
NOT_SETTINGS = OPERATIONAL_FLAGS | {"seed", "data_path", "provenance"}


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


def _recorded_sizes(params):
    data = (params or {}).get("data")
    return data if isinstance(data, dict) else {}


def _whole_cifar(sizes):
    """'cifar10' / 'cifar100' when recorded sizes are a whole CIFAR set's (50,000 training images, the test
    split's 10,000 where recorded, 10 or 100 classes), else None."""
    if "train_images" not in sizes or any(sizes.get(k, n) != n for k, n in FULL_SPLITS.items()):
        return None
    return next((ds for ds, n in NUM_LABELS.items() if sizes.get("classes") == n), None)


def _cifar_files_in(folder):
    """'cifar10' / 'cifar100' when `folder` holds torchvision's CIFAR files (its cifar-10-batches-py, or those
    files themselves), which a run given that --data_path read; else None."""
    for ds, name in CIFAR_FOLDERS.items():
        if os.path.isdir(os.path.join(folder, name)) or \
                all(os.path.isfile(os.path.join(folder, f)) for f in CIFAR_FILES[ds]):
            return ds
    return None


def _dataset(params, eval_params=None, sizes=None):
    """'cifar10' / 'cifar100' when the run's `data_path` names it (the keyword, or a folder whose path says
    so, e.g. .../CIFAR-10/ or cifar-10-batches-py), holds torchvision's CIFAR files, or the sizes it recorded
    are a whole CIFAR set's (params.json's `data`, or `sizes`); else the data folder's base name ('?' without
    one): an unknown data set, next to no published number, whatever its number of classes. The
    pretraining's record decides; an evaluation's only without it."""
    p = params if (params or {}).get("data_path") or _recorded_sizes(params) else (eval_params or params or {})
    data_path = str(p.get("data_path") or "")
    parts = [q for q in os.path.normpath(data_path).split(os.sep) if q] if data_path else []
    named = next((ds for ds in map(_dataset_from_name, reversed(parts)) if ds), None)
    named = named or (_cifar_files_in(data_path) if data_path else None)
    return named or _whole_cifar({**_recorded_sizes(p), **(sizes or {})}) or (parts[-1] if parts else "?")


def _settings(params):
    return {k: v for k, v in (params or {}).items() if k not in NOT_SETTINGS}


def _few(items, n=2):
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def comparison(run, params):
    """(the published top-1 the run may stand next to or None, why its Δ is not shown: '' when it is). A
    run is compared when it is the released recipe (tools/published.py) for a published row, finished, and
    its released-probe linear evaluation is finished, the released protocol, and of its current checkpoint."""
    if run["dataset"] not in DATASETS:
        return None, "unknown data set (not CIFAR-10 or CIFAR-100 by its recorded path or sizes)"
    if run["method"] not in METHODS:
        return None, "no published table for this method"
    if not isinstance(params, dict):
        return None, "arguments not recorded"
    diffs = pretraining_differences(params, run["method"] == "SwAV")
    if diffs:
        return None, "not the released recipe: " + _few(diffs)
    planned = run["epochs_planned"] if run["epochs_planned"] is not None else run["epochs_done"]
    published = published_top1(run["method"], run["dataset"], planned)
    if published is None:
        return None, f"no published row for {planned} epochs"
    if run["epochs_done"] < planned:
        return published, f"pretraining unfinished ({run['epochs_done']}/{planned} epochs)"
    linear = run["linear"]
    if linear is None:
        stale = any(e["stale"] and e["kind"] == "linear_eval" and e["mode"] == "released" for e in run["evals"])
        return published, ("linear evaluation stale (of an earlier checkpoint)" if stale
                           else "no released-probe linear evaluation")
    if not linear["finished"]:
        return published, "linear evaluation unfinished"
    if not isinstance(linear["params"], dict):
        return published, "evaluation arguments not recorded"
    diffs = linear_eval_differences(linear["params"], run["dataset"])
    if diffs:
        return published, "evaluation not the released protocol: " + _few(diffs)
    return published, ""


def load_run(path, evaluations=None):
    """Everything the tables and plots need about one pretraining dump and its evaluations (`evaluations`:
    the evaluation folders of `find_folders`; by default those next to the dump). `path` may be an exported
    backbone whose run is not found (results_folders.checkpoint_home): see `load_export`."""
    name = os.path.basename(os.path.normpath(path))
    if evaluations is None:
        evaluations = find_folders([os.path.dirname(os.path.normpath(path))])[1]
    export = read_export_record(path) if os.path.isfile(path) else None
    if export is not None:
        return load_export(path, export, evaluations)
    params = _read_json(os.path.join(path, "params.json"))
    stats = _read_stats(os.path.join(path, "stats0.pkl"))
    evals = evaluations_of(path, evaluations)
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
    secs = [s for s in [run["pretrain_seconds"]] + [e["seconds"] for e in evals if not e["stale"]] if s is not None]
    run["wall_seconds"] = sum(secs) if secs else None
    run["published_top1"], run["not_compared"] = comparison(run, params)
    # runs whose pretraining arguments are equal apart from the seed are one experiment (without
    # arguments: only itself); evaluations are not compared, so a seed whose evaluation failed still counts
    run["experiment"] = json.dumps([run["method"], run["dataset"], _settings(params)] if params else run["path"],
                                   sort_keys=True, default=str)
    return run


def load_export(path, export, evaluations):
    """The row of an exported backbone (`path`, its description `export`) whose run is not found: labelled as
    an export, with what its description records of the run (method, data, seed, epochs done / planned),
    never compared with a published number."""
    pretraining = export.get("pretraining") or {}
    evals = evaluations_of(path, evaluations)
    linear = next((e for e in evals if e["label"] == "linear"), None)
    name = f"{os.path.basename(path)} (exported backbone)"
    run = {"name": name, "label": name, "path": os.path.normpath(path), "stats": None, "evals": evals,
           "linear": linear, "method": _method(pretraining, ""),
           "dataset": _dataset(pretraining, next((e["params"] for e in evals if e["params"]), None)),
           "seed": pretraining.get("seed"), "knn_top1": None, "pretrain_seconds": None,
           "epochs_planned": pretraining.get("epochs") if isinstance(pretraining.get("epochs"), int) else None,
           "epochs_done": "?" if export["epoch"] is None else export["epoch"],
           "published_top1": None, "experiment": json.dumps(os.path.normpath(path)),
           "not_compared": f"exported backbone: its run ({pretraining.get('run') or 'not recorded'}) is not found"}
    for k in ("best_top1", "last_top1", "last_top5"):
        run[k] = linear[k] if linear else None
    secs = [e["seconds"] for e in evals if not e["stale"] and e["seconds"] is not None]
    run["wall_seconds"] = sum(secs) if secs else None
    return run


def _safe(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"


def _order(runs):
    """Sorted runs, each with a label of its own (its name; '-2', '-3' for more runs of one name) and a
    file name of its own for its plot (the label in safe characters, made unique the same way)."""
    taken, files = set(), set()
    for r in sorted(runs, key=lambda r: (r["name"], r["path"])):
        label, k = r["name"], 1
        while label in taken:
            k += 1
            label = f"{r['name']}-{k}"
        taken.add(label)
        r["label"] = label
        stem, k = _safe(label), 1
        while stem.lower() in files:    # 'run a' and 'run_a' (and case-insensitive file systems)
            k += 1
            stem = f"{_safe(label)}-{k}"
        files.add(stem.lower())
        r["file_stem"] = stem
    order = {d: i for i, d in enumerate(DATASETS)}
    runs.sort(key=lambda r: (order.get(r["dataset"], len(order)), r["dataset"], r["method"],
                             r["epochs_planned"] or 0, r["label"]))
    return runs


def load_runs(dumps, evaluations=None):
    """The runs of the pretraining dumps `dumps` that exist (or have an evaluation), each real folder once;
    `evaluations` as in `load_run` (by default those next to each dump)."""
    paths = {}
    for p in dumps:
        p = os.path.normpath(p)
        if os.path.isdir(p) or evaluations_of(p, evaluations if evaluations is not None else
                                              find_folders([os.path.dirname(p)])[1]):
            paths.setdefault(_real(p), p)
    return _order([load_run(p, evaluations) for p in sorted(paths.values())])


def evaluations_beside(dumps):
    """The evaluations (`find_folders`) lying next to the pretraining dumps `dumps` (in their parent folders)
    that belong to one of them: linear evaluations and fine-tunings alike."""
    keys = {_real(d) for d in dumps}
    parents = sorted({os.path.dirname(os.path.abspath(d)) for d in dumps})
    found = find_folders([p for p in parents if os.path.isdir(p)])[1] if parents else {}
    return {real: e for real, e in found.items()
            if run_of_evaluation(_read_json(os.path.join(e[0], "params.json")), e[2]) in keys}


def runs_under(dirs, extra_dumps=()):
    """The runs found under `dirs` (find_folders), with the dumps their evaluations belong to (also missing
    ones, so their numbers still appear) and `extra_dumps`; and the semi-supervised fine-tunings found. A
    run folder given itself (`results.py experiments/run`) and `extra_dumps` come with their evaluations,
    which lie next to them, not under them."""
    dumps, evaluations = find_folders(dirs)
    given = [d for d in dirs if os.path.isdir(d) and classify(d)[0] == "pretraining"]
    evaluations = {**evaluations_beside(given + list(extra_dumps)), **evaluations}
    wanted = dict(dumps)
    for path, kind, name_dump, _ in evaluations.values():
        params = _read_json(os.path.join(path, "params.json"))
        run = run_of_evaluation(params, name_dump)
        if run is not None and run not in wanted and (kind == "linear_eval" or name_dump is not None):
            wanted[run] = (name_dump if name_dump and _real(name_dump) == run
                           else checkpoint_home(evaluated_checkpoint(params)))
    for p in extra_dumps:
        wanted.setdefault(_real(p), os.path.normpath(p))
    runs = load_runs(list(wanted.values()), evaluations)
    finetunings = [load_finetuning(path) for path, kind, _, _ in evaluations.values() if kind == "semisup"]
    return runs, finetunings


def load_finetuning(folder):
    """One semi-supervised fine-tuning (load_evaluation) with its labelled subset, and `dump`: the pretraining
    dump of its `--pretrained` checkpoint, or without arguments the dump its name attaches it to."""
    _, name_dump, tag = classify(folder)
    e = load_evaluation(folder, "semisup", tag)
    params = e["params"] if isinstance(e["params"], dict) else {}
    subset = _read_json(os.path.join(folder, "labelled_subset.json"))
    subset = subset if isinstance(subset, dict) else {}
    classes = subset.get("classes")
    pretrained = evaluated_checkpoint(params)   # '' is a random init, None unknown (no arguments)
    if pretrained is None:
        dump = name_dump
    else:
        dump = checkpoint_home(pretrained) if pretrained else None
    e.update(name=os.path.basename(os.path.normpath(folder)), pretrained=pretrained, dump=dump,
             labels_perc=params.get("labels_perc", e["results"].get("labels_perc")),
             num_labelled=e["results"].get("num_labelled", subset.get("num_labelled")),
             dataset=_dataset(params, sizes={"train_images": subset.get("num_train_images"),
                                             "classes": len(classes) if isinstance(classes, list) else None}))
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
