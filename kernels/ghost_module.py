"""Ghost module forward as one Triton launch: 1x1 conv + BN + act, depthwise conv + BN + act, concat, channel cut
and the optional upsampled DFC gate, read from and written to NCHW, channels_last or any strided layout; each BN
folded per channel from its live tensors inside the launch (kernels/batch_norm.py). Also its training-mode BN
statistics variant and the fused backward (folded BN vectors)."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from .batch_norm import NO_BN, _fold_bn, bn_launch_args

# The activations these kernels implement: ghostfast.reference.ACTIVATIONS, each passed to the kernels as its index
# there (ghostfast.reference.ACT_CODES); a bool is relu (True) or none (False).
ACTIVATIONS = ("none", "relu", "relu6", "hardswish", "silu")


def _act_code(act) -> int:
    """The kernels' ACT constexpr of `act`: an ACTIVATIONS name, or a bool (True: relu, False: none)."""
    if isinstance(act, bool):
        return ACTIVATIONS.index("relu" if act else "none")
    if act not in ACTIVATIONS:
        raise ValueError(f"the Triton Ghost module kernels implement the activations {ACTIVATIONS}, got {act!r}")
    return ACTIVATIONS.index(act)


@triton.jit
def _div(a, b):
    """a / b correctly rounded, as eager's: Triton's fp32 divide is not on the GPU (fp64's is)."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _act(z, ACT: tl.constexpr):
    """The activation ACT (its ACTIVATIONS index) of the pre-activation z, as eager PyTorch computes it; where(), not
    maximum() / minimum(): NaN passes through as in F.relu, F.relu6 and F.hardswish."""
    if ACT == 1:  # relu
        z = tl.where(z < 0, 0.0, z)
    elif ACT == 2:  # relu6 = hardtanh(z, 0, 6)
        z = tl.where(z < 0, 0.0, tl.where(z > 6.0, 6.0, z))
    elif ACT == 3:  # hardswish: z * clamp(z + 3, 0, 6) / 6
        t = z + 3.0
        t = tl.where(t < 0, 0.0, tl.where(t > 6.0, 6.0, t))
        z = _div(z * t, 6.0)
    elif ACT == 4:  # silu = z * sigmoid(z), written z / (1 + exp(-z)) as torch's kernels do
        z = _div(z, 1.0 + tl.exp(-z))
    return z


@triton.jit
def _act_grad(z, g, ACT: tl.constexpr):
    """The gradient reaching the pre-activation z of ACT given the upstream g, as torch's own backward kernels
    (threshold_backward, hardtanh_backward, hardswish_backward, silu_backward) compute it."""
    if ACT == 1:  # 0 at and below 0, g at NaN (threshold_backward)
        g = tl.where(z <= 0, 0.0, g)
    elif ACT == 2:  # 0 at and past both breakpoints (g at NaN)
        g = tl.where((z <= 0) | (z >= 6.0), 0.0, g)
    elif ACT == 3:  # 0 up to -3, g * (z / 3 + 1/2) below 3, g from 3 (and at NaN): torch >= 2.7's breakpoints
        g = tl.where(z <= -3.0, 0.0, tl.where(z < 3.0, g * (_div(z, 3.0) + 0.5), g))
    elif ACT == 4:  # g * s * (1 + z * (1 - s)), s = sigmoid(z) = 1 / (1 + exp(-z))
        s = _div(tl.full(z.shape, 1.0, z.dtype), 1.0 + tl.exp(-z))
        g = g * s * (1.0 + z * (1.0 - s))
    return g


@triton.jit
def _axis_source(dst, out_size, in_size, scale32, BILINEAR: tl.constexpr, IS_FP64: tl.constexpr):
    """Source indices and weight of the second one along one axis, as F.interpolate computes them."""
    d = tl.maximum(dst, 0)  # halo lanes may sit at -R; they are never stored, keep their indices in range
    if BILINEAR:
        # align_corners=False: src = max((dst + 0.5) * in/out - 0.5, 0), in the op's accumulate type
        if IS_FP64:
            # tl.cast, not .to(): on a GPU an int argument equal to 1 arrives as a Python int (specialised)
            scale = tl.cast(in_size, tl.float64) / tl.cast(out_size, tl.float64)
            src = (d.to(tl.float64) + 0.5) * scale - 0.5
        else:
            src = (d.to(tl.float32) + 0.5) * scale32 - 0.5
        src = tl.maximum(src, 0.0)
        i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0, so truncation is floor
        i1 = tl.minimum(i0 + 1, in_size - 1)
        lam = src - i0.to(src.dtype)
    else:
        # nearest: floor(dst * (float)(in/out)) with the scale rounded to fp32 on the host, as PyTorch does;
        # the exact integer paths mirror its CPU kernel (the float path gives the same there anyway)
        gen = tl.minimum((d.to(tl.float32) * scale32).to(tl.int32), in_size - 1)
        i0 = tl.where(out_size == in_size, d, tl.where(out_size == 2 * in_size, d // 2, gen))
        i1 = i0
        lam = tl.zeros(dst.shape, dtype=tl.float32)
    return i0, i1, lam


@triton.jit
def _gate_at(gate_ptr, g_off_c, o00, o01, o10, o11, lh, lw, mask, BILINEAR: tl.constexpr, ACC: tl.constexpr):
    """Upsampled gate for a [P, BLOCK_C] block: g_off_c is the [BLOCK_C] channel offset, oXY the [P] pixel ones."""
    g00 = tl.load(gate_ptr + (o00[:, None] + g_off_c[None, :]), mask=mask, other=0.0).to(ACC)
    if BILINEAR:
        g01 = tl.load(gate_ptr + (o01[:, None] + g_off_c[None, :]), mask=mask, other=0.0).to(ACC)
        g10 = tl.load(gate_ptr + (o10[:, None] + g_off_c[None, :]), mask=mask, other=0.0).to(ACC)
        g11 = tl.load(gate_ptr + (o11[:, None] + g_off_c[None, :]), mask=mask, other=0.0).to(ACC)
        lh2 = lh.to(ACC)[:, None]
        lw2 = lw.to(ACC)[:, None]
        top = (1.0 - lw2) * g00 + lw2 * g01
        bot = (1.0 - lw2) * g10 + lw2 * g11
        return (1.0 - lh2) * top + lh2 * bot
    else:
        return g00


@triton.jit
def _primary_conv(x_pix, in_img, w1_ptr, c64, c_ok, C_in, sxc, sw1o, sw1k, P: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_K: tl.constexpr, INPUT_PRECISION: tl.constexpr, ACC: tl.constexpr):
    """W1 @ x (before BN1) on a [P] pixel tile: the forward and the backward's recompute must agree."""
    kr = tl.arange(0, BLOCK_K)
    acc = tl.zeros([P, BLOCK_C], dtype=ACC)
    for k0 in range(0, C_in, BLOCK_K):
        k = k0 + kr
        k_ok = k < C_in
        k64 = k.to(tl.int64)
        xt = tl.load(x_pix[:, None] + k64[None, :] * sxc, mask=in_img[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w1_ptr + c64[None, :] * sw1o + k64[:, None] * sw1k, mask=k_ok[:, None] & c_ok[None, :],
                     other=0.0)
        acc = tl.dot(xt, wt, acc, input_precision=INPUT_PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _depthwise(scr, scr_off, w2_ptr, o2_64, m2c, sw2o, sw2h, sw2w, lanes, DW: tl.constexpr, HALO_W: tl.constexpr,
               P: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """One cheap output channel per x1 channel: the DW x DW depthwise of the x1 tile parked at `scr`, exact on
    `lanes` (those at least R from the tile edge)."""
    R: tl.constexpr = DW // 2
    acc = tl.zeros([P, BLOCK_C], dtype=ACC)
    # a rolled tap loop: unrolled, the compiler hoists all DW*DW window loads at once and spills
    for t in range(DW * DW):
        dy = t // DW
        dx = t % DW
        wv = tl.load(w2_ptr + o2_64 * sw2o + dy * sw2h + dx * sw2w, mask=m2c, other=0.0).to(ACC)
        shift = ((dy - R) * HALO_W + (dx - R)) * BLOCK_C
        v = tl.load(scr + (scr_off + shift), mask=lanes[:, None], other=0.0)
        acc += v * wv[None, :]
    return acc


@triton.jit
def _corner_offsets(h0, h1, w0, w1, sh, sw):
    """int64 offsets of the four gate pixels a full-res pixel reads (nearest: h0 == h1, w0 == w1)."""
    h0s = h0.to(tl.int64) * sh
    h1s = h1.to(tl.int64) * sh
    w0s = w0.to(tl.int64) * sw
    w1s = w1.to(tl.int64) * sw
    return h0s + w0s, h0s + w1s, h1s + w0s, h1s + w1s


@triton.jit
def _tile_stats(psum_ptr, pm2_ptr, tile, n_stat, ch64, ch_ok, z, pix):
    """Per-tile BatchNorm partials of the [P, BLOCK_C] block z over the pixels `pix`: the sum and the sum of squares
    about the tile's own mean (merged across tiles with Chan's formula on the host: no cancellation when the mean is
    large against the spread). One tile (row `tile`) and channel is written by exactly one program: no atomics."""
    acc_t = z.dtype
    cnt = tl.sum(pix.to(acc_t), axis=0)
    zm = tl.where(pix[:, None], z, 0.0)
    total = tl.sum(zm, axis=0)
    mu = total / cnt
    d = tl.where(pix[:, None], z - mu[None, :], 0.0)
    off = tile.to(tl.int64) * n_stat + ch64
    tl.store(psum_ptr + off, total, mask=ch_ok)
    tl.store(pm2_ptr + off, tl.sum(d * d, axis=0), mask=ch_ok)


@triton.jit
def _ghost_module_fwd_kernel(
    x_ptr,  # [N, C_in, H, W], strides sxn, sxc, sxh, sxw
    w1_ptr,  # [init, C_in] primary 1x1 weight, strides sw1o, sw1k
    bn1_weight, bn1_bias, bn1_mean, bn1_var,  # [init] BN1's live vectors, contiguous, any float dtype (x if absent)
    bn1_eps: tl.float64,  # BN1's eps (fp64: rounded to ACC in the fold)
    w2_ptr,  # [init*(ratio-1), DW, DW] depthwise weight, strides sw2o, sw2h, sw2w
    bn2_weight, bn2_bias, bn2_mean, bn2_var,  # [init*(ratio-1)] BN2's live vectors, as BN1's
    bn2_eps: tl.float64,  # BN2's eps
    gate_ptr,  # [N, out_channels, Hg, Wg] low-res gate, strides sgn, sgc, sgh, sgw (x when HAS_GATE is False)
    out_ptr,  # [N, out_channels, H, W], strides son, soc, soh, sow (x when STATS)
    scratch_ptr,  # [num_programs, HALO_H*HALO_W, BLOCK_C] x1 halo tiles in ACC, one slot per program
    psum_ptr, pm2_ptr,  # STATS: [N*tiles_h*tiles_w, n_stat] ACC per-tile sums and centred sums of squares
    C_in, H, W,  # scalars: input channels and image size
    init, ratio_m1, out_channels,  # scalars: x1 channels, cheap outputs per x1 channel, kept channels
    Hg, Wg,  # scalars: gate size
    gscale_h, gscale_w,  # fp32 scalars: Hg/H and Wg/W rounded to fp32 (nearest index math, fp32 bilinear)
    sxn, sxc, sxh, sxw,  # x strides
    sw1o, sw1k,  # primary weight strides
    sw2o, sw2h, sw2w,  # depthwise weight strides
    sgn, sgc, sgh, sgw,  # gate strides
    son, soc, soh, sow,  # out strides
    tiles_h, tiles_w, n_cblocks, total_items,  # scalars: work decomposition
    HALO_H: tl.constexpr, HALO_W: tl.constexpr,  # halo tile, powers of two; output tile is HALO - 2R per side
    DW: tl.constexpr,  # depthwise kernel size (odd)
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,  # x1 channels per item, C_in chunk of the dot
    ACT: tl.constexpr, HAS_GATE: tl.constexpr, GATE_BILINEAR: tl.constexpr,  # activation code, epilogue flags
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 only)
    ACC: tl.constexpr, IS_FP64: tl.constexpr,  # accumulate dtype (fp32, or fp64 for fp64 inputs)
    BN1_HAS_W: tl.constexpr, BN1_HAS_B: tl.constexpr, BN1_HAS_M: tl.constexpr, BN1_HAS_V: tl.constexpr,
    BN2_HAS_W: tl.constexpr, BN2_HAS_B: tl.constexpr, BN2_HAS_M: tl.constexpr, BN2_HAS_V: tl.constexpr,
    STATS: tl.constexpr,  # 0: the forward; 1 / 2: per-tile BN statistics of z1 / z2 instead of any output
):
    R: tl.constexpr = DW // 2
    P: tl.constexpr = HALO_H * HALO_W
    TILE_H: tl.constexpr = HALO_H - 2 * R
    TILE_W: tl.constexpr = HALO_W - 2 * R

    pid = tl.program_id(0)
    nprog = tl.num_programs(0)

    p = tl.arange(0, P)
    ph = p // HALO_W
    pw = p % HALO_W
    interior = (ph >= R) & (ph < HALO_H - R) & (pw >= R) & (pw < HALO_W - R)
    cr = tl.arange(0, BLOCK_C)
    n_x1_out = tl.minimum(init, out_channels)
    # one scratch slot per program, reused by every item it runs: the buffer does not grow with the grid
    scr_base = scratch_ptr + pid.to(tl.int64) * (P * BLOCK_C)
    scr_off = p[:, None] * BLOCK_C + cr[None, :]  # int32 offsets, not a [P, BLOCK_C] tile of 64-bit pointers

    for item in range(pid, total_items, nprog):
        # channel block innermost: consecutive items (on neighbouring programs) share x's tile in L2
        cb = item % n_cblocks
        rest = item // n_cblocks
        tw = rest % tiles_w
        rest = rest // tiles_w
        th = rest % tiles_h
        n = (rest // tiles_h).to(tl.int64)

        h = th * TILE_H - R + ph
        w = tw * TILE_W - R + pw
        in_img = (h >= 0) & (h < H) & (w >= 0) & (w < W)
        store_pix = interior & in_img
        h64 = h.to(tl.int64)
        w64 = w.to(tl.int64)

        c = cb * BLOCK_C + cr
        c_ok = c < init
        c64 = c.to(tl.int64)

        # ---- x1 = act(BN1(W1 @ x)) on the halo tile ----
        x_pix = x_ptr + n * sxn + h64 * sxh + w64 * sxw
        acc = _primary_conv(x_pix, in_img, w1_ptr, c64, c_ok, C_in, sxc, sw1o, sw1k, P, BLOCK_C, BLOCK_K,
                            INPUT_PRECISION, ACC)
        if STATS == 1:
            # training-mode BN1 statistics of z1 = W1 @ x over this tile's own pixels; nothing else to do
            _tile_stats(psum_ptr, pm2_ptr, item // n_cblocks, init, c64, c_ok, acc, store_pix)
        else:
            s1, b1 = _fold_bn(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, c64, c_ok,
                              BN1_HAS_W, BN1_HAS_B, BN1_HAS_M, BN1_HAS_V, ACC)
            x1 = acc * s1[None, :] + b1[None, :]
            x1 = _act(x1, ACT)
            # the depthwise zero-pads the biased, activated x1: lanes outside the image read as 0
            x1 = tl.where(in_img[:, None], x1, 0.0)

            if HAS_GATE:
                gh0, gh1, lh = _axis_source(h, H, Hg, gscale_h, GATE_BILINEAR, IS_FP64)
                gw0, gw1, lw = _axis_source(w, W, Wg, gscale_w, GATE_BILINEAR, IS_FP64)
                g_n = gate_ptr + n * sgn
                o00, o01, o10, o11 = _corner_offsets(gh0, gh1, gw0, gw1, sgh, sgw)

            out_pix = out_ptr + n * son + h64 * soh + w64 * sow
            m1 = store_pix[:, None] & (c < n_x1_out)[None, :]
            if STATS == 0:
                y1 = x1
                if HAS_GATE:
                    y1 = y1 * _gate_at(g_n, c64 * sgc, o00, o01, o10, o11, lh, lw, m1, GATE_BILINEAR, ACC)
                tl.store(out_pix[:, None] + c64[None, :] * soc, y1.to(out_ptr.dtype.element_ty), mask=m1)

            # ---- x2 = act(BN2(depthwise(x1))), ratio-1 outputs per x1 channel, only where they survive the cut ----
            if init + cb * BLOCK_C * ratio_m1 < out_channels:
                if DW > 1:
                    # registers cannot be shifted: park the halo tile in this program's scratch slot and read the
                    # shifted windows back (it stays in L1/L2)
                    tl.store(scr_base + scr_off, x1)
                    tl.debug_barrier()
                for j in range(0, ratio_m1):
                    o2 = c * ratio_m1 + j
                    o2_64 = o2.to(tl.int64)
                    m2c = c_ok & (init + o2 < out_channels)
                    if DW > 1:
                        acc2 = _depthwise(scr_base, scr_off, w2_ptr, o2_64, m2c, sw2o, sw2h, sw2w, interior, DW, HALO_W,
                                          P, BLOCK_C, ACC)
                    else:
                        wv = tl.load(w2_ptr + o2_64 * sw2o, mask=m2c, other=0.0).to(ACC)
                        acc2 = x1 * wv[None, :]
                    if STATS == 2:
                        # training-mode BN2 statistics of z2 = depthwise(x1), every cheap channel
                        _tile_stats(psum_ptr, pm2_ptr, item // n_cblocks, init * ratio_m1, o2_64, m2c, acc2, store_pix)
                    else:
                        s2, b2 = _fold_bn(bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps, o2_64, m2c,
                                          BN2_HAS_W, BN2_HAS_B, BN2_HAS_M, BN2_HAS_V, ACC)
                        y2 = acc2 * s2[None, :] + b2[None, :]
                        y2 = _act(y2, ACT)
                        m2 = store_pix[:, None] & m2c[None, :]
                        oc = (init + o2).to(tl.int64)
                        if HAS_GATE:
                            y2 = y2 * _gate_at(g_n, oc * sgc, o00, o01, o10, o11, lh, lw, m2, GATE_BILINEAR, ACC)
                        tl.store(out_pix[:, None] + oc[None, :] * soc, y2.to(out_ptr.dtype.element_ty), mask=m2)
                if DW > 1:
                    # the next item rewrites the slot: every thread must be done reading this one
                    tl.debug_barrier()


def _next_pow2(v: int) -> int:
    return 1 << max(0, int(v) - 1).bit_length()


_SM_COUNT = {}


def _max_programs(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter runs programs one by one; a few exercise the persistent loop
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx] * 4


def _halo_side(size: int, r: int) -> int:
    # 16 = 14 + 2: GhostNet's 112/56/28/14 tile exactly with a 3x3 depthwise; at least 2R+2 for a useful tile
    return max(min(_next_pow2(size + 2 * r), 16), _next_pow2(2 * r + 2))


def _pick_config(H: int, W: int, dw: int, n_x1: int, dtype: torch.dtype):
    """The forward's launch config for an H x W image, a dw x dw depthwise (1 for the z1 statistics, which need no
    halo), n_x1 x1 channels that reach the output, and x's dtype: (halo_h, halo_w, block_c, block_k, num_warps).
    The launch looks it up at call time, so a test may monkeypatch it (small tiles on small images, to run the
    multi-tile paths) with any such tuple where halo_h and halo_w are powers of two of at least dw (each tile
    owns halo - 2 * (dw // 2) >= 1 rows / columns), halo_h * halo_w >= 16 (tl.dot's M), block_c and block_k are
    powers of two >= 16, and num_warps a power of two."""
    r = dw // 2
    halo_h = _halo_side(H, r)
    halo_w = _halo_side(W, r)
    if dw >= 5 and W + 2 * r > 16:
        halo_w = 32  # a 16-wide halo would leave only 8-10 useful columns out of 16
    while halo_h * halo_w < 16:  # tl.dot needs M >= 16
        if halo_w <= halo_h:
            halo_w *= 2
        else:
            halo_h *= 2
    p = halo_h * halo_w
    # about 16-32 accumulator elements per thread: larger blocks made ptxas spill (checked offline for sm_90)
    block_c = 16 if p >= 256 else min(64, max(16, _next_pow2(n_x1)), 4096 // p)
    block_k = 32 if dtype in (torch.float16, torch.bfloat16) else 16
    num_warps = max(4, min(8, p * block_c // 1024))
    return halo_h, halo_w, block_c, block_k, num_warps


def _dims(x: Tensor, primary_weight: Tensor, cheap_weight: Tensor, out_channels: int, gate_mode: str):
    """(N, C_in, H, W, init, dw, ratio - 1), checked as both directions require."""
    N, C_in, H, W = x.shape
    init = primary_weight.shape[0]
    dw = cheap_weight.shape[-1]
    ratio_m1 = cheap_weight.shape[0] // init
    assert cheap_weight.shape[0] == init * ratio_m1 and ratio_m1 >= 1 and dw % 2 == 1
    assert 0 < out_channels <= init * (ratio_m1 + 1)
    assert gate_mode in ("nearest", "bilinear")
    return N, C_in, H, W, init, dw, ratio_m1


def _empty_like_x(x: Tensor, shape) -> Tensor:
    """An uninitialised tensor of x's dtype and memory format (channels_last stays channels_last)."""
    cl = (not x.is_contiguous()) and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if cl else torch.contiguous_format
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)


def _folded_vectors(*vectors: Tensor):
    # the backward kernels index the folded BN vectors without strides
    assert all(t.dim() == 1 for t in vectors)
    return tuple(t.contiguous() for t in vectors)


def _gate_args(gate: Optional[Tensor], x: Tensor):
    """(gate pointer, Hg, Wg, gate strides, fp32 scale Hg / H, fp32 scale Wg / W). Without a gate, x stands in
    for the pointer (never read) with zero strides. The scales are computed here in float32 as F.interpolate does:
    Triton's fp32 divide is not correctly rounded on the GPU."""
    H, W = x.shape[-2:]
    if gate is not None:
        Hg, Wg = gate.shape[-2:]
        sg = gate.stride()
        g = gate
    else:
        Hg, Wg = H, W
        sg = (0, 0, 0, 0)
        g = x
    return g, Hg, Wg, sg, float(np.float32(Hg) / np.float32(H)), float(np.float32(Wg) / np.float32(W))


def _input_precision(dtype: torch.dtype) -> str:
    # torch's own TF32 switch decides, as it does for eager conv
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def ghost_module_forward(x: Tensor, primary_weight: Tensor, bn1, cheap_weight: Tensor, bn2, out_channels: int,
                         act, gate: Optional[Tensor] = None, gate_mode: str = "nearest",
                         out: Optional[Tensor] = None) -> Tensor:
    """Fused Ghost module forward (eval-mode BatchNorm, or any BatchNorm given as its live tensors): the math of
    `ghostfast.reference.ghost_module_forward` with bn1 and bn2 folded per channel inside the launch.

    bn1, bn2: `(weight, bias, mean, var, eps)`, each tensor an optional 1-D per-channel vector of any float dtype
    (None: the identity). Writes `out` (x's dtype and shape [N, out_channels, H, W], any strides) when given."""
    N, C_in, H, W, init, dw, ratio_m1 = _dims(x, primary_weight, cheap_weight, out_channels, gate_mode)
    if out is None:
        out = _empty_like_x(x, (N, out_channels, H, W))
    else:
        assert out.shape == (N, out_channels, H, W) and out.dtype == x.dtype
    if N == 0 or H * W == 0:
        return out
    _forward_launch(x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode, out)
    return out


def _forward_launch(x, primary_weight, bn1, cheap_weight, bn2, out_channels, act, gate, gate_mode, out, stats=0):
    """One launch of the forward kernel; with `stats` 1 or 2, of its statistics variant: returns the per-tile
    partials (sums, centred sums of squares, pixel counts) of z1 or z2 instead of writing `out`."""
    N, C_in, H, W, init, dw, ratio_m1 = _dims(x, primary_weight, cheap_weight, out_channels, gate_mode)
    dtype = x.dtype
    w1 = primary_weight if primary_weight.dtype == dtype else primary_weight.to(dtype)
    w2 = cheap_weight
    g, Hg, Wg, sg, gscale_h, gscale_w = _gate_args(gate, x)
    bn1_ptrs, bn1_eps, bn1_flags = bn_launch_args(bn1, init, x, "BN1")
    bn2_ptrs, bn2_eps, bn2_flags = bn_launch_args(bn2, init * ratio_m1, x, "BN2")

    is_fp64 = dtype == torch.float64
    acc_t = torch.float64 if is_fp64 else torch.float32
    precision = _input_precision(dtype)

    n_x1 = min(init, out_channels)  # cheap outputs that survive only exist for x1 channels below this
    k = 1 if stats == 1 else dw  # z1 needs no halo
    halo_h, halo_w, block_c, block_k, num_warps = _pick_config(H, W, k, n_x1, dtype)
    r = k // 2
    tile_h, tile_w = halo_h - 2 * r, halo_w - 2 * r
    assert tile_h >= 1 and tile_w >= 1 and halo_h * halo_w >= 16, (halo_h, halo_w, k)
    tiles_h = triton.cdiv(H, tile_h)
    tiles_w = triton.cdiv(W, tile_w)
    n_cblocks = triton.cdiv(n_x1, block_c)
    total = N * tiles_h * tiles_w * n_cblocks
    grid = min(total, _max_programs(x.device))
    scratch = torch.empty((grid if k > 1 and stats != 1 else 1, halo_h * halo_w, block_c), dtype=acc_t,
                          device=x.device)
    psum = pm2 = scratch
    if stats:
        n_stat = init if stats == 1 else cheap_weight.shape[0]
        psum = torch.empty((N * tiles_h * tiles_w, n_stat), dtype=acc_t, device=x.device)
        pm2 = torch.empty_like(psum)
        out = x  # never written

    _ghost_module_fwd_kernel[(grid,)](
        x, w1, *bn1_ptrs, bn1_eps, w2, *bn2_ptrs, bn2_eps, g, out, scratch, psum, pm2,
        C_in, H, W, init, ratio_m1, out_channels, Hg, Wg, gscale_h, gscale_w,
        *x.stride(), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(2), w2.stride(3),
        *sg, *out.stride(),
        tiles_h, tiles_w, n_cblocks, total,
        HALO_H=halo_h, HALO_W=halo_w, DW=k, BLOCK_C=block_c, BLOCK_K=block_k,
        ACT=_act_code(act), HAS_GATE=gate is not None, GATE_BILINEAR=gate_mode == "bilinear",
        INPUT_PRECISION=precision, ACC=tl.float64 if is_fp64 else tl.float32, IS_FP64=is_fp64,
        **bn1_flags, **bn2_flags, STATS=stats, num_warps=num_warps,
    )
    if not stats:
        return None
    rows = (H - torch.arange(tiles_h, device=x.device) * tile_h).clamp(max=tile_h)
    cols = (W - torch.arange(tiles_w, device=x.device) * tile_w).clamp(max=tile_w)
    counts = (rows[:, None] * cols[None, :]).reshape(1, -1).expand(N, -1).reshape(-1, 1)
    return psum, pm2, counts


def merge_tile_stats(psum: Tensor, pm2: Tensor, counts: Tensor, dtype: torch.dtype):
    """Chan's parallel merge of per-tile (sum, centred sum of squares, count) into the per-channel mean and biased
    variance, in float64 (a few kilobytes), returned in `dtype`."""
    psum, pm2, counts = psum.double(), pm2.double(), counts.double()
    total = counts.sum()
    mean = psum.sum(0) / total
    m2 = pm2.sum(0) + (counts * (psum / counts - mean) ** 2).sum(0)
    return mean.to(dtype), (m2 / total).to(dtype)


def ghost_module_stats(x: Tensor, primary_weight: Tensor, bn1, cheap_weight: Tensor, act, stage: int):
    """Training-mode BatchNorm statistics (mean, biased variance) of z1 (stage 1) or of every channel of z2
    (stage 2), as `ghostfast.reference.ghost_module_stats`; stage 1 ignores bn1, stage 2 applies it (live tensors,
    folded inside the launch, as the forward) to z1 before the activation and the depthwise. One launch of the
    forward kernel's statistics variant (per-tile partials, no atomics) and a float64 merge of the partials.
    Returned in the accumulation dtype."""
    assert stage in (1, 2)
    init = primary_weight.shape[0]
    cheap = cheap_weight.shape[0]
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    full = init + cheap
    if x.numel() == 0:  # no values: NaN statistics, as torch.var_mean of an empty tensor
        n = init if stage == 1 else cheap
        return (torch.full((n,), float("nan"), dtype=acc_t, device=x.device),) * 2
    # BN2 follows z2, which is what the statistics are of: it is never applied here
    psum, pm2, counts = _forward_launch(x, primary_weight, bn1 if stage == 2 else NO_BN, cheap_weight, NO_BN, full,
                                        act, None, "nearest", None, stats=stage)
    return merge_tile_stats(psum, pm2, counts, acc_t)


# ---------------------------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _gate_scatter(gg_ptr, gg_off_c, o00, o01, o10, o11, lh, lw, val, mask, BILINEAR: tl.constexpr,
                  ACC: tl.constexpr):
    """Adjoint of `_gate_at`: add a [P, BLOCK_C] block of full-res values into the low-res gate gradient."""
    if BILINEAR:
        lh2 = lh.to(ACC)[:, None]
        lw2 = lw.to(ACC)[:, None]
        # neighbouring tiles (and border lanes, where i0 == i1) hit the same gate pixel: atomics, not stores
        tl.atomic_add(gg_ptr + (o00[:, None] + gg_off_c[None, :]), val * ((1.0 - lh2) * (1.0 - lw2)), mask=mask)
        tl.atomic_add(gg_ptr + (o01[:, None] + gg_off_c[None, :]), val * ((1.0 - lh2) * lw2), mask=mask)
        tl.atomic_add(gg_ptr + (o10[:, None] + gg_off_c[None, :]), val * (lh2 * (1.0 - lw2)), mask=mask)
        tl.atomic_add(gg_ptr + (o11[:, None] + gg_off_c[None, :]), val * (lh2 * lw2), mask=mask)
    else:
        tl.atomic_add(gg_ptr + (o00[:, None] + gg_off_c[None, :]), val, mask=mask)


@triton.jit
def _stats_grad(ca_ptr, cc_ptr, cm_ptr, ch64, ch_ok, z):
    """The BatchNorm statistics' gradient reaching z ([P, BLOCK_C]): a + c * (z - mean), per channel."""
    ca = tl.load(ca_ptr + ch64, mask=ch_ok, other=0.0)
    cc = tl.load(cc_ptr + ch64, mask=ch_ok, other=0.0)
    cm = tl.load(cm_ptr + ch64, mask=ch_ok, other=0.0)
    return ca[None, :] + cc[None, :] * (z - cm[None, :])


@triton.jit
def _ghost_module_bwd_kernel(
    go_ptr,  # [N, out_channels, H, W] grad_out, strides sgon, sgoc, sgoh, sgow
    x_ptr,  # [N, C_in, H, W], strides sxn, sxc, sxh, sxw
    w1_ptr,  # [init, C_in] primary 1x1 weight (x's dtype), strides sw1o, sw1k
    s1_ptr, b1_ptr,  # [init] primary BN scale / bias (contiguous)
    w2_ptr,  # [init*(ratio-1), DW, DW] depthwise weight, strides sw2o, sw2h, sw2w
    s2_ptr, b2_ptr,  # [init*(ratio-1)] cheap BN scale / bias (contiguous)
    gate_ptr,  # [N, out_channels, Hg, Wg] low-res gate, strides sgn, sgc, sgh, sgw (x when HAS_GATE is False)
    gx_ptr,  # [N, C_in, H, W] grad_x (x's dtype), strides sdxn, sdxc, sdxh, sdxw (x when NEED_GX is False)
    gw1_ptr,  # [init, C_in] ACC, zeroed, contiguous: atomics
    gs1_ptr, gb1_ptr,  # [init] ACC, zeroed: atomics
    gw2_ptr,  # [init*(ratio-1), DW*DW] ACC, zeroed, contiguous: atomics
    gs2_ptr, gb2_ptr,  # [init*(ratio-1)] ACC, zeroed: atomics
    gg_ptr,  # [N, Cg, Hg, Wg] ACC, zeroed, contiguous grad of the gate: atomics (x when NEED_GATE is False)
    scratch_ptr,  # [num_programs, slot] ACC: x1 halo tile, g2*s2 halo tile, g1*s1 for every x1 channel block
    ca_ptr, cc_ptr, cm_ptr,  # CORR: per channel a, c, mean of the BN statistics' gradient dz += a + c * (z - mean)
    C_in, H, W,  # scalars: input channels and image size
    init, ratio_m1, out_channels,  # scalars: x1 channels, cheap outputs per x1 channel, kept channels
    Hg, Wg,  # scalars: gate size
    gscale_h, gscale_w,  # fp32 scalars: Hg/H and Wg/W rounded to fp32
    sgon, sgoc, sgoh, sgow,  # grad_out strides
    sxn, sxc, sxh, sxw,  # x strides
    sw1o, sw1k,  # primary weight strides
    sw2o, sw2h, sw2w,  # depthwise weight strides
    sgn, sgc, sgh, sgw,  # gate strides
    sdxn, sdxc, sdxh, sdxw,  # grad_x strides
    ggn, ggc,  # grad-gate batch and channel strides (its rows are Wg long)
    tiles_h, tiles_w, n_cblocks, total_items, slot,  # scalars: work decomposition, scratch elements per program
    HALO_H: tl.constexpr, HALO_W: tl.constexpr,  # halo tile, powers of two; the owned tile is HALO - 4R per side
    DW: tl.constexpr,  # depthwise kernel size (odd)
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,  # x1 channels per block, C_in chunk of the dots
    ACT: tl.constexpr, HAS_GATE: tl.constexpr, GATE_BILINEAR: tl.constexpr,  # activation code, gate flags
    NEED_GX: tl.constexpr, NEED_W1: tl.constexpr, NEED_GATE: tl.constexpr,  # which gradients to produce
    INPUT_PRECISION: tl.constexpr,  # "ieee" or "tf32" (fp32 only)
    ACC: tl.constexpr, IS_FP64: tl.constexpr,  # accumulate dtype (fp32, or fp64 for fp64 inputs)
    HAS_GO: tl.constexpr = True,  # False: no grad_out (the backward of the BN statistics alone)
    CORR: tl.constexpr = 0,  # 1 / 2: add the statistics' gradient a + c * (z - mean) to the gradient of z1 / z2
):
    # Regions of the halo tile: all of it holds x1 (recomputed), the inner band B (tile + R) holds y2 and
    # g2*s2 (the transposed depthwise of a tile pixel reads them up to R away), the tile T (HALO - 4R) is owned:
    # only its pixels contribute to reductions and are written to grad_x.
    R: tl.constexpr = DW // 2
    R2: tl.constexpr = 2 * R
    P: tl.constexpr = HALO_H * HALO_W
    TILE_H: tl.constexpr = HALO_H - 2 * R2
    TILE_W: tl.constexpr = HALO_W - 2 * R2
    KK: tl.constexpr = DW * DW

    pid = tl.program_id(0)
    nprog = tl.num_programs(0)

    p = tl.arange(0, P)
    ph = p // HALO_W
    pw = p % HALO_W
    in_b = (ph >= R) & (ph < HALO_H - R) & (pw >= R) & (pw < HALO_W - R)
    in_t = (ph >= R2) & (ph < HALO_H - R2) & (pw >= R2) & (pw < HALO_W - R2)
    cr = tl.arange(0, BLOCK_C)
    kr = tl.arange(0, BLOCK_K)
    n_x1_out = tl.minimum(init, out_channels)  # x1 channels at or past this get no gradient at all
    c_pad = n_cblocks * BLOCK_C
    scr_x1 = scratch_ptr + pid.to(tl.int64) * slot
    scr_g = scr_x1 + P * BLOCK_C
    scr_gy1 = scr_g + P * BLOCK_C
    scr_off = p[:, None] * BLOCK_C + cr[None, :]

    for item in range(pid, total_items, nprog):
        tw = item % tiles_w
        rest = item // tiles_w
        th = rest % tiles_h
        n = (rest // tiles_h).to(tl.int64)

        h = th * TILE_H - R2 + ph
        w = tw * TILE_W - R2 + pw
        in_img = (h >= 0) & (h < H) & (w >= 0) & (w < W)
        t_pix = in_t & in_img
        b_pix = in_b & in_img
        h64 = h.to(tl.int64)
        w64 = w.to(tl.int64)
        x_pix = x_ptr + n * sxn + h64 * sxh + w64 * sxw
        go_pix = go_ptr + n * sgon + h64 * sgoh + w64 * sgow

        if HAS_GATE:
            gh0, gh1, lh = _axis_source(h, H, Hg, gscale_h, GATE_BILINEAR, IS_FP64)
            gw0, gw1, lw = _axis_source(w, W, Wg, gscale_w, GATE_BILINEAR, IS_FP64)
            g_n = gate_ptr + n * sgn
            o00, o01, o10, o11 = _corner_offsets(gh0, gh1, gw0, gw1, sgh, sgw)
            if NEED_GATE:
                gg_n = gg_ptr + n * ggn
                q00 = gh0.to(tl.int64) * Wg + gw0
                q01 = gh0.to(tl.int64) * Wg + gw1
                q10 = gh1.to(tl.int64) * Wg + gw0
                q11 = gh1.to(tl.int64) * Wg + gw1

        for cb in range(0, n_cblocks):
            c = cb * BLOCK_C + cr
            c_ok = c < n_x1_out
            c64 = c.to(tl.int64)

            # ---- recompute y1 = W1 @ x and x1 = act(BN1(y1)) on the whole halo tile ----
            y1 = _primary_conv(x_pix, in_img, w1_ptr, c64, c_ok, C_in, sxc, sw1o, sw1k, P, BLOCK_C, BLOCK_K,
                               INPUT_PRECISION, ACC)
            s1, b1 = _fold_bn(s1_ptr, b1_ptr, s1_ptr, s1_ptr, 0.0, c64, c_ok, True, True, False, False, ACC)
            pre1 = y1 * s1[None, :] + b1[None, :]
            x1 = _act(pre1, ACT)
            x1 = tl.where(in_img[:, None], x1, 0.0)  # the depthwise zero-pads the biased, activated x1

            # ---- gradient reaching x1 directly (its channels that survive the cut) ----
            m1 = t_pix[:, None] & c_ok[None, :]
            if HAS_GO:
                go1 = tl.load(go_pix[:, None] + c64[None, :] * sgoc, mask=m1, other=0.0).to(ACC)
            else:
                go1 = tl.zeros([P, BLOCK_C], dtype=ACC)
            if HAS_GATE:
                gx1 = go1 * _gate_at(g_n, c64 * sgc, o00, o01, o10, o11, lh, lw, m1, GATE_BILINEAR, ACC)
                if NEED_GATE:
                    _gate_scatter(gg_n, c64 * ggc, q00, q01, q10, q11, lh, lw, go1 * x1, m1, GATE_BILINEAR, ACC)
            else:
                gx1 = go1

            # ---- cheap outputs: g2 on the band, reductions on the tile, transposed depthwise into gx1 ----
            if init + cb * BLOCK_C * ratio_m1 < out_channels:
                if DW > 1:
                    tl.store(scr_x1 + scr_off, x1)
                    tl.debug_barrier()
                for j in range(0, ratio_m1):
                    o2 = c * ratio_m1 + j
                    o2_64 = o2.to(tl.int64)
                    m2c = c_ok & (init + o2 < out_channels)
                    if DW > 1:
                        y2 = _depthwise(scr_x1, scr_off, w2_ptr, o2_64, m2c, sw2o, sw2h, sw2w, in_b, DW, HALO_W, P,
                                        BLOCK_C, ACC)
                    else:
                        wv = tl.load(w2_ptr + o2_64 * sw2o, mask=m2c, other=0.0).to(ACC)
                        y2 = x1 * wv[None, :]
                    s2, b2 = _fold_bn(s2_ptr, b2_ptr, s2_ptr, s2_ptr, 0.0, o2_64, m2c, True, True, False, False,
                                      ACC)
                    pre2 = y2 * s2[None, :] + b2[None, :]
                    mb = b_pix[:, None] & m2c[None, :]
                    oc = (init + o2).to(tl.int64)
                    if HAS_GO:
                        go2 = tl.load(go_pix[:, None] + oc[None, :] * sgoc, mask=mb, other=0.0).to(ACC)
                    else:
                        go2 = tl.zeros([P, BLOCK_C], dtype=ACC)
                    if HAS_GATE:
                        g2 = go2 * _gate_at(g_n, oc * sgc, o00, o01, o10, o11, lh, lw, mb, GATE_BILINEAR, ACC)
                        if NEED_GATE:
                            x2 = _act(pre2, ACT)
                            mt = t_pix[:, None] & m2c[None, :]
                            _gate_scatter(gg_n, oc * ggc, q00, q01, q10, q11, lh, lw, tl.where(mt, go2 * x2, 0.0),
                                          mt, GATE_BILINEAR, ACC)
                    else:
                        g2 = go2
                    if HAS_GO:  # without grad_out g2 is 0 and no path runs through act2 (no NaN from it)
                        g2 = _act_grad(pre2, g2, ACT)
                    g2 = tl.where(mb, g2, 0.0)
                    g2t = tl.where(in_t[:, None], g2, 0.0)
                    if HAS_GO:
                        tl.atomic_add(gs2_ptr + o2_64, tl.sum(g2t * y2, axis=0), mask=m2c)
                        tl.atomic_add(gb2_ptr + o2_64, tl.sum(g2t, axis=0), mask=m2c)
                    gy2 = g2 * s2[None, :]
                    if CORR == 2:
                        gy2 = tl.where(mb, gy2 + _stats_grad(ca_ptr, cc_ptr, cm_ptr, o2_64, m2c, y2), 0.0)
                    gy2t = tl.where(in_t[:, None], gy2, 0.0)
                    if DW > 1:
                        tl.store(scr_g + scr_off, gy2)
                        tl.debug_barrier()
                        for t in range(KK):
                            dy = t // DW
                            dx = t % DW
                            wv = tl.load(w2_ptr + o2_64 * sw2o + dy * sw2h + dx * sw2w, mask=m2c, other=0.0).to(ACC)
                            shift = ((dy - R) * HALO_W + (dx - R)) * BLOCK_C
                            xs = tl.load(scr_x1 + (scr_off + shift), mask=in_t[:, None], other=0.0)
                            tl.atomic_add(gw2_ptr + o2_64 * KK + t, tl.sum(gy2t * xs, axis=0), mask=m2c)
                            gs = tl.load(scr_g + (scr_off - shift), mask=in_t[:, None], other=0.0)
                            gx1 += gs * wv[None, :]
                        # the next output (or channel block, or item) rewrites the slots
                        tl.debug_barrier()
                    else:
                        tl.atomic_add(gw2_ptr + o2_64, tl.sum(gy2t * x1, axis=0), mask=m2c)
                        gx1 += gy2 * wv[None, :]

            # ---- g1 = gx1 * act'(pre1) on the tile; BN1 and W1 reductions ----
            g1 = gx1
            if HAS_GO or CORR == 2:  # else gx1 is 0 and no path runs through act1
                # pre1 recomputed rather than kept live across the cheap-output loop (registers are the limit here)
                g1 = _act_grad(y1 * s1[None, :] + b1[None, :], g1, ACT)
            g1 = tl.where(m1, g1, 0.0)
            tl.atomic_add(gs1_ptr + c64, tl.sum(g1 * y1, axis=0), mask=c_ok)
            tl.atomic_add(gb1_ptr + c64, tl.sum(g1, axis=0), mask=c_ok)
            gy1 = g1 * s1[None, :]
            if CORR == 1:
                gy1 = tl.where(m1, gy1 + _stats_grad(ca_ptr, cc_ptr, cm_ptr, c64, c_ok, y1), 0.0)
            if NEED_W1:
                for k0 in range(0, C_in, BLOCK_K):
                    k = k0 + kr
                    k_ok = k < C_in
                    k64 = k.to(tl.int64)
                    xt = tl.load(x_pix[:, None] + k64[None, :] * sxc, mask=t_pix[:, None] & k_ok[None, :],
                                 other=0.0).to(ACC)
                    part = tl.dot(tl.trans(gy1), xt, input_precision=INPUT_PRECISION, out_dtype=ACC)
                    tl.atomic_add(gw1_ptr + c64[:, None] * C_in + k64[None, :], part,
                                  mask=c_ok[:, None] & k_ok[None, :])
            if NEED_GX:
                tl.store(scr_gy1 + (p[:, None] * c_pad + c[None, :]), gy1)

        # ---- grad_x = W1^T (g1*s1), summed over every x1 channel block here: complete, no atomics ----
        if NEED_GX:
            tl.debug_barrier()
            for k0 in range(0, C_in, BLOCK_K):
                k = k0 + kr
                k_ok = k < C_in
                k64 = k.to(tl.int64)
                gx = tl.zeros([P, BLOCK_K], dtype=ACC)
                for cb in range(0, n_cblocks):
                    c = cb * BLOCK_C + cr
                    c_ok = c < n_x1_out
                    gy1 = tl.load(scr_gy1 + (p[:, None] * c_pad + c[None, :]))
                    wt = tl.load(w1_ptr + c[:, None].to(tl.int64) * sw1o + k64[None, :] * sw1k,
                                 mask=c_ok[:, None] & k_ok[None, :], other=0.0).to(ACC)
                    gx = tl.dot(gy1, wt, gx, input_precision=INPUT_PRECISION, out_dtype=ACC)
                gx_pix = gx_ptr + n * sdxn + h64 * sdxh + w64 * sdxw
                tl.store(gx_pix[:, None] + k64[None, :] * sdxc, gx.to(gx_ptr.dtype.element_ty),
                         mask=t_pix[:, None] & k_ok[None, :])
            tl.debug_barrier()  # the next item rewrites the g1*s1 slot


def _pick_bwd_config(H: int, W: int, dw: int, n_x1: int):
    """The backward's launch config (its halo is 2 * (dw // 2) per side): (halo_h, halo_w, block_c, block_k,
    num_warps). Looked up at call time: a test may monkeypatch it with any such tuple where halo_h and halo_w are
    powers of two with halo - 4 * (dw // 2) >= 1 (the owned tile), halo_h * halo_w >= 16 (tl.dot's M), block_c
    and block_k are powers of two >= 16, and num_warps a power of two."""
    # the halo is 2R per side here (y2 and g2 are needed R past the tile, and they read x1 R further)
    r2 = 2 * (dw // 2)
    halo_h = _halo_side(H, r2)
    halo_w = _halo_side(W, r2)
    if dw >= 5 and W + 2 * r2 > 16:
        halo_w = 32  # a 16-wide halo would leave only 4-8 useful columns out of 16
    while halo_h * halo_w < 16:  # tl.dot needs M >= 16
        if halo_w <= halo_h:
            halo_w *= 2
        else:
            halo_h *= 2
    p = halo_h * halo_w
    # the backward keeps several [P, BLOCK_C] tiles live (y1, pre1, gx1, y2, g2): half the forward's block
    block_c = 16 if p >= 128 else min(32, max(16, _next_pow2(n_x1)))
    block_k = 16
    num_warps = max(4, min(8, p * block_c // 512))  # more live tiles than the forward: spread them wider
    return halo_h, halo_w, block_c, block_k, num_warps


def ghost_module_backward(grad_out: Tensor, x: Tensor, primary_weight: Tensor, primary_scale: Tensor,
                          primary_bias: Tensor, cheap_weight: Tensor, cheap_scale: Tensor, cheap_bias: Tensor,
                          out_channels: int, act, gate: Optional[Tensor], gate_mode: str,
                          needs: Sequence[bool]) -> tuple:
    """Fused Ghost module backward (eval, BN folded by the caller): gradients of `ghost_module_forward` for every
    input, with each BatchNorm given as its folded per-channel (scale, shift) vectors.

    `needs`: 8 bools (list or tuple), one per gradient below. Returns (grad_x, grad_primary_weight,
    grad_primary_scale, grad_primary_bias, grad_cheap_weight, grad_cheap_scale, grad_cheap_bias, grad_gate), None
    where `needs` says so (grad_gate None without a gate). Launches: one multi-tensor zero-fill of the ACC
    accumulators and one Triton kernel (plus a cast per returned parameter gradient for half inputs). The weight,
    BN and gate gradients are reduced with fp32 (fp64) atomics, so on a GPU their last bits depend on the order
    programs finish; grad_x is complete in one program, no atomics."""
    assert grad_out is not None
    return _backward_launch(grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                            cheap_bias, out_channels, act, gate, gate_mode, needs, None)


def _backward_launch(grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
                     out_channels, act, gate, gate_mode, needs, corr) -> tuple:
    """The launch behind `ghost_module_backward` and `ghost_module_stats_backward`. `corr` = (stage, a, c, mean)
    adds a + c * (z - mean) per channel to the gradient of z1 (stage 1) or z2 (stage 2); grad_out may then be
    None (no gradient from the module's output)."""
    N, C_in, H, W, init, dw, ratio_m1 = _dims(x, primary_weight, cheap_weight, out_channels, gate_mode)
    cheap = init * ratio_m1
    assert grad_out is None or grad_out.shape == (N, out_channels, H, W)
    assert grad_out is not None or corr is not None
    assert gate is None or (gate.dim() == 4 and gate.shape[:2] == (N, out_channels))
    needs = tuple(bool(b) for b in needs)
    assert len(needs) == 8, "needs: one flag per gradient (x, the six parameters, gate)"
    dtype = x.dtype
    is_fp64 = dtype == torch.float64
    acc_t = torch.float64 if is_fp64 else torch.float32
    need_gate = gate is not None and needs[7]

    # the atomically reduced gradients accumulate in ACC buffers, zeroed by one multi-tensor launch; separate
    # tensors, not views of one workspace: a custom op's outputs may not alias each other
    n_gate = gate.numel() if need_gate else 0
    sizes = [init * C_in, init, init, cheap * dw * dw, cheap, cheap, n_gate]
    bufs = [torch.empty(sz, dtype=acc_t, device=x.device) for sz in sizes]
    torch._foreach_zero_(bufs)
    gw1, gs1, gb1, gw2, gs2, gb2, gg = bufs

    grad_x = None
    if needs[0]:
        grad_x = _empty_like_x(x, (N, C_in, H, W))  # fully written by the kernel (and empty when N * H * W == 0)

    if N * H * W > 0:
        w1 = primary_weight if primary_weight.dtype == dtype else primary_weight.to(dtype)
        w1 = w1.reshape(init, C_in)
        w2 = cheap_weight
        s1, b1, s2, b2 = _folded_vectors(primary_scale, primary_bias, cheap_scale, cheap_bias)
        g, Hg, Wg, sg, gscale_h, gscale_w = _gate_args(gate, x)
        precision = _input_precision(dtype)

        n_x1 = min(init, out_channels)
        halo_h, halo_w, block_c, block_k, num_warps = _pick_bwd_config(H, W, dw, n_x1)
        r2 = 2 * (dw // 2)
        assert halo_h - 2 * r2 >= 1 and halo_w - 2 * r2 >= 1 and halo_h * halo_w >= 16, (halo_h, halo_w, dw)
        tiles_h = triton.cdiv(H, halo_h - 2 * r2)
        tiles_w = triton.cdiv(W, halo_w - 2 * r2)
        n_cblocks = triton.cdiv(n_x1, block_c)
        total = N * tiles_h * tiles_w
        grid = min(total, _max_programs(x.device))
        p = halo_h * halo_w
        slot = 2 * p * block_c + (p * n_cblocks * block_c if needs[0] else 0)
        scratch = torch.empty((grid, slot), dtype=acc_t, device=x.device)
        gx_t = grad_x if needs[0] else x
        gg_t = gg if need_gate else gs1  # never touched
        Cg = gate.shape[1] if gate is not None else 0
        go = x if grad_out is None else grad_out  # never read without grad_out
        corr_stage, ca, cc, cm = corr if corr is not None else (0, gs1, gs1, gs1)

        _ghost_module_bwd_kernel[(grid,)](
            go, x, w1, s1, b1, w2, s2, b2, g, gx_t, gw1, gs1, gb1, gw2, gs2, gb2, gg_t, scratch, ca, cc, cm,
            C_in, H, W, init, ratio_m1, out_channels, Hg, Wg, gscale_h, gscale_w,
            *go.stride(), *x.stride(), w1.stride(0), w1.stride(1), w2.stride(0), w2.stride(2), w2.stride(3),
            *sg, *gx_t.stride(), Cg * Hg * Wg, Hg * Wg,
            tiles_h, tiles_w, n_cblocks, total, slot,
            HALO_H=halo_h, HALO_W=halo_w, DW=dw, BLOCK_C=block_c, BLOCK_K=block_k,
            ACT=_act_code(act), HAS_GATE=gate is not None, GATE_BILINEAR=gate_mode == "bilinear",
            NEED_GX=bool(needs[0]), NEED_W1=bool(needs[1]), NEED_GATE=need_gate,
            INPUT_PRECISION=precision, ACC=tl.float64 if is_fp64 else tl.float32, IS_FP64=is_fp64,
            HAS_GO=grad_out is not None, CORR=corr_stage, num_warps=num_warps,
        )

    def _out(flag, t, like):
        if not flag:
            return None
        t = t.view(like.shape)
        return t if t.dtype == like.dtype else t.to(like.dtype)

    return (
        grad_x,
        _out(needs[1], gw1, primary_weight),
        _out(needs[2], gs1, primary_scale),
        _out(needs[3], gb1, primary_bias),
        _out(needs[4], gw2, cheap_weight),
        _out(needs[5], gs2, cheap_scale),
        _out(needs[6], gb2, cheap_bias),
        _out(need_gate, gg, gate) if gate is not None else None,
    )


def ghost_module_stats_backward(x: Tensor, primary_weight: Tensor, primary_scale: Tensor, primary_bias: Tensor,
                                cheap_weight: Tensor, act, stage: int, coef_a: Tensor, coef_c: Tensor,
                                mean: Tensor, needs: Sequence[bool]) -> tuple:
    """Backward of `ghost_module_stats`: with dz = coef_a + coef_c * (z - mean) per channel of the stage's z
    (coef_a = grad_mean / M, coef_c = 2 grad_var / M for M = N*H*W), the gradients of sum(dz * z) for (x,
    primary_weight, primary_scale, primary_bias, cheap_weight) (BN1 folded: its scale and shift); stage 1 has only
    the first two (others None). `needs`: 5 bools (list or tuple). One launch of the backward kernel without
    grad_out, the correction added where it recomputes z (plus the zero-fill of its accumulators)."""
    assert stage in (1, 2)
    init = primary_weight.shape[0]
    cheap = cheap_weight.shape[0]
    acc_t = torch.float64 if x.dtype == torch.float64 else torch.float32
    needs = tuple(bool(b) for b in needs)
    assert len(needs) == 5, "needs: one flag per gradient (x, primary_weight, primary_scale, primary_bias, " \
                            "cheap_weight)"
    needs = tuple(n and (stage == 2 or i < 2) for i, n in enumerate(needs))
    vec = [t.to(acc_t).contiguous() for t in (primary_scale, primary_bias, coef_a, coef_c, mean)]
    s1, b1, ca, cc, cm = vec
    zeros = torch.zeros(cheap, dtype=acc_t, device=x.device)  # BN2 of a stats-only pass: nothing reaches it
    out_channels = init if stage == 1 else init + cheap  # stage 1 skips the cheap half, stage 2 keeps all of it
    grads = _backward_launch(None, x, primary_weight, s1, b1, cheap_weight, zeros, zeros, out_channels, act, None,
                             "nearest", needs + (False, False, False), (stage, ca, cc, cm))
    out = list(grads[:5])
    # the scale and bias gradients come back in the accumulation dtype's copies: cast to the inputs' own dtype
    for i, like in ((2, primary_scale), (3, primary_bias)):
        if out[i] is not None and out[i].dtype != like.dtype:
            out[i] = out[i].to(like.dtype)
    return tuple(out)
