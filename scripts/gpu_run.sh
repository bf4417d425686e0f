#!/usr/bin/env bash
# On a lent GPU machine (offline: torch, triton, timm, pytest preinstalled): install ghostfast, run the whole
# test suite on CUDA, the demo and the benchmarks, writing everything under one folder.
#   bash scripts/gpu_run.sh OUT [STAGE...]     stages: tests demo bench (default: all three)
# One device command may run 10 minutes at most: run the stages in separate calls if together they take longer
# (e.g. `bash scripts/gpu_run.sh $OUT tests`, then `bash scripts/gpu_run.sh $OUT demo bench`). The device gets the
# work tree without .git: pass the commit as GHOSTFAST_GIT_SHA=<sha> so results record it.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-out/gpu}
shift || true
STAGES=${*:-tests demo bench}
mkdir -p "$OUT"
unset TRITON_INTERPRET
# The editable install compiles ghostfast._C with its CUDA kernels (nvcc, sm_90 from the visible GPU); ~2 min.
python -c "import ghostfast.kernels, ghostfast._C" 2>/dev/null ||
  GHOSTFAST_CUDA=${GHOSTFAST_CUDA:-1} pip install --no-build-isolation --no-deps -e . > "$OUT/install.log" 2>&1 ||
  { tail -n 60 "$OUT/install.log"; exit 1; }
{
  echo "sha ${GHOSTFAST_GIT_SHA:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
  date -u +%FT%TZ
  python -m ghostfast info
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
} > "$OUT/env.txt" 2>&1
for stage in $STAGES; do
  case "$stage" in
    tests)
      python -m pytest -q -ra tests --durations=20 --junitxml="$OUT/tests.xml" > "$OUT/tests.log" 2>&1
      echo "tests exit $?" >> "$OUT/tests.log"
      tail -n 5 "$OUT/tests.log" ;;
    demo)
      python -m ghostfast demo > "$OUT/demo.log" 2>&1
      tail -n 6 "$OUT/demo.log" ;;
    bench)
      python -m ghostfast bench --out "$OUT" > "$OUT/bench.log" 2>&1
      tail -n 5 "$OUT/bench.log" ;;
    *) echo "unknown stage $stage (tests, demo, bench)"; exit 2 ;;
  esac
done
