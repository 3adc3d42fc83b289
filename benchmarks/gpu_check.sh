#!/usr/bin/env bash
# The GPU check of issues 13 (and the owed GPU figures of the train-step benchmark), as one prepared script for a
# lent GPU machine: the training-step, memory and compile benchmarks with bf16 and channels_last, results written
# to benchmarks/results/*_gpu.{json,md} (or $OUT). Sized for under 8 minutes of device time on one H100 or H200;
# each step has its own time limit so that a slow one cannot eat the others' time. Run from anywhere:
#
#     bash benchmarks/gpu_check.sh              # then commit benchmarks/results/*_gpu.*
#     bash benchmarks/gpu_check.sh --cpu-smoke  # the same steps on the CPU at small sizes, into a temporary
#                                               # folder (or $OUT): checks the script before device time is spent
set -euo pipefail
cd "$(dirname "$0")/.."
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-$(nproc)}
case "${1:-}" in
    '')
        OUT=${OUT:-benchmarks/results}
        DEVICE=cuda TAG=gpu CONFIG=sd_resnet110_cifar:128 REPS=15 STEP_LIMIT=150 COMPILE_LIMIT=270
        SIZES=(--imagenet-batch 64)  # sd_resnet110_cifar b128 and sd_resnet152 b64, 224 px
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
        ;;
    --cpu-smoke)  # a temporary folder unless $OUT says otherwise, and its own tag: these are no GPU figures
        OUT=${OUT:-$(mktemp -d)}
        DEVICE=cpu TAG=cpu_smoke CONFIG=sd_resnet20_cifar:8 REPS=2 STEP_LIMIT=300 COMPILE_LIMIT=600
        SIZES=(--quick)
        ;;
    *)
        echo "usage: bash benchmarks/gpu_check.sh [--cpu-smoke]  (got: $*)" >&2
        exit 2
        ;;
esac
python - "$DEVICE" <<'EOF'
import sys, torch, timm
if sys.argv[1] == 'cuda' and not torch.cuda.is_available():
    sys.exit('no CUDA device: run this on a GPU machine, or check the script on the CPU with --cpu-smoke')
print(torch.__version__, timm.__version__)
EOF
# training step and peak memory of every variant
timeout "$STEP_LIMIT" python -m benchmarks.train_step --device "$DEVICE" --bf16 --channels-last "${SIZES[@]}" \
    --tag "$TAG" --out "$OUT"
# compiled: constant depth, block (eager blocks / regions), per-sample mask; warm-up from a cold inductor cache
timeout "$COMPILE_LIMIT" python -m benchmarks.compile --device "$DEVICE" --bf16 --channels-last --tag "$TAG" \
    --reps "$REPS" --config "$CONFIG" --out "$OUT"
python -m benchmarks.report --tag "$TAG" --out "$OUT"
ls -l "$OUT"/*_"$TAG".*
