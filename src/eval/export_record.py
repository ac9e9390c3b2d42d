"""The description that tools/export_backbone.py writes beside an exported backbone (`NAME.json` next to
`NAME.pth`, format in docs/CONTRACTS.md): what the evaluations read to say how long and on what data the
backbone was pretrained, and tools/results.py to tie an evaluation of the export to the run it came from.
Standard library only (tools/results.py imports it without torch).
"""
import json
import os

# What the export records of the run that wrote its source checkpoint (from that run's params.json).
PRETRAINING_KEYS = ("epochs", "run_swav", "data_path", "data", "seed")


def record_path(weights):
    """The description's path for the exported weights at `weights`: the same name with `.json`."""
    return os.path.splitext(os.fspath(weights))[0] + ".json"


def _epoch(value):
    return value is None or (isinstance(value, int) and not isinstance(value, bool))


def read_export_record(weights):
    """The description beside the weights at `weights` when it is one (a JSON object with the `arch` and
    `source` strings and an `epoch` entry that is an integer or null, as its readers take `record["epoch"]`;
    `pretraining` an object or null), else None: no such file, an unreadable or broken one, or another kind
    of JSON (a run's params.json is none)."""
    path = record_path(weights)
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    if not (isinstance(record, dict) and isinstance(record.get("arch"), str)
            and isinstance(record.get("source"), str) and "epoch" in record and _epoch(record["epoch"])
            and isinstance(record.get("pretraining", {}), (dict, type(None)))):
        return None
    return record


def pretraining_of(params_path, params):
    """The `pretraining` entry of an export: the run folder of `params_path` (a run's params.json) and the
    entries of PRETRAINING_KEYS it holds, or None without a params.json."""
    if params_path is None:
        return None
    return {"run": os.path.dirname(os.path.abspath(params_path)),
            **{k: params[k] for k in PRETRAINING_KEYS if k in params}}
