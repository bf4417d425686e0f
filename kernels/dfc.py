"""DFC attention forward as one Triton kernel: avgpool2x2 -> conv1x1+BN -> dw1x5+BN -> dw5x1+BN -> sigmoid, optionally
upsampled back to H x W, each BN folded per channel from its live tensors inside the launch (kernels/batch_norm.py);
and its backward (folded BN vectors) as one more. x and out in NCHW, channels_last or any strides; fp32 accumulation
(fp64 for fp64)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from .batch_norm import _fold_bn, bn_launch_args

_UPSAMPLE = {"gate": 0, "nearest": 1, "bilinear": 2}  # mode -> the kernels' UPSAMPLE


@triton.jit
def _pooled_conv1x1(x_base, x_pix, in_img, cw_ptr, ci, cmask, CIN, sxc, sxh, sxw, scw_c, scw_k,
                    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, HALO_PIX: tl.constexpr, ACC: tl.constexpr,
                    XDT: tl.constexpr, IDX: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """conv1x1(avgpool2x2(x)) before BN on one halo tile: the forward and the backward's recompute must agree."""
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_C, HALO_PIX], dtype=ACC)
    for k0 in range(0, CIN, BLOCK_K):
        k = k0 + offs_k
        kmask = k < CIN
        m = kmask[:, None] & in_img[None, :]
        p = x_base + (k.to(IDX)[:, None] * sxc + x_pix[None, :])
        v = tl.load(p, mask=m, other=0.0).to(ACC)
        v += tl.load(p + sxw, mask=m, other=0.0).to(ACC)
        v += tl.load(p + sxh, mask=m, other=0.0).to(ACC)
        v += tl.load(p + sxh + sxw, mask=m, other=0.0).to(ACC)
        # Rounded to x's dtype like eager's pooled tensor, so fp16/bf16 take the tensor-core dot.
        pooled = (v * 0.25).to(XDT)
        wm = cmask[:, None] & kmask[None, :]
        w = tl.load(cw_ptr + ci[:, None] * scw_c + k.to(IDX)[None, :] * scw_k, mask=wm, other=0.0)
        acc = tl.dot(w.to(XDT), pooled, acc, input_precision=DOT_PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _bilinear_scales(H, W, HP, WP, scale_h, scale_w, IS_FP64: tl.constexpr):
    if IS_FP64:
        # F.interpolate's bilinear coefficients are in the accumulate type: fp64 for fp64.
        bscale_h = tl.cast(HP, tl.float64) / tl.cast(H, tl.float64)
        bscale_w = tl.cast(WP, tl.float64) / tl.cast(W, tl.float64)
    else:
        # Passed from the host: Triton's fp32 divide is not correctly rounded on the GPU.
        bscale_h = scale_h
        bscale_w = scale_w
    return bscale_h, bscale_w


@triton.jit
def _dfc_kernel(
    x_ptr,  # [N, CIN, H, W], any strides
    cw_ptr,  # [C, CIN, 1, 1] conv1x1 weight
    bn3_weight, bn3_bias, bn3_mean, bn3_var,  # [C] BN3's live vectors, contiguous, any float dtype (x if absent)
    bn3_eps: tl.float64,  # BN3's eps (fp64: rounded to ACC in the fold)
    hw_ptr,  # [C, 1, 1, 5] dw 1x5 weight
    bn4_weight, bn4_bias, bn4_mean, bn4_var,  # [C] BN4's live vectors
    bn4_eps: tl.float64,
    vw_ptr,  # [C, 1, 5, 1] dw 5x1 weight
    bn5_weight, bn5_bias, bn5_mean, bn5_var,  # [C] BN5's live vectors
    bn5_eps: tl.float64,
    out_ptr,  # [N, C, HP, WP] gate, or [N, C, H, W] upsampled gate; any strides
    scratch_ptr,  # [num_programs, 2, BLOCK_C, HALO_H * HALO_W] per-program tiles (y3 then gate; y4)
    CIN,  # scalar: input channels
    C,  # scalar: output channels
    H,  # scalar: x height
    W,  # scalar: x width
    HP,  # scalar: pooled height, H // 2
    WP,  # scalar: pooled width, W // 2
    sxn, sxc, sxh, sxw,  # x strides
    son, soc, soh, sow,  # out strides
    scw_c, scw_k,  # conv weight strides (out channel, in channel)
    shw_c, shw_t,  # h_weight strides (channel, tap)
    svw_c, svw_t,  # v_weight strides (channel, tap)
    scale_h,  # scalar fp32: HP / H, as F.interpolate computes it in float32
    scale_w,  # scalar fp32: WP / W
    row_span,  # scalar: full-res rows visited per tile (upsample only)
    tiles_h,  # scalar: pooled tiles along H
    tiles_w,  # scalar: pooled tiles along W
    cblocks,  # scalar: channel blocks, cdiv(C, BLOCK_C)
    total_items,  # scalar: N * tiles_h * tiles_w * cblocks
    HALO_H: tl.constexpr,  # rows of the computed pooled tile (pow2), owned tile + margins
    HALO_W: tl.constexpr,  # cols of the computed pooled tile (pow2)
    MARGIN_H: tl.constexpr,  # 2 when tiled along H (halo of the 5-tap convs), 0 when one tile covers HP
    MARGIN_W: tl.constexpr,  # 2 when tiled along W, 0 when one tile covers WP
    TILE_H: tl.constexpr,  # owned pooled rows per tile
    TILE_W: tl.constexpr,  # owned pooled cols per tile
    BLOCK_C: tl.constexpr,  # output channels per item
    BLOCK_K: tl.constexpr,  # input channels per dot step
    UPSAMPLE: tl.constexpr,  # 0: write the gate, 1: nearest, 2: bilinear to H x W
    FULL_ROWS: tl.constexpr,  # full-res rows per upsample step
    FULL_W: tl.constexpr,  # full-res cols visited per tile (pow2)
    IS_FP64: tl.constexpr,  # accumulate in fp64 (fp64 inputs), else fp32
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 inputs only)
    INDEX64: tl.constexpr,  # offsets within one image of x / out / weights may pass int32
    BN3_HAS_W: tl.constexpr, BN3_HAS_B: tl.constexpr, BN3_HAS_M: tl.constexpr, BN3_HAS_V: tl.constexpr,
    BN4_HAS_W: tl.constexpr, BN4_HAS_B: tl.constexpr, BN4_HAS_M: tl.constexpr, BN4_HAS_V: tl.constexpr,
    BN5_HAS_W: tl.constexpr, BN5_HAS_B: tl.constexpr, BN5_HAS_M: tl.constexpr, BN5_HAS_V: tl.constexpr,
):
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    # Offsets inside one image in int32 unless an image spans 2^31 elements (int64 pointer math costs registers).
    IDX: tl.constexpr = tl.int64 if INDEX64 else tl.int32
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    HALO_PIX: tl.constexpr = HALO_H * HALO_W
    FULL_PIX: tl.constexpr = FULL_ROWS * FULL_W

    pid = tl.program_id(0)
    nprog = tl.num_programs(0)

    lane = tl.arange(0, HALO_PIX)
    li = lane // HALO_W
    lj = lane % HALO_W
    offs_c = tl.arange(0, BLOCK_C)
    # The scratch is indexed by program, not by item, so it does not grow with the batch.
    scr_a = scratch_ptr + pid.to(tl.int64) * (2 * BLOCK_C * HALO_PIX)
    scr_b = scr_a + BLOCK_C * HALO_PIX
    scr_tile = offs_c[:, None] * HALO_PIX + lane[None, :]

    if UPSAMPLE == 2:
        bscale_h, bscale_w = _bilinear_scales(H, W, HP, WP, scale_h, scale_w, IS_FP64)
    fl = tl.arange(0, FULL_PIX)
    fr = fl // FULL_W
    fc = fl % FULL_W

    for item in range(pid, total_items, nprog):
        # Channel block innermost: neighbouring programs share the x tile in L2.
        cb = item % cblocks
        t = item // cblocks
        tw = t % tiles_w
        t = t // tiles_w
        th = t % tiles_h
        n = t // tiles_h

        ph0 = th * TILE_H
        pw0 = tw * TILE_W
        ph = ph0 - MARGIN_H + li
        pw = pw0 - MARGIN_W + lj
        in_img = (ph >= 0) & (ph < HP) & (pw >= 0) & (pw < WP)
        c = cb * BLOCK_C + offs_c
        cmask = c < C
        ci = c.to(IDX)

        # ---- y3 = BN3(conv1x1(avgpool2x2(x))) on the whole halo tile, pooling while loading.
        x_base = x_ptr + n.to(tl.int64) * sxn
        x_pix = (2 * ph).to(IDX) * sxh + (2 * pw).to(IDX) * sxw
        acc = _pooled_conv1x1(x_base, x_pix, in_img, cw_ptr, ci, cmask, CIN, sxc, sxh, sxw, scw_c, scw_k,
                              BLOCK_C, BLOCK_K, HALO_PIX, ACC, XDT, IDX, DOT_PRECISION)
        s3, b3 = _fold_bn(bn3_weight, bn3_bias, bn3_mean, bn3_var, bn3_eps, ci, cmask,
                          BN3_HAS_W, BN3_HAS_B, BN3_HAS_M, BN3_HAS_V, ACC)
        y3 = acc * s3[:, None] + b3[:, None]
        # Lanes outside the image hold the bias; the readers mask them, which is the zero padding of the
        # biased output.
        tl.store(scr_a + scr_tile, y3)
        tl.debug_barrier()

        # ---- y4 = BN4(dw1x5(y3)): five windows shifted along W, read back from the scratch.
        y4 = tl.zeros([BLOCK_C, HALO_PIX], dtype=ACC)
        for tap in tl.static_range(5):
            jj = lj + (tap - 2)
            pww = pw + (tap - 2)
            m = (jj >= 0) & (jj < HALO_W) & (pww >= 0) & (pww < WP)
            wt = tl.load(hw_ptr + ci * shw_c + tap * shw_t, mask=cmask, other=0.0).to(ACC)
            y3t = tl.load(scr_a + scr_tile + (tap - 2), mask=m[None, :], other=0.0)
            y4 += wt[:, None] * y3t
        s4, b4 = _fold_bn(bn4_weight, bn4_bias, bn4_mean, bn4_var, bn4_eps, ci, cmask,
                          BN4_HAS_W, BN4_HAS_B, BN4_HAS_M, BN4_HAS_V, ACC)
        y4 = y4 * s4[:, None] + b4[:, None]
        tl.store(scr_b + scr_tile, y4)
        tl.debug_barrier()

        # ---- gate = sigmoid(BN5(dw5x1(y4))): five windows shifted along H.
        y5 = tl.zeros([BLOCK_C, HALO_PIX], dtype=ACC)
        for tap in tl.static_range(5):
            ii = li + (tap - 2)
            phh = ph + (tap - 2)
            m = (ii >= 0) & (ii < HALO_H) & (phh >= 0) & (phh < HP)
            wt = tl.load(vw_ptr + ci * svw_c + tap * svw_t, mask=cmask, other=0.0).to(ACC)
            y4t = tl.load(scr_b + scr_tile + (tap - 2) * HALO_W, mask=m[None, :], other=0.0)
            y5 += wt[:, None] * y4t
        s5, b5 = _fold_bn(bn5_weight, bn5_bias, bn5_mean, bn5_var, bn5_eps, ci, cmask,
                          BN5_HAS_W, BN5_HAS_B, BN5_HAS_M, BN5_HAS_V, ACC)
        gate = tl.sigmoid(y5 * s5[:, None] + b5[:, None])

        o_base = out_ptr + n.to(tl.int64) * son + ci[:, None] * soc
        if UPSAMPLE == 0:
            own = in_img & (li >= MARGIN_H) & (li < MARGIN_H + TILE_H) & (lj >= MARGIN_W) & (lj < MARGIN_W + TILE_W)
            o_pix = ph.to(IDX) * soh + pw.to(IDX) * sow
            tl.store(o_base + o_pix[None, :], gate.to(out_ptr.dtype.element_ty),
                     mask=cmask[:, None] & own[None, :])
        else:
            # y3 is dead after the second barrier: the gate reuses its slot, so the upsample can gather
            # gate values at any lane of the tile (the owned tile plus, for bilinear, one ring after it).
            tl.store(scr_a + scr_tile, gate)
            tl.debug_barrier()
            # A full-res pixel belongs to the tile that owns its source index (nearest: src, bilinear: the
            # lower index i0), so every pixel is written exactly once. Columns [2*pw0 - 1, ...) and rows
            # [2*ph0 - 1, ...) cover those sources; single-tile dims start at 0.
            dw = 2 * pw0 - MARGIN_W // 2 + fc
            col_ok = (dw >= 0) & (dw < W)
            if UPSAMPLE == 1:
                sw = tl.minimum((dw.to(tl.float32) * scale_w).to(tl.int32), WP - 1)
                own_w = col_ok & (sw >= pw0) & (sw < pw0 + TILE_W)
                gw0 = sw - pw0 + MARGIN_W
            else:
                # src >= 0 after the clamp, so the truncating cast is floor, as in PyTorch.
                wr = tl.maximum((dw.to(bscale_w.dtype) + 0.5) * bscale_w - 0.5, 0.0)
                w0 = wr.to(tl.int32)
                wstep = (w0 < WP - 1).to(tl.int32)
                w1l = wr - w0.to(wr.dtype)
                w0l = 1.0 - w1l
                own_w = col_ok & (w0 >= pw0) & (w0 < pw0 + TILE_W)
                gw0 = w0 - pw0 + MARGIN_W
            o_col = dw.to(IDX) * sow
            for r0 in range(0, row_span, FULL_ROWS):
                dh = 2 * ph0 - MARGIN_H // 2 + r0 + fr
                row_ok = (dh >= 0) & (dh < H)
                if UPSAMPLE == 1:
                    sh = tl.minimum((dh.to(tl.float32) * scale_h).to(tl.int32), HP - 1)
                    own = own_w & row_ok & (sh >= ph0) & (sh < ph0 + TILE_H)
                    g_lane = (sh - ph0 + MARGIN_H) * HALO_W + gw0
                    gm = cmask[:, None] & own[None, :]
                    val = tl.load(scr_a + offs_c[:, None] * HALO_PIX + g_lane[None, :], mask=gm, other=0.0)
                else:
                    hr = tl.maximum((dh.to(bscale_h.dtype) + 0.5) * bscale_h - 0.5, 0.0)
                    h0 = hr.to(tl.int32)
                    hstep = (h0 < HP - 1).to(tl.int32)
                    h1l = hr - h0.to(hr.dtype)
                    h0l = 1.0 - h1l
                    own = own_w & row_ok & (h0 >= ph0) & (h0 < ph0 + TILE_H)
                    g00 = (h0 - ph0 + MARGIN_H) * HALO_W + gw0
                    g10 = g00 + hstep * HALO_W
                    gm = cmask[:, None] & own[None, :]
                    s_c = scr_a + offs_c[:, None] * HALO_PIX
                    v00 = tl.load(s_c + g00[None, :], mask=gm, other=0.0)
                    v01 = tl.load(s_c + (g00 + wstep)[None, :], mask=gm, other=0.0)
                    v10 = tl.load(s_c + g10[None, :], mask=gm, other=0.0)
                    v11 = tl.load(s_c + (g10 + wstep)[None, :], mask=gm, other=0.0)
                    # Same association as PyTorch's upsample_bilinear2d.
                    val = h0l[None, :] * (w0l[None, :] * v00 + w1l[None, :] * v01) + \
                        h1l[None, :] * (w0l[None, :] * v10 + w1l[None, :] * v11)
                o_pix = dh.to(IDX) * soh + o_col
                tl.store(o_base + o_pix[None, :], val.to(out_ptr.dtype.element_ty), mask=gm)
        # The next item overwrites this program's scratch.
        tl.debug_barrier()


def _pow2(v: int) -> int:
    return triton.next_power_of_2(max(int(v), 1))


_SM_COUNT = {}


def _max_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    # Persistent: a few programs per SM hide latency; more would only grow the scratch.
    return _SM_COUNT[idx] * 4


def _config(n, cin, c, h, w, upsample, device, elem=4):
    """The forward's launch choices for a shape: one deterministic config per shape (no autotune, which the
    interpreter cannot run), depending only on the shape, the accumulator's bytes `elem` and the device. A dict of
        halo_h, halo_w      the computed pooled tile, powers of two;
        tiled_h, tiled_w    True: the dim is cut into tiles with a 2-lane halo each side (a tile owns halo - 4
                            rows / cols, halo - 5 for bilinear); False: one tile covers it (halo >= the pooled
                            size), no halo lanes;
        block_c, block_k    output channels per item, input channels per dot step: powers of two >= 16;
        full_rows           full-resolution rows per upsample step, a power of two;
        max_programs        the persistent grid's cap;
        num_warps;
        num_stages          Triton's software pipelining depth of the conv1x1's K loop;
        index64             True forces int64 offsets inside an image (else only where an image needs them).
    `_plan` looks this function up at call time, derives the launch shape and checks it: a test may monkeypatch it
    to return any such dict that passes those checks, e.g. the default with small tiled halos and
    max_programs=3 (the multi-tile path and the persistent loop on small images) or index64=True."""
    hp, wp = h // 2, w // 2
    shrink = 5 if upsample == 2 else 4
    # At most 256 lanes per tile: the chain keeps several [BLOCK_C, lanes] tensors and their addresses live,
    # and bigger tiles spill on sm_90 (checked with ptxas, not yet timed). One tile covers a dim when it fits:
    # no halo lanes are computed, the readers mask the border.
    tiled_w = _pow2(wp) > 32
    halo_w = 16 if tiled_w else _pow2(wp)
    cap_h = 16 if tiled_w else 256 // halo_w
    tiled_h = _pow2(hp) > cap_h
    halo_h = min(max(cap_h, 8), 64) if tiled_h else _pow2(hp)
    while halo_h * halo_w < 16:  # tl.dot needs >= 16 columns
        if tiled_w:
            halo_h *= 2
        else:
            halo_w *= 2
    pix = halo_h * halo_w
    block_c = min(max(16, _pow2(c)), 128, max(16, 4096 // pix))
    full_w = _pow2(2 * (halo_w - shrink) + 3) if tiled_w else _pow2(w)
    row_span = 2 * (halo_h - shrink) + 3 if tiled_h else h
    return dict(halo_h=halo_h, halo_w=halo_w, tiled_h=tiled_h, tiled_w=tiled_w, block_c=block_c,
                block_k=16,  # one MMA k-step; wider K only added registers (ptxas, sm_90)
                full_rows=max(1, min(_pow2(row_span), 2048 // (block_c * full_w))),
                max_programs=_max_programs(device),
                num_warps=min(16, max(4, block_c * pix // 256)),  # ~8 elements per thread
                # fp64: each extra stage of the fp64 dot's operand buffers costs ~100 KB of shared memory (266 KB
                # at Triton's default 3 on 16x16-lane tiles, over sm_90's 227 KB; 32 KB with 1; ptxas, sm_90)
                num_stages=1 if elem == 8 else 3,
                index64=False)


def _is_pow2(v) -> bool:
    return isinstance(v, int) and v >= 1 and v & (v - 1) == 0


def _tiles(cfg: dict, hp: int, wp: int, margin: int, shrink: int) -> None:
    """Adds margin_h/w, tile_h/w, tiles_h/w to a config, checking its halos against the pooled size."""
    for key, size in (("h", hp), ("w", wp)):
        halo = cfg["halo_" + key]
        assert _is_pow2(halo), f"halo_{key} = {halo}: a power of two"
        if cfg["tiled_" + key]:
            assert halo - shrink >= 1, f"halo_{key} = {halo} too small for a tiled dim"
            cfg["margin_" + key], cfg["tile_" + key] = margin, halo - shrink
        else:
            assert halo >= size, f"halo_{key} = {halo} does not cover the pooled size {size}"
            cfg["margin_" + key], cfg["tile_" + key] = 0, halo
        cfg["tiles_" + key] = triton.cdiv(size, cfg["tile_" + key])
    assert cfg["halo_h"] * cfg["halo_w"] >= 16, "tl.dot needs >= 16 lanes"
    assert _is_pow2(cfg["block_c"]) and _is_pow2(cfg["block_k"]) and min(cfg["block_c"], cfg["block_k"]) >= 16
    assert _is_pow2(cfg["num_warps"]) and cfg["max_programs"] >= 1 and cfg["num_stages"] >= 1


def _plan(n, cin, c, h, w, upsample, device, elem=4) -> dict:
    """The forward's full launch shape: `_config`'s choices (looked up now) plus margin_h/w, tile_h/w (owned
    pooled rows / cols per tile), tiles_h/w, cblocks, total (items), grid, full_w and row_span."""
    cfg = dict(_config(n, cin, c, h, w, upsample, device, elem))
    _tiles(cfg, h // 2, w // 2, 2, 5 if upsample == 2 else 4)
    assert _is_pow2(cfg["full_rows"])
    cfg["full_w"] = _pow2(2 * cfg["tile_w"] + 3) if cfg["tiled_w"] else _pow2(w)
    cfg["row_span"] = 2 * cfg["tile_h"] + 3 if cfg["tiled_h"] else h
    cfg["cblocks"] = triton.cdiv(c, cfg["block_c"])
    cfg["total"] = n * cfg["tiles_h"] * cfg["tiles_w"] * cfg["cblocks"]
    cfg["grid"] = max(1, min(cfg["total"], cfg["max_programs"]))
    return cfg


def _needs_index64(*tensors: Tensor) -> bool:
    """Whether an offset inside one image (all dims but the batch, which the kernel offsets in int64) can pass
    int32; the slack covers masked halo lanes up to 64 rows / cols outside the image."""
    for t in tensors:
        reach = sum((s - 1 + 64) * abs(st) for s, st in zip(t.shape[1:], t.stride()[1:]))
        if reach >= 2 ** 31 - 1:
            return True
    return False


def _out_like(x: Tensor, shape) -> Tensor:
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _dims(x, conv_weight, h_weight, v_weight, mode):
    """(n, cin, c, h, w, hp, wp, upsample, output shape), checked as both directions require."""
    assert x.dim() == 4 and conv_weight.dim() == 4 and h_weight.shape[-1] == 5 and v_weight.shape[-2] == 5
    n, cin, h, w = x.shape
    c = conv_weight.shape[0]
    hp, wp = h // 2, w // 2
    assert hp >= 1 and wp >= 1, "DFC needs H, W >= 2"
    upsample = _UPSAMPLE[mode]
    shape = (n, c, h, w) if upsample else (n, c, hp, wp)
    return n, cin, c, h, w, hp, wp, upsample, shape


def _dot_precision(x: Tensor) -> str:
    # torch's own TF32 switch decides, as it does for eager conv.
    if x.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def _param_args(conv_weight, h_weight, v_weight, h, w, hp, wp):
    """The kernels' shared scalar arguments after the image strides: weight strides, then the upsample scales
    computed in float32 as F.interpolate does (Triton's fp32 divide is not correctly rounded on the GPU)."""
    return (conv_weight.stride(0), conv_weight.stride(1),
            h_weight.stride(0), h_weight.stride(3),
            v_weight.stride(0), v_weight.stride(2),
            float(np.float32(hp) / np.float32(h)), float(np.float32(wp) / np.float32(w)))


def dfc_forward(x: Tensor, conv_weight: Tensor, bn3, h_weight: Tensor, bn4, v_weight: Tensor, bn5, mode: str,
                out: Optional[Tensor] = None) -> Tensor:
    """DFC attention in one launch: sigmoid(BN5(dw5x1(BN4(dw1x5(BN3(conv1x1(avgpool2x2(x)))))))), each BatchNorm
    `(weight, bias, mean, var, eps)` folded per channel inside the kernel (tensors optional 1-D per-channel
    vectors of any float dtype; None: the identity). `mode` 'gate': the gate at the pooled resolution
    [N, C, H//2, W//2]; 'nearest' / 'bilinear': upsampled to x's H x W as F.interpolate does. Writes `out` (x's
    dtype, any strides) when given."""
    assert mode in _UPSAMPLE, f"mode must be one of {tuple(_UPSAMPLE)}, got {mode!r}"
    n, cin, c, h, w, hp, wp, upsample, shape = _dims(x, conv_weight, h_weight, v_weight, mode)
    if out is None:
        out = _out_like(x, shape)
    else:
        assert tuple(out.shape) == shape and out.dtype == x.dtype and out.device == x.device
    if out.numel() == 0:
        return out
    cfg = _plan(n, cin, c, h, w, upsample, x.device, 8 if x.dtype == torch.float64 else 4)
    bn3_ptrs, bn3_eps, bn3_flags = bn_launch_args(bn3, c, x, "BN3")
    bn4_ptrs, bn4_eps, bn4_flags = bn_launch_args(bn4, c, x, "BN4")
    bn5_ptrs, bn5_eps, bn5_flags = bn_launch_args(bn5, c, x, "BN5")
    is_fp64 = x.dtype == torch.float64
    acc_dtype = torch.float64 if is_fp64 else torch.float32
    scratch = torch.empty(cfg["grid"] * 2 * cfg["block_c"] * cfg["halo_h"] * cfg["halo_w"], dtype=acc_dtype,
                          device=x.device)
    _dfc_kernel[(cfg["grid"],)](
        x, conv_weight, *bn3_ptrs, bn3_eps, h_weight, *bn4_ptrs, bn4_eps, v_weight, *bn5_ptrs, bn5_eps, out, scratch,
        cin, c, h, w, hp, wp,
        *x.stride(), *out.stride(),
        *_param_args(conv_weight, h_weight, v_weight, h, w, hp, wp),
        cfg["row_span"], cfg["tiles_h"], cfg["tiles_w"], cfg["cblocks"], cfg["total"],
        HALO_H=cfg["halo_h"], HALO_W=cfg["halo_w"], MARGIN_H=cfg["margin_h"], MARGIN_W=cfg["margin_w"],
        TILE_H=cfg["tile_h"], TILE_W=cfg["tile_w"], BLOCK_C=cfg["block_c"], BLOCK_K=cfg["block_k"],
        UPSAMPLE=upsample, FULL_ROWS=cfg["full_rows"], FULL_W=cfg["full_w"], IS_FP64=is_fp64,
        DOT_PRECISION=_dot_precision(x), INDEX64=bool(cfg["index64"]) or _needs_index64(x, out, conv_weight),
        **bn3_flags, **bn4_flags, **bn5_flags, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Backward: the gradients of the DFC gate / attention w.r.t. x and all nine folded parameters, in one launch.
#
# A work item is (image, pooled tile). Per channel block it recomputes the forward chain on the tile plus a 4-lane
# halo (a3 needs +-4 rows/cols so that a4, a5 and the sigmoid are exact on +-2, which the transposed 5-tap convs
# read back), then walks the chain backwards through a per-program scratch (a3, a4 / gy4, gy5) with
# tl.debug_barrier between writer and reader, as the forward does. gy3 = d/d(y3) of every channel block is kept in
# the scratch, so a second phase loops over input-channel blocks and finishes grad_x of the tile (all C channels
# summed in registers: no atomics, every grad_x element written once) and grad_W3.
# Per-channel sums and weight grads go to a per-program partial row (stored by the program's first item, then
# load-add-store; only that program touches it), summed over programs by one torch .sum(0): deterministic for a
# given grid and no atomics. The grid is capped so all partial rows and scratch stay under _BWD_BUDGET_BYTES.
# ----------------------------------------------------------------------------------------------------------------

# Per-program partial row: s3, b3, s4, b4, s5, b5 as [C] each, h taps [C, 5], v taps [C, 5], then W3 [C, CIN].
_PART_ROWS = 16


@triton.jit
def _dfc_backward_kernel(
    x_ptr,  # [N, CIN, H, W], any strides
    cw_ptr,  # [C, CIN, 1, 1] conv1x1 weight
    cs_ptr,  # [C] BN3 folded scale (contiguous)
    cb_ptr,  # [C] BN3 folded shift (contiguous)
    hw_ptr,  # [C, 1, 1, 5] dw 1x5 weight
    hs_ptr,  # [C] BN4 scale
    hb_ptr,  # [C] BN4 shift
    vw_ptr,  # [C, 1, 5, 1] dw 5x1 weight
    vs_ptr,  # [C] BN5 scale
    vb_ptr,  # [C] BN5 shift
    go_ptr,  # incoming grad: [N, C, HP, WP] (gate) or [N, C, H, W] (upsampled gate); any strides
    gx_ptr,  # [N, CIN, H, W] grad of x, any strides; every element written here
    part_ptr,  # [num_programs, PART_LEN] per-program partial sums (accumulate dtype), written before read
    scratch_ptr,  # [num_programs, 3 * BLOCK_C + CPAD, HALO_H * HALO_W]: a3; a4 then gy4; gy5; gy3 of all C
    CIN,  # scalar: input channels
    C,  # scalar: output channels
    H,  # scalar: x height
    W,  # scalar: x width
    HP,  # scalar: pooled height, H // 2
    WP,  # scalar: pooled width, W // 2
    sxn, sxc, sxh, sxw,  # x strides
    sgn, sgc, sgh, sgw,  # incoming grad strides
    sdn, sdc, sdh, sdw,  # grad_x strides
    scw_c, scw_k,  # conv weight strides (out channel, in channel)
    shw_c, shw_t,  # h_weight strides (channel, tap)
    svw_c, svw_t,  # v_weight strides (channel, tap)
    scale_h,  # scalar fp32: HP / H, as F.interpolate computes it in float32
    scale_w,  # scalar fp32: WP / W
    tiles_h,  # scalar: pooled tiles along H
    tiles_w,  # scalar: pooled tiles along W
    cblocks,  # scalar: channel blocks, cdiv(C, BLOCK_C)
    total_items,  # scalar: N * tiles_h * tiles_w
    PART_LEN,  # scalar: 16 * C, plus C * CIN when grad_W3 is needed
    HALO_H: tl.constexpr,  # rows of the computed pooled tile (pow2), owned tile + margins
    HALO_W: tl.constexpr,  # cols of the computed pooled tile (pow2)
    MARGIN_H: tl.constexpr,  # 4 when tiled along H, 0 when one tile covers HP
    MARGIN_W: tl.constexpr,  # 4 when tiled along W, 0 when one tile covers WP
    TILE_H: tl.constexpr,  # owned pooled rows per tile
    TILE_W: tl.constexpr,  # owned pooled cols per tile
    BLOCK_C: tl.constexpr,  # output channels per step
    BLOCK_K: tl.constexpr,  # input channels per dot step
    CPAD: tl.constexpr,  # rows of the gy3 scratch: cblocks * BLOCK_C, or 0 when neither grad_x nor grad_W3 is needed
    UPSAMPLE: tl.constexpr,  # 0: grad of the gate, 1: of the nearest-, 2: of the bilinear-upsampled gate
    IS_FP64: tl.constexpr,  # accumulate in fp64 (fp64 inputs), else fp32
    DOT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 inputs only)
    INDEX64: tl.constexpr,  # offsets within one image may pass int32
    NEED_X: tl.constexpr,  # write grad_x
    NEED_W3: tl.constexpr,  # accumulate grad_W3
):
    ACC: tl.constexpr = tl.float64 if IS_FP64 else tl.float32
    IDX: tl.constexpr = tl.int64 if INDEX64 else tl.int32
    XDT: tl.constexpr = x_ptr.dtype.element_ty
    GDT: tl.constexpr = gx_ptr.dtype.element_ty
    HALO_PIX: tl.constexpr = HALO_H * HALO_W

    pid = tl.program_id(0)
    nprog = tl.num_programs(0)

    lane = tl.arange(0, HALO_PIX)
    li = lane // HALO_W
    lj = lane % HALO_W
    offs_c = tl.arange(0, BLOCK_C)
    offs_k = tl.arange(0, BLOCK_K)
    scr_1 = scratch_ptr + pid.to(tl.int64) * ((3 * BLOCK_C + CPAD) * HALO_PIX)
    scr_2 = scr_1 + BLOCK_C * HALO_PIX
    scr_3 = scr_2 + BLOCK_C * HALO_PIX
    scr_gy3 = scr_3 + BLOCK_C * HALO_PIX
    scr_tile = offs_c[:, None] * HALO_PIX + lane[None, :]
    part = part_ptr + pid.to(tl.int64) * PART_LEN
    part_w3 = part + 16 * C

    if UPSAMPLE == 2:
        bscale_h, bscale_w = _bilinear_scales(H, W, HP, WP, scale_h, scale_w, IS_FP64)

    for item in range(pid, total_items, nprog):
        tw = item % tiles_w
        t = item // tiles_w
        th = t % tiles_h
        n = t // tiles_h

        ph0 = th * TILE_H
        pw0 = tw * TILE_W
        ph = ph0 - MARGIN_H + li
        pw = pw0 - MARGIN_W + lj
        in_img = (ph >= 0) & (ph < HP) & (pw >= 0) & (pw < WP)
        own = in_img & (li >= MARGIN_H) & (li < MARGIN_H + TILE_H) & (lj >= MARGIN_W) & (lj < MARGIN_W + TILE_W)
        x_base = x_ptr + n.to(tl.int64) * sxn
        x_pix = (2 * ph).to(IDX) * sxh + (2 * pw).to(IDX) * sxw
        g_base = go_ptr + n.to(tl.int64) * sgn
        # The grid never exceeds the items, so a program's first item stores its partials (no zero-fill launch).
        acc_part = item != pid

        for cb in range(0, cblocks):
            c = cb * BLOCK_C + offs_c
            cmask = c < C
            ci = c.to(IDX)

            # ---- forward recompute: y3 (pre-BN) on the whole halo tile, as the forward kernel does.
            y3 = _pooled_conv1x1(x_base, x_pix, in_img, cw_ptr, ci, cmask, CIN, sxc, sxh, sxw, scw_c, scw_k,
                                 BLOCK_C, BLOCK_K, HALO_PIX, ACC, XDT, IDX, DOT_PRECISION)
            s3, b3 = _fold_bn(cs_ptr, cb_ptr, cs_ptr, cs_ptr, 0.0, ci, cmask, True, True, False, False, ACC)
            # Zero outside the image: the zero padding of the biased output.
            a3 = tl.where(in_img[None, :], y3 * s3[:, None] + b3[:, None], 0.0)
            tl.store(scr_1 + scr_tile, a3)
            tl.debug_barrier()

            # ---- y4 = dw1x5(a3), exact on cols [2, HALO_W - 2) of the tile.
            y4 = tl.zeros([BLOCK_C, HALO_PIX], dtype=ACC)
            for tap in tl.static_range(5):
                jj = lj + (tap - 2)
                m = (jj >= 0) & (jj < HALO_W)
                wt = tl.load(hw_ptr + ci * shw_c + tap * shw_t, mask=cmask, other=0.0).to(ACC)
                y4 += wt[:, None] * tl.load(scr_1 + scr_tile + (tap - 2), mask=m[None, :], other=0.0)
            s4, b4 = _fold_bn(hs_ptr, hb_ptr, hs_ptr, hs_ptr, 0.0, ci, cmask, True, True, False, False, ACC)
            a4 = tl.where(in_img[None, :], y4 * s4[:, None] + b4[:, None], 0.0)
            tl.store(scr_2 + scr_tile, a4)
            tl.debug_barrier()

            # ---- y5 = dw5x1(a4), gate: exact on rows and cols [2, HALO - 2).
            y5 = tl.zeros([BLOCK_C, HALO_PIX], dtype=ACC)
            for tap in tl.static_range(5):
                ii = li + (tap - 2)
                m = (ii >= 0) & (ii < HALO_H)
                wt = tl.load(vw_ptr + ci * svw_c + tap * svw_t, mask=cmask, other=0.0).to(ACC)
                y5 += wt[:, None] * tl.load(scr_2 + scr_tile + (tap - 2) * HALO_W, mask=m[None, :], other=0.0)
            s5, b5 = _fold_bn(vs_ptr, vb_ptr, vs_ptr, vs_ptr, 0.0, ci, cmask, True, True, False, False, ACC)
            gate = tl.sigmoid(y5 * s5[:, None] + b5[:, None])

            # ---- grad of the gate at the pooled pixel: loaded, or gathered from the full-res grad (the adjoint
            # of the upsample). A pooled index i receives full-res rows 2i + [0, 3) (nearest) or 2i + [-2, 4)
            # (bilinear, as i0 or i1), checked exhaustively in the tests; membership is tested with the forward's
            # own index math, so each full-res pixel adds into exactly the pooled pixels it was read from.
            gcm = cmask[:, None] & in_img[None, :]
            g_chan = g_base + ci[:, None] * sgc
            if UPSAMPLE == 0:
                gg = tl.load(g_chan + (ph.to(IDX) * sgh + pw.to(IDX) * sgw)[None, :], mask=gcm, other=0.0).to(ACC)
            elif UPSAMPLE == 1:
                gg = tl.zeros([BLOCK_C, HALO_PIX], dtype=ACC)
                for oh in tl.static_range(3):
                    dh = 2 * ph + oh
                    sh = tl.minimum((dh.to(tl.float32) * scale_h).to(tl.int32), HP - 1)
                    rok = (dh < H) & (sh == ph)
                    for ow in tl.static_range(3):
                        dw = 2 * pw + ow
                        sw = tl.minimum((dw.to(tl.float32) * scale_w).to(tl.int32), WP - 1)
                        mm = rok & (dw < W) & (sw == pw)
                        gg += tl.load(g_chan + (dh.to(IDX) * sgh + dw.to(IDX) * sgw)[None, :],
                                      mask=gcm & mm[None, :], other=0.0).to(ACC)
            else:
                gg = tl.zeros([BLOCK_C, HALO_PIX], dtype=ACC)
                for oh in tl.static_range(6):
                    dh = 2 * ph + (oh - 2)
                    hr = tl.maximum((dh.to(bscale_h.dtype) + 0.5) * bscale_h - 0.5, 0.0)
                    h0 = hr.to(tl.int32)
                    h1 = h0 + (h0 < HP - 1).to(tl.int32)
                    h1l = hr - h0.to(hr.dtype)
                    wgt_h = tl.where(h0 == ph, 1.0 - h1l, 0.0) + tl.where(h1 == ph, h1l, 0.0)
                    rok = (dh >= 0) & (dh < H) & ((h0 == ph) | (h1 == ph))
                    for ow in tl.static_range(6):
                        dw = 2 * pw + (ow - 2)
                        wr = tl.maximum((dw.to(bscale_w.dtype) + 0.5) * bscale_w - 0.5, 0.0)
                        w0 = wr.to(tl.int32)
                        w1 = w0 + (w0 < WP - 1).to(tl.int32)
                        w1l = wr - w0.to(wr.dtype)
                        wgt_w = tl.where(w0 == pw, 1.0 - w1l, 0.0) + tl.where(w1 == pw, w1l, 0.0)
                        mm = rok & (dw >= 0) & (dw < W) & ((w0 == pw) | (w1 == pw))
                        gv = tl.load(g_chan + (dh.to(IDX) * sgh + dw.to(IDX) * sgw)[None, :],
                                     mask=gcm & mm[None, :], other=0.0).to(ACC)
                        gg += (wgt_h * wgt_w).to(ACC)[None, :] * gv

            # ---- through the sigmoid and BN5.
            ga5 = tl.where(gcm, gg * gate * (1.0 - gate), 0.0)
            own2 = cmask[:, None] & own[None, :]
            r_s5 = tl.sum(tl.where(own2, ga5 * y5, 0.0), axis=1)
            r_b5 = tl.sum(tl.where(own2, ga5, 0.0), axis=1)
            gy5 = ga5 * s5[:, None]
            tl.store(scr_3 + scr_tile, gy5)
            # grad_Wv[t] = sum gy5 * a4 shifted by t - 2 rows (a4 is zero outside the image).
            for tap in tl.static_range(5):
                ii = li + (tap - 2)
                m = own & (ii >= 0) & (ii < HALO_H)
                a4t = tl.load(scr_2 + scr_tile + (tap - 2) * HALO_W, mask=cmask[:, None] & m[None, :], other=0.0)
                r_v = tl.sum(gy5 * a4t, axis=1)
                pv = part + 11 * C + c * 5 + tap
                tl.store(pv, tl.load(pv, mask=cmask & acc_part, other=0.0) + r_v, mask=cmask)
            tl.debug_barrier()

            # ---- ga4 = transposed 5x1 conv of gy5 (exact on the owned rows, cols [2, HALO_W - 2)).
            ga4 = tl.zeros([BLOCK_C, HALO_PIX], dtype=ACC)
            for tap in tl.static_range(5):
                ii = li - (tap - 2)
                m = (ii >= 0) & (ii < HALO_H)
                wt = tl.load(vw_ptr + ci * svw_c + tap * svw_t, mask=cmask, other=0.0).to(ACC)
                ga4 += wt[:, None] * tl.load(scr_3 + scr_tile - (tap - 2) * HALO_W, mask=m[None, :], other=0.0)
            ga4 = tl.where(gcm, ga4, 0.0)
            r_s4 = tl.sum(tl.where(own2, ga4 * y4, 0.0), axis=1)
            r_b4 = tl.sum(tl.where(own2, ga4, 0.0), axis=1)
            gy4 = ga4 * s4[:, None]
            # a4 was last read before the barrier above: its slot now takes gy4.
            tl.store(scr_2 + scr_tile, gy4)
            for tap in tl.static_range(5):
                jj = lj + (tap - 2)
                m = own & (jj >= 0) & (jj < HALO_W)
                a3t = tl.load(scr_1 + scr_tile + (tap - 2), mask=cmask[:, None] & m[None, :], other=0.0)
                r_h = tl.sum(gy4 * a3t, axis=1)
                ph_ = part + 6 * C + c * 5 + tap
                tl.store(ph_, tl.load(ph_, mask=cmask & acc_part, other=0.0) + r_h, mask=cmask)
            tl.debug_barrier()

            # ---- ga3 = transposed 1x5 conv of gy4, on the owned tile only.
            ga3 = tl.zeros([BLOCK_C, HALO_PIX], dtype=ACC)
            for tap in tl.static_range(5):
                jj = lj - (tap - 2)
                m = (jj >= 0) & (jj < HALO_W)
                wt = tl.load(hw_ptr + ci * shw_c + tap * shw_t, mask=cmask, other=0.0).to(ACC)
                ga3 += wt[:, None] * tl.load(scr_2 + scr_tile - (tap - 2), mask=m[None, :], other=0.0)
            ga3 = tl.where(own2, ga3, 0.0)
            r_s3 = tl.sum(ga3 * y3, axis=1)
            r_b3 = tl.sum(ga3, axis=1)
            if CPAD > 0:
                tl.store(scr_gy3 + cb * (BLOCK_C * HALO_PIX) + scr_tile, ga3 * s3[:, None])

            pc = part + c
            pm = cmask & acc_part
            tl.store(pc, tl.load(pc, mask=pm, other=0.0) + r_s3, mask=cmask)
            tl.store(pc + C, tl.load(pc + C, mask=pm, other=0.0) + r_b3, mask=cmask)
            tl.store(pc + 2 * C, tl.load(pc + 2 * C, mask=pm, other=0.0) + r_s4, mask=cmask)
            tl.store(pc + 3 * C, tl.load(pc + 3 * C, mask=pm, other=0.0) + r_b4, mask=cmask)
            tl.store(pc + 4 * C, tl.load(pc + 4 * C, mask=pm, other=0.0) + r_s5, mask=cmask)
            tl.store(pc + 5 * C, tl.load(pc + 5 * C, mask=pm, other=0.0) + r_b5, mask=cmask)
            # The next channel block overwrites the a3 / gy4 / gy5 slots.
            tl.debug_barrier()

        if CPAD > 0:
            # ---- phase 2, per input-channel block: gp = W3^T gy3 over all C (registers), grad_x = gp / 4 on each
            # 2x2 window; grad_W3 += gy3 p^T over the owned pixels.
            d_base = gx_ptr + n.to(tl.int64) * sdn
            d_pix = (2 * ph).to(IDX) * sdh + (2 * pw).to(IDX) * sdw
            for k0 in range(0, CIN, BLOCK_K):
                k = k0 + offs_k
                kmask = k < CIN
                if NEED_W3:
                    m = kmask[:, None] & own[None, :]
                    p = x_base + (k.to(IDX)[:, None] * sxc + x_pix[None, :])
                    v = tl.load(p, mask=m, other=0.0).to(ACC)
                    v += tl.load(p + sxw, mask=m, other=0.0).to(ACC)
                    v += tl.load(p + sxh, mask=m, other=0.0).to(ACC)
                    v += tl.load(p + sxh + sxw, mask=m, other=0.0).to(ACC)
                    pooled_t = tl.trans((v * 0.25).to(XDT))
                gp = tl.zeros([BLOCK_K, HALO_PIX], dtype=ACC)
                for cb in range(0, cblocks):
                    c = cb * BLOCK_C + offs_c
                    cmask = c < C
                    gy3 = tl.load(scr_gy3 + cb * (BLOCK_C * HALO_PIX) + scr_tile).to(XDT)
                    wm = cmask[:, None] & kmask[None, :]
                    if NEED_W3:
                        gw = tl.dot(gy3, pooled_t, tl.zeros([BLOCK_C, BLOCK_K], dtype=ACC),
                                    input_precision=DOT_PRECISION, out_dtype=ACC)
                        pw3 = part_w3 + c[:, None] * CIN + k[None, :]
                        tl.store(pw3, tl.load(pw3, mask=wm & acc_part, other=0.0) + gw, mask=wm)
                    if NEED_X:
                        w = tl.load(cw_ptr + c.to(IDX)[:, None] * scw_c + k.to(IDX)[None, :] * scw_k, mask=wm,
                                    other=0.0)
                        gp = tl.dot(tl.trans(w.to(XDT)), gy3, gp, input_precision=DOT_PRECISION, out_dtype=ACC)
                if NEED_X:
                    gv = (gp * 0.25).to(GDT)
                    m = kmask[:, None] & own[None, :]
                    d = d_base + (k.to(IDX)[:, None] * sdc + d_pix[None, :])
                    tl.store(d, gv, mask=m)
                    tl.store(d + sdw, gv, mask=m)
                    tl.store(d + sdh, gv, mask=m)
                    tl.store(d + sdh + sdw, gv, mask=m)
                    # The row / col that avgpool floors off (odd H / W) gets zero, written by the tile owning the
                    # last pooled row / col.
                    zero = tl.zeros([BLOCK_K, HALO_PIX], dtype=GDT)
                    last_r = own & (ph == HP - 1) & (H % 2 == 1)
                    last_c = own & (pw == WP - 1) & (W % 2 == 1)
                    mr = kmask[:, None] & last_r[None, :]
                    mc = kmask[:, None] & last_c[None, :]
                    tl.store(d + 2 * sdh, zero, mask=mr)
                    tl.store(d + 2 * sdh + sdw, zero, mask=mr)
                    tl.store(d + 2 * sdw, zero, mask=mc)
                    tl.store(d + sdh + 2 * sdw, zero, mask=mc)
                    tl.store(d + 2 * sdh + 2 * sdw, zero, mask=mr & mc)
        # The next item overwrites this program's scratch.
        tl.debug_barrier()


_BWD_BUDGET_BYTES = 128 << 20  # partial sums + scratch of all programs; caps the grid for wide layers


def _backward_config(n, cin, c, h, w, need_gy3, need_w3, elem, device):
    """The backward's launch choices (one deterministic config per shape, as the forward's), a dict of
        halo_h, halo_w      the computed pooled tile, powers of two;
        tiled_h, tiled_w    True: tiles with a 4-lane margin each side (a tile owns halo - 8 rows / cols);
                            False: one tile covers the dim (halo >= the pooled size);
        block_c, block_k    channels per step, input channels per dot step: powers of two >= 16;
        max_programs        the persistent grid's cap (`_backward_plan` also caps it by memory);
        num_warps;
        num_stages          Triton's software pipelining depth of the K and channel-block loops;
        index64             True forces int64 offsets inside an image.
    `_backward_plan` looks it up at call time, derives the launch shape and checks it: a test may monkeypatch it
    to return any such dict that passes those checks (small tiled halos, few programs, index64=True)."""
    hp, wp = h // 2, w // 2
    # A 4-lane margin each side: a tile of 32 owns 24, one of 16 owns 8.
    tiled_w = _pow2(wp) > 32
    halo_w = 32 if tiled_w else _pow2(wp)
    cap_h = max(16, 512 // halo_w)
    tiled_h = _pow2(hp) > cap_h
    halo_h = cap_h if tiled_h else _pow2(hp)
    while halo_h * halo_w < 16:  # tl.dot needs >= 16 on every dim
        if tiled_w:
            halo_h *= 2
        else:
            halo_w *= 2
    pix = halo_h * halo_w
    block_c = min(max(16, _pow2(c)), 64, max(16, 4096 // pix))
    return dict(halo_h=halo_h, halo_w=halo_w, tiled_h=tiled_h, tiled_w=tiled_w, block_c=block_c, block_k=16,
                max_programs=_max_programs(device), num_warps=min(16, max(4, block_c * pix // 256)),
                # one stage: Triton's default 3 multi-buffers the dots' operands, 297 KB in fp32 and 528 KB in fp64
                # on the 16x32-lane tiles (sm_90 has 227 KB); with 1, 25-133 KB (ptxas, sm_90)
                num_stages=1, index64=False)


def _backward_plan(n, cin, c, h, w, need_gy3, need_w3, elem, device) -> dict:
    """The backward's full launch shape: `_backward_config`'s choices (looked up now) plus margin_h/w, tile_h/w,
    tiles_h/w, cblocks, cpad (rows of the gy3 scratch), part_len, total (items) and grid, capped so the partial
    rows and scratch of all programs stay under _BWD_BUDGET_BYTES (`elem`: bytes per accumulator)."""
    cfg = dict(_backward_config(n, cin, c, h, w, need_gy3, need_w3, elem, device))
    _tiles(cfg, h // 2, w // 2, 4, 8)
    pix = cfg["halo_h"] * cfg["halo_w"]
    cfg["cblocks"] = triton.cdiv(c, cfg["block_c"])
    cfg["cpad"] = cfg["cblocks"] * cfg["block_c"] if need_gy3 else 0
    cfg["total"] = n * cfg["tiles_h"] * cfg["tiles_w"]
    cfg["part_len"] = _PART_ROWS * c + (c * cin if need_w3 else 0)
    per_program = elem * ((3 * cfg["block_c"] + cfg["cpad"]) * pix + cfg["part_len"])
    cap = max(1, _BWD_BUDGET_BYTES // per_program)
    cfg["grid"] = max(1, min(cfg["total"], cfg["max_programs"], cap))
    return cfg


def dfc_backward(grad: Tensor, x: Tensor, conv_weight: Tensor, conv_scale: Tensor, conv_bias: Tensor,
                 h_weight: Tensor, h_scale: Tensor, h_bias: Tensor, v_weight: Tensor, v_scale: Tensor, v_bias: Tensor,
                 mode: str, needs: Sequence[bool]) -> tuple:
    """Grads of `dfc_forward` (each BatchNorm given folded, as its per-channel scale and shift) w.r.t. (x,
    conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias), None where `needs`
    (10 bools, list or tuple) is False. `grad` has the forward output's shape for `mode` ('gate', 'nearest',
    'bilinear'); the upsample's adjoint is a gather inside the launch. One Triton launch, then one torch sum of
    the per-program partials (and one cast when the parameters are fp16 / bf16) and one multi-tensor copy of them
    into separate gradient tensors."""
    assert mode in _UPSAMPLE, f"mode must be one of {tuple(_UPSAMPLE)}, got {mode!r}"
    params = (conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias)
    n, cin, c, h, w, hp, wp, upsample, shape = _dims(x, conv_weight, h_weight, v_weight, mode)
    needs = tuple(bool(b) for b in needs)
    assert len(needs) == 10, "needs: one flag per input (x and the nine parameters)"
    assert tuple(grad.shape) == shape, f"grad shape {tuple(grad.shape)} != output shape {shape}"
    assert all(t.dim() == 1 and t.shape[0] == c for t in params[1::3] + params[2::3]), "folded vectors of [C]"
    inputs = (x,) + params
    if not any(needs):
        return (None,) * 10
    if n == 0:
        return tuple(torch.zeros_like(t) if nd else None for t, nd in zip(inputs, needs))

    is_fp64 = x.dtype == torch.float64
    acc_dtype = torch.float64 if is_fp64 else torch.float32
    need_x, need_w3 = needs[0], needs[1]
    cfg = _backward_plan(n, cin, c, h, w, need_x or need_w3, need_w3, 8 if is_fp64 else 4, x.device)
    grid = cfg["grid"]
    gx = _out_like(x, x.shape) if need_x else x  # x stands in for an unused pointer; never written then
    part = torch.empty(grid, cfg["part_len"], dtype=acc_dtype, device=x.device)
    pix = cfg["halo_h"] * cfg["halo_w"]
    scratch = torch.empty(grid * (3 * cfg["block_c"] + cfg["cpad"]) * pix, dtype=acc_dtype, device=x.device)
    # the kernel indexes the folded vectors without strides
    s3, b3, s4, b4, s5, b5 = (t.contiguous() for t in (conv_scale, conv_bias, h_scale, h_bias, v_scale, v_bias))
    _dfc_backward_kernel[(grid,)](
        x, conv_weight, s3, b3, h_weight, s4, b4, v_weight, s5, b5, grad, gx, part, scratch,
        cin, c, h, w, hp, wp,
        *x.stride(), *grad.stride(), *gx.stride(),
        *_param_args(conv_weight, h_weight, v_weight, h, w, hp, wp),
        cfg["tiles_h"], cfg["tiles_w"], cfg["cblocks"], cfg["total"], cfg["part_len"],
        HALO_H=cfg["halo_h"], HALO_W=cfg["halo_w"], MARGIN_H=cfg["margin_h"], MARGIN_W=cfg["margin_w"],
        TILE_H=cfg["tile_h"], TILE_W=cfg["tile_w"], BLOCK_C=cfg["block_c"], BLOCK_K=cfg["block_k"],
        CPAD=cfg["cpad"], UPSAMPLE=upsample, IS_FP64=is_fp64, DOT_PRECISION=_dot_precision(x),
        INDEX64=bool(cfg["index64"]) or _needs_index64(x, grad, gx, conv_weight),
        NEED_X=need_x, NEED_W3=need_w3, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    total = part.sum(0) if grid > 1 else part[0]
    dtypes = {t.dtype for t, nd in zip(params, needs[1:]) if nd}
    if len(dtypes) == 1 and acc_dtype not in dtypes:
        total = total.to(dtypes.pop())  # one cast for all parameter grads (fp16 / bf16 parameters)
    pos = [0]

    def take(length, shape):
        pos[0] += length
        return total[pos[0] - length:pos[0]].view(shape)

    # Views of one buffer in the partial-row layout, then one multi-tensor copy into separate tensors (the
    # registered op's outputs may not alias each other or sit at an offset into a shared buffer).
    gs3, gb3, gs4, gb4, gs5, gb5 = (take(c, (c,)) for _ in range(6))
    gh, gv = take(5 * c, (c, 5)), take(5 * c, (c, 5))
    gw3 = take(c * cin, (c, cin)) if need_w3 else None
    raw = (gw3, gs3, gb3, gh, gs4, gb4, gv, gs5, gb5)
    out = [gx if need_x else None] + [None] * 9
    same = [i for i, (t, g, nd) in enumerate(zip(params, raw, needs[1:])) if nd and g.dtype == t.dtype]
    if same:
        fresh = torch._foreach_mul([raw[i].view(params[i].shape) for i in same], 1.0)
        for i, g in zip(same, fresh):
            out[1 + i] = g
    for i, (t, g, nd) in enumerate(zip(params, raw, needs[1:])):
        if nd and i not in same:
            out[1 + i] = g.view(t.shape).to(t.dtype)  # mixed parameter dtypes: one cast each
    return tuple(out)
