"""A refused start leaves nothing behind: each entry script, and the SBATCH script around them, given a bad
data path or a bad flag value, removes the folder it created (with the parents it created), and leaves an
existing run folder exactly as it was (its file list and every byte), whether it is refused at the folder
check or later (data, classes, weights). src/runtime/refused_start.py does the undoing."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.e2e_helpers import EVAL, MAIN, REPO, RUN_ENV, kill, make_fake_cifar10, pid_alive, tiny_args, wait_for_log

SEMISUP = REPO / "eval_semisup.py"
pytestmark = pytest.mark.slow


def linear_args(e, dump, *extra, data=None):
    return ["--data_path", data or e["data"], "--dump_path", dump, "--arch", "resnet18", "--width_per_group", 8,
            "--epochs", 1, "--batch_size", 16, "--workers", 0, "--num_labels", 10, "--pretrained", e["ckpt"], *extra]


def semisup_args(e, dump, *extra, data=None):
    return ["--data_path", data or e["data"], "--dump_path", dump, "--arch", "resnet18", "--width_per_group", 8,
            "--epochs", 1, "--batch_size", 8, "--workers", 0, "--labels_perc", 10, "--pretrained", e["ckpt"], *extra]


def pretrain_args(e, dump, *extra, data=None):
    return tiny_args(data or e["data"], dump, 1, *extra)


@pytest.fixture(scope="module")
def env(tmp_path_factory, fork_runner):
    root = tmp_path_factory.mktemp("refused_start")
    runner = fork_runner
    e = {"root": root, "runner": runner, "data": make_fake_cifar10(root / "cifar")}
    e["ckpt"] = root / "pretraining" / "checkpoint.pth.tar"
    for script, build, name in ((MAIN, pretrain_args, "pretraining"), (EVAL, linear_args, "linear"),
                                (SEMISUP, semisup_args, "semisup")):  # a finished run of each kind
        res = runner.run(script, build(e, root / name), cwd=root)
        assert res.returncode == 0, res.explain()
    return e


def snapshot(folder):
    """{relative path: bytes} of every file below `folder`, and the sorted list of every entry."""
    files, entries = {}, []
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            entries.append(os.path.relpath(path, folder))
            if name in filenames:
                files[entries[-1]] = Path(path).read_bytes()
    return sorted(entries), files


# A bad flag value of each kind: pretraining and the linear evaluation refuse theirs after claiming the folder
# (no full batch; the data's classes), the fine-tuning before it (a width its checkpoint does not hold).
SCRIPTS = {"pretraining": (MAIN, pretrain_args, ("--batch_size", 1000), "no full batch"),
           "linear": (EVAL, linear_args, ("--num_labels", 100), "has 10 classes"),
           "semisup": (SEMISUP, semisup_args, ("--width_per_group", 16), "holds a resnet18 at width_per_group 8")}


@pytest.mark.parametrize("kind", list(SCRIPTS))
@pytest.mark.parametrize("bad", ["data_path", "flag"])
def test_refused_start_in_a_new_folder_leaves_nothing(env, kind, bad):
    script, build, flag, words = SCRIPTS[kind]
    parent = env["root"] / f"new_{kind}_{bad}"
    dump = parent / "deeper" / "run"
    args = build(env, dump, data=env["root"] / "no_such_data") if bad == "data_path" else build(env, dump, *flag)
    res = env["runner"].run(script, args, cwd=env["root"])
    assert res.returncode == 2, res.explain()
    assert ("does not exist" if bad == "data_path" else words) in res.stderr, res.explain()
    assert not parent.exists(), sorted(str(p) for p in parent.rglob("*"))


@pytest.mark.parametrize("kind", list(SCRIPTS))
@pytest.mark.parametrize("bad", ["data_path", "flag", "other_kind"])
@pytest.mark.parametrize("allow_changed", ["true", "false"])
def test_refused_start_in_an_existing_run_folder_changes_no_byte(env, kind, bad, allow_changed):
    """Refused at the folder check (other arguments; a folder of another kind), or later with
    --allow_changed_args true (the data, the weights; an earlier evaluation set aside and moved back)."""
    script, build, flag, _ = SCRIPTS[kind]
    target = env["root"] / ("linear" if kind == "pretraining" else "pretraining") if bad == "other_kind" \
        else env["root"] / kind
    before = snapshot(target)
    extra = ("--allow_changed_args", allow_changed)
    if bad == "data_path":
        args = build(env, target, *extra, data=env["root"] / "no_such_data")
    else:
        args = build(env, target, *extra, *(flag if bad == "flag" else ()))
    res = env["runner"].run(script, args, cwd=env["root"])
    assert res.returncode == 2, res.explain()
    after = snapshot(target)
    assert after[0] == before[0]
    assert after[1] == before[1]


def test_refused_script_run_leaves_no_folder_and_keeps_an_existing_one(env, tmp_path):
    """script_unmix_c10.sh: a bad data path or a bad flag value leaves no experiments/ folder behind (it no
    longer creates the folders itself); pointed at an existing run folder, it leaves it as it was and
    creates no evaluation folder."""
    shell_env = {k: v for k, v in RUN_ENV.items() if not k.startswith("SLURM_")}
    for k in ("EXPERIMENT_PATH", "EXTRA_ARGS", "EVAL_EXTRA_ARGS", "EPOCHS", "BATCH_SIZE", "ARCH", "RUN_SWAV"):
        shell_env.pop(k, None)
    shell_env.update(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="", WORKERS="0",
                     EXTRA_ARGS="--width_per_group 8 --hidden_mlp 32 --feat_dim 16 --download false")

    def script(*args, **over):
        r = subprocess.run(["bash", str(REPO / "script_unmix_c10.sh"), *map(str, args)], cwd=tmp_path,
                           env=dict(shell_env, **over), capture_output=True, text=True, timeout=120)
        assert r.returncode == 11, r.stdout + r.stderr  # pretraining refused (its status 2)
        return r

    script(DATASET_PATH=str(env["root"] / "no_such_data"))
    script("--batch_size", 1000, DATASET_PATH=str(env["data"]))
    assert os.listdir(tmp_path) == []
    existing = tmp_path / "mine"
    shutil.copytree(env["root"] / "pretraining", existing)
    before = snapshot(existing)
    script("--batch_size", 1000, "--allow_changed_args", "true", DATASET_PATH=str(env["data"]),
           EXPERIMENT_PATH=str(existing))
    script("--allow_changed_args", "true", DATASET_PATH=str(env["root"] / "no_such_data"), EXPERIMENT_PATH=str(existing))
    assert snapshot(existing) == before and os.listdir(tmp_path) == ["mine"]


def torchrun(script, args, cwd):
    """`torchrun --nproc_per_node 2 script args` (gloo on the CPU); (status of each rank from torchrun's
    report of the failed processes, stderr)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={port}", str(script), *map(str, args)], cwd=cwd, env=RUN_ENV,
                       capture_output=True, text=True, timeout=120)
    ranks = re.findall(r"rank\s*: (\d) \(local_rank: \d\)\s*\n\s*exitcode\s*: (-?\d+)", p.stderr)
    return dict((int(r), int(code)) for r, code in ranks), p.stderr


def two_process_folder(env, name):
    """A copy of the finished pretraining as a 2-process run leaves it (with rank 1's log), whose checkpoint
    and epoch copy are cut in half: its resume is refused after the folder is claimed."""
    folder = env["root"] / name
    shutil.copytree(env["root"] / "pretraining", folder)
    (folder / "train.log-1").write_text("INFO - rank 1 of the earlier run\n")
    for path in [folder / "checkpoint.pth.tar", *(folder / "checkpoints").iterdir()]:
        path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])
    return folder


@pytest.mark.parametrize("kind", ["pretraining", "linear"])
def test_refused_start_with_two_processes(env, kind):
    """torchrun, 2 processes, refused after rank 0 claimed the folder: the pretraining resuming an existing
    2-process folder whose checkpoints are unreadable, the linear evaluation in a new folder with data of
    other classes (eval_semisup.py refuses the same way, with the same set-up and `agree_to_start`; left out for time).
    One line for the job (not one per process), every process ends with status 2, and the folder is as
    before: rank 1 wrote nothing there (its log is written once the run starts) and rank 0 undid its start
    after both had stopped."""
    if kind == "pretraining":
        target = two_process_folder(env, "two_process_pretraining")
        args, words = pretrain_args(env, target, "--epochs", 2, "--allow_changed_args", "true"), "no readable checkpoint"
    else:
        target = env["root"] / "new_two_process_linear" / "run"
        args, words = linear_args(env, target, "--num_labels", 100), "has 10 classes"
    before = snapshot(target) if target.exists() else None
    statuses, stderr = torchrun(SCRIPTS[kind][0], args, env["root"])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], stderr
    assert statuses == {0: 2, 1: 2}, stderr
    assert stderr.count("Traceback") == stderr.count("ChildFailedError:"), stderr  # torchrun's own report only
    if before is None:
        assert not target.parent.exists(), sorted(str(p) for p in target.parent.rglob("*"))
    else:
        assert snapshot(target) == before


@pytest.mark.parametrize("kind", ["linear", "semisup"])
def test_refused_evaluation_resume_with_two_processes(env, kind):
    """torchrun, 2 processes, an evaluation folder whose checkpoint cannot be resumed (cut in half, as by a
    full disk): the resume is refused before the run starts, so the processes vote on it: one line for the
    job, status 2 on both (not one refusing and the other ending on a lost peer), and the folder, its
    checkpoint and params.json, is left byte for byte."""
    target = env["root"] / f"unreadable_{kind}_checkpoint"
    shutil.copytree(env["root"] / kind, target)
    (target / "results.json").unlink()  # stopped before its end: the next run resumes
    params = json.loads((target / "params.json").read_text())
    (target / "params.json").write_text(json.dumps(dict(params, world_size=2)))  # as a 2-process run left it
    checkpoint = target / "checkpoint.pth.tar"
    checkpoint.write_bytes(checkpoint.read_bytes()[:checkpoint.stat().st_size // 2])
    before = snapshot(target)
    statuses, stderr = torchrun(SCRIPTS[kind][0], SCRIPTS[kind][1](env, target), env["root"])
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no readable checkpoint" in errors[0], stderr
    assert statuses == {0: 2, 1: 2}, stderr
    assert snapshot(target) == before


# An entry script with a fault: rank 1 crashes (a traceback) as it builds its network, while rank 0 is busy in a
# long step of its start-up there (a slow disk, a large data set). Under torchrun, rank 0 then gets SIGTERM, and
# SIGKILL 30 s later.
FAULTY_START = """import os, runpy, sys, time
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
import src.method.resnet as resnet
build_model = resnet.build_model


def slow_or_crash(*args, **kwargs):
    if os.environ.get("RANK") == "1":
        raise RuntimeError("rank 1 crashed during its start-up")
    time.sleep(60)
    return build_model(*args, **kwargs)


resnet.build_model = slow_or_crash
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def faulty_start(env):
    wrapper = env["root"] / "faulty_start.py"
    wrapper.write_text(FAULTY_START)
    return wrapper


@pytest.mark.parametrize("folder", ["new", "existing"])
def test_a_worker_lost_during_the_start_up_under_torchrun_leaves_the_folder_as_it_was(env, folder):
    """torchrun, 2 processes, rank 1 lost during the start-up while rank 0 is in a long step: rank 0 ends its
    start-up at once on torchrun's SIGTERM (status 143, one line), not killed 30 s later, and its folder is as it
    was: a new one is gone, an existing one (a pretraining resumed) keeps its file list and every byte."""
    wrapper = faulty_start(env)
    if folder == "new":
        target = env["root"] / "lost_in_start_up" / "run"
        args, before = pretrain_args(env, target), None
    else:
        target = env["root"] / "lost_in_resume"
        shutil.copytree(env["root"] / "pretraining", target)
        args, before = pretrain_args(env, target, "--epochs", 2, "--allow_changed_args", "true"), snapshot(target)
    began = time.time()
    statuses, stderr = torchrun(wrapper, [MAIN, *args], env["root"])
    assert statuses == {0: 143, 1: 1}, stderr
    assert time.time() - began < 25, stderr  # torchrun kills after 30 s
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: stopped by SIGTERM during start-up, before anything was trained; nothing to save "
                      "(rerun the same command to start, or resume)"], stderr
    if before is None:
        assert not target.parent.exists(), sorted(str(p) for p in target.parent.rglob("*"))
    else:
        assert snapshot(target) == before


def test_ctrl_c_during_the_start_up_ends_it_at_once_and_leaves_no_folder(env):
    """One process, Ctrl-C (SIGINT) while its start-up is in a long step: status 130 at once with one line, and
    the new folder is gone (not a run that starts, then stops at its first iteration with a checkpoint)."""
    target = env["root"] / "interrupted_start" / "run"
    h = env["runner"].start(faulty_start(env), [MAIN, *pretrain_args(env, target)], cwd=env["root"])
    wait_for_log(target / "train.log", "Building data done", alive=lambda: pid_alive(h.pid))
    kill(h.pid, signal.SIGINT)
    res = env["runner"].wait(h)
    assert res.returncode == 130, res.explain()
    assert res.stderr.strip().splitlines() == ["error: stopped by SIGINT during start-up, before anything was trained; "
                                               "nothing to save (rerun the same command to start, or resume)"]
    assert not target.parent.exists(), sorted(str(p) for p in target.parent.rglob("*"))
