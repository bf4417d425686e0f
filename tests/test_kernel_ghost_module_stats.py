"""Training-mode BatchNorm statistics of the Ghost module (every fused backend) against the float64 eager
reference `ghostfast.reference.ghost_module_stats`, forward (mean, biased variance) and backward (the gradients
through the statistics, checked against torch.autograd through the reference).

The statistics forward takes bn1 as live tensors (applied in stage 2 only, before the activation and the depthwise);
the backward takes it folded (scale, shift in the accumulation dtype), whose gradients are compared."""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("kernel_backend")

from ghostfast import reference
from kernel_backends import ghost_stats, ghost_stats_backward
from kernel_inputs import (act_id, BN_FIELDS, acc_dtype, fold_ghost_params, make_ghost_params, skip_unsupported, to_layout,
                           without)
from numerics import assert_close_rel

NAMES = ("x", "primary_weight", "primary_scale", "primary_bias", "cheap_weight")


def _inputs(n, c_in, h, w, init, ratio, dw, dtype, layout, device, offset=0.0, bn_dtype=None, eps=(1e-5, 1e-5)):
    """(x, bn1 as live tensors, [primary_weight, primary_scale, primary_bias, cheap_weight] with bn1 folded)."""
    x = to_layout((torch.randn(n, c_in, h, w, device=device) + offset).to(dtype), layout)
    p = make_ghost_params(c_in, init, ratio, dw, dtype, device, bn_dtype=bn_dtype, eps=eps)
    f = fold_ghost_params(p, acc_dtype(dtype))
    return x, p["bn1"], [f[k] for k in NAMES[1:]]


def _reference(x, params, act, stage):
    leaves = [t.detach().double().requires_grad_(True) for t in [x] + params]
    mean, var = reference.ghost_module_stats(*leaves, act=act, stage=stage)
    return leaves, mean, var


def _check(n, c_in, h, w, init, ratio, dw, act, dtype, layout, stage, device, offset=0.0, needs=(True,) * 5,
           bn=None, **bn_kw):
    skip_unsupported(dtype, device)
    x, bn1, params = _inputs(n, c_in, h, w, init, ratio, dw, dtype, layout, device, offset, **bn_kw)
    if bn is not None:  # a variant of bn1, folded again
        bn1 = bn(bn1)
        params[1:3] = reference.fold_bn_vectors(bn1, init, acc_dtype(dtype), x.device)
    leaves, mean_ref, var_ref = _reference(x, params, act, stage)

    mean, var = ghost_stats(x, params[0], bn1, params[3], act, stage)
    acc = acc_dtype(dtype)
    channels = init if stage == 1 else init * (ratio - 1)
    for name, got, want in (("mean", mean, mean_ref), ("var", var, var_ref)):
        assert got.shape == (channels,) and got.dtype == acc, name
        try:
            assert_close_rel(got, want, dtype)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from None

    # backward: random upstream gradients of mean and var, folded as the autograd formula of the op folds them
    gm = torch.randn(channels, device=device, dtype=torch.float64)
    gv = torch.randn(channels, device=device, dtype=torch.float64)
    m = n * h * w
    want = torch.autograd.grad((mean_ref, var_ref), leaves, (gm, gv), allow_unused=True)
    res = ghost_stats_backward(x, *params, act, stage, (gm / m).to(acc), (2 * gv / m).to(acc), mean,
                               needs=needs)
    assert len(res) == 5
    for i, (name, got, ref, inp) in enumerate(zip(NAMES, res, want, [x] + params)):
        if not needs[i] or (stage == 1 and i >= 2):
            assert got is None, name
            continue
        assert got.shape == inp.shape and got.dtype == inp.dtype, name
        try:
            assert_close_rel(got, ref, dtype)
        except AssertionError as err:
            raise AssertionError(f"grad {name} (stage {stage}): {err}") from None
    if needs[0] and layout == "channels_last":
        assert res[0].is_contiguous(memory_format=torch.channels_last)


# (N, C_in, H, W, init, ratio, dw, relu, dtype, layout)
CASES = [
    (2, 20, 7, 7, 8, 2, 3, True, torch.float32, "contiguous"),
    (1, 3, 15, 13, 8, 3, 5, False, torch.float32, "channels_last"),
    (1, 16, 1, 1, 16, 2, 3, True, torch.float64, "contiguous"),
    (2, 24, 2, 3, 8, 2, 7, True, torch.float16, "slice"),
    (2, 17, 20, 37, 40, 2, 3, True, torch.float32, "contiguous"),  # several channel blocks and tiles
    (2, 12, 15, 13, 8, 3, 1, False, torch.float16, "channels_last"),
    (1, 33, 15, 13, 8, 2, 5, False, torch.float64, "channels_last"),
    (3, 8, 9, 6, 8, 2, 1, True, torch.float64, "slice"),
    (2, 10, 6, 5, 8, 2, 3, True, torch.bfloat16, "contiguous"),
]


def _case_id(case):
    n, ci, h, w, init, ratio, dw, act, dtype, layout = case
    return f"n{n}-cin{ci}-{h}x{w}-init{init}-r{ratio}-dw{dw}-{act_id(act)}-" \
           f"{str(dtype).split('.')[-1]}-{layout}"


@pytest.mark.parametrize("stage", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_ghost_module_stats_match_reference(case, stage, device):
    _check(*case, stage=stage, device=device)


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("dw", [1, 3, 5, 7])
def test_ghost_module_stats_dw_ratio_sweep(dw, ratio, act, device):
    _check(2, 11, 15, 13, 8, ratio, dw, act, stage=2, dtype=torch.float32, layout="contiguous", device=device)


@pytest.mark.parametrize("stage", [1, 2])
def test_ghost_module_stats_large_mean(stage, device):
    # activations whose mean is ~20x their spread: a sum-of-squares variance loses most of its digits here
    _check(4, 6, 16, 16, 8, 2, 3, False, stage=stage, dtype=torch.float32, layout="contiguous", device=device,
           offset=20.0)


@pytest.mark.parametrize("stage", [1, 2])
def test_ghost_module_stats_multi_tile_wide_halo(stage, device):
    # dw 7 with a 32-wide halo, several tiles each way and three x1 channel blocks
    _check(1, 5, 20, 37, 40, 2, 7, True, stage=stage, dtype=torch.float32, layout="channels_last", device=device)


@pytest.mark.parametrize("needs", [(True, False, False, False, False), (False, True, True, True, True),
                                   (False, False, True, False, True)])
def test_ghost_module_stats_backward_needs(needs, device):
    _check(2, 12, 9, 7, 16, 3, 3, True, stage=2, dtype=torch.float32, layout="contiguous", device=device,
           needs=needs)


def test_ghost_module_stats_relu_grad_at_zero(device):
    # pre-activations exactly 0 (x = 0 there and BN1 bias and mean 0, so the folded shift is exactly 0): relu passes
    # no gradient at 0, as torch's
    x, bn1, params = _inputs(1, 6, 8, 8, 8, 2, 3, torch.float32, "contiguous", device)
    x[:, :, 2:5, 3:6] = 0
    bn1.bias[[1, 4]] = 0
    bn1.mean[[1, 4]] = 0
    params[1:3] = reference.fold_bn_vectors(bn1, 8, torch.float32, device)
    assert (params[2][[1, 4]] == 0).all()
    leaves, mean_ref, var_ref = _reference(x, params, True, 2)
    gm, gv = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    want = torch.autograd.grad((mean_ref, var_ref), leaves, (gm.to(device), gv.to(device)))
    mean, _ = ghost_stats(x, params[0], bn1, params[3], True, 2)
    res = ghost_stats_backward(x, *params, True, 2, (gm / 64).float().to(device), (2 * gv / 64).float().to(device),
                               mean)
    for name, got, ref in zip(NAMES, res, want):
        assert_close_rel(got, ref, torch.float32)


@pytest.mark.parametrize("missing", BN_FIELDS + ("all",))
def test_ghost_module_stats_missing_bn1_tensors(missing, device):
    """Stage 2 applies bn1 with missing tensors as the identity for them (eps large: a missing var read as 0 or 1
    shows)."""
    fields = BN_FIELDS if missing == "all" else (missing,)
    _check(2, 5, 7, 6, 8, 3, 3, True, stage=2, dtype=torch.float32, layout="contiguous", device=device,
           bn=lambda bn: without(bn, *fields), eps=(0.3, 1e-5))


@pytest.mark.parametrize("dtype,bn_dtype", [(torch.float16, torch.float32), (torch.float16, torch.float16),
                                             (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float32)])
def test_ghost_module_stats_bn1_dtypes(dtype, bn_dtype, device):
    _check(2, 12, 9, 7, 8, 3, 3, True, stage=2, dtype=dtype, layout="channels_last", device=device,
           bn_dtype=bn_dtype)


def test_ghost_module_stats_bn1_eps(device):
    """bn1's own eps, not a default: large here, so that ignoring it shows."""
    x, bn1, params = _inputs(2, 6, 7, 6, 8, 2, 3, torch.float32, "contiguous", device, eps=(0.5, 1e-5))
    mean, var = ghost_stats(x, params[0], bn1, params[3], True, 2)
    _, mean_ref, var_ref = _reference(x, params, True, 2)
    assert_close_rel(mean, mean_ref, torch.float32)
    assert_close_rel(var, var_ref, torch.float32)
    other = reference.fold_bn_vectors(bn1._replace(eps=1e-5), 8, torch.float32, device)
    _, mean_other, _ = _reference(x, [params[0], *other, params[3]], True, 2)
    assert ((mean_other - mean_ref).norm() / mean_ref.norm()).item() > 1e-2
