#!/usr/bin/env bash
# One command: set up and explain the built-in demo photos for EfficientNet-Lite0 (CPU or GPU).
# Extra arguments go to `neuromask-pl predict`, e.g. --trainer.accelerator gpu --trainer.precision bf16-mixed
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh demo
. .venv/bin/activate
neuromask-pl predict --config configs/demo.yaml "$@"
