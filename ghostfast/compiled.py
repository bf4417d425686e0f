"""Host side of the compiled backends (`cpu`, `cuda`): arrange arguments as the C++ schemas in csrc/ expect them
and call `torch.ops.ghostfast._*_kernel`. The kernels write into outputs allocated here.

Conventions (csrc/ghost_module.cpp, csrc/dfc.cpp): x contiguous in NCHW or channels_last, outputs in x's layout,
weights contiguous in x's dtype, scales and biases contiguous in the accumulation dtype (float64 for float64
inputs, float32 otherwise), the gate contiguous NCHW. Gradients come back in each input's own dtype.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from .backends import load_extension


def _fmt(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _acc(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dense(x: Tensor) -> Tensor:
    """x itself when it is dense NCHW or channels_last, else an NCHW copy (e.g. a channel slice)."""
    return x if x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last) else x.contiguous()


def _vec(v: Tensor, x: Tensor) -> Tensor:
    return v.to(_acc(x)).contiguous()


def _grad_buffers(inputs: Sequence[Optional[Tensor]], needs: Sequence[bool], x: Tensor,
                  vector_slots: Sequence[int], fill: Optional[float]) -> List[Tensor]:
    """Buffers the backward kernel fills: x's layout for grad_x, the acc dtype for the vectors. Uninitialised,
    or filled with `fill` (tests poison them with NaN so that unwritten elements show)."""
    bufs = []
    for i, (t, need) in enumerate(zip(inputs, needs)):
        if t is None or not need:
            bufs.append(x.new_empty(0))
            continue
        if i == 0:
            b = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=_fmt(x))
        elif i in vector_slots:
            b = torch.empty(t.shape, dtype=_acc(x), device=x.device)
        else:
            b = torch.empty(t.shape, dtype=t.dtype, device=x.device)
        bufs.append(b if fill is None else b.fill_(fill))
    return bufs


def _output(x: Tensor, shape: Sequence[int], out: Optional[Tensor]) -> Tensor:
    if out is None:
        return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=_fmt(x))
    if tuple(out.shape) != tuple(shape) or out.dtype != x.dtype or _fmt(out) != _fmt(x) or not (
            out.is_contiguous(memory_format=_fmt(x))):
        raise ValueError(f"out: expected a dense {tuple(shape)} {x.dtype} tensor in the input's memory format, got "
                         f"{tuple(out.shape)} {out.dtype} with strides {out.stride()}")
    return out


def _ops():
    load_extension()
    return torch.ops.ghostfast


# ---- Ghost module -------------------------------------------------------------------------------------------

_GHOST_VECTORS = (2, 3, 5, 6)  # primary_scale, primary_bias, cheap_scale, cheap_bias in the grads order


def ghost_module_forward(x: Tensor, primary_weight: Tensor, primary_scale: Tensor, primary_bias: Tensor,
                         cheap_weight: Tensor, cheap_scale: Tensor, cheap_bias: Tensor, out_channels: int,
                         relu: bool, gate: Optional[Tensor] = None, gate_mode: str = "nearest",
                         out: Optional[Tensor] = None) -> Tensor:
    x = _dense(x)
    out = _output(x, (x.shape[0], out_channels, x.shape[2], x.shape[3]), out)
    _ops()._ghost_module_kernel(
        x, primary_weight.contiguous(), _vec(primary_scale, x), _vec(primary_bias, x), cheap_weight.contiguous(),
        _vec(cheap_scale, x), _vec(cheap_bias, x), out_channels, relu,
        None if gate is None else gate.contiguous(), gate_mode, out)
    return out


def ghost_module_backward(grad_out: Tensor, x: Tensor, primary_weight: Tensor, primary_scale: Tensor,
                          primary_bias: Tensor, cheap_weight: Tensor, cheap_scale: Tensor, cheap_bias: Tensor,
                          out_channels: int, relu: bool, gate: Optional[Tensor], gate_mode: str,
                          needs: Sequence[bool], fill: Optional[float] = None) -> List[Optional[Tensor]]:
    """Gradients (x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate);
    None where not needed."""
    x = _dense(x)
    inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate)
    bufs = _grad_buffers(inputs, needs, x, _GHOST_VECTORS, fill)
    _ops()._ghost_module_backward_kernel(
        grad_out.contiguous(memory_format=_fmt(x)), x, primary_weight.contiguous(), _vec(primary_scale, x),
        _vec(primary_bias, x), cheap_weight.contiguous(), _vec(cheap_scale, x), _vec(cheap_bias, x), out_channels,
        relu, None if gate is None else gate.contiguous(), gate_mode, bufs)
    return [b.to(t.dtype) if need and t is not None else None for b, t, need in zip(bufs, inputs, needs)]


def ghost_module_stats(x: Tensor, primary_weight: Tensor, primary_scale: Tensor, primary_bias: Tensor,
                       cheap_weight: Tensor, relu: bool, stage: int, fill: Optional[float] = None):
    """(mean, biased var) of the stage's pre-BN activation per channel, in the accumulation dtype
    (`ghostfast.reference.ghost_module_stats`)."""
    x = _dense(x)
    n = primary_weight.shape[0] if stage == 1 else cheap_weight.shape[0]
    mean = torch.empty(n, dtype=_acc(x), device=x.device)
    var = torch.empty(n, dtype=_acc(x), device=x.device)
    if fill is not None:
        mean.fill_(fill)
        var.fill_(fill)
    _ops()._ghost_module_stats_kernel(x, primary_weight.contiguous(), _vec(primary_scale, x), _vec(primary_bias, x),
                                      cheap_weight.contiguous(), relu, stage, mean, var)
    return mean, var


def ghost_module_stats_backward(x: Tensor, primary_weight: Tensor, primary_scale: Tensor, primary_bias: Tensor,
                                cheap_weight: Tensor, relu: bool, stage: int, coef_a: Tensor, coef_c: Tensor,
                                mean: Tensor, needs: Sequence[bool],
                                fill: Optional[float] = None) -> List[Optional[Tensor]]:
    """Gradients (x, primary_weight, primary_scale, primary_bias, cheap_weight) of sum(dz * z) for the stage's z,
    dz = coef_a + coef_c * (z - mean) per channel; None where not needed (stage 1: only x and primary_weight)."""
    x = _dense(x)
    inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight)
    needs = [bool(n) and (stage == 2 or i < 2) for i, n in enumerate(needs)]
    bufs = _grad_buffers(inputs, needs, x, (2, 3), fill)
    _ops()._ghost_module_stats_backward_kernel(
        x, primary_weight.contiguous(), _vec(primary_scale, x), _vec(primary_bias, x), cheap_weight.contiguous(),
        relu, stage, _vec(coef_a, x), _vec(coef_c, x), _vec(mean, x), bufs)
    return [b.to(t.dtype) if need else None for b, t, need in zip(bufs, inputs, needs)]


# ---- DFC attention ------------------------------------------------------------------------------------------

_DFC_VECTORS = (2, 3, 5, 6, 8, 9)


def _dfc_params(x: Tensor, params: Sequence[Tensor]) -> list:
    cw, cs, cb, hw, hs, hb, vw, vs, vb = params
    return [cw.contiguous(), _vec(cs, x), _vec(cb, x), hw.contiguous(), _vec(hs, x), _vec(hb, x), vw.contiguous(),
            _vec(vs, x), _vec(vb, x)]


def dfc_forward(x: Tensor, *params: Tensor, mode: str = "gate", out: Optional[Tensor] = None) -> Tensor:
    """mode 'gate': the gate at [N, C, H//2, W//2]; 'nearest' / 'bilinear': upsampled to [N, C, H, W]."""
    x = _dense(x)
    n, _, h, w = x.shape
    c = params[0].shape[0]
    out = _output(x, (n, c, h // 2, w // 2) if mode == "gate" else (n, c, h, w), out)
    _ops()._dfc_kernel(x, *_dfc_params(x, params), mode, out)
    return out


def dfc_backward(grad: Tensor, x: Tensor, *params: Tensor, mode: str, needs: Sequence[bool],
                 fill: Optional[float] = None) -> List[Optional[Tensor]]:
    x = _dense(x)
    inputs = (x, *params)
    bufs = _grad_buffers(inputs, needs, x, _DFC_VECTORS, fill)
    _ops()._dfc_backward_kernel(grad.contiguous(memory_format=_fmt(x)), x, *_dfc_params(x, params), mode, bufs)
    return [b.to(t.dtype) if need else None for b, t, need in zip(bufs, inputs, needs)]
