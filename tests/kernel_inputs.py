"""Input and parameter builders shared by the forward and backward kernel tests, so that both directions are
checked on the same data.

Parameters carry each BatchNorm as live tensors (`BatchNormParams`: weight ~U(0.5, 1.5), bias ~N(0, 0.5),
mean ~N(0, 0.5), var ~U(0.5, 1.5), eps), as the forward kernels take them; the backward kernels take them folded
(`fold_ghost_params`, `fold_dfc_params`: per-channel scale and shift, as the op's autograd folds them). The float64
references fold the same BatchNorms with `ghostfast.reference.fold_bn`.

The weights and the BN weight and bias are drawn in the order the tests always drew the folded scale and bias, the
running statistics after them."""
import math

import pytest
import torch
import torch.nn.functional as F

from ghostfast import reference
from ghostfast.reference import BatchNormParams

DFC_MODES = ("gate", "nearest", "bilinear")  # 'gate': the pooled-resolution gate
BN_FIELDS = ("weight", "bias", "mean", "var")


def acc_dtype(dtype):
    """The kernels' accumulation dtype for inputs of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def random_bn_stats(weight, bias, eps, bn_dtype, device):
    """A BatchNormParams of `weight`, `bias` (already drawn) and freshly drawn running statistics, in `bn_dtype`."""
    c = weight.shape[0]
    mean = torch.randn(c, device=device) * 0.5
    var = torch.rand(c, device=device) + 0.5
    return BatchNormParams(*(t.to(device=device, dtype=bn_dtype) for t in (weight, bias, mean, var)), float(eps))


def without(bn, *fields):
    """`bn` with the named tensors missing (None: the identity for that tensor)."""
    return bn._replace(**{f: None for f in fields})


def strided(bn):
    """`bn` with every tensor a stride-2 view (not contiguous), same values."""
    def spread(t):
        if t is None:
            return None
        big = torch.full((2 * t.shape[0],), float("nan"), dtype=t.dtype, device=t.device)
        big[::2] = t
        return big[::2]

    return BatchNormParams(*(spread(t) for t in bn.tensors()), bn.eps)


# ---- the DFC -------------------------------------------------------------------------------------------------


def make_dfc_params(cin, c, dtype, device, bn_dtype=None, eps=(1e-5, 1e-5, 1e-5)):
    """[conv_weight, bn3, h_weight, bn4, v_weight, bn5], as dfc_forward takes them after x."""
    bn_dtype = bn_dtype or dtype

    def rnd(*shape):
        return torch.randn(*shape, dtype=torch.float64)

    def pos(c):
        return torch.rand(c, dtype=torch.float64) + 0.5

    # Folded shifts (bias - mean * scale) of ~0.7 make the border visibly different between "zero pad the biased
    # output" (the spec) and "pad then add the bias" (see dfc_pad_then_bias_logits).
    drawn = [rnd(c, cin, 1, 1) / cin ** 0.5, pos(c), 0.5 * rnd(c),
             rnd(c, 1, 1, 5) / 5 ** 0.5, pos(c), 0.5 * rnd(c),
             rnd(c, 1, 5, 1) / 5 ** 0.5, pos(c), 0.5 * rnd(c)]
    weights = [t.to(device=device, dtype=dtype) for t in drawn[0::3]]
    bns = [random_bn_stats(drawn[3 * i + 1], drawn[3 * i + 2], eps[i], bn_dtype, device) for i in range(3)]
    return [weights[0], bns[0], weights[1], bns[1], weights[2], bns[2]]


def fold_dfc_params(params, dtype):
    """The nine folded DFC parameters [conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight,
    v_scale, v_bias]: weights as given, each BN folded to (scale, shift) in `dtype` (the backward kernels take the
    accumulation dtype)."""
    cw, bn3, hw, bn4, vw, bn5 = params
    c = cw.shape[0]
    out = []
    for w, bn in ((cw, bn3), (hw, bn4), (vw, bn5)):
        out += [w, *reference.fold_bn_vectors(bn, c, dtype, w.device)]
    return out


def dfc_out_shape(x, c, mode):
    n, _, h, w = x.shape
    return (n, c, h // 2, w // 2) if mode == "gate" else (n, c, h, w)


def dfc_folded_reference(x, folded, mode):
    """The eager reference on folded parameters in float64 (autograd flows through: .double() of a float64 leaf is
    the leaf)."""
    xd, pd = x.double(), [t.double() for t in folded]
    if mode == "gate":
        return reference.dfc_gate_forward(xd, *pd)
    return reference.dfc_attention_forward(xd, *pd, mode=mode)


def dfc_reference(x, params, mode):
    """The eager reference in float64, each BatchNorm folded with reference.fold_bn in float64."""
    return dfc_folded_reference(x, fold_dfc_params(params, torch.float64), mode)


def dfc_pad_then_bias_logits(x, folded):
    """The gate's pre-sigmoid logits under the wrong border rule: each depthwise conv pads the *unbiased* output,
    so its padded border carries the previous bias. The border tests need data that tells this from the spec."""
    cw, cs, cb, hw, hs, hb, vw, vs, vb = folded
    c = cw.shape[0]

    def conv_pad_then_bias(y, b, weight, pad):
        b = b.view(1, -1, 1, 1)
        return F.conv2d(F.pad(y - b, pad) + b, weight, groups=c)

    y = F.conv2d(F.avg_pool2d(x, 2), cw) * cs.view(1, -1, 1, 1) + cb.view(1, -1, 1, 1)
    y = conv_pad_then_bias(y, cb, hw, (2, 2, 0, 0)) * hs.view(1, -1, 1, 1) + hb.view(1, -1, 1, 1)
    return conv_pad_then_bias(y, hb, vw, (0, 0, 2, 2)) * vs.view(1, -1, 1, 1) + vb.view(1, -1, 1, 1)


# ---- the Ghost module ------------------------------------------------------------------------------------------


def make_ghost_params(c_in, init, ratio, dw, dtype, device, bn_dtype=None, eps=(1e-5, 1e-5)):
    """{primary_weight, bn1, cheap_weight, bn2}, keyed as ghost_module_forward takes them."""
    cheap = init * (ratio - 1)
    bn_dtype = bn_dtype or dtype
    w1 = torch.randn(init, c_in, 1, 1, device=device).div(math.sqrt(c_in)).to(dtype)
    bn1_weight = torch.rand(init, device=device) + 0.5
    bn1_bias = torch.randn(init, device=device) * 0.5
    w2 = (torch.randn(cheap, 1, dw, dw, device=device) / dw).to(dtype)
    bn2_weight = torch.rand(cheap, device=device) + 0.5
    bn2_bias = torch.randn(cheap, device=device) * 0.5
    return dict(primary_weight=w1, bn1=random_bn_stats(bn1_weight, bn1_bias, eps[0], bn_dtype, device),
                cheap_weight=w2, bn2=random_bn_stats(bn2_weight, bn2_bias, eps[1], bn_dtype, device))


def fold_ghost_params(p, dtype):
    """The six folded Ghost module parameters, keyed as ghost_module_backward takes them: weights as given, each BN
    folded to (scale, shift) in `dtype`."""
    w1, w2 = p["primary_weight"], p["cheap_weight"]
    s1, b1 = reference.fold_bn_vectors(p["bn1"], w1.shape[0], dtype, w1.device)
    s2, b2 = reference.fold_bn_vectors(p["bn2"], w2.shape[0], dtype, w2.device)
    return dict(primary_weight=w1, primary_scale=s1, primary_bias=b1, cheap_weight=w2, cheap_scale=s2, cheap_bias=b2)


def ghost_reference(x, p, out_channels, act, gate=None, gate_mode="nearest"):
    """The eager reference in float64, each BatchNorm folded with reference.fold_bn in float64."""
    f = fold_ghost_params(p, torch.float64)
    return reference.ghost_module_forward(x.double(), *[t.double() for t in f.values()], out_channels=out_channels,
                                          act=act, gate=None if gate is None else gate.double(),
                                          gate_mode=gate_mode)


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


def act_id(act):
    """A test id's activation: its name, or the v0.4 flag's (True: relu, False: id)."""
    if isinstance(act, bool):
        return "relu" if act else "id"
    return act


def ghost_case_id(case):
    """Test id of a Ghost module case tuple: (N, C_in, H, W, init, ratio, dw, out_channels, act, dtype, layout,
    ..., gate_mode); the backward cases carry a gate shape before the mode, which the id leaves out."""
    n, ci, h, w, init, ratio, dw, oc, act, dtype, layout = case[:11]
    return f"n{n}-cin{ci}-{h}x{w}-init{init}-r{ratio}-dw{dw}-out{oc}-{act_id(act)}-" \
           f"{str(dtype).split('.')[-1]}-{layout}-{case[-1]}"
