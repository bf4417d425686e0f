# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# `make bench` (quick, < 5 min on 2 CPU cores) and `make bench-full`: benchmarks -> benchmarks/results/<device>/.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test info venv bench-venv bench bench-full bench-peers bench-peers-quick conversion-report test-slow-interpreter test-torch211 test-torch211-all aot-sm90 cuda-emu-full cuda-resource-usage

venv:
	bash scripts/setup_venv.sh

demo: venv
	$(PY) -m ghostfast demo

info: venv
	$(PY) -m ghostfast info

# Triton runs under its CPU interpreter when no GPU is present (tests/conftest.py sets TRITON_INTERPRET).
test: venv
	$(PY) -m pytest -q -ra tests
	$(MAKE) --no-print-directory test-torch211

# The GPU image's versions (torch 2.11.0, its CUDA 13.0 build; triton 3.6.0), scripts/test_torch211.sh: a second venv
# .venv-torch211, ghostfast._C built against it (CPU kernels; the tests run on the CPU), about a fifth of the tests
# (every file and backend); the whole leg capped at 20 min. test-torch211-all: ghostfast._C with the CUDA kernels
# too (nvcc against torch 2.11's headers, as on the GPU image), the whole suite, benchmarks/results/torch211/.
# The whole-model Triton training tests that make test skips under the interpreter (~45-60 min here).
test-slow-interpreter: venv
	GHOSTFAST_SLOW_INTERPRETER=1 $(PY) -m pytest -q -ra tests/test_training.py -k triton

test-torch211:
	TORCH211_CUDA=0 bash scripts/test_torch211.sh ci

test-torch211-all:
	bash scripts/test_torch211.sh all

# The benchmarks also use matplotlib (plots) and tqdm (progress bar) when they can be installed; they run without.
bench-venv:
	GHOSTFAST_BENCH=1 bash scripts/setup_venv.sh

bench: bench-venv
	$(PY) -m ghostfast bench --quick

# ghostfast vs torch.compile, ONNX Runtime, OpenVINO on this CPU (interleaved worker processes, 2 threads):
# benchmarks/results/cpu-2core/peers.{csv,md,png}; ~25 min on a quiet 2-core machine. bench-peers-quick: batch 1 only.
bench-peers: bench-venv
	$(PY) -m benchmarks.peers

bench-peers-quick: bench-venv
	$(PY) -m benchmarks.peers --quick --out out/peers-quick

# Per source model (timm V1/V2/V3, Huawei V3, the paper, ultralytics, Ghost-ResNet): Ghost modules converted / seen
# and the end-to-end error vs eager -> benchmarks/results/cpu-2core/conversion.{csv,md} (~1 min).
conversion-report: venv
	$(PY) scripts/conversion_report.py

bench-full: bench-venv
	$(PY) -m ghostfast bench

# The CUDA kernels executed on the CPU (tests/test_cuda_emulation.py, part of `make test`) with every case under all
# three thread / block orders instead of one.
cuda-emu-full: venv
	GHOSTFAST_EMU_FULL=1 $(PY) -m pytest -q -ra tests/test_cuda_emulation.py

# Registers, spills and shared memory of every CUDA kernel for sm_90 (nvcc + cuobjdump, no GPU) ->
# benchmarks/results/sm90-static/cuda_resource_usage.txt
cuda-resource-usage: venv
	bash scripts/cuda_resource_usage.sh

# Every Triton kernel variant the launch wrappers pick for GhostNet's shapes, compiled for sm_90 without a GPU
# (registers, spills, shared memory): benchmarks/results/sm90-static/triton_sm90.csv and README.md. ~30 CPU-minutes;
# CI compiles a subset (tests/test_aot_sm90.py). AOT_JOBS=2 compiles in two processes.
AOT_JOBS ?= 1
aot-sm90: venv
	nice $(PY) scripts/aot_sm90.py --jobs $(AOT_JOBS)

# The GPU lease's one command (scripts/gpu_run.sh) run here as a dry run: CPU backends, two test files, the sanitizer
# cases without compute-sanitizer, a one-case bench -> out/gpu-dry/summary.txt and logs.tar.gz (~3 min on 2 cores)
.PHONY: gpu-run-dry
gpu-run-dry:
	GPU_RUN_DRY=1 PYTHON=$(PY) nice bash scripts/gpu_run.sh out/gpu-dry
