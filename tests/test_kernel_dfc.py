"""The fused DFC forward of every backend (the Triton kernel in kernels/dfc.py; the compiled cpu/cuda kernels)
against the float64 eager reference, each BatchNorm given as live tensors and folded inside the launch.

Triton runs under the Triton interpreter on CPU (conftest sets TRITON_INTERPRET), so shapes stay small; the
`small_tiles` fixture monkeypatches the Triton launch config (`kernels/dfc.py: _config`) to small tiles and few
programs so the tiled path and the persistent loop run on those small shapes (other backends run the same data)."""
import numpy as np
import pytest
import torch

import kernel_backends
from ghostfast.kernels import dfc
from kernel_inputs import (BN_FIELDS, DFC_MODES as MODES, dfc_out_shape, dfc_pad_then_bias_logits, dfc_reference,
                           fold_dfc_params, make_dfc_params, skip_unsupported, strided, without)
from numerics import REL_TOL, assert_close_rel, poisoned_like

pytestmark = pytest.mark.usefixtures("kernel_backend")
# pooled tiles of 8 with a 2-lane halo each side (a tile owns 4, 3 for bilinear), 3 programs
SMALL_TILES = dict(halo_h=8, halo_w=8, tiled_h=True, tiled_w=True, block_c=16, block_k=16, full_rows=8,
                   max_programs=3)


def patch_config(monkeypatch, **choices):
    """Replace some of the Triton forward's launch choices (the rest stay the default's for the shape)."""
    default = dfc._config
    monkeypatch.setattr(dfc, "_config", lambda *a, **k: dict(default(*a, **k), **choices))


@pytest.fixture
def small_tiles(monkeypatch):
    patch_config(monkeypatch, **SMALL_TILES)


def _run(x, params, mode, out=None):
    return kernel_backends.dfc_forward(x, *params, mode, out=out)


def _check(x, params, mode, dtype=None):
    dtype = dtype or x.dtype
    c = params[0].shape[0]
    out = poisoned_like(torch.empty(dfc_out_shape(x, c, mode), dtype=x.dtype, device=x.device))
    got = _run(x, params, mode, out=out)
    assert got is out
    assert_close_rel(got, dfc_reference(x, params, mode), dtype)
    return got


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n,cin,c,h,w", [
    (1, 5, 7, 2, 2),
    (2, 5, 7, 3, 3),
    (1, 20, 40, 7, 7),  # Cin not a multiple of 16, C > BLOCK_C
    (2, 5, 7, 15, 13),
    (1, 5, 7, 4, 9),
    (2, 20, 40, 40, 37),
])
def test_dfc_kernel_shapes(device, n, cin, c, h, w, mode):
    x = torch.randn(n, cin, h, w, device=device)
    _check(x, make_dfc_params(cin, c, torch.float32, device), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("h,w", [(15, 13), (4, 9), (40, 37), (8, 30)])
def test_dfc_kernel_small_tiles(device, h, w, mode, small_tiles):
    """Pooled tiles of 4 (3 for bilinear) with a 2-lane halo: many tiles, partial last tiles, odd sizes."""
    cfg = dfc._plan(2, 6, 20, h, w, dfc._UPSAMPLE[mode], torch.device(device))
    assert cfg["tiled_h"] and cfg["tiled_w"] and cfg["total"] > cfg["grid"] == 3
    x = torch.randn(2, 6, h, w, device=device)
    _check(x, make_dfc_params(6, 20, torch.float32, device), mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_dfc_kernel_dtypes(device, dtype, mode, monkeypatch):
    skip_unsupported(dtype, device)
    patch_config(monkeypatch, block_c=16)  # 3 channel blocks
    x = torch.randn(2, 20, 15, 13, device=device, dtype=dtype)
    got = _check(x, make_dfc_params(20, 40, dtype, device), mode)
    assert got.dtype == dtype


@pytest.mark.parametrize("dtype,bn_dtype", [
    (torch.float16, torch.float32),  # fp16 autocast: the BatchNorms stay float32
    (torch.float16, torch.float16),  # model.half(): the BatchNorms in the input's half dtype
    (torch.bfloat16, torch.bfloat16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
])
def test_dfc_kernel_bn_dtypes(device, dtype, bn_dtype):
    skip_unsupported(dtype, device)
    x = torch.randn(1, 20, 15, 13, device=device, dtype=dtype)
    p = make_dfc_params(20, 40, dtype, device, bn_dtype=bn_dtype)
    assert all(t.dtype == bn_dtype for bn in p[1::2] for t in bn.tensors())
    _check(x, p, "bilinear")


@pytest.mark.parametrize("stage", [1, 3, 5, "all"])
@pytest.mark.parametrize("missing", BN_FIELDS + ("all",))
def test_dfc_kernel_missing_bn_tensors(device, missing, stage):
    """A missing BatchNorm tensor is the identity for it (weight 1, bias 0, mean 0; no var: no 1/sqrt(var + eps)),
    in bn3, bn4 or bn5 (index 1, 3, 5 of the parameters) or all three. eps is large so that a kernel reading a
    missing var as 0 or 1 shows."""
    fields = BN_FIELDS if missing == "all" else (missing,)
    x = torch.randn(2, 6, 11, 10, device=device)
    full = make_dfc_params(6, 20, torch.float32, device, eps=(0.3, 0.3, 0.3))
    p = list(full)
    for i in ((1, 3, 5) if stage == "all" else (stage,)):
        p[i] = without(p[i], *fields)
    _check(x, p, "nearest")
    assert _rel(dfc_reference(x, p, "gate"), dfc_reference(x, full, "gate")) > 1e2 * REL_TOL[torch.float32]


@pytest.mark.parametrize("mode", MODES)
def test_dfc_kernel_eps_per_stage(device, mode):
    """Each BatchNorm folds with its own eps."""
    x = torch.randn(1, 6, 15, 13, device=device)
    p = make_dfc_params(6, 20, torch.float32, device, eps=(0.5, 1e-3, 0.1))
    _check(x, p, mode)
    for i, j in ((1, 3), (3, 5), (1, 5)):  # the data tells each pair of eps apart
        swapped = list(p)
        swapped[i], swapped[j] = p[i]._replace(eps=p[j].eps), p[j]._replace(eps=p[i].eps)
        assert _rel(dfc_reference(x, swapped, "gate"), dfc_reference(x, p, "gate")) > 1e2 * REL_TOL[torch.float32]


def test_dfc_kernel_strided_bn_vectors(device):
    """BatchNorm vectors that are strided views: read by their strides."""
    x = torch.randn(1, 6, 15, 13, device=device)
    p = make_dfc_params(6, 20, torch.float32, device)
    p[1::2] = [strided(bn) for bn in p[1::2]]
    assert not p[1].weight.is_contiguous()
    _check(x, p, "bilinear")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_dfc_kernel_layouts(device, layout, mode):
    n, cin, c, h, w = 2, 20, 40, 15, 13
    if layout == "channels_last":
        x = torch.randn(n, cin, h, w, device=device).to(memory_format=torch.channels_last)
    else:  # a channel slice with every other column: no dense layout at all
        x = torch.randn(n, cin + 5, h, 2 * w, device=device)[:, 3:3 + cin, :, ::2]
    p = make_dfc_params(cin, c, torch.float32, device)
    got = _run(x, p, mode)
    assert_close_rel(got, dfc_reference(x, p, mode), torch.float32)
    if layout == "channels_last":
        assert got.is_contiguous(memory_format=torch.channels_last) and not got.is_contiguous()
    else:
        assert got.is_contiguous()


@pytest.mark.triton_only
@pytest.mark.parametrize("mode", MODES)
def test_dfc_kernel_strided_out(device, mode):
    """`out` is a channel slice of a bigger NaN buffer: written through its strides, nothing outside touched."""
    x = torch.randn(2, 6, 15, 13, device=device)
    p = make_dfc_params(6, 20, torch.float32, device)
    big = torch.full((2, 26) + dfc_out_shape(x, 20, mode)[2:], float("nan"), device=device)
    out = big[:, 3:23]
    got = _run(x, p, mode, out=out)
    assert got is out
    assert_close_rel(got, dfc_reference(x, p, mode), torch.float32)
    assert big[:, :3].isnan().all() and big[:, 23:].isnan().all()


@pytest.mark.parametrize("mode", MODES)
def test_dfc_kernel_persistent_loop(device, mode):
    """The default grid cap leaves several (n, tile, channel block) items per program."""
    n, cin, c, h, w = 2, 20, 40, 40, 37
    cfg = dfc._plan(n, cin, c, h, w, dfc._UPSAMPLE[mode], torch.device(device))
    if device == "cpu":
        assert cfg["total"] >= 2 * cfg["grid"]
    x = torch.randn(n, cin, h, w, device=device)
    _check(x, make_dfc_params(cin, c, torch.float32, device), mode)


def test_dfc_kernel_border_pads_biased_output(device):
    """The test data separates the spec from a kernel that zero-pads before adding the BN biases."""
    x = torch.randn(1, 6, 15, 13, device=device)
    p = make_dfc_params(6, 20, torch.float32, device)
    folded = [t.double() for t in fold_dfc_params(p, torch.float64)]
    wrong = torch.sigmoid(dfc_pad_then_bias_logits(x.double(), folded))
    right = dfc_reference(x, p, "gate")
    assert _rel(wrong, right) > 1e3 * REL_TOL[torch.float32]
    _check(x, p, "gate")


@pytest.mark.parametrize("mode", MODES)
def test_dfc_kernel_nan_propagates(device, mode, small_tiles):
    x = torch.randn(1, 6, 15, 13, device=device)
    x[0, 2, 6, 5] = float("nan")
    p = make_dfc_params(6, 20, torch.float32, device)
    got = _run(x, p, mode)
    ref = dfc_reference(x, p, mode)
    assert ref.isnan().any()
    assert torch.equal(got.isnan(), ref.isnan())
    ok = ~ref.isnan()
    assert_close_rel(got[ok], ref[ok], torch.float32)


@pytest.mark.parametrize("mode", MODES)
def test_dfc_kernel_empty_batch(device, mode):
    x = torch.randn(0, 6, 15, 13, device=device)
    got = _run(x, make_dfc_params(6, 20, torch.float32, device), mode)
    assert got.shape == dfc_out_shape(x, 20, mode)


def test_dfc_kernel_tf32_flag(device):
    """torch's own TF32 switch selects the tf32 dot; the default stays IEEE."""
    x = torch.randn(1, 20, 15, 13, device=device)
    p = make_dfc_params(20, 40, torch.float32, device)
    prev = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        got = _run(x, p, "nearest")
    finally:
        torch.set_float32_matmul_precision(prev)
    assert_close_rel(got, dfc_reference(x, p, "nearest"), torch.float32, factor=100)


@pytest.mark.triton_only
def test_dfc_kernel_upsample_ownership_covers():
    """The ownership rule: full-res pixel d belongs to the pooled tile [a, a+T) holding its source index
    (nearest src / bilinear i0), and that tile visits d in [2a-1, 2a+2T+2). Checked for every size up to 200,
    both source formulas, float32 and float64 coefficients, all tile sizes up to 28."""
    for p in range(1, 200):
        for size in (2 * p, 2 * p + 1):
            d = np.arange(size)
            s32 = np.float32(p) / np.float32(size)
            sources = [np.minimum(np.floor(d.astype(np.float32) * s32).astype(np.int64), p - 1)]
            for ft in (np.float32, np.float64):
                src = np.maximum((d.astype(ft) + ft(0.5)) * (ft(p) / ft(size)) - ft(0.5), 0)
                sources.append(src.astype(np.int64))
            for src in sources:
                for t in range(1, 29):
                    a = (src // t) * t
                    assert ((d >= 2 * a - 1) & (d < 2 * a + 2 * t + 2)).all(), (p, size, t)


@pytest.mark.parametrize("mode", MODES)
def test_dfc_kernel_index64(device, mode, monkeypatch):
    """The int64 offset path (taken when one image spans 2^31 elements) gives the same numbers."""
    patch_config(monkeypatch, **SMALL_TILES, index64=True)
    x = torch.randn(2, 6, 15, 13, device=device).to(memory_format=torch.channels_last)
    _check(x, make_dfc_params(6, 20, torch.float32, device), mode)


@pytest.mark.triton_only
def test_dfc_kernel_index64_switch():
    small = torch.empty(2, 8, 56, 56, device="meta")
    huge = torch.empty(1, 1, 1, 1, device="meta").as_strided((2, 8, 56, 56), (2 ** 32, 2 ** 28, 56, 1))
    assert not dfc._needs_index64(small)
    assert dfc._needs_index64(huge)
