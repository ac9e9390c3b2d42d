"""--device auto|cuda|cpu (src/runtime/devices.py, applied by launch.init_distributed): a job given GPUs that
torch cannot see, or --device cuda without a GPU, stops at once with one line naming torch's and the
driver's CUDA, before anything is written; the log's first line names the device; a CPU run at full width
says how long an epoch takes; the SBATCH scripts ask for cuda in a Slurm job allocated GPUs."""
import os
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from src.runtime.devices import CpuPace, about, describe_device, full_width, gpus_given, needs_gpu
from tests.e2e_helpers import EVAL, MAIN, RUN_ENV, make_fake_cifar10, tiny_args

REPO = Path(__file__).resolve().parents[1]
SEMISUP = REPO / "eval_semisup.py"

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a GPU here: the guard does not apply")

FAKE_NVIDIA_SMI = """#!/usr/bin/env bash
cat <<'EOF'
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 535.104.05             Driver Version: 535.104.05   CUDA Version: 12.2        |
+-----------------------------------------------------------------------------------------+
EOF
"""


@pytest.mark.parametrize("environ, given", [
    ({}, None), ({"CUDA_VISIBLE_DEVICES": ""}, None), ({"CUDA_VISIBLE_DEVICES": "-1"}, None),
    ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, None), ({"CUDA_VISIBLE_DEVICES": "0"}, "CUDA_VISIBLE_DEVICES=0"),
    ({"SLURM_JOB_GPUS": "0"}, "SLURM_JOB_GPUS=0"), ({"SLURM_STEP_GPUS": "2,3"}, "SLURM_STEP_GPUS=2,3"),
    ({"SLURM_GPUS_ON_NODE": "0"}, None), ({"SLURM_GPUS_PER_NODE": "gpu:0"}, None),
    ({"SLURM_GPUS_PER_NODE": "a100:2"}, "SLURM_GPUS_PER_NODE=a100:2"), ({"SLURM_GPUS": "4"}, "SLURM_GPUS=4")])
def test_which_jobs_were_given_gpus(environ, given):
    assert gpus_given(environ) == given
    assert (needs_gpu("auto", environ) is None) == (given is None)
    assert needs_gpu("cpu", environ) is None and needs_gpu("cuda", {}) == "--device cuda was asked for"


def run(script, args, cwd, **env):
    full = {k: v for k, v in RUN_ENV.items() if not k.startswith("SLURM_") and k != "CUDA_VISIBLE_DEVICES"}
    full.update(env)
    return subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=full, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_fake_cifar10(tmp_path_factory.mktemp("device") / "c10")


@no_gpu
@pytest.mark.parametrize("script, env, why", [
    (MAIN, {"CUDA_VISIBLE_DEVICES": "0"}, "the job was given GPUs (CUDA_VISIBLE_DEVICES=0)"),
    (EVAL, {"SLURM_JOB_GPUS": "1"}, "the job was given GPUs (SLURM_JOB_GPUS=1)"),
    (SEMISUP, {"DEVICE_FLAG": "cuda"}, "--device cuda was asked for")])
def test_no_gpu_for_a_gpu_job_stops_at_once_before_writing(tmp_path, data, script, env, why):
    dump = tmp_path / "dump"
    args = ["--data_path", data, "--dump_path", dump, "--workers", 0, "--epochs", 1]
    if env.pop("DEVICE_FLAG", None):
        args += ["--device", "cuda"]
    bin_dir = tmp_path / "bin"  # a driver that says which CUDA it supports
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}" if script == MAIN else os.environ["PATH"]
    res = run(script, args, tmp_path, PATH=path, **env)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1, res.stdout[-2000:] + res.stderr
    line = lines[0]
    assert line.startswith(f"error: {why} but torch sees no GPU: torch {torch.__version__}") and "--device cpu" in line
    assert f"CUDA {torch.version.cuda}" in line if torch.version.cuda else "CPU-only build" in line
    if script == MAIN:
        assert "NVIDIA driver 535.104.05 (nvidia-smi) supports CUDA 12.2" in line and "whl/cu122" in line
    elif shutil.which("nvidia-smi") is None:
        assert "nvidia-smi is absent" in line
    assert not dump.exists()  # nothing written: not even the folder


def test_device_cpu_runs_on_the_cpu_on_purpose_and_the_log_says_so_first(tmp_path, data):
    res = run(MAIN, tiny_args(data, tmp_path / "pre", 1, "--device", "cpu"), tmp_path, CUDA_VISIBLE_DEVICES="0")
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr
    first = (tmp_path / "pre" / "train.log").read_text().splitlines()[0]
    assert first.endswith("Device: cpu (1 thread)"), first  # OMP_NUM_THREADS=1
    assert "CPU: about" not in res.stdout  # width 8: no warning


def test_full_width_and_the_cpu_pace_line():
    assert full_width("resnet18", 64) and full_width("resnet50", 8) and not full_width("resnet18", 8)
    lines = []
    pace = CpuPace(True, iterations=100, log=lines.append, after=3)
    for _ in range(6):
        time.sleep(0.02)  # an iteration of 20 ms: an epoch of 100 takes about 2 s
        pace.step()
    assert len(lines) == 1 and lines[0].startswith("CPU: about 2 s per epoch at this speed"), lines
    idle = CpuPace(False, iterations=100, log=lines.append, after=3)
    for _ in range(6):
        idle.step()
    assert len(lines) == 1
    assert (about(40), about(600), about(5 * 3600)) == ("40 s", "10 min", "5.0 h")


def test_the_pace_of_a_run_is_measured_by_rank_0_on_the_cpu_at_full_width_in_its_first_epoch():
    from argparse import Namespace
    run_args = dict(rank=0, device=torch.device("cpu"), arch="resnet18", width_per_group=64)
    assert CpuPace.of_run(Namespace(**run_args), 10, print).active
    for other in (dict(rank=1), dict(device=torch.device("cuda", 0)), dict(width_per_group=8)):
        assert not CpuPace.of_run(Namespace(**{**run_args, **other}), 10, print).active, other
    assert not CpuPace.of_run(Namespace(**run_args), 10, print, first_epoch=False).active


# ---------------------------------------------------------------------------------------------------------
# the SBATCH scripts' DEVICE (a fake python records the commands; a fake srun runs them)
# ---------------------------------------------------------------------------------------------------------

FAKE_PYTHON = '#!/usr/bin/env bash\necho "$*" >> "$FAKE_PY_LOG"\n'
FAKE_SRUN = '#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n'


def script_calls(tmp_path, **env):
    code, bin_dir = tmp_path / "code", tmp_path / "bin"
    (code / "scripts").mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(exist_ok=True)
    for f in ("main_swav_unmix.py", "eval_linear.py", "eval_semisup.py"):
        (code / f).write_text("# stub\n")
    shutil.copy(REPO / "scripts" / "unmix_job.sh", code / "scripts" / "unmix_job.sh")
    for name, text in (("python", FAKE_PYTHON), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "calls.log"
    log.unlink(missing_ok=True)
    full = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in ("DEVICE", "EXTRA_ARGS")}
    full.update(PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHON=str(bin_dir / "python"), CODE_DIR=str(code),
                FAKE_PY_LOG=str(log), CUDA_VISIBLE_DEVICES="", SEMISUP_LABELS="10", **env)
    r = subprocess.run(["bash", str(REPO / "script_unmix_c10.sh")], cwd=tmp_path, env=full, capture_output=True,
                       text=True, timeout=60)
    return r, log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("env, flag", [
    ({}, None), ({"SLURM_JOB_ID": "7"}, None), ({"SLURM_JOB_ID": "7", "SLURM_GPUS_ON_NODE": "0"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0"}, "--device cuda"),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0", "DEVICE": "auto"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0", "DEVICE": "cpu"}, "--device cpu"), ({"DEVICE": "cuda"}, "--device cuda")])
def test_scripts_ask_for_cuda_in_a_slurm_job_with_gpus(tmp_path, env, flag):
    r, calls = script_calls(tmp_path, **env)
    assert r.returncode == 0 and len(calls) == 3, r.stdout + r.stderr
    for call in calls:  # pretraining, linear evaluation, fine-tuning
        assert (f"{flag} " in call + " ") if flag else "--device" not in call, call


def test_scripts_refuse_an_unknown_device(tmp_path):
    r, calls = script_calls(tmp_path, DEVICE="gpu")
    assert r.returncode == 2 and "DEVICE='gpu' is not auto, cuda or cpu" in r.stderr and calls == []


def test_the_device_line_counts_threads_in_english():
    """Was `Device: cpu (1 threads)` under torchrun, which gives each process one thread."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert describe_device("cpu") == "Device: cpu (1 thread)"
        torch.set_num_threads(2)
        assert describe_device("cpu") == "Device: cpu (2 threads)"
    finally:
        torch.set_num_threads(before)
