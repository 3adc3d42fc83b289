#!/usr/bin/env bash
# The GPU check of issues 13 (and the owed GPU figures of the train-step benchmark), as one prepared script for a
# lent GPU machine: the training-step, memory and compile benchmarks with bf16 and channels_last, results written
# to benchmarks/results/*_gpu.{json,md} (or $OUT). Sized for under 8 minutes of device time on one H200; each
# step has its own time limit so that a slow one cannot eat the others' time. Run from anywhere:
#
#     bash benchmarks/gpu_check.sh            # then commit benchmarks/results/*_gpu.*
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -c 'import torch, timm; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, timm.__version__)'
# training step and peak memory of every variant (sd_resnet110_cifar b128 and sd_resnet152 b64, 224 px)
timeout 150 python -m benchmarks.train_step --device cuda --bf16 --channels-last --imagenet-batch 64 --tag gpu \
    --out "$OUT"
# compiled: constant depth, block (eager blocks / regions), per-sample mask; warm-up from a cold inductor cache
timeout 270 python -m benchmarks.compile --device cuda --bf16 --channels-last --tag gpu --reps 15 \
    --config sd_resnet110_cifar:128 --out "$OUT"
python -m benchmarks.report --tag gpu --out "$OUT"
ls -l "$OUT"/*_gpu.*
