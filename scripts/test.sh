#!/usr/bin/env bash
# One command: set up and run the test suite (fails when no test ran: pytest exits 5), then run the tests of
# numerics again under another CPU's kernels (ATEN_CPU_CAPABILITY=avx2), as CI does on every change.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
. .venv/bin/activate
python -m pytest "$@"
echo "--- the tests of numerics again, with another CPU's kernels (ATEN_CPU_CAPABILITY=avx2) ---"
# torch.compile caches kernels on disk without keying them on ATEN_CPU_CAPABILITY: a cache of its own.
inductor_cache=$(mktemp -d)
trap 'rm -rf "$inductor_cache"' EXIT
ATEN_CPU_CAPABILITY=avx2 TORCHINDUCTOR_CACHE_DIR="$inductor_cache" python -m pytest -m numerics -p no:cacheprovider "$@"
