"""Test set-up: Triton runs under its CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before any kernel module is imported, so it is decided here, at collection."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Eager float32 convolutions on a GPU default to TF32 (torch.backends.cudnn.allow_tf32), ~1e-3 relative error:
# the eager modules the kernels are compared with must compute in IEEE float32, as the kernels do by default.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture
def device():
    return DEVICE


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fresh_fallback_warnings():
    """The fallback warning is one-time per reason and process; each test sees it as a new process would."""
    import ghostfast.backends

    ghostfast.backends._warned.clear()
    yield


# ---- the kernel tests run once per fused backend of the device (tests/kernel_backends.py) -----------------

def pytest_configure(config):
    config.addinivalue_line("markers", "triton_only: a test of the Triton kernels' own launch plumbing (tiles, "
                                       "grid, strided out buffers), not of the op's results")


def pytest_generate_tests(metafunc):
    if "kernel_backend" in metafunc.fixturenames:
        import kernel_backends

        names = ["triton"] if metafunc.definition.get_closest_marker("triton_only") else kernel_backends.NAMES
        metafunc.parametrize("kernel_backend", names, indirect=True)


@pytest.fixture
def kernel_backend(request):
    import kernel_backends

    with kernel_backends.active(getattr(request, "param", "triton")) as name:
        yield name


# Time-boxed runs (the GPU lease): per-test cap, global budget, shards; inert unless its env vars are set
from _time_cap import *  # noqa: E402,F401,F403  (tests/_time_cap.py)
