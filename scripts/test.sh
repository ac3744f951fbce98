#!/usr/bin/env bash
# One command: set up and run the test suite (fails when no test ran: pytest exits 5).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
. .venv/bin/activate
python -m pytest "$@"
