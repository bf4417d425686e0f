#!/usr/bin/env bash
# Creates ./.venv with what the demo and the tests need, then installs ghostfast into it (editable).
# Reuses an importable torch (e.g. the GPU image's, which has no package registry); otherwise installs
# torch==2.14.1 and torchvision==0.29.1. GHOSTFAST_BENCH=1 (or the argument --bench) also installs the benchmarks'
# optional matplotlib (plots), tqdm (progress bar), pytest-benchmark and openvino; without a registry they are skipped, and the benchmarks
# run without them.
# Other versions (scripts/test_torch211.sh, the GPU image's torch 2.11 / triton 3.6): GHOSTFAST_TORCH_PKGS="torch==X ..."
# installs those instead (another version already in the venv is replaced; no system site packages), and
# GHOSTFAST_EXTRA_PKGS="numpy<2.4 ..." adds pins.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_PKGS=${GHOSTFAST_TORCH_PKGS:-}
if [ ! -x "$VENV/bin/python" ]; then
  if [ -z "$TORCH_PKGS" ] && "$PY" -c "import torch" 2>/dev/null; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
export PATH="$(cd "$VENV/bin" && pwd):$PATH"  # a pip-installed ninja lives there
pipi() { "$VPY" -m pip install --disable-pip-version-check -q "$@"; }
if [ -n "$TORCH_PKGS" ]; then
  # shellcheck disable=SC2086  # the specs are words; pip keeps what already satisfies them
  pipi $TORCH_PKGS ${GHOSTFAST_EXTRA_PKGS:-}
else
  "$VPY" -c "import torch" 2>/dev/null || pipi torch==2.14.1 torchvision==0.29.1
fi
"$VPY" -c "import setuptools, wheel" 2>/dev/null || pipi "setuptools>=64" wheel
# ninja compiles the extension's sources in parallel (torch.utils.cpp_extension); without it the build is serial.
command -v ninja >/dev/null || "$VPY" -c "import ninja" 2>/dev/null || pipi ninja || echo "note: no ninja; building serially"
for mod in timm pytest; do
  "$VPY" -c "import $mod" 2>/dev/null || pipi "$mod"
done
# tests/test_deploy.py's ONNX export tests: onnx and onnxscript (the exporters), onnxruntime (runs the graphs). About
# 10 s from a registry; without one (the GPU image) they are a note and those tests skip.
for mod in onnx onnxscript onnxruntime; do
  "$VPY" -c "import $mod" 2>/dev/null || pipi "$mod" || echo "note: could not install $mod; the ONNX tests skip"
done
if [ "${GHOSTFAST_BENCH:-0}" = "1" ] || [ "${1:-}" = "--bench" ]; then
  # openvino: benchmarks/peers.py's OpenVINO rows (onnxruntime is installed above)
  for pkg in matplotlib tqdm pytest-benchmark openvino; do
    "$VPY" -c "import ${pkg//-/_}" 2>/dev/null || pipi "$pkg" || echo "note: could not install $pkg; benchmarks run without it"
  done
fi
# Editable install; it compiles ghostfast._C (csrc/: C++ CPU kernels, and CUDA kernels where nvcc and a CUDA torch
# exist). Rebuilt when the extension is missing; `pip install --no-build-isolation --no-deps -e .` rebuilds it by hand.
if [ "${GHOSTFAST_BUILD_C:-1}" = "0" ]; then
  "$VPY" -c "import ghostfast.kernels" 2>/dev/null || pipi --no-build-isolation --no-deps -e .
else
  "$VPY" -c "import ghostfast.kernels, ghostfast._C" 2>/dev/null || pipi --no-build-isolation --no-deps -e .
fi
"$VPY" -c "import ghostfast, torch; print('ghostfast', ghostfast.__version__, 'torch', torch.__version__, 'backends', ghostfast.available_backends())"
