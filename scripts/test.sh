#!/usr/bin/env bash
# One command: set up and run the test suite (fails when no test ran: pytest exits 5), then run the tests of
# numerics (pytest mark `numerics`) twice more under other CPUs' kernels, as CI does on every change: AVX2 and SSE4.1
# kernels of ATen, oneDNN and MKL together (each library picks its kernels by the CPU; these variables cap them).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
. .venv/bin/activate
# The report's browser tests (pytest mark `browser`) drive Debian's chromium through playwright (no browser download).
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "--- installing Debian's chromium for the browser tests ---"
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null \
            || echo "note: could not install chromium; the browser tests will skip"
    else
        echo "note: no chromium (as root: apt-get install chromium); the browser tests will skip"
    fi
fi
python -m pytest "$@"
# torch.compile caches kernels on disk without keying them on the CPU's kernels: a cache of its own per run.
caches=$(mktemp -d)
trap 'rm -rf "$caches"' EXIT
echo "--- the tests of numerics again, with AVX2 kernels (ATen, oneDNN, MKL) ---"
ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 TORCHINDUCTOR_CACHE_DIR="$caches/avx2" \
    python -m pytest -m numerics -p no:cacheprovider "$@"
echo "--- the tests of numerics again, with SSE4.1 kernels (ATen's default, oneDNN, MKL) ---"
ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2 \
    TORCHINDUCTOR_CACHE_DIR="$caches/sse41" python -m pytest -m numerics -p no:cacheprovider "$@"
