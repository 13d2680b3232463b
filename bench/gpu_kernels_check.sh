#!/usr/bin/env bash
# One GPU session for the kernels: the kernel tests compiled for the GPU (the slow
# sweep included), then the decode benchmark. Logs and the table go to $1 (default
# out/); extra arguments go to bench/kernels.py (e.g. --quick). The benchmark runs
# even when a test fails; the exit status reports both.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${1:-out}
shift || true
mkdir -p "$OUT_DIR"
# Compiling the many test variants dominates: spread it over workers when pytest-xdist is there.
PARALLEL=()
if "$PY" -c "import xdist" 2>/dev/null; then PARALLEL=(-n 8); fi
status=0
"$PY" -m pytest tests/kernels -q -p no:cacheprovider "${PARALLEL[@]}" 2>&1 \
    | tee "$OUT_DIR/kernel_tests.log" || status=1
"$PY" bench/kernels.py --out "$OUT_DIR/kernels_bench.md" "$@" 2>&1 \
    | tee "$OUT_DIR/kernels_bench.log" || status=1
exit $status
