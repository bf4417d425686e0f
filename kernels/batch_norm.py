"""BatchNorm folded per channel inside a Triton launch, from the live tensors: the Triton side of csrc/batch_norm.h,
shared by the Ghost module and DFC kernels.

A stage's BatchNorm is four optional per-channel vectors and eps, applied as `y = z * scale + shift` with
    scale = weight * 1 / sqrt(var + eps),    shift = bias - mean * scale,
a missing vector standing for the identity (weight 1, bias 0, mean 0; no var: no 1/sqrt). Each vector keeps its own
dtype (float32, float64, float16, bfloat16); the fold runs in the accumulation dtype ACC (float64 for float64
inputs, else float32). A missing vector reaches the kernel as a dummy pointer with its constexpr flag False (flags,
not None-pointer specialisation, which Triton versions treat differently)."""
from __future__ import annotations

from typing import Dict, Sequence, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

_VECTOR_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FIELDS = ("W", "B", "M", "V")

NO_BN = (None, None, None, None, 0.0)  # the identity: scale 1, shift 0


@triton.jit
def _fold_bn(w_ptr, b_ptr, m_ptr, v_ptr, eps, offs, mask, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
             HAS_M: tl.constexpr, HAS_V: tl.constexpr, ACC: tl.constexpr):
    """(scale, shift) in ACC of the channels `offs` (contiguous vectors); masked lanes fold to (0, 0)."""
    if HAS_W:
        scale = tl.load(w_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        scale = tl.where(mask, 1.0, 0.0).to(ACC)
    if HAS_V:
        # eps rounded to ACC first, as the C++ kernels do; masked lanes read 1 so they stay finite
        v = tl.load(v_ptr + offs, mask=mask, other=1.0).to(ACC) + tl.full(offs.shape, eps, ACC)
        # correctly rounded sqrt and divide (not rsqrt, not the fast fp32 ops): the fold matches torch's
        # `weight / torch.sqrt(var + eps)` to the last bit or two
        if ACC == tl.float64:
            scale = scale / tl.sqrt(v)
        else:
            scale = tl.div_rn(scale, tl.sqrt_rn(v))
    if HAS_B:
        shift = tl.load(b_ptr + offs, mask=mask, other=0.0).to(ACC)
    else:
        shift = tl.zeros(offs.shape, dtype=ACC)
    if HAS_M:
        shift = shift - tl.load(m_ptr + offs, mask=mask, other=0.0).to(ACC) * scale
    return scale, shift


def bn_launch_args(bn: Sequence, channels: int, x: Tensor, flag: str) -> Tuple[Tuple[Tensor, ...], float,
                                                                                Dict[str, bool]]:
    """A BatchNorm `(weight, bias, mean, var, eps)` as kernel arguments: the four pointers (x stands in for a
    missing vector, never read), eps as a float, and the constexpr flags `{flag}_HAS_W`, `_B`, `_M`, `_V`.
    Vectors are checked (1-D, `channels` long, on x's device, a floating dtype) and made contiguous."""
    weight, bias, mean, var, eps = bn
    ptrs = []
    flags = {}
    for field, t in zip(_FIELDS, (weight, bias, mean, var)):
        if t is None:
            ptrs.append(x)
            flags[f"{flag}_HAS_{field}"] = False
            continue
        assert t.dim() == 1 and t.shape[0] == channels, f"{flag} vector of shape {tuple(t.shape)}, expected " \
                                                        f"({channels},)"
        assert t.device == x.device and t.dtype in _VECTOR_DTYPES, (t.device, t.dtype)
        ptrs.append(t.contiguous())
        flags[f"{flag}_HAS_{field}"] = True
    return tuple(ptrs), float(eps), flags
