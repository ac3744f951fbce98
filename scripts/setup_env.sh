#!/usr/bin/env bash
# Create (or reuse) ./.venv and install neuromask-pl with the given extra ("demo" or "test").
# TORCH_SPEC overrides the torch pin (default: torch==2.14.1 torchvision==0.29.1).
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-demo}"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet ${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}
python -m pip install --quiet -e ".[${extra}]"
