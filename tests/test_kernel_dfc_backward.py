"""The fused DFC backward of every backend (kernels/dfc.py: dfc_backward; the compiled cpu/cuda kernels) against
torch.autograd.grad of the float64 eager reference, for x and all nine folded parameters.

The backward kernels take each BatchNorm folded (scale, shift in the accumulation dtype, as the op's autograd folds
them): the random BatchNorms of kernel_inputs are folded with `reference.fold_bn_vectors`. Triton runs under the
Triton interpreter on CPU (conftest sets TRITON_INTERPRET), so shapes stay small; the `small_tiles` fixture
monkeypatches the Triton launch config (`kernels/dfc.py: _backward_config`) to small tiles and few programs so the
tiled path and the persistent loop run on those small shapes (other backends run the same data)."""
import numpy as np
import pytest
import torch

import kernel_backends
from ghostfast.kernels import dfc
from kernel_inputs import (DFC_MODES as MODES, acc_dtype, dfc_folded_reference, dfc_out_shape, dfc_pad_then_bias_logits,
                           fold_dfc_params, make_dfc_params, skip_unsupported)
from numerics import REL_TOL, assert_close_rel, rel_error

pytestmark = pytest.mark.usefixtures("kernel_backend")
NAMES = ("x", "conv_weight", "conv_scale", "conv_bias", "h_weight", "h_scale", "h_bias", "v_weight", "v_scale",
         "v_bias")
# tiles of 8 x 8 pooled pixels (16 with a 4-lane margin each side), 3 programs
SMALL_TILES = dict(halo_h=16, halo_w=16, tiled_h=True, tiled_w=True, block_c=16, block_k=16, max_programs=3)


def patch_config(monkeypatch, **choices):
    """Replace some of the Triton backward's launch choices (the rest stay the default's for the shape)."""
    default = dfc._backward_config
    monkeypatch.setattr(dfc, "_backward_config", lambda *a, **k: dict(default(*a, **k), **choices))


@pytest.fixture
def small_tiles(monkeypatch):
    patch_config(monkeypatch, **SMALL_TILES)


def _params(cin, c, dtype, device):
    """The nine folded parameters, the BN vectors in the accumulation dtype (as the op's autograd folds them)."""
    return fold_dfc_params(make_dfc_params(cin, c, dtype, device), acc_dtype(dtype))


def _reference_grads(grad, x, params, mode):
    inputs = [t.detach().double().requires_grad_() for t in [x] + list(params)]
    out = dfc_folded_reference(inputs[0], inputs[1:], mode)
    return torch.autograd.grad(out, inputs, grad.double())


def _run(grad, x, params, mode, needs=(True,) * 10):
    return kernel_backends.dfc_backward(grad, x, *params, mode, needs)


def _check(x, params, mode, dtype=None, grad=None, factor=1.0):
    dtype = dtype or x.dtype
    c = params[0].shape[0]
    if grad is None:
        grad = torch.randn(dfc_out_shape(x, c, mode), device=x.device, dtype=x.dtype)
    got = _run(grad, x, params, mode)
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
    (2, 6, 20, 40, 37),
])
def test_dfc_backward_shapes(device, n, cin, c, h, w, mode):
    x = torch.randn(n, cin, h, w, device=device)
    _check(x, _params(cin, c, torch.float32, device), mode)


@pytest.mark.parametrize("mode", MODES)
def test_dfc_backward_small_tiles(device, mode, small_tiles):
    """Forced 8 x 8 pooled tiles on a small odd image: partial last tiles in both dims, 3 programs for 12 items."""
    cfg = dfc._backward_plan(2, 4, 20, 19, 35, True, True, 4, torch.device(device))
    assert (cfg["tiles_h"], cfg["tiles_w"], cfg["total"], cfg["grid"]) == (2, 3, 12, 3)
    x = torch.randn(2, 4, 19, 35, device=device)
    _check(x, _params(4, 20, torch.float32, device), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_dfc_backward_dtypes(device, dtype, mode, monkeypatch):
    skip_unsupported(dtype, device)
    patch_config(monkeypatch, block_c=16)  # 3 channel blocks
    x = torch.randn(2, 20, 15, 13, device=device, dtype=dtype)
    _check(x, _params(20, 40, dtype, device), mode)


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
    got = _check(x, _params(cin, c, torch.float32, device), mode, grad=grad)
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
    p = _params(6, 20, torch.float32, device)
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
    p = _params(6, 20, torch.float32, device)
    got = _run(torch.randn(dfc_out_shape(x, 20, mode), device=device), x, p, mode)
    for g, t in zip(got, [x] + p):
        assert g.shape == t.shape and g.dtype == t.dtype and not g.any()


@pytest.mark.parametrize("mode", MODES)
def test_dfc_backward_deterministic(device, mode, small_tiles):
    """Per-program partials summed by one .sum(): bitwise equal run to run (no atomics)."""
    x = torch.randn(1, 4, 19, 35, device=device)
    p = _params(4, 20, torch.float32, device)
    grad = torch.randn(dfc_out_shape(x, 20, mode), device=device)
    a = _run(grad, x, p, mode)
    b = _run(grad, x, p, mode)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


@pytest.mark.parametrize("mode", MODES)
def test_dfc_backward_index64(device, mode, monkeypatch):
    """The int64 offset path (taken when one image spans 2^31 elements) gives the same numbers."""
    patch_config(monkeypatch, **SMALL_TILES, index64=True)
    x = torch.randn(2, 4, 19, 35, device=device).to(memory_format=torch.channels_last)
    _check(x, _params(4, 20, torch.float32, device), mode)


def test_dfc_backward_border_pads_biased_output(device):
    """The test data separates the spec's weight grads from those of a chain that zero-pads before the biases."""
    x = torch.randn(1, 6, 15, 13, device=device, dtype=torch.float64)
    p = [t.requires_grad_() for t in _params(6, 20, torch.float64, device)]
    y = dfc_pad_then_bias_logits(x, p)
    grad = torch.randn_like(y)
    wrong = torch.autograd.grad(torch.sigmoid(y), [p[3], p[6]], grad)
    got = _run(grad, x, [t.detach() for t in p], "gate")
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
    """Wide layers cap the default grid so the per-program partials and scratch stay within the memory budget."""
    wide = dfc._backward_plan(64, 4096, 4096, 14, 14, True, True, 4, torch.device("cpu"))
    per_program = 4 * ((3 * wide["block_c"] + wide["cpad"]) * wide["halo_h"] * wide["halo_w"] + wide["part_len"])
    assert wide["grid"] == max(1, dfc._BWD_BUDGET_BYTES // per_program) < wide["total"]
