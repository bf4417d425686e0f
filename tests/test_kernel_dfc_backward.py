"""The fused DFC backward of every backend (kernels/dfc.py: dfc_gate_backward / dfc_attention_backward; the
compiled cpu/cuda kernels) against torch.autograd.grad of the float64 eager reference, for x and all nine folded
parameters.

Triton runs under the Triton interpreter on CPU (conftest sets TRITON_INTERPRET), so shapes stay small; `_override`
forces small tiles and few programs so the tiled path and the persistent loop run on those small shapes."""
import numpy as np
import pytest
import torch

import kernel_backends
from ghostfast.kernels import dfc
from kernel_inputs import (DFC_MODES as MODES, dfc_out_shape, dfc_pad_then_bias_logits, dfc_reference, make_dfc_params,
                           skip_unsupported)
from numerics import REL_TOL, assert_close_rel, rel_error

pytestmark = pytest.mark.usefixtures("kernel_backend")
NAMES = ("x", "conv_weight", "conv_scale", "conv_bias", "h_weight", "h_scale", "h_bias", "v_weight", "v_scale",
         "v_bias")
SMALL_TILES = dict(halo_h=16, halo_w=16, block_c=16, block_k=16, max_programs=3)  # tiles of 8 x 8 pooled pixels


def _reference_grads(grad, x, params, mode):
    inputs = [t.detach().double().requires_grad_() for t in [x] + list(params)]
    out = dfc_reference(inputs[0], inputs[1:], mode)
    return torch.autograd.grad(out, inputs, grad.double())


def _run(grad, x, params, mode, needs=(True,) * 10, override=None):
    """`override` (Triton tile sizes) only applies to the Triton kernel; other backends run the same data."""
    if override is not None and kernel_backends.current() == "triton":
        return dfc._launch_backward(grad, x, *params, mode, needs, override)
    return kernel_backends.dfc_backward(grad, x, params, mode, needs)


def _check(x, params, mode, dtype=None, override=None, grad=None, factor=1.0):
    dtype = dtype or x.dtype
    c = params[0].shape[0]
    if grad is None:
        grad = torch.randn(dfc_out_shape(x, c, mode), device=x.device, dtype=x.dtype)
    got = _run(grad, x, params, mode, override=override)
    ref = _reference_grads(grad, x, params, mode)
    assert len(got) == 10
    for name, g, r, t in zip(NAMES, got, ref, [x] + list(params)):
        assert g.shape == t.shape and g.dtype == t.dtype, name
        err = rel_error(g, r)
        assert err <= REL_TOL[dtype] * factor, f"grad {name}: relative error {err:.3e} ({dtype})"
    return got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,cin,c,h,w", [
    (1, 5, 7, 2, 2),
    (2, 5, 7, 3, 3),
    (1, 20, 40, 7, 7),  # Cin not a multiple of 16, C > BLOCK_C
    (2, 5, 7, 15, 13),
    (1, 5, 7, 4, 9),
    (2, 6, 20, 40, 37),  # tiled in both dims (interpreter tiles own 8 x 8 pooled pixels), persistent loop
])
def test_dfc_backward_shapes(device, n, cin, c, h, w, mode):
    x = torch.randn(n, cin, h, w, device=device)
    _check(x, make_dfc_params(cin, c, torch.float32, device), mode)


@pytest.mark.parametrize("mode", MODES)
def test_dfc_backward_small_tiles(device, mode):
    """Forced 8 x 8 pooled tiles on a small odd image: partial last tiles in both dims, 3 programs for 12 items."""
    x = torch.randn(2, 4, 19, 35, device=device)
    _check(x, make_dfc_params(4, 20, torch.float32, device), mode, override=SMALL_TILES)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_dfc_backward_dtypes(device, dtype, mode):
    skip_unsupported(dtype, device)
    x = torch.randn(2, 20, 15, 13, device=device, dtype=dtype)
    _check(x, make_dfc_params(20, 40, dtype, device), mode, override=dict(block_c=16))  # 3 channel blocks


def test_dfc_backward_fp16_input_fp32_params(device):
    """Folded BN scale/bias may stay in fp32 while x is fp16: each grad comes back in its input's dtype."""
    x = torch.randn(1, 20, 15, 13, device=device, dtype=torch.float16)
    p = make_dfc_params(20, 40, torch.float16, device)
    for i in (1, 2, 4, 5, 7, 8):
        p[i] = p[i].float()
    _check(x, p, "bilinear", dtype=torch.float16)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_dfc_backward_layouts(device, layout, mode):
    n, cin, c, h, w = 2, 20, 40, 15, 13
    shape = dfc_out_shape(torch.empty(n, cin, h, w, device="meta"), c, mode)
    if layout == "channels_last":
        x = torch.randn(n, cin, h, w, device=device).to(memory_format=torch.channels_last)
        grad = torch.randn(shape, device=device).to(memory_format=torch.channels_last)
    else:  # channel slices with every other column: no dense layout at all
        x = torch.randn(n, cin + 5, h, 2 * w, device=device)[:, 3:3 + cin, :, ::2]
        grad = torch.randn(n, c + 3, shape[2], 2 * shape[3], device=device)[:, 1:1 + c, :, 1::2]
    got = _check(x, make_dfc_params(cin, c, torch.float32, device), mode, grad=grad)
    if layout == "channels_last":
        assert got[0].is_contiguous(memory_format=torch.channels_last) and not got[0].is_contiguous()
    else:
        assert got[0].is_contiguous()


@pytest.mark.parametrize("needs", [
    (True,) + (False,) * 9,  # grad_x only
    (False,) * 4 + (True,) * 6,  # depthwise params only: no gy3 scratch, no second phase
    (False, True) + (False,) * 8,  # grad_W3 without grad_x
])
def test_dfc_backward_needs(device, needs):
    x = torch.randn(2, 6, 15, 13, device=device)
    p = make_dfc_params(6, 20, torch.float32, device)
    grad = torch.randn(2, 20, 15, 13, device=device)
    got = _run(grad, x, p, "bilinear", needs=needs)
    ref = _reference_grads(grad, x, p, "bilinear")
    for name, nd, g, r in zip(NAMES, needs, got, ref):
        if nd:
            assert_close_rel(g, r, torch.float32)
        else:
            assert g is None, name
    assert _run(grad, x, p, "bilinear", needs=(False,) * 10) == (None,) * 10


@pytest.mark.parametrize("mode", MODES)
def test_dfc_backward_empty_batch(device, mode):
    x = torch.randn(0, 6, 15, 13, device=device)
    p = make_dfc_params(6, 20, torch.float32, device)
    got = _run(torch.randn(dfc_out_shape(x, 20, mode), device=device), x, p, mode)
    for g, t in zip(got, [x] + p):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any()


@pytest.mark.parametrize("mode", MODES)
def test_dfc_backward_deterministic(device, mode):
    """Per-program partials summed by one .sum(): bitwise equal run to run (no atomics)."""
    x = torch.randn(1, 4, 19, 35, device=device)
    p = make_dfc_params(4, 20, torch.float32, device)
    grad = torch.randn(dfc_out_shape(x, 20, mode), device=device)
    a = _run(grad, x, p, mode, override=SMALL_TILES)
    b = _run(grad, x, p, mode, override=SMALL_TILES)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_dfc_backward_index64(device, mode):
    """The int64 offset path (taken when one image spans 2^31 elements) gives the same numbers."""
    x = torch.randn(2, 4, 19, 35, device=device).to(memory_format=torch.channels_last)
    _check(x, make_dfc_params(4, 20, torch.float32, device), mode, override=dict(SMALL_TILES, index64=True))


def test_dfc_backward_border_pads_biased_output(device):
    """The test data separates the spec's weight grads from those of a chain that zero-pads before the biases."""
    x = torch.randn(1, 6, 15, 13, device=device, dtype=torch.float64)
    p = [t.requires_grad_() for t in make_dfc_params(6, 20, torch.float64, device)]
    y = dfc_pad_then_bias_logits(x, p)
    grad = torch.randn_like(y)
    wrong = torch.autograd.grad(torch.sigmoid(y), [p[3], p[6]], grad)
    got = _run(grad, x, [t.detach() for t in p], None)
    for w_, g in zip(wrong, (got[4], got[7])):
        assert rel_error(g, w_) > 1e3 * REL_TOL[torch.float32]


@pytest.mark.triton_only
def test_dfc_backward_upsample_gather_covers():
    """The upsample adjoint's gather: pooled index i collects full-res d in 2i + [0, 3) (nearest src == i) and
    2i + [-2, 4) (bilinear i0 == i or i1 == i). Checked for every pooled size up to 1000, both parities, both
    source formulas, float32 and float64 coefficients."""
    for p in range(1, 1000):
        for size in (2 * p, 2 * p + 1):
            d = np.arange(size)
            s32 = np.float32(p) / np.float32(size)
            src = np.minimum(np.floor(d.astype(np.float32) * s32).astype(np.int64), p - 1)
            assert ((d - 2 * src >= 0) & (d - 2 * src < 3)).all(), (p, size)
            for ft, scale in ((np.float32, s32), (np.float64, np.float64(p) / np.float64(size))):
                i0 = np.maximum((d.astype(ft) + ft(0.5)) * scale - ft(0.5), 0).astype(np.int64)
                for s in (i0, i0 + (i0 < p - 1)):
                    assert ((d - 2 * s >= -2) & (d - 2 * s < 4)).all(), (p, size)


@pytest.mark.triton_only
def test_dfc_backward_config_grid():
    """Default config: the 40x37 shapes test runs several items per program; wide layers cap the grid so the
    per-program partials and scratch stay within the memory budget."""
    cfg = dfc._backward_config(2, 6, 20, 40, 37, True, True, 4, torch.device("cpu"))
    if dfc._INTERPRET:
        assert cfg["total"] >= 2 * cfg["grid"] and cfg["margin_h"] == cfg["margin_w"] == 4
    wide = dfc._backward_config(64, 4096, 4096, 14, 14, True, True, 4, torch.device("cpu"))
    per_program = 4 * ((3 * wide["block_c"] + wide["cpad"]) * wide["halo_h"] * wide["halo_w"] + wide["part_len"])
    assert wide["grid"] == max(1, dfc._BWD_BUDGET_BYTES // per_program) < wide["total"]
