"""The kernel tests run against every fused backend that can run on the test device, taken from the one backend table
(`ghostfast.backends.BACKENDS`): `triton` (the Triton interpreter on CPU), `cpu` (the C++ kernels of ghostfast._C)
on CPU, `triton` and `cuda` on a GPU.

The kernel test modules call the functions below; conftest parametrizes their `kernel_backend` fixture, which
selects the backend these functions route to: each is one call of the `Backend` method of that name. Every buffer
the compiled kernels write (`ghostfast.compiled._empty` allocates them all) starts as NaN inside `poisoned_buffers`,
and the Triton forward kernels write a NaN-filled `out` where a test passes one, so unwritten elements show.

`GHOSTFAST_TEST_BACKENDS=triton,reference` (a comma-separated list of BACKENDS keys) overrides the backends, e.g. to
run the kernel tests on the eager reference while a fused backend is being rebuilt."""
import contextlib
import os

import pytest
import torch

from ghostfast import compiled
from ghostfast.backends import BACKENDS, available_backends

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _names():
    chosen = os.environ.get("GHOSTFAST_TEST_BACKENDS", "").strip()
    if not chosen:
        return [n for n in available_backends(DEVICE) if n != "reference"]
    names = [n.strip() for n in chosen.split(",") if n.strip()]
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ValueError(f"GHOSTFAST_TEST_BACKENDS: unknown backends {unknown}; expected keys of {tuple(BACKENDS)}")
    return names


NAMES = _names()
COMPILED = [n for n in NAMES if isinstance(BACKENDS[n], compiled.CompiledBackend)]
_ACTIVE = ["triton"]


@contextlib.contextmanager
def active(name):
    _ACTIVE.append(name)
    try:
        yield name
    finally:
        _ACTIVE.pop()


def current() -> str:
    return _ACTIVE[-1]


def backend():
    return BACKENDS[current()]


def unsupported_dtype(dtype):
    """Why the active backend can't run `dtype` on the test device, or None."""
    return backend().dtype_unsupported(dtype)


@contextlib.contextmanager
def poisoned_buffers():
    """Every buffer the compiled kernels write starts as NaN; yields a one-item list counting those buffers."""
    allocate, count = compiled._empty, [0]

    def nan_filled(shape, dtype, device, memory_format=torch.contiguous_format):
        count[0] += 1
        buf = allocate(shape, dtype, device, memory_format)
        return buf.fill_(float("nan")) if buf.is_floating_point() else buf

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(compiled, "_empty", nan_filled)
        yield count


def _check_poisoned(allocated):
    # the compiled forwards allocate their output through compiled._empty: if that ever changes, the poisoning
    # above no longer reaches it and the tests would stop seeing unwritten elements
    if isinstance(backend(), compiled.CompiledBackend):
        assert allocated[0] > 0, "the compiled backend allocated its output without ghostfast.compiled._empty"


def ghost_forward(x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate=None, gate_mode="nearest",
                  out=None):
    """The Ghost module forward of the active backend; bn1, bn2: BatchNormParams of live tensors."""
    if out is not None and current() == "triton":  # the Triton launch writes the (NaN-filled) buffer it is given
        from ghostfast.kernels.ghost_module import ghost_module_forward

        return ghost_module_forward(x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode,
                                    out=out)
    with poisoned_buffers() as allocated:
        res = backend().ghost_module(x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode)
        _check_poisoned(allocated)
    return res if out is None else out.copy_(res)


def ghost_backward(grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
                   out_channels, act, gate=None, gate_mode="nearest", needs=(True,) * 8):
    """The Ghost module backward of the active backend (BatchNorms folded: scale and shift vectors)."""
    with poisoned_buffers():
        return tuple(backend().ghost_module_backward(grad_out, x, primary_weight, primary_scale, primary_bias,
                                                     cheap_weight, cheap_scale, cheap_bias, out_channels, act, gate,
                                                     gate_mode, list(needs)))


def dfc_forward(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode, out=None):
    """The DFC forward of the active backend; mode 'gate' (pooled resolution), 'nearest' or 'bilinear'."""
    if out is not None and current() == "triton":
        from ghostfast.kernels import dfc

        return dfc.dfc_forward(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode, out=out)
    with poisoned_buffers() as allocated:
        res = backend().dfc(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode)
        _check_poisoned(allocated)
    return res if out is None else out.copy_(res)


def dfc_backward(grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias,
                 mode, needs=(True,) * 10):
    with poisoned_buffers():
        return tuple(backend().dfc_backward(grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias,
                                            v_weight, v_scale, v_bias, mode, list(needs)))


def ghost_stats(x, primary_weight, bn1, cheap_weight, act, stage):
    """(mean, biased var) of the stage's pre-BN activation (training-mode BatchNorm statistics)."""
    with poisoned_buffers():
        return tuple(backend().ghost_module_stats(x, primary_weight, bn1, cheap_weight, act, stage))


def ghost_stats_backward(x, primary_weight, primary_scale, primary_bias, cheap_weight, act, stage, coef_a, coef_c,
                         mean, needs=(True,) * 5):
    with poisoned_buffers():
        return tuple(backend().ghost_module_stats_backward(x, primary_weight, primary_scale, primary_bias,
                                                           cheap_weight, act, stage, coef_a, coef_c, mean,
                                                           list(needs)))
