// Fused DFC attention on CUDA (schema and conventions: ../dfc.cpp; the spec: ghostfast/reference.py).
//
//   a3 = s3 * (W3 avgpool2x2(x)) + b3     [N, C, HP, WP], HP = H // 2, WP = W // 2
//   a4 = s4 * (h 1x5 conv of a3) + b4     zero padding (2 columns) of the biased a3
//   z  = s5 * (v 5x1 conv of a4) + b5     zero padding (2 rows) of the biased a4
//   g  = sigmoid(z)                        mode 'gate': written at [N, C, HP, WP];
//                                          'nearest' / 'bilinear': upsampled to [N, C, H, W] as F.interpolate does
//
// Forward, one launch. A block owns (image n, tile TH x TW of pooled pixels, block of CB channels). It pools x while
// staging it and computes a3 on the tile plus a margin of 2 pooled rows / columns each side (no margin along a
// dimension one tile covers; for 'bilinear' one more row / column after the tile, the upper neighbour the
// interpolation reads) into shared memory, then a4, then z and the gate. 'gate' stores the tile; the upsampled modes
// park the gate in shared memory and write every full-resolution pixel whose (lower) source index lies in the tile:
// each output element is written exactly once.
//
// Backward, up to three launches (plus zero-fills of the accumulators and, for fp16/bf16 weights, a cast):
//   1. main: a block owns (n, tile, CB channels) with a margin of 4 pooled rows / columns: it recomputes a3, a4, z
//      and g, gathers the gradient of g (for the upsampled modes: the adjoint of the upsample, by testing which
//      full-resolution pixels read each pooled pixel with the forward's own index math), and walks back through
//      the sigmoid, BN5, the 5x1 conv, BN4, the 1x5 conv and BN3. Per-channel sums and the 1x5 / 5x1 weight grads
//      are reduced per warp over the tile's own pixels and added with atomics into zeroed accumulation buffers;
//      gy3 = d/d(W3 pool(x)) of the tile goes to a workspace [N, C, HP*WP].
//   2. grad_x = pool^T (W3^T gy3): a tiled GEMM per image; each pooled pixel's value / 4 goes to its 2x2 window, the
//      row / column the pool floors off (odd H / W) gets 0. Every element written once, no atomics.
//   3. grad_W3 = sum over (n, pooled pixels) of gy3 pool(x)^T: a split-K tiled GEMM, atomics.
// The atomics make the last bits of the parameter gradients depend on the order blocks finish.
//
// Accumulation: float for float / half / bfloat16, double for double. All global offsets are int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "common.h"
#include "kernel_signatures.h"
#include "upsample.h"

namespace ghostfast {
namespace {

constexpr const char* kFwdOp = "ghostfast::_dfc_kernel (CUDA)";
constexpr const char* kBwdOp = "ghostfast::_dfc_backward_kernel (CUDA)";

constexpr int kThreads = 256;              // every kernel here runs 256 threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kPixChunk = 256;             // pixels per pass of the register-blocked 1x1 conv
constexpr size_t kDefaultSmem = 48 * 1024; // dynamic shared memory usable without opting in
constexpr int kTaps = 5;                   // the 1x5 and 5x1 depthwise convs
constexpr int kModeGate = 0, kModeNearest = 1, kModeBilinear = 2;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}

__device__ __forceinline__ float sigmoid_acc(float z) { return 1.0f / (1.0f + ::expf(-z)); }
__device__ __forceinline__ double sigmoid_acc(double z) { return 1.0 / (1.0 + ::exp(-z)); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// avgpool2x2(x)[n, k, pi, pj] in the accumulation type, summed in ATen's order.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t pooled_at(const scalar_t* xnk, int64_t pi, int64_t pj, int64_t sxh, int64_t sxw) {
  const scalar_t* q = xnk + (2 * pi) * sxh + (2 * pj) * sxw;
  acc_t s = to_acc<acc_t>(q[0]);
  s += to_acc<acc_t>(q[sxw]);
  s += to_acc<acc_t>(q[sxh]);
  s += to_acc<acc_t>(q[sxh + sxw]);
  return s * acc_t(0.25);
}

// ---- register-blocked 1x1 conv over a shared-memory region ---------------------------------------------------
//
// out[c][p] = sum_k Wrow(c, k) * X(k, p) for the CB channels of the block and the npix pixels of a region.
// Threads: NCG = CB/8 channel groups of NPT = 256/NCG pixel lanes; a thread accumulates 8 channels x PPT pixels
// (p = chunk + lane + i*NPT). The pixels run in passes of kPixChunk; per pass C_in is staged in chunks of KC
// channels: xs[KC][LDX] (pooled x in acc_t, 0 outside the image) and ws[KC][CB] (weights).
template <typename acc_t, int CB>
struct ConvShape {
  static constexpr int CPT = 8;
  static constexpr int NCG = CB / CPT;
  static constexpr int NPT = kThreads / NCG;
  static constexpr int PPT = kPixChunk / NPT;
  static constexpr int KC = sizeof(acc_t) == 8 ? 4 : 8;
  static constexpr int LDX = kPixChunk + 4;
  static constexpr int kStageElems = KC * LDX + KC * CB;
  static_assert(CB % CPT == 0 && kThreads % NCG == 0 && kPixChunk % NPT == 0 && NPT % 32 == 0, "conv shape");
};

// XLoad(k, p) -> acc_t: input channel k (< K) at region pixel p (< npix), 0 outside the image.
// WLoad(c, k) -> acc_t: weight of the block's channel c (< CB) for input channel k (< K), 0 past the last row.
// Epi(p, c, v): the result for region pixel p, channel c; called once per (p, c).
// Syncs inside; the caller syncs after it before reading what Epi wrote.
template <typename acc_t, int CB, typename XLoad, typename WLoad, typename Epi>
__device__ __forceinline__ void conv1x1_region(acc_t* __restrict__ stage, int npix, int64_t K, bool channel_fast,
                                               const XLoad& xload, const WLoad& wload, const Epi& epi) {
  using S = ConvShape<acc_t, CB>;
  acc_t* xs = stage;                   // [KC][LDX]
  acc_t* ws = stage + S::KC * S::LDX;  // [KC][CB]
  const int tid = threadIdx.x;
  const int cg = tid / S::NPT;
  const int pt = tid - cg * S::NPT;
  for (int pc0 = 0; pc0 < npix; pc0 += kPixChunk) {
    acc_t acc[S::PPT][S::CPT];
#pragma unroll
    for (int i = 0; i < S::PPT; ++i)
#pragma unroll
      for (int j = 0; j < S::CPT; ++j) acc[i][j] = acc_t(0);
    for (int64_t k0 = 0; k0 < K; k0 += S::KC) {
      __syncthreads();  // the previous chunk's readers are done with xs / ws
      for (int e = tid; e < S::KC * kPixChunk; e += kThreads) {
        int kk, pp;
        if (channel_fast) {  // channels_last: consecutive threads read consecutive channels
          kk = e % S::KC;
          pp = e / S::KC;
        } else {
          pp = e % kPixChunk;
          kk = e / kPixChunk;
        }
        const int p = pc0 + pp;
        const int64_t k = k0 + kk;
        xs[kk * S::LDX + pp] = (p < npix && k < K) ? xload(k, p) : acc_t(0);
      }
      for (int e = tid; e < S::KC * CB; e += kThreads) {
        const int kk = e % S::KC;
        const int c = e / S::KC;
        const int64_t k = k0 + kk;
        ws[kk * CB + c] = k < K ? wload(c, k) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < S::KC; ++kk) {
        acc_t xv[S::PPT], wv[S::CPT];
#pragma unroll
        for (int i = 0; i < S::PPT; ++i) xv[i] = xs[kk * S::LDX + pt + i * S::NPT];
#pragma unroll
        for (int j = 0; j < S::CPT; ++j) wv[j] = ws[kk * CB + cg * S::CPT + j];
#pragma unroll
        for (int i = 0; i < S::PPT; ++i)
#pragma unroll
          for (int j = 0; j < S::CPT; ++j) acc[i][j] += xv[i] * wv[j];
      }
    }
#pragma unroll
    for (int i = 0; i < S::PPT; ++i) {
      const int p = pc0 + pt + i * S::NPT;
      if (p < npix) {
#pragma unroll
        for (int j = 0; j < S::CPT; ++j) epi(p, cg * S::CPT + j, acc[i][j]);
      }
    }
  }
}

// avgpool2x2(x)[n, k, pb_h + ai, pb_w + aj] for region pixel p = ai * WA + aj; 0 outside [0, HP) x [0, WP).
template <typename scalar_t, typename acc_t>
struct PooledRegionLoad {
  const scalar_t* xn;  // x + n * sxn
  int64_t sxc, sxh, sxw, HP, WP, pb_h, pb_w;
  int WA;
  __device__ __forceinline__ acc_t operator()(int64_t k, int p) const {
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t pi = pb_h + ai;
    const int64_t pj = pb_w + aj;
    if (pi < 0 || pi >= HP || pj < 0 || pj >= WP) return acc_t(0);
    return pooled_at<acc_t>(xn + k * sxc, pi, pj, sxh, sxw);
  }
};

// Row c0 + c of a contiguous [rows, K] weight; 0 past the last row.
template <typename scalar_t, typename acc_t>
struct WeightRowLoad {
  const scalar_t* w;
  int64_t c0, rows, K;
  __device__ __forceinline__ acc_t operator()(int c, int64_t k) const {
    const int64_t r = c0 + c;
    return r < rows ? to_acc<acc_t>(w[r * K + k]) : acc_t(0);
  }
};

// a3 = s3 * y3 + b3 on the region, 0 outside the image (the h conv's zero padding) and for channels past C;
// optionally y3 itself on the tile (the backward's BN3 scale gradient).
template <typename acc_t>
struct A3Epi {
  acc_t* a3;   // [CB][PA]
  acc_t* y3t;  // [CB][PT] or null
  const acc_t* s3;
  const acc_t* b3;
  int64_t c0, C, HP, WP, pb_h, pb_w;
  int WA, PA, PT, TH, TW, mh, mw;
  __device__ __forceinline__ void operator()(int p, int c, acc_t v) const {
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t pi = pb_h + ai;
    const int64_t pj = pb_w + aj;
    const int64_t cc = c0 + c;
    acc_t r = acc_t(0);
    if (cc < C && pi >= 0 && pi < HP && pj >= 0 && pj < WP) r = v * s3[cc] + b3[cc];
    a3[c * PA + p] = r;
    if (y3t != nullptr) {
      const int ti = ai - mh;
      const int tj = aj - mw;
      if (ti >= 0 && ti < TH && tj >= 0 && tj < TW) y3t[c * PT + ti * TW + tj] = v;
    }
  }
};

// ---- forward -------------------------------------------------------------------------------------------------
//
// Region of a block (pooled coordinates, origin at (i0 - mh, j0 - mw)): rows [i0 - mh, i0 + TH + rh + mh), columns
// [j0 - mw, j0 + TW + rw + mw); m = 2 where the dimension is tiled (0 where one tile covers it), r = 1 for bilinear
// on a tiled dimension. Every stage is computed on the whole region with reads outside the region taken as 0:
// a3 is exact everywhere, a4 on columns [mw, WA - mw), z on rows [mh, HA - mh) of those: the tile and its ring.
// (Where m = 0 the region is the whole dimension, so a read outside it is a read outside the image: 0 is exact.)

template <typename scalar_t, typename acc_t>
struct DfcFwdArgs {
  const scalar_t* x;
  const scalar_t* cw;  // [C, C_in]
  const acc_t* cs;
  const acc_t* cb;
  const scalar_t* hw;  // [C, 5]
  const acc_t* hs;
  const acc_t* hb;
  const scalar_t* vw;  // [C, 5]
  const acc_t* vs;
  const acc_t* vb;
  scalar_t* out;
  int64_t C_in, C, H, W, HP, WP;
  int64_t sxn, sxc, sxh, sxw;
  int64_t son, soc, soh, sow;
  int64_t tiles_h, tiles_w, ncb;
  int TH, TW, mh, mw, rh, rw;
  int mode;
  bool cl;
};

template <typename acc_t, int CB>
size_t dfc_fwd_smem_bytes(int ha, int wa) {
  return size_t(2 * CB * int64_t(ha) * wa + ConvShape<acc_t, CB>::kStageElems) * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads) dfc_forward_kernel(const DfcFwdArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  int64_t bid = blockIdx.x;
  const int64_t cblk = bid % a.ncb;
  bid /= a.ncb;
  const int64_t tw = bid % a.tiles_w;
  bid /= a.tiles_w;
  const int64_t th = bid % a.tiles_h;
  const int64_t n = bid / a.tiles_h;

  const int TH = a.TH, TW = a.TW, mh = a.mh, mw = a.mw;
  const int HA = TH + a.rh + 2 * mh;
  const int WA = TW + a.rw + 2 * mw;
  const int PA = HA * WA;
  const int64_t i0 = th * TH, j0 = tw * TW;
  const int64_t pb_h = i0 - mh, pb_w = j0 - mw;  // pooled coordinates of region pixel (0, 0)
  const int64_t c0 = cblk * CB;
  acc_t* S0 = smem;               // a3, then the gate      [CB][PA]
  acc_t* S1 = S0 + CB * PA;       // a4                     [CB][PA]
  acc_t* stage = S1 + CB * PA;    // conv staging

  // ---- a3
  conv1x1_region<acc_t, CB>(
      stage, PA, a.C_in, a.cl,
      PooledRegionLoad<scalar_t, acc_t>{a.x + n * a.sxn, a.sxc, a.sxh, a.sxw, a.HP, a.WP, pb_h, pb_w, WA},
      WeightRowLoad<scalar_t, acc_t>{a.cw, c0, a.C, a.C_in},
      A3Epi<acc_t>{S0, nullptr, a.cs, a.cb, c0, a.C, a.HP, a.WP, pb_h, pb_w, WA, PA, 0, TH, TW, mh, mw});
  __syncthreads();

  // ---- a4 = s4 * (1x5 conv of a3) + b4, 0 outside the image
  for (int e = threadIdx.x; e < CB * PA; e += kThreads) {
    const int c = e / PA;
    const int p = e - c * PA;
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t pi = pb_h + ai, pj = pb_w + aj, cc = c0 + c;
    acc_t r = acc_t(0);
    if (cc < a.C && pi >= 0 && pi < a.HP && pj >= 0 && pj < a.WP) {
      const acc_t* row = S0 + c * PA + ai * WA;
      acc_t s = acc_t(0);
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        const int jj = aj + t - 2;
        s += to_acc<acc_t>(a.hw[cc * kTaps + t]) * ((jj >= 0 && jj < WA) ? row[jj] : acc_t(0));
      }
      r = s * a.hs[cc] + a.hb[cc];
    }
    S1[e] = r;
  }
  __syncthreads();

  // ---- gate = sigmoid(s5 * (5x1 conv of a4) + b5) on the tile and its ring (G = (TH + rh) x (TW + rw))
  const int GH = TH + a.rh, GW = TW + a.rw;
  const int PG = GH * GW;
  for (int e = threadIdx.x; e < CB * PG; e += kThreads) {
    int c, gp;
    if (a.cl && a.mode == kModeGate) {
      c = e % CB;
      gp = e / CB;
    } else {
      gp = e % PG;
      c = e / PG;
    }
    const int gi = gp / GW;
    const int gj = gp - gi * GW;
    const int ai = mh + gi, aj = mw + gj;
    const int64_t pi = i0 + gi, pj = j0 + gj, cc = c0 + c;
    if (cc >= a.C || pi >= a.HP || pj >= a.WP) {
      if (a.mode != kModeGate) S0[c * PA + ai * WA + aj] = acc_t(0);  // never read: keeps the slot defined
      continue;
    }
    const acc_t* col = S1 + c * PA + aj;
    acc_t s = acc_t(0);
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      const int ii = ai + t - 2;
      s += to_acc<acc_t>(a.vw[cc * kTaps + t]) * ((ii >= 0 && ii < HA) ? col[ii * WA] : acc_t(0));
    }
    const acc_t g = sigmoid_acc(s * a.vs[cc] + a.vb[cc]);
    if (a.mode == kModeGate) {
      if (gi < TH && gj < TW) a.out[n * a.son + cc * a.soc + pi * a.soh + pj * a.sow] = static_cast<scalar_t>(g);
    } else {
      S0[c * PA + ai * WA + aj] = g;  // a3 was last read before the barrier above
    }
  }
  if (a.mode == kModeGate) return;  // block-uniform
  __syncthreads();

  // ---- upsample: the full-resolution pixels whose (lower) source row and column lie in this tile. Source indices
  // are monotonic in the destination index and about half of it, so they come from rows [2*i0 - 4, 2*(i0+TH) + 4)
  // (the whole remaining range for the last tile); membership is decided exactly by the forward's index math.
  const int64_t hlo = std::max<int64_t>(0, 2 * i0 - 4);
  const int64_t hhi = (i0 + TH >= a.HP) ? a.H : std::min<int64_t>(a.H, 2 * (i0 + TH) + 4);
  const int64_t wlo = std::max<int64_t>(0, 2 * j0 - 4);
  const int64_t whi = (j0 + TW >= a.WP) ? a.W : std::min<int64_t>(a.W, 2 * (j0 + TW) + 4);
  const int64_t nr = hhi - hlo, nc = whi - wlo;
  const int64_t total = int64_t(CB) * nr * nc;
  const bool bilinear = a.mode == kModeBilinear;
  for (int64_t e = threadIdx.x; e < total; e += kThreads) {
    int c;
    int64_t r, col;
    if (a.cl) {
      c = static_cast<int>(e % CB);
      const int64_t rest = e / CB;
      col = rest % nc;
      r = rest / nc;
    } else {
      col = e % nc;
      const int64_t rest = e / nc;
      r = rest % nr;
      c = static_cast<int>(rest / nr);
    }
    const int64_t hf = hlo + r, wf = wlo + col, cc = c0 + c;
    if (cc >= a.C) continue;
    const acc_t* gs = S0 + c * PA;
    acc_t v;
    if (!bilinear) {
      const int64_t sh = nearest_source(hf, a.HP, a.H);
      const int64_t sw = nearest_source(wf, a.WP, a.W);
      if (sh < i0 || sh >= i0 + TH || sw < j0 || sw >= j0 + TW) continue;
      v = gs[(sh - pb_h) * WA + (sw - pb_w)];
    } else {
      const LinearSource<acc_t> lh = linear_source<acc_t>(hf, a.HP, a.H);
      const LinearSource<acc_t> lw = linear_source<acc_t>(wf, a.WP, a.W);
      if (lh.i0 < i0 || lh.i0 >= i0 + TH || lw.i0 < j0 || lw.i0 >= j0 + TW) continue;
      // i1 <= i0 + 1 lies in the ring (or, on a single-tile dimension, i1 <= HP - 1 lies in the tile)
      const int64_t r0 = (lh.i0 - pb_h) * WA, r1 = (lh.i1 - pb_h) * WA;
      const int64_t q0 = lw.i0 - pb_w, q1 = lw.i1 - pb_w;
      const acc_t one = acc_t(1);
      v = (one - lh.lambda) * ((one - lw.lambda) * gs[r0 + q0] + lw.lambda * gs[r0 + q1]) +
          lh.lambda * ((one - lw.lambda) * gs[r1 + q0] + lw.lambda * gs[r1 + q1]);
    }
    a.out[n * a.son + cc * a.soc + hf * a.soh + wf * a.sow] = static_cast<scalar_t>(v);
  }
}

// ---- backward: main kernel -----------------------------------------------------------------------------------
//
// Region as in the forward with m = 4 on tiled dimensions (no ring): a3 is exact on the region, a4 on columns
// [m/2, WA - m/2), z, g and gy5 on rows [m/2, HA - m/2) of those (computed only there, 0 elsewhere), ga4 / gy4 on
// rows [m, HA - m) (the tile's rows) and columns [m/2, WA - m/2) (computed only there), ga3 on the tile. Reductions
// and gy3 use the tile's pixels only, so every pooled pixel is counted by exactly one block.
// Shared memory: S0 = a3, S1 = a4 then gy4, S2 = gy5 ([CB][PA] each), Y3 = y3 on the tile ([CB][PT]).
// Channel passes: warp w owns channels w, w + 8, ...; its lanes walk the pixels, then the warp reduces its sums.

template <typename scalar_t, typename acc_t>
struct DfcBwdArgs {
  const scalar_t* go;  // the incoming gradient: [N, C, HP, WP] ('gate') or [N, C, H, W]; strides sgn..sgw
  const scalar_t* x;
  const scalar_t* cw;
  const acc_t* cs;
  const acc_t* cb;
  const scalar_t* hw;
  const acc_t* hs;
  const acc_t* hb;
  const scalar_t* vw;
  const acc_t* vs;
  const acc_t* vb;
  acc_t* gs3;  // [C] or null, and so on
  acc_t* gb3;
  acc_t* ghw;  // [C, 5]
  acc_t* gs4;
  acc_t* gb4;
  acc_t* gvw;  // [C, 5]
  acc_t* gs5;
  acc_t* gb5;
  acc_t* gy3;  // [N, C, HP*WP] or null
  int64_t C_in, C, H, W, HP, WP;
  int64_t sxn, sxc, sxh, sxw;
  int64_t sgn, sgc, sgh, sgw;
  int64_t tiles_h, tiles_w, ncb;
  int TH, TW, mh, mw;
  int mode;
  bool cl;
};

template <typename acc_t, int CB>
size_t dfc_bwd_smem_bytes(int ha, int wa, int th, int tw) {
  return size_t(CB * (3 * int64_t(ha) * wa + int64_t(th) * tw) + ConvShape<acc_t, CB>::kStageElems) *
         sizeof(acc_t);
}

// The weight with which full-resolution index `dst` reads pooled index `src` along one axis (0: it doesn't).
template <typename acc_t>
__device__ __forceinline__ acc_t axis_weight(int64_t dst, int64_t src, int64_t in_size, int64_t out_size,
                                             bool bilinear) {
  if (dst < 0 || dst >= out_size) return acc_t(0);
  if (!bilinear) return nearest_source(dst, in_size, out_size) == src ? acc_t(1) : acc_t(0);
  const LinearSource<acc_t> l = linear_source<acc_t>(dst, in_size, out_size);
  acc_t w = acc_t(0);
  if (l.i0 == src) w += acc_t(1) - l.lambda;
  if (l.i1 == src) w += l.lambda;
  return w;
}

// Adjoint of the upsample at pooled pixel (pi, pj): the full-resolution rows / columns reading it lie in
// [2*pi - 2, 2*pi + 4) (nearest: [2*pi, 2*pi + 3); bilinear: [2*pi - 1, 2*pi + 4)); g is the (n, c) plane.
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t upsample_adjoint(const scalar_t* g, int64_t sgh, int64_t sgw, int64_t pi, int64_t pj,
                                                  int64_t H, int64_t W, int64_t HP, int64_t WP, bool bilinear) {
  acc_t wr[6], wc[6];
#pragma unroll
  for (int u = 0; u < 6; ++u) {
    wr[u] = axis_weight<acc_t>(2 * pi - 2 + u, pi, HP, H, bilinear);
    wc[u] = axis_weight<acc_t>(2 * pj - 2 + u, pj, WP, W, bilinear);
  }
  acc_t s = acc_t(0);
#pragma unroll
  for (int u = 0; u < 6; ++u) {
    if (wr[u] == acc_t(0)) continue;
    const scalar_t* row = g + (2 * pi - 2 + u) * sgh;
#pragma unroll
    for (int v = 0; v < 6; ++v) {
      if (wc[v] == acc_t(0)) continue;
      s += (wr[u] * wc[v]) * to_acc<acc_t>(row[(2 * pj - 2 + v) * sgw]);
    }
  }
  return s;
}

template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads) dfc_backward_kernel(const DfcBwdArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  int64_t bid = blockIdx.x;
  const int64_t cblk = bid % a.ncb;
  bid /= a.ncb;
  const int64_t tw = bid % a.tiles_w;
  bid /= a.tiles_w;
  const int64_t th = bid % a.tiles_h;
  const int64_t n = bid / a.tiles_h;

  const int TH = a.TH, TW = a.TW, mh = a.mh, mw = a.mw;
  const int HA = TH + 2 * mh;
  const int WA = TW + 2 * mw;
  const int PA = HA * WA;
  const int PT = TH * TW;
  const int64_t i0 = th * TH, j0 = tw * TW;
  const int64_t pb_h = i0 - mh, pb_w = j0 - mw;
  const int64_t c0 = cblk * CB;
  acc_t* S0 = smem;             // a3
  acc_t* S1 = S0 + CB * PA;     // a4, then gy4
  acc_t* S2 = S1 + CB * PA;     // gy5
  acc_t* Y3 = S2 + CB * PA;     // y3 on the tile [CB][PT]
  acc_t* stage = Y3 + CB * PT;  // conv staging

  // ---- 1. a3 on the region, y3 on the tile
  conv1x1_region<acc_t, CB>(
      stage, PA, a.C_in, a.cl,
      PooledRegionLoad<scalar_t, acc_t>{a.x + n * a.sxn, a.sxc, a.sxh, a.sxw, a.HP, a.WP, pb_h, pb_w, WA},
      WeightRowLoad<scalar_t, acc_t>{a.cw, c0, a.C, a.C_in},
      A3Epi<acc_t>{S0, Y3, a.cs, a.cb, c0, a.C, a.HP, a.WP, pb_h, pb_w, WA, PA, PT, TH, TW, mh, mw});
  __syncthreads();

  // ---- 2. a4 on the region (exact on columns [mw/2, WA - mw/2)), 0 outside the image
  for (int e = threadIdx.x; e < CB * PA; e += kThreads) {
    const int c = e / PA;
    const int p = e - c * PA;
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t pi = pb_h + ai, pj = pb_w + aj, cc = c0 + c;
    acc_t r = acc_t(0);
    if (cc < a.C && pi >= 0 && pi < a.HP && pj >= 0 && pj < a.WP) {
      const acc_t* row = S0 + c * PA + ai * WA;
      acc_t s = acc_t(0);
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        const int jj = aj + t - 2;
        s += to_acc<acc_t>(a.hw[cc * kTaps + t]) * ((jj >= 0 && jj < WA) ? row[jj] : acc_t(0));
      }
      r = s * a.hs[cc] + a.hb[cc];
    }
    S1[e] = r;
  }
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const bool upsampled = a.mode != kModeGate;
  const bool bilinear = a.mode == kModeBilinear;
  const int qh = mh / 2, qw = mw / 2;  // margins of the region where z / gy5 are exact

  // ---- 3. z, g, ga5 = grad_g * g' on rows [qh, HA - qh) x columns [qw, WA - qw); gy5 = ga5 * s5 -> S2 (0 elsewhere);
  //         BN5 sums on the tile.
  for (int c = warp; c < CB; c += kWarps) {
    const int64_t cc = c0 + c;
    if (cc >= a.C) continue;  // warp-uniform; S2 of this channel is then never read
    acc_t vwt[kTaps];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) vwt[t] = to_acc<acc_t>(a.vw[cc * kTaps + t]);
    const acc_t s5 = a.vs[cc], b5 = a.vb[cc];
    const scalar_t* gplane = a.go + n * a.sgn + cc * a.sgc;
    acc_t sum_s = acc_t(0), sum_b = acc_t(0);
    for (int p = lane; p < PA; p += 32) {
      const int ai = p / WA;
      const int aj = p - ai * WA;
      const int64_t pi = pb_h + ai, pj = pb_w + aj;
      acc_t gy = acc_t(0);
      if (ai >= qh && ai < HA - qh && aj >= qw && aj < WA - qw && pi >= 0 && pi < a.HP && pj >= 0 && pj < a.WP) {
        const acc_t* col = S1 + c * PA + aj;
        acc_t y5 = acc_t(0);
#pragma unroll
        for (int t = 0; t < kTaps; ++t) {
          const int ii = ai + t - 2;
          y5 += vwt[t] * ((ii >= 0 && ii < HA) ? col[ii * WA] : acc_t(0));
        }
        const acc_t g = sigmoid_acc(y5 * s5 + b5);
        const acc_t gg = upsampled ? upsample_adjoint<acc_t>(gplane, a.sgh, a.sgw, pi, pj, a.H, a.W, a.HP, a.WP,
                                                             bilinear)
                                   : to_acc<acc_t>(gplane[pi * a.sgh + pj * a.sgw]);
        const acc_t ga5 = gg * (acc_t(1) - g) * g;  // torch's sigmoid backward
        gy = ga5 * s5;
        if (ai >= mh && ai < mh + TH && aj >= mw && aj < mw + TW) {
          sum_s += ga5 * y5;
          sum_b += ga5;
        }
      }
      S2[c * PA + p] = gy;
    }
    sum_s = warp_sum(sum_s);
    sum_b = warp_sum(sum_b);
    if (lane == 0) {
      if (a.gs5 != nullptr) atomicAdd(a.gs5 + cc, sum_s);
      if (a.gb5 != nullptr) atomicAdd(a.gb5 + cc, sum_b);
    }
  }
  __syncthreads();

  // ---- 4a. grad v_weight[t] = sum_tile gy5(i, j) * a4(i + t - 2, j)
  if (a.gvw != nullptr) {
    for (int c = warp; c < CB; c += kWarps) {
      const int64_t cc = c0 + c;
      if (cc >= a.C) continue;
      for (int t = 0; t < kTaps; ++t) {
        acc_t sum = acc_t(0);
        for (int q = lane; q < PT; q += 32) {
          const int ti = q / TW;
          const int tj = q - ti * TW;
          const int ai = mh + ti, aj = mw + tj;
          const int ii = ai + t - 2;
          if (ii < 0 || ii >= HA) continue;  // only where mh = 0: outside the image, a4 = 0
          sum += S2[c * PA + ai * WA + aj] * S1[c * PA + ii * WA + aj];
        }
        sum = warp_sum(sum);
        if (lane == 0) atomicAdd(a.gvw + cc * kTaps + t, sum);
      }
    }
  }
  __syncthreads();  // a4 is dead: S1 takes gy4

  // ---- 4b. ga4 = transposed 5x1 conv of gy5 on rows [mh, HA - mh) x columns [qw, WA - qw); gy4 = ga4 * s4 -> S1
  //          (0 elsewhere); BN4 sums on the tile (y4 recomputed from a3).
  for (int c = warp; c < CB; c += kWarps) {
    const int64_t cc = c0 + c;
    if (cc >= a.C) continue;
    acc_t vwt[kTaps], hwt[kTaps];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      vwt[t] = to_acc<acc_t>(a.vw[cc * kTaps + t]);
      hwt[t] = to_acc<acc_t>(a.hw[cc * kTaps + t]);
    }
    const acc_t s4 = a.hs[cc];
    acc_t sum_s = acc_t(0), sum_b = acc_t(0);
    for (int p = lane; p < PA; p += 32) {
      const int ai = p / WA;
      const int aj = p - ai * WA;
      const int64_t pi = pb_h + ai, pj = pb_w + aj;
      acc_t gy = acc_t(0);
      if (ai >= mh && ai < HA - mh && aj >= qw && aj < WA - qw && pi >= 0 && pi < a.HP && pj >= 0 && pj < a.WP) {
        const acc_t* col = S2 + c * PA + aj;
        acc_t ga4 = acc_t(0);
#pragma unroll
        for (int t = 0; t < kTaps; ++t) {
          const int ii = ai - (t - 2);
          ga4 += vwt[t] * ((ii >= 0 && ii < HA) ? col[ii * WA] : acc_t(0));
        }
        gy = ga4 * s4;
        if (aj >= mw && aj < mw + TW) {  // rows are the tile's already
          const acc_t* row = S0 + c * PA + ai * WA;
          acc_t y4 = acc_t(0);
#pragma unroll
          for (int t = 0; t < kTaps; ++t) {
            const int jj = aj + t - 2;
            y4 += hwt[t] * ((jj >= 0 && jj < WA) ? row[jj] : acc_t(0));
          }
          sum_s += ga4 * y4;
          sum_b += ga4;
        }
      }
      S1[c * PA + p] = gy;
    }
    sum_s = warp_sum(sum_s);
    sum_b = warp_sum(sum_b);
    if (lane == 0) {
      if (a.gs4 != nullptr) atomicAdd(a.gs4 + cc, sum_s);
      if (a.gb4 != nullptr) atomicAdd(a.gb4 + cc, sum_b);
    }
  }
  __syncthreads();

  // ---- 5. grad h_weight[t] = sum_tile gy4(i, j) * a3(i, j + t - 2); ga3 = transposed 1x5 conv of gy4 on the tile;
  //         BN3 sums; gy3 = ga3 * s3 -> workspace.
  const int64_t PP = a.HP * a.WP;
  for (int c = warp; c < CB; c += kWarps) {
    const int64_t cc = c0 + c;
    if (cc >= a.C) continue;
    acc_t hwt[kTaps];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) hwt[t] = to_acc<acc_t>(a.hw[cc * kTaps + t]);
    if (a.ghw != nullptr) {
      for (int t = 0; t < kTaps; ++t) {
        acc_t sum = acc_t(0);
        for (int q = lane; q < PT; q += 32) {
          const int ti = q / TW;
          const int tj = q - ti * TW;
          const int ai = mh + ti, aj = mw + tj;
          const int jj = aj + t - 2;
          if (jj < 0 || jj >= WA) continue;  // only where mw = 0: outside the image, a3 = 0
          sum += S1[c * PA + ai * WA + aj] * S0[c * PA + ai * WA + jj];
        }
        sum = warp_sum(sum);
        if (lane == 0) atomicAdd(a.ghw + cc * kTaps + t, sum);
      }
    }
    const acc_t s3 = a.cs[cc];
    acc_t sum_s = acc_t(0), sum_b = acc_t(0);
    for (int q = lane; q < PT; q += 32) {
      const int ti = q / TW;
      const int tj = q - ti * TW;
      const int64_t pi = i0 + ti, pj = j0 + tj;
      if (pi >= a.HP || pj >= a.WP) continue;
      const int ai = mh + ti, aj = mw + tj;
      const acc_t* row = S1 + c * PA + ai * WA;
      acc_t ga3 = acc_t(0);
#pragma unroll
      for (int t = 0; t < kTaps; ++t) {
        const int jj = aj - (t - 2);
        ga3 += hwt[t] * ((jj >= 0 && jj < WA) ? row[jj] : acc_t(0));
      }
      sum_s += ga3 * Y3[c * PT + q];
      sum_b += ga3;
      if (a.gy3 != nullptr) a.gy3[(n * a.C + cc) * PP + pi * a.WP + pj] = ga3 * s3;
    }
    sum_s = warp_sum(sum_s);
    sum_b = warp_sum(sum_b);
    if (lane == 0) {
      if (a.gs3 != nullptr) atomicAdd(a.gs3 + cc, sum_s);
      if (a.gb3 != nullptr) atomicAdd(a.gb3 + cc, sum_b);
    }
  }
}

// ---- backward: grad_x = pool^T (W3^T gy3) ---------------------------------------------------------------------
//
// Per image: gp[k][p] = sum_{c < C} W3[c][k] * gy3[c][p] over pooled pixels p; a block computes a 64 (k) x 64 (p)
// tile, each thread 4 x 4 of it, then writes gp / 4 to the 2x2 window of each pooled pixel, and 0 to the row /
// column avgpool floors off (written by the last pooled row / column). Consecutive threads take consecutive pixels
// (NCHW) or consecutive channels (channels_last).
constexpr int kGT = 64;  // output tile side of the GEMM kernels
constexpr int kGC = 16;  // reduction chunk

template <typename scalar_t, typename acc_t>
struct GradXArgs {
  const scalar_t* w;  // [Cv, K] contiguous
  const acc_t* g;     // [N, Cv, P], P = HP * WP
  scalar_t* gx;       // [N, K, H, W], strides sn..sw
  int64_t Cv, K, P, H, W, HP, WP;
  int64_t sn, sc, sh, sw;
  int64_t tiles_p, tiles_k;
  bool cl;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) dfc_grad_x_kernel(const GradXArgs<scalar_t, acc_t> a) {
  __shared__ acc_t As[kGC][kGT];  // W3[c0 + cc][k0 + kk]
  __shared__ acc_t Bs[kGC][kGT];  // gy3[c0 + cc][p0 + pp]
  int64_t bid = blockIdx.x;
  const int64_t ptile = bid % a.tiles_p;
  bid /= a.tiles_p;
  const int64_t ktile = bid % a.tiles_k;
  const int64_t n = bid / a.tiles_k;
  const int64_t p0 = ptile * kGT, k0 = ktile * kGT;
  const int tid = threadIdx.x;
  const int f = tid & 15, s = tid >> 4;
  int kl[4], pl[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    kl[i] = a.cl ? f + 16 * i : s + 16 * i;
    pl[i] = a.cl ? s + 16 * i : f + 16 * i;
  }
  acc_t acc[4][4];  // [pixel i][channel j]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  const acc_t* gn = a.g + n * a.Cv * a.P;
  for (int64_t c0 = 0; c0 < a.Cv; c0 += kGC) {
    __syncthreads();
    for (int e = tid; e < kGC * kGT; e += kThreads) {
      const int cc = e / kGT;
      const int kk = e - cc * kGT;
      const int64_t c = c0 + cc;
      const int64_t kx = k0 + kk;
      const int64_t px = p0 + kk;
      As[cc][kk] = (c < a.Cv && kx < a.K) ? to_acc<acc_t>(a.w[c * a.K + kx]) : acc_t(0);
      Bs[cc][kk] = (c < a.Cv && px < a.P) ? gn[c * a.P + px] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int cc = 0; cc < kGC; ++cc) {
      acc_t av[4], bv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) av[j] = As[cc][kl[j]];
#pragma unroll
      for (int i = 0; i < 4; ++i) bv[i] = Bs[cc][pl[i]];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[j] * bv[i];
    }
  }
  const bool odd_h = (a.H & 1) != 0, odd_w = (a.W & 1) != 0;
  const scalar_t zero = static_cast<scalar_t>(0.0f);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t px = p0 + pl[i];
    if (px >= a.P) continue;
    const int64_t pi = px / a.WP;
    const int64_t pj = px - pi * a.WP;
    const int64_t h = 2 * pi, w = 2 * pj;
    const bool last_r = odd_h && pi == a.HP - 1;
    const bool last_c = odd_w && pj == a.WP - 1;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t kx = k0 + kl[j];
      if (kx >= a.K) continue;
      scalar_t* d = a.gx + n * a.sn + kx * a.sc;
      const scalar_t v = static_cast<scalar_t>(acc[i][j] * acc_t(0.25));
      d[h * a.sh + w * a.sw] = v;
      d[h * a.sh + (w + 1) * a.sw] = v;
      d[(h + 1) * a.sh + w * a.sw] = v;
      d[(h + 1) * a.sh + (w + 1) * a.sw] = v;
      if (last_r) {
        d[(h + 2) * a.sh + w * a.sw] = zero;
        d[(h + 2) * a.sh + (w + 1) * a.sw] = zero;
      }
      if (last_c) {
        d[h * a.sh + (w + 2) * a.sw] = zero;
        d[(h + 1) * a.sh + (w + 2) * a.sw] = zero;
      }
      if (last_r && last_c) d[(h + 2) * a.sh + (w + 2) * a.sw] = zero;
    }
  }
}

// ---- backward: grad_W3 = sum over (n, pooled pixels) of gy3 pool(x)^T (split over the pixels, atomics) ---------

template <typename scalar_t, typename acc_t>
struct GradWArgs {
  const acc_t* g;     // [N, Cv, P]
  const scalar_t* x;  // [N, K, H, W], strides sn..sw
  acc_t* gw;          // [Cv, K], zeroed
  int64_t Cv, K, P, WP, R;  // R = N * P: the flattened reduction index r = n * P + p
  int64_t sn, sc, sh, sw;
  int64_t tiles_c, tiles_k, nsplit, chunk;
  bool cl;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) dfc_grad_w3_kernel(const GradWArgs<scalar_t, acc_t> a) {
  __shared__ acc_t Gs[kGC][kGT + 1];  // gy3 at (r0 + rr, channel c0 + cc)
  __shared__ acc_t Xs[kGC][kGT + 1];  // pooled x at (r0 + rr, input channel k0 + kk)
  int64_t bid = blockIdx.x;
  const int64_t split = bid % a.nsplit;
  bid /= a.nsplit;
  const int64_t ktile = bid % a.tiles_k;
  const int64_t ctile = bid / a.tiles_k;
  const int64_t c0 = ctile * kGT, k0 = ktile * kGT;
  const int64_t rb = split * a.chunk;
  const int64_t re = rb + a.chunk < a.R ? rb + a.chunk : a.R;
  const int tid = threadIdx.x;
  const int f = tid & 15, s = tid >> 4;
  acc_t acc[4][4];  // [input channel f + 16 i][channel s + 16 j]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  for (int64_t r0 = rb; r0 < re; r0 += kGC) {
    __syncthreads();
    for (int e = tid; e < kGC * kGT; e += kThreads) {
      {
        const int rr = e % kGC;
        const int cc = e / kGC;
        const int64_t r = r0 + rr;
        const int64_t c = c0 + cc;
        acc_t v = acc_t(0);
        if (r < re && c < a.Cv) {
          const int64_t nn = r / a.P;
          const int64_t px = r - nn * a.P;
          v = a.g[(nn * a.Cv + c) * a.P + px];
        }
        Gs[rr][cc] = v;
      }
      {
        int rr, kk;
        if (a.cl) {
          kk = e % kGT;
          rr = e / kGT;
        } else {
          rr = e % kGC;
          kk = e / kGC;
        }
        const int64_t r = r0 + rr;
        const int64_t kx = k0 + kk;
        acc_t v = acc_t(0);
        if (r < re && kx < a.K) {
          const int64_t nn = r / a.P;
          const int64_t px = r - nn * a.P;
          const int64_t pi = px / a.WP;
          const int64_t pj = px - pi * a.WP;
          v = pooled_at<acc_t>(a.x + nn * a.sn + kx * a.sc, pi, pj, a.sh, a.sw);
        }
        Xs[rr][kk] = v;
      }
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kGC; ++rr) {
      acc_t gv[4], xv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) gv[j] = Gs[rr][s + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = Xs[rr][f + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += gv[j] * xv[i];
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = c0 + s + 16 * j;
    if (c >= a.Cv) continue;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t kx = k0 + f + 16 * i;
      if (kx < a.K) atomicAdd(a.gw + c * a.K + kx, acc[i][j]);
    }
  }
}

// ---- host helpers ----------------------------------------------------------------------------------------------

// An attribute of the current device (ATen/cuda/CUDAContext.h is not included: it needs cuSPARSE's headers).
int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

struct TileChoice {
  int th = 0, tw = 0;
  size_t smem = 0;
};

// The tile (pooled pixels) minimising (number of tiles) x (region pixels per tile + a fixed per-block cost) whose
// shared memory fits `budget`; th = 0 when none fits. SmemFn(th, tw) -> bytes, WorkFn(th, tw) -> region pixels.
template <typename SmemFn, typename WorkFn>
TileChoice choose_tile(int64_t H, int64_t W, int max_side, size_t budget, SmemFn smem_of, WorkFn work_of) {
  TileChoice best;
  double best_cost = std::numeric_limits<double>::infinity();
  const int hmax = static_cast<int>(std::min<int64_t>(H, max_side));
  const int wmax = static_cast<int>(std::min<int64_t>(W, max_side));
  for (int th = 1; th <= hmax; ++th) {
    for (int tw = 1; tw <= wmax; ++tw) {
      const size_t smem = smem_of(th, tw);
      if (smem > budget) continue;
      const double tiles = double((H + th - 1) / th) * double((W + tw - 1) / tw);
      const double cost = tiles * (double(work_of(th, tw)) + 64.0);
      if (cost < best_cost * (1.0 - 1e-9) ||
          (cost <= best_cost * (1.0 + 1e-9) && (tw > best.tw || (tw == best.tw && th > best.th)))) {
        best_cost = cost;
        best.th = th;
        best.tw = tw;
        best.smem = smem;
      }
    }
  }
  return best;
}

template <typename SmemFn, typename WorkFn>
TileChoice choose_tile_or_fail(const char* op, int64_t H, int64_t W, size_t budget, SmemFn smem_of,
                               WorkFn work_of) {
  TileChoice t = choose_tile(H, W, 64, budget, smem_of, work_of);
  if (t.th == 0) {
    const size_t optin = (size_t)device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin);
    t = choose_tile(H, W, 64, optin, smem_of, work_of);
    TORCH_CHECK(t.th != 0, op, ": no tile fits this GPU's shared memory (a 1x1 tile needs ", smem_of(1, 1),
                " bytes, the device allows ", optin, ")");
  }
  return t;
}

template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSmem)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

unsigned int grid_size(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": the problem needs ", blocks,
              " blocks, more than one launch can take (", std::numeric_limits<int>::max(), ")");
  return static_cast<unsigned int>(blocks);
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Margin of a pooled dimension of `size` cut into tiles of `t`: `tiled` when t < size, else 0 (one tile covers it).
int margin(int t, int64_t size, int tiled) { return t < size ? tiled : 0; }

// ---- argument checks -----------------------------------------------------------------------------------------

struct DfcDims {
  int64_t N, C_in, H, W, C, HP, WP;
  int mode;
};

// `t` dense in x's memory format (channels_last when x is channels_last, else NCHW). Shapes where both formats
// coincide (a 1x1 gate, one channel) pass either way; the kernels index through the strides.
void check_dense_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  const bool cl = is_channels_last(x);
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              op, ": expected ", name, " dense in the input's memory format (", cl ? "channels_last" : "NCHW",
              "), got shape ", t.sizes(), " strides ", t.strides());
}

void check_vector(const at::Tensor& v, const at::Tensor& x, int64_t n, const char* op, const char* name) {
  const at::ScalarType acc = acc_type(x.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, op, ": expected ", name, " of shape [", n, "], got ", v.sizes());
  TORCH_CHECK(v.device() == x.device(), op, ": expected ", name, " on ", x.device(), ", got ", v.device());
  TORCH_CHECK(v.scalar_type() == acc, op, ": expected ", name, " of dtype ", acc, " (the accumulation dtype of ",
              x.scalar_type(), " inputs), got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), op, ": expected ", name, " contiguous, got strides ", v.strides());
}

DfcDims check_dfc_args(const char* op, const at::Tensor& x, const at::Tensor& cw, const at::Tensor& cs,
                       const at::Tensor& cb, const at::Tensor& hw, const at::Tensor& hs, const at::Tensor& hb,
                       const at::Tensor& vw, const at::Tensor& vs, const at::Tensor& vb, c10::string_view mode) {
  TORCH_CHECK(x.is_cuda(), op, ": expected x on a CUDA device, got ", x.device());
  check_layout(x, op, "x");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": expected x of dtype float32, float64, float16 or bfloat16, got ", dt);
  DfcDims d{};
  d.N = x.size(0);
  d.C_in = x.size(1);
  d.H = x.size(2);
  d.W = x.size(3);
  d.HP = d.H / 2;
  d.WP = d.W / 2;
  TORCH_CHECK(cw.dim() == 4 && cw.size(0) >= 1 && cw.size(1) == d.C_in && cw.size(2) == 1 && cw.size(3) == 1, op,
              ": expected conv_weight of shape [C, ", d.C_in, ", 1, 1] with C >= 1, got ", cw.sizes());
  check_tensor(cw, x, dt, op, "conv_weight");
  TORCH_CHECK(cw.is_contiguous(), op, ": expected conv_weight contiguous, got strides ", cw.strides());
  d.C = cw.size(0);
  TORCH_CHECK(hw.dim() == 4 && hw.size(0) == d.C && hw.size(1) == 1 && hw.size(2) == 1 && hw.size(3) == kTaps, op,
              ": expected h_weight of shape [", d.C, ", 1, 1, 5], got ", hw.sizes());
  check_tensor(hw, x, dt, op, "h_weight");
  TORCH_CHECK(hw.is_contiguous(), op, ": expected h_weight contiguous, got strides ", hw.strides());
  TORCH_CHECK(vw.dim() == 4 && vw.size(0) == d.C && vw.size(1) == 1 && vw.size(2) == kTaps && vw.size(3) == 1, op,
              ": expected v_weight of shape [", d.C, ", 1, 5, 1], got ", vw.sizes());
  check_tensor(vw, x, dt, op, "v_weight");
  TORCH_CHECK(vw.is_contiguous(), op, ": expected v_weight contiguous, got strides ", vw.strides());
  check_vector(cs, x, d.C, op, "conv_scale");
  check_vector(cb, x, d.C, op, "conv_bias");
  check_vector(hs, x, d.C, op, "h_scale");
  check_vector(hb, x, d.C, op, "h_bias");
  check_vector(vs, x, d.C, op, "v_scale");
  check_vector(vb, x, d.C, op, "v_bias");
  if (mode == "gate") {
    d.mode = kModeGate;
  } else if (mode == "nearest") {
    d.mode = kModeNearest;
  } else if (mode == "bilinear") {
    d.mode = kModeBilinear;
  } else {
    TORCH_CHECK(false, op, ": expected mode 'gate', 'nearest' or 'bilinear', got '", std::string(mode), "'");
  }
  return d;
}

// ---- forward launch ------------------------------------------------------------------------------------------

template <typename scalar_t>
void run_dfc_forward(const DfcDims& d, const at::Tensor& x, const at::Tensor& cw, const at::Tensor& cs,
                     const at::Tensor& cb, const at::Tensor& hw, const at::Tensor& hs, const at::Tensor& hb,
                     const at::Tensor& vw, const at::Tensor& vs, const at::Tensor& vb, const at::Tensor& out) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int CB = std::is_same<acc_t, double>::value ? 8 : 16;
  const bool bilinear = d.mode == kModeBilinear;
  auto geom = [&](int th, int tw, int& mh, int& mw, int& rh, int& rw) {
    mh = margin(th, d.HP, 2);
    mw = margin(tw, d.WP, 2);
    rh = (mh > 0 && bilinear) ? 1 : 0;
    rw = (mw > 0 && bilinear) ? 1 : 0;
  };
  auto region = [&](int th, int tw) {
    int mh, mw, rh, rw;
    geom(th, tw, mh, mw, rh, rw);
    return std::pair<int, int>(th + rh + 2 * mh, tw + rw + 2 * mw);
  };
  const TileChoice tile = choose_tile_or_fail(
      kFwdOp, d.HP, d.WP, kDefaultSmem,
      [&](int th, int tw) {
        const auto r = region(th, tw);
        return dfc_fwd_smem_bytes<acc_t, CB>(r.first, r.second);
      },
      [&](int th, int tw) {
        const auto r = region(th, tw);
        return int64_t(r.first) * r.second;
      });

  DfcFwdArgs<scalar_t, acc_t> a{};
  a.x = x.data_ptr<scalar_t>();
  a.cw = cw.data_ptr<scalar_t>();
  a.cs = cs.data_ptr<acc_t>();
  a.cb = cb.data_ptr<acc_t>();
  a.hw = hw.data_ptr<scalar_t>();
  a.hs = hs.data_ptr<acc_t>();
  a.hb = hb.data_ptr<acc_t>();
  a.vw = vw.data_ptr<scalar_t>();
  a.vs = vs.data_ptr<acc_t>();
  a.vb = vb.data_ptr<acc_t>();
  a.out = out.data_ptr<scalar_t>();
  a.C_in = d.C_in;
  a.C = d.C;
  a.H = d.H;
  a.W = d.W;
  a.HP = d.HP;
  a.WP = d.WP;
  a.sxn = x.stride(0);
  a.sxc = x.stride(1);
  a.sxh = x.stride(2);
  a.sxw = x.stride(3);
  a.son = out.stride(0);
  a.soc = out.stride(1);
  a.soh = out.stride(2);
  a.sow = out.stride(3);
  a.tiles_h = cdiv(d.HP, tile.th);
  a.tiles_w = cdiv(d.WP, tile.tw);
  a.ncb = cdiv(d.C, CB);
  a.TH = tile.th;
  a.TW = tile.tw;
  geom(tile.th, tile.tw, a.mh, a.mw, a.rh, a.rw);
  a.mode = d.mode;
  a.cl = is_channels_last(x);

  const unsigned int grid = grid_size(kFwdOp, d.N * a.tiles_h * a.tiles_w * a.ncb);
  auto kernel = dfc_forward_kernel<scalar_t, acc_t, CB>;
  set_smem_limit(kernel, tile.smem);
  kernel<<<grid, kThreads, tile.smem, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dfc_kernel_cuda(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& conv_scale,
                     const at::Tensor& conv_bias, const at::Tensor& h_weight, const at::Tensor& h_scale,
                     const at::Tensor& h_bias, const at::Tensor& v_weight, const at::Tensor& v_scale,
                     const at::Tensor& v_bias, c10::string_view mode, const at::Tensor& out) {
  const DfcDims d = check_dfc_args(kFwdOp, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias,
                                   v_weight, v_scale, v_bias, mode);
  const int64_t oh = d.mode == kModeGate ? d.HP : d.H;
  const int64_t ow = d.mode == kModeGate ? d.WP : d.W;
  TORCH_CHECK(out.dim() == 4 && out.size(0) == d.N && out.size(1) == d.C && out.size(2) == oh && out.size(3) == ow,
              kFwdOp, ": expected out of shape [", d.N, ", ", d.C, ", ", oh, ", ", ow, "] for mode '",
              std::string(mode), "', got ", out.sizes());
  check_tensor(out, x, x.scalar_type(), kFwdOp, "out");
  check_dense_like(out, x, kFwdOp, "out");
  if (out.numel() == 0) return;
  TORCH_CHECK(d.H >= 2 && d.W >= 2, kFwdOp, ": the 2x2 average pool needs H and W >= 2, got ", d.H, "x", d.W);

  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfc_forward_cuda", [&] {
    run_dfc_forward<scalar_t>(d, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale,
                              v_bias, out);
  });
}

// ---- backward launch -----------------------------------------------------------------------------------------

// An accumulation-dtype buffer for a reduced gradient: the gradient itself when it already is a contiguous
// acc-dtype tensor (zeroed here), else a zeroed workspace copied into it by finish().
struct AccBuffer {
  at::Tensor grad, acc;
  void init(const at::Tensor& g, at::ScalarType acc_dtype) {
    if (!g.defined() || g.numel() == 0) return;
    grad = g;
    if (g.scalar_type() == acc_dtype && g.is_contiguous()) {
      g.zero_();
      acc = g;
    } else {
      acc = at::zeros(g.sizes(), g.options().dtype(acc_dtype));
    }
  }
  template <typename acc_t>
  acc_t* ptr() const {
    return acc.defined() ? acc.data_ptr<acc_t>() : nullptr;
  }
  void finish() const {
    if (grad.defined() && !acc.is_same(grad)) grad.copy_(acc);
  }
};

bool needed(const at::Tensor& g) { return g.defined() && g.numel() > 0; }

void check_grad(const at::Tensor& g, const at::Tensor& like, at::ScalarType dtype, const char* op, const char* name) {
  if (!needed(g)) return;
  TORCH_CHECK(g.sizes() == like.sizes(), op, ": expected ", name, " of shape ", like.sizes(), ", got ", g.sizes());
  TORCH_CHECK(g.device() == like.device(), op, ": expected ", name, " on ", like.device(), ", got ", g.device());
  TORCH_CHECK(g.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype, ", got ", g.scalar_type());
}

template <typename scalar_t>
void run_dfc_backward(const DfcDims& d, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& cw,
                      const at::Tensor& cs, const at::Tensor& cb, const at::Tensor& hw, const at::Tensor& hs,
                      const at::Tensor& hb, const at::Tensor& vw, const at::Tensor& vs, const at::Tensor& vb,
                      at::TensorList grads) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int CB = 8;
  const at::ScalarType acc_dtype = acc_type(x.scalar_type());
  const bool need_gx = needed(grads[0]);
  const bool need_gw3 = needed(grads[1]);
  AccBuffer gw3, gs3, gb3, ghw, gs4, gb4, gvw, gs5, gb5;
  gw3.init(grads[1], acc_dtype);
  gs3.init(grads[2], acc_dtype);
  gb3.init(grads[3], acc_dtype);
  ghw.init(grads[4], acc_dtype);
  gs4.init(grads[5], acc_dtype);
  gb4.init(grads[6], acc_dtype);
  gvw.init(grads[7], acc_dtype);
  gs5.init(grads[8], acc_dtype);
  gb5.init(grads[9], acc_dtype);

  const int64_t PP = d.HP * d.WP;
  if (d.N > 0 && PP > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor gy3;
    if (need_gx || need_gw3) gy3 = at::empty({d.N, d.C, PP}, x.options().dtype(acc_dtype));  // fully written

    // 1. main kernel
    auto region = [&](int th, int tw) {
      return std::pair<int, int>(th + 2 * margin(th, d.HP, 4), tw + 2 * margin(tw, d.WP, 4));
    };
    const TileChoice tile = choose_tile_or_fail(
        kBwdOp, d.HP, d.WP, 2 * kDefaultSmem,
        [&](int th, int tw) {
          const auto r = region(th, tw);
          return dfc_bwd_smem_bytes<acc_t, CB>(r.first, r.second, th, tw);
        },
        [&](int th, int tw) {
          const auto r = region(th, tw);
          return int64_t(r.first) * r.second;
        });
    DfcBwdArgs<scalar_t, acc_t> a{};
    a.go = grad.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.cw = cw.data_ptr<scalar_t>();
    a.cs = cs.data_ptr<acc_t>();
    a.cb = cb.data_ptr<acc_t>();
    a.hw = hw.data_ptr<scalar_t>();
    a.hs = hs.data_ptr<acc_t>();
    a.hb = hb.data_ptr<acc_t>();
    a.vw = vw.data_ptr<scalar_t>();
    a.vs = vs.data_ptr<acc_t>();
    a.vb = vb.data_ptr<acc_t>();
    a.gs3 = gs3.ptr<acc_t>();
    a.gb3 = gb3.ptr<acc_t>();
    a.ghw = ghw.ptr<acc_t>();
    a.gs4 = gs4.ptr<acc_t>();
    a.gb4 = gb4.ptr<acc_t>();
    a.gvw = gvw.ptr<acc_t>();
    a.gs5 = gs5.ptr<acc_t>();
    a.gb5 = gb5.ptr<acc_t>();
    a.gy3 = gy3.defined() ? gy3.data_ptr<acc_t>() : nullptr;
    a.C_in = d.C_in;
    a.C = d.C;
    a.H = d.H;
    a.W = d.W;
    a.HP = d.HP;
    a.WP = d.WP;
    a.sxn = x.stride(0);
    a.sxc = x.stride(1);
    a.sxh = x.stride(2);
    a.sxw = x.stride(3);
    a.sgn = grad.stride(0);
    a.sgc = grad.stride(1);
    a.sgh = grad.stride(2);
    a.sgw = grad.stride(3);
    a.tiles_h = cdiv(d.HP, tile.th);
    a.tiles_w = cdiv(d.WP, tile.tw);
    a.ncb = cdiv(d.C, CB);
    a.TH = tile.th;
    a.TW = tile.tw;
    a.mh = margin(tile.th, d.HP, 4);
    a.mw = margin(tile.tw, d.WP, 4);
    a.mode = d.mode;
    a.cl = is_channels_last(x);
    const unsigned int grid = grid_size(kBwdOp, d.N * a.tiles_h * a.tiles_w * a.ncb);
    auto kernel = dfc_backward_kernel<scalar_t, acc_t, CB>;
    set_smem_limit(kernel, tile.smem);
    kernel<<<grid, kThreads, tile.smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 2. grad_x = pool^T (W3^T gy3)
    if (need_gx) {
      const at::Tensor& gx = grads[0];
      GradXArgs<scalar_t, acc_t> g{};
      g.w = cw.data_ptr<scalar_t>();
      g.g = gy3.data_ptr<acc_t>();
      g.gx = gx.data_ptr<scalar_t>();
      g.Cv = d.C;
      g.K = d.C_in;
      g.P = PP;
      g.H = d.H;
      g.W = d.W;
      g.HP = d.HP;
      g.WP = d.WP;
      g.sn = gx.stride(0);
      g.sc = gx.stride(1);
      g.sh = gx.stride(2);
      g.sw = gx.stride(3);
      g.tiles_p = cdiv(PP, kGT);
      g.tiles_k = cdiv(d.C_in, kGT);
      g.cl = is_channels_last(gx);
      const unsigned int grid_x = grid_size(kBwdOp, d.N * g.tiles_p * g.tiles_k);
      dfc_grad_x_kernel<scalar_t, acc_t><<<grid_x, kThreads, 0, stream>>>(g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // 3. grad_W3 = sum gy3 pool(x)^T
    if (need_gw3) {
      GradWArgs<scalar_t, acc_t> g{};
      g.g = gy3.data_ptr<acc_t>();
      g.x = x.data_ptr<scalar_t>();
      g.gw = gw3.ptr<acc_t>();
      g.Cv = d.C;
      g.K = d.C_in;
      g.P = PP;
      g.WP = d.WP;
      g.R = d.N * PP;
      g.sn = x.stride(0);
      g.sc = x.stride(1);
      g.sh = x.stride(2);
      g.sw = x.stride(3);
      g.tiles_c = cdiv(d.C, kGT);
      g.tiles_k = cdiv(d.C_in, kGT);
      const int64_t tiles = g.tiles_c * g.tiles_k;
      const int64_t target = 4 * int64_t(device_attribute(cudaDevAttrMultiProcessorCount));
      int64_t nsplit = std::max<int64_t>(1, cdiv(target, tiles));
      nsplit = std::min<int64_t>(nsplit, std::max<int64_t>(1, cdiv(g.R, 256)));
      g.chunk = cdiv(cdiv(g.R, nsplit), kGC) * kGC;
      g.nsplit = cdiv(g.R, g.chunk);
      g.cl = is_channels_last(x);
      const unsigned int grid_w = grid_size(kBwdOp, tiles * g.nsplit);
      dfc_grad_w3_kernel<scalar_t, acc_t><<<grid_w, kThreads, 0, stream>>>(g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  for (const AccBuffer* b : {&gw3, &gs3, &gb3, &ghw, &gs4, &gb4, &gvw, &gs5, &gb5}) b->finish();
}

void dfc_backward_kernel_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& conv_weight,
                              const at::Tensor& conv_scale, const at::Tensor& conv_bias, const at::Tensor& h_weight,
                              const at::Tensor& h_scale, const at::Tensor& h_bias, const at::Tensor& v_weight,
                              const at::Tensor& v_scale, const at::Tensor& v_bias, c10::string_view mode,
                              at::TensorList grads) {
  const DfcDims d = check_dfc_args(kBwdOp, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias,
                                   v_weight, v_scale, v_bias, mode);
  const int64_t gh = d.mode == kModeGate ? d.HP : d.H;
  const int64_t gw = d.mode == kModeGate ? d.WP : d.W;
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == d.N && grad.size(1) == d.C && grad.size(2) == gh &&
                  grad.size(3) == gw,
              kBwdOp, ": expected grad of shape [", d.N, ", ", d.C, ", ", gh, ", ", gw, "] for mode '",
              std::string(mode), "', got ", grad.sizes());
  TORCH_CHECK(grad.device() == x.device(), kBwdOp, ": expected grad on ", x.device(), ", got ", grad.device());
  TORCH_CHECK(grad.scalar_type() == x.scalar_type(), kBwdOp, ": expected grad of dtype ", x.scalar_type(), ", got ",
              grad.scalar_type());
  TORCH_CHECK(grads.size() == 10, kBwdOp,
              ": expected 10 gradient buffers (x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, "
              "v_weight, v_scale, v_bias), got ",
              grads.size());
  const at::ScalarType dt = x.scalar_type();
  const at::ScalarType acc = acc_type(dt);
  if (needed(grads[0])) {
    check_grad(grads[0], x, dt, kBwdOp, "grad_x");
    check_dense_like(grads[0], x, kBwdOp, "grad_x");
  }
  check_grad(grads[1], conv_weight, dt, kBwdOp, "grad_conv_weight");
  check_grad(grads[2], conv_scale, acc, kBwdOp, "grad_conv_scale");
  check_grad(grads[3], conv_bias, acc, kBwdOp, "grad_conv_bias");
  check_grad(grads[4], h_weight, dt, kBwdOp, "grad_h_weight");
  check_grad(grads[5], h_scale, acc, kBwdOp, "grad_h_scale");
  check_grad(grads[6], h_bias, acc, kBwdOp, "grad_h_bias");
  check_grad(grads[7], v_weight, dt, kBwdOp, "grad_v_weight");
  check_grad(grads[8], v_scale, acc, kBwdOp, "grad_v_scale");
  check_grad(grads[9], v_bias, acc, kBwdOp, "grad_v_bias");
  bool any = false;
  for (const at::Tensor& g : grads) any = any || needed(g);
  if (!any) return;
  TORCH_CHECK(d.N == 0 || (d.H >= 2 && d.W >= 2), kBwdOp, ": the 2x2 average pool needs H and W >= 2, got ", d.H,
              "x", d.W);

  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfc_backward_cuda", [&] {
    run_dfc_backward<scalar_t>(d, grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight,
                               v_scale, v_bias, grads);
  });
}

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::dfc_kernel_cuda), ghostfast::DfcKernel>, "dfc_kernel_cuda: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::dfc_backward_kernel_cuda), ghostfast::DfcBackwardKernel>, "dfc_backward_kernel_cuda: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CUDA, m) {
  m.impl("_dfc_kernel", &ghostfast::dfc_kernel_cuda);
  m.impl("_dfc_backward_kernel", &ghostfast::dfc_backward_kernel_cuda);
}
