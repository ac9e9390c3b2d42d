#!/usr/bin/env bash
# The GPU check: the first command to run on a GPU, about 6-7 minutes by estimate (not yet timed on a GPU:
# see below), whose every number is measured in this call. Each phase runs under its own limit, so the
# whole command ends within A_SECONDS + B_SECONDS + C_SECONDS + 30 s of kill grace and a few seconds of
# set-up (the device query is cut at 60 s; waiting for the data's unpacking counts in C_SECONDS): about 9
# minutes with the defaults, under a 10-minute limit per command; and a phase cut short still leaves what it measured:
# the tests that finished, the side-by-side table of the windows timed so far (bench_train_step.py stops
# a worker not set up within B_SECONDS - 55, so the others keep 40 s to be measured, ends by its own
# deadline, B_SECONDS - 15, and writes its table as soon as the timed windows are in), the real
# run's finished epochs. Writes $OUT/summary.md (appended phase by phase), gpu_check.log (with pytest's
# test durations, to size the limits), device.txt, bench.json and runs.tar.gz (logs and stats, no
# checkpoint; the side-by-side workers' logs in bench_logs/).
# Where the time goes (estimates): (a) ~1 min of CUDA tests, then ~2 min of torch.compile in its last
# three tests (they run last, so a cut loses only them, and (c) then runs a variant without --compile); (b) ~1.5-2 min until the two compiling workers
# are ready (inductor, full width, in parallel), then ~40 s of windows, profiles and the peak matmul;
# (c) ~1-1.5 min: loading 60,000 JPEGs, cuDNN's autotuning in the first iteration, the compile again
# when the picked variant compiles (from inductor's cache of (b)), 2 epochs with the kNN monitor.
#   (a) CUDA tests: tests/test_cuda.py (the golden iteration in fp32; no host sync in steady-state steps;
#       torch.compile equal to eager; CUDA-graph replays equal to eager iterations in bf16 + channels_last,
#       the real run's settings, across the prototypes' unfreezing and the queue coming into use; the
#       compiled network's replays equal to its eager iterations), the batched augmentation's CUDA cases
#       (tests/test_gpu_augment.py), the pinned checkpoint snapshot (tests/test_async_save.py).
#   (b) the real training loop side by side (benchmarks/bench_train_step.py), c10 recipe at full width,
#       bf16, channels_last, batched crops: eager, --compile, --cuda_graph, --compile --cuda_graph, each in
#       its own process, interleaved windows; ms / iteration, s / epoch (390 iterations), the GPU's busy
#       time next to the wall time, % of the bf16 matmul peak measured on this card in this call.
#   (c) a short real run: main_swav_unmix.py on CIFAR-10 (50,000 training images), c10 recipe at full
#       width, EPOCHS_RUN epochs of the 200-epoch schedule with the kNN monitor every epoch, with the
#       fastest variant of (b) whose equality tests passed in (a) (benchmarks/pick_variant.py; a compiled
#       variant also needs the bf16 + channels_last test of the compiled network; eager when none did).
#       It checks the real loop on real data and measures s / epoch with kNN and checkpoint; it is not a
#       result to set next to the published table.
#
#   bash benchmarks/gpu_check.sh                  # phases a b c
#   PHASES="a c" bash benchmarks/gpu_check.sh     # only some
#   bash benchmarks/gpu_check.sh --dry-run        # every phase in about a minute on the CPU: tiny sizes and
#                                                 # the 400-image test fixture; checks the script, not a GPU
#
# Data for (c): DATA (train/ and test/ class folders, or a CIFAR folder; default local_data/cifar10); when
# DATA/train is missing, the CIFAR-10 JPEG archive ARCHIVE (default local_data/cifar10-jpg.tar.xz, train/ and
# test/ at its top) is unpacked into DATA.unpacking, in the background while (a) and (b) run, and moved into
# DATA once complete (an unpacking cut short never passes for the data); waiting for it counts in (c)'s
# limit, at most half of it. Without either, (c) is an error; the test fixture is refused outside a dry run.
# A dry run uses the fixture unless DATA is given. Where torch sees no GPU, a run other than a dry run stops at once. Golden vectors: tests/data/golden (UNMIX_GOLDEN names another copy).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
case "${1:-}" in  # anything else than these would otherwise start the whole check
    "") ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument '$1' (the only one is --dry-run; --help shows the usage)" >&2; exit 2 ;;
esac
[ $# -gt 1 ] && { echo "error: one argument at most (--dry-run), got: $*" >&2; exit 2; }
OUT=${OUT:-gpu_results}
PHASES=${PHASES:-"a b c"}
DATA_GIVEN=${DATA:+1}
DATA=${DATA:-local_data/cifar10}
ARCHIVE=${ARCHIVE:-local_data/cifar10-jpg.tar.xz}
EPOCHS_RUN=${EPOCHS_RUN:-2}
A_SECONDS=${A_SECONDS:-200}
B_SECONDS=${B_SECONDS:-190}
C_SECONDS=${C_SECONDS:-130}
VARIANTS=${VARIANTS:-"eager compile cuda_graph compile+cuda_graph"}
PY=${PYTHON:-python3}
FIXTURE=tests/data/cifar10_jpg_small
export PYTHONUNBUFFERED=1

for p in $PHASES; do
    case $p in a|b|c) ;; *) echo "error: unknown phase '$p' in PHASES=\"$PHASES\" (phases: a b c)" >&2; exit 2;; esac
done
want() { [[ " $PHASES " == *" $1 "* ]]; }

mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.md"
WORK=$(mktemp -d)
UNPACK_PID=
trap '[ -n "$UNPACK_PID" ] && kill "$UNPACK_PID" 2>/dev/null && wait "$UNPACK_PID"; rm -rf "$WORK"' EXIT
: > "$LOG"
echo "# GPU check $(date -u +%FT%TZ)$([ $DRY -eq 1 ] && echo ' (dry run: CPU, tiny sizes, the test fixture unless DATA is given; no number here means anything)')" > "$SUMMARY"
FAILED=0

phase() {  # phase NAME SECONDS command...: run it under a time limit, log it, note its status
    local name=$1 secs=$2; shift 2
    local t0=$SECONDS
    echo "=== $name (limit ${secs}s): $*" >> "$LOG"
    timeout -k 10 "$secs" "$@" >> "$LOG" 2>&1
    local rc=$?
    echo "- $name: status $rc, $((SECONDS - t0)) s" >> "$SUMMARY"
    echo "=== $name: status $rc after $((SECONDS - t0)) s" >> "$LOG"
    [ $rc -ne 0 ] && FAILED=$((FAILED + 1))
    return $rc
}
problem() {  # a reason the check cannot be trusted: in the summary, and the exit status
    echo "- error: $*" >> "$SUMMARY"
    echo "error: $*" >&2
    FAILED=$((FAILED + 1))
}

{
    { command -v nvidia-smi > /dev/null && nvidia-smi -L 2>&1; } || echo "no nvidia-smi"
    timeout -k 5 60 "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN', torch.backends.cudnn.version()); print('CUDA device: ' + torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device')"
} > "$OUT/device.txt" 2>&1
cat "$OUT/device.txt" >> "$SUMMARY"

# ---- data for (c), checked first: a real run never falls back to the fixture
DATA_OK=0 UNPACK=0
if want c; then
    if [ $DRY -eq 1 ] && [ -z "$DATA_GIVEN" ]; then
        DATA=$FIXTURE DATA_OK=1
    elif [ $DRY -eq 0 ] && [ "$(realpath -m "$DATA")" = "$(realpath -m "$FIXTURE")" ]; then
        problem "DATA=$DATA is the test fixture (400 images): (c) needs CIFAR-10; not run"
    elif [ -e "$DATA/train" ]; then
        DATA_OK=1
    elif [ -f "$ARCHIVE" ]; then
        DATA_OK=1 UNPACK=1  # once a GPU is seen (below)
    else
        problem "no training data for (c): neither DATA=$DATA/train nor ARCHIVE=$ARCHIVE exists (put the CIFAR-10 JPEG archive at $ARCHIVE, or set DATA); not run"
    fi
fi
# without a GPU every phase would run on the CPU for its whole limit (the tests all skipped, the loop at
# full width): stop now, in seconds rather than minutes
if [ $DRY -eq 0 ] && ! grep -q "^CUDA device: " "$OUT/device.txt"; then
    problem "torch sees no CUDA device (see device.txt); nothing run (on the CPU: --dry-run)"
    echo "- problems: $FAILED" >> "$SUMMARY"
    cat "$SUMMARY"
    exit 1
fi
if [ $UNPACK -eq 1 ]; then  # tar itself in the background: the exit trap stops it, not a shell around it
    rm -rf "$DATA.unpacking" && mkdir -p "$DATA.unpacking"
    tar -xJf "$ARCHIVE" -C "$DATA.unpacking" >> "$LOG" 2>&1 &
    UNPACK_PID=$!
fi

if want a; then
    echo "## (a) CUDA tests" >> "$SUMMARY"
    phase "a: CUDA tests" "$A_SECONDS" "$PY" -m pytest -v -p no:cacheprovider --durations=0 --durations-min=2 \
        tests/test_gpu_augment.py tests/test_async_save.py tests/test_cuda.py -k "(cuda or Cuda) and not semisup"
    grep -E "::.* (PASSED|FAILED|SKIPPED|ERROR)|[0-9]+ (passed|failed|skipped)" "$LOG" | sed 's/^/    /' >> "$SUMMARY"
fi

if want b; then
    echo "## (b) the training loop side by side" >> "$SUMMARY"
    if [ $DRY -eq 1 ]; then
        BENCH=(--quick --iters 2 --rounds 1 --warmup 0 --configs eager)
    else
        read -r -a NAMES <<< "$VARIANTS"
        BENCH=(--iters 50 --rounds 3 --warmup 2 --configs "${NAMES[@]}")
    fi
    phase "b: bench_train_step" "$B_SECONDS" "$PY" benchmarks/bench_train_step.py "${BENCH[@]}" \
        --ready_s $((B_SECONDS - 55)) --deadline_s $((B_SECONDS - 15)) --log_dir "$WORK/bench_logs" --out "$WORK/bench.md" --json "$OUT/bench.json"
    cat "$WORK/bench.md" >> "$SUMMARY" 2>/dev/null
fi

if want c && [ $DATA_OK -eq 1 ]; then
    echo "## (c) a short real run" >> "$SUMMARY"
    C_LIMIT=$C_SECONDS
    if [ -n "$UNPACK_PID" ]; then  # the wait counts in (c)'s limit, at most half of it
        t0=$SECONDS
        while kill -0 "$UNPACK_PID" 2>/dev/null && [ $((SECONDS - t0)) -lt $((C_SECONDS / 2)) ]; do sleep 1; done
        kill "$UNPACK_PID" 2>/dev/null
        wait "$UNPACK_PID"
        rc=$?
        UNPACK_PID=
        C_LIMIT=$((C_SECONDS - (SECONDS - t0)))
        echo "- c: unpacking $ARCHIVE: tar's status $rc, $((SECONDS - t0)) s waited" >> "$SUMMARY"
        if [ $rc -ne 0 ]; then
            problem "unpacking $ARCHIVE stopped with status $rc (not done within $((C_SECONDS / 2)) s, or see the log): (c) not run; unpack it beforehand (mkdir -p $DATA && tar -xJf $ARCHIVE -C $DATA)"
        elif [ ! -d "$DATA.unpacking/train" ]; then
            problem "$ARCHIVE has no train/ at its top (see $DATA.unpacking): (c) not run"
        elif ! { mkdir -p "$DATA" && mv "$DATA.unpacking"/* "$DATA"/ && rmdir "$DATA.unpacking"; } >> "$LOG" 2>&1; then
            problem "moving the unpacked data from $DATA.unpacking into $DATA failed (see the log): (c) not run"
        fi
    fi
    VARIANT=
    IFS=$'\t' read -r VARIANT FLAGS WHY < <("$PY" benchmarks/pick_variant.py "$OUT/bench.json" "$LOG" 2>> "$LOG")
    if [ -n "$VARIANT" ]; then
        echo "- c: variant $VARIANT ($FLAGS): $WHY" >> "$SUMMARY"
    else  # without its flags the run would silently be the released pipeline in float16
        problem "benchmarks/pick_variant.py named no variant (see the log): (c) not run"
    fi
    SIZE=() SCHEDULE=200
    [ $DRY -eq 1 ] && SIZE=(--width_per_group 8 --batch_size 16) EPOCHS_RUN=1
    RUN="$WORK/unmix_c10"
    read -r -a FLAG_ARRAY <<< "$FLAGS"
    if [ -e "$DATA/train" ] && [ -n "$VARIANT" ]; then
        phase "c: pretraining ($EPOCHS_RUN epoch(s) of $SCHEDULE)" "$C_LIMIT" timeout --preserve-status --signal=USR1 $((C_LIMIT - 20)) \
            "$PY" main_swav_unmix.py --arch resnet18 --hidden_mlp 512 --data_path "$DATA" --min_scale_crops 0.14 \
            --max_scale_crops 1.0 --epochs $SCHEDULE --epochs_run_limit "$EPOCHS_RUN" --batch_size 128 --base_lr 0.6 \
            --final_lr 0.0006 --warmup_epochs 5 --size_crops 32 --nmb_crops 2 --nmb_prototypes 100 \
            --queue_length 120 --epoch_queue_starts 15 --use_fp16 True --freeze_prototypes_niters 5005 \
            --run_swav False --workers 2 --temperature 0.1 --epsilon 0.05 --knn_freq 1 --checkpoint_freq 1000 \
            --dump_path "$RUN" "${FLAG_ARRAY[@]}" "${SIZE[@]}"
        if [ $? -eq 3 ]; then  # the run's own stop at the limit, not a failure: phase counted it as one
            FAILED=$((FAILED - 1))
            echo "- c: status 3: stopped at its time limit ($((C_LIMIT - 20)) s, SIGUSR1) after saving a checkpoint, as planned; the epochs that finished are below" >> "$SUMMARY"
        fi
        "$PY" benchmarks/real_run_report.py "$RUN" --schedule $SCHEDULE $([ $DRY -eq 1 ] && echo --dry_run) \
            >> "$SUMMARY" 2>> "$LOG" || FAILED=$((FAILED + 1))
    fi
fi
if [ -n "$(ls -A "$WORK" 2>/dev/null)" ]; then
    tar -czf "$OUT/runs.tar.gz" -C "$WORK" --exclude='*.pth' --exclude='*.pth.tar' --exclude='*.lock' . 2>/dev/null
fi
echo "- problems: $FAILED" >> "$SUMMARY"
echo "summary: $SUMMARY"
cat "$SUMMARY"
[ $FAILED -eq 0 ]
