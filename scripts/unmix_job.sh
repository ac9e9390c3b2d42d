#!/usr/bin/env bash
# The body of script_unmix_c10.sh / script_unmix_c100.sh: pretraining, then linear evaluation (then,
# optionally, semi-supervised fine-tuning).
# Sourced by them after they set DATASET_NAME, NUM_LABELS, JOB_TAG and CODE_DIR (the folder they found
# main_swav_unmix.py and this file in), with the script's command-line arguments; usage, environment
# overrides and exit statuses are documented in script_unmix_c10.sh's header and in `usage` below.

log() { echo "[$JOB_TAG $(date '+%F %T')] $*"; }
die() { echo "error: $*" >&2; exit 2; }

[ -f "$CODE_DIR/eval_linear.py" ] || die "$CODE_DIR/eval_linear.py not found (set CODE_DIR to the repository)"
CODE_DIR=$(cd "$CODE_DIR" && pwd)

is_uint() { [[ "$1" =~ ^[0-9]+$ ]]; }

usage() {
    cat <<USAGE
usage: bash $JOB_TAG.sh [-h|--help] [PRETRAINING FLAGS...]
       sbatch $JOB_TAG.sh [PRETRAINING FLAGS...]

Un-Mix + SwAV on CIFAR-${DATASET_NAME#cifar}: pretraining (main_swav_unmix.py) with the released settings, then
linear evaluation (eval_linear.py --num_labels $NUM_LABELS) of its checkpoint. Under Slurm srun starts
one task per GPU; without Slurm, one process per visible GPU (torchrun), or one CPU process.
Flags given on the command line go to pretraining, after EXTRA_ARGS (the last one of a flag wins).
Those that the folder name or the evaluation use (--epochs, --batch_size, --arch, --run_swav,
--nmb_prototypes, --data_path, --width_per_group, --dump_path) count as the variables they match do.

Environment (default):
  DATASET_PATH     --data_path: keyword, CIFAR pickle folder or image folder ($DATASET_NAME)
  EPOCHS           pretraining epochs (400)
  BATCH_SIZE       batch size per process (128)
  ARCH             architecture (resnet18)
  WORKERS          data-loading workers per process (2)
  RUN_SWAV         True: plain SwAV, no Un-Mix (False)
  AUGMENT          --augment: released (PIL crops in workers) or batched (crops on the GPU, faster)
                   (unset: the released pipeline)
  DEVICE           --device of every step: auto (CUDA when torch sees a GPU), cuda (stop at once unless torch
                   sees one) or cpu (cuda in a Slurm job that was allocated GPUs, else auto)
  EXPERIMENT_PATH  pretraining folder; evaluation writes \${EXPERIMENT_PATH}_linear_eval
                   (./experiments/<unmix_swav|swav>_cifar_\${BATCH_SIZE}_\${ARCH}_\${EPOCHS}ep_<P>prot_$DATASET_NAME,
                   P = --nmb_prototypes, 100)
  EVAL_EPOCHS      linear evaluation epochs (100)
  EXTRA_ARGS       extra pretraining flags, split on white space (none)
  EVAL_EXTRA_ARGS  extra evaluation flags, split on white space (none)
  SEMISUP_LABELS   after the linear evaluation, semi-supervised fine-tuning (eval_semisup.py) with these
                   percentages of the labels, comma-separated: 1, 10 or 1,10; each in
                   \${EXPERIMENT_PATH}_semisup_<P>pct (none)
  SEMISUP_EXTRA_ARGS  extra fine-tuning flags, split on white space (none)
  NPROC            processes outside Slurm (number of visible GPUs, 1 if none)
  PYTHON           interpreter (python, else python3)
  CODE_DIR         folder holding main_swav_unmix.py (found next to this script)

Exit status: 0 done, 2 bad environment (also a variable such as EPOCH or DATA_PATH: a likely typo),
3 preempted or stopped by a signal (rerun to resume), 11 pretraining failed, 21 evaluation failed,
31 semi-supervised fine-tuning failed.
USAGE
}

for arg in "$@"; do
    case "$arg" in -h|--help) usage; exit 0 ;; esac
done

# A mistyped variable (EPOCH=2, eval_epochs=5, DATA_PATH=...) would be ignored and the job would run with
# the defaults for hours: a set variable that differs from one of ours only in case, underscores or a
# final S, or that is named after the flag it means (DATA_PATH, DUMP_PATH), stops the job when ours is unset.
OUR_VARIABLES=(DATASET_PATH EPOCHS BATCH_SIZE ARCH WORKERS RUN_SWAV AUGMENT DEVICE EXPERIMENT_PATH EVAL_EPOCHS
               EXTRA_ARGS EVAL_EXTRA_ARGS SEMISUP_LABELS SEMISUP_EXTRA_ARGS NPROC PYTHON CODE_DIR)
spelling() { local s=${1^^}; s=${s//_/}; echo "${s%S}"; }
while read -r name; do
    case " ${OUR_VARIABLES[*]} " in *" $name "*) continue ;; esac
    case "$name" in DATA_PATH) meant=DATASET_PATH ;; DUMP_PATH) meant=EXPERIMENT_PATH ;; *) meant= ;; esac
    for ours in "${OUR_VARIABLES[@]}"; do
        [ -n "$meant" ] || [ "$(spelling "$name")" != "$(spelling "$ours")" ] || meant=$ours
    done
    [ -z "$meant" ] || [ -n "${!meant+x}" ] \
        || die "$name is set, but the script reads $meant (unset): did you mean $meant=${!name}?" \
               "(set $meant, or unset $name if it is meant for another program; see --help)"
done < <(compgen -e)

DATASET_PATH=${DATASET_PATH:-$DATASET_NAME}
EPOCHS=${EPOCHS:-400}
BATCH_SIZE=${BATCH_SIZE:-128}
RUN_SWAV=${RUN_SWAV:-False}
ARCH=${ARCH:-resnet18}
WORKERS=${WORKERS:-2}
AUGMENT=${AUGMENT:-}
EVAL_EPOCHS=${EVAL_EPOCHS:-100}
EXTRA_ARGS=${EXTRA_ARGS:-}
PROTOTYPES=100  # --nmb_prototypes of the released script
WIDTH=          # --width_per_group of pretraining, when given: the evaluations load that network
EVAL_EXTRA_ARGS=${EVAL_EXTRA_ARGS:-}
SEMISUP_LABELS=${SEMISUP_LABELS:-}
SEMISUP_EXTRA_ARGS=${SEMISUP_EXTRA_ARGS:-}

read -r -a EXTRA <<< "$EXTRA_ARGS"

# Pretraining's flags (EXTRA_ARGS, then the command line) that the folder name or the evaluation use set
# what their variable would (the last one given wins, as in argparse), so that the folder is named after
# the settings actually used and the evaluation gets the same architecture and data. FROM[variable]: the
# flag that set it, for the error messages.
declare -A FROM=()
PRETRAIN_FLAGS=("${EXTRA[@]}" "$@")
NAMING_FLAGS=(--epochs --batch_size --arch --run_swav --nmb_prototypes --data_path --width_per_group --dump_path)
for ((i = 0; i < ${#PRETRAIN_FLAGS[@]}; i++)); do
    flag=${PRETRAIN_FLAGS[i]%%=*}
    if [[ "${PRETRAIN_FLAGS[i]}" == --*=* ]]; then value=${PRETRAIN_FLAGS[i]#*=}; else value=${PRETRAIN_FLAGS[i + 1]:-}; fi
    case "$flag" in
        --epochs) var=EPOCHS ;; --batch_size) var=BATCH_SIZE ;; --arch) var=ARCH ;; --run_swav) var=RUN_SWAV ;;
        --nmb_prototypes) var=PROTOTYPES ;; --data_path) var=DATASET_PATH ;; --width_per_group) var=WIDTH ;;
        --dump_path) var=EXPERIMENT_PATH ;;
        --?*) for full in "${NAMING_FLAGS[@]}"; do  # argparse takes a prefix: this shell would miss it
                  [[ "$full" != "$flag"* ]] || die "$flag: write $full in full (the folder name and the evaluation follow it)"
              done
              continue ;;
        *) continue ;;
    esac
    printf -v "$var" '%s' "$value"
    FROM[$var]=$flag
done
named() { echo "${FROM[$1]:-$1}"; }  # how the user set variable $1

for v in EPOCHS BATCH_SIZE WORKERS EVAL_EPOCHS PROTOTYPES; do
    is_uint "${!v}" || die "$(named "$v")='${!v}' is not a non-negative integer"
done
for v in EPOCHS BATCH_SIZE EVAL_EPOCHS; do
    [ "${!v}" -gt 0 ] || die "$(named "$v") must be > 0"
done
[ -z "$WIDTH" ] || is_uint "$WIDTH" || die "--width_per_group '$WIDTH' is not a non-negative integer"
[[ "$ARCH" =~ ^[A-Za-z0-9_]+$ ]] || die "$(named ARCH)='$ARCH' is not an architecture name"
case "${RUN_SWAV,,}" in
    true|on|1) PREFIX=swav ;;
    false|off|0) PREFIX=unmix_swav ;;
    *) die "$(named RUN_SWAV)='$RUN_SWAV' is not a boolean (true/false, on/off, 1/0)" ;;
esac
EXPERIMENT_PATH=${EXPERIMENT_PATH:-./experiments/${PREFIX}_cifar_${BATCH_SIZE}_${ARCH}_${EPOCHS}ep_${PROTOTYPES}prot_${DATASET_NAME}}
[ -n "$EXPERIMENT_PATH" ] || die "$(named EXPERIMENT_PATH) is empty"
[ ! -e "$EXPERIMENT_PATH" ] || [ -d "$EXPERIMENT_PATH" ] || die "cannot create $EXPERIMENT_PATH: a file of that name is in the way"
[ "$EXPERIMENT_PATH" = "/" ] || EXPERIMENT_PATH=${EXPERIMENT_PATH%/}
EVAL_PATH="${EXPERIMENT_PATH}_linear_eval"
case "$AUGMENT" in
    "") AUGMENT_ARGS=() ;;
    released|batched|auto) AUGMENT_ARGS=(--augment "$AUGMENT") ;;
    *) die "AUGMENT='$AUGMENT' is not released, batched or auto" ;;
esac
# A Slurm job given GPUs asks for cuda: a torch build that cannot see them stops at once (one line naming
# torch's and the driver's CUDA) instead of training on the CPU. A CPU job (--gres=none) keeps auto.
if [ -z "${DEVICE:-}" ]; then
    if [ -n "${SLURM_JOB_ID:-}" ] && { [ -n "${SLURM_JOB_GPUS:-}" ] || [ -n "${SLURM_STEP_GPUS:-}" ] \
        || [ "${SLURM_GPUS_ON_NODE:-0}" != 0 ]; }; then DEVICE=cuda; else DEVICE=auto; fi
fi
case "$DEVICE" in
    auto) DEVICE_ARGS=() ;;  # the scripts' default: no flag
    cuda|cpu) DEVICE_ARGS=(--device "$DEVICE") ;;
    *) die "DEVICE='$DEVICE' is not auto, cuda or cpu" ;;
esac
IFS=, read -r -a SEMISUP_PERCS <<< "$SEMISUP_LABELS"
for perc in "${SEMISUP_PERCS[@]}"; do
    case "$perc" in 1|10) ;; *) die "SEMISUP_LABELS='$SEMISUP_LABELS': use 1, 10 or 1,10 (percent of the labels)" ;; esac
done
read -r -a SEMISUP_EXTRA <<< "$SEMISUP_EXTRA_ARGS"
read -r -a EVAL_EXTRA <<< "$EVAL_EXTRA_ARGS"
WIDTH_ARGS=()  # before the evaluations' own extra flags, which win
[ -z "$WIDTH" ] || WIDTH_ARGS=(--width_per_group "$WIDTH")
PROBE=released  # eval_linear.py --probe; the last one given wins, as in argparse
for ((i = 0; i < ${#EVAL_EXTRA[@]}; i++)); do
    case "${EVAL_EXTRA[i]}" in --probe) PROBE=${EVAL_EXTRA[i + 1]:-} ;; --probe=*) PROBE=${EVAL_EXTRA[i]#*=} ;; esac
done
[ "$PROBE" != cached ] || EVAL_PATH="${EXPERIMENT_PATH}_linear_eval_cached"  # one folder per probe
EVAL_LABELS=$NUM_LABELS  # eval_linear.py --num_labels, the last one given wins
for ((i = 0; i < ${#EVAL_EXTRA[@]}; i++)); do
    case "${EVAL_EXTRA[i]}" in
        --num_labels) EVAL_LABELS=${EVAL_EXTRA[i + 1]:-} ;; --num_labels=*) EVAL_LABELS=${EVAL_EXTRA[i]#*=} ;;
    esac
done

# The number of classes of a data path, when the layout tells it without reading the data (a keyword,
# a CIFAR pickle folder, an image folder's train/<class>/ folders); nothing otherwise (python decides).
classes_of() {
    local p=$1
    case "$p" in cifar10) echo 10; return ;; cifar100) echo 100; return ;; esac
    [ -d "$p" ] || return 0
    if [ -d "$p/cifar-10-batches-py" ] && [ -d "$p/cifar-100-python" ]; then return 0; fi
    if [ -d "$p/cifar-10-batches-py" ] || [ "$(basename "$p")" = cifar-10-batches-py ] \
        || [ -f "$p/batches.meta" ] || [ -f "$p/data_batch_1" ]; then echo 10; return; fi
    if [ -d "$p/cifar-100-python" ] || [ "$(basename "$p")" = cifar-100-python ] \
        || { [ -f "$p/meta" ] && [ -f "$p/train" ]; }; then echo 100; return; fi
    if [ -d "$p/train" ] && [ -d "$p/test" ]; then
        find -L "$p/train" -mindepth 1 -maxdepth 1 -type d 2>/dev/null | wc -l
    fi
}
# Checked now, not after a pretraining of hours: an image folder without test/ can be pretrained on, not evaluated.
if [ -d "$DATASET_PATH/train" ] && [ ! -d "$DATASET_PATH/test" ] && [ ! -d "$DATASET_PATH/cifar-10-batches-py" ] \
    && [ ! -d "$DATASET_PATH/cifar-100-python" ]; then
    die "$DATASET_PATH has train/ but no test/, which the linear evaluation after pretraining needs" \
        "(pretraining alone: python main_swav_unmix.py --data_path $DATASET_PATH ...)"
fi
# Checked now, not after a pretraining of hours: the evaluation would refuse other numbers of classes.
DATA_CLASSES=$(classes_of "$DATASET_PATH")
if [ -n "$DATA_CLASSES" ] && [ "$DATA_CLASSES" != "$EVAL_LABELS" ]; then
    case "$DATA_CLASSES" in  # point to the script for the data given
        10) HINT="CIFAR-10: script_unmix_c10.sh; or " ;; 100) HINT="CIFAR-100: script_unmix_c100.sh; or " ;; *) HINT="" ;;
    esac
    die "$DATASET_PATH has $DATA_CLASSES classes, but the linear evaluation would use --num_labels $EVAL_LABELS" \
        "(${HINT}set --num_labels in EVAL_EXTRA_ARGS)"
fi

if [ -z "${PYTHON:-}" ]; then
    if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "python interpreter '$PYTHON' not found (set PYTHON)"


# ---- how to start the processes
if [ -n "${SLURM_JOB_ID:-}" ]; then
    # Slurm >= 22.05 srun no longer inherits --cpus-per-task from sbatch; pass it on explicitly.
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ] && [ -z "${SRUN_CPUS_PER_TASK:-}" ]; then
        export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    fi
    # One task per GPU as the allocation says (--ntasks-per-node x --nodes). --kill-on-bad-exit=0
    # (also where the cluster's KillOnBadExit=1): on preemption the other ranks exit with status 3
    # while rank 0 may still be writing the checkpoint or calling `scontrol requeue`. --wait ends the
    # step 10 minutes after the first task ended (a rank that crashed leaves the others blocked in a
    # collective).
    LAUNCH=(srun --kill-on-bad-exit=0 --wait=600 "$PYTHON" -u)
    WHERE="slurm job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}), ${SLURM_NTASKS:-1} task(s) on ${SLURM_JOB_NODELIST:-?}"
else
    NPROC_NOTE=
    if [ -z "${NPROC:-}" ]; then
        NPROC_NOTE=1  # chosen here from the GPUs, not asked for
        if [ -n "${CUDA_VISIBLE_DEVICES+x}" ]; then
            if [ -z "$CUDA_VISIBLE_DEVICES" ] || [ "$CUDA_VISIBLE_DEVICES" = "-1" ]; then NPROC=0
            else NPROC=$(awk -F, '{print NF}' <<< "$CUDA_VISIBLE_DEVICES"); fi
        elif command -v nvidia-smi >/dev/null 2>&1; then
            NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
        else
            NPROC=0
        fi
        [ "${NPROC:-0}" -ge 1 ] 2>/dev/null || NPROC=1
    fi
    is_uint "$NPROC" && [ "$NPROC" -ge 1 ] || die "NPROC='$NPROC' must be a positive integer"
    if [ "$NPROC" -eq 1 ]; then
        LAUNCH=("$PYTHON" -u)
    else
        LAUNCH=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC")
    fi
    WHERE="no Slurm, $NPROC process(es) on $(hostname)"
    if [ -n "$NPROC_NOTE" ] && [ "$NPROC" -gt 1 ]; then  # the released runs used one GPU (--nproc_per_node=1)
        WHERE="$WHERE ($NPROC processes, one per visible GPU: a global batch of $NPROC x $BATCH_SIZE at the same"
        WHERE="$WHERE --base_lr, not the released 1-GPU recipe (NPROC=1 runs that))"
    fi
fi

# Each step runs in the background while this shell waits for it, so that a signal reaches the shell at
# once (bash runs no trap while a foreground command runs). Under Slurm the steps' tasks get the signals
# from Slurm itself (--signal=USR1@120, scancel, the time limit); this shell only notes them. Elsewhere
# (bash, docker stop, timeout, Ctrl-C) it passes SIGTERM, SIGINT and SIGUSR1 on to the running step,
# which saves a checkpoint and stops (status 3); no step starts after a signal.
TERMINATED=0
STEP_PID=
SIGNALLED=0
on_signal() {  # $1 = signal name
    SIGNALLED=1
    [ "$1" = USR1 ] || TERMINATED=1
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        log "batch shell received SIG$1 (the python tasks handle it: preemption, requeue, cancel or time limit)"
    elif [ -n "$STEP_PID" ]; then
        log "received SIG$1: passed on to the running step, which saves a checkpoint and stops"
        kill -s "$1" "$STEP_PID" 2>/dev/null || true
    else
        log "received SIG$1"
    fi
}
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap 'on_signal USR1' USR1

run_step() {  # run "$@" in the background and return its exit status (signals pass, see above)
    local rc
    "$@" &
    STEP_PID=$!
    while :; do
        SIGNALLED=0
        wait "$STEP_PID"
        rc=$?
        [ "$SIGNALLED" -eq 1 ] || break  # wait was cut short by a signal: the step may still run
    done
    STEP_PID=
    return "$rc"
}

log "$WHERE; code in $CODE_DIR; dump $EXPERIMENT_PATH"

# Status 3 from a step: it saved and (under Slurm) requeued the job itself. Status 138 = 128 + SIGUSR1:
# the preemption warning killed a process that installs no handler (e.g. between the two steps);
# then this shell requeues the job (under Slurm) so that the rerun resumes from the last checkpoint.
stopped_early() {  # $1 = step name, $2 = status
    if [ "$2" -eq 138 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
        if scontrol requeue "$SLURM_JOB_ID"; then
            log "$1 was killed by SIGUSR1 (preemption warning); job $SLURM_JOB_ID requeued, it resumes from the last checkpoint"
        else
            log "$1 was killed by SIGUSR1 (preemption warning) and 'scontrol requeue $SLURM_JOB_ID' failed"
        fi
        return 0
    fi
    if [ "$2" -eq 3 ] || [ "$2" -eq 138 ] || { [ "$2" -ne 0 ] && [ "$TERMINATED" -eq 1 ]; }; then
        log "$1 stopped by a preemption signal or SIGTERM (status $2); the last checkpoint is kept," \
            "a requeued or repeated run resumes from it"
        return 0
    fi
    return 1
}

run_step_or_exit() {  # $1 = step name, $2 = exit status when it fails, then the command
    local name=$1 failed=$2 rc
    shift 2
    run_step "$@"
    rc=$?
    if [ "$rc" -ne 0 ] && stopped_early "$name" "$rc"; then
        exit 3
    elif [ "$rc" -ne 0 ]; then
        log "$name failed (status $rc)"
        exit "$failed"
    fi
}

PRETRAIN=(
    "${LAUNCH[@]}" "$CODE_DIR/main_swav_unmix.py"
    --arch "$ARCH"
    --hidden_mlp 512
    --data_path "$DATASET_PATH"
    --min_scale_crops 0.14
    --max_scale_crops 1.0
    --epochs "$EPOCHS"
    --batch_size "$BATCH_SIZE"
    --base_lr 0.6
    --final_lr 0.0006
    --warmup_epochs 5
    --size_crops 32
    --nmb_crops 2
    --nmb_prototypes 100
    --queue_length 120
    --epoch_queue_starts 15
    --use_fp16 True
    --freeze_prototypes_niters 5005
    --run_swav "$RUN_SWAV"
    --workers "$WORKERS"
    --temperature 0.1
    --epsilon 0.05
    --dump_path "$EXPERIMENT_PATH"
    "${AUGMENT_ARGS[@]}"
    "${DEVICE_ARGS[@]}"
    "${EXTRA[@]}"
    "$@"
)
# No mkdir here: each step creates its own folder, and removes it again when it stops before it started
# (refused: bad data, bad flag value, a folder of another kind or in use), so nothing is left behind.
log "pretraining: ${PRETRAIN[*]}"
run_step "${PRETRAIN[@]}"
rc=$?
if [ "$rc" -ne 0 ] && stopped_early pretraining "$rc"; then
    exit 3
elif [ "$rc" -ne 0 ]; then
    log "pretraining failed (status $rc); linear evaluation not started"
    exit 11
elif [ "$TERMINATED" -eq 1 ]; then
    log "stopped by a signal after pretraining ended; linear evaluation not started (rerun to evaluate)"
    exit 3
fi

EVAL=(
    "${LAUNCH[@]}" "$CODE_DIR/eval_linear.py"
    --num_labels "$NUM_LABELS"
    --crop_size 32
    --workers "$WORKERS"
    --arch "$ARCH"
    "${WIDTH_ARGS[@]}"
    --data_path "$DATASET_PATH"
    --epochs "$EVAL_EPOCHS"
    --pretrained "$EXPERIMENT_PATH/checkpoint.pth.tar"
    --dump_path "$EVAL_PATH"
    # a new pretraining checkpoint or other evaluation flags: evaluate afresh (the earlier evaluation is
    # moved to $EVAL_PATH/replaced-<time>/); the same ones: resume, or report the finished evaluation
    --allow_changed_args true
    "${DEVICE_ARGS[@]}"
    "${EVAL_EXTRA[@]}"
)
log "linear evaluation: ${EVAL[*]}"
run_step_or_exit "linear evaluation" 21 "${EVAL[@]}"
log "done: pretraining in $EXPERIMENT_PATH, linear evaluation in $EVAL_PATH (its results.json); every run side by side:" \
    "$PYTHON $CODE_DIR/tools/results.py $(dirname "$EXPERIMENT_PATH")"

# ---- optional: semi-supervised fine-tuning of the same checkpoint (eval_semisup.py, its released recipe)
for perc in "${SEMISUP_PERCS[@]}"; do
    if [ "$TERMINATED" -eq 1 ]; then
        log "stopped by a signal; semi-supervised fine-tuning not started (rerun to fine-tune)"
        exit 3
    fi
    SEMISUP_PATH="${EXPERIMENT_PATH}_semisup_${perc}pct"
    SEMISUP=(
        "${LAUNCH[@]}" "$CODE_DIR/eval_semisup.py"
        --labels_perc "$perc"
        --workers "$WORKERS"
        --arch "$ARCH"
        "${WIDTH_ARGS[@]}"
        --data_path "$DATASET_PATH"
        --pretrained "$EXPERIMENT_PATH/checkpoint.pth.tar"
        --dump_path "$SEMISUP_PATH"
        --allow_changed_args true  # as for the linear evaluation: a new checkpoint is fine-tuned afresh
        "${DEVICE_ARGS[@]}"
        "${SEMISUP_EXTRA[@]}"
    )
    log "semi-supervised fine-tuning with ${perc}% of the labels: ${SEMISUP[*]}"
    run_step_or_exit "semi-supervised fine-tuning with ${perc}% of the labels" 31 "${SEMISUP[@]}"
    log "done: semi-supervised fine-tuning in $SEMISUP_PATH (its results.json)"
done
exit 0
