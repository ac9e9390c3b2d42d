#!/usr/bin/env bash
# The GPU check: one command, every phase under its own time limit, at most 4 files written to $OUT.
#   (a) CUDA tests: golden iteration on CUDA (fp32, TF32 off), batched augmentation on CUDA equal to CPU,
#       no host sync in a steady-state step, torch.compile equal to eager, mixed precision stays finite;
#   (b) throughput side by side: augmentation (released PIL pipeline, 2 workers, vs batched on the GPU)
#       and the c10 training step (fp32 / fp16 / bf16 + channels_last / compile);
#   (c) real CIFAR-10 Un-Mix epochs at full width (c10 settings), kNN monitor every epoch: the batched
#       augmentation with bf16 + channels_last, then the released pipeline for comparison, then a cached
#       linear probe of the first run's checkpoint.
#
#   bash benchmarks/gpu_check.sh                 # all phases
#   PHASES="a c" bash benchmarks/gpu_check.sh    # only some
#   bash benchmarks/gpu_check.sh --dry-run       # every phase in seconds on the CPU (tiny sizes)
#
# Data for (c): DATA (train/ and test/ class folders); when it is missing, the CIFAR-10 JPEG archive
# ARCHIVE (default local_data/cifar10-jpg.tar.xz) is unpacked into DATA; with --dry-run and no archive,
# the small real-image set tests/data/cifar10_jpg_small is used. Golden vectors: tests/data/golden
# (UNMIX_GOLDEN names another copy).
# Output ($OUT, default gpu_results/): summary.md, gpu_check.log, device.txt, runs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
OUT=${OUT:-gpu_results}
PHASES=${PHASES:-"a b c"}
DATA=${DATA:-local_data/cifar10}
ARCHIVE=${ARCHIVE:-local_data/cifar10-jpg.tar.xz}
TRAIN_SECONDS=${TRAIN_SECONDS:-120}
RELEASED_SECONDS=${RELEASED_SECONDS:-60}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.md"
WORK=$(mktemp -d)
: > "$LOG"
echo "# GPU check $(date -u +%FT%TZ)" > "$SUMMARY"

phase() {  # phase NAME SECONDS command...: run under timeout, log, note the status in the summary
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

if [ "$DRY" -eq 1 ]; then
    QUICK=--quick; WIDTH=(--width_per_group 8); EPOCHS=2; TRAIN_SECONDS=40; RELEASED_SECONDS=25
else
    QUICK=; WIDTH=(); EPOCHS=${EPOCHS:-30}
fi

if want a; then
    echo "## (a) CUDA tests" >> "$SUMMARY"
    phase "a: tests/test_cuda.py" 240 "$PY" -m pytest -q -rA tests/test_cuda.py
    grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed" "$LOG" | tail -n 20 | sed 's/^/    /' >> "$SUMMARY"
    phase "a: batched augmentation on CUDA" 120 "$PY" -m pytest -q tests/test_gpu_augment.py -k cuda
fi

if want b; then
    echo "## (b) throughput" >> "$SUMMARY"
    if [ "$DRY" -eq 1 ]; then
        phase "b: augmentation" 120 "$PY" benchmarks/bench_augment.py --quick --out "$WORK/aug.md"
        phase "b: training step" 120 "$PY" benchmarks/bench_train_step.py --quick --out "$WORK/step.md"
    else
        phase "b: augmentation" 120 "$PY" benchmarks/bench_augment.py --workers 2 --repeats 3 --out "$WORK/aug.md"
        phase "b: training step" 200 "$PY" benchmarks/bench_train_step.py --repeats 15 --warmup 5 --out "$WORK/step.md"
    fi
    cat "$WORK/aug.md" "$WORK/step.md" >> "$SUMMARY" 2>/dev/null
fi

if want c; then
    echo "## (c) real CIFAR-10 epochs" >> "$SUMMARY"
    if [ ! -d "$DATA/train" ]; then
        if [ "$DRY" -eq 1 ] && [ ! -f "$ARCHIVE" ]; then
            DATA=tests/data/cifar10_jpg_small
        else
            mkdir -p "$DATA" && phase "c: unpack $ARCHIVE" 120 tar -xJf "$ARCHIVE" -C "$DATA"
        fi
    fi
    C10=(--arch resnet18 --hidden_mlp 512 --data_path "$DATA" --min_scale_crops 0.14 --max_scale_crops 1.0
         --epochs "$EPOCHS" --batch_size 128 --base_lr 0.6 --final_lr 0.0006 --warmup_epochs 5 --size_crops 32
         --nmb_crops 2 --nmb_prototypes 100 --queue_length 120 --epoch_queue_starts 15 --use_fp16 True
         --freeze_prototypes_niters 5005 --run_swav False --temperature 0.1 --epsilon 0.05 --knn_freq 1
         --checkpoint_freq 1000 "${WIDTH[@]}")
    # Stopped by SIGUSR1 (the preemption path: checkpoint, exit 3) when the time is up.
    phase "c: batched bf16 channels_last" $((TRAIN_SECONDS + 60)) timeout --signal=USR1 "$TRAIN_SECONDS" \
        "$PY" main_swav_unmix.py "${C10[@]}" --workers 2 --augment batched --amp_dtype bfloat16 \
        --channels_last true --dump_path "$WORK/batched"
    phase "c: released pipeline, fp16" $((RELEASED_SECONDS + 60)) timeout --signal=USR1 "$RELEASED_SECONDS" \
        "$PY" main_swav_unmix.py "${C10[@]}" --workers 2 --augment released --dump_path "$WORK/released"
    phase "c: cached linear probe" 120 "$PY" eval_linear.py --num_labels 10 --crop_size 32 --workers 2 \
        --arch resnet18 "${WIDTH[@]}" --data_path "$DATA" --pretrained "$WORK/batched/checkpoint.pth.tar" \
        --dump_path "$WORK/batched_linear_eval" --probe cached --epochs 20
    for run in batched released; do
        echo "### $run" >> "$SUMMARY"
        grep -hE "Building data done|Epoch [0-9]+ done|kNN monitor|Preempted|error" \
            "$WORK/$run/train.log" "$WORK/$run"/*.log 2>/dev/null | sort -u | tail -n 40 >> "$SUMMARY"
    done
    echo "### cached linear probe" >> "$SUMMARY"
    grep -hiE "top-1|acc" "$WORK/batched_linear_eval"/*.log 2>/dev/null | tail -n 5 >> "$SUMMARY"
    tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.pth' --exclude='*.pth.tar' . 2>/dev/null
fi
rm -rf "$WORK"
echo "summary: $SUMMARY"
cat "$SUMMARY"
