"""The eager-PyTorch math of the Ghost module and of DFC attention: the spec every backend is tested against.

All functions take NCHW (or channels_last) tensors and BatchNorm already folded into per-channel `scale` and
`bias` (see `fold_bn`). They are also the `reference` backend, so they must stay plain, differentiable PyTorch.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GATE_MODES = ("nearest", "bilinear")


def fold_bn(bn: nn.BatchNorm2d, conv_bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as `y = x * scale + bias` (a conv bias before the BN folds into `bias`)."""
    if bn.running_var is None or bn.running_mean is None:
        raise ValueError("fold_bn needs running statistics (track_running_stats=True)")
    inv_std = torch.rsqrt(bn.running_var + bn.eps)
    scale = inv_std if bn.weight is None else bn.weight * inv_std
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    if conv_bias is not None:
        shift = shift + conv_bias * scale
    return scale, shift


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
    relu: bool = True,
    gate: Optional[Tensor] = None,  # [N, out_channels, Hg, Wg], already through the sigmoid
    gate_mode: str = "nearest",
) -> Tensor:
    """`cat(act(BN1(conv1x1(x))), act(BN2(dw(x1))))[:, :out_channels]`, optionally times upsample(gate)."""
    init = primary_weight.shape[0]
    dw = cheap_weight.shape[-1]
    x1 = _affine(F.conv2d(x, primary_weight), primary_scale, primary_bias)
    if relu:
        x1 = F.relu(x1)
    x2 = _affine(F.conv2d(x1, cheap_weight, padding=dw // 2, groups=init), cheap_scale, cheap_bias)
    if relu:
        x2 = F.relu(x2)
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
    relu: bool,
    stage: int,
) -> Tuple[Tensor, Tensor]:
    """Training-mode BatchNorm statistics of a Ghost module's two pre-BN activations: per channel, over N, H and W,
    the mean and the biased variance (what `nn.BatchNorm2d` normalises with in training mode).

    stage 1: of `z1 = conv1x1(x)`, the primary conv's output ([init] each).
    stage 2: of `z2 = dw(act(z1 * scale + bias))`, the cheap depthwise's output, every one of its channels
    ([init * (ratio - 1)] each), whatever `out_channels` later keeps: BatchNorm updates all of them."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    z = F.conv2d(x, primary_weight)
    if stage == 2:
        x1 = _affine(z, primary_scale, primary_bias)
        if relu:
            x1 = F.relu(x1)
        dw = cheap_weight.shape[-1]
        z = F.conv2d(x1, cheap_weight, padding=dw // 2, groups=primary_weight.shape[0])
    var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    return mean, var


def batch_norm_train_fold(mean: Tensor, var: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                          eps: float) -> Tuple[Tensor, Tensor]:
    """Training-mode BatchNorm of z with batch statistics (`mean`, biased `var` of z) as `z * scale + shift`;
    differentiable in all of its tensors, so gradients flow through the batch statistics."""
    inv_std = torch.rsqrt(var + eps)
    scale = inv_std if weight is None else weight * inv_std
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift


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
