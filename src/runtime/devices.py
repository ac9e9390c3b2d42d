"""Which device a run uses (`--device auto|cuda|cpu`), the guard against a GPU job that torch cannot see,
the log's device line, and the CPU's time-per-epoch estimate.

`auto` is CUDA when torch sees a GPU, else the CPU: but a job that was given GPUs (Slurm's GPU variables,
or a CUDA_VISIBLE_DEVICES naming devices) on which torch sees none is almost always a torch build that does
not match the NVIDIA driver, and would otherwise train for days on the CPU. It stops at once (exit 2,
before the run folder is touched) with one line naming both CUDA versions and the fix; `--device cpu`
runs on the CPU on purpose. `launch.init_distributed` applies it.
"""
import re
import subprocess
import time
from typing import Mapping, Optional

import torch

DEVICES = ("auto", "cuda", "cpu")
HELP = ("auto: CUDA when torch sees a GPU, else the CPU (stops when the job was given GPUs that torch cannot "
        "see); cuda: stop unless torch sees a GPU; cpu: the CPU even with GPUs")  # --device of every entry script

# Slurm's variables that say the job (or step) was allocated GPUs.
SLURM_GPU_VARIABLES = ("SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS", "SLURM_GPUS_ON_NODE",
                       "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")
NO_DEVICES = {"", "-1", "nodevfiles", "none", "n/a"}  # CUDA_VISIBLE_DEVICES / Slurm values naming no GPU


def gpus_given(environ: Mapping[str, str]) -> Optional[str]:
    """`VARIABLE=value` of the first variable of `environ` that gives this job GPUs, or None. A Slurm count
    of 0 (SLURM_GPUS*=`0` or `gpu:0`) gives none; an index list (SLURM_JOB_GPUS, SLURM_STEP_GPUS,
    CUDA_VISIBLE_DEVICES) of `0` names GPU 0."""
    for name in SLURM_GPU_VARIABLES + ("CUDA_VISIBLE_DEVICES",):
        value = str(environ.get(name, "")).strip()
        if value.lower() in NO_DEVICES:
            continue
        if name.startswith("SLURM_GPUS") and re.fullmatch(r"([\w.-]+:)*0+", value):
            continue
        return f"{name}={value}"
    return None


def driver_versions(run=subprocess.run):
    """(driver version, the CUDA version it supports) read from `nvidia-smi`; (None, None) without one."""
    try:
        out = run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    driver = re.search(r"Driver Version:\s*([\d.]+)", out)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", out)
    return (driver.group(1) if driver else None), (cuda.group(1) if cuda else None)


def no_gpu_message(why, torch_version, torch_cuda, driver, driver_cuda):
    """The one line of a run that needs a GPU (`why`: the flag or variable that says so) when torch sees none."""
    built = f"torch {torch_version} is built for CUDA {torch_cuda}" if torch_cuda else \
        f"torch {torch_version} is a CPU-only build (torch.version.cuda None)"
    if driver:
        found = f"the NVIDIA driver {driver} (nvidia-smi) supports CUDA {driver_cuda or '?'}"
        wheel = f"cu{driver_cuda.replace('.', '')}" if driver_cuda else "cuXYZ"
    else:
        found, wheel = "nvidia-smi is absent (no NVIDIA driver found)", "cuXYZ"
    release = torch_version.split("+")[0]
    return (f"{why} but torch sees no GPU: {built}, {found}; install the torch build that matches the driver "
            f"(pip install torch=={release} --index-url https://download.pytorch.org/whl/{wheel}, a CUDA no newer "
            "than the driver's), or pass --device cpu to run on the CPU on purpose")


def needs_gpu(requested, environ: Mapping[str, str]) -> Optional[str]:
    """Why this run must have a GPU (`--device cuda`, or a variable from `gpus_given` under `auto`), or None."""
    if requested == "cuda":
        return "--device cuda was asked for"
    if requested == "auto":
        given = gpus_given(environ)
        return f"the job was given GPUs ({given})" if given else None
    return None


def describe_device(device) -> str:
    """The first line of a run's log: `Device: cuda:0 (NVIDIA H100 ...)` or `Device: cpu (N threads)`."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"Device: {device} ({torch.cuda.get_device_name(device)})"
    threads = torch.get_num_threads()
    return f"Device: {device.type} ({threads} thread{'s' if threads != 1 else ''})"


def full_width(arch, width_per_group):
    """A network whose CPU training takes hours per epoch on CIFAR: the released width or a ResNet-50."""
    return width_per_group >= 64 or arch.startswith("resnet50")


class CpuPace:
    """On the CPU at full width (`active`): once `after` iterations past the first (a warm-up) have run, one
    log line with how long an epoch of `iterations` takes at that speed. `step()` after every iteration
    costs a comparison; the clock is read only while measuring."""

    def __init__(self, active, iterations, log, after=10):
        self.active, self.iterations, self.log, self.after = active, iterations, log, after
        self.done, self.start = 0, None

    @classmethod
    def of_run(cls, args, iterations, log, first_epoch=True):
        """The pace of a run with these arguments: measured by rank 0 on the CPU at full width, in the first
        epoch this process trains."""
        return cls(first_epoch and args.rank == 0 and args.device.type == "cpu"
                   and full_width(args.arch, args.width_per_group), iterations, log)

    def step(self):
        if not self.active:
            return
        self.done += 1
        if self.done == 1:
            self.start = time.perf_counter()
        elif self.done - 1 == self.after or self.done == self.iterations:
            per_iteration = (time.perf_counter() - self.start) / (self.done - 1)
            self.log(f"CPU: about {about(per_iteration * self.iterations)} per epoch at this speed "
                     f"({per_iteration:.3g} s per iteration, {self.iterations} iterations; a GPU is far faster)")
            self.active = False


def about(seconds):
    """A duration in round words: `40 s`, `12 min`, `3.5 h`."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
