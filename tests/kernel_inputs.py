"""Input and parameter builders shared by the forward and backward kernel tests, so that both directions are
checked on the same data.

Each builder draws its random numbers in the same order the tests always have, so the seeded data is unchanged."""
import math

import pytest
import torch
import torch.nn.functional as F

from ghostfast import reference

DFC_MODES = (None, "nearest", "bilinear")  # None: the pooled-resolution gate


def make_dfc_params(cin, c, dtype, device):
    """The nine folded DFC parameters: 1x1 conv, 1x5 and 5x1 depthwise, each with a BN scale and bias."""
    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    def pos(c):
        return torch.rand(c, dtype=torch.float64) + 0.5

    # Biases of ~1.5 make the border visibly different between "zero pad the biased output" (the spec)
    # and "pad then add the bias" (see dfc_pad_then_bias_logits).
    p = [rnd(c, cin, 1, 1) / cin ** 0.5, pos(c), 1.5 * rnd(c),
         rnd(c, 1, 1, 5) / 5 ** 0.5, pos(c), 1.5 * rnd(c),
         rnd(c, 1, 5, 1) / 5 ** 0.5, pos(c), 1.5 * rnd(c)]
    return [t.to(device=device, dtype=dtype) for t in p]


def dfc_out_shape(x, c, mode):
    n, _, h, w = x.shape
    return (n, c, h, w) if mode else (n, c, h // 2, w // 2)


def dfc_reference(x, params, mode):
    """The eager reference in float64 (autograd flows through: .double() of a float64 leaf is the leaf)."""
    xd, pd = x.double(), [t.double() for t in params]
    if mode is None:
        return reference.dfc_gate_forward(xd, *pd)
    return reference.dfc_attention_forward(xd, *pd, mode=mode)


def dfc_pad_then_bias_logits(x, params):
    """The gate's pre-sigmoid logits under the wrong border rule: each depthwise conv pads the *unbiased* output,
    so its padded border carries the previous bias. The border tests need data that tells this from the spec."""
    cw, cs, cb, hw, hs, hb, vw, vs, vb = params
    c = cw.shape[0]

    def conv_pad_then_bias(y, b, weight, pad):
        b = b.view(1, -1, 1, 1)
        return F.conv2d(F.pad(y - b, pad) + b, weight, groups=c)

    y = F.conv2d(F.avg_pool2d(x, 2), cw) * cs.view(1, -1, 1, 1) + cb.view(1, -1, 1, 1)
    y = conv_pad_then_bias(y, cb, hw, (2, 2, 0, 0)) * hs.view(1, -1, 1, 1) + hb.view(1, -1, 1, 1)
    return conv_pad_then_bias(y, hb, vw, (0, 0, 2, 2)) * vs.view(1, -1, 1, 1) + vb.view(1, -1, 1, 1)


def make_ghost_params(c_in, init, ratio, dw, dtype, device):
    """The six folded Ghost module parameters, keyed as ghost_module_forward/backward take them."""
    cheap = init * (ratio - 1)
    return dict(
        primary_weight=torch.randn(init, c_in, 1, 1, device=device).div(math.sqrt(c_in)).to(dtype),
        primary_scale=(torch.rand(init, device=device) + 0.5).to(dtype),
        primary_bias=(torch.randn(init, device=device) * 0.5).to(dtype),
        cheap_weight=(torch.randn(cheap, 1, dw, dw, device=device) / dw).to(dtype),
        cheap_scale=(torch.rand(cheap, device=device) + 0.5).to(dtype),
        cheap_bias=(torch.randn(cheap, device=device) * 0.5).to(dtype),
    )


def make_input(n, c_in, h, w, dtype, device, layout):
    """A fresh random input in `layout`: "contiguous", "channels_last" or "slice" (no dense layout at all)."""
    if layout == "slice":
        return torch.randn(n, c_in + 5, h, w, device=device).to(dtype)[:, 2:2 + c_in]
    return to_layout(torch.randn(n, c_in, h, w, device=device).to(dtype), layout)


def to_layout(t, layout):
    """`t`'s values in `layout`; a "slice" is a channel slice of a bigger random tensor (no dense layout at all)."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "slice":
        n, c, h, w = t.shape
        big = torch.randn(n, c + 5, h, w, device=t.device, dtype=t.dtype)
        big[:, 2:2 + c] = t
        return big[:, 2:2 + c]
    return t


def skip_unsupported(dtype, device):
    """Skip a dtype the kernel backend under test has no kernels for (the Triton interpreter: bfloat16)."""
    import kernel_backends

    why = kernel_backends.unsupported_dtype(dtype)
    if why is not None:
        pytest.skip(why)


def ghost_case_id(case):
    """Test id of a Ghost module case tuple: (N, C_in, H, W, init, ratio, dw, out_channels, relu, dtype, layout,
    ..., gate_mode); the backward cases carry a gate shape before the mode, which the id leaves out."""
    n, ci, h, w, init, ratio, dw, oc, relu, dtype, layout = case[:11]
    return f"n{n}-cin{ci}-{h}x{w}-init{init}-r{ratio}-dw{dw}-out{oc}-{'relu' if relu else 'id'}-" \
           f"{str(dtype).split('.')[-1]}-{layout}-{case[-1]}"
