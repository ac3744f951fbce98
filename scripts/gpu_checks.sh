#!/usr/bin/env bash
# The GPU checks as one command, on an H100/H200 (at most about 10 minutes):
#   the GPU benchmark targets first (ResNet-50 224 px batch 64 bf16 <= 0.14 ms per image and step; CIFAR
#   ResNet-18 32 px batch 512 bf16 <= 0.009 ms), then the CUDA tests (fast path, compile + CUDA graphs with
#   and without early stopping, bf16 and 16-mixed). Results go to $OUT; summary.txt has the verdicts.
# Uses the machine's own python3 (torch, lightning, torchmetrics there); the package from this checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_checks}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi -L | tee "$OUT/device.txt"
$PY -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/device.txt"
timeout 200 $PY benchmarks/speed.py --model resnet50 --num-classes 1000 --size 224 --batch 64 \
    --precision bf16-mixed --rounds 5 --steps 10 --target-ms 0.14 --out "$OUT/resnet50_224_b64_bf16.json" \
    2>&1 | tee "$OUT/resnet50.log"
timeout 150 $PY benchmarks/speed.py --model cifar_resnet18 --size 32 --batch 512 \
    --precision bf16-mixed --rounds 5 --steps 10 --target-ms 0.009 --out "$OUT/cifar_resnet18_32_b512_bf16.json" \
    2>&1 | tee "$OUT/cifar.log"
timeout 230 $PY -m pytest -q -p no:cacheprovider tests/fastcopy/test_copies.py tests/maths/test_optimize.py 2>&1 | tail -n 15 | tee "$OUT/tests.log"
{ cat "$OUT/device.txt"; grep -h "^target" "$OUT/resnet50.log" "$OUT/cifar.log"; tail -n 1 "$OUT/tests.log"; } \
    | tee "$OUT/summary.txt"
