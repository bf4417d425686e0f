"""The fused Ghost module forward of every backend (Triton; the compiled cpu/cuda kernels) against the float64
eager reference."""
import pytest
import torch

pytestmark = pytest.mark.usefixtures("kernel_backend")

from kernel_backends import ghost_forward as ghost_module_forward
from kernel_inputs import (BN_FIELDS, ghost_case_id, ghost_reference as _reference, make_ghost_params, make_input,
                           skip_unsupported, strided, without)
from numerics import REL_TOL, assert_close_rel, poisoned_like


def _gate(n, out_channels, h, w, mode, dtype, device):
    if mode is None:
        return None
    return torch.rand(n, out_channels, max(1, h // 2), max(1, w // 2), device=device).to(dtype)


def _check(n, c_in, h, w, init, ratio, dw, out_channels, act, dtype, layout, gate_mode, device, p=None,
           **param_kw):
    skip_unsupported(dtype, device)
    x = make_input(n, c_in, h, w, dtype, device, layout)
    p = p or make_ghost_params(c_in, init, ratio, dw, dtype, device, **param_kw)
    gate = _gate(n, out_channels, h, w, gate_mode, dtype, device)
    ref = _reference(x, p, out_channels, act, gate, gate_mode or "nearest")
    out = poisoned_like(ref.to(dtype))
    res = ghost_module_forward(x, **p, out_channels=out_channels, act=act, gate=gate,
                               gate_mode=gate_mode or "nearest", out=out)
    assert res is out
    assert_close_rel(res, ref, dtype)
    return x, p


# (N, C_in, H, W, init, ratio, dw, out_channels, relu, dtype, layout, gate_mode): a covering set, not the product
CASES = [
    (2, 20, 7, 7, 8, 2, 3, 16, True, torch.float32, "contiguous", None),
    (1, 3, 15, 13, 8, 3, 5, 23, False, torch.float32, "channels_last", "nearest"),  # odd out: last cheap cut
    (1, 16, 1, 1, 16, 2, 3, 31, True, torch.float64, "contiguous", "bilinear"),
    (2, 24, 2, 3, 8, 2, 7, 15, True, torch.float16, "slice", "nearest"),
    (2, 17, 20, 37, 40, 2, 3, 80, True, torch.float32, "contiguous", "bilinear"),  # 2 channel blocks, 6 tiles
    (1, 9, 7, 7, 16, 2, 3, 10, True, torch.float32, "slice", "nearest"),  # out < init: x1 itself is cut
    (2, 12, 15, 13, 8, 3, 1, 24, False, torch.float16, "channels_last", "bilinear"),
    (1, 5, 20, 37, 8, 2, 7, 16, True, torch.float32, "channels_last", None),  # 32-wide halo
    (1, 33, 7, 7, 8, 2, 5, 13, False, torch.float64, "channels_last", "nearest"),
    (2, 16, 15, 13, 12, 4, 3, 46, True, torch.float16, "contiguous", None),
    (1, 8, 9, 6, 8, 2, 1, 16, True, torch.float64, "slice", None),
    (1, 16, 8, 8, 16, 2, 3, 32, True, torch.bfloat16, "contiguous", "nearest"),
]


@pytest.mark.parametrize("case", CASES, ids=[ghost_case_id(c) for c in CASES])
def test_ghost_module_kernel_matches_reference(case, device):
    _check(*case, device)


@pytest.mark.parametrize("act", [True, False])
@pytest.mark.parametrize("ratio", [2, 3])
@pytest.mark.parametrize("dw", [1, 3, 5, 7])
def test_ghost_module_kernel_dw_ratio_sweep(dw, ratio, act, device):
    init = 8
    _check(1, 11, 15, 13, init, ratio, dw, init * ratio - 1, act, torch.float32, "contiguous", "nearest", device)


@pytest.mark.parametrize("gate_mode", [None, "nearest", "bilinear"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16])
def test_ghost_module_kernel_dtype_layout_gate_sweep(dtype, layout, gate_mode, device):
    _check(2, 18, 9, 10, 16, 2, 3, 31, True, dtype, layout, gate_mode, device)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("stage", ["bn1", "bn2", "both"])
@pytest.mark.parametrize("missing", BN_FIELDS + ("all",))
def test_ghost_module_kernel_missing_bn_tensors(missing, stage, device):
    """A missing BatchNorm tensor is the identity for it (weight 1, bias 0, mean 0; no var: no 1/sqrt(var + eps)).
    eps is large so that a kernel reading a missing var as 0 or 1 shows."""
    fields = BN_FIELDS if missing == "all" else (missing,)
    full = make_ghost_params(5, 8, 3, 3, torch.float32, device, eps=(0.3, 0.3))
    p = dict(full)
    for k in (("bn1", "bn2") if stage == "both" else (stage,)):
        p[k] = without(p[k], *fields)
    x, _ = _check(1, 5, 7, 6, 8, 3, 3, 23, True, torch.float32, "contiguous", "bilinear", device, p=p)
    assert _rel(_reference(x, p, 23, True), _reference(x, full, 23, True)) > 1e3 * REL_TOL[torch.float32]


@pytest.mark.parametrize("dtype,bn_dtype", [
    (torch.float16, torch.float32),  # fp16 autocast: the BatchNorm stays float32
    (torch.float16, torch.float16),  # model.half(): the BatchNorm in the input's half dtype
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
])
def test_ghost_module_kernel_bn_dtypes(dtype, bn_dtype, device):
    x, p = _check(2, 12, 9, 7, 8, 3, 3, 21, True, dtype, "channels_last", "nearest", device, bn_dtype=bn_dtype)
    assert all(t.dtype == bn_dtype for k in ("bn1", "bn2") for t in p[k].tensors())


def test_ghost_module_kernel_eps_per_stage(device):
    """Each stage folds with its own eps."""
    x, p = _check(1, 7, 8, 9, 8, 2, 5, 16, False, torch.float32, "slice", None, device, eps=(0.5, 1e-3))
    swapped = dict(p, bn1=p["bn1"]._replace(eps=1e-3), bn2=p["bn2"]._replace(eps=0.5))
    assert _rel(_reference(x, swapped, 16, False), _reference(x, p, 16, False)) > 1e3 * REL_TOL[torch.float32]


def test_ghost_module_kernel_strided_bn_vectors(device):
    """BatchNorm vectors that are strided views (e.g. slices of a stacked parameter): read by their strides."""
    p = make_ghost_params(6, 8, 2, 3, torch.float32, device)
    p = dict(p, bn1=strided(p["bn1"]), bn2=strided(p["bn2"]))
    assert not p["bn1"].weight.is_contiguous()
    _check(1, 6, 9, 10, 8, 2, 3, 16, True, torch.float32, "contiguous", "nearest", device, p=p)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "slice"])
def test_ghost_module_kernel_allocates_in_input_format(layout, device):
    x = make_input(2, 12, 9, 7, torch.float32, device, layout)
    p = make_ghost_params(12, 8, 2, 3, torch.float32, device)
    res = ghost_module_forward(x, **p, out_channels=15, act=True)
    if layout == "channels_last":
        assert res.is_contiguous(memory_format=torch.channels_last) and not res.is_contiguous()
    else:
        assert res.is_contiguous()
    assert_close_rel(res, _reference(x, p, 15, True, None, "nearest"), torch.float32)


@pytest.mark.triton_only
def test_ghost_module_kernel_strided_out_buffer(device):
    # out is a channel slice of a bigger NaN buffer: the kernel must honour its strides and touch nothing else
    x = make_input(1, 10, 11, 9, torch.float32, device, "contiguous")
    p = make_ghost_params(10, 8, 2, 3, torch.float32, device)
    gate = _gate(1, 16, 11, 9, "bilinear", torch.float32, device)
    ref = _reference(x, p, 16, True, gate, "bilinear")
    big = torch.full((1, 20, 11, 9), float("nan"), device=device)
    res = ghost_module_forward(x, **p, out_channels=16, act=True, gate=gate, gate_mode="bilinear",
                               out=big[:, 3:19])
    assert_close_rel(res, ref, torch.float32)
    assert torch.isnan(big[:, :3]).all() and torch.isnan(big[:, 19:]).all()


@pytest.mark.parametrize("gate_mode", ["nearest", "bilinear"])
def test_ghost_module_kernel_gate_odd_upsample(gate_mode, device):
    # non-integer scales (7/15, 4/13) and a gate wider than half the image: index math as F.interpolate's
    x = make_input(1, 6, 15, 13, torch.float32, device, "contiguous")
    p = make_ghost_params(6, 8, 2, 3, torch.float32, device)
    gate = torch.rand(1, 16, 7, 4, device=device)
    ref = _reference(x, p, 16, False, gate, gate_mode)
    out = poisoned_like(ref.float())
    res = ghost_module_forward(x, **p, out_channels=16, act=False, gate=gate, gate_mode=gate_mode, out=out)
    assert_close_rel(res, ref, torch.float32)


def test_ghost_module_kernel_gate_nearest_fp32_rounding(device):
    # 46 -> 14 and 44 -> 26: floor(dst * fp32(in/out)) differs from the exact dst*in//out at dst 23 and 22,
    # and F.interpolate follows the fp32 value
    x = make_input(1, 4, 46, 44, torch.float32, device, "contiguous")
    p = make_ghost_params(4, 8, 2, 1, torch.float32, device)
    gate = torch.rand(1, 16, 14, 26, device=device)
    ref = _reference(x, p, 16, True, gate, "nearest")
    out = poisoned_like(ref.float())
    res = ghost_module_forward(x, **p, out_channels=16, act=True, gate=gate, gate_mode="nearest", out=out)
    assert_close_rel(res, ref, torch.float32)


def test_ghost_module_kernel_tf32_flag(device):
    # with torch's TF32 flag on, fp32 may use TF32 for the 1x1 conv: still close at TF32 accuracy
    x = make_input(1, 32, 7, 7, torch.float32, device, "contiguous")
    p = make_ghost_params(32, 16, 2, 3, torch.float32, device)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        res = ghost_module_forward(x, **p, out_channels=32, act=True)
    finally:
        torch.set_float32_matmul_precision(old)
    assert_close_rel(res, _reference(x, p, 32, True, None, "nearest"), torch.float32, factor=1e3)


def test_ghost_module_kernel_nan_propagates(device):
    x = make_input(1, 8, 6, 6, torch.float32, device, "contiguous")
    x[0, 3, 2, 4] = float("nan")
    p = make_ghost_params(8, 8, 2, 3, torch.float32, device)
    ref = _reference(x, p, 16, True, None, "nearest")
    res = ghost_module_forward(x, **p, out_channels=16, act=True)
    assert torch.equal(torch.isnan(res), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert_close_rel(res[fin], ref[fin], torch.float32)


@pytest.mark.parametrize("shape", [(0, 8, 5, 5), (2, 8, 0, 5)])
def test_ghost_module_kernel_empty(shape, kernel_backend, device):
    if kernel_backend == "reference" and shape[2] == 0:
        pytest.xfail("the reference backend is eager conv2d, which rejects a 0-sized image")
    x = torch.randn(*shape, device=device)
    p = make_ghost_params(8, 8, 2, 3, torch.float32, device)
    res = ghost_module_forward(x, **p, out_channels=16, act=True)
    # eager conv2d rejects a 0-sized image, so the reference here is only the shape it would have
    assert res.shape == (shape[0], 16, shape[2], shape[3])
