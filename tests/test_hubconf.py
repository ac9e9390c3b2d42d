"""hubconf.py through torch.hub.load(source="local"): the weights of a real pretraining checkpoint give the
very features (and head outputs) of the pretraining network; released-format files load; clear errors."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from src.data.constants import CIFAR_MEAN, PRETRAIN_STD
from src.data.transforms import plain_tensor
from src.method.resnet import build_model
from tests.e2e_helpers import RUN_ENV

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_checkpoint):
    """A real one-epoch pretraining (tests/conftest.py) and its network as main_swav_unmix.py builds it."""
    ckpt = tiny_checkpoint
    state = {k[len("module."):]: v for k, v in torch.load(ckpt, weights_only=True)["state_dict"].items()}
    net = build_model("resnet18", normalize=True, hidden_mlp=32, output_dim=16, nmb_prototypes=10, width_per_group=8)
    net.load_state_dict(state)  # strict: the pretraining network as main_swav_unmix.py builds it
    images = np.random.default_rng(0).integers(0, 256, size=(6, 32, 32, 3), dtype=np.uint8)
    return {"ckpt": ckpt, "state": state, "net": net.eval(),
            "x": plain_tensor(images, CIFAR_MEAN, PRETRAIN_STD)}


def hub(*args, **kwargs):
    return torch.hub.load(str(REPO), *args, source="local", **kwargs)


def test_backbone_features_equal_the_pretraining_network(run):
    model = hub("resnet18", pretrained=str(run["ckpt"]), width_per_group=8).eval()
    assert model.projection_head is None and model.prototypes is None
    with torch.no_grad():
        feats = model(run["x"])
        assert feats.shape == (6, 256)
        assert torch.equal(feats, run["net"].forward_backbone(run["x"]))


def test_width_and_head_sizes_come_from_the_checkpoint(run):
    model = hub("resnet18", pretrained=run["ckpt"]).eval()  # no width given: read from the weights
    full = hub("resnet18", pretrained=run["ckpt"], full_model=True).eval()
    with torch.no_grad():
        assert torch.equal(model(run["x"]), run["net"].forward_backbone(run["x"]))
        emb, scores = full(run["x"])
        ref_emb, ref_scores = run["net"](run["x"])
    assert torch.equal(emb, ref_emb) and torch.equal(scores, ref_scores) and scores.shape == (6, 10)
    assert full.l2norm and torch.allclose(emb.norm(dim=1), torch.ones(6))


def test_released_checkpoint_and_plain_state_dicts_load(run, tmp_path):
    prefixed = {"module." + k: v for k, v in run["state"].items()}
    released = {"epoch": 400, "state_dict": prefixed, "amp": {"loss_scaler0": {"loss_scale": 65536.0}},
                "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(0.6), "params": [0]}]}}  # NumPy lr
    for name, obj in (("released.pth.tar", released), ("module.pth", prefixed), ("plain.pth", run["state"])):
        torch.save(obj, tmp_path / name)
        with torch.no_grad():
            model = hub("resnet18", pretrained=str(tmp_path / name)).eval()
            assert torch.equal(model(run["x"]), run["net"].forward_backbone(run["x"])), name


def test_fine_tuned_classifier_returns_logits(tmp_path):
    torch.manual_seed(0)
    clf = build_model("resnet18", output_dim=10, width_per_group=8).eval()  # what eval_semisup.py trains
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in clf.state_dict().items()}}, tmp_path / "ft.pth")
    model = hub("resnet18", pretrained=tmp_path / "ft.pth", full_model=True).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert not model.l2norm and torch.equal(model(x), clf(x))


def test_random_weights_and_errors(run, tmp_path):
    model = hub("resnet50", width_per_group=8)
    assert model.feature_dim == 256 and model.projection_head is None
    with pytest.raises(ValueError, match="holds a resnet18 \\(width 8\\), not a resnet50"):
        hub("resnet50", pretrained=run["ckpt"])
    with pytest.raises(ValueError, match="width_per_group=64 but .* has width_per_group=8"):
        hub("resnet18", pretrained=run["ckpt"], width_per_group=64)
    with pytest.raises(ValueError, match="nmb_prototypes=3000 but"):
        hub("resnet18", pretrained=run["ckpt"], full_model=True, nmb_prototypes=3000)
    with pytest.raises(ValueError, match="no weights to download"):
        hub("resnet18", pretrained=True)
    with pytest.raises(ValueError, match="no such file"):
        hub("resnet18", pretrained=tmp_path / "none.pth")
    torch.save({k: v for k, v in run["state"].items() if not k.startswith(("projection", "prototypes"))},
               tmp_path / "backbone.pth")
    with pytest.raises(ValueError, match="holds a backbone only"):
        hub("resnet18", pretrained=tmp_path / "backbone.pth", full_model=True)


def test_offline_and_beside_a_foreign_src_package(run, tmp_path):
    """A fresh interpreter whose own project has a package called `src`, no network (proxies to a closed
    port) and an empty TORCH_HOME: the load works, the caller's `src` stays, nothing is cached."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "__init__.py").write_text("MINE = True\n")
    code = f"""
import json, sys, torch
import src
model = torch.hub.load({str(REPO)!r}, "resnet18", source="local", pretrained={str(run["ckpt"])!r}).eval()
import src as again
with torch.no_grad():
    out = model(torch.zeros(2, 3, 32, 32))
print(json.dumps({{"mine": getattr(again, "MINE", False), "shape": list(out.shape)}}))
"""
    env = dict(RUN_ENV, TORCH_HOME=str(tmp_path / "torch_home"), HTTP_PROXY="http://127.0.0.1:9",
               HTTPS_PROXY="http://127.0.0.1:9", http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == {"mine": True, "shape": [2, 256]}
    assert not (tmp_path / "torch_home").exists()
