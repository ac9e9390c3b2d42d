#!/usr/bin/env bash
#SBATCH --job-name=unmix_table
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:1
#SBATCH --cpus-per-task=2
#SBATCH --mem=50G
#SBATCH --time=12:00:00
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@120
#
# One cell of the published tables; scripts/reproduce_tables.sh submits it as a job array (INDEX =
# $SLURM_ARRAY_TASK_ID) or runs it here cell after cell:
#   sbatch --array=0-19 scripts/table_cell.sh PLAN        bash scripts/table_cell.sh PLAN INDEX
# Row INDEX of PLAN names the cell, its SBATCH script (script_unmix_c10.sh / script_unmix_c100.sh), epochs,
# method, seed and folders; this runs that script (pretraining, then linear evaluation; both resume what
# an earlier attempt left) with EPOCHS, RUN_SWAV, EXPERIMENT_PATH, DATASET_PATH set for the cell, --seed
# appended to EXTRA_ARGS and EVAL_EXTRA_ARGS, and every other environment override passed through.
# Its output is appended to <plan folder>/<cell>.log; <plan folder>/<cell>.state records
# "running JOB" at the start and "exit STATUS JOB" at the end (JOB: the Slurm job, or local:PID.START@HOST). Resources, preemption and requeue are
# those of script_unmix_c10.sh (see its header); requeue acts on this array task alone.
# Exit status: that of the SBATCH script (0 done, 2 bad input, 3 preempted, 11 pretraining failed,
# 21 linear evaluation failed).

set -uo pipefail

die() { echo "error: $*" >&2; exit 2; }

PLAN=${1:-}
INDEX=${2:-${SLURM_ARRAY_TASK_ID:-}}
[ -f "$PLAN" ] || die "usage: table_cell.sh PLAN [INDEX]; plan '$PLAN' not found"
[[ "$INDEX" =~ ^[0-9]+$ ]] || die "no cell index (give INDEX, or run as a job array task)"
# Under sbatch this file is a copy in Slurm's spool: the repository comes from CODE_DIR.
CODE_DIR=${CODE_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}

ROW=$(awk -F'\t' -v i="$INDEX" 'NR > 1 && $1 == i' "$PLAN")
[ -n "$ROW" ] || die "$PLAN has no cell $INDEX"
IFS=$'\t' read -r _ CELL _ _ CELL_EPOCHS SEED SCRIPT CELL_RUN_SWAV CELL_EXPERIMENT _ CELL_DATA <<< "$ROW"
[ -f "$CODE_DIR/$SCRIPT" ] || die "$CODE_DIR/$SCRIPT not found (set CODE_DIR to the repository)"

CELLS_DIR=$(dirname "$PLAN")
STATE="$CELLS_DIR/$CELL.state"
if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then JOB="${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
elif [ -n "${SLURM_JOB_ID:-}" ]; then JOB=$SLURM_JOB_ID
else  # local:PID.START@HOST, START = this shell's start time (field 22 of /proc/PID/stat): once this shell
      # is gone, a later process given the same PID is not taken for it
    STAT=$(cat "/proc/$$/stat" 2>/dev/null) && read -r -a STAT <<< "${STAT##*) }" && START=".${STAT[19]}" || START=
    JOB="local:$$$START@$(hostname)"
fi
record() {  # one line, replaced atomically
    printf '%s %s\n' "$1" "$(date +%FT%T)" > "$STATE.$$.tmp" && mv -f "$STATE.$$.tmp" "$STATE"
}

echo "cell $CELL (job $JOB): output appended to $CELLS_DIR/$CELL.log"
exec >> "$CELLS_DIR/$CELL.log" 2>&1
echo "==== cell $CELL, job $JOB (restart ${SLURM_RESTART_COUNT:-0}) on $(hostname), $(date '+%F %T')"
record "running $JOB"

# Like the job body: on SIGTERM (requeue, scancel, time limit) or SIGUSR1 keep waiting for it, so that
# its exit status is recorded.
trap 'echo "cell shell received SIGTERM"' TERM
trap 'echo "cell shell received SIGUSR1"' USR1
DATASET_PATH=$CELL_DATA EPOCHS=$CELL_EPOCHS RUN_SWAV=$CELL_RUN_SWAV EXPERIMENT_PATH=$CELL_EXPERIMENT \
    EXTRA_ARGS="${EXTRA_ARGS:-} --seed $SEED" EVAL_EXTRA_ARGS="${EVAL_EXTRA_ARGS:-} --seed $SEED" \
    bash "$CODE_DIR/$SCRIPT"
rc=$?
record "exit $rc $JOB"
exit "$rc"
