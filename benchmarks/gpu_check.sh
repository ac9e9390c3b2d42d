#!/usr/bin/env bash
# The GPU check: one command of a few minutes, each phase under its own time limit, at most 4 files
# written to $OUT (summary.md, gpu_check.log, device.txt, runs.tar.gz).
#   (a) CUDA tests: the golden iteration on CUDA (fp32, TF32 off; plain and as the loop runs it), no host
#       sync in steady-state steps (bf16 / fp16 / fp32), mixed precision stays finite, batched
#       augmentation on CUDA equal to the CPU;
#   (b) the real training loop side by side (benchmarks/bench_train_step.py): the released pipeline
#       (PIL, 2 workers, fp16), --augment batched, and tuned settings;
#   (c) real CIFAR-10 Un-Mix epochs at full width (c10 settings), kNN monitor every epoch, tuned
#       settings; then (PROBE=1) a cached linear probe of its checkpoint;
#   (d) torch.compile: the compiled step equals the eager one and does not sync (compiling takes a while).
#   (e) the column: the 200-epoch CIFAR-10 recipe of script_unmix_c10.sh (METHOD=unmix, or swav), fast
#       settings (--augment batched, bfloat16, channels_last, --cuda_graph), kNN every 10 epochs, then the
#       released linear probe (100 epochs) with batched crops. First a self-check: 20 iterations replayed
#       from CUDA graphs against eager ones; on a mismatch the column trains eagerly and says so. The whole
#       phase keeps within COLUMN_SECONDS: the pretraining stops resumably (SIGUSR1) when its share runs out,
#       and the next call with PHASES=e continues it (its folder COLUMN_DIR is kept). Reports the stats
#       (loss, kNN, img/s, memory) and the probe's top-1 next to the published 86.8 % (SwAV: 84.9 %).
#
#   bash benchmarks/gpu_check.sh                 # phases a b c d
#   PHASES=e bash benchmarks/gpu_check.sh        # the column (fits one 10-minute command by default)
#   PHASES="a c" bash benchmarks/gpu_check.sh    # only some (e.g. rerun those that failed)
#   bash benchmarks/gpu_check.sh --dry-run       # every phase in seconds on the CPU, tiny sizes
#
# Data for (c) and (e): DATA (train/ and test/ class folders, or a CIFAR folder); when missing, the
# CIFAR-10 JPEG archive ARCHIVE is unpacked into DATA; a dry run, or one without either, uses the 400 real
# images of tests/data/cifar10_jpg_small. Golden vectors: tests/data/golden (UNMIX_GOLDEN names another copy).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-gpu_results}
PHASES=${PHASES:-"a b c d"}
DATA=${DATA:-local_data/cifar10}
ARCHIVE=${ARCHIVE:-local_data/cifar10-jpg.tar.xz}
EPOCHS_RUN=${EPOCHS_RUN:-3}          # (c): epochs trained (of a 30-epoch schedule)
TRAIN_SECONDS=${TRAIN_SECONDS:-150}  # (c): stopped (resumably, SIGUSR1) after this long
BENCH_CONFIGS=${BENCH_CONFIGS:-}     # (b): subset of bench_train_step.py's configurations
PROBE=${PROBE:-1}
METHOD=${METHOD:-unmix}              # (e): unmix or swav
COLUMN_SECONDS=${COLUMN_SECONDS:-540}  # (e): the whole phase, self-check and probe included
COLUMN_EPOCHS=${COLUMN_EPOCHS:-200}
PROBE_SECONDS=${PROBE_SECONDS:-100}  # (e): kept for the probe out of COLUMN_SECONDS
COLUMN_DIR=${COLUMN_DIR:-local_data/column_${METHOD}_c10_${COLUMN_EPOCHS}ep}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.md"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
: > "$LOG"
echo "# GPU check $(date -u +%FT%TZ)" > "$SUMMARY"

phase() {  # phase NAME SECONDS command...: run it under a time limit, log it, note its status
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${secs}s): $*" >> "$LOG"
    timeout -k 10 "$secs" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "- $name: status $rc, $((SECONDS - t0)) s" >> "$SUMMARY"
    echo "=== $name: status $rc after $((SECONDS - t0)) s" >> "$LOG"
    return $rc
}
want() { [[ " $PHASES " == *" $1 "* ]]; }

{
    nvidia-smi -L 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt" >> "$SUMMARY"

if want a; then
    echo "## (a) CUDA tests" >> "$SUMMARY"
    phase "a: CUDA tests" "${A_SECONDS:-120}" "$PY" -m pytest -v -p no:cacheprovider tests/test_cuda.py \
        tests/test_gpu_augment.py -k "(cuda or Cuda) and not compile"
    grep -E " (PASSED|FAILED|SKIPPED|ERROR)|[0-9]+ (passed|failed|skipped)" "$LOG" | sed 's/^/    /' >> "$SUMMARY"
fi

if want b; then
    echo "## (b) the training loop side by side" >> "$SUMMARY"
    if [ $DRY -eq 1 ]; then
        BENCH=(--quick --iters 2 --rounds 1 --warmup 0 --configs "released pipeline (PIL, 2 workers), fp16"
               "--augment batched, fp16")
    else
        BENCH=(--iters 50 --rounds 3 --warmup 2)
        [ -n "$BENCH_CONFIGS" ] && eval "BENCH+=(--configs $BENCH_CONFIGS)"
    fi
    phase "b: bench_train_step" 240 "$PY" benchmarks/bench_train_step.py "${BENCH[@]}" --out "$WORK/bench.md"
    cat "$WORK/bench.md" >> "$SUMMARY" 2>/dev/null
fi

prepare_data() {  # prepare_data PHASE: DATA ready, or the small fixture
    [ $DRY -eq 1 ] && DATA=tests/data/cifar10_jpg_small
    if [ $DRY -eq 0 ] && [ ! -e "$DATA/train" ] && [ -f "$ARCHIVE" ]; then
        mkdir -p "$DATA" && phase "$1: unpack $ARCHIVE" 120 tar -xJf "$ARCHIVE" -C "$DATA"
    fi
    [ -e "$DATA/train" ] || DATA=tests/data/cifar10_jpg_small
}

if want c; then
    echo "## (c) real CIFAR-10 epochs" >> "$SUMMARY"
    prepare_data c
    SIZE=()
    [ $DRY -eq 1 ] && SIZE=(--width_per_group 8 --batch_size 16) && EPOCHS_RUN=1
    RUN="$WORK/unmix_c10"
    phase "c: pretraining ($EPOCHS_RUN epochs)" $((TRAIN_SECONDS + 30)) timeout --signal=USR1 "$TRAIN_SECONDS" \
        "$PY" main_swav_unmix.py --arch resnet18 --hidden_mlp 512 --data_path "$DATA" --min_scale_crops 0.14 \
        --max_scale_crops 1.0 --epochs 30 --epochs_run_limit "$EPOCHS_RUN" --batch_size 128 --base_lr 0.6 \
        --final_lr 0.0006 --warmup_epochs 5 --size_crops 32 --nmb_crops 2 --nmb_prototypes 100 --queue_length 120 \
        --epoch_queue_starts 15 --use_fp16 True --freeze_prototypes_niters 5005 --run_swav False --workers 2 \
        --temperature 0.1 --epsilon 0.05 --knn_freq 1 --checkpoint_freq 1000 --augment batched \
        --amp_dtype bfloat16 --channels_last true --dump_path "$RUN" "${SIZE[@]}"
    grep -hE "Building data done|img/s|Epoch [0-9]+ done|Preempted|error" "$RUN/train.log" 2>/dev/null \
        | tail -n 30 >> "$SUMMARY"
    if [ "$PROBE" = 1 ]; then
        phase "c: cached linear probe" 90 "$PY" eval_linear.py --num_labels 10 --crop_size 32 --workers 2 \
            --arch resnet18 "${SIZE[@]:0:2}" --data_path "$DATA" --pretrained "$RUN/checkpoint.pth.tar" \
            --dump_path "${RUN}_linear_eval" --probe cached --epochs $([ $DRY -eq 1 ] && echo 2 || echo 20)
        grep -hiE "test accuracy" "${RUN}_linear_eval"/train.log 2>/dev/null | tail -n 2 >> "$SUMMARY"
    fi
fi
if want d; then
    echo "## (d) torch.compile" >> "$SUMMARY"
    phase "d: compiled step" "${D_SECONDS:-150}" "$PY" -m pytest -v -p no:cacheprovider tests/test_cuda.py -k compile
    grep -E "test_compile.* (PASSED|FAILED|SKIPPED|ERROR)" "$LOG" | sed 's/^/    /' >> "$SUMMARY"
fi
if want e; then
    E_START=$SECONDS
    prepare_data e
    SIZE=() KNN=10 PROBE_EPOCHS=100 TABLE_EPOCHS=$COLUMN_EPOCHS
    [ $DRY -eq 1 ] && SIZE=(--width_per_group 8 --batch_size 16) && COLUMN_EPOCHS=2 KNN=1 PROBE_EPOCHS=2 \
        && COLUMN_DIR="$WORK/column"
    echo "## (e) the ${COLUMN_EPOCHS}-epoch CIFAR-10 column ($METHOD)" >> "$SUMMARY"
    RUN_SWAV=False; [ "$METHOD" = swav ] && RUN_SWAV=True
    FAST=(--augment batched --amp_dtype bfloat16 --channels_last true)
    MODE="CUDA graphs (--cuda_graph true)"
    if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
        if phase "e: self-check, 20 iterations graph vs eager" "${CHECK_SECONDS:-120}" "$PY" -m pytest -q \
                -p no:cacheprovider tests/test_cuda.py -k "cuda_graph_replays_equal_eager and bf16"; then
            FAST+=(--cuda_graph true)
        else
            MODE="eager (the self-check failed: replayed graphs differ from eager, see the log)"
        fi
    else
        MODE="eager (no CUDA device: no self-check)"
    fi
    echo "- e: mode: $MODE" >> "$SUMMARY"
    mkdir -p "$COLUMN_DIR"
    LEFT=$((COLUMN_SECONDS - (SECONDS - E_START) - PROBE_SECONDS))
    [ $LEFT -lt 30 ] && LEFT=30
    phase "e: pretraining (up to ${LEFT}s)" $((LEFT + 60)) timeout --signal=USR1 "$LEFT" \
        "$PY" main_swav_unmix.py --arch resnet18 --hidden_mlp 512 --data_path "$DATA" --min_scale_crops 0.14 \
        --max_scale_crops 1.0 --epochs "$COLUMN_EPOCHS" --batch_size 128 --base_lr 0.6 --final_lr 0.0006 \
        --warmup_epochs 5 --size_crops 32 --nmb_crops 2 --nmb_prototypes 100 --queue_length 120 \
        --epoch_queue_starts 15 --use_fp16 True --freeze_prototypes_niters 5005 --run_swav "$RUN_SWAV" \
        --workers 2 --temperature 0.1 --epsilon 0.05 --knn_freq "$KNN" --checkpoint_freq 1000 \
        --allow_changed_args true --dump_path "$COLUMN_DIR" "${FAST[@]}" "${SIZE[@]}"
    DONE=$("$PY" -c "import pandas as pd, sys; s = pd.read_csv(sys.argv[1]); print(int(s.epoch.max()) + 1)" \
        "$COLUMN_DIR/stats0.csv" 2>/dev/null || echo 0)
    if [ "$DONE" -lt "$COLUMN_EPOCHS" ]; then
        echo "- e: trained $DONE of $COLUMN_EPOCHS epochs within this call; rerun PHASES=e to continue ($COLUMN_DIR is kept)" >> "$SUMMARY"
    fi
    PROBE_LEFT=$((COLUMN_SECONDS - (SECONDS - E_START)))
    [ $PROBE_LEFT -lt 20 ] && PROBE_LEFT=20
    if [ "$DONE" -gt 0 ]; then
        phase "e: released probe, batched crops, $PROBE_EPOCHS epochs (epoch $DONE checkpoint)" "$PROBE_LEFT" \
            "$PY" eval_linear.py --num_labels 10 --crop_size 32 --workers 2 --arch resnet18 "${SIZE[@]:0:2}" \
            --data_path "$DATA" --pretrained "$COLUMN_DIR/checkpoint.pth.tar" --dump_path "${COLUMN_DIR}_linear_eval" \
            --epochs "$PROBE_EPOCHS" --augment batched --allow_changed_args true
    fi
    "$PY" benchmarks/column_report.py "$COLUMN_DIR" --method "$METHOD" --epochs "$COLUMN_EPOCHS" \
        --published_epochs "$TABLE_EPOCHS" >> "$SUMMARY" 2>> "$LOG"
    mkdir -p "$WORK/column_$METHOD"
    (cd "$COLUMN_DIR" && find . -type f ! -name '*.pth' ! -name '*.pth.tar' ! -name run.lock -exec cp --parents {} "$WORK/column_$METHOD/" \;)
    [ -d "${COLUMN_DIR}_linear_eval" ] && cp "${COLUMN_DIR}_linear_eval"/{train.log,stats0.csv,results.json} "$WORK/column_$METHOD/" 2>/dev/null
fi
if [ -n "$(ls -A "$WORK" 2>/dev/null)" ]; then  # logs and stats of the runs, no checkpoint
    tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.pth' --exclude='*.pth.tar' --exclude='column' . 2>/dev/null
fi
echo "summary: $SUMMARY"
cat "$SUMMARY"
