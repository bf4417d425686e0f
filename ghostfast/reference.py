"""The eager-PyTorch math of the Ghost module and of DFC attention: the spec every backend is tested against.

The op functions take NCHW (or channels_last) tensors and BatchNorm folded into per-channel `scale` and `bias`
(`fold_bn` folds a `BatchNormParams`, the live-tensor form the kernels take, exactly as the kernels do). They are also the `reference` backend, so they must stay plain, differentiable PyTorch.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_MODES = ("nearest", "bilinear")

# The activations of both halves of a Ghost module (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, or none), by name; the
# kernels take them as these codes (ACT_CODES[name]), the same in every backend.
ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu")
ACT_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}


def activation_name(act) -> str:
    """The activation's name: one of ACTIVATIONS, or a bool (the v0.4 `relu` flag: True is 'relu', False 'none')."""
    if isinstance(act, bool):
        return "relu" if act else "none"
    if isinstance(act, str) and act in ACTIVATIONS:
        return act
    raise ValueError(f"activation must be one of {ACTIVATIONS} (or a bool: relu or none), got {act!r}")


def activation(z: Tensor, act) -> Tensor:
    """The activation named `act` as eager PyTorch computes it (F.relu, F.relu6, F.hardswish, F.silu)."""
    act = activation_name(act)
    if act == "none":
        return z
    return {"relu": F.relu, "relu6": F.relu6, "hardswish": F.hardswish, "silu": F.silu}[act](z)


class BatchNormParams(NamedTuple):
    """A BatchNorm as the live tensors the kernels fold per channel: `y = z * scale + shift` with
    `scale = weight / sqrt(var + eps)`, `shift = bias - mean * scale`. A missing tensor (None) is the identity
    (weight 1, bias 0, mean 0; no var: no 1/sqrt), so one form covers an eval-mode BatchNorm (running statistics),
    a training-mode one (batch statistics as mean and var), affine=False, a conv bias without BatchNorm
    (bias only), an already folded (scale, shift) pair (weight, bias) and no normalisation at all."""

    weight: Optional[Tensor] = None
    bias: Optional[Tensor] = None
    mean: Optional[Tensor] = None
    var: Optional[Tensor] = None
    eps: float = 0.0

    @classmethod
    def of(cls, bn: nn.Module) -> "BatchNormParams":
        """An eval-mode BatchNorm module's live tensors (no copy, no arithmetic)."""
        if bn.running_var is None or bn.running_mean is None:
            raise ValueError("BatchNormParams.of needs running statistics (track_running_stats=True)")
        return cls(bn.weight, bn.bias, bn.running_mean, bn.running_var, float(bn.eps))

    @classmethod
    def affine(cls, scale: Optional[Tensor], shift: Optional[Tensor]) -> "BatchNormParams":
        """An already folded `z * scale + shift`."""
        return cls(scale, shift, None, None, 0.0)

    def tensors(self) -> Tuple[Optional[Tensor], ...]:
        return (self.weight, self.bias, self.mean, self.var)


def _fold(bn: BatchNormParams, dt: torch.dtype, n: int, device) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """(scale, shift, std) of a BatchNormParams in dtype `dt`: scale = weight / std, shift = bias - mean * scale,
    std = sqrt(var + eps) (None without var); a missing vector is the identity."""
    def get(t, default):
        return torch.full((n,), default, dtype=dt, device=device) if t is None else t.to(dt)

    std = None if bn.var is None else torch.sqrt(bn.var.to(dt) + bn.eps)
    scale = get(bn.weight, 1.0)
    if std is not None:
        scale = scale / std
    shift = get(bn.bias, 0.0) - get(bn.mean, 0.0) * scale
    return scale, shift, std


def fold_bn(bn, conv_bias: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """(scale, shift) of `y = z * scale + shift` for a BatchNormParams (or an eval-mode BatchNorm module), in
    `dtype` (default: the tensors' own); a conv bias before the BN folds into `shift`. Differentiable."""
    if not isinstance(bn, BatchNormParams):
        bn = BatchNormParams.of(bn)
    present = [t for t in bn.tensors() if t is not None] + ([conv_bias] if conv_bias is not None else [])
    if not present:
        raise ValueError("fold_bn: every tensor is None; the channel count is unknown")
    ref = present[0]
    dt = dtype or ref.dtype
    scale, shift, _ = _fold(bn, dt, ref.shape[0], ref.device)
    if conv_bias is not None:
        shift = shift + conv_bias.to(dt) * scale
    return scale, shift


def fold_bn_vectors(bn: BatchNormParams, channels: int, dtype: torch.dtype, device,
                    keep_std: bool = False) -> Tuple[Tensor, ...]:
    """`fold_bn` for any BatchNormParams, the all-None one included (scale 1, shift 0), without autograd: the
    per-channel vectors the backward kernels take (and the reference backend applies). keep_std: also std =
    sqrt(var + eps) (None without var), which `fold_bn_backward` then reuses instead of recomputing."""
    with torch.no_grad():
        scale, shift, std = _fold(bn, dtype, channels, device)
    return (scale, shift, std) if keep_std else (scale, shift)


def fold_bn_backward(grad_scale: Optional[Tensor], grad_shift: Optional[Tensor], bn: BatchNormParams,
                     needs: Sequence[bool], scale: Optional[Tensor] = None,
                     std: Optional[Tensor] = None) -> List[Optional[Tensor]]:
    """Gradients of (weight, bias, mean, var) of a BatchNormParams from those of its folded (scale, shift)
    (the chain rule through `fold_bn`), each in its tensor's dtype; None where not needed or the tensor is None.
    Computed in the gradients' (accumulation) dtype; `scale` and `std` from `fold_bn_vectors(keep_std=True)`
    spare recomputing them (both or neither)."""
    weight, bias, mean, var, eps = bn
    gs = grad_scale
    gt = grad_shift
    dt = (gs if gs is not None else gt).dtype
    if scale is None:
        scale, _, std = _fold(bn, dt, gt.shape[0], gt.device)
    # shift = bias - mean * scale: the gradient reaching scale through shift is -mean * grad_shift
    gs_total = gs if mean is None else gs - mean.to(dt) * gt
    out: List[Optional[Tensor]] = [None] * 4
    if needs[0] and weight is not None:
        out[0] = (gs_total if std is None else gs_total / std).to(weight.dtype)
    if needs[1] and bias is not None:
        out[1] = gt.to(bias.dtype)
    if needs[2] and mean is not None:
        out[2] = (-gt * scale).to(mean.dtype)
    if needs[3] and var is not None:
        # d scale / d var = -scale / (2 (var + eps))
        out[3] = (-0.5 * gs_total * scale / (std * std)).to(var.dtype)
    return out


def _affine(y: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    return y * scale.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def upsample_gate(gate: Tensor, size: Tuple[int, int], mode: str = "nearest") -> Tensor:
    """Resize the low-resolution gate to the full `size`, index for index as `F.interpolate` does."""
    if mode not in GATE_MODES:
        raise ValueError(f"gate mode must be one of {GATE_MODES}, got {mode!r}")
    if mode == "nearest":
        return F.interpolate(gate, size=size, mode="nearest")
    return F.interpolate(gate, size=size, mode="bilinear", align_corners=False)


def ghost_module_forward(
    x: Tensor,
    primary_weight: Tensor,  # [init, C_in, 1, 1]
    primary_scale: Tensor,  # [init]
    primary_bias: Tensor,  # [init]
    cheap_weight: Tensor,  # [init * (ratio - 1), 1, dw, dw]
    cheap_scale: Tensor,  # [init * (ratio - 1)]
    cheap_bias: Tensor,  # [init * (ratio - 1)]
    out_channels: int,
    act: str = "relu",
    gate: Optional[Tensor] = None,  # [N, out_channels, Hg, Wg], already through the sigmoid
    gate_mode: str = "nearest",
) -> Tensor:
    """`cat(act(BN1(conv1x1(x))), act(BN2(dw(x1))))[:, :out_channels]`, optionally times upsample(gate); `act` one of
    ACTIVATIONS (a bool: relu or none)."""
    init = primary_weight.shape[0]
    dw = cheap_weight.shape[-1]
    x1 = _affine(F.conv2d(x, primary_weight), primary_scale, primary_bias)
    x1 = activation(x1, act)
    x2 = activation(_affine(F.conv2d(x1, cheap_weight, padding=dw // 2, groups=init), cheap_scale, cheap_bias), act)
    out = torch.cat([x1, x2], dim=1)[:, :out_channels]
    if gate is not None:
        out = out * upsample_gate(gate, (out.shape[-2], out.shape[-1]), gate_mode)
    return out


def ghost_module_stats(
    x: Tensor,
    primary_weight: Tensor,  # [init, C_in, 1, 1]
    primary_scale: Tensor,  # [init]   (stage 2 only)
    primary_bias: Tensor,  # [init]   (stage 2 only)
    cheap_weight: Tensor,  # [init * (ratio - 1), 1, dw, dw]   (stage 2 only)
    act: str,
    stage: int,
) -> Tuple[Tensor, Tensor]:
    """Training-mode BatchNorm statistics of a Ghost module's two pre-BN activations: per channel, over N, H and W,
    the mean and the biased variance (what `nn.BatchNorm2d` normalises with in training mode).

    stage 1: of `z1 = conv1x1(x)`, the primary conv's output ([init] each).
    stage 2: of `z2 = dw(act(z1 * scale + bias))`, the cheap depthwise's output, every one of its channels
    ([init * (ratio - 1)] each), whatever `out_channels` later keeps: BatchNorm updates all of them."""
    var, mean = torch.var_mean(ghost_module_preactivation(x, primary_weight, primary_scale, primary_bias, cheap_weight,
                                                          act, stage), dim=(0, 2, 3), unbiased=False)
    return mean, var


def ghost_module_preactivation(x: Tensor, primary_weight: Tensor, primary_scale: Optional[Tensor],
                               primary_bias: Optional[Tensor], cheap_weight: Tensor, act: str, stage: int) -> Tensor:
    """z1 = conv1x1(x) (stage 1) or z2 = dw(act(z1 * scale + bias)) (stage 2): what a BatchNorm normalises."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    z = F.conv2d(x, primary_weight)
    if stage == 2:
        x1 = activation(_affine(z, primary_scale, primary_bias), act)
        dw = cheap_weight.shape[-1]
        z = F.conv2d(x1, cheap_weight, padding=dw // 2, groups=primary_weight.shape[0])
    return z


def dfc_gate_forward(
    x: Tensor,
    conv_weight: Tensor,  # [C, C_in, 1, 1]
    conv_scale: Tensor,  # [C]
    conv_bias: Tensor,  # [C]
    h_weight: Tensor,  # [C, 1, 1, 5]
    h_scale: Tensor,
    h_bias: Tensor,
    v_weight: Tensor,  # [C, 1, 5, 1]
    v_scale: Tensor,
    v_bias: Tensor,
) -> Tensor:
    """DFC attention at the pooled resolution: sigmoid(BN5(dw5x1(BN4(dw1x5(BN3(conv1x1(avgpool2x2(x)))))))).

    Zero padding of each depthwise conv applies to the biased output of the stage before it."""
    c = conv_weight.shape[0]
    y = F.avg_pool2d(x, kernel_size=2, stride=2)
    y = _affine(F.conv2d(y, conv_weight), conv_scale, conv_bias)
    kh, kw = h_weight.shape[-2:]
    y = _affine(F.conv2d(y, h_weight, padding=(kh // 2, kw // 2), groups=c), h_scale, h_bias)
    kh, kw = v_weight.shape[-2:]
    y = _affine(F.conv2d(y, v_weight, padding=(kh // 2, kw // 2), groups=c), v_scale, v_bias)
    return torch.sigmoid(y)


def dfc_attention_forward(x: Tensor, *dfc_params: Tensor, mode: str = "nearest") -> Tensor:
    """The DFC gate upsampled back to x's H x W: what GhostModuleV2 multiplies the Ghost output by."""
    gate = dfc_gate_forward(x, *dfc_params)
    return upsample_gate(gate, (x.shape[-2], x.shape[-1]), mode)


def depthwise_bn_forward(x: Tensor, weight: Tensor, bn: BatchNormParams, stride: int, padding: int) -> Tensor:
    """A K x K depthwise conv (zero padding, `stride`) followed by a folded BatchNorm: the kernel
    `_depthwise_bn_kernel` (csrc/depthwise_bn.cpp) that GhostBottleneck's direct path runs for conv_dw -> bn_dw and
    the shortcut's depthwise conv -> BatchNorm."""
    scale, shift = fold_bn_vectors(bn, x.shape[1], x.dtype, x.device)
    y = F.conv2d(x, weight, None, stride, padding, 1, x.shape[1])
    return y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
