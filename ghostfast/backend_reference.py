"""The `reference` backend: eager PyTorch (`ghostfast.reference`) behind the `Backend` interface, any device.

Forward functions fold each BatchNorm with `reference.fold_bn` and run the reference math; half inputs compute in
float32 and return their own dtype. Backward functions are the vector-Jacobian products of the same math."""
from __future__ import annotations

import contextlib
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import reference
from .backends import Backend


def compute_dtype(x: Tensor) -> torch.dtype:
    """The accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _output_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _folded(bn, channels: int, x: Tensor):
    return reference.fold_bn_vectors(reference.BatchNormParams(*bn), channels, compute_dtype(x), x.device)


def _autograd_recording():
    """A context in which torch.autograd records a graph, even inside a custom op's kernel: there the dispatcher
    runs below the Autograd key (the kernel is called with the Autograd dispatch keys excluded), so the registered
    backward ops on this backend re-include them for the span of the vector-Jacobian product."""
    exclude = torch._C._dispatch_tls_local_exclude_set()
    keys = torch._C.DispatchKey
    autograd = [keys.AutogradCPU, keys.AutogradOther, keys.AutogradNestedTensor]  # functionality bits
    if not any(exclude.has(k) for k in autograd):
        return contextlib.nullcontext()
    for k in autograd:
        exclude = exclude.remove(k)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _vjp(fn, grad_out: Optional[Tensor], inputs: Sequence[Optional[Tensor]], needs: Sequence[bool], dt):
    """Gradients of `fn(*inputs)` (cast to `dt`) against `grad_out`, each in its input's dtype; None where not
    needed. grad_out None: `fn` returns a scalar."""
    with _autograd_recording(), torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(bool(n)) for t, n in zip(inputs, needs)]
        out = fn(*[None if t is None else t.to(dt) for t in leaves])
        wanted = [t for t in leaves if t is not None and t.requires_grad]
        grads = iter(torch.autograd.grad(out, wanted, None if grad_out is None else grad_out.to(out.dtype),
                                         allow_unused=True) if wanted else ())
    result: List[Optional[Tensor]] = []
    for t in leaves:
        if t is None or not t.requires_grad:
            result.append(None)
            continue
        g = next(grads)
        result.append(_in_layout_of(t, torch.zeros_like(t) if g is None else g.to(t.dtype)))
    return result


def _in_layout_of(t: Tensor, g: Tensor) -> Tensor:
    """g with the strides the other backends give t's gradient (t's layout, as the ops' fake kernels say):
    autograd may return e.g. a [C, C_in, 1, 1] weight gradient with channels_last strides."""
    fmt = _output_format(t)
    if g.stride() == torch.empty(t.shape, device="meta", memory_format=fmt).stride():
        return g
    return torch.empty(t.shape, dtype=g.dtype, device=g.device, memory_format=fmt).copy_(g)


class ReferenceBackend(Backend):
    name = "reference"

    def unavailable(self, device_type: str) -> Optional[str]:
        return None

    def ghost_module(self, x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode):
        dt = compute_dtype(x)
        s1, b1 = _folded(bn1, primary_weight.shape[0], x)
        s2, b2 = _folded(bn2, cheap_weight.shape[0], x)
        out = reference.ghost_module_forward(x.to(dt), primary_weight.to(dt), s1, b1, cheap_weight.to(dt), s2, b2,
                                             out_channels, act, None if gate is None else gate.to(dt), gate_mode)
        return out.to(x.dtype).contiguous(memory_format=_output_format(x))

    def ghost_module_backward(self, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                              cheap_scale, cheap_bias, out_channels, act, gate, gate_mode, needs):
        def fn(x, w1, s1, b1, w2, s2, b2, g):
            return reference.ghost_module_forward(x, w1, s1, b1, w2, s2, b2, out_channels, act, g, gate_mode)

        inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate)
        return _vjp(fn, grad_out, inputs, needs, compute_dtype(x))

    def ghost_module_stats(self, x, primary_weight, bn1, cheap_weight, act, stage):
        dt = compute_dtype(x)
        s1, b1 = _folded(bn1, primary_weight.shape[0], x)
        mean, var = reference.ghost_module_stats(x.to(dt), primary_weight.to(dt), s1, b1, cheap_weight.to(dt), act,
                                                 stage)
        return mean.contiguous(), var.contiguous()

    def ghost_module_stats_backward(self, x, primary_weight, primary_scale, primary_bias, cheap_weight, act, stage,
                                    coef_a, coef_c, mean, needs):
        def fn(x, w1, s1, b1, w2):
            z = reference.ghost_module_preactivation(x, w1, s1, b1, w2, act, stage)
            dz = coef_a.view(1, -1, 1, 1) + coef_c.view(1, -1, 1, 1) * (z.detach() - mean.view(1, -1, 1, 1))
            return (dz.to(z.dtype) * z).sum()

        inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight)
        needs = [bool(n) and (stage == 2 or i < 2) for i, n in enumerate(needs)]
        return _vjp(fn, None, inputs, needs, compute_dtype(x))

    def dfc(self, x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode):
        dt = compute_dtype(x)
        c = conv_weight.shape[0]
        params = (conv_weight.to(dt), *_folded(bn3, c, x), h_weight.to(dt), *_folded(bn4, c, x), v_weight.to(dt),
                  *_folded(bn5, c, x))
        out = _dfc_math(x.to(dt), *params, mode=mode)
        return out.to(x.dtype).contiguous(memory_format=_output_format(x))

    def dfc_backward(self, grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale,
                     v_bias, mode, needs):
        inputs = (x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
        return _vjp(lambda *a: _dfc_math(*a, mode=mode), grad, inputs, needs, compute_dtype(x))


def _dfc_math(x, *params, mode: str):
    if mode == "gate":
        return reference.dfc_gate_forward(x, *params)
    return reference.dfc_attention_forward(x, *params, mode=mode)
