"""The fused Ghost module backward of every backend against torch.autograd through the float64 eager reference.

The backward kernels take each BatchNorm folded (scale, shift in the accumulation dtype, as the op's autograd folds
them): the random BatchNorms of kernel_inputs are folded with `reference.fold_bn_vectors`, and the gradients of the
folded vectors are compared."""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("kernel_backend")

from ghostfast import reference
from kernel_backends import ghost_backward as ghost_module_backward
from kernel_inputs import acc_dtype, fold_ghost_params, ghost_case_id, make_ghost_params, skip_unsupported, to_layout
from numerics import assert_close_rel

NAMES = ("x", "primary_weight", "primary_scale", "primary_bias", "cheap_weight", "cheap_scale", "cheap_bias",
         "gate")


def _folded_params(c_in, init, ratio, dw, dtype, device):
    return fold_ghost_params(make_ghost_params(c_in, init, ratio, dw, dtype, device), acc_dtype(dtype))


def _autograd(x, p, grad_out, out_channels, act, gate, mode, dtype):
    """Gradients of the eager reference evaluated in `dtype` (float64 for the reference itself)."""
    leaves = [x.to(dtype)] + [p[k].to(dtype) for k in NAMES[1:7]]
    if gate is not None:
        leaves.append(gate.to(dtype))
    leaves = [t.detach().requires_grad_(True) for t in leaves]
    out = reference.ghost_module_forward(*leaves[:7], out_channels=out_channels, act=act,
                                         gate=leaves[7] if gate is not None else None, gate_mode=mode)
    grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
    return list(grads) + ([None] if gate is None else [])


def _compare(res, ref, inputs, dtype, needs=(True,) * 8):
    assert len(res) == 8
    for name, got, want, inp, need in zip(NAMES, res, ref, inputs, needs):
        if inp is None or not need:
            assert got is None, name
            continue
        assert got.shape == inp.shape and got.dtype == inp.dtype, name
        # fp32 accumulation keeps even the all-pixel reductions (BN and weight grads) under the flat bounds
        try:
            assert_close_rel(got, want, dtype)
        except AssertionError as err:
            raise AssertionError(f"grad {name}: {err}") from None


def _check(n, c_in, h, w, init, ratio, dw, out_channels, act, dtype, layout, gate_shape, gate_mode, device,
           go_layout=None, needs=(True,) * 8):
    skip_unsupported(dtype, device)
    x = to_layout(torch.randn(n, c_in, h, w, device=device).to(dtype), layout)
    p = _folded_params(c_in, init, ratio, dw, dtype, device)
    gate = None
    if gate_mode is not None:
        gate = torch.rand(n, out_channels, *gate_shape, device=device).to(dtype)
    grad_out = to_layout(torch.randn(n, out_channels, h, w, device=device).to(dtype), go_layout or layout)
    mode = gate_mode or "nearest"
    res = ghost_module_backward(grad_out, x, **p, out_channels=out_channels, act=act, gate=gate, gate_mode=mode,
                                needs=needs)
    ref = _autograd(x, p, grad_out, out_channels, act, gate, mode, torch.float64)
    _compare(res, ref, [x] + [p[k] for k in NAMES[1:7]] + [gate], dtype, needs)
    if needs[0] and layout == "channels_last":
        assert res[0].is_contiguous(memory_format=torch.channels_last)


# (N, C_in, H, W, init, ratio, dw, out_channels, relu, dtype, layout, gate_shape, gate_mode)
CASES = [
    (2, 20, 7, 7, 8, 2, 3, 16, True, torch.float32, "contiguous", None, None),
    (1, 3, 15, 13, 8, 3, 5, 23, False, torch.float32, "channels_last", (7, 6), "nearest"),  # odd out
    (1, 16, 1, 1, 16, 2, 3, 31, True, torch.float64, "contiguous", (1, 1), "bilinear"),
    (2, 24, 2, 3, 8, 2, 7, 15, True, torch.float16, "slice", (1, 1), "nearest"),
    (2, 17, 20, 37, 40, 2, 3, 80, True, torch.float32, "contiguous", (10, 18), "bilinear"),  # 3 cblocks, tiles
    (1, 9, 7, 7, 16, 2, 3, 10, True, torch.float32, "slice", (3, 3), "nearest"),  # out < init
    (2, 12, 15, 13, 8, 3, 1, 22, False, torch.float16, "channels_last", (7, 6), "bilinear"),
    (1, 33, 15, 13, 8, 2, 5, 13, False, torch.float64, "channels_last", (7, 6), "nearest"),
    (1, 8, 9, 6, 8, 2, 1, 16, True, torch.float64, "slice", None, None),
]


@pytest.mark.parametrize("case", CASES, ids=[ghost_case_id(c) for c in CASES])
def test_ghost_module_backward_matches_autograd(case, device):
    _check(*case, device)


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("dw", [1, 3, 5, 7])
def test_ghost_module_backward_dw_ratio_sweep(dw, ratio, act, device):
    init = 8
    _check(1, 11, 15, 13, init, ratio, dw, init * ratio - 1, act, torch.float32, "contiguous", (7, 6), "nearest",
           device)


@pytest.mark.parametrize("gate_mode", [None, "nearest", "bilinear"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_ghost_module_backward_dtype_layout_gate_sweep(dtype, layout, gate_mode, device):
    _check(2, 18, 9, 10, 16, 2, 3, 31, True, dtype, layout, (4, 5), gate_mode, device)


@pytest.mark.parametrize("x_layout,go_layout", [("contiguous", "channels_last"), ("slice", "contiguous"),
                                                ("channels_last", "slice")])
def test_ghost_module_backward_mixed_layouts(x_layout, go_layout, device):
    _check(1, 10, 11, 9, 8, 2, 3, 15, True, torch.float32, x_layout, (5, 4), "bilinear", device,
           go_layout=go_layout)


def test_ghost_module_backward_expanded_grad_out(device):
    # out.sum().backward() hands over a stride-0 grad_out: read through its strides, never copied
    x = torch.randn(2, 7, 9, 11, device=device)
    p = _folded_params(7, 8, 3, 5, torch.float32, device)
    gate = torch.rand(2, 20, 4, 5, device=device)
    grad_out = torch.ones((), device=device).expand(2, 20, 9, 11)
    res = ghost_module_backward(grad_out, x, **p, out_channels=20, act=True, gate=gate, gate_mode="bilinear")
    ref = _autograd(x, p, grad_out, 20, True, gate, "bilinear", torch.float64)
    _compare(res, ref, [x] + [p[k] for k in NAMES[1:7]] + [gate], torch.float32)


def test_ghost_module_backward_multi_tile_wide_halo(device):
    # dw 7 with a 32-wide halo, several tiles each way and three x1 channel blocks
    _check(1, 5, 20, 37, 40, 2, 7, 79, True, torch.float32, "channels_last", (10, 18), "bilinear", device)


@pytest.mark.parametrize("gate_mode", ["nearest", "bilinear"])
def test_ghost_module_backward_gate_odd_upsample(gate_mode, device):
    # non-integer scales (7/15, 4/13) and a gate wider than half the image: the adjoint of F.interpolate's indices
    _check(1, 6, 15, 13, 8, 2, 3, 16, False, torch.float32, "contiguous", (7, 4), gate_mode, device)


def test_ghost_module_backward_gate_nearest_fp32_rounding(device):
    # 46 -> 14 and 44 -> 26: the forward's fp32 nearest index math, scattered back to the same gate pixels
    _check(1, 4, 46, 44, 8, 2, 1, 16, True, torch.float32, "contiguous", (14, 26), "nearest", device)


@pytest.mark.parametrize("needs", [(True, False, False, False, False, False, False, True),
                                   (False, True, True, True, True, True, True, False),
                                   (False,) * 8])
def test_ghost_module_backward_needs(needs, device):
    _check(2, 12, 9, 7, 16, 3, 3, 40, True, torch.float32, "contiguous", (4, 3), "bilinear", device, needs=needs)


def test_ghost_module_backward_relu_grad_at_zero(device):
    # pixels where x is 0 and a primary bias is exactly 0: the pre-activation is exactly 0 there, and torch's relu
    # backward passes no gradient at 0
    x = torch.randn(1, 6, 8, 8, device=device)
    x[:, :, 2:5, 3:6] = 0
    p = _folded_params(6, 8, 2, 3, torch.float32, device)
    p["primary_bias"][[1, 4]] = 0  # the folded shift
    grad_out = torch.randn(1, 16, 8, 8, device=device)
    res = ghost_module_backward(grad_out, x, **p, out_channels=16, act=True, gate=None, gate_mode="nearest")
    ref = _autograd(x, p, grad_out, 16, True, None, "nearest", torch.float64)
    _compare(res, ref, [x] + [p[k] for k in NAMES[1:7]] + [None], torch.float32)


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 5)])
@pytest.mark.parametrize("gate_mode", [None, "bilinear"])
def test_ghost_module_backward_empty(shape, gate_mode, kernel_backend, device):
    if kernel_backend == "reference" and shape[2] == 0:
        pytest.xfail("the reference backend is eager conv2d, which rejects a 0-sized image")
    n, c, h, w = shape
    x = torch.randn(*shape, device=device)
    p = _folded_params(c, 8, 2, 3, torch.float32, device)
    gate = None if gate_mode is None else torch.rand(n, 16, 2, 2, device=device)
    res = ghost_module_backward(torch.randn(n, 16, h, w, device=device), x, **p, out_channels=16, act=True,
                                gate=gate, gate_mode=gate_mode or "nearest")
    for name, got, inp in zip(NAMES, res, [x] + [p[k] for k in NAMES[1:7]] + [gate]):
        if inp is None:
            assert got is None
            continue
        assert got.shape == inp.shape and got.dtype == inp.dtype, name
        assert torch.count_nonzero(got) == 0, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ghost_module_backward_outputs_do_not_alias(dtype, device):
    # the custom op wrapping this may not return tensors that share storage
    x = torch.randn(1, 4, 5, 5, device=device).to(dtype)
    p = _folded_params(4, 8, 2, 3, dtype, device)
    gate = torch.rand(1, 16, 2, 2, device=device).to(dtype)
    res = ghost_module_backward(torch.randn(1, 16, 5, 5, device=device).to(dtype), x, **p, out_channels=16,
                                act=True, gate=gate, gate_mode="bilinear")
    assert len({t.untyped_storage().data_ptr() for t in res}) == 8
