"""The ghostfast op registry: `torch.library` custom ops, their argument checks, fake kernels and autograd, and
dispatch by lookup in the backend table (`ghostfast.backends.BACKENDS`).

BatchNorm arrives as live tensors (`ghostfast.reference.BatchNormParams`: weight, bias, mean, var, eps; any may be
None) and is folded per channel inside the forward launches: nothing is cached, so nothing can go stale. The
registered ops `torch.ops.ghostfast.*` (what compiled and exported graphs call) check their own arguments, on every
backend, before any kernel runs; the fake kernels run the same checks and give the shapes the kernels produce.

Autograd: the backward folds each BatchNorm once (per-channel vectors), runs the backend's fused backward kernel,
which gives the gradients of the folded scale and shift, and carries them to the BatchNorm's tensors by the chain
rule (`reference.fold_bn_backward`): training-mode batch statistics passed as mean and var get theirs too.
"""
from __future__ import annotations

import operator
from numbers import Real
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import reference
from .backends import BACKENDS, auto_candidates, default_strict, fallback, resolve_backend
from .reference import BatchNormParams

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
SUPPORTED_DW_SIZES = (1, 3, 5, 7)
DFC_MODES = ("gate", "nearest", "bilinear")


def output_memory_format(x: Tensor) -> torch.memory_format:
    """Outputs keep the input's layout: channels_last in, channels_last out; anything else gives NCHW."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def compute_dtype(x: Tensor) -> torch.dtype:
    """The accumulation dtype: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _empty_output(x: Tensor, shape: Sequence[int]) -> Tensor:
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))


def as_batch_norm(bn, what: str = "bn") -> BatchNormParams:
    """A BatchNormParams from what users pass: a BatchNormParams or 5-tuple, an eval-mode BatchNorm module, or
    None (no normalisation)."""
    if bn is None:
        return BatchNormParams()
    if isinstance(bn, BatchNormParams):
        return bn
    if isinstance(bn, nn.modules.batchnorm._BatchNorm):
        return BatchNormParams.of(bn)
    if isinstance(bn, (tuple, list)) and len(bn) == 5:
        return BatchNormParams(*bn)
    raise TypeError(f"{what}: expected a ghostfast.reference.BatchNormParams (weight, bias, mean, var, eps), a "
                    f"BatchNorm module or None, got {type(bn).__name__}")


# ----------------------------------------------------------------------------------------------------------
# Argument checks: a clear error naming what was expected and what came, before any kernel runs. Shared by the
# custom ops, their fake kernels and the public wrappers.
# ----------------------------------------------------------------------------------------------------------


def _check_input(op: str, x: Tensor, in_channels: int, min_hw: int = 0) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor input, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{op}: expected a 4-D input [N, C, H, W], got a {x.dim()}-D tensor of shape "
                         f"{tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"{op}: expected input with {in_channels} channels, got {x.shape[1]} "
                         f"(input shape {tuple(x.shape)})")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected a floating input ({', '.join(str(d) for d in SUPPORTED_DTYPES)}), "
                        f"got {x.dtype}")
    if min_hw and x.numel() and (x.shape[2] < min_hw or x.shape[3] < min_hw):
        raise ValueError(f"{op}: the 2x2 average pool needs H and W >= {min_hw}, got {x.shape[2]}x{x.shape[3]}")


def _check_same_device(op: str, name: str, t: Tensor, x: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: expected {name} to be a Tensor, got {type(t).__name__}")
    if t.device != x.device:
        raise ValueError(f"{op}: {name} is on {t.device} but the input is on {x.device}; expected both on {x.device}")


def _check_weight(op: str, name: str, w: Tensor, x: Tensor, shape: Optional[tuple] = None) -> None:
    _check_same_device(op, name, w, x)
    if w.dtype != x.dtype:
        raise TypeError(f"{op}: expected {name} of dtype {x.dtype} (the input's), got {w.dtype}")
    if shape is not None and tuple(w.shape) != tuple(shape):
        raise ValueError(f"{op}: expected {name} of shape {tuple(shape)}, got {tuple(w.shape)}")


def _check_vector(op: str, name: str, v: Optional[Tensor], n: int, x: Tensor) -> None:
    if v is None:
        return
    _check_same_device(op, name, v, x)
    if v.dim() != 1 or v.shape[0] != n:
        raise ValueError(f"{op}: expected {name} of shape ({n},), got {tuple(v.shape)}")
    if v.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{op}: expected {name} of a floating dtype, got {v.dtype}")


_FLOATING = frozenset(SUPPORTED_DTYPES)
_PLAIN = (Tensor, nn.Parameter)


def _check_bn(op: str, stage: str, bn: BatchNormParams, n: int, x: Tensor, labels=None) -> None:
    """`labels`: {stage: (name of weight, name of bias)} where the op's arguments are folded (scale, shift)."""
    device = x.device
    shape = (n,)
    if all(t is None or (type(t) in _PLAIN and t.device == device and t.shape == shape and t.dtype in _FLOATING)
           for t in bn.tensors()) and type(bn.eps) is float:
        return  # the common case in one pass; anything else gets the detailed checks and their messages
    names = [f"{stage}_{field}" for field in ("weight", "bias", "mean", "var")]
    if labels and stage in labels:
        names[:2] = labels[stage]
    for name, t in zip(names, bn.tensors()):
        _check_vector(op, name, t, n, x)
    if not isinstance(bn.eps, Real) or isinstance(bn.eps, bool):
        raise TypeError(f"{op}: expected {stage}_eps to be a float, got {type(bn.eps).__name__}")


def _check_out_channels(op: str, out_channels, limit: int) -> int:
    try:
        out_channels = operator.index(out_channels)
    except TypeError:
        raise TypeError(f"{op}: expected out_channels to be an int, got {out_channels!r}") from None
    if not 1 <= out_channels <= limit:
        raise ValueError(f"{op}: out_channels must be in [1, {limit}], got {out_channels}")
    return out_channels


def _check_backend(op: str, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {tuple(BACKENDS)}, got {backend!r}")


def _check_ghost_weights(op: str, x: Tensor, primary_weight: Tensor, cheap_weight: Tensor) -> Tuple[int, int]:
    """(init, cheap) after checking x, the 1x1 primary weight and the depthwise cheap weight."""
    if not isinstance(primary_weight, Tensor) or primary_weight.dim() != 4 or \
            tuple(primary_weight.shape[2:]) != (1, 1) or primary_weight.shape[0] < 1:
        raise ValueError(f"{op}: expected a 1x1 primary_weight [init, C_in, 1, 1] with init >= 1, got "
                         f"{tuple(getattr(primary_weight, 'shape', ()))}")
    init, c_in = primary_weight.shape[:2]
    _check_input(op, x, c_in)
    _check_weight(op, "primary_weight", primary_weight, x)
    return init, _check_cheap_weight(op, x, init, cheap_weight)


def _check_cheap_weight(op: str, x: Tensor, init: int, cheap_weight: Tensor) -> int:
    """cheap (its channels) after checking the depthwise cheap weight against init."""
    if not isinstance(cheap_weight, Tensor) or cheap_weight.dim() != 4 or cheap_weight.shape[1] != 1 or \
            cheap_weight.shape[2] != cheap_weight.shape[3]:
        raise ValueError(f"{op}: expected a square depthwise cheap_weight [init*(ratio-1), 1, k, k], got "
                         f"{tuple(getattr(cheap_weight, 'shape', ()))}")
    cheap = cheap_weight.shape[0]
    if cheap < init or cheap % init:
        raise ValueError(f"{op}: cheap_weight has {cheap} output channels; expected a positive multiple of "
                         f"init={init} (init*(ratio-1), ratio >= 2)")
    if cheap_weight.shape[-1] not in SUPPORTED_DW_SIZES:
        raise ValueError(f"{op}: depthwise size must be one of {SUPPORTED_DW_SIZES}, got {cheap_weight.shape[-1]}")
    _check_weight(op, "cheap_weight", cheap_weight, x)
    return cheap


def _check_gate(op: str, gate: Optional[Tensor], gate_mode: str, x: Tensor, out_channels: int) -> None:
    if gate_mode not in reference.GATE_MODES:
        raise ValueError(f"{op}: gate_mode must be one of {reference.GATE_MODES}, got {gate_mode!r}")
    if gate is None:
        return
    _check_same_device(op, "gate", gate, x)
    if gate.dim() != 4 or gate.shape[0] != x.shape[0] or gate.shape[1] != out_channels or (
            x.numel() and min(gate.shape[2:]) < 1):
        raise ValueError(f"{op}: expected gate of shape ({x.shape[0]}, {out_channels}, Hg, Wg) with Hg, Wg >= 1, "
                         f"got {tuple(gate.shape)}")
    if gate.dtype != x.dtype:
        raise TypeError(f"{op}: expected gate dtype {x.dtype} (the input's), got {gate.dtype}")


def _check_act(op: str, act) -> None:
    if not isinstance(act, str) or act not in reference.ACTIVATIONS:
        raise ValueError(f"{op}: expected act to be one of {reference.ACTIVATIONS}, got {act!r}")


def check_ghost_module_args(op: str, x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode,
                            backend: Optional[str] = None, labels=None) -> int:
    """Every check of the Ghost module op; returns out_channels as an int."""
    init, cheap = _check_ghost_weights(op, x, primary_weight, cheap_weight)
    _check_bn(op, "bn1", bn1, init, x, labels)
    _check_bn(op, "bn2", bn2, cheap, x, labels)
    out_channels = _check_out_channels(op, out_channels, init + cheap)
    _check_act(op, act)
    _check_gate(op, gate, gate_mode, x, out_channels)
    if backend is not None:
        _check_backend(op, backend)
    return out_channels


def check_ghost_module_stats_args(op: str, x, primary_weight, bn1, cheap_weight, act, stage,
                                  backend: Optional[str] = None, labels=None) -> None:
    if stage not in (1, 2) or isinstance(stage, bool):
        raise ValueError(f"{op}: stage must be 1 or 2, got {stage!r}")
    init, _ = _check_ghost_weights(op, x, primary_weight, cheap_weight)
    _check_bn(op, "bn1", bn1, init, x, labels)
    _check_act(op, act)
    if x.numel() // max(x.shape[1], 1) < 2:
        raise ValueError(f"{op}: batch statistics need more than 1 value per channel, got input of shape "
                         f"{tuple(x.shape)}")
    if backend is not None:
        _check_backend(op, backend)


def check_dfc_args(op: str, x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode,
                   backend: Optional[str] = None, labels=None) -> None:
    if not isinstance(conv_weight, Tensor) or conv_weight.dim() != 4 or tuple(conv_weight.shape[2:]) != (1, 1) or \
            conv_weight.shape[0] < 1:
        raise ValueError(f"{op}: expected a 1x1 conv_weight [C, C_in, 1, 1] with C >= 1, got "
                         f"{tuple(getattr(conv_weight, 'shape', ()))}")
    c, c_in = conv_weight.shape[:2]
    _check_input(op, x, c_in, min_hw=2)
    _check_weight(op, "conv_weight", conv_weight, x)
    _check_weight(op, "h_weight", h_weight, x, (c, 1, 1, 5))
    _check_weight(op, "v_weight", v_weight, x, (c, 1, 5, 1))
    for stage, bn in (("bn3", bn3), ("bn4", bn4), ("bn5", bn5)):
        _check_bn(op, stage, bn, c, x, labels)
    if mode not in DFC_MODES:
        raise ValueError(f"{op}: mode must be one of {DFC_MODES}, got {mode!r}")
    if backend is not None:
        _check_backend(op, backend)


def _affine_bn(op: str, names: Tuple[str, str], scale: Tensor, shift: Tensor) -> BatchNormParams:
    """Backward ops take folded (scale, shift) vectors: checked as a BatchNormParams of weight and bias."""
    for name, t in zip(names, (scale, shift)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: expected {name} to be a Tensor, got {type(t).__name__}")
    return BatchNormParams.affine(scale, shift)


# the backward ops' names for the folded vectors checked as BatchNormParams(weight=scale, bias=shift)
_GHOST_LABELS = {"bn1": ("primary_scale", "primary_bias"), "bn2": ("cheap_scale", "cheap_bias")}
_DFC_LABELS = {"bn3": ("conv_scale", "conv_bias"), "bn4": ("h_scale", "h_bias"), "bn5": ("v_scale", "v_bias")}


def _check_grad(op: str, name: str, g: Tensor, shape) -> None:
    if not isinstance(g, Tensor) or tuple(g.shape) != tuple(shape):
        raise ValueError(f"{op}: expected {name} of shape {tuple(shape)}, got {tuple(getattr(g, 'shape', ()))}")


def _check_needs(op: str, needs, n: int) -> None:
    if len(needs) != n or not all(isinstance(v, bool) for v in needs):
        raise ValueError(f"{op}: expected needs to be {n} bools, got {list(needs)!r}")


# ----------------------------------------------------------------------------------------------------------
# Forward custom ops. `backend` is a concrete name (a key of BACKENDS), a constant for the graph. Each BatchNorm
# is five arguments: bnK_weight, bnK_bias, bnK_mean, bnK_var (optional vectors) and bnK_eps.
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ghostfast::ghost_module", mutates_args=())
def _ghost_module_op(
    x: Tensor, primary_weight: Tensor,
    bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], bn1_mean: Optional[Tensor], bn1_var: Optional[Tensor],
    bn1_eps: float, cheap_weight: Tensor,
    bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], bn2_mean: Optional[Tensor], bn2_var: Optional[Tensor],
    bn2_eps: float, out_channels: int, act: str, gate: Optional[Tensor], gate_mode: str, backend: str,
) -> Tensor:
    bn1 = BatchNormParams(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps)
    bn2 = BatchNormParams(bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps)
    check_ghost_module_args("ghostfast::ghost_module", x, primary_weight, bn1, cheap_weight, bn2, out_channels, act,
                            gate, gate_mode, backend)
    return BACKENDS[backend].ghost_module(x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate,
                                          gate_mode)


@_ghost_module_op.register_fake
def _(x, primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, cheap_weight, bn2_weight, bn2_bias,
      bn2_mean, bn2_var, bn2_eps, out_channels, act, gate, gate_mode, backend):
    bn1 = BatchNormParams(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps)
    bn2 = BatchNormParams(bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps)
    check_ghost_module_args("ghostfast::ghost_module", x, primary_weight, bn1, cheap_weight, bn2, out_channels, act,
                            gate, gate_mode, backend)
    return _empty_output(x, (x.shape[0], out_channels, x.shape[2], x.shape[3]))


@torch.library.custom_op("ghostfast::ghost_module_stats", mutates_args=())
def _ghost_module_stats_op(
    x: Tensor, primary_weight: Tensor,
    bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], bn1_mean: Optional[Tensor], bn1_var: Optional[Tensor],
    bn1_eps: float, cheap_weight: Tensor, act: str, stage: int, backend: str,
) -> Tuple[Tensor, Tensor]:
    """Training-mode BatchNorm statistics (mean, biased variance) of z1 (stage 1) or z2 (stage 2), in the
    accumulation dtype: `ghostfast.reference.ghost_module_stats`."""
    bn1 = BatchNormParams(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps)
    check_ghost_module_stats_args("ghostfast::ghost_module_stats", x, primary_weight, bn1, cheap_weight, act, stage,
                                  backend)
    return tuple(BACKENDS[backend].ghost_module_stats(x, primary_weight, bn1, cheap_weight, act, stage))


@_ghost_module_stats_op.register_fake
def _(x, primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, cheap_weight, act, stage, backend):
    bn1 = BatchNormParams(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps)
    check_ghost_module_stats_args("ghostfast::ghost_module_stats", x, primary_weight, bn1, cheap_weight, act, stage,
                                  backend)
    n = primary_weight.shape[0] if stage == 1 else cheap_weight.shape[0]
    dt = compute_dtype(x)
    return x.new_empty(n, dtype=dt), x.new_empty(n, dtype=dt)


@torch.library.custom_op("ghostfast::dfc", mutates_args=())
def _dfc_op(
    x: Tensor, conv_weight: Tensor,
    bn3_weight: Optional[Tensor], bn3_bias: Optional[Tensor], bn3_mean: Optional[Tensor], bn3_var: Optional[Tensor],
    bn3_eps: float, h_weight: Tensor,
    bn4_weight: Optional[Tensor], bn4_bias: Optional[Tensor], bn4_mean: Optional[Tensor], bn4_var: Optional[Tensor],
    bn4_eps: float, v_weight: Tensor,
    bn5_weight: Optional[Tensor], bn5_bias: Optional[Tensor], bn5_mean: Optional[Tensor], bn5_var: Optional[Tensor],
    bn5_eps: float, mode: str, backend: str,
) -> Tensor:
    """The DFC gate: at the pooled resolution (mode 'gate') or upsampled to x's H x W ('nearest', 'bilinear')."""
    bn3, bn4, bn5 = (BatchNormParams(bn3_weight, bn3_bias, bn3_mean, bn3_var, bn3_eps),
                     BatchNormParams(bn4_weight, bn4_bias, bn4_mean, bn4_var, bn4_eps),
                     BatchNormParams(bn5_weight, bn5_bias, bn5_mean, bn5_var, bn5_eps))
    check_dfc_args("ghostfast::dfc", x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode, backend)
    return BACKENDS[backend].dfc(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode)


@_dfc_op.register_fake
def _(x, conv_weight, bn3_weight, bn3_bias, bn3_mean, bn3_var, bn3_eps, h_weight, bn4_weight, bn4_bias, bn4_mean,
      bn4_var, bn4_eps, v_weight, bn5_weight, bn5_bias, bn5_mean, bn5_var, bn5_eps, mode, backend):
    bn3, bn4, bn5 = (BatchNormParams(bn3_weight, bn3_bias, bn3_mean, bn3_var, bn3_eps),
                     BatchNormParams(bn4_weight, bn4_bias, bn4_mean, bn4_var, bn4_eps),
                     BatchNormParams(bn5_weight, bn5_bias, bn5_mean, bn5_var, bn5_eps))
    check_dfc_args("ghostfast::dfc", x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode, backend)
    n, _, h, w = x.shape
    c = conv_weight.shape[0]
    return _empty_output(x, (n, c, h // 2, w // 2) if mode == "gate" else (n, c, h, w))


# ----------------------------------------------------------------------------------------------------------
# Backward ops: the fused backward kernels, as custom ops of their own so that a compiled training graph keeps them
# opaque. They take the folded (scale, shift) vectors. No autograd formula: double backward raises a clear error.
# Gradients that are not needed come back as empty placeholders (a custom op cannot return None in a list).
# ----------------------------------------------------------------------------------------------------------


def _grads_or_placeholders(grads, x: Tensor) -> List[Tensor]:
    """Custom-op outputs may not alias each other: kernels that reduce into views of one workspace get their
    gradients cloned apart here (they are per-channel vectors and weights, small)."""
    return [x.new_empty(0) if g is None else g for g in _unaliased(grads)]


def _unaliased(grads) -> List[Optional[Tensor]]:
    """The gradients with any sharing a storage with an earlier one cloned apart (None kept)."""
    seen, out = set(), []
    for g in grads:
        if g is not None:
            ptr = g.untyped_storage().data_ptr()
            g = g.clone() if ptr in seen else g
            seen.add(ptr)
        out.append(g)
    return out


def _fake_grads(inputs: Sequence[Optional[Tensor]], needs: Sequence[bool], x: Tensor) -> List[Tensor]:
    return [torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=output_memory_format(t))
            if (t is not None and need) else x.new_empty(0) for t, need in zip(inputs, needs)]


def _check_ghost_backward(op, grad_out, x, w1, s1, b1, w2, s2, b2, out_channels, act, gate, gate_mode, needs,
                          backend):
    bn1 = _affine_bn(op, ("primary_scale", "primary_bias"), s1, b1)
    bn2 = _affine_bn(op, ("cheap_scale", "cheap_bias"), s2, b2)
    out_channels = check_ghost_module_args(op, x, w1, bn1, w2, bn2, out_channels, act, gate, gate_mode, backend,
                                           labels=_GHOST_LABELS)
    _check_grad(op, "grad_out", grad_out, (x.shape[0], out_channels, x.shape[2], x.shape[3]))
    _check_needs(op, needs, 8)


@torch.library.custom_op("ghostfast::ghost_module_backward", mutates_args=())
def _ghost_module_backward_op(
    grad_out: Tensor, x: Tensor, primary_weight: Tensor, primary_scale: Tensor, primary_bias: Tensor,
    cheap_weight: Tensor, cheap_scale: Tensor, cheap_bias: Tensor, out_channels: int, act: str,
    gate: Optional[Tensor], gate_mode: str, needs: List[bool], backend: str,
) -> List[Tensor]:
    args = (grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
            out_channels, act, gate, gate_mode)
    _check_ghost_backward("ghostfast::ghost_module_backward", *args, needs, backend)
    return _grads_or_placeholders(BACKENDS[backend].ghost_module_backward(*args, list(needs)), x)


@_ghost_module_backward_op.register_fake
def _(grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
      out_channels, act, gate, gate_mode, needs, backend):
    _check_ghost_backward("ghostfast::ghost_module_backward", grad_out, x, primary_weight, primary_scale,
                          primary_bias, cheap_weight, cheap_scale, cheap_bias, out_channels, act, gate, gate_mode,
                          needs, backend)
    inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate)
    return _fake_grads(inputs, needs, x)


def _check_stats_backward(op, x, w1, s1, b1, w2, act, stage, coef_a, coef_c, mean, needs, backend):
    check_ghost_module_stats_args(op, x, w1, _affine_bn(op, ("primary_scale", "primary_bias"), s1, b1), w2, act,
                                  stage, backend, labels=_GHOST_LABELS)
    n = w1.shape[0] if stage == 1 else w2.shape[0]
    for name, t in (("coef_a", coef_a), ("coef_c", coef_c), ("mean", mean)):
        _check_vector(op, name, t, n, x)
    _check_needs(op, needs, 5)


@torch.library.custom_op("ghostfast::ghost_module_stats_backward", mutates_args=())
def _ghost_module_stats_backward_op(
    x: Tensor, primary_weight: Tensor, primary_scale: Tensor, primary_bias: Tensor, cheap_weight: Tensor, act: str,
    stage: int, coef_a: Tensor, coef_c: Tensor, mean: Tensor, needs: List[bool], backend: str,
) -> List[Tensor]:
    """Gradients of sum(dz * z) over the stage's z, dz = coef_a + coef_c * (z - mean) per channel: for (x,
    primary_weight, primary_scale, primary_bias, cheap_weight)."""
    args = (x, primary_weight, primary_scale, primary_bias, cheap_weight, act, stage, coef_a, coef_c, mean)
    _check_stats_backward("ghostfast::ghost_module_stats_backward", *args, needs, backend)
    return _grads_or_placeholders(BACKENDS[backend].ghost_module_stats_backward(*args, list(needs)), x)


@_ghost_module_stats_backward_op.register_fake
def _(x, primary_weight, primary_scale, primary_bias, cheap_weight, act, stage, coef_a, coef_c, mean, needs,
      backend):
    _check_stats_backward("ghostfast::ghost_module_stats_backward", x, primary_weight, primary_scale, primary_bias,
                          cheap_weight, act, stage, coef_a, coef_c, mean, needs, backend)
    inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight)
    return _fake_grads(inputs, [n and (stage == 2 or i < 2) for i, n in enumerate(needs)], x)


def _check_dfc_backward(op, grad, x, cw, s3, b3, hw, s4, b4, vw, s5, b5, mode, needs, backend):
    check_dfc_args(op, x, cw, _affine_bn(op, ("conv_scale", "conv_bias"), s3, b3), hw,
                   _affine_bn(op, ("h_scale", "h_bias"), s4, b4), vw, _affine_bn(op, ("v_scale", "v_bias"), s5, b5),
                   mode, backend, labels=_DFC_LABELS)
    n, _, h, w = x.shape
    c = cw.shape[0]
    _check_grad(op, "grad", grad, (n, c, h // 2, w // 2) if mode == "gate" else (n, c, h, w))
    _check_needs(op, needs, 10)


@torch.library.custom_op("ghostfast::dfc_backward", mutates_args=())
def _dfc_backward_op(
    grad: Tensor, x: Tensor, conv_weight: Tensor, conv_scale: Tensor, conv_bias: Tensor, h_weight: Tensor,
    h_scale: Tensor, h_bias: Tensor, v_weight: Tensor, v_scale: Tensor, v_bias: Tensor, mode: str,
    needs: List[bool], backend: str,
) -> List[Tensor]:
    """Backward of the DFC gate (mode 'gate': `grad` at the pooled resolution; 'nearest' / 'bilinear': at full
    resolution)."""
    args = (grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias, mode)
    _check_dfc_backward("ghostfast::dfc_backward", *args, needs, backend)
    return _grads_or_placeholders(BACKENDS[backend].dfc_backward(*args, list(needs)), x)


@_dfc_backward_op.register_fake
def _(grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias, mode, needs,
      backend):
    _check_dfc_backward("ghostfast::dfc_backward", grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale,
                        h_bias, v_weight, v_scale, v_bias, mode, needs, backend)
    inputs = (x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
    return _fake_grads(inputs, needs, x)


# ----------------------------------------------------------------------------------------------------------
# The depthwise conv + BatchNorm kernel of ghostfast.nn.GhostBottleneck (csrc/depthwise_bn.cpp, CPU) as a
# functional op, for graphs: torch.compile of the bottleneck's direct path records this op. Eager calls run the
# out-variant `_depthwise_bn_kernel` directly (no custom-op dispatch per call). Its autograd (ATen's conv backward
# and the fold's chain rule) makes it a complete op; the bottleneck itself calls it only with nothing to
# differentiate.
# ----------------------------------------------------------------------------------------------------------


def depthwise_output_shape(x: Tensor, kernel_size: int, stride: int, padding: int) -> Tuple[int, int, int, int]:
    """[N, C, H_out, W_out] of a K x K depthwise conv with `stride` and zero `padding` on x [N, C, H, W]."""
    return (x.shape[0], x.shape[1], (x.shape[2] + 2 * padding - kernel_size) // stride + 1,
            (x.shape[3] + 2 * padding - kernel_size) // stride + 1)


@torch.library.custom_op("ghostfast::depthwise_bn", mutates_args=())
def _depthwise_bn_op(x: Tensor, weight: Tensor, bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                     bn_mean: Optional[Tensor], bn_var: Optional[Tensor], bn_eps: float, stride: int,
                     padding: int) -> Tensor:
    out = _empty_output(x, depthwise_output_shape(x, weight.shape[-1], stride, padding))
    torch.ops.ghostfast._depthwise_bn_kernel(x, weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, stride, padding,
                                             out)
    return out


@_depthwise_bn_op.register_fake
def _(x, weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, stride, padding):
    # the kernel checks every argument (and names it) when it runs; here only what the output's shape needs
    if x.dim() != 4 or weight.dim() != 4 or stride < 1 or padding < 0:
        raise ValueError(f"ghostfast::depthwise_bn: expected x [N, C, H, W], weight [C, 1, K, K], stride >= 1, "
                         f"padding >= 0; got x {tuple(x.shape)}, weight {tuple(weight.shape)}, stride {stride}, "
                         f"padding {padding}")
    return _empty_output(x, depthwise_output_shape(x, weight.shape[-1], stride, padding))


def _depthwise_bn_setup(ctx, inputs, output):
    x, weight, bn_weight, bn_bias, bn_mean, bn_var, bn_eps, stride, padding = inputs
    ctx.save_for_backward(x, weight, bn_weight, bn_bias, bn_mean, bn_var)
    ctx.geometry = (bn_eps, stride, padding)


def _depthwise_bn_backward(ctx, grad):
    """y = conv(x, w) * scale + shift per channel: the conv's backward on grad * scale (ATen's), the folded
    vectors' gradients from grad and the recomputed conv, carried to the BatchNorm tensors (fold_bn_backward)."""
    x, weight, *vectors = ctx.saved_tensors
    eps, stride, padding = ctx.geometry
    needs = ctx.needs_input_grad
    bn = BatchNormParams(*vectors, eps)
    scale, _, std = reference.fold_bn_vectors(bn, x.shape[1], grad.dtype, grad.device, keep_std=True)
    grad_x = grad_w = None
    if needs[0] or needs[1]:
        grad_x, grad_w, _ = torch.ops.aten.convolution_backward(
            grad * scale.view(1, -1, 1, 1), x, weight, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0],
            x.shape[1], [needs[0], needs[1], False])
    grad_bn = [None] * 4
    if any(needs[2:6]):
        z = F.conv2d(x, weight, None, stride, padding, 1, x.shape[1])
        grad_bn = reference.fold_bn_backward((grad * z).sum((0, 2, 3)), grad.sum((0, 2, 3)), bn, needs[2:6], scale,
                                             std)
    return (grad_x, grad_w, *grad_bn, None, None, None)


_depthwise_bn_op.register_autograd(_depthwise_bn_backward, setup_context=_depthwise_bn_setup)


# ----------------------------------------------------------------------------------------------------------
# Autograd of the forward ops: fold each BatchNorm (per-channel vectors), run the backend's backward kernel, carry
# the folded vectors' gradients to the BatchNorm tensors.
# ----------------------------------------------------------------------------------------------------------


def _run_backward(op, method: str, *args) -> List[Optional[Tensor]]:
    """A backward op's gradients: on the compiled backends, outside any trace or mode and without create_graph,
    their kernel directly (the registered op's checks repeat the forward's, and the kernels check again: ~100 us a
    call saved); otherwise the registered op (traced by torch.compile; double backward raises there)."""
    *rest, needs, backend = args
    if backend in SELF_CHECKING and _direct(args[0], args[1]):
        return _unaliased(getattr(BACKENDS[backend], method)(*rest, list(needs)))
    return op(*args)


def _setup(ctx, inputs, output, extra: Optional[tuple] = None):
    tensors = [t if isinstance(t, Tensor) else None for t in inputs]
    ctx.tensor_slots = [i for i, t in enumerate(tensors) if t is not None]
    ctx.non_tensors = {i: v for i, v in enumerate(inputs) if not isinstance(v, Tensor)}
    ctx.num_inputs = len(inputs)
    if extra is None:
        extra = (output[0],) if isinstance(output, (tuple, list)) else ()  # the statistics op keeps its mean
    ctx.save_for_backward(*[tensors[i] for i in ctx.tensor_slots], *extra)


def _saved_args(ctx) -> list:
    args = [None] * ctx.num_inputs
    for i, v in ctx.non_tensors.items():
        args[i] = v
    for slot, t in zip(ctx.tensor_slots, ctx.saved_tensors):
        args[slot] = t
    return args


class _Folded(NamedTuple):
    """A BatchNorm folded for the backward: the kernels' (scale, shift) and std, which its chain rule reuses."""
    scale: Tensor
    shift: Tensor
    std: Optional[Tensor]


def _fold_for_backward(bn: BatchNormParams, channels: int, x: Tensor) -> _Folded:
    """(scale, shift, std) in the accumulation dtype, as the forward kernel folded them."""
    return _Folded(*reference.fold_bn_vectors(bn, channels, compute_dtype(x), x.device, keep_std=True))


def _bn_grads(ctx, first: int, bn: BatchNormParams, folded: _Folded, grad_scale, grad_shift) -> List[Optional[Tensor]]:
    """Gradients of the BatchNorm arguments at slots first .. first+4 (eps: None)."""
    needs = [bool(ctx.needs_input_grad[first + i]) for i in range(4)]
    if not any(needs) or grad_scale is None:
        return [None] * 5
    return reference.fold_bn_backward(grad_scale, grad_shift, bn, needs, folded.scale, folded.std) + [None]


def _bn_needed(ctx, first: int) -> bool:
    return any(ctx.needs_input_grad[first:first + 4])


def _ghost_module_backward(ctx, grad_out):
    a = _saved_args(ctx)
    x, w1, w2, out_channels, act, gate, gate_mode, backend = a[0], a[1], a[7], a[13], a[14], a[15], a[16], a[17]
    bn1, bn2 = BatchNormParams(*a[2:7]), BatchNormParams(*a[8:13])
    f1 = _fold_for_backward(bn1, w1.shape[0], x)
    f2 = _fold_for_backward(bn2, w2.shape[0], x)
    need = ctx.needs_input_grad
    n1, n2 = _bn_needed(ctx, 2), _bn_needed(ctx, 8)
    needs = [bool(need[0]), bool(need[1]), n1, n1, bool(need[7]), n2, n2, bool(need[15])]
    g = _run_backward(_ghost_module_backward_op, "ghost_module_backward",
                      grad_out.contiguous(memory_format=output_memory_format(x)), x, w1, f1.scale, f1.shift, w2,
                      f2.scale, f2.shift, out_channels, act, gate, gate_mode, needs, backend)
    g = [t if need_t else None for t, need_t in zip(g, needs)]
    return (g[0], g[1], *_bn_grads(ctx, 2, bn1, f1, g[2], g[3]), g[4], *_bn_grads(ctx, 8, bn2, f2, g[5], g[6]),
            None, None, g[7], None, None)


def _ghost_module_stats_backward(ctx, grad_mean, grad_var):
    """The statistics' gradient reaches z as dz = grad_mean / M + 2 grad_var (z - mean) / M (M = N*H*W)."""
    a = _saved_args(ctx)
    x, w1, w2, act, stage, backend = a[0], a[1], a[7], a[8], a[9], a[10]
    mean = ctx.saved_tensors[len(ctx.tensor_slots)]
    bn1 = BatchNormParams(*a[2:7])
    if grad_mean is None:
        grad_mean = torch.zeros_like(mean)
    if grad_var is None:
        grad_var = torch.zeros_like(mean)
    f1 = _fold_for_backward(bn1, w1.shape[0], x)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    need = ctx.needs_input_grad
    n1 = stage == 2 and _bn_needed(ctx, 2)
    needs = [bool(need[0]), bool(need[1]), n1, n1, stage == 2 and bool(need[7])]
    g = _run_backward(_ghost_module_stats_backward_op, "ghost_module_stats_backward",
                      x, w1, f1.scale, f1.shift, w2, act, stage, grad_mean / m, grad_var * (2.0 / m), mean, needs,
                      backend)
    g = [t if need_t else None for t, need_t in zip(g, needs)]
    bn_grads = _bn_grads(ctx, 2, bn1, f1, g[2], g[3]) if n1 else [None] * 5
    return (g[0], g[1], *bn_grads, g[4], None, None, None)


def _dfc_backward(ctx, grad):
    a = _saved_args(ctx)
    x, cw, hw, vw, mode, backend = a[0], a[1], a[7], a[13], a[19], a[20]
    bns = [BatchNormParams(*a[2:7]), BatchNormParams(*a[8:13]), BatchNormParams(*a[14:19])]
    c = cw.shape[0]
    f3, f4, f5 = [_fold_for_backward(bn, c, x) for bn in bns]
    need = ctx.needs_input_grad
    n3, n4, n5 = _bn_needed(ctx, 2), _bn_needed(ctx, 8), _bn_needed(ctx, 14)
    needs = [bool(need[0]), bool(need[1]), n3, n3, bool(need[7]), n4, n4, bool(need[13]), n5, n5]
    g = _run_backward(_dfc_backward_op, "dfc_backward",
                      grad.contiguous(memory_format=output_memory_format(x)), x, cw, f3.scale, f3.shift, hw,
                      f4.scale, f4.shift, vw, f5.scale, f5.shift, mode, needs, backend)
    g = [t if need_t else None for t, need_t in zip(g, needs)]
    return (g[0], g[1], *_bn_grads(ctx, 2, bns[0], f3, g[2], g[3]), g[4],
            *_bn_grads(ctx, 8, bns[1], f4, g[5], g[6]), g[7], *_bn_grads(ctx, 14, bns[2], f5, g[8], g[9]), None, None)


_ghost_module_op.register_autograd(_ghost_module_backward, setup_context=_setup)
_ghost_module_stats_op.register_autograd(_ghost_module_stats_backward, setup_context=_setup)
_dfc_op.register_autograd(_dfc_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------------
# Training with bn2 on batch statistics, `cpu` backend (issue 13 item 4): one op computes z2's statistics and the
# fused forward; its backward folds the statistics' gradient into the main backward (one reduction pass for bn2's
# (scale, shift) gradients, which give the statistics' gradient coefficients, then one full pass with
# dz2 += a + c (z2 - mean)), instead of a main backward and a separate statistics backward.
# ----------------------------------------------------------------------------------------------------------


@torch.library.custom_op("ghostfast::ghost_module_bn2_batch_stats", mutates_args=())
def _ghost_module_bn2_batch_op(
    x: Tensor, primary_weight: Tensor,
    bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], bn1_mean: Optional[Tensor], bn1_var: Optional[Tensor],
    bn1_eps: float, cheap_weight: Tensor, bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], bn2_eps: float,
    out_channels: int, act: str, gate: Optional[Tensor], gate_mode: str, backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, mean2, var2): the fused Ghost module whose bn2 normalises with the batch mean and biased variance of
    z2 (returned for the running statistics; not differentiable: their gradient is the op's own)."""
    bn1 = BatchNormParams(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps)
    b = BACKENDS[backend]
    mean, var = b.ghost_module_stats(x, primary_weight, bn1, cheap_weight, act, 2)
    bn2 = BatchNormParams(bn2_weight, bn2_bias, mean, var, bn2_eps)
    check_ghost_module_args("ghostfast::ghost_module_bn2_batch_stats", x, primary_weight, bn1, cheap_weight, bn2,
                            out_channels, act, gate, gate_mode, backend)
    return b.ghost_module(x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode), mean, var


@_ghost_module_bn2_batch_op.register_fake
def _(x, primary_weight, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, cheap_weight, bn2_weight, bn2_bias,
      bn2_eps, out_channels, act, gate, gate_mode, backend):
    n = cheap_weight.shape[0]
    vec = torch.empty((n,), dtype=compute_dtype(x), device=x.device)
    bn1 = BatchNormParams(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps)
    check_ghost_module_args("ghostfast::ghost_module_bn2_batch_stats", x, primary_weight, bn1, cheap_weight,
                            BatchNormParams(bn2_weight, bn2_bias, vec, vec, bn2_eps), out_channels, act, gate,
                            gate_mode, backend)
    return _empty_output(x, (x.shape[0], out_channels, x.shape[2], x.shape[3])), vec, torch.empty_like(vec)


def _check_bnstats_backward(*args):
    *ghost, coef_a, coef_c, mean, needs, backend = args
    op = "ghostfast::ghost_module_backward_bnstats"
    _check_ghost_backward(op, *ghost, needs, backend)
    for name, t in (("coef_a", coef_a), ("coef_c", coef_c), ("mean", mean)):
        _check_vector(op, name, t, ghost[5].shape[0], ghost[1])  # cheap_weight's channels, x


@torch.library.custom_op("ghostfast::ghost_module_backward_bnstats", mutates_args=())
def _ghost_module_backward_bnstats_op(
    grad_out: Tensor, x: Tensor, primary_weight: Tensor, primary_scale: Tensor, primary_bias: Tensor,
    cheap_weight: Tensor, cheap_scale: Tensor, cheap_bias: Tensor, out_channels: int, act: str,
    gate: Optional[Tensor], gate_mode: str, coef_a: Tensor, coef_c: Tensor, mean: Tensor, needs: List[bool],
    backend: str,
) -> List[Tensor]:
    """ghost_module_backward's gradients with the statistics' gradient dz2 += coef_a + coef_c * (z2 - mean)."""
    args = (grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
            out_channels, act, gate, gate_mode)
    _check_bnstats_backward(*args, coef_a, coef_c, mean, needs, backend)
    return _grads_or_placeholders(BACKENDS[backend].ghost_module_backward_bnstats(*args, coef_a, coef_c, mean,
                                                                                  list(needs)), x)


@_ghost_module_backward_bnstats_op.register_fake
def _(grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
      out_channels, act, gate, gate_mode, coef_a, coef_c, mean, needs, backend):
    _check_bnstats_backward(grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                            cheap_bias, out_channels, act, gate, gate_mode, coef_a, coef_c, mean, needs, backend)
    inputs = (x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate)
    return _fake_grads(inputs, needs, x)


def _bn2_batch_setup(ctx, inputs, output):
    _setup(ctx, inputs, output, extra=(output[1], output[2]))  # z2's batch mean and var
    ctx.mark_non_differentiable(output[1], output[2])


def _ghost_module_bn2_batch_backward(ctx, grad_out, _grad_mean, _grad_var):
    return _bn2_batch_two_pass_backward(ctx, grad_out, primary=True)


_ghost_module_bn2_batch_op.register_autograd(_ghost_module_bn2_batch_backward, setup_context=_bn2_batch_setup)


# ----------------------------------------------------------------------------------------------------------
# Training with z1 kept (`cpu` backend, float32 / float64): the caller computes z1 = W1 x once by the library
# convolution (as eager does) and bn1's statistics from it by autograd; this op runs the rest of the module from z1
# (bn2 on z2's batch statistics, as above), and its backward returns dz1, the gradient of z1, so autograd finishes
# with the library's convolution backward and var_mean's. The kernels read z1 instead of recomputing it by GEMM in
# each of their passes (two in the forward, two in the backward).
# ----------------------------------------------------------------------------------------------------------

_Z1_OP = "ghostfast::ghost_module_z1"


def check_ghost_module_z1_args(op: str, z1, bn1, cheap_weight, bn2_weight, bn2_bias, out_channels, act, gate,
                               gate_mode, backend: Optional[str] = None, labels=None) -> int:
    if not isinstance(z1, Tensor) or z1.dim() != 4:
        raise ValueError(f"{op}: expected z1 as a 4-D tensor [N, init, H, W], got "
                         f"{tuple(z1.shape) if isinstance(z1, Tensor) else type(z1).__name__}")
    if z1.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: expected z1 of dtype float32 or float64, got {z1.dtype}")
    init = z1.shape[1]
    _check_input(op, z1, init)
    cheap = _check_cheap_weight(op, z1, init, cheap_weight)
    _check_bn(op, "bn1", bn1, init, z1, labels)
    _check_bn(op, "bn2", BatchNormParams(bn2_weight, bn2_bias, None, None, 0.0), cheap, z1, labels)
    out_channels = _check_out_channels(op, out_channels, init + cheap)
    if out_channels < init:
        raise ValueError(f"{op}: expected out_channels >= {init} (z1's channels: every one is kept), got "
                         f"{out_channels}")
    _check_act(op, act)
    _check_gate(op, gate, gate_mode, z1, out_channels)
    if z1.numel() // max(init, 1) < 2:
        raise ValueError(f"{op}: batch statistics need more than 1 value per channel, got z1 of shape "
                         f"{tuple(z1.shape)}")
    if backend is not None and backend != "cpu":
        raise ValueError(f"{op}: runs on the cpu backend only, got backend {backend!r}")
    return out_channels


@torch.library.custom_op(_Z1_OP, mutates_args=())
def _ghost_module_z1_op(
    z1: Tensor, bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], bn1_mean: Optional[Tensor],
    bn1_var: Optional[Tensor], bn1_eps: float, cheap_weight: Tensor, bn2_weight: Optional[Tensor],
    bn2_bias: Optional[Tensor], bn2_eps: float, out_channels: int, act: str, gate: Optional[Tensor], gate_mode: str,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(out, mean2, var2): the Ghost module from z1 = W1 x, bn2 normalising with z2's batch mean and biased
    variance (returned for the running statistics; not differentiable: their gradient is the op's own)."""
    bn1 = BatchNormParams(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps)
    check_ghost_module_z1_args(_Z1_OP, z1, bn1, cheap_weight, bn2_weight, bn2_bias, out_channels, act, gate,
                               gate_mode, backend)
    return BACKENDS[backend].ghost_module_z1(z1, bn1, cheap_weight, bn2_weight, bn2_bias, bn2_eps, out_channels, act,
                                             gate, gate_mode)


@_ghost_module_z1_op.register_fake
def _(z1, bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, cheap_weight, bn2_weight, bn2_bias, bn2_eps,
      out_channels, act, gate, gate_mode, backend):
    bn1 = BatchNormParams(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps)
    check_ghost_module_z1_args(_Z1_OP, z1, bn1, cheap_weight, bn2_weight, bn2_bias, out_channels, act, gate,
                               gate_mode, backend)
    vec = z1.new_empty((cheap_weight.shape[0],))
    return _empty_output(z1, (z1.shape[0], out_channels, z1.shape[2], z1.shape[3])), vec, torch.empty_like(vec)


@torch.library.custom_op("ghostfast::ghost_module_z1_stats", mutates_args=())
def _ghost_module_z1_stats_op(z1: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    """(mean, biased var) of each channel of z1: bn1's batch statistics (torch.var_mean over N, H, W in one
    pass of the kernel, a mean then the squared deviations per chunk)."""
    _check_z1_stats(z1, backend)
    return BACKENDS[backend].ghost_module_z1_stats(z1)


def _check_z1_stats(z1, backend):
    op = "ghostfast::ghost_module_z1_stats"
    if not isinstance(z1, Tensor) or z1.dim() != 4 or z1.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{op}: expected z1 as a 4-D float32 / float64 tensor, got "
                         f"{(tuple(z1.shape), z1.dtype) if isinstance(z1, Tensor) else type(z1).__name__}")
    if z1.numel() // max(z1.shape[1], 1) < 2:
        raise ValueError(f"{op}: batch statistics need more than 1 value per channel, got z1 of shape "
                         f"{tuple(z1.shape)}")
    if backend != "cpu":
        raise ValueError(f"{op}: runs on the cpu backend only, got backend {backend!r}")


@_ghost_module_z1_stats_op.register_fake
def _(z1, backend):
    _check_z1_stats(z1, backend)
    return z1.new_empty((z1.shape[1],)), z1.new_empty((z1.shape[1],))


def _z1_stats_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], output[0])


def _z1_stats_backward(ctx, grad_mean, grad_var):
    """dz1 = grad_mean / M + 2 grad_var (z1 - mean) / M per channel (M = N*H*W), in one pass."""
    z1, mean = ctx.saved_tensors
    m = z1.shape[0] * z1.shape[2] * z1.shape[3]
    if grad_mean is None:
        grad_mean = torch.zeros_like(mean)
    if grad_var is None:
        grad_var = torch.zeros_like(mean)
    c = grad_var * (2.0 / m)
    d = grad_mean / m - c * mean
    return torch.addcmul(d.view(1, -1, 1, 1), z1, c.view(1, -1, 1, 1)), None


_ghost_module_z1_stats_op.register_autograd(_z1_stats_backward, setup_context=_z1_stats_setup)


def _check_z1_backward(grad_out, z1, s1, b1, w2, s2, b2, out_channels, act, gate, gate_mode, coef_a, coef_c, mean,
                       needs, backend):
    op = "ghostfast::ghost_module_z1_backward"
    bn1 = _affine_bn(op, ("primary_scale", "primary_bias"), s1, b1)
    bn2 = _affine_bn(op, ("cheap_scale", "cheap_bias"), s2, b2)
    out_channels = check_ghost_module_z1_args(op, z1, bn1, w2, bn2.weight, bn2.bias, out_channels, act, gate,
                                              gate_mode, backend, labels=_GHOST_LABELS)
    _check_grad(op, "grad_out", grad_out, (z1.shape[0], out_channels, z1.shape[2], z1.shape[3]))
    _check_needs(op, needs, 8)
    if needs[1]:
        raise ValueError(f"{op}: there is no primary weight (z1 is the input); expected needs[1] False")
    for name, t in (("coef_a", coef_a), ("coef_c", coef_c), ("mean", mean)):
        _check_vector(op, name, t, w2.shape[0], z1)


@torch.library.custom_op("ghostfast::ghost_module_z1_backward", mutates_args=())
def _ghost_module_z1_backward_op(
    grad_out: Tensor, z1: Tensor, primary_scale: Tensor, primary_bias: Tensor, cheap_weight: Tensor,
    cheap_scale: Tensor, cheap_bias: Tensor, out_channels: int, act: str, gate: Optional[Tensor], gate_mode: str,
    coef_a: Tensor, coef_c: Tensor, mean: Tensor, needs: List[bool], backend: str,
) -> List[Tensor]:
    """ghost_module_backward_bnstats's gradients with z1 as the input: [z1 (dz1), -, primary_scale, primary_bias,
    cheap_weight, cheap_scale, cheap_bias, gate]."""
    args = (grad_out, z1, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, out_channels, act,
            gate, gate_mode, coef_a, coef_c, mean)
    _check_z1_backward(*args, needs, backend)
    return _grads_or_placeholders(BACKENDS[backend].ghost_module_z1_backward(*args, list(needs)), z1)


@_ghost_module_z1_backward_op.register_fake
def _(grad_out, z1, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, out_channels, act, gate,
      gate_mode, coef_a, coef_c, mean, needs, backend):
    _check_z1_backward(grad_out, z1, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, out_channels,
                       act, gate, gate_mode, coef_a, coef_c, mean, needs, backend)
    inputs = (z1, None, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias, gate)
    return _fake_grads(inputs, needs, z1)


def _ghost_module_z1_backward(ctx, grad_out, _grad_mean, _grad_var):
    return _bn2_batch_two_pass_backward(ctx, grad_out, primary=False)


def _bn2_batch_two_pass_backward(ctx, grad_out, primary: bool):
    """The backward of the two ops whose bn2 normalises with z2's batch statistics: the joint op (primary: its
    arguments x, W1, bn1's five, ...) and the z1 op (z1, bn1's five, ...: every later slot one lower). Pass 1
    computes bn2's (scale, shift) gradients without the primary chain, pass 2 every other gradient through z2's
    statistics too (their gradient as coefficients)."""
    o = int(primary)
    a = _saved_args(ctx)
    x, w2 = a[0], a[6 + o]
    out_channels, act, gate, gate_mode, backend = a[10 + o:15 + o]
    bn1 = BatchNormParams(*a[1 + o:6 + o])
    mean2, var2 = ctx.saved_tensors[len(ctx.tensor_slots):]
    bn2 = BatchNormParams(a[7 + o], a[8 + o], mean2, var2, a[9 + o])
    f1 = _fold_for_backward(bn1, a[1].shape[0] if primary else x.shape[1], x)
    f2 = _fold_for_backward(bn2, w2.shape[0], x)
    need = ctx.needs_input_grad
    n1 = _bn_needed(ctx, 1 + o)
    grad_out = grad_out.contiguous(memory_format=output_memory_format(x))
    args = (x, *a[1:2 * o], f1.scale, f1.shift, w2, f2.scale, f2.shift, out_channels, act, gate, gate_mode)
    if primary:
        first = (_ghost_module_backward_op, "ghost_module_backward", ())
        second = (_ghost_module_backward_bnstats_op, "ghost_module_backward_bnstats")
    else:  # one op for both passes: zero coefficients make pass 1
        zero = torch.zeros_like(mean2)
        first = (_ghost_module_z1_backward_op, "ghost_module_z1_backward", (zero, zero, mean2))
        second = first[:2]
    # 1. bn2's (scale, shift) gradients (the coefficients do not reach them)
    g = _run_backward(*first[:2], grad_out, *args, *first[2], [False] * 5 + [True, True, False], backend)
    g_w, g_b, g_mean, g_var = reference.fold_bn_backward(g[5], g[6], bn2, [need[7 + o], need[8 + o], True, True],
                                                         f2.scale, f2.std)
    m = x.shape[0] * x.shape[2] * x.shape[3]
    # 2. the input's (x or z1) and the other gradients, through z2's statistics too
    needs = [bool(need[0]), primary and bool(need[1]), n1, n1, bool(need[6 + o]), False, False, bool(need[12 + o])]
    g = _run_backward(*second, grad_out, *args, g_mean / m, g_var * (2.0 / m), mean2, needs, backend)
    g = [t if need_t else None for t, need_t in zip(g, needs)]
    return (g[0], *g[1:1 + o], *_bn_grads(ctx, 1 + o, bn1, f1, g[2], g[3]), g[4], g_w if need[7 + o] else None,
            g_b if need[8 + o] else None, None, None, None, g[7], None, None)


_ghost_module_z1_op.register_autograd(_ghost_module_z1_backward, setup_context=_bn2_batch_setup)


def run_ghost_module_z1_stats(z1: Tensor, backend: str) -> Tuple[Tensor, Tensor]:
    return _ghost_module_z1_stats_op(z1, backend)


def run_ghost_module_z1(z1, bn1: BatchNormParams, cheap_weight, bn2_weight, bn2_bias, bn2_eps: float,
                        out_channels: int, act: str, gate, gate_mode: str,
                        backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _ghost_module_z1_op(z1, *bn1, cheap_weight, bn2_weight, bn2_bias, bn2_eps, out_channels, act, gate,
                               gate_mode, backend)


def run_ghost_module_bn2_batch(x, primary_weight, bn1: BatchNormParams, cheap_weight, bn2_weight, bn2_bias,
                               bn2_eps: float, out_channels: int, act: str, gate, gate_mode: str,
                               backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _ghost_module_bn2_batch_op(x, primary_weight, *bn1, cheap_weight, bn2_weight, bn2_bias, bn2_eps,
                                      out_channels, act, gate, gate_mode, backend)


# ----------------------------------------------------------------------------------------------------------
# Running the ops with a resolved backend (what the nn modules call, once per module call), and `auto` on GPUs.
# ----------------------------------------------------------------------------------------------------------


# Backends whose kernels check every argument themselves, with the conditions of check_ghost_module_args /
# check_dfc_args and messages naming what was expected and what came (csrc/common.h, csrc/batch_norm.h,
# csrc/cpu/ghost_module.cpp, csrc/cpu/dfc.cpp, csrc/cuda/*.cuh): the direct path (module calls, whose arguments were
# not checked in Python) does not check them twice (~20 us a Ghost module call, ~30 us a DFC call on a CPU).
SELF_CHECKING = frozenset({"cpu", "cuda"})


def _direct(x: Tensor, *tensors: Optional[Tensor]) -> bool:
    """True when an op call may skip the registered op and run the backend directly (the same checks, the same
    kernel): plain tensors with nothing to differentiate (inference_mode, no_grad, or no input requiring grad), and
    nobody recording ops: no torch.compile / torch.export trace, no dispatch or torch-function mode (profilers,
    FlopCounterMode, fake tensors), no functorch transform. Saves the custom op's dispatch and autograd layers
    (~40 us a call on a CPU, the bulk of a small module's time at batch 1)."""
    if torch.compiler.is_compiling():  # first: constant True under dynamo, which cannot trace the queries below
        return False
    if type(x) is not Tensor or torch._C._len_torch_dispatch_stack() or torch._C._is_torch_function_mode_enabled() \
            or torch._C._are_functorch_transforms_active():
        return False
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *tensors)):
        return False
    return True


class PrimaryConv(NamedTuple):
    """The primary conv's geometry beyond 1x1 stride 1: stride, zero padding and dilation, per axis (its kernel
    size is the weight's)."""

    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)

    @classmethod
    def of(cls, stride=1, padding=0, dilation=1) -> "PrimaryConv":
        def pair(v, what):
            v = (v, v) if isinstance(v, int) else tuple(v)
            if len(v) != 2 or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
                raise ValueError(f"primary conv {what} must be an int or a pair of ints, got {v!r}")
            return v
        geom = cls(pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation"))
        if min(geom.stride) < 1 or min(geom.dilation) < 1 or min(geom.padding) < 0:
            raise ValueError(f"primary conv needs stride >= 1, dilation >= 1, padding >= 0, got {geom}")
        return geom


def primary_columns(x: Tensor, primary_weight: Tensor, primary: Optional[PrimaryConv]) -> Tuple[Tensor, Tensor]:
    """(input, weight) of the fused ops' 1x1 primary GEMM for a k x k / strided primary conv: the conv's patches
    laid out as channels (`F.unfold`, im2col: [N, C_in*kh*kw, H_out, W_out], in x's memory format) and the weight
    as [init, C_in*kh*kw, 1, 1], so the fused kernel's GEMM over channels is the conv and its cheap depthwise runs
    on the conv's (strided) output. A 1x1 conv without padding only subsamples x. Differentiable (autograd's
    unfold / slicing backward carries the gradient to x). A 1x1 stride-1 conv passes through unchanged."""
    kh, kw = primary_weight.shape[-2:]
    geom = primary or PrimaryConv()
    if (kh, kw) == (1, 1) and geom.stride == (1, 1) and geom.padding == (0, 0):
        return x, primary_weight
    fmt = output_memory_format(x)
    if (kh, kw) == (1, 1) and geom.padding == (0, 0):
        cols = x[:, :, ::geom.stride[0], ::geom.stride[1]]
    else:
        _check_input("ghostfast primary conv", x, primary_weight.shape[1])
        h_out = (x.shape[2] + 2 * geom.padding[0] - geom.dilation[0] * (kh - 1) - 1) // geom.stride[0] + 1
        w_out = (x.shape[3] + 2 * geom.padding[1] - geom.dilation[1] * (kw - 1) - 1) // geom.stride[1] + 1
        if h_out < 1 or w_out < 1:
            raise ValueError(f"ghostfast primary conv: input of shape {tuple(x.shape)} is smaller than the kernel "
                             f"{(kh, kw)} with {geom}")
        cols = F.unfold(x, (kh, kw), dilation=geom.dilation, padding=geom.padding, stride=geom.stride)
        cols = cols.view(x.shape[0], -1, h_out, w_out)
    return cols.contiguous(memory_format=fmt), primary_weight.reshape(primary_weight.shape[0], -1, 1, 1)


def run_ghost_module(x, primary_weight, bn1: BatchNormParams, cheap_weight, bn2: BatchNormParams, out_channels: int,
                     act: str, gate: Optional[Tensor], gate_mode: str, backend: str,
                     primary: Optional[PrimaryConv] = None) -> Tensor:
    """The Ghost module op on a resolved backend: a concrete name, or 'auto' with several fused candidates (CUDA:
    settled per shape by measuring). `primary`: the primary conv's stride/padding/dilation (k x k and strided
    primary convs run through `primary_columns`)."""
    x, primary_weight = primary_columns(x, primary_weight, primary)

    def run(name):
        if _direct(x, primary_weight, cheap_weight, gate, *bn1.tensors(), *bn2.tensors()):
            if name not in SELF_CHECKING:
                check_ghost_module_args("ghostfast::ghost_module", x, primary_weight, bn1, cheap_weight, bn2,
                                        out_channels, act, gate, gate_mode, name)
            return BACKENDS[name].ghost_module(x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate,
                                               gate_mode)
        return _ghost_module_op(x, primary_weight, *bn1, cheap_weight, *bn2, out_channels, act, gate, gate_mode,
                                name)

    if backend == "auto":
        key = (tuple(primary_weight.shape), tuple(cheap_weight.shape), out_channels, act,
               None if gate is None else (tuple(gate.shape), gate_mode))
        backend = _fastest("ghost_module", x, run, key, act)
    return run(backend)


def run_dfc(x, conv_weight, bn3: BatchNormParams, h_weight, bn4: BatchNormParams, v_weight, bn5: BatchNormParams,
            mode: str, backend: str) -> Tensor:
    def run(name):
        if _direct(x, conv_weight, h_weight, v_weight, *bn3.tensors(), *bn4.tensors(), *bn5.tensors()):
            if name not in SELF_CHECKING:
                check_dfc_args("ghostfast::dfc", x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode, name)
            return BACKENDS[name].dfc(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode)
        return _dfc_op(x, conv_weight, *bn3, h_weight, *bn4, v_weight, *bn5, mode, name)

    if backend == "auto":
        backend = _fastest("dfc", x, run, (tuple(conv_weight.shape), mode))
    return run(backend)


def run_ghost_module_stats(x, primary_weight, bn1: BatchNormParams, cheap_weight, act: str, stage: int,
                           backend: str, primary: Optional[PrimaryConv] = None) -> Tuple[Tensor, Tensor]:
    x, primary_weight = primary_columns(x, primary_weight, primary)
    return _ghost_module_stats_op(x, primary_weight, *bn1, cheap_weight, act, stage, backend)


_AUTO_CHOICE: dict = {}
_AGREE_TOL = {torch.float64: 1e-8, torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def auto_choices() -> dict:
    """What `auto` picked so far: {(op, shapes...): (backend, {backend: milliseconds})}."""
    return dict(_AUTO_CHOICE)


def _fastest(op: str, x: Tensor, run, key, act: Optional[str] = None) -> str:
    """The faster fused backend for this op and shape, measured once (after checking each against the
    reference); a candidate that fails to compile or launch, or disagrees, is never chosen."""
    full_key = (op, str(x.device), x.dtype, tuple(x.shape), output_memory_format(x) == torch.channels_last, *key)
    if full_key in _AUTO_CHOICE:
        return _AUTO_CHOICE[full_key][0]
    candidates = auto_candidates(x.device, x.dtype, act)
    if not candidates:
        return "reference"
    if len(candidates) == 1 or torch.compiler.is_compiling() or _is_fake(x):
        return candidates[0]  # tracing: no real data to time; the eager run of the same shape decides
    with torch.no_grad():
        ref = run("reference").double()
        times = {}
        for name in candidates:
            try:
                out = run(name)
                err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()
            except Exception as e:  # e.g. Triton's OutOfResources or a compile error: fall back, don't abort
                fallback(f"{op}: backend {name!r} failed for input {tuple(x.shape)} {x.dtype} "
                         f"({type(e).__name__}: {e}); not using it for this shape", strict=False)
                continue
            if not err <= _AGREE_TOL[x.dtype]:  # also catches NaN: a kernel that disagrees is never chosen
                fallback(f"{op}: backend {name!r} disagrees with the reference (relative error {err:.2e}) for "
                         f"input {tuple(x.shape)} {x.dtype}; not using it for this shape", strict=False)
                continue
            times[name] = _time_ms(lambda: run(name), x.device)
    best = min(times, key=times.get) if times else "reference"
    _AUTO_CHOICE[full_key] = (best, times)
    return best


def _time_ms(fn, device: torch.device) -> float:
    """Median milliseconds of fn(): triton.testing.do_bench on a GPU, a wall clock elsewhere."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
    import statistics
    import time

    fn()
    samples = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _is_fake(x: Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(x, FakeTensor)


def _pick_backend(op: str, x: Tensor, backend: Optional[str], strict: Optional[bool], act: Optional[str] = None) -> str:
    """The backend for a public call: a concrete name, or 'auto' when several fused backends compete."""
    strict = default_strict() if strict is None else strict
    if not isinstance(x, Tensor):
        raise TypeError(f"{op}: expected a Tensor input, got {type(x).__name__}")
    name, reason = resolve_backend(backend, x.device, x.dtype if x.dtype in SUPPORTED_DTYPES else None, act=act)
    if reason is not None:
        fallback(f"{op}: {reason}", strict)
    return name


# ----------------------------------------------------------------------------------------------------------
# The public ops.
# ----------------------------------------------------------------------------------------------------------


def ghost_module(x: Tensor, primary_weight: Tensor, bn1, cheap_weight: Tensor, bn2, out_channels: Optional[int] = None,
                 act="relu", gate: Optional[Tensor] = None, gate_mode: str = "nearest", *, stride=1, padding=0,
                 dilation=1, backend: Optional[str] = None, strict: Optional[bool] = None) -> Tensor:
    """Fused Ghost module: `cat(act(bn1(conv(x))), act(bn2(dw(x1))))[:, :out_channels]`, optionally multiplied
    by `upsample(gate, (H_out, W_out), gate_mode)` in the same launch.

    `primary_weight` [init, C_in, kh, kw] (a conv with `stride`, zero `padding` and `dilation`; beyond 1x1
    stride 1 through `primary_columns`), `cheap_weight` [init*(ratio-1), 1, k, k]; `bn1`, `bn2`: BatchNormParams
    (or BatchNorm modules in eval mode, or None); `act`: one of reference.ACTIVATIONS (True: 'relu', False:
    'none'); `gate` [N, out_channels, Hg, Wg]."""
    op = "ghostfast.ops.ghost_module"
    act = _public_act(op, act)
    bn1, bn2 = as_batch_norm(bn1, f"{op}: bn1"), as_batch_norm(bn2, f"{op}: bn2")
    if out_channels is None and isinstance(primary_weight, Tensor) and isinstance(cheap_weight, Tensor):
        out_channels = primary_weight.shape[0] + cheap_weight.shape[0]
    geom = PrimaryConv.of(stride, padding, dilation)
    xc, wc = _checked_columns(op, x, primary_weight, geom)
    out_channels = check_ghost_module_args(op, xc, wc, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode)
    return run_ghost_module(xc, wc, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode,
                            _pick_backend(op, x, backend, strict, act))


def _public_act(op: str, act) -> str:
    try:
        return reference.activation_name(act)
    except ValueError as e:
        raise ValueError(f"{op}: {e}") from None


def _checked_columns(op: str, x, primary_weight, geom: PrimaryConv) -> Tuple[Tensor, Tensor]:
    """primary_columns after checking the input against a 4-D primary weight of any kernel size."""
    if not isinstance(primary_weight, Tensor) or primary_weight.dim() != 4 or primary_weight.shape[0] < 1:
        raise ValueError(f"{op}: expected primary_weight [init, C_in, kh, kw] with init >= 1, got "
                         f"{tuple(getattr(primary_weight, 'shape', ()))}")
    _check_input(op, x, primary_weight.shape[1])
    return primary_columns(x, primary_weight, geom)


def ghost_module_stats(x: Tensor, primary_weight: Tensor, bn1, cheap_weight: Tensor, act, stage: int, *,
                       backend: str, stride=1, padding=0, dilation=1) -> Tuple[Tensor, Tensor]:
    """Training-mode BatchNorm statistics of a Ghost module, per channel over N, H, W: (mean, biased variance) of
    z1 = conv1x1(x) (stage 1; bn1 unused) or of every channel of z2 = dw(act(bn1(z1))) (stage 2). Differentiable
    (gradients flow through the statistics into x, the weights and bn1's tensors). `backend`: a concrete name
    (see `ghostfast.backends.stats_backend`). Returned in float32 (float64 for float64 inputs)."""
    op = "ghostfast.ops.ghost_module_stats"
    act = _public_act(op, act)
    bn1 = as_batch_norm(bn1, f"{op}: bn1")
    x, primary_weight = _checked_columns(op, x, primary_weight, PrimaryConv.of(stride, padding, dilation))
    check_ghost_module_stats_args(op, x, primary_weight, bn1, cheap_weight, act, stage, backend)
    return run_ghost_module_stats(x, primary_weight, bn1, cheap_weight, act, stage, backend)


def dfc(x: Tensor, conv_weight: Tensor, bn3, h_weight: Tensor, bn4, v_weight: Tensor, bn5, mode: str = "gate", *,
        backend: Optional[str] = None, strict: Optional[bool] = None) -> Tensor:
    """Fused DFC attention gate in one launch: sigmoid(bn5(dw5x1(bn4(dw1x5(bn3(conv1x1(avgpool2x2(x)))))))) at the
    pooled resolution [N, C, H//2, W//2] (mode 'gate'), or upsampled to x's H x W (mode 'nearest' or 'bilinear')."""
    op = "ghostfast.ops.dfc"
    bn3, bn4, bn5 = (as_batch_norm(b, f"{op}: {n}") for b, n in ((bn3, "bn3"), (bn4, "bn4"), (bn5, "bn5")))
    check_dfc_args(op, x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode)
    return run_dfc(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode, _pick_backend(op, x, backend, strict))


def dfc_gate(x: Tensor, conv_weight: Tensor, bn3, h_weight: Tensor, bn4, v_weight: Tensor, bn5, *,
             backend: Optional[str] = None, strict: Optional[bool] = None) -> Tensor:
    """The DFC gate at the pooled resolution [N, C, H//2, W//2]: `dfc(..., mode='gate')`."""
    return dfc(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, "gate", backend=backend, strict=strict)


def dfc_attention(x: Tensor, conv_weight: Tensor, bn3, h_weight: Tensor, bn4, v_weight: Tensor, bn5,
                  mode: str = "nearest", *, backend: Optional[str] = None, strict: Optional[bool] = None) -> Tensor:
    """The DFC gate upsampled to x's full H x W (`mode` 'nearest' or 'bilinear'), in one launch."""
    if mode not in reference.GATE_MODES:
        raise ValueError(f"ghostfast.ops.dfc_attention: mode must be one of {reference.GATE_MODES}, got {mode!r}")
    return dfc(x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, mode, backend=backend, strict=strict)
