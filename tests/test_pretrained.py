"""Reading pretrained weights: the file formats, telling the architecture from the weights, loading them."""
import numpy as np
import pytest
import torch

from src.eval.pretrained import (LAYOUTS, PretrainedError, epochs_done, head_config, infer_arch, load_weights,
                                 network_config, read_state_dict)
from src.method.resnet import ARCHS, build_model


def pretraining_net(arch="resnet18", width=8, **kw):
    torch.manual_seed(0)
    args = dict(normalize=True, hidden_mlp=32, output_dim=16, nmb_prototypes=10, width_per_group=width)
    args.update(kw)
    return build_model(arch, **args)


def test_layout_table_matches_the_constructors():
    assert set(LAYOUTS) == set(ARCHS)
    for arch in ARCHS:
        for width in (8, 16) if arch == "resnet18" else (16,):
            state = build_model(arch, width_per_group=width).state_dict()
            assert infer_arch(state) == (arch, width), arch


def test_infer_released_width():
    state = build_model("resnet18", width_per_group=64).state_dict()
    assert infer_arch(state) == ("resnet18", 64)
    with pytest.raises(PretrainedError, match="no ResNet backbone"):
        infer_arch({"linear.weight": torch.zeros(10, 2048)})


def test_a_linear_evaluation_checkpoint_is_named_as_such_with_its_path(tmp_path):
    """Was `--pretrained no ResNet backbone in these weights (...)`: no path, and no word of what the file is
    (an eval_linear.py checkpoint, a likely mix-up with the pretraining one beside it)."""
    path = str(tmp_path / "run_linear_eval" / "checkpoint.pth.tar")
    state = {"linear.weight": torch.zeros(10, 2048), "linear.bias": torch.zeros(10)}
    with pytest.raises(PretrainedError) as e:
        network_config(path, state, {"arch": "resnet18", "epoch": 100})
    assert str(e.value).startswith(f"{path}: no ResNet backbone in these weights") and \
        "a linear classifier alone (eval_linear.py's checkpoint): pass the pretraining checkpoint" in str(e.value)


def test_a_checkpoints_epoch_in_the_logs_words():
    """The training log counts epochs from 0; a checkpoint's entry counts the epochs done. An entry that is no
    number (a foreign checkpoint's) is said as it is: was a ValueError traceback from eval_semisup.py's log
    line and from tools/export_backbone.py after it had written its files."""
    assert epochs_done(2) == "after 2 epochs (epochs 0-1)" and epochs_done(1) == "after 1 epoch (epoch 0)"
    assert epochs_done(0) == "before the end of epoch 0"
    assert epochs_done(None) == "after an unrecorded number of epochs"
    assert epochs_done("final") == "with the epoch entry 'final'"
    assert epochs_done([3]) == "with the epoch entry [3]"


def test_head_config_of_each_head_kind():
    assert head_config(pretraining_net().state_dict()) == {"hidden_mlp": 32, "output_dim": 16, "nmb_prototypes": 10}
    assert head_config(pretraining_net(hidden_mlp=0).state_dict()) == {"hidden_mlp": 0, "output_dim": 16,
                                                                      "nmb_prototypes": 10}
    assert head_config(pretraining_net(nmb_prototypes=[10, 7, 3]).state_dict())["nmb_prototypes"] == [10, 7, 3]
    assert head_config(build_model("resnet18", width_per_group=8).state_dict()) == {}


@pytest.mark.parametrize("form", ["ours", "released", "plain", "plain_module"])
def test_reads_every_checkpoint_form(tmp_path, form):
    net = pretraining_net()
    prefixed = {"module." + k: v for k, v in net.state_dict().items()}
    # the released optimizer state holds NumPy learning rates (its schedule is a NumPy array)
    released_optimizer = {"state": {}, "param_groups": [{"lr": np.float64(0.6), "momentum": 0.9, "params": [0]}]}
    obj = {"ours": {"epoch": 3, "state_dict": prefixed, "arch": "resnet18", "optimizer": {}},
           "released": {"epoch": 3, "state_dict": prefixed, "optimizer": released_optimizer,
                        "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}},
           "plain": net.state_dict(), "plain_module": prefixed}[form]
    torch.save(obj, tmp_path / "w.pth")
    state, info = read_state_dict(tmp_path / "w.pth")
    assert state.keys() == net.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    assert info == {"ours": {"arch": "resnet18", "epoch": 3}, "released": {"arch": None, "epoch": 3}}.get(
        form, {"arch": None, "epoch": None})


@pytest.mark.parametrize("value", [np.int64(3), np.float32(0.5), np.arange(3)])
def test_numpy_objects_other_than_the_released_learning_rates_are_refused(tmp_path, value):
    """The allow-list of the checkpoints (src/runtime/checkpoint.py): NumPy float64 scalars only."""
    torch.save({"epoch": 2, "state_dict": pretraining_net().state_dict(), "x": value}, tmp_path / "w.pth")
    with pytest.raises(PretrainedError, match="cannot be read") as e:
        read_state_dict(tmp_path / "w.pth")
    assert "\n" not in str(e.value)


def test_unusable_files_are_one_line_errors(tmp_path):
    with pytest.raises(PretrainedError, match="no such file"):
        read_state_dict(tmp_path / "missing.pth")
    with pytest.raises(PretrainedError, match="is a folder, not a checkpoint file, and holds no checkpoint.pth.tar"):
        read_state_dict(tmp_path)   # e.g. torch.hub.load(..., pretrained="experiments/run")
    (tmp_path / "junk.pth").write_bytes(b"\x00junk" * 10)
    with pytest.raises(PretrainedError, match="cannot be read"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save({"epoch": 1}, tmp_path / "nostate.pth")
    with pytest.raises(PretrainedError, match="holds no state dict"):
        read_state_dict(tmp_path / "nostate.pth")


def test_load_weights_copies_the_backbone_and_keeps_a_new_classifier():
    source = pretraining_net()
    torch.manual_seed(1)
    target = build_model("resnet18", output_dim=10, width_per_group=8)
    head_before = target.projection_head.weight.clone()
    notes = load_weights(target, source.state_dict())
    assert len(notes) == 2 and all("projection_head" in n for n in notes)
    assert torch.equal(target.projection_head.weight, head_before)
    src_state = source.state_dict()
    for k, v in target.state_dict().items():
        if not k.startswith("projection_head"):
            assert torch.equal(v, src_state[k]), k


def test_load_weights_refuses_another_width_unless_allowed():
    source = pretraining_net(width=16).state_dict()
    target = build_model("resnet18", width_per_group=8)
    with pytest.raises(PretrainedError, match=r"resnet18 at width 16\) do not fit"):
        load_weights(target, source)
    assert len(load_weights(target, source, allow_mismatch=True)) > 0  # released leniency: logged only
    with pytest.raises(PretrainedError):  # nothing optional: the head must be there too
        load_weights(pretraining_net(), build_model("resnet18", width_per_group=8).state_dict(), optional=())
