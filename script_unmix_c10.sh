#!/usr/bin/env bash
#SBATCH --job-name=unmix_swav_c10
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=2
#SBATCH --mem=50G
#SBATCH --time=12:00:00
#SBATCH --output=unmix_swav_c10_%j.out
#SBATCH --error=unmix_swav_c10_%j.err
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
#
# Un-Mix + SwAV on CIFAR-10: pretraining (main_swav_unmix.py), then linear evaluation (eval_linear.py),
# with the released settings. No partition line: Slurm picks the cluster's default partition (add
# `-p <name>` on the sbatch command line; never `default`, a name Slurm reserves).
#
# HOW TO RUN
#   sbatch script_unmix_c10.sh            Slurm: `srun` starts one task per GPU (--ntasks-per-node tasks
#                                         on each of --nodes nodes); rank/world size/rendezvous come from
#                                         the Slurm task variables (src/runtime/launch.py).
#   N nodes x M GPUs: change SBATCH lines only, e.g.
#   sbatch --nodes=2 --ntasks-per-node=4 --gres=gpu:4 --cpus-per-task=8 script_unmix_c10.sh
#   (--batch_size is per process: the global batch is 128 x number of tasks.)
#   bash script_unmix_c10.sh              no Slurm: one process per visible GPU through torchrun
#                                         (`python -m torch.distributed.run --standalone`); with no GPU,
#                                         a single CPU process (`python main_swav_unmix.py`).
#   bash script_unmix_c10.sh --help       this usage in short (-h too); starts nothing.
#   Flags after the script name go to pretraining, after EXTRA_ARGS (the last one of a flag wins), e.g.
#   bash script_unmix_c10.sh --knn_freq 10   or   sbatch script_unmix_c10.sh --epochs 200
#   Those (there or in EXTRA_ARGS) that the folder name or the evaluation use count as their variable does:
#   --epochs, --batch_size, --arch, --run_swav, --nmb_prototypes name the default folder (--epochs 200:
#   ..._200ep_...), --arch, --width_per_group, --data_path reach the evaluations, --dump_path is the folder.
#   Write them in full (an abbreviation is refused).
#
# ENVIRONMENT OVERRIDES (defaults = released values)
#   DATASET_PATH=cifar10     --data_path (keyword cifar10, or a folder with cifar-10-batches-py)
#   EPOCHS=400  BATCH_SIZE=128  ARCH=resnet18  WORKERS=2  RUN_SWAV=False (True: plain SwAV)
#   AUGMENT                  unset: the released pipeline (PIL crops in DataLoader workers);
#                            AUGMENT=batched passes --augment batched (crops made on the GPU; see README, "Speed")
#   DEVICE                   --device of every step (auto | cuda | cpu); default cuda in a Slurm job allocated
#                            GPUs (SLURM_JOB_GPUS, SLURM_STEP_GPUS or SLURM_GPUS_ON_NODE set): if torch cannot
#                            see them the job stops at once (status 11, one line naming torch's and the driver's
#                            CUDA) instead of training on the CPU; else auto (CUDA when torch sees a GPU, else
#                            the CPU; a CPU job such as `--gres=none` keeps working). DEVICE=cpu: CPU on purpose.
#   EXPERIMENT_PATH          pretraining dump; default
#                            ./experiments/unmix_swav_cifar_${BATCH_SIZE}_${ARCH}_${EPOCHS}ep_100prot_cifar10
#                            (prefix swav_ instead of unmix_swav_ when RUN_SWAV is true; <P>prot with
#                            --nmb_prototypes P; with the defaults this is the released folder name). Relative paths are relative to the
#                            directory sbatch/bash was started from. Evaluation writes ${EXPERIMENT_PATH}_linear_eval
#                            (with --allow_changed_args true: a new checkpoint, or other evaluation flags, is
#                            evaluated afresh, the earlier evaluation moved to replaced-<time>/ inside it).
#   EVAL_EPOCHS=100          linear evaluation epochs (EPOCHS and EVAL_EPOCHS must be >= 1; the data's classes
#                            must match the evaluation's --num_labels: both checked before pretraining)
#   EXTRA_ARGS, EVAL_EXTRA_ARGS  extra flags appended to pretraining / evaluation (split on white space,
#                            no quoting; later flags win, e.g. EXTRA_ARGS="--batch_size 8 --nmb_prototypes 10")
#   SEMISUP_LABELS           after the linear evaluation, semi-supervised fine-tuning of the same checkpoint
#                            (eval_semisup.py, released recipe) with 1 or 10 % of the labels, or "1,10" for
#                            both, in ${EXPERIMENT_PATH}_semisup_<P>pct (default: none);
#                            SEMISUP_EXTRA_ARGS: extra fine-tuning flags
#   NPROC                    processes per node outside Slurm (default: number of visible GPUs, 1 if none)
#   PYTHON                   interpreter (default: python, else python3)
#   CODE_DIR                 folder holding main_swav_unmix.py (default: found next to this script;
#                            under sbatch, Slurm runs a copy, so the original path comes from scontrol,
#                            else $SLURM_SUBMIT_DIR, else the current directory)
#
# EXIT STATUS
#   0   pretraining and evaluation finished
#   2   bad environment override (also a variable that looks like a mistyped one: EPOCH, DATA_PATH, ...),
#       code not found, or data whose classes do not match (nothing ran)
#   A step refused at its start (bad data path, bad flag value, a folder of another kind or in use) leaves
#   nothing behind: the folder it created is removed again, an existing one is left as it was.
#   3   preempted (PREEMPTED_EXIT_CODE in src/runtime/signals.py): a checkpoint was written and, under Slurm,
#       the job was requeued; running the same command again resumes from checkpoint.pth.tar. Also used
#       when a step was stopped because this shell got SIGTERM or SIGINT (scancel, requeue, time limit,
#       docker stop, timeout, Ctrl-C; no later step starts), and when a step was killed by SIGUSR1
#       (status 138: a process without a handler); then, under Slurm, this script runs `scontrol requeue`.
#   11  pretraining failed          (evaluation not started)
#   21  linear evaluation failed
#   31  semi-supervised fine-tuning failed (with SEMISUP_LABELS)
#   Under Slurm, once the job has been requeued Slurm terminates this script; its status then does not
#   matter (the rerun starts this script from the top; pretraining resumes, or returns at once when done).
#
# PREEMPTION
#   --signal=USR1@120 (no "B:"): 120 s before the time limit Slurm sends SIGUSR1 to every task of the job
#   steps, i.e. to the python processes started by srun, which is where the training loop polls it
#   (src/runtime/signals.PreemptionHandler). "B:USR1" would signal only this batch shell, which would then have
#   to forward it. The same happens on `scancel --signal=USR1 <jobid>` and on SIGTERM. Rank 0 calls
#   `scontrol requeue`; --requeue allows it and --open-mode=append keeps the logs of all runs in one file.
#   A step killed by the signal instead (status 138, no handler installed yet) makes this script requeue
#   the job itself; both steps resume from their last checkpoint.
#   Without Slurm, SIGTERM, SIGINT and SIGUSR1 sent to this script are passed on to the running step (it
#   saves and exits 3), and no evaluation starts after a stopped pretraining.
#
# CPU TEST RUN ON A CLUSTER WITHOUT GPUS (as tests/test_slurm.py does)
#   DATASET_PATH=/data/cifar EPOCHS=2 EVAL_EPOCHS=1 WORKERS=0 EXTRA_ARGS="--width_per_group 8 ..." \
#   sbatch --ntasks-per-node=2 --cpus-per-task=1 --gres=none --mem=2G --time=10 script_unmix_c10.sh

set -uo pipefail

# ---- data-set specific settings
DATASET_NAME=cifar10
NUM_LABELS=10
JOB_TAG=script_unmix_c10

# ---- where the code is: CODE_DIR, else the first folder holding main_swav_unmix.py of: this file's; under
# sbatch, which runs a copy of this file, the submitted file's (scontrol) and the submit folder; else here.
# (The one piece script_unmix_c100.sh repeats: it runs before the shared body can be found.)
[ -n "${CODE_DIR:-}" ] || for CODE_DIR in "$(dirname "${BASH_SOURCE[0]}")" "${SLURM_JOB_ID:+$(scontrol show job \
    "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *Command=\([^ ]*\)\/.*/\1/p' | head -n 1)}" "${SLURM_SUBMIT_DIR:-}" "$PWD"
    do [ -f "$CODE_DIR/main_swav_unmix.py" ] && break; done
for f in main_swav_unmix.py scripts/unmix_job.sh; do [ -f "$CODE_DIR/$f" ] || { echo "error: $CODE_DIR/$f not found (set CODE_DIR to the repository)" >&2; exit 2; }; done

# shellcheck source=scripts/unmix_job.sh
source "$CODE_DIR/scripts/unmix_job.sh"
