"""The SBATCH scripts: launcher logic with a fake python (fast, no Slurm), and end-to-end jobs on a real
private one-node Slurm (tests/slurm_cluster.py): pretraining + linear evaluation with 2 tasks, and a job
that is preempted with SIGUSR1, requeues itself and resumes from its checkpoint.

The Slurm tests are marked `slurm` and skip with the reason when Slurm/munge are not installed
(`sudo bash .ci/install_slurm.sh`) or when not root. They print the key lines of the job logs (run
pytest with -s to see them).
"""
import os
import re
import shutil
import signal
import stat
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPTS = {"c10": os.path.join(ROOT, "script_unmix_c10.sh"), "c100": os.path.join(ROOT, "script_unmix_c100.sh")}

RELEASED_PRETRAIN = ("--arch resnet18 --hidden_mlp 512 --data_path {data} --min_scale_crops 0.14 --max_scale_crops 1.0 "
                     "--epochs 400 --batch_size 128 --base_lr 0.6 --final_lr 0.0006 --warmup_epochs 5 --size_crops 32 "
                     "--nmb_crops 2 --nmb_prototypes 100 --queue_length 120 --epoch_queue_starts 15 --use_fp16 True "
                     "--freeze_prototypes_niters 5005 --run_swav False --workers 2 --temperature 0.1 --epsilon 0.05 "
                     "--dump_path ./experiments/unmix_swav_cifar_128_resnet18_400ep_100prot_{data}")
RELEASED_EVAL = ("--num_labels {labels} --crop_size 32 --workers 2 --arch resnet18 --data_path {data} --epochs 100 "
                 "--pretrained ./experiments/unmix_swav_cifar_128_resnet18_400ep_100prot_{data}/checkpoint.pth.tar "
                 "--dump_path ./experiments/unmix_swav_cifar_128_resnet18_400ep_100prot_{data}_linear_eval "
                 "--allow_changed_args true")


# --------------------------------------------------------------------------------------------------
# launcher logic, no Slurm: a fake interpreter records its command lines
# --------------------------------------------------------------------------------------------------

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_PY_LOG"
case "$*" in
  *main_swav_unmix.py*) exit "${FAKE_PRETRAIN_RC:-0}" ;;
  *eval_linear.py*) exit "${FAKE_EVAL_RC:-0}" ;;
  *eval_semisup.py*) exit "${FAKE_SEMISUP_RC:-0}" ;;
esac
exit 0
"""


@pytest.fixture
def fake(tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    for f in ("main_swav_unmix.py", "eval_linear.py", "eval_semisup.py"):
        (code / f).write_text("# stub\n")
    (code / "scripts").mkdir()  # the real job body, which the scripts source from CODE_DIR
    shutil.copy(os.path.join(ROOT, "scripts", "unmix_job.sh"), code / "scripts" / "unmix_job.sh")
    py = tmp_path / "fakepython"
    py.write_text(FAKE_PYTHON)
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    work = tmp_path / "work"
    work.mkdir()
    log = tmp_path / "calls.log"

    def run(script="c10", args=(), **env):
        full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        for k in ("DATASET_PATH", "EPOCHS", "BATCH_SIZE", "RUN_SWAV", "ARCH", "WORKERS", "EXPERIMENT_PATH",
                  "EVAL_EPOCHS", "EXTRA_ARGS", "EVAL_EXTRA_ARGS", "NPROC", "CODE_DIR", "PYTHON", "AUGMENT",
                  "SEMISUP_LABELS", "SEMISUP_EXTRA_ARGS"):
            full.pop(k, None)
        full.update(PYTHON=str(py), CODE_DIR=str(code), FAKE_PY_LOG=str(log), CUDA_VISIBLE_DEVICES="")
        full.update(env)
        r = subprocess.run(["bash", SCRIPTS[script], *args], cwd=work, env=full, capture_output=True, text=True,
                           timeout=60)
        calls = log.read_text().splitlines() if log.exists() else []
        if log.exists():
            log.unlink()
        return r, calls

    run.code = str(code)
    return run


@pytest.mark.parametrize("script, data, labels", [("c10", "cifar10", 10), ("c100", "cifar100", 100)])
def test_script_defaults_are_the_released_commands(fake, script, data, labels):
    r, calls = fake(script)
    assert r.returncode == 0, r.stdout + r.stderr
    assert calls == [f"-u {fake.code}/main_swav_unmix.py " + RELEASED_PRETRAIN.format(data=data),
                     f"-u {fake.code}/eval_linear.py " + RELEASED_EVAL.format(data=data, labels=labels)]


def test_script_environment_overrides(fake):
    r, calls = fake(DATASET_PATH="/data/c10", EPOCHS="2", BATCH_SIZE="8", RUN_SWAV="True", ARCH="resnet50",
                    WORKERS="0", EVAL_EPOCHS="3", EXTRA_ARGS="--width_per_group 8  --nmb_prototypes 10",
                    EVAL_EXTRA_ARGS="--batch_size 4")
    assert r.returncode == 0, r.stderr
    pre, ev = calls
    dump = "./experiments/swav_cifar_8_resnet50_2ep_10prot_cifar10"   # --nmb_prototypes 10 of EXTRA_ARGS
    for part in ("--data_path /data/c10", "--epochs 2", "--batch_size 8", "--run_swav True", "--arch resnet50",
                 "--workers 0", f"--dump_path {dump} --width_per_group 8 --nmb_prototypes 10"):
        assert part in pre
    assert pre.endswith("--nmb_prototypes 10")   # extra flags come last, so they win in argparse
    assert "--arch resnet50 --width_per_group 8 --data_path /data/c10" in ev  # the pretrained network's width
    assert ev.endswith(f"--epochs 3 --pretrained {dump}/checkpoint.pth.tar --dump_path {dump}_linear_eval "
                       "--allow_changed_args true --batch_size 4")
    run1 = os.path.join(os.path.dirname(fake.code), "runs", "run1")
    r, calls = fake(EXPERIMENT_PATH=run1 + "/")
    assert calls[0].endswith(f"--dump_path {run1}")
    assert calls[1].endswith(f"--pretrained {run1}/checkpoint.pth.tar --dump_path {run1}_linear_eval "
                             "--allow_changed_args true")


@pytest.mark.parametrize("script", ["c10", "c100"])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_script_help_prints_usage_and_starts_nothing(fake, script, flag):
    r, calls = fake(script, args=["--epochs", "3", flag])
    assert r.returncode == 0 and calls == [], r.stdout + r.stderr
    assert r.stdout.startswith(f"usage: bash script_unmix_{script}.sh")
    for name in ("DATASET_PATH", "EPOCHS", "BATCH_SIZE", "ARCH", "WORKERS", "RUN_SWAV", "AUGMENT",
                 "EXPERIMENT_PATH", "EVAL_EPOCHS", "EXTRA_ARGS", "EVAL_EXTRA_ARGS", "SEMISUP_LABELS",
                 "SEMISUP_EXTRA_ARGS", "NPROC", "PYTHON", "CODE_DIR"):
        assert f"\n  {name} " in r.stdout, name
    assert "(400)" in r.stdout and f"eval_linear.py --num_labels {10 if script == 'c10' else 100}" in r.stdout
    assert not os.path.exists(os.path.join(os.path.dirname(fake.code), "work", "experiments"))


def test_script_passes_command_line_flags_to_pretraining_after_extra_args(fake):
    r, calls = fake(args=["--knn_freq", "10", "--epochs", "7"], EXTRA_ARGS="--epochs 5 --width_per_group 8")
    assert r.returncode == 0, r.stderr
    pre, ev = calls
    assert pre.endswith("--epochs 5 --width_per_group 8 --knn_freq 10 --epochs 7")  # argparse: the last wins
    assert "--knn_freq" not in ev


def test_script_names_the_folder_after_the_flags_actually_used(fake):
    """Flags after the script name or in EXTRA_ARGS that the folder name or the evaluation use count as their
    variable does (the last one wins, as in argparse): `--epochs 200` pretrains into ..._200ep_..., not the
    400-epoch folder (which a later default run would then refuse), and the evaluation gets the same
    architecture, width and data. An EXPERIMENT_PATH or --dump_path given is the user's folder."""
    folder = "./experiments/unmix_swav_cifar_128_resnet18_200ep_100prot_cifar10"
    for args in (["--epochs", "200"], ["--epochs=200"], ["--epochs", "7", "--epochs", "200"]):
        r, (pre, ev) = fake(args=args, EPOCHS="5")
        assert r.returncode == 0 and f"--dump_path {folder} " in pre, r.stderr
        assert f"--pretrained {folder}/checkpoint.pth.tar --dump_path {folder}_linear_eval " in ev
    r, (pre, ev) = fake(args=["--run_swav", "TRUE", "--nmb_prototypes", "30", "--data_path", "/d/c10"],
                        EXTRA_ARGS="--batch_size=64 --arch resnet50 --width_per_group 16 --run_swav false")
    folder = "./experiments/swav_cifar_64_resnet50_400ep_30prot_cifar10"
    assert r.returncode == 0 and f"--dump_path {folder} " in pre, r.stderr
    assert f"--arch resnet50 --width_per_group 16 --data_path /d/c10 --epochs 100 --pretrained {folder}/" in ev
    mine = os.path.join(os.path.dirname(fake.code), "mine")
    r, (pre, ev) = fake(args=["--epochs", "200", "--arch", "resnet50"], EXPERIMENT_PATH=mine)
    assert f"--dump_path {mine} " in pre and "--arch resnet50 --data_path cifar10" in ev
    assert ev.endswith(f"--pretrained {mine}/checkpoint.pth.tar --dump_path {mine}_linear_eval --allow_changed_args true")
    r, (pre, ev) = fake(args=["--dump_path", mine + "2"])
    assert pre.endswith(f"--dump_path {mine}2") and f"--pretrained {mine}2/checkpoint.pth.tar " in ev
    r, (pre, ev, semisup) = fake(SEMISUP_LABELS="1", EXTRA_ARGS="--arch resnet50 --width_per_group 8")
    assert "--arch resnet50 --width_per_group 8 --data_path cifar10" in semisup


@pytest.mark.parametrize("args, extra, match", [
    (["--epo", "200"], "", "--epo: write --epochs in full"), (["--batch", "8"], "", "write --batch_size in full"),
    (["--epochs", "ten"], "", "--epochs='ten' is not a non-negative integer"), (["--epochs=0"], "", "--epochs must be > 0"),
    ([], "--arch res/net", "--arch='res/net' is not an architecture name"),
    ([], "--run_swav maybe", "--run_swav='maybe' is not a boolean"),
    (["--nmb_prototypes", "x"], "", "--nmb_prototypes='x'")])
def test_script_refuses_naming_flags_it_cannot_read(fake, args, extra, match):
    r, calls = fake(args=args, EXTRA_ARGS=extra)
    assert r.returncode == 2 and match in r.stderr and calls == [], r.stderr


def test_script_augment_switch(fake):
    r, calls = fake()
    assert "--augment" not in calls[0]  # the released pipeline (the default of main_swav_unmix.py)
    r, calls = fake(AUGMENT="batched")
    assert r.returncode == 0 and "--dump_path ./experiments/unmix_swav_cifar_128_resnet18_400ep_100prot_cifar10 " \
        "--augment batched" in calls[0] and "--augment" not in calls[1]
    r, calls = fake(AUGMENT="fast")
    assert r.returncode == 2 and "AUGMENT='fast'" in r.stderr and calls == []


@pytest.mark.parametrize("pre_rc, eval_rc, expected, n_calls", [
    (0, 0, 0, 2), (1, 0, 11, 1), (2, 0, 11, 1), (3, 0, 3, 1), (0, 1, 21, 2), (0, 3, 3, 2), (137, 0, 11, 1),
    (138, 0, 3, 1), (0, 138, 3, 2)])
def test_script_exit_status_says_which_step(fake, pre_rc, eval_rc, expected, n_calls):
    r, calls = fake(FAKE_PRETRAIN_RC=str(pre_rc), FAKE_EVAL_RC=str(eval_rc))
    assert r.returncode == expected, r.stdout + r.stderr
    assert len(calls) == n_calls


def test_script_semisupervised_fine_tuning_after_the_evaluation(fake):
    """SEMISUP_LABELS=1,10: after the linear evaluation, eval_semisup.py on the same checkpoint once per
    percentage, each in its own folder, SEMISUP_EXTRA_ARGS last; a failing fine-tuning exits 31."""
    run = os.path.join(os.path.dirname(fake.code), "runs", "r")
    r, calls = fake(EXPERIMENT_PATH=run, WORKERS="0", SEMISUP_LABELS="1,10", SEMISUP_EXTRA_ARGS="--epochs 2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(calls) == 4 and "eval_linear.py" in calls[1]
    for call, perc in zip(calls[2:], (1, 10)):
        assert call == (f"-u {fake.code}/eval_semisup.py --labels_perc {perc} --workers 0 --arch resnet18 "
                        f"--data_path cifar10 --pretrained {run}/checkpoint.pth.tar --dump_path {run}_semisup_{perc}pct "
                        "--allow_changed_args true --epochs 2")
    assert f"done: semi-supervised fine-tuning in {run}_semisup_10pct" in r.stdout
    r, calls = fake(SEMISUP_LABELS="10", FAKE_SEMISUP_RC="1")
    assert r.returncode == 31 and len(calls) == 3, r.stdout + r.stderr
    r, calls = fake(SEMISUP_LABELS="10", FAKE_EVAL_RC="1")
    assert r.returncode == 21 and len(calls) == 2  # no fine-tuning after a failed evaluation
    r, calls = fake()
    assert len(calls) == 2  # none unless asked for


@pytest.mark.parametrize("env, match", [({"EPOCHS": "ten"}, "EPOCHS"), ({"RUN_SWAV": "maybe"}, "RUN_SWAV"),
                                        ({"BATCH_SIZE": "0"}, "BATCH_SIZE"), ({"NPROC": "-1"}, "NPROC"),
                                        ({"CODE_DIR": "/nonexistent"}, "main_swav_unmix.py not found"),
                                        ({"EVAL_EPOCHS": "0"}, "EVAL_EPOCHS must be > 0"),
                                        ({"DATASET_PATH": "cifar100"}, "cifar100 has 100 classes"),
                                        ({"EVAL_EXTRA_ARGS": "--num_labels 5"}, "--num_labels 5"),
                                        ({"SEMISUP_LABELS": "5"}, "SEMISUP_LABELS='5'"),
                                        ({"SEMISUP_LABELS": "1,,10"}, "SEMISUP_LABELS")])
def test_script_bad_overrides(fake, env, match):
    r, calls = fake(**env)
    assert r.returncode == 2 and match in r.stderr and calls == []


@pytest.mark.parametrize("env, match", [({"EPOCH": "2"}, "EPOCH is set, but the script reads EPOCHS (unset): did you mean EPOCHS=2?"),
                                        ({"eval_epochs": "5"}, "eval_epochs is set, but the script reads EVAL_EPOCHS"),
                                        ({"DATA_PATH": "/d"}, "DATA_PATH is set, but the script reads DATASET_PATH"),
                                        ({"EXTRA_ARG": "--seed 1"}, "did you mean EXTRA_ARGS=--seed 1?"),
                                        ({"SEMISUPLABELS": "10"}, "SEMISUP_LABELS"),
                                        ({"DUMP_PATH": "/x"}, "EXPERIMENT_PATH")])
def test_script_refuses_a_mistyped_variable(fake, env, match):
    """A variable one typo away from the script's would be ignored: a job of hours with the defaults."""
    r, calls = fake(**env)
    assert r.returncode == 2 and match in r.stderr and calls == [], r.stderr
    assert r.stderr.count("\n") == 1 and f"or unset {next(iter(env))} if it is meant for another program" in r.stderr


def test_script_takes_a_look_alike_variable_when_its_own_is_set(fake):
    r, calls = fake(EPOCH="7", EPOCHS="2", DATA_PATH="/elsewhere", DATASET_PATH="cifar10")
    assert r.returncode == 0 and "--epochs 2 " in calls[0] and "--data_path cifar10 " in calls[0], r.stderr


def test_script_refuses_an_image_folder_without_test_split_before_pretraining(fake, tmp_path):
    (tmp_path / "own" / "train" / "cat").mkdir(parents=True)
    r, calls = fake(DATASET_PATH=str(tmp_path / "own"))
    assert r.returncode == 2 and calls == [] and "own has train/ but no test/" in r.stderr, r.stderr


def test_script_checks_the_data_classes_before_pretraining(fake, tmp_path):
    """Three class folders under train/: the CIFAR-10 script stops before pretraining (not 12 h later at
    the evaluation); with --num_labels 3 for the evaluation it runs."""
    for split in ("train", "test"):
        for c in ("cat", "dog", "frog"):
            (tmp_path / "imgs" / split / c).mkdir(parents=True)
    r, calls = fake(DATASET_PATH=str(tmp_path / "imgs"))
    assert r.returncode == 2 and "has 3 classes, but the linear evaluation would use --num_labels 10" in r.stderr
    assert calls == []
    r, calls = fake(DATASET_PATH=str(tmp_path / "imgs"), EVAL_EXTRA_ARGS="--num_labels 3")
    assert r.returncode == 0 and len(calls) == 2, r.stderr


@pytest.mark.parametrize("script, data, hint", [("c10", "cifar100", "CIFAR-100: script_unmix_c100.sh"),
                                               ("c100", "cifar10", "CIFAR-10: script_unmix_c10.sh")])
def test_data_of_the_other_script_names_that_script(fake, script, data, hint):
    """CIFAR-10 given to the CIFAR-100 script (and the other way round): the one line points to the script
    for the data given, not always to the CIFAR-100 one."""
    r, calls = fake(script, DATASET_PATH=data)
    assert r.returncode == 2 and calls == [] and hint in r.stderr, r.stderr


# A stand-in for python whose pretraining runs until a stop signal, then exits 3 like main_swav_unmix.py.
SIGNALLED_PYTHON = """#!/usr/bin/env python3
import os, signal, sys, time
log = os.environ["FAKE_PY_LOG"]
with open(log, "a") as f:
    f.write(" ".join(sys.argv[1:]) + "\\n")
if "main_swav_unmix.py" in " ".join(sys.argv):
    def stop(signum, frame):
        with open(log, "a") as f:
            f.write(f"got {signal.Signals(signum).name}\\n")
        sys.exit(3)
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(s, stop)
    open(os.environ["FAKE_STARTED"], "w").close()
    time.sleep(60)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_script_outside_slurm_passes_stop_signals_on_and_does_not_evaluate(fake, tmp_path, sig):
    """`bash script_unmix_c10.sh` killed with SIGTERM (docker stop, timeout) or SIGINT: the running
    pretraining gets the signal (it saves and exits 3), the script exits 3 and starts no evaluation."""
    py = tmp_path / "signalled_python"
    py.write_text(SIGNALLED_PYTHON)
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PYTHON=str(py), CODE_DIR=fake.code, FAKE_PY_LOG=str(tmp_path / "calls.log"),
               FAKE_STARTED=str(tmp_path / "started"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.Popen(["bash", SCRIPTS["c10"]], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "started").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    calls = (tmp_path / "calls.log").read_text().splitlines()
    assert proc.returncode == 3, out
    assert calls[1:] == [f"got {sig.name}"], calls
    assert "eval_linear.py" not in "".join(calls) and "passed on to the running step" in out


def test_script_outside_slurm_uses_torchrun_for_several_processes(fake):
    r, calls = fake(NPROC="2")
    assert r.returncode == 0
    assert calls[0].startswith(f"-m torch.distributed.run --standalone --nproc_per_node=2 {fake.code}/main_swav_unmix.py")
    assert "not the released" not in r.stdout   # NPROC asked for by name: no note
    r, calls = fake(CUDA_VISIBLE_DEVICES="0,1,3")
    assert calls[0].startswith("-m torch.distributed.run --standalone --nproc_per_node=3 ")
    # chosen from the GPUs: the log says that this is not the released one-GPU recipe, and how to run it
    assert "3 processes, one per visible GPU: a global batch of 3 x 128 at the same --base_lr, not the " \
           "released 1-GPU recipe (NPROC=1 runs that)" in r.stdout, r.stdout
    r, calls = fake(CUDA_VISIBLE_DEVICES="")
    assert calls[0].startswith("-u ")


FOUND_BODY = 'echo "body sourced from $CODE_DIR"\n'


@pytest.fixture
def find_code(tmp_path):
    """Runs a copy of an SBATCH script (as sbatch runs one, from its spool) in an environment without Slurm
    but for `env`; the stub body of a stub repository says where the script found the code."""
    code = tmp_path / "code"
    (code / "scripts").mkdir(parents=True)
    for f in ("main_swav_unmix.py", "eval_linear.py"):
        (code / f).write_text("# stub\n")
    (code / "scripts" / "unmix_job.sh").write_text(FOUND_BODY)
    elsewhere, spool, bin_dir = tmp_path / "elsewhere", tmp_path / "spool", tmp_path / "bin"
    for d in (elsewhere, spool, bin_dir):
        d.mkdir()

    def run(script, copy_to=spool, cwd=elsewhere, scontrol_command=None, **env):
        shutil.copy(SCRIPTS[script], copy_to / "slurm_script")
        full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "CODE_DIR"}
        if scontrol_command is not None:  # what `scontrol show job` says of the submitted command
            (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho 'JobId=7 JobName=x'\necho '   Command={scontrol_command}'\n")
            (bin_dir / "scontrol").chmod(0o755)
            full.update(PATH=f"{bin_dir}:{full['PATH']}", SLURM_JOB_ID="7")
        full.update(env)
        r = subprocess.run(["bash", str(copy_to / "slurm_script")], cwd=cwd, env=full, capture_output=True,
                           text=True, timeout=30)
        return r.stdout.strip() if r.returncode == 0 else r.stderr.strip()

    run.code, run.elsewhere, run.spool = code, elsewhere, spool
    return run


@pytest.mark.parametrize("script", ["c10", "c100"])
def test_sbatch_scripts_find_the_code_every_way_their_header_names(find_code, script):
    code, elsewhere, spool = find_code.code, find_code.elsewhere, find_code.spool
    found = f"body sourced from {code}"
    assert find_code(script, copy_to=code) == found                                  # next to the script
    assert find_code(script, scontrol_command=f"{code}/script.sh --epochs 2",        # sbatch: the submitted file
                     SLURM_SUBMIT_DIR=str(elsewhere)) == found
    assert find_code(script, scontrol_command=f"{spool}/script.sh", SLURM_SUBMIT_DIR=str(code)) == found
    assert find_code(script, SLURM_SUBMIT_DIR=str(code)) == found                    # the submit folder
    assert find_code(script, cwd=code) == found                                      # the current folder
    other = code.parent / "other"
    shutil.copytree(code, other)
    assert find_code(script, copy_to=code, CODE_DIR=str(other)) == f"body sourced from {other}"  # CODE_DIR first
    assert find_code(script) == f"error: {elsewhere}/main_swav_unmix.py not found (set CODE_DIR to the repository)"


def test_sbatch_scripts_differ_only_in_their_header_and_data_set():
    """They find the code alike (what they cannot take from the code before they have found it), then run
    the one body, scripts/unmix_job.sh."""
    def code(path):
        lines = [line for line in open(path).read().splitlines() if line.strip() and not line.startswith("#")]
        return [line for line in lines if not re.match(r"(DATASET_NAME|NUM_LABELS|JOB_TAG)=", line)]
    assert code(SCRIPTS["c10"]) == code(SCRIPTS["c100"])
    assert code(SCRIPTS["c10"])[-1] == 'source "$CODE_DIR/scripts/unmix_job.sh"'


def test_sbatch_headers():
    for name, path in SCRIPTS.items():
        text = open(path).read()
        header = re.findall(r"^#SBATCH (\S+)", text, flags=re.M)
        assert header == [f"--job-name=unmix_swav_{name}", "--nodes=1", "--ntasks-per-node=1", "--gres=gpu:1",
                          "--cpus-per-task=2", "--mem=50G", "--time=12:00:00", f"--output=unmix_swav_{name}_%j.out",
                          f"--error=unmix_swav_{name}_%j.err", "--open-mode=append", "--requeue",
                          "--signal=USR1@120"]
        assert "--partition" not in text.replace("never `default`", "")
        assert subprocess.run(["bash", "-n", path]).returncode == 0


# --------------------------------------------------------------------------------------------------
# real Slurm
# --------------------------------------------------------------------------------------------------

TINY_PRETRAIN = ("--width_per_group 8 --hidden_mlp 32 --nmb_prototypes 10 --feat_dim 16 --warmup_epochs 0 "
                 "--freeze_prototypes_niters 2 --download false --log_freq 1")
TINY_EVAL = "--width_per_group 8 --batch_size 16 --download false"
# CPU-only node without GRES, 2 cores: users override SBATCH lines on the sbatch command line.
# `--gres=none` drops the script's --gres=gpu:1 (an unknown GRES is refused at submission).
SBATCH_CPU = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gres=none", "--mem=1G", "--time=10"]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    from fake_cifar import write_cifar10
    root = tmp_path_factory.mktemp("cifar")
    write_cifar10(root, n_train_per_batch=16, n_test=20)  # 80 train images: 5 iterations of 8 on each of 2 ranks
    return str(root)


def _job_env(data, exp, epochs, extra="", workers=0):
    return {"DATASET_PATH": data, "EPOCHS": str(epochs), "EVAL_EPOCHS": "1", "WORKERS": str(workers), "BATCH_SIZE": "8",
            "EXPERIMENT_PATH": exp, "EXTRA_ARGS": f"{TINY_PRETRAIN} {extra}".strip(), "EVAL_EXTRA_ARGS": TINY_EVAL,
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _report(cluster, out, err):
    return f"\n--- job stdout\n{_read(out)[-6000:]}\n--- job stderr\n{_read(err)[-4000:]}\n{cluster.daemon_logs(15)}"


def _key_lines(text):
    keys = ("slurm job", "distributed: rank", "world_size:", "Resumed", "Preempted", "requeue", "Nothing to do",
            "stopped by", "killed by",
            "Pretraining done", "Top-1 test accuracy", "Last-epoch test accuracy", "done:", "failed")
    return "\n".join(line.strip() for line in text.splitlines() if any(k in line for k in keys))


@pytest.mark.slurm
def test_sbatch_script_two_tasks_pretrain_then_linear_eval_then_semisup(cluster, cifar, tmp_path):
    t0 = time.time()
    # `sbatch script_unmix_c10.sh --epochs 2`, no EPOCHS nor EXPERIMENT_PATH: the folder is named after the
    # flags actually used (--epochs 2 here, --nmb_prototypes 10 of EXTRA_ARGS), in the submit folder
    exp = str(tmp_path / "experiments" / "unmix_swav_cifar_8_resnet18_2ep_10prot_cifar10")
    env = {k: v for k, v in _job_env(cifar, exp, epochs=400).items() if k not in ("EPOCHS", "EXPERIMENT_PATH")}
    out, err = str(tmp_path / "job_%j.out"), str(tmp_path / "job_%j.err")
    job = cluster.sbatch(SBATCH_CPU + [f"--output={out}", f"--error={err}", SCRIPTS["c10"], "--epochs", "2"],
                         env=env, cwd=str(tmp_path))
    out, err = out.replace("%j", job), err.replace("%j", job)
    state = cluster.wait(job, timeout=150)
    text = _read(out)
    print(f"\n[sbatch job {job}: {state} in {time.time() - t0:.0f}s]\n{_key_lines(text)}")
    assert state == "COMPLETED", _report(cluster, out, err)
    assert cluster.job_info(job).get("ExitCode") == "0:0"
    assert f"slurm job {job} (restart 0), 2 task(s) on {cluster.host}" in text
    for r in range(2):
        assert re.search(rf"distributed: rank {r}/2 local_rank {r} device cpu \(slurm, gloo, tcp://{cluster.host}:\d+\)",
                         text), _report(cluster, out, err)
    assert re.search(r"^\s*world_size: 2$", text, flags=re.M)
    assert "Pretraining done." in text
    m = re.search(r"Top-1 test accuracy: (\d+\.\d)", text)
    assert m, _report(cluster, out, err)
    assert os.path.isfile(os.path.join(exp, "checkpoint.pth.tar"))
    assert os.path.isfile(os.path.join(exp, "train.log-1"))           # rank 1 logged to its own file
    assert os.path.isfile(exp + "_linear_eval/results.json")
    name = os.path.basename(exp)
    assert sorted(os.listdir(tmp_path / "experiments")) == [name, name + "_linear_eval"]

    # the same job again with SEMISUP_LABELS=10: pretraining and evaluation are done (they return at once),
    # then the semi-supervised fine-tuning of that checkpoint, its 2 processes started by srun
    semisup = exp + "_semisup_10pct"
    env = dict(_job_env(cifar, exp, epochs=2), SEMISUP_LABELS="10",
               SEMISUP_EXTRA_ARGS="--width_per_group 8 --epochs 1 --batch_size 4 --download false")
    out, err = str(tmp_path / "semisup_%j.out"), str(tmp_path / "semisup_%j.err")
    job = cluster.sbatch(SBATCH_CPU + [f"--output={out}", f"--error={err}", SCRIPTS["c10"]], env=env,
                         cwd=str(tmp_path))
    out, err = out.replace("%j", job), err.replace("%j", job)
    state = cluster.wait(job, timeout=90)
    assert state == "COMPLETED", _report(cluster, out, err)
    text = _read(out)
    for r in range(2):
        assert re.search(rf"distributed: rank {r}/2 .*\(slurm, gloo", text), _report(cluster, out, err)
    assert "world_size: 2" in _read(os.path.join(semisup, "train.log"))
    assert "10 of 80 training images" in _read(os.path.join(semisup, "train.log-1"))  # rank 1: the same subset
    assert "Test accuracies: top-1" in text, _report(cluster, out, err)
    assert os.path.isfile(os.path.join(semisup, "results.json"))
    assert f"done: semi-supervised fine-tuning in {semisup}" in text


def _submit(cluster, tmp_path, env):
    out, err = str(tmp_path / "job_%j.out"), str(tmp_path / "job_%j.err")
    job = cluster.sbatch(SBATCH_CPU + [f"--output={out}", f"--error={err}", SCRIPTS["c10"]], env=env, cwd=str(tmp_path))
    return job, out.replace("%j", job), err.replace("%j", job)


def _signal_when(cluster, job, log_path, pattern, count, out, err, timeout=90):
    """Send SIGUSR1 to the job's tasks (as --signal=USR1@120 does) once `pattern` appears `count` times."""
    deadline = time.time() + timeout
    while len(re.findall(pattern, _read(log_path))) < count:
        assert time.time() < deadline and cluster.job_state(job) in ("PENDING", "RUNNING"), \
            f"{pattern!r} not seen in {log_path}" + _report(cluster, out, err)
        time.sleep(0.2)
    cluster.run(["scancel", "--signal=USR1", job])


def _release_requeued(cluster, job, restarts, out, err, timeout=60):
    """A requeued job waits for a begin time (about 2 minutes): release it early.

    Not at once: requeueing revokes the job's credentials as of that second (1 s resolution), so a
    relaunch within the same second dies with "Job credential revoked". Wait 2 s after the requeue."""
    deadline = time.time() + timeout
    while True:
        info = cluster.job_info(job)
        if info.get("JobState") == "PENDING" and info.get("Restarts") == str(restarts):
            break
        assert time.time() < deadline and info.get("JobState") in ("RUNNING", "COMPLETING", "PENDING"), \
            f"job not requeued: {info.get('JobState')}" + _report(cluster, out, err)
        time.sleep(0.3)
    time.sleep(2.0)
    cluster.run(["scontrol", "update", f"JobId={job}", "StartTime=now"])


@pytest.mark.slurm
def test_sbatch_script_preempted_in_pretraining_then_in_linear_eval_requeued_and_resumed(cluster, cifar, tmp_path):
    """One job preempted twice (one job instead of two: each start of the job runs its processes' imports
    and the pretraining's check): SIGUSR1 during pretraining, requeue, the pretraining resumes mid-epoch and
    finishes; SIGUSR1 during the linear evaluation, requeue, the pretraining is not repeated and the
    evaluation resumes after its saved epoch."""
    t0 = time.time()
    exp = str(tmp_path / "exp" / "unmix_swav_preempt")
    env = _job_env(cifar, exp, epochs=6, extra="--preempt_check_freq 1", workers=1)
    env["EVAL_EPOCHS"] = "25"
    env["EVAL_EXTRA_ARGS"] += " --workers 0"   # loader workers in pretraining only (a fork per epoch saved)
    job, out, err = _submit(cluster, tmp_path, env)
    _signal_when(cluster, job, os.path.join(exp, "train.log"), r"Epoch: \[0\]\[1/", 1, out, err)
    _release_requeued(cluster, job, 1, out, err)
    _signal_when(cluster, job, exp + "_linear_eval/train.log", r"Best Acc@1 so far", 2, out, err)
    _release_requeued(cluster, job, 2, out, err)
    state = cluster.wait(job, timeout=150)
    text = _read(out)
    print(f"\n[sbatch job {job}: {state} in {time.time() - t0:.0f}s]\n{_key_lines(text)}")
    assert state == "COMPLETED", _report(cluster, out, err)
    for restart in range(3):
        assert f"slurm job {job} (restart {restart})" in text, _report(cluster, out, err)
    first_run, after_pretraining_requeue = text.split(f"slurm job {job} (restart 1)")
    second_run, third_run = after_pretraining_requeue.split(f"slurm job {job} (restart 2)")

    # 1. preempted during pretraining: checkpoint mid-epoch, requeued, resumed where it stopped
    m = re.search(r"Preempted \(signal 10\): checkpoint saved at epoch (\d+), iteration (\d+)", first_run)
    assert m, _report(cluster, out, err)
    assert "Job requeued with scontrol" in first_run
    resumed = re.search(r"Resumed from \S+: epoch (\d+), iteration (\d+)", second_run)
    assert resumed and resumed.groups() == m.groups(), _report(cluster, out, err)
    assert "Top-1 test accuracy" not in first_run and "Pretraining done." not in first_run
    assert "pretraining stopped by a preemption signal" in first_run
    assert "Pretraining done." in after_pretraining_requeue
    assert re.search(r"Top-1 test accuracy: \d+\.\d", after_pretraining_requeue)
    # the resumed run continued mid-epoch instead of starting over
    assert "Epoch: [0][0/" not in after_pretraining_requeue

    # 2. preempted during the linear evaluation (the pretraining done): requeued, the pretraining not
    # repeated, the evaluation resumed after its saved epoch
    assert "Pretraining done." in second_run and "Top-1 test accuracy" not in second_run
    assert re.search(r"linear evaluation (was killed by SIGUSR1|stopped by a preemption signal)", second_run)
    assert "Nothing to do" in third_run                       # pretraining is not repeated
    m = re.search(r"Resumed linear evaluation from epoch (\d+)", third_run)
    assert m and int(m.group(1)) >= 2, _report(cluster, out, err)
    assert re.search(r"Top-1 test accuracy: \d+\.\d", third_run)
