"""The compiled backends `cpu` and `cuda` (the C++ kernels of `ghostfast._C`, csrc/) behind the `Backend` interface:
arrange arguments as the schemas in csrc/ expect them and call `torch.ops.ghostfast._*_kernel`, which write into
outputs allocated here.

Conventions (csrc/ghost_module.cpp, csrc/dfc.cpp): x dense in NCHW or channels_last, outputs in x's layout,
weights contiguous in x's dtype; forward kernels take each BatchNorm as its live tensors (folded inside the launch);
backward kernels take the folded scales and shifts as contiguous vectors in the accumulation dtype (float64 for
float64 inputs, float32 otherwise); the gate contiguous NCHW. Gradients come back in each input's own dtype.
Every buffer a kernel fills is allocated by `_empty` (the tests poison them through it).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .backends import Backend, COMPILED_DTYPES, _compiled_registrations, extension_error, load_extension


def _fmt(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dense(x: Tensor) -> Tensor:
    """x itself when it is dense NCHW or channels_last, else an NCHW copy (e.g. a channel slice)."""
    return x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


def _empty(shape, dtype: torch.dtype, device: torch.device,
           memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Every buffer the kernels write: uninitialised (the kernels write every element)."""
    return torch.empty(shape, dtype=dtype, device=device, memory_format=memory_format)


def _vec(v: Tensor, x: Tensor) -> Tensor:
    return v.to(_acc(x)).contiguous()


def _bn(bn) -> list:
    """A BatchNormParams as the schema's five arguments (vectors contiguous, any floating dtype)."""
    weight, bias, mean, var, eps = bn
    return [None if t is None else t.contiguous() for t in (weight, bias, mean, var)] + [float(eps)]


def _grad_buffers(inputs: Sequence[Optional[Tensor]], needs: Sequence[bool], x: Tensor,
                  vector_slots: Sequence[int]) -> List[Tensor]:
    """Buffers the backward kernel fills: x's layout for grad_x, the acc dtype for the vectors; empty: not needed."""
    bufs = []
    for i, (t, need) in enumerate(zip(inputs, needs)):
        if t is None or not need:
            bufs.append(x.new_empty(0))
        elif i == 0:
            bufs.append(_empty(x.shape, x.dtype, x.device, _fmt(x)))
        else:
            bufs.append(_empty(t.shape, _acc(x) if i in vector_slots else t.dtype, x.device))
    return bufs


def _returned(bufs, inputs, needs) -> List[Optional[Tensor]]:
    return [b.to(t.dtype) if need and t is not None else None for b, t, need in zip(bufs, inputs, needs)]


def _ops():
    load_extension()
    return torch.ops.ghostfast


_GHOST_VECTORS = (2, 3, 5, 6)  # primary_scale, primary_bias, cheap_scale, cheap_bias in the grads order
_DFC_VECTORS = (2, 3, 5, 6, 8, 9)


_ACT_CODE_OF: dict = {}  # act argument -> code, filled on first use (this runs per call)


def _act_code(act) -> int:
    """The kernels' `act` code for an activation: a name of ghostfast.reference.ACTIVATIONS, or a bool (True: relu,
    False: none); the codes are ghostfast.reference.ACT_CODES."""
    code = _ACT_CODE_OF.get(act) if isinstance(act, (str, bool)) else None
    if code is not None:
        return code
    from .reference import ACT_CODES, activation_name

    name = activation_name(act)
    if name not in CompiledBackend.ACTIVATIONS:
        raise ValueError(f"the compiled Ghost module kernels implement {CompiledBackend.ACTIVATIONS}, got {name!r}")
    _ACT_CODE_OF[act] = ACT_CODES[name]
    return ACT_CODES[name]


class CompiledBackend(Backend):
    """`cpu` (CPU tensors) or `cuda` (CUDA tensors): the kernels registered for that dispatch key."""

    def __init__(self, name: str):
        self.name = name

    def unavailable(self, device_type: str) -> Optional[str]:
        if device_type != self.name:
            return f"the {self.name} backend runs {self.name.upper()} tensors only"
        if self.name == "cuda" and not torch.cuda.is_available():
            return "no CUDA device"
        if load_extension() is None:
            return f"the compiled extension ghostfast._C is not available ({extension_error()})"
        if not _compiled_registrations().get(self.name, False):
            return f"ghostfast._C was built without {self.name.upper()} kernels"
        return None

    ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu")  # what csrc/ kernels implement (their `act` code)

    def dtype_unsupported(self, dtype: torch.dtype) -> Optional[str]:
        return None if dtype in COMPILED_DTYPES[self.name] else f"the {self.name} backend has no {dtype} kernels"

    def stats_backend(self, device_type: str):
        if self.name == "cpu":
            if _compiled_registrations().get("cpu_stats", False):
                return "cpu", None
            return None, "ghostfast._C was built without the CPU BatchNorm statistics kernels"
        from .backends import BACKENDS  # cuda: Triton computes the statistics on the GPU

        if BACKENDS["triton"].unavailable(device_type) is None:
            return "triton", None
        return None, "the cuda backend computes training-mode BatchNorm statistics with Triton, which cannot run here"

    # ---- Ghost module ---------------------------------------------------------------------------------------
    def ghost_module(self, x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode):
        x = _dense(x)
        out = _empty((x.shape[0], out_channels, x.shape[2], x.shape[3]), x.dtype, x.device, _fmt(x))
        _ops()._ghost_module_kernel(x, primary_weight.contiguous(), *_bn(bn1), cheap_weight.contiguous(), *_bn(bn2),
                                    out_channels, _act_code(act), None if gate is None else gate.contiguous(),
                                    gate_mode, out)
        return out

    def ghost_module_backward(self, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                              cheap_scale, cheap_bias, out_channels, act, gate, gate_mode, needs):
        x = _dense(x)
        inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate)
        bufs = _grad_buffers(inputs, needs, x, _GHOST_VECTORS)
        _ops()._ghost_module_backward_kernel(
            grad_out.contiguous(memory_format=_fmt(x)), x, primary_weight.contiguous(), _vec(primary_scale, x),
            _vec(primary_bias, x), cheap_weight.contiguous(), _vec(cheap_scale, x), _vec(cheap_bias, x), out_channels,
            _act_code(act), None if gate is None else gate.contiguous(), gate_mode, bufs)
        return _returned(bufs, inputs, needs)

    def ghost_module_stats(self, x, primary_weight, bn1, cheap_weight, act, stage):
        if self.name == "cuda":
            from .backends import BACKENDS

            return BACKENDS["triton"].ghost_module_stats(x, primary_weight, bn1, cheap_weight, act, stage)
        x = _dense(x)
        n = primary_weight.shape[0] if stage == 1 else cheap_weight.shape[0]
        mean = _empty((n,), _acc(x), x.device)
        var = _empty((n,), _acc(x), x.device)
        _ops()._ghost_module_stats_kernel(x, primary_weight.contiguous(), *_bn(bn1), cheap_weight.contiguous(),
                                          _act_code(act), stage, mean, var)
        return mean, var

    def ghost_module_stats_backward(self, x, primary_weight, primary_scale, primary_bias, cheap_weight, act, stage,
                                    coef_a, coef_c, mean, needs):
        if self.name == "cuda":
            from .backends import BACKENDS

            return BACKENDS["triton"].ghost_module_stats_backward(x, primary_weight, primary_scale, primary_bias,
                                                                  cheap_weight, act, stage, coef_a, coef_c, mean,
                                                                  needs)
        x = _dense(x)
        inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight)
        needs = [bool(n) and (stage == 2 or i < 2) for i, n in enumerate(needs)]
        bufs = _grad_buffers(inputs, needs, x, (2, 3))
        _ops()._ghost_module_stats_backward_kernel(
            x, primary_weight.contiguous(), _vec(primary_scale, x), _vec(primary_bias, x), cheap_weight.contiguous(),
            _act_code(act), stage, _vec(coef_a, x), _vec(coef_c, x), _vec(mean, x), bufs)
        return _returned(bufs, inputs, needs)

    # ---- DFC attention --------------------------------------------------------------------------------------
    def dfc(self, x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode):
        x = _dense(x)
        n, _, h, w = x.shape
        c = conv_weight.shape[0]
        out = _empty((n, c, h // 2, w // 2) if mode == "gate" else (n, c, h, w), x.dtype, x.device, _fmt(x))
        _ops()._dfc_kernel(x, conv_weight.contiguous(), *_bn(bn3), h_weight.contiguous(), *_bn(bn4),
                           v_weight.contiguous(), *_bn(bn5), mode, out)
        return out

    def dfc_backward(self, grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale,
                     v_bias, mode, needs):
        x = _dense(x)
        inputs = (x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
        bufs = _grad_buffers(inputs, needs, x, _DFC_VECTORS)
        params = [conv_weight.contiguous(), _vec(conv_scale, x), _vec(conv_bias, x), h_weight.contiguous(),
                  _vec(h_scale, x), _vec(h_bias, x), v_weight.contiguous(), _vec(v_scale, x), _vec(v_bias, x)]
        _ops()._dfc_backward_kernel(grad.contiguous(memory_format=_fmt(x)), x, *params, mode, bufs)
        return _returned(bufs, inputs, needs)
