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

import os
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


def _stats1_form(x: Tensor, w1: Tensor, needs) -> Optional[str]:
    """How the `cpu` backend computes the stage-1 statistics' gradient: None (its kernel), "closed" or "direct"
    (library GEMMs, `_stats1_backward_library`). GHOSTFAST_CPU_GEMM=own / library forces the kernel / the library
    (tests, A/B runs). The rule is measured (benchmarks/results/cpu-2core/NOTES.md, 2026-12-03, stage-1 statistics
    backward; float32, batch 8, 1 thread): the closed form wins wherever C_in <= 1.5 init (1.5-4.7x the kernel),
    the direct library GEMMs on wide inputs (C_in >= 400: 1.5-1.7x), the kernel on the remaining narrow layers."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or not (needs[0] or needs[1]):
        return None
    init, c_in = w1.shape[0], w1.shape[1]
    forced = os.environ.get("GHOSTFAST_CPU_GEMM")
    if forced == "own":
        return None
    if forced == "library":  # the form with fewer flops per pixel
        products = needs[0] + needs[1]
        return "closed" if c_in * c_in * products <= init * c_in * (1 + products) else "direct"
    if 2 * c_in <= 3 * init:  # here the closed form also has the fewer flops, whichever gradients are needed
        return "closed"
    return "direct" if c_in >= 400 else None


def _stats1_backward_library(form: str, x: Tensor, w1: Tensor, coef_a: Tensor, coef_c: Tensor, mean: Tensor,
                             needs) -> List[Optional[Tensor]]:
    """The stage-1 statistics' gradient by library GEMMs. Its upstream gradient dz1 = a + c (z1 - mean) per channel
    is affine in z1 = W1 x, so with d = a - c mean: grad_x = W1^T d + (W1^T diag(c) W1) x and grad_W1 =
    d (sum x)^T + diag(c) W1 (sum x x^T), sums over the pixels ("closed": no z1 at all; C_in^2 flops per pixel and
    product), or z1, dz1 and both products as written ("direct": init * C_in per pixel and product)."""
    acc = x.dtype  # float32 / float64 only (_stats1_form): the inputs' own dtype accumulates
    init, c_in = w1.shape[0], w1.shape[1]
    w = w1.reshape(init, c_in).to(acc)
    c = coef_c.to(acc)
    d = coef_a.to(acc) - c * mean.to(acc)
    cl = _fmt(x) == torch.channels_last
    n, _, h, wd = x.shape
    # rows: [N*H*W, C_in] (a view of channels_last x); planar: [N, C_in, H*W] (a view of NCHW x)
    xm = x.permute(0, 2, 3, 1).reshape(-1, c_in) if cl else x.reshape(n, c_in, h * wd)
    gx = gw = None
    if form == "closed":
        if needs[0]:
            k = w.t() @ (c.unsqueeze(1) * w)  # [C_in, C_in], symmetric
            bias = w.t() @ d
            if cl:
                gx = torch.addmm(bias.unsqueeze(0), xm, k).view(n, h, wd, c_in).permute(0, 3, 1, 2)
            else:
                gx = torch.baddbmm(bias.view(1, c_in, 1).expand(n, c_in, h * wd), k.expand(n, c_in, c_in), xm)
                gx = gx.view(n, c_in, h, wd)
        if needs[1]:
            if cl:
                gram, sx = xm.t() @ xm, xm.sum(0)
            else:
                gram, sx = torch.bmm(xm, xm.transpose(1, 2)).sum(0), xm.sum((0, 2))
            gw = torch.outer(d, sx) + c.unsqueeze(1) * (w @ gram)
    else:
        if cl:
            dz = torch.addcmul(d, c, xm @ w.t())  # [P, init]
            if needs[0]:
                gx = (dz @ w).view(n, h, wd, c_in).permute(0, 3, 1, 2)
            if needs[1]:
                gw = dz.t() @ xm
        else:
            dz = torch.addcmul(d.view(1, init, 1), c.view(1, init, 1), torch.matmul(w, xm))  # [N, init, HW]
            if needs[0]:
                gx = torch.matmul(w.t(), dz).view(n, c_in, h, wd)
            if needs[1]:
                gw = torch.bmm(dz, xm.transpose(1, 2)).sum(0)
    return [gx if needs[0] else None, gw.view_as(w1).to(w1.dtype) if needs[1] else None, None, None, None]


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
        return self._ghost_backward(_ops()._ghost_module_backward_kernel, (), grad_out, x, primary_weight,
                                    primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, out_channels,
                                    act, gate, gate_mode, needs)

    def ghost_module_backward_bnstats(self, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                                      cheap_scale, cheap_bias, out_channels, act, gate, gate_mode, coef_a, coef_c,
                                      mean, needs):
        """ghost_module_backward plus bn2's batch statistics' gradient (CPU kernel only)."""
        return self._ghost_backward(_ops()._ghost_module_backward_bnstats_kernel,
                                    tuple(_vec(v, x) for v in (coef_a, coef_c, mean)), grad_out, x, primary_weight,
                                    primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, out_channels,
                                    act, gate, gate_mode, needs)

    def ghost_module_z1(self, z1, bn1, cheap_weight, bn2_weight, bn2_bias, bn2_eps, out_channels, act, gate,
                        gate_mode):
        """(out, mean2, var2): the module from z1 = W1 x (the caller's), bn2 on z2's batch statistics (CPU kernel
        only, float32 / float64)."""
        z1 = _dense(z1)
        n = cheap_weight.shape[0]
        out = _empty((z1.shape[0], out_channels, z1.shape[2], z1.shape[3]), z1.dtype, z1.device, _fmt(z1))
        mean, var = _empty((n,), z1.dtype, z1.device), _empty((n,), z1.dtype, z1.device)
        _ops()._ghost_module_z1_kernel(z1, *_bn(bn1), cheap_weight.contiguous(),
                                       *[None if t is None else t.contiguous() for t in (bn2_weight, bn2_bias)],
                                       float(bn2_eps), out_channels, _act_code(act),
                                       None if gate is None else gate.contiguous(), gate_mode, out, mean, var)
        return out, mean, var

    def ghost_module_z1_stats(self, z1):
        """(mean, biased var) of z1's channels (CPU kernel only, float32 / float64)."""
        z1 = _dense(z1)
        mean, var = _empty((z1.shape[1],), z1.dtype, z1.device), _empty((z1.shape[1],), z1.dtype, z1.device)
        _ops()._ghost_module_z1_stats_kernel(z1, mean, var)
        return mean, var

    def ghost_module_z1_backward(self, grad_out, z1, primary_scale, primary_bias, cheap_weight, cheap_scale,
                                 cheap_bias, out_channels, act, gate, gate_mode, coef_a, coef_c, mean, needs):
        """ghost_module_backward_bnstats with z1 as the input -> [z1, None, primary_scale, primary_bias,
        cheap_weight, cheap_scale, cheap_bias, gate] (needs[1] must be False)."""
        z1 = _dense(z1)
        inputs = (z1, None, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate)
        bufs = _grad_buffers(inputs, needs, z1, _GHOST_VECTORS)
        _ops()._ghost_module_z1_backward_kernel(
            grad_out.contiguous(memory_format=_fmt(z1)), z1, _vec(primary_scale, z1), _vec(primary_bias, z1),
            cheap_weight.contiguous(), _vec(cheap_scale, z1), _vec(cheap_bias, z1), out_channels, _act_code(act),
            None if gate is None else gate.contiguous(), gate_mode, *(_vec(v, z1) for v in (coef_a, coef_c, mean)),
            bufs)
        return _returned(bufs, inputs, needs)

    @staticmethod
    def _ghost_backward(kernel, extra, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                        cheap_scale, cheap_bias, out_channels, act, gate, gate_mode, needs):
        x = _dense(x)
        inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate)
        bufs = _grad_buffers(inputs, needs, x, _GHOST_VECTORS)
        kernel(grad_out.contiguous(memory_format=_fmt(x)), x, primary_weight.contiguous(), _vec(primary_scale, x),
               _vec(primary_bias, x), cheap_weight.contiguous(), _vec(cheap_scale, x), _vec(cheap_bias, x),
               out_channels, _act_code(act), None if gate is None else gate.contiguous(), gate_mode, *extra, bufs)
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
        if stage == 1:
            form = _stats1_form(x, primary_weight, needs)
            if form is not None:  # named in profiles as the kernels are (tests/fused_runs.py counts it)
                with torch.profiler.record_function("ghostfast::_ghost_module_stats_backward_library"):
                    return _stats1_backward_library(form, x, primary_weight, coef_a, coef_c, mean, needs)
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
