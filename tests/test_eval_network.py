"""Evaluations take their network from the checkpoint: eval_linear.py and eval_semisup.py read --arch and
--width_per_group from --pretrained (its weights, its `arch` entry, the params.json of its run:
src/eval/pretrained.network_config, which hubconf.py uses too). A flag typed on the command line that names
another network is one line naming both values; the documented script commands run as written."""
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from src.eval.pretrained import PretrainedError, network_config, read_state_dict
from src.runtime.cli import parse_given
from tests.e2e_helpers import EVAL, RUN_ENV, make_fake_cifar10

import eval_linear

REPO = Path(__file__).resolve().parents[1]
SEMISUP = REPO / "eval_semisup.py"
FIXTURE = REPO / "tests" / "data" / "cifar10_jpg_small"

pytestmark = pytest.mark.slow


def test_parse_given_tells_typed_flags_from_defaults():
    parser = eval_linear.get_parser()
    args, given = parse_given(parser, ["--arch", "resnet50", "--width_per_group=8", "--epochs", "3"])
    assert given == {"arch", "width_per_group", "epochs"}  # --arch resnet50 typed, though it is the default
    assert (args.arch, args.width_per_group, args.epochs, args.lr) == ("resnet50", 8, 3, 0.3)
    args, given = parse_given(parser, [])
    assert given == set() and (args.arch, args.width_per_group) == ("resnet50", 64)  # the released defaults


def test_network_config_reads_weights_and_checks_the_runs_params(tiny_checkpoint, tmp_path):
    state, info = read_state_dict(tiny_checkpoint)
    expected = {"arch": "resnet18", "width_per_group": 8, "hidden_mlp": 32, "output_dim": 16, "nmb_prototypes": 10}
    assert network_config(tiny_checkpoint, state, info) == expected
    # an epoch copy in checkpoints/ is checked against the params.json of its run, one folder up
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(tiny_checkpoint, run / "checkpoints" / "ckp-0.pth")
    params = json.loads((tiny_checkpoint.parent / "params.json").read_text())
    (run / "params.json").write_text(json.dumps(dict(params, feat_dim=128)))
    with pytest.raises(PretrainedError, match=r"params.json records output_dim 128 but the weights .* output_dim 16"):
        network_config(run / "checkpoints" / "ckp-0.pth", state, info)
    (run / "params.json").write_text(json.dumps(params))
    assert network_config(run / "checkpoints" / "ckp-0.pth", state, info) == expected


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_checkpoint, fork_runner):
    root = tmp_path_factory.mktemp("eval_network")
    return {"root": root, "runner": fork_runner, "data": make_fake_cifar10(root / "c10"), "ckpt": tiny_checkpoint}


def linear(e, dump, *flags):
    return EVAL, ["--data_path", e["data"], "--dump_path", e["root"] / dump, "--epochs", 1, "--batch_size", 16,
                  "--workers", 0, "--pretrained", e["ckpt"], "--probe", "cached", *flags]


def test_linear_evaluation_builds_the_checkpoints_network_and_records_it(env):
    runner, root = env["runner"], env["root"]
    res = runner.run(*linear(env, "lin"), cwd=root)  # no --arch, no --width_per_group: resnet50 at 64 before
    assert res.returncode == 0, res.explain()
    assert "resnet18 at width_per_group 8 (read from the checkpoint)" in res.stdout
    trained_on = json.loads((env["ckpt"].parent / "params.json").read_text())["data_path"]
    assert f"(read from the checkpoint), pretrained on {trained_on} (10 classes); building" in res.stdout  # the data it learnt
    recorded = json.loads((root / "lin" / "params.json").read_text())
    assert (recorded["arch"], recorded["width_per_group"]) == ("resnet18", 8)  # the resolved values
    # the same evaluation with the values typed out is the same evaluation: reported again, not refused
    res = runner.run(*linear(env, "lin", "--arch", "resnet18", "--width_per_group", 8), cwd=root)
    assert res.returncode == 0 and "Top-1 test accuracy" in res.stdout, res.explain()
    assert not list((root / "lin").glob("replaced-*"))
    # another --lr in that folder is another evaluation: refused, naming only the --lr
    res = runner.run(*linear(env, "lin", "--lr", 0.1), cwd=root)
    assert res.returncode == 2 and "lr: 0.3 -> 0.1" in res.stderr and "width" not in res.stderr, res.explain()


def test_linear_evaluation_logs_which_checkpoint_of_a_run_it_read(env, tmp_path):
    """Failed before: the linear evaluation logged no epoch count, so the evaluations of a run's checkpoint,
    of an earlier one and of its export read alike. It now logs the fine-tuning's line (one helper,
    `loaded_line`), 'after an unrecorded number of epochs' for a checkpoint without an `epoch` entry."""
    ckpt = torch.load(env["ckpt"], weights_only=True)
    assert ckpt["epoch"] == 1
    (tmp_path / "checkpoints").mkdir()
    torch.save(dict(ckpt, epoch=3), tmp_path / "checkpoints" / "ckp-2.pth")
    torch.save({k: v for k, v in ckpt.items() if k != "epoch"}, tmp_path / "no_epoch.pth")
    res = env["runner"].run(REPO / "tools" / "export_backbone.py", [env["ckpt"], "--out", tmp_path / "bb.pth"],
                            cwd=tmp_path)
    assert res.returncode == 0, res.explain()
    for path, said in ((env["ckpt"], "after 1 epoch (epoch 0)"), (tmp_path / "checkpoints" / "ckp-2.pth",
                       "after 3 epochs (epochs 0-2)"), (tmp_path / "no_epoch.pth", "after an unrecorded number of "
                       "epochs"), (tmp_path / "bb.pth", "after 1 epoch (epoch 0)")):
        flags = linear(env, tmp_path / f"lin_{path.stem}")
        flags[1][flags[1].index("--pretrained") + 1] = path
        res = env["runner"].run(*flags, cwd=tmp_path)
        assert res.returncode == 0, res.explain()
        assert f"Loaded pretrained weights from {path}, {said}; 0 tensors kept as initialised (listed above)" \
            in res.stdout, (path, res.stdout[-3000:])


@pytest.mark.parametrize("script", ["linear", "semisup"])
@pytest.mark.parametrize("flags, both", [(["--width_per_group", 16], ("--width_per_group 16", "width_per_group 8")),
                                         (["--arch", "resnet50"], ("--arch resnet50", "holds a resnet18 at"))])
def test_a_typed_flag_that_contradicts_the_checkpoint_is_one_line(env, script, flags, both):
    root = env["root"]
    dump = root / f"refused_{script}_{flags[0][2:]}"
    if script == "linear":
        cmd = linear(env, dump, *flags)
    else:
        cmd = SEMISUP, ["--data_path", env["data"], "--dump_path", dump, "--epochs", 1, "--workers", 0,
                        "--pretrained", env["ckpt"], *flags]
    res = env["runner"].run(*cmd, cwd=root)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.explain()
    assert all(b in lines[0] for b in both) and "Traceback" not in res.stdout, res.explain()
    assert not dump.exists()  # stopped before the folder is made


def test_semisup_fine_tunes_the_checkpoints_network(env):
    root = env["root"]
    res = env["runner"].run(SEMISUP, ["--data_path", env["data"], "--dump_path", root / "semi", "--epochs", 1,
                                      "--workers", 0, "--batch_size", 8, "--pretrained", env["ckpt"]], cwd=root)
    assert res.returncode == 0, res.explain()
    assert "Loaded pretrained weights" in res.stdout
    recorded = json.loads((root / "semi" / "params.json").read_text())
    assert (recorded["arch"], recorded["width_per_group"]) == ("resnet18", 8)


# ---------------------------------------------------------------------------------------------------------
# the documented commands, as written (the data and the folder where they write set; one epoch)
# ---------------------------------------------------------------------------------------------------------

def documented(path, marker):
    """The command of `path` on the line that holds `marker` (a table cell in backquotes, or the shell block
    that follows it), joined into one line."""
    text = (REPO / path).read_text()
    section = text.split(marker, 1)[1].split("\n#", 1)[0]  # up to the next heading
    if "```bash" in section:
        block = section.split("```bash", 1)[1].split("```", 1)[0]
        return " ".join(line.rstrip("\\").strip() for line in block.strip().splitlines())
    line = next(ln for ln in text.splitlines() if marker in ln)
    return re.search(r"`([^`]*bash script_unmix_c10.sh)`", line).group(1)


def small_copy(root, train_per_class=8, test_per_class=3):
    """The first images of each class of the 400-image fixture, in its layout (fewer iterations, same classes)."""
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for folder in sorted((FIXTURE / split).iterdir()):
            (root / split / folder.name).mkdir(parents=True)
            for image in sorted(folder.iterdir())[:n]:
                shutil.copy(image, root / split / folder.name / image.name)
    return root


@pytest.mark.parametrize("path, marker", [("docs/running.md", "| CPU-only debugging |"),
                                          ("README.md", "## A quick look on 400 real images")])
def test_documented_command_pretrains_and_evaluates(tmp_path, path, marker):
    """Failed before evaluations read the network from the checkpoint: the running.md command's evaluation
    built a resnet18 at width 64 for the width-8 checkpoint (exit 21)."""
    data = small_copy(tmp_path / "data")
    command = documented(path, marker)
    assert command.endswith("bash script_unmix_c10.sh"), command
    env = {k: v for k, v in RUN_ENV.items() if k not in ("EXTRA_ARGS", "EVAL_EXTRA_ARGS", "EXPERIMENT_PATH")}
    env.update(DATASET_PATH=str(data), EXPERIMENT_PATH=str(tmp_path / "exp"), PYTHON=str(Path(
        shutil.which("python3") or "python3")), CUDA_VISIBLE_DEVICES="")
    command = command.replace("tests/data/cifar10_jpg_small", str(data)).replace(
        "EXPERIMENT_PATH=experiments/quick_look", "")
    command = command.replace("bash script_unmix_c10.sh", f"EPOCHS=1 EVAL_EPOCHS=1 bash {REPO}/script_unmix_c10.sh")
    res = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{command}\nexit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-2000:]}"
    assert "Top-1 test accuracy" in res.stdout
    assert "is of different shape" not in res.stdout
    # the last line says where the results are and how to see them next to the other runs
    assert res.stdout.rstrip().splitlines()[-1].endswith(f"(its results.json); every run side by side: "
                                                         f"{env['PYTHON']} {REPO}/tools/results.py {tmp_path}"), res.stdout[-500:]
    evaluation = next(tmp_path.glob("exp_linear_eval*"))
    assert json.loads((evaluation / "params.json").read_text())["width_per_group"] == 8
    assert torch.load(tmp_path / "exp" / "checkpoint.pth.tar", weights_only=True)["epoch"] == 1
