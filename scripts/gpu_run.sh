#!/usr/bin/env bash
# On a lent GPU machine (offline: torch, triton, timm, pytest preinstalled): install ghostfast, run the whole
# test suite on CUDA, the demo and whatever benchmarks exist, writing everything under one folder.
#   bash scripts/gpu_run.sh "$OUT"
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu}
mkdir -p "$OUT"
unset TRITON_INTERPRET
pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
{
  echo "sha $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  date -u +%FT%TZ
  python -m ghostfast info
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} > "$OUT/env.txt" 2>&1
python -m pytest -q -ra tests --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
echo "tests exit $?" >> "$OUT/tests.log"
python -m ghostfast demo > "$OUT/demo.log" 2>&1
if [ -d benchmarks ] && ls benchmarks/*.py > /dev/null 2>&1 && python -m ghostfast bench --help > /dev/null 2>&1; then
  python -m ghostfast bench --out "$OUT" > "$OUT/bench.log" 2>&1
fi
tail -n 3 "$OUT/tests.log"; tail -n 6 "$OUT/demo.log"
