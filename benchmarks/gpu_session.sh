#!/usr/bin/env bash
# Every GPU check and measurement this project still owes, as one script for a lent GPU machine
# (run from the repository root; the device tool copies the working tree there):
#   1. the CUDA tests (batched augmentation on CUDA equals the CPU result and never syncs the host);
#   2. benchmarks/bench_augment.py (released PIL pipeline with 2 workers vs batched path on the GPU);
#   3. benchmarks/bench_train_step.py (c10 configuration, fp32 / fp16 / bf16 + channels_last / compile);
#   4. a real Un-Mix run on the CIFAR-10 JPEG export at full width for as many epochs as fit in
#      TRAIN_SECONDS, with the kNN monitor every epoch, then a cached linear probe of its checkpoint.
# Results go to $OUT (the device tool's output folder) or ./gpu_results.
#
#   DATA=local_data TRAIN_SECONDS=300 EPOCHS=30 bash benchmarks/gpu_session.sh
#
# DATA must hold train/ and test/ class folders (tar -xJf ../shared/data/cifar10-jpg.tar.xz -C local_data;
# local_data/ is git-ignored: name it in the device tool's `carry`).
set -uo pipefail
OUT=${OUT:-gpu_results}
DATA=${DATA:-local_data}
TRAIN_SECONDS=${TRAIN_SECONDS:-300}
EPOCHS=${EPOCHS:-30}
mkdir -p "$OUT"
nvidia-smi -L > "$OUT/device.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))" >> "$OUT/device.txt" 2>&1

python -m pytest -q tests/test_gpu_augment.py -k cuda > "$OUT/cuda_tests.txt" 2>&1
python benchmarks/bench_augment.py --workers 2 --out "$OUT/results_augment_cuda.md" > "$OUT/bench_augment.log" 2>&1
python benchmarks/bench_train_step.py --out "$OUT/results_train_step_cuda.md" > "$OUT/bench_train_step.log" 2>&1

# The released c10 settings (script_unmix_c10.sh) at full width; a short cosine schedule of EPOCHS epochs,
# stopped after TRAIN_SECONDS if it has not finished (the checkpoint of the last full epoch stays).
RUN="$OUT/unmix_c10_gpu"
timeout --signal=USR1 "$TRAIN_SECONDS" python -u main_swav_unmix.py --arch resnet18 --hidden_mlp 512 \
    --data_path "$DATA" --min_scale_crops 0.14 --max_scale_crops 1.0 --epochs "$EPOCHS" --batch_size 128 \
    --base_lr 0.6 --final_lr 0.0006 --warmup_epochs 5 --size_crops 32 --nmb_crops 2 --nmb_prototypes 100 \
    --queue_length 120 --epoch_queue_starts 15 --use_fp16 True --freeze_prototypes_niters 5005 --run_swav False \
    --workers 2 --temperature 0.1 --epsilon 0.05 --dump_path "$RUN" --knn_freq 1 \
    --amp_dtype bfloat16 --channels_last true > "$OUT/train.log" 2>&1
echo "pretraining exit status $?" >> "$OUT/train.log"
python eval_linear.py --num_labels 10 --crop_size 32 --workers 2 --arch resnet18 --data_path "$DATA" \
    --pretrained "$RUN/checkpoint.pth.tar" --dump_path "${RUN}_linear_eval" --probe cached > "$OUT/eval.log" 2>&1
python tools/results.py "$OUT" --out "$OUT/report" > "$OUT/results_tool.log" 2>&1
rm -f "$RUN"/checkpoints/*.pth  # keep what comes back small; checkpoint.pth.tar and the stats stay
