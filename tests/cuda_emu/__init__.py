"""The CUDA emulation harness of tests/test_cuda_emulation.py (README in build.py and harness.py)."""
