"""The kernel tests run against every fused backend that can run on the test device: `triton` (the Triton
interpreter on CPU), `cpu` (the C++ kernels of ghostfast._C) on CPU, `cuda` on a GPU.

The four kernel test modules call the functions below; conftest parametrizes their `kernel_backend` fixture,
which selects the backend these functions route to. Compiled kernels get their outputs and gradient buffers
poisoned with NaN, as the Triton tests poison theirs, so unwritten elements show."""
import contextlib

import torch

from ghostfast import backends, compiled

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
COMPILED = [n for n in ("cpu", "cuda") if n in backends.available_backends(DEVICE)]
NAMES = ["triton"] + COMPILED
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


def unsupported_dtype(dtype):
    """Why the active backend can't run `dtype` on the test device, or None."""
    return backends.dtype_unsupported(current(), dtype) if DEVICE == "cpu" or current() != "triton" else None


def _poisoned(shape, x):
    """A NaN buffer in the layout the compiled kernels write (x's, as ghostfast.compiled allocates it)."""
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=compiled._fmt(compiled._dense(x))).fill_(float("nan"))


def ghost_forward(x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
                  out_channels, relu, gate=None, gate_mode="nearest", out=None):
    args = (x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, out_channels,
            relu, gate, gate_mode)
    if current() == "triton":
        from ghostfast.kernels.ghost_module import ghost_module_forward

        return ghost_module_forward(*args, out=out)
    n, _, h, w = x.shape
    buf = _poisoned((n, out_channels, h, w), x)  # poisoned even where the test checks the allocation only
    res = compiled.ghost_module_forward(*args, out=buf)
    return res if out is None else out.copy_(res)


def ghost_backward(grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
                   out_channels, relu, gate=None, gate_mode="nearest", needs=(True,) * 8):
    args = (grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
            out_channels, relu, gate, gate_mode)
    if current() == "triton":
        from ghostfast.kernels.ghost_module import ghost_module_backward

        return ghost_module_backward(*args, needs=needs)
    return tuple(compiled.ghost_module_backward(*args, needs, fill=float("nan")))


def dfc_forward(x, params, mode, out=None):
    """mode None: the pooled gate; 'nearest' / 'bilinear': the full-resolution gate."""
    if current() == "triton":
        from ghostfast.kernels import dfc

        if mode is None:
            return dfc.dfc_gate_forward(x, *params, out=out)
        return dfc.dfc_attention_forward(x, *params, mode=mode, out=out)
    n, _, h, w = x.shape
    buf = _poisoned((n, params[0].shape[0]) + ((h // 2, w // 2) if mode is None else (h, w)), x)
    res = compiled.dfc_forward(x, *params, mode=mode or "gate", out=buf)
    return res if out is None else out.copy_(res)


def dfc_backward(grad, x, params, mode, needs=(True,) * 10):
    if current() == "triton":
        from ghostfast.kernels import dfc

        if mode is None:
            return dfc.dfc_gate_backward(grad, x, *params, needs=needs)
        return dfc.dfc_attention_backward(grad, x, *params, mode=mode, needs=needs)
    return tuple(compiled.dfc_backward(grad, x, *params, mode=mode or "gate", needs=needs, fill=float("nan")))


def ghost_stats(x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage):
    """(mean, biased var) of the stage's pre-BN activation (training-mode BatchNorm statistics)."""
    args = (x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage)
    if current() == "triton":
        from ghostfast.kernels.ghost_module import ghost_module_stats

        return ghost_module_stats(*args)
    return compiled.ghost_module_stats(*args, fill=float("nan"))


def ghost_stats_backward(x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage, coef_a, coef_c,
                         mean, needs=(True,) * 5):
    args = (x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage, coef_a, coef_c, mean)
    if current() == "triton":
        from ghostfast.kernels.ghost_module import ghost_module_stats_backward

        return tuple(ghost_module_stats_backward(*args, needs=needs))
    return tuple(compiled.ghost_module_stats_backward(*args, needs, fill=float("nan")))
