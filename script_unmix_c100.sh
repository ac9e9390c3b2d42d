#!/usr/bin/env bash
#SBATCH --job-name=unmix_swav_c100
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=2
#SBATCH --mem=50G
#SBATCH --time=12:00:00
#SBATCH --output=unmix_swav_c100_%j.out
#SBATCH --error=unmix_swav_c100_%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
#
# Un-Mix + SwAV on CIFAR-100: pretraining (main_swav_unmix.py), then linear evaluation (eval_linear.py),
# with the released settings. Same as script_unmix_c10.sh but for CIFAR-100 (--num_labels 100, default
# DATASET_PATH=cifar100, dump ./experiments/..._cifar100): see that script's header for how to run it,
# the environment overrides (DATASET_PATH, EPOCHS, BATCH_SIZE, RUN_SWAV, ARCH, WORKERS, AUGMENT, DEVICE,
# EXPERIMENT_PATH, EVAL_EPOCHS, EXTRA_ARGS, EVAL_EXTRA_ARGS, NPROC, PYTHON, CODE_DIR), exit statuses and
# preemption. `bash script_unmix_c100.sh --help` prints the usage; flags after the script name go to
# pretraining (and name the folder as there).

set -uo pipefail

# ---- data-set specific settings
DATASET_NAME=cifar100
NUM_LABELS=100
JOB_TAG=script_unmix_c100

# ---- where the code is: found as script_unmix_c10.sh finds it (under sbatch this file is a copy in the spool)
[ -n "${CODE_DIR:-}" ] || for CODE_DIR in "$(dirname "${BASH_SOURCE[0]}")" "${SLURM_JOB_ID:+$(scontrol show job \
    "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\)\/.*/\1/p' | head -n 1)}" "${SLURM_SUBMIT_DIR:-}" "$PWD"
    do [ -f "$CODE_DIR/main_swav_unmix.py" ] && break; done
for f in main_swav_unmix.py scripts/unmix_job.sh; do [ -f "$CODE_DIR/$f" ] || { echo "error: $CODE_DIR/$f not found (set CODE_DIR to the repository)" >&2; exit 2; }; done

# shellcheck source=scripts/unmix_job.sh
source "$CODE_DIR/scripts/unmix_job.sh"
