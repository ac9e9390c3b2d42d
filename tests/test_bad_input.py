"""Bad input (issue 6): one clear line on stderr, a non-zero exit status, no traceback.

Each case runs an entry script on a tiny fake CIFAR-10. Most use the ForkRunner (the script forked from
an interpreter that imported it once); two run as a real `python <script>` so that nothing printed while
the modules are imported (warnings) can hide from the check.
"""
import json
import shutil
import signal
from pathlib import Path

import pytest
import torch

from tests.e2e_helpers import EVAL, MAIN, make_fake_cifar10, run_script, tiny_args

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory, fork_runner):
    root = tmp_path_factory.mktemp("bad_input")
    runner = fork_runner
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
    torch.save({"epoch": 3, "state_dict": {}}, root / "no_weights.pth")  # a checkpoint, but no tensor in it
    for name in ("corrupt_ckpt", "eval_unknown"):
        (root / name).mkdir()
        (root / name / "checkpoint.pth.tar").write_bytes(b"\x00not a checkpoint\n" * 20)
    # an evaluation of this checkpoint whose own checkpoint is then damaged
    script, args = ev(e, dump="eval_corrupt")
    res = runner.run(script, args, cwd=root)
    assert res.returncode == 0, res.explain()
    (root / "eval_corrupt" / "checkpoint.pth.tar").write_bytes(b"\x00not a checkpoint\n" * 20)
    (root / "eval_corrupt" / "results.json").unlink()  # unfinished: it has to resume (a finished one is only reported)
    (root / "bad_params").mkdir()
    (root / "bad_params" / "params.json").write_text('{"arch": "resnet18", "epo')
    # checkpoints whose fields make no sense, in copies of the finished run
    for name, damage in (("negative_epoch", lambda c: c.update(epoch=-3)),
                         ("wrong_momentum", lambda c: c["optimizer"]["state"][0].update(
                             momentum_buffer=torch.zeros(7)))):
        shutil.copytree(e["prior"], root / name, ignore=shutil.ignore_patterns("checkpoints"))
        ckpt = torch.load(e["ckpt"], weights_only=True)
        damage(ckpt)
        torch.save(ckpt, root / name / "checkpoint.pth.tar")
    # the run as if it had started on the whole CIFAR-10 (e.g. before a requeue onto a node whose copy is partial)
    shutil.copytree(e["prior"], root / "other_data")
    params = json.loads((root / "other_data" / "params.json").read_text())
    params["data"]["train_images"] = 50000
    (root / "other_data" / "params.json").write_text(json.dumps(params))
    for name in ("ckpt_is_a_folder", "eval_ckpt_is_a_folder"):
        (root / name / "checkpoint.pth.tar").mkdir(parents=True)
    return e


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
    "dump_path_is_a_file": (lambda e: pre(e, dump="afile"), "afile' is a file, not a folder"),
    "corrupt_checkpoint": (lambda e: pre(e, dump="corrupt_ckpt"), "no readable checkpoint"),
    "dump_holds_other_run": (lambda e: pre(e, "--base_lr", 0.3, dump="prior"), "base_lr: 0.6 -> 0.3"),
    "resumed_on_other_data": (lambda e: pre(e, dump="other_data"),
                              "training images in 10 classes, but the run in "),
    "unreadable_params_json": (lambda e: pre(e, dump="bad_params"), "params.json is unreadable"),
    "eval_unknown_arch": (lambda e: ev(e, "--arch", "vgg"), "unknown --arch 'vgg'"),
    "eval_zero_epochs": (lambda e: ev(e, "--epochs", 0), "--epochs must be positive"),
    "eval_pretrained_missing": (lambda e: ev(e, pretrained=e["root"] / "none.pth"), "no such file"),
    "eval_pretrained_garbage": (lambda e: ev(e, pretrained=e["root"] / "garbage.pth"), "cannot be read"),
    "eval_pretrained_without_weights": (lambda e: ev(e, pretrained=e["root"] / "no_weights.pth"),
                                        "no_weights.pth: holds no state dict"),
    "eval_pretrained_other_arch": (lambda e: ev(e, "--arch", "resnet50"), "--arch resnet50 but"),
    "eval_pretrained_other_width": (lambda e: ev(e, "--width_per_group", 16), "--width_per_group 16 but"),
    "eval_num_labels_mismatch": (lambda e: ev(e, "--num_labels", 100), "--num_labels 100 but"),
    "eval_unwritable_dump_path": (lambda e: ev(e, dump="afile/sub"), "is not writable"),
    "eval_corrupt_checkpoint": (lambda e: ev(e, dump="eval_corrupt"), "cannot resume the linear classifier"),
    "eval_checkpoint_of_unknown_origin": (lambda e: ev(e, dump="eval_unknown"), "without params.json"),
    "eval_global_pooling_off": (lambda e: ev(e, "--global_pooling", "false"), "--global_pooling false"),
    "negative_seed": (lambda e: pre(e, "--seed", -1), "--seed must be in [0, 2**32), got -1"),
    "seed_too_large": (lambda e: pre(e, "--seed", 2 ** 32), "--seed must be in [0, 2**32), got 4294967296"),
    "epochs_not_an_int": (lambda e: pre(e, epochs="2e9"), "argument --epochs: invalid int value: '2e9'"),
    "epochs_too_many": (lambda e: pre(e, epochs=2_000_000_000), "--epochs 2000000000 is more than 10000"),
    "knn_k_zero": (lambda e: pre(e, "--knn_k", 0), "--knn_k must be at least 1"),
    "knn_temperature_zero": (lambda e: pre(e, "--knn_temperature", 0), "--knn_temperature must be positive"),
    "sinkhorn_iterations_zero": (lambda e: pre(e, "--sinkhorn_iterations", 0), "--sinkhorn_iterations must be at"),
    "sinkhorn_iterations_negative": (lambda e: pre(e, "--sinkhorn_iterations", -2), "--sinkhorn_iterations must"),
    "one_prototype": (lambda e: pre(e, "--nmb_prototypes", 1), "--nmb_prototypes must be at least 2"),
    "negative_base_lr": (lambda e: pre(e, "--base_lr", -0.6), "--base_lr and --wd must not be negative (got -0.6, "),
    "negative_wd": (lambda e: pre(e, "--wd=-1e-06"), "--base_lr and --wd must not be negative (got 0.6, -1e-06)"),
    "eval_negative_lr": (lambda e: ev(e, "--lr", -0.3), "--lr and --wd must not be negative (got -0.3, 1e-06)"),
    "cuda_graph_without_cuda": (lambda e: pre(e, "--cuda_graph", "true", dump="cuda_graph"),
                                "--cuda_graph true needs a CUDA device"),
    "zero_dist_timeout": (lambda e: pre(e, "--dist_timeout", 0), "--dist_timeout must be positive"),
    "checkpoint_negative_epoch": (lambda e: pre(e, dump="negative_epoch"), "epoch -3 / iteration 0 cannot be negative"),
    "checkpoint_wrong_momentum_shape": (lambda e: pre(e, dump="wrong_momentum"), "momentum buffer 0 is (7,)"),
    "checkpoint_is_a_folder": (lambda e: pre(e, dump="ckpt_is_a_folder"), "checkpoint.pth.tar is not a regular file"),
    "eval_checkpoint_is_a_folder": (lambda e: ev(e, dump="eval_ckpt_is_a_folder"), "is not a regular file"),
    "eval_seed_too_large": (lambda e: ev(e, "--seed", 2 ** 32), "--seed must be in [0, 2**32)"),
    "eval_epochs_too_many": (lambda e: ev(e, "--epochs", 10 ** 6), "is more than 10000"),
    "eval_into_the_pretraining_folder": (lambda e: ev(e, dump="prior"), "holds a pretraining run, not a linear"),
    "pretraining_into_an_evaluation_folder": (lambda e: pre(e, dump="eval_corrupt"),
                                              "holds a linear evaluation run, not a pretraining"),
}
REAL = {"unknown_arch", "eval_num_labels_mismatch", "epochs_not_an_int"}  # run as a real interpreter


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


def test_a_run_that_recorded_no_data_sizes_resumes_and_says_they_were_not_checked(env):
    """params.json from before the data's sizes were recorded, or none (a folder of the released code): nothing
    to compare, no refusal, one log line that says which."""
    why = {"unrecorded_data": "predates its record in params.json",
           "no_params_json": "has no params.json (a folder of the released code?)"}
    for name in ("unrecorded_data", "no_params_json"):
        dump = env["root"] / name
        shutil.copytree(env["prior"], dump, ignore=shutil.ignore_patterns("run.lock"))
        params = json.loads((dump / "params.json").read_text())
        del params["data"]
        (dump / "params.json").write_text(json.dumps(params))
        if name == "no_params_json":
            (dump / "params.json").unlink()
        script, args = pre(env, dump=name)
        res = env["runner"].run(script, args, cwd=env["root"])
        assert res.returncode == 0, res.explain()
        said = [line for line in (dump / "train.log").read_text().splitlines() if "could not be checked" in line]
        assert len(said) == 1 and "the data's size could not be checked" in said[0], (name, said)
        assert "resuming on 100 training images in 10 classes" in said[0]
        assert f"the run in {dump} {why[name]}; resuming" in said[0], said
        assert json.loads((dump / "params.json").read_text())["data"] == {"train_images": 100, "classes": 10}
    fresh = (env["root"] / "prior" / "train.log").read_text()
    assert "could not be checked" not in fresh   # a run that recorded them says nothing of the kind


def test_mismatched_weights_load_when_explicitly_allowed(env):
    script, args = ev(env, "--width_per_group", 16, "--allow_mismatched_weights", "true", dump="eval_allowed")
    res = env["runner"].run(script, args, cwd=env["root"])
    assert res.returncode == 0, res.explain()
    assert "is of different shape in model and provided state dict" in res.stdout
    assert Path(env["root"] / "eval_allowed" / "results.json").is_file()


# ----------------------------------------------------------------------------------------------------------
# an evaluation bound to its checkpoint; one run per folder
# ----------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("probe", ["released", "cached"])
def test_evaluation_pointed_at_the_pretraining_folder_writes_nothing(env, probe):
    before = {p: p.read_bytes() for p in env["prior"].rglob("*") if p.is_file() and p.name != "run.lock"}
    script, args = ev(env, "--probe", probe, dump="prior")
    res = env["runner"].run(script, args, cwd=env["root"])
    assert res.returncode == 2 and "holds a pretraining run, not a linear evaluation" in res.stderr, res.explain()
    after = {p: p.read_bytes() for p in env["prior"].rglob("*") if p.is_file() and p.name != "run.lock"}
    assert after == before


def test_evaluation_resumes_only_its_own_checkpoint_and_arguments(env):
    """An evaluation of checkpoint A; then checkpoint B (same path, new content) or another --lr in the same
    folder is refused, naming the difference; --allow_changed_args true evaluates B afresh there, with
    A's evaluation moved aside whole. The same command reports the finished evaluation again."""
    root, runner = env["root"], env["runner"]
    ckpt = root / "moving" / "checkpoint.pth.tar"
    ckpt.parent.mkdir()
    shutil.copy(env["ckpt"], ckpt)
    folder = root / "moving_linear_eval"
    script, args = ev(env, dump="moving_linear_eval", pretrained=ckpt)
    res = runner.run(script, args, cwd=root)
    assert res.returncode == 0, res.explain()
    recorded = json.loads((folder / "params.json").read_text())["pretrained_file"]
    assert recorded["path"] == str(ckpt) and len(recorded["sha256"]) == 64
    best_a = json.loads((folder / "results.json").read_text())["best_top1"]
    results_a = (folder / "results.json").read_text()
    res = runner.run(script, args, cwd=root)  # the same: reported again, not retrained, results.json untouched
    assert res.returncode == 0 and "This evaluation finished earlier" in res.stdout, res.explain()
    assert (folder / "results.json").read_text() == results_a and json.loads(results_a)["best_top1"] == best_a

    res = runner.run(script, args + ["--lr", 0.05], cwd=root)
    assert res.returncode == 2 and "holds another evaluation (lr: 0.3 -> 0.05)" in res.stderr, res.explain()
    other = torch.load(ckpt, weights_only=True)  # a new pretraining at the same path
    other["state_dict"] = {k: v + 1 if v.is_floating_point() else v for k, v in other["state_dict"].items()}
    torch.save(other, ckpt)
    res = runner.run(script, args, cwd=root)
    assert res.returncode == 2 and f"it evaluated {ckpt} (sha256 {recorded['sha256'][:12]}), now {ckpt}" in res.stderr
    assert (folder / "results.json").read_text() == results_a

    res = runner.run(script, args + ["--allow_changed_args", "true"], cwd=root)
    assert res.returncode == 0 and "Resumed" not in res.stdout and "evaluating afresh" in res.stdout, res.explain()
    kept = next(folder.glob("replaced-*"))
    assert (kept / "results.json").read_text() == results_a
    assert {p.name for p in kept.iterdir()} >= {"checkpoint.pth.tar", "params.json", "stats0.csv", "stats0.pkl"}
    assert json.loads((folder / "params.json").read_text())["pretrained_file"]["sha256"] != recorded["sha256"]


@pytest.mark.parametrize("which", ["pretraining", "linear", "semisup"])
def test_a_folder_in_use_is_refused_at_once(env, which):
    """Another run holds the folder's lock: a second run exits 2 before touching any file (the holder's
    temporary file stays)."""
    from src.runtime.run_folder import lock_run_folder
    from tests.e2e_helpers import REPO
    folder = env["root"] / f"busy_{which}"
    folder.mkdir()
    held = lock_run_folder(str(folder))
    stale = folder / ".checkpoint.pth.tar.999.0a1b2c3d.tmp"
    stale.write_bytes(b"the holder is writing this")
    try:
        if which == "pretraining":
            script, args = pre(env, dump=folder.name)
        elif which == "linear":
            script, args = ev(env, dump=folder.name)
        else:
            script = REPO / "eval_semisup.py"
            args = ["--data_path", env["data"], "--dump_path", folder, "--arch", "resnet18", "--width_per_group", 8,
                    "--pretrained", env["ckpt"], "--workers", 0]
        res = env["runner"].run(script, args, cwd=env["root"])
    finally:
        held.close()
    assert res.returncode == 2, res.explain()
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "is in use by another run" in lines[0], res.explain()
    assert sorted(p.name for p in folder.iterdir()) == [stale.name, "run.lock"]


def test_a_second_pretraining_on_a_running_folder_stops_and_the_first_finishes(env):
    from tests.e2e_helpers import pid_alive, wait_for_log
    script, args = pre(env, "--log_freq", 1, dump="running", epochs=2)
    first = env["runner"].start(script, args, cwd=env["root"])
    wait_for_log(env["root"] / "running" / "train.log", "Epoch: [0][1/6]", alive=lambda: pid_alive(first.pid))
    second = env["runner"].run(script, args, cwd=env["root"])
    assert second.returncode == 2 and f"process {first.pid} on" in second.stderr, second.explain()
    res = env["runner"].wait(first)
    assert res.returncode == 0 and "Pretraining done" in res.stdout, res.explain()
    assert pd_rows(env["root"] / "running") == [0, 1]


def pd_rows(dump):
    import pandas as pd
    return pd.read_csv(Path(dump) / "stats0.csv")["epoch"].tolist()


def test_sigint_saves_and_stops_like_sigterm(env):
    """Ctrl-C during training: a checkpoint at the next iteration, status 3, no traceback."""
    from tests.e2e_helpers import pid_alive, wait_for_log
    script, args = pre(env, "--log_freq", 1, dump="interrupted", epochs=2)
    h = env["runner"].start(script, args, cwd=env["root"])
    wait_for_log(env["root"] / "interrupted" / "train.log", "Epoch: [0][1/6]", alive=lambda: pid_alive(h.pid))
    from tests.e2e_helpers import kill
    kill(h.pid, signal.SIGINT)
    res = env["runner"].wait(h)
    assert res.returncode == 3 and "Traceback" not in res.stderr + res.stdout, res.explain()
    assert "Preempted (signal 2): checkpoint saved at epoch 0" in res.stdout
    assert torch.load(env["root"] / "interrupted" / "checkpoint.pth.tar", weights_only=True)["iteration"] >= 2
