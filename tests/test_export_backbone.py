"""tools/export_backbone.py on a real pretraining checkpoint: a plain backbone state dict and its JSON
description, loadable as docs/evaluation.md shows (and through hubconf), with the pretraining network's features."""
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src.eval.setup import network_from_checkpoint
from src.method.resnet import build_model
from src.runtime.files import file_sha256
from tests.e2e_helpers import RUN_ENV

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "export_backbone.py"
sys.path.insert(0, str(REPO / "tools"))

import eval_semisup  # noqa: E402
import export_backbone  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pre(tiny_checkpoint):
    return tiny_checkpoint


def export(*args, cwd):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=RUN_ENV, timeout=120)


def pretraining_backbone(ckpt):
    state = {k[len("module."):]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    net = build_model("resnet18", normalize=True, hidden_mlp=32, output_dim=16, nmb_prototypes=10, width_per_group=8)
    net.load_state_dict(state)
    return net.eval()


def test_export_and_load_as_the_docs_show(pre, tmp_path):
    res = export(pre, "--out", tmp_path / "backbone.pth", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    meta = json.loads((tmp_path / "backbone.json").read_text())
    run = json.loads((pre.parent / "params.json").read_text())
    assert meta == {"arch": "resnet18", "width_per_group": 8, "feature_dim": 256, "source": str(pre),
                    "source_sha256": file_sha256(pre), "epoch": 1,
                    "pretraining": {"run": str(pre.parent), **{k: run[k] for k in ("epochs", "run_swav", "data_path", "data", "seed")}}}
    # its epoch in the words of the training log, which counts from 0
    last_logged = re.findall(r"Epoch (\d+) done", (pre.parent / "train.log").read_text())[-1]
    assert res.stdout.rstrip().endswith(f"from {pre} after 1 epoch (epoch {last_logged})"), res.stdout
    state = torch.load(tmp_path / "backbone.pth", weights_only=True)
    assert not any(k.startswith(("module.", "projection_head", "prototypes")) for k in state)
    assert "bn1.running_mean" in state

    # docs/evaluation.md: build the network named by the JSON and load the state dict (strict)
    model = build_model(meta["arch"], width_per_group=meta["width_per_group"])
    model.load_state_dict(state)
    model.eval()
    hub_model = torch.hub.load(str(REPO), meta["arch"], source="local", pretrained=str(tmp_path / "backbone.pth")).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = pretraining_backbone(pre).forward_backbone(x)
        assert torch.equal(model(x), ref) and torch.equal(hub_model(x), ref)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_export_loads_in_plain_torchvision_as_the_docs_show(arch, tmp_path, monkeypatch):
    """The torchvision snippet of docs/evaluation.md, run as written on an export of the released width: the
    same features as this repository's network (trained-looking batch-norm statistics, so the stem's padding
    and every buffer count)."""
    torch.manual_seed(0)
    net = build_model(arch).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 1.5), m.weight.data.uniform_(0.5, 1.5)
    torch.save(net.state_dict(), tmp_path / "resnet18_unmix.pth")
    (tmp_path / "resnet18_unmix.json").write_text(json.dumps({"arch": arch, "width_per_group": 64}))
    doc = (REPO / "docs" / "evaluation.md").read_text()
    [snippet] = [b for b in re.findall(r"```python\n(.*?)```", doc, re.S) if "torchvision.models.resnet" in b]
    monkeypatch.chdir(tmp_path)
    scope = {"images": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        exec(snippet, scope)
        torch.testing.assert_close(scope["features"], net(scope["images"]), rtol=1e-4, atol=1e-5)


def test_released_format_checkpoint_exports_with_the_arch_read_from_its_weights(pre, tmp_path):
    ours = torch.load(pre, weights_only=True)
    for group in ours["optimizer"]["param_groups"]:
        group["lr"] = np.float64(group["lr"])  # the released schedule is a NumPy array
    torch.save({"epoch": ours["epoch"], "state_dict": ours["state_dict"], "optimizer": ours["optimizer"],
                "amp": {}}, tmp_path / "released.pth.tar")
    meta = export_backbone.export_backbone(str(tmp_path / "released.pth.tar"), str(tmp_path / "bb.pth"))
    assert (meta["arch"], meta["width_per_group"], meta["epoch"]) == ("resnet18", 8, 1)
    assert json.loads((tmp_path / "bb.json").read_text()) == meta


def test_bad_input_is_one_line(pre, tmp_path, capsys):
    torch.save({"epoch": 1, "state_dict": {"linear.weight": torch.zeros(10, 256), "linear.bias": torch.zeros(10)}},
               tmp_path / "linear_eval.pth.tar")  # eval_linear.py's checkpoint: a classifier, no backbone
    cases = [((pre, "--out", tmp_path / "x.json"), "needs another name"),
             ((tmp_path / "none.pth", "--out", tmp_path / "x.pth"), "no such file"),
             ((tmp_path / "linear_eval.pth.tar", "--out", tmp_path / "x.pth"), "no ResNet backbone"),
             ((pre, "--out", tmp_path / "no" / "x.pth"), "does not exist"),
             ((), "the following arguments are required: checkpoint"),  # was argparse's usage block
             ((pre, "--outt", tmp_path / "x.pth"), "did you mean --out?")]
    for args, phrase in cases:
        with pytest.raises(SystemExit) as stop:
            export_backbone.main([str(a) for a in args])
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and phrase in lines[0], (args, lines)
    assert not (tmp_path / "x.pth").exists()


def test_an_existing_export_is_replaced_only_by_an_export_of_the_same_checkpoint(pre, tmp_path, capsys):
    """Failed before: --out was overwritten whatever it held. An export of the same checkpoint is written again
    (a rerun; one killed between its two files); other weights, another checkpoint's export or a file of
    another kind stay as they were, with one line naming the file and how to go on."""
    out, description = tmp_path / "bb.pth", tmp_path / "bb.json"
    assert export_backbone.main([str(pre), "--out", str(out)]) == 0
    assert export_backbone.main([str(pre), "--out", str(out)]) == 0   # the same checkpoint again
    description.unlink()                                               # killed before its description
    assert export_backbone.main([str(pre), "--out", str(out)]) == 0 and description.is_file()
    ours = torch.load(pre, weights_only=True)
    ours["state_dict"]["module.conv1.weight"] += 1   # another checkpoint: other weights, another SHA-256
    torch.save(ours, tmp_path / "other.pth.tar")
    other_description = json.dumps({"arch": "resnet18", "source": "/elsewhere/checkpoint.pth.tar", "epoch": 3})
    capsys.readouterr()
    for name, setup, phrase in (("other checkpoint", None, "describes an export of another checkpoint"),
                                ("other weights", lambda: description.unlink(), "holds other weights"),
                                ("not an export", lambda: out.write_bytes(b"notes"), "is not a state dict"),
                                ("lone description", lambda: (out.unlink(), description.write_text(other_description)),
                                 "describes an export of another checkpoint (/elsewhere/checkpoint.pth.tar)")):
        if setup:
            setup()
        before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("bb.")}
        with pytest.raises(SystemExit) as stop:
            export_backbone.main([str(tmp_path / "other.pth.tar"), "--out", str(out)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(lines) == 1 and phrase in lines[0], (name, lines)
        assert f"remove {out} and {description} first" in lines[0], lines
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("bb.")} == before, name
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_evaluations_of_an_export_say_how_long_and_on_what_it_was_pretrained(pre, tmp_path, fork_runner):
    """Failed before: an evaluation of an export logged 'after an unrecorded number of epochs' and no data,
    although its description records both. A missing or broken description keeps those words."""
    out = tmp_path / "bb.pth"
    assert export_backbone.main([str(pre), "--out", str(out)]) == 0
    trained_on = json.loads((pre.parent / "params.json").read_text())["data_path"]
    res = fork_runner.run(REPO / "eval_semisup.py", ["--data_path", trained_on, "--dump_path", tmp_path / "semi",
                                                     "--epochs", 1, "--workers", 0, "--batch_size", 8,
                                                     "--pretrained", out], cwd=tmp_path)
    assert res.returncode == 0, res.explain()
    assert f"Loaded pretrained weights from {out}, after 1 epoch (epoch 0);" in res.stdout, res.stdout
    assert f"pretrained on {trained_on} (10 classes) (as {tmp_path / 'bb.json'} records); building" in res.stdout
    # the same read, in process, without the description and with a broken one
    args = eval_semisup.get_parser().parse_args(["--pretrained", str(out)])
    for text in (None, "{\"arch\": \"resnet18\", \"sour", json.dumps({"arch": "resnet50", "source": "x", "epoch": 3})):
        (tmp_path / "bb.json").unlink(missing_ok=True)
        if text is not None:
            (tmp_path / "bb.json").write_text(text)
        _, info, line = network_from_checkpoint(args, given=set())
        assert info["epoch"] is None and "pretrained on" not in line, (text, line)


def test_a_description_without_its_epoch_entry_is_not_an_export(tmp_path):
    """Failed before: a description without `epoch` passed as an export, and the evaluation's set-up and
    tools/results.py then stopped with a KeyError traceback on `record["epoch"]`."""
    from src.eval.export_record import read_export_record
    entries = {"arch": "resnet18", "source": "/runs/a/checkpoint.pth.tar", "width_per_group": 64}
    (tmp_path / "bb.json").write_text(json.dumps(entries))
    assert read_export_record(tmp_path / "bb.pth") is None
    (tmp_path / "bb.json").write_text(json.dumps({**entries, "epoch": None}))
    assert read_export_record(tmp_path / "bb.pth")["epoch"] is None
