"""Bad input (issue 6): one clear line on stderr, a non-zero exit status, no traceback.

Each case runs an entry script on a tiny fake CIFAR-10. Most use the ForkRunner (the script forked from
an interpreter that imported it once); two run as a real `python <script>` so that nothing printed while
the modules are imported (warnings) can hide from the check.
"""
import json
import shutil
from pathlib import Path

import pytest

from tests.e2e_helpers import EVAL, MAIN, ForkRunner, make_fake_cifar10, run_script, tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_input")
    runner = ForkRunner(root / "runner")
    runner.warm_up(root)
    e = {"root": root, "runner": runner, "data": make_fake_cifar10(root / "cifar")}
    # a finished one-epoch pretraining: its folder and checkpoint serve several cases
    e["prior"] = root / "prior"
    res = runner.run(MAIN, tiny_args(e["data"], e["prior"], 1), cwd=root)
    assert res.returncode == 0, res.explain()
    e["ckpt"] = e["prior"] / "checkpoint.pth.tar"
    # data laid out wrongly: neither CIFAR pickles nor train/<class>/ image folders
    (root / "badlayout" / "images").mkdir(parents=True)
    (root / "badlayout" / "images" / "a.txt").write_text("not an image")
    (root / "afile").write_text("a regular file: nothing can be created below it")
    (root / "garbage.pth").write_bytes(b"\x00not a checkpoint\n" * 20)
    for name in ("corrupt_ckpt", "eval_unknown"):
        (root / name).mkdir()
        (root / name / "checkpoint.pth.tar").write_bytes(b"\x00not a checkpoint\n" * 20)
    # an evaluation of this checkpoint whose own checkpoint is then damaged
    script, args = ev(e, dump="eval_corrupt")
    res = runner.run(script, args, cwd=root)
    assert res.returncode == 0, res.explain()
    (root / "eval_corrupt" / "checkpoint.pth.tar").write_bytes(b"\x00not a checkpoint\n" * 20)
    (root / "bad_params").mkdir()
    (root / "bad_params" / "params.json").write_text('{"arch": "resnet18", "epo')
    yield e
    runner.close()


def pre(e, *extra, dump="fresh", epochs=1, data=None):
    return MAIN, tiny_args(data or e["data"], e["root"] / dump, epochs, *extra)


def ev(e, *extra, dump="eval", pretrained=None):
    return EVAL, ["--data_path", e["data"], "--dump_path", e["root"] / dump, "--arch", "resnet18",
                  "--width_per_group", 8, "--epochs", 1, "--batch_size", 16, "--workers", 0, "--num_labels", 10,
                  "--pretrained", pretrained or e["ckpt"], *extra]


# id: (command builder, key phrase of the error line)
CASES = {
    "missing_data_folder": (lambda e: pre(e, data=e["root"] / "no_such_folder"), "does not exist"),
    "wrong_data_layout": (lambda e: pre(e, data=e["root"] / "badlayout"), "no known layout"),
    "unknown_arch": (lambda e: pre(e, "--arch", "resnet7"), "unknown --arch 'resnet7'"),
    "crop_lists_differ": (lambda e: pre(e, "--nmb_crops", 2, 2, "--size_crops", 32), "need the same length"),
    "crops_for_assign_out_of_range": (lambda e: pre(e, "--crops_for_assign", 0, 2), "out of range"),
    "odd_crops_with_unmix": (lambda e: pre(e, "--nmb_crops", 3, "--size_crops", 32), "must be even"),
    "batch_too_small": (lambda e: pre(e, "--batch_size", 1), "too small"),
    "batch_larger_than_data": (lambda e: pre(e, "--batch_size", 128), "no full batch of 128"),
    "zero_epochs": (lambda e: pre(e, epochs=0), "--epochs must be positive"),
    "negative_epochs": (lambda e: pre(e, epochs=-3), "--epochs must be positive"),
    "zero_log_freq": (lambda e: pre(e, "--log_freq", 0), "--log_freq must be at least 1"),
    "unwritable_dump_path": (lambda e: pre(e, dump="afile/sub"), "is not writable"),
    "corrupt_checkpoint": (lambda e: pre(e, dump="corrupt_ckpt"), "no readable checkpoint"),
    "dump_holds_other_run": (lambda e: pre(e, "--base_lr", 0.3, dump="prior"), "base_lr: 0.6 -> 0.3"),
    "unreadable_params_json": (lambda e: pre(e, dump="bad_params"), "params.json is unreadable"),
    "eval_unknown_arch": (lambda e: ev(e, "--arch", "vgg"), "unknown --arch 'vgg'"),
    "eval_zero_epochs": (lambda e: ev(e, "--epochs", 0), "--epochs must be positive"),
    "eval_pretrained_missing": (lambda e: ev(e, pretrained=e["root"] / "none.pth"), "no such file"),
    "eval_pretrained_garbage": (lambda e: ev(e, pretrained=e["root"] / "garbage.pth"), "cannot be read"),
    "eval_pretrained_other_arch": (lambda e: ev(e, "--arch", "resnet50"), "does not fit --arch"),
    "eval_pretrained_other_width": (lambda e: ev(e, "--width_per_group", 16), "does not fit --arch"),
    "eval_num_labels_mismatch": (lambda e: ev(e, "--num_labels", 100), "--num_labels 100 but"),
    "eval_unwritable_dump_path": (lambda e: ev(e, dump="afile/sub"), "is not writable"),
    "eval_corrupt_checkpoint": (lambda e: ev(e, dump="eval_corrupt"), "cannot resume the linear classifier"),
    "eval_checkpoint_of_unknown_origin": (lambda e: ev(e, dump="eval_unknown"), "without params.json"),
    "eval_global_pooling_off": (lambda e: ev(e, "--global_pooling", "false"), "--global_pooling false"),
}
REAL = {"unknown_arch", "eval_num_labels_mismatch"}  # run as a real interpreter


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_clear_line(env, case):
    build, phrase = CASES[case]
    script, args = build(env)
    if case in REAL:
        res = run_script(script, args, cwd=env["root"])
    else:
        res = env["runner"].run(script, args, cwd=env["root"])
    assert res.returncode != 0, res.explain()
    assert "Traceback" not in res.stderr + res.stdout, res.explain()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, res.explain()
    assert lines[0].startswith("error: ") and phrase in lines[0], res.explain()


def files_and_times(folder):
    """Modification times of a run folder's files (run.lock names the last run that held it: not compared)."""
    return {p.name: p.stat().st_mtime_ns for p in Path(folder).rglob("*") if p.name != "run.lock"}


def test_dump_holding_other_run_names_what_differs_and_is_left_alone(env):
    before = files_and_times(env["prior"])
    script, args = pre(env, "--base_lr", 0.3, "--nmb_prototypes", 12, dump="prior")
    res = env["runner"].run(script, args, cwd=env["root"])
    line = res.stderr.strip()
    assert res.returncode != 0 and "base_lr: 0.6 -> 0.3" in line and "nmb_prototypes: 10 -> 12" in line, line
    assert "--allow_changed_args true" in line
    assert files_and_times(env["prior"]) == before


def test_allow_changed_args_resumes_anyway(env):
    dump = env["root"] / "changed"
    shutil.copytree(env["prior"], dump)
    script, args = pre(env, "--base_lr", 0.3, "--allow_changed_args", "true", dump="changed", epochs=2)
    res = env["runner"].run(script, args, cwd=env["root"])
    assert res.returncode == 0, res.explain()
    assert f"Resumed from {dump}/checkpoint.pth.tar: epoch 1, iteration 0." in res.stdout
    assert json.loads((dump / "params.json").read_text())["base_lr"] == 0.3


def test_mismatched_weights_load_when_explicitly_allowed(env):
    script, args = ev(env, "--width_per_group", 16, "--allow_mismatched_weights", "true", dump="eval_allowed")
    res = env["runner"].run(script, args, cwd=env["root"])
    assert res.returncode == 0, res.explain()
    assert "is of different shape in model and provided state dict" in res.stdout
    assert Path(env["root"] / "eval_allowed" / "results.json").is_file()
