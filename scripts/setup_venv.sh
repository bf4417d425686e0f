#!/usr/bin/env bash
# Creates ./.venv with what the demo and the tests need, then installs ghostfast into it (editable).
# Reuses an importable torch (e.g. the GPU image's, which has no package registry); otherwise installs
# torch==2.14.1 and torchvision==0.29.1. GHOSTFAST_BENCH=1 (or the argument --bench) also installs the benchmarks'
# optional matplotlib (plots), tqdm (progress bar) and pytest-benchmark; without a registry they are skipped, and the benchmarks
# run without them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
pipi() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
"$VPY" -c "import torch" 2>/dev/null || pipi torch==2.14.1 torchvision==0.29.1
"$VPY" -c "import setuptools, wheel" 2>/dev/null || pipi "setuptools>=64" wheel
for mod in timm pytest; do
  "$VPY" -c "import $mod" 2>/dev/null || pipi "$mod"
done
if [ "${GHOSTFAST_BENCH:-0}" = "1" ] || [ "${1:-}" = "--bench" ]; then
  for pkg in matplotlib tqdm pytest-benchmark; do
    "$VPY" -c "import ${pkg//-/_}" 2>/dev/null || pipi "$pkg" || echo "note: could not install $pkg; benchmarks run without it"
  done
fi
"$VPY" -c "import ghostfast.kernels" 2>/dev/null || pipi --no-build-isolation --no-deps -e .
"$VPY" -c "import ghostfast, torch; print('ghostfast', ghostfast.__version__, 'torch', torch.__version__)"
