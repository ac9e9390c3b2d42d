#!/usr/bin/env bash
# Install Debian's slurm-wlm (slurmctld, slurmd, sbatch/srun/...) and munge when they are missing.
# Idempotent and quiet: does nothing when the binaries are already there. Needs root (or sudo)
# for apt-get. Exit status 0 when Slurm is available afterwards, non-zero otherwise.
#
# Used by .ci/run before pytest:   bash .ci/install_slurm.sh || echo "slurm unavailable: slurm tests skip"
# The tests start their own private cluster (tests/slurm_cluster.py); nothing is started here.
set -euo pipefail

have_all() {
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sbatch >/dev/null 2>&1 && command -v munged >/dev/null 2>&1
}

# slurmctld/slurmd/munged live in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/sbin:/sbin"

if have_all; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO="sudo -n"
    else
        echo "install_slurm.sh: Slurm is missing and we are not root (no passwordless sudo)" >&2
        exit 1
    fi
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_slurm.sh: Slurm is missing and apt-get is not available" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! { $SUDO apt-get update -qq && \
       $SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge; } >"$log" 2>&1; then
    echo "install_slurm.sh: apt-get failed; last lines:" >&2
    tail -n 20 "$log" >&2
    exit 1
fi

if ! have_all; then
    echo "install_slurm.sh: installed packages but slurmctld/slurmd/sbatch/munged still not found" >&2
    exit 1
fi
