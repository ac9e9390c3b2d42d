#!/usr/bin/env python3
"""Export the backbone of a checkpoint as a plain state dict, with a JSON file naming its architecture.

    python tools/export_backbone.py experiments/run/checkpoint.pth.tar --out backbone.pth

writes `backbone.pth` (the backbone's parameters and batch-norm buffers, names without `module.`, no
projection head or prototypes; `torch.load(weights_only=True)` reads it) and `backbone.json`
(`arch`, `width_per_group`, `feature_dim`, the source checkpoint, its SHA-256 and its `epoch` entry: the epochs
done, so 2 after epochs 0-1 of the training log; and `pretraining`, what the params.json of its run records:
planned epochs, method, data, seed). An existing `--out` is replaced only by an export of the same checkpoint
(the same SHA-256, identical weights); anything else there is kept and the tool stops (exit 2). Reads any
checkpoint of this project or of the released code; the architecture and width are read from the weights (and checked
against the checkpoint's own `arch` entry and the params.json of its run when it has them). Load the export with

    meta = json.load(open("backbone.json"))
    model = build_model(meta["arch"], width_per_group=meta["width_per_group"])   # from src.method.resnet
    model.load_state_dict(torch.load("backbone.pth", weights_only=True))

or `torch.hub.load(REPO, meta["arch"], source="local", pretrained="backbone.pth")`.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from src.eval.export_record import pretraining_of, read_export_record, record_path  # noqa: E402
from src.eval.pretrained import (PretrainedError, epochs_done, load_weights, network_config,  # noqa: E402
                                 params_beside, read_state_dict)
from src.method.resnet import build_model  # noqa: E402
from src.runtime.checkpoint import atomic_save  # noqa: E402
from src.runtime.cli import ArgumentParser, fail  # noqa: E402
from src.runtime.files import file_sha256, write_json  # noqa: E402


class ExportExists(Exception):
    """`--out` (or its .json) holds something this export must not replace; the message is one line."""


def replace_problem(out, weights, meta):
    """Why the files at `out` and its .json may not be replaced by the export of `weights` described by
    `meta`, or None when they may: what is there must be an earlier export of the same checkpoint (its .json
    records the same SHA-256 of the source, its state dict holds identical tensors), e.g. a rerun, or one
    killed between its two files. Anything else (other weights, another checkpoint's export, a file of
    another kind) is another result, kept."""
    description = record_path(out)
    if os.path.lexists(description):
        record = read_export_record(out)
        if record is None:
            return f"{description} exists and is not the description of an export"
        if record.get("source_sha256") != meta["source_sha256"]:
            return f"{description} describes an export of another checkpoint ({record['source']})"
    if os.path.lexists(out):
        try:
            old = read_state_dict(out)[0]
        except PretrainedError:
            return f"{out} exists and is not a state dict"
        same = old.keys() == weights.keys() and all(
            old[k].dtype == v.dtype and old[k].shape == v.shape and torch.equal(old[k], v) for k, v in weights.items())
        if not same:
            return f"{out} exists and holds other weights"
    return None


def export_backbone(checkpoint, out):
    """Write the backbone of `checkpoint` to `out` and its description next to it (`out` with `.json`);
    returns the description. Raises PretrainedError when the checkpoint holds no known backbone, ExportExists
    (nothing written) when `out` or its .json holds something else than an export of this checkpoint."""
    state, info = read_state_dict(checkpoint)
    config = network_config(checkpoint, state, info)  # checked against its `arch` entry and its run's params.json
    arch, width = config["arch"], config["width_per_group"]
    model = build_model(arch, width_per_group=width)
    load_weights(model, state, optional=())
    meta = {"arch": arch, "width_per_group": width, "feature_dim": model.feature_dim,
            "source": os.path.abspath(checkpoint), "source_sha256": file_sha256(checkpoint), "epoch": info["epoch"],
            "pretraining": pretraining_of(*params_beside(checkpoint))}
    weights = model.state_dict()
    problem = replace_problem(out, weights, meta)
    if problem:
        raise ExportExists(problem)
    # Each file is replaced atomically, the weights first: a kill between the two leaves the new weights
    # beside no description or beside that of an earlier export of the same weights (replace_problem).
    atomic_save(weights, out)
    write_json(record_path(out), meta, indent=1)
    return meta


def main(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a pretraining (or fine-tuning) checkpoint, ours or the released one")
    parser.add_argument("--out", default="backbone.pth",
                        help="state-dict file to write; the description goes to the same name with .json "
                             "(default: backbone.pth in the current folder); an existing one is replaced only "
                             "by an export of the same checkpoint")
    args = parser.parse_args(argv)
    folder = os.path.dirname(os.path.abspath(args.out))
    if args.out.endswith(".json"):
        fail(f"--out {args.out}: the state dict needs another name than its .json description (e.g. backbone.pth)")
    if not os.path.isdir(folder):
        fail(f"--out {args.out}: folder {folder} does not exist")
    try:
        meta = export_backbone(args.checkpoint, args.out)
    except PretrainedError as e:
        fail(str(e))
    except ExportExists as e:
        fail(f"--out {args.out}: {e}; nothing was written (choose another --out, or remove {args.out} and "
             f"{record_path(args.out)} first)")
    except OSError as e:
        fail(f"--out {args.out}: cannot write ({e.strerror})")
    print(f"wrote {args.out} and {record_path(args.out)}: {meta['arch']}, width {meta['width_per_group']}, "
          f"{meta['feature_dim']}-d features, from {args.checkpoint} {epochs_done(meta['epoch'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
