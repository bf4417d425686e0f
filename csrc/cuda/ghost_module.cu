// Fused Ghost module on CUDA (schema and conventions: ../ghost_module.cpp; the spec: ghostfast/reference.py).
//
//   x1  = act(s1 * (W1 x) + b1)                     init channels (1x1 conv)
//   x2  = act(s2 * dw_k(x1) + b2)                   init*(ratio-1) channels; cheap channel o reads x1 channel o/(ratio-1)
//   out = cat(x1, x2)[:, :out_channels]  (* upsample(gate, (H, W), gate_mode) when a gate is given)
// The depthwise conv zero-pads the activated x1 (padding k//2).
//
// Forward, one launch. A block owns (image n, spatial tile TH x TW, block of CB x1 channels). It computes x1 on the
// tile plus a halo of R = k//2 into shared memory (the 1x1 conv runs over C_in in chunks staged in shared memory,
// register-blocked 8 channels x CB/8 pixels per thread), writes x1 on the tile's pixels, then computes the cheap
// channels of its x1 channels from shared memory; scale/bias, activation and the gate are applied on the way out.
//
// Backward, up to three launches (plus zero-fills of the accumulators and, for fp16/bf16 weights or a gate, a cast):
//   1. main: a block owns (n, tile, CB x1 channels). It recomputes x1 on the tile + 2R halo (shared memory), the
//      cheap pre-activations on tile + R, walks back through the depthwise conv, and writes gy1 = d/d(W1 x) of its
//      tile into an accumulation-dtype workspace [N, n1, H*W]. Per-channel sums (s1, b1, s2, b2), the depthwise
//      weight grads and the gate grad (adjoint of the upsample: a scatter) are reduced per warp and added with
//      atomics into zeroed accumulation-dtype buffers.
//   2. grad_x = W1^T gy1 (a tiled GEMM per image, every element written once, no atomics).
//   3. grad_W1 = sum over (n, pixels) of gy1 x^T (a split-K tiled GEMM, atomics into an accumulation buffer).
// The atomics make the last bits of the parameter and gate gradients depend on the order blocks finish.
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
#include <optional>
#include <string>
#include <type_traits>

#include "common.h"
#include "kernel_signatures.h"
#include "upsample.h"

namespace ghostfast {
namespace {

constexpr const char* kFwdOp = "ghostfast::_ghost_module_kernel (CUDA)";
constexpr const char* kBwdOp = "ghostfast::_ghost_module_backward_kernel (CUDA)";

constexpr int kThreads = 256;              // every kernel here runs 256 threads per block
constexpr int kWarps = kThreads / 32;
constexpr int kPixChunk = 256;             // pixels per pass of the register-blocked 1x1 conv
constexpr size_t kDefaultSmem = 48 * 1024; // dynamic shared memory usable without opting in

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

// F.relu: negative -> 0, NaN passes through.
template <typename acc_t>
__device__ __forceinline__ acc_t relu_keep_nan(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- gate upsample (F.interpolate index math of upsample.h) -------------------------------------------------

template <typename acc_t>
struct GateSrc {
  int64_t h0, h1, w0, w1;
  acc_t lh, lw;  // weights of h1 / w1 (bilinear); 0 for nearest
};

template <typename acc_t>
__device__ __forceinline__ GateSrc<acc_t> gate_source(int64_t h, int64_t w, int64_t H, int64_t W, int64_t Hg,
                                                      int64_t Wg, bool bilinear) {
  GateSrc<acc_t> s;
  if (bilinear) {
    const LinearSource<acc_t> sh = linear_source<acc_t>(h, Hg, H);
    const LinearSource<acc_t> sw = linear_source<acc_t>(w, Wg, W);
    s.h0 = sh.i0;
    s.h1 = sh.i1;
    s.lh = sh.lambda;
    s.w0 = sw.i0;
    s.w1 = sw.i1;
    s.lw = sw.lambda;
  } else {
    s.h0 = s.h1 = nearest_source(h, Hg, H);
    s.w0 = s.w1 = nearest_source(w, Wg, W);
    s.lh = s.lw = acc_t(0);
  }
  return s;
}

// The upsampled gate at one full-resolution pixel; `g` points at the (n, channel) plane [Hg, Wg].
template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t gate_sample(const scalar_t* g, int64_t Wg, const GateSrc<acc_t>& s,
                                             bool bilinear) {
  if (!bilinear) return to_acc<acc_t>(g[s.h0 * Wg + s.w0]);
  const acc_t one = acc_t(1);
  const acc_t v00 = to_acc<acc_t>(g[s.h0 * Wg + s.w0]);
  const acc_t v01 = to_acc<acc_t>(g[s.h0 * Wg + s.w1]);
  const acc_t v10 = to_acc<acc_t>(g[s.h1 * Wg + s.w0]);
  const acc_t v11 = to_acc<acc_t>(g[s.h1 * Wg + s.w1]);
  // the association of ATen's upsample_bilinear2d
  return (one - s.lh) * ((one - s.lw) * v00 + s.lw * v01) + s.lh * ((one - s.lw) * v10 + s.lw * v11);
}

// Adjoint of gate_sample: add `v` (a full-resolution gradient) into the (n, channel) plane of the gate gradient.
// Neighbouring pixels (and tiles) share gate pixels: atomics.
template <typename acc_t>
__device__ __forceinline__ void gate_scatter(acc_t* gg, int64_t Wg, const GateSrc<acc_t>& s, bool bilinear,
                                             acc_t v) {
  if (!bilinear) {
    atomicAdd(gg + s.h0 * Wg + s.w0, v);
    return;
  }
  const acc_t one = acc_t(1);
  atomicAdd(gg + s.h0 * Wg + s.w0, ((one - s.lh) * (one - s.lw)) * v);
  atomicAdd(gg + s.h0 * Wg + s.w1, ((one - s.lh) * s.lw) * v);
  atomicAdd(gg + s.h1 * Wg + s.w0, (s.lh * (one - s.lw)) * v);
  atomicAdd(gg + s.h1 * Wg + s.w1, (s.lh * s.lw) * v);
}

// ---- register-blocked 1x1 conv over a shared-memory region ---------------------------------------------------
//
// out[c][p] = sum_k Wrow(c, k) * X(k, p) for the CB channels of the block and the npix pixels of a region.
// Threads: NCG = CB/8 channel groups of NPT = 256/NCG pixel lanes; a thread accumulates 8 channels x PPT pixels
// (p = chunk + lane + i*NPT). The pixels run in passes of kPixChunk; per pass C_in is staged in chunks of KC
// channels: xs[KC][LDX] (x, converted to acc_t, 0 outside the image) and ws[KC][CB] (weights).
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
// WLoad(c, k) -> acc_t: weight of the block's channel c (< CB) for input channel k (< K), 0 for channels past
// the weight's rows. Epi(p, c, v): the result for region pixel p, channel c; called once per (p, c).
// Syncs inside; the caller syncs after it before reading what Epi wrote.
template <typename acc_t, int CB, typename XLoad, typename WLoad, typename Epi>
__device__ __forceinline__ void conv1x1_region(acc_t* __restrict__ stage, int npix, int64_t K, bool channel_fast,
                                               const XLoad& xload, const WLoad& wload, const Epi& epi) {
  using S = ConvShape<acc_t, CB>;
  acc_t* xs = stage;                 // [KC][LDX]
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

// x[n, k, hb + ai, wb + aj] for region pixel p = ai * WA + aj; 0 outside the image.
template <typename scalar_t, typename acc_t>
struct RegionLoad {
  const scalar_t* xn;  // x + n * sxn
  int64_t sxc, sxh, sxw, H, W, hb, wb;
  int WA;
  __device__ __forceinline__ acc_t operator()(int64_t k, int p) const {
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t h = hb + ai;
    const int64_t w = wb + aj;
    if (h < 0 || h >= H || w < 0 || w >= W) return acc_t(0);
    return to_acc<acc_t>(xn[k * sxc + h * sxh + w * sxw]);
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

// ---- forward -------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct GhostFwdArgs {
  const scalar_t* x;
  const scalar_t* w1;  // [init, C_in]
  const acc_t* s1;
  const acc_t* b1;
  const scalar_t* w2;  // [init*(ratio-1), k*k]
  const acc_t* s2;
  const acc_t* b2;
  const scalar_t* gate;  // [N, OC, Hg, Wg] contiguous, or null
  scalar_t* out;
  int64_t C_in, H, W, init, rm1, OC, n1, Hg, Wg;
  int64_t sxn, sxc, sxh, sxw;
  int64_t son, soc, soh, sow;
  int64_t tiles_h, tiles_w, ncb;
  int k, TH, TW;
  bool relu, bilinear, cl;
};

// x1 on the region (tile + R halo): act(s1 * y + b1), 0 outside the image (the depthwise's zero padding) and for
// channels past init.
template <typename acc_t>
struct FwdEpi {
  acc_t* x1s;  // [CB][PA]
  const acc_t* s1;
  const acc_t* b1;
  int64_t c0, init, H, W, hb, wb;
  int WA, PA;
  bool relu;
  __device__ __forceinline__ void operator()(int p, int c, acc_t v) const {
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t h = hb + ai;
    const int64_t w = wb + aj;
    const int64_t cc = c0 + c;
    acc_t r = acc_t(0);
    if (cc < init && h >= 0 && h < H && w >= 0 && w < W) {
      r = v * s1[cc] + b1[cc];
      if (relu) r = relu_keep_nan(r);
    }
    x1s[c * PA + p] = r;
  }
};

template <typename acc_t, int CB>
size_t ghost_fwd_smem_bytes(int th, int tw, int R) {
  const int64_t pa = int64_t(th + 2 * R) * (tw + 2 * R);
  return size_t(CB * pa + ConvShape<acc_t, CB>::kStageElems) * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads) ghost_forward_kernel(const GhostFwdArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  int64_t bid = blockIdx.x;
  const int64_t cb = bid % a.ncb;
  bid /= a.ncb;
  const int64_t tw = bid % a.tiles_w;
  bid /= a.tiles_w;
  const int64_t th = bid % a.tiles_h;
  const int64_t n = bid / a.tiles_h;

  const int R = a.k / 2;
  const int TH = a.TH, TW = a.TW;
  const int WA = TW + 2 * R;
  const int PA = (TH + 2 * R) * WA;
  const int PT = TH * TW;
  const int64_t h0 = th * TH, w0 = tw * TW;
  const int64_t hb = h0 - R, wb = w0 - R;  // image coordinates of region pixel (0, 0)
  const int64_t c0 = cb * CB;
  acc_t* x1s = smem;             // [CB][PA]
  acc_t* stage = smem + CB * PA;  // conv staging

  conv1x1_region<acc_t, CB>(
      stage, PA, a.C_in, a.cl,
      RegionLoad<scalar_t, acc_t>{a.x + n * a.sxn, a.sxc, a.sxh, a.sxw, a.H, a.W, hb, wb, WA},
      WeightRowLoad<scalar_t, acc_t>{a.w1, c0, a.init, a.C_in},
      FwdEpi<acc_t>{x1s, a.s1, a.b1, c0, a.init, a.H, a.W, hb, wb, WA, PA, a.relu});
  __syncthreads();

  const int64_t gplane = a.Hg * a.Wg;

  // x1 channels that survive the cut, on the tile's pixels.
  for (int e = threadIdx.x; e < CB * PT; e += kThreads) {
    int c, t;
    if (a.cl) {
      c = e % CB;
      t = e / CB;
    } else {
      t = e % PT;
      c = e / PT;
    }
    const int ti = t / TW;
    const int tj = t - ti * TW;
    const int64_t h = h0 + ti, w = w0 + tj, cc = c0 + c;
    if (cc >= a.n1 || h >= a.H || w >= a.W) continue;
    acc_t v = x1s[c * PA + (ti + R) * WA + (tj + R)];
    if (a.gate != nullptr) {
      const GateSrc<acc_t> s = gate_source<acc_t>(h, w, a.H, a.W, a.Hg, a.Wg, a.bilinear);
      v *= gate_sample<acc_t>(a.gate + (n * a.OC + cc) * gplane, a.Wg, s, a.bilinear);
    }
    a.out[n * a.son + cc * a.soc + h * a.soh + w * a.sow] = static_cast<scalar_t>(v);
  }

  // Cheap channels o2 = c*(ratio-1) + j of this block's x1 channels, where they survive the cut.
  if (a.init + c0 * a.rm1 < a.OC) {
    const int64_t NQ = CB * a.rm1;  // q = c_local*(ratio-1) + j: output channel init + c0*(ratio-1) + q
    const int64_t total = NQ * PT;
    const int K2 = a.k * a.k;
    for (int64_t e = threadIdx.x; e < total; e += kThreads) {
      int64_t q;
      int t;
      if (a.cl) {
        q = e % NQ;
        t = static_cast<int>(e / NQ);
      } else {
        t = static_cast<int>(e % PT);
        q = e / PT;
      }
      const int c = static_cast<int>(q / a.rm1);
      const int64_t j = q - c * a.rm1;
      const int ti = t / TW;
      const int tj = t - ti * TW;
      const int64_t h = h0 + ti, w = w0 + tj, cc = c0 + c;
      const int64_t o2 = cc * a.rm1 + j;
      const int64_t oc = a.init + o2;
      if (cc >= a.init || oc >= a.OC || h >= a.H || w >= a.W) continue;
      const scalar_t* wk = a.w2 + o2 * K2;
      const acc_t* xr = x1s + c * PA + ti * WA + tj;  // region pixel (ti + dy, tj + dx) = image (h + dy - R, w + dx - R)
      acc_t y = acc_t(0);
      for (int dy = 0; dy < a.k; ++dy)
        for (int dx = 0; dx < a.k; ++dx) y += to_acc<acc_t>(wk[dy * a.k + dx]) * xr[dy * WA + dx];
      acc_t v = y * a.s2[o2] + a.b2[o2];
      if (a.relu) v = relu_keep_nan(v);
      if (a.gate != nullptr) {
        const GateSrc<acc_t> s = gate_source<acc_t>(h, w, a.H, a.W, a.Hg, a.Wg, a.bilinear);
        v *= gate_sample<acc_t>(a.gate + (n * a.OC + oc) * gplane, a.Wg, s, a.bilinear);
      }
      a.out[n * a.son + oc * a.soc + h * a.soh + w * a.sow] = static_cast<scalar_t>(v);
    }
  }
}

// ---- backward: main kernel -----------------------------------------------------------------------------------
//
// Regions of a block, all in the coordinates of region A (origin at image (h0 - 2R, w0 - 2R)):
//   A = tile + 2R halo:  x1 (activated, 0 outside the image)                  X1[CB][PA]
//   B = tile + R halo:   g2 = d/d(pre2) of the current cheap output j          GP[CB][PB], B(0,0) = A(R, R)
//   T = tile:            y1 = W1 x (before BN1), gx1 = d/d(x1)                 Y1, GX [CB][PT], T(0,0) = A(2R, 2R)
// Only T's pixels contribute to reductions and to gy1, so every image pixel is counted by exactly one block.

template <typename scalar_t, typename acc_t>
struct GhostBwdArgs {
  const scalar_t* go;  // [N, OC, H, W], strides sgn..sgw
  const scalar_t* x;
  const scalar_t* w1;
  const acc_t* s1;
  const acc_t* b1;
  const scalar_t* w2;
  const acc_t* s2;
  const acc_t* b2;
  const scalar_t* gate;
  acc_t* gs1;    // [init] or null
  acc_t* gb1;    // [init] or null
  acc_t* gw2;    // [cheap, k*k] or null
  acc_t* gs2;    // [cheap] or null
  acc_t* gb2;    // [cheap] or null
  acc_t* ggate;  // [N, OC, Hg, Wg] or null
  acc_t* gy1;    // [N, n1, H*W] or null
  int64_t C_in, H, W, init, rm1, OC, n1, Hg, Wg;
  int64_t sxn, sxc, sxh, sxw;
  int64_t sgn, sgc, sgh, sgw;
  int64_t tiles_h, tiles_w, ncb;
  int k, TH, TW;
  bool relu, bilinear, cl;
};

template <typename acc_t>
struct BwdEpi {
  acc_t* X1;  // [CB][PA]
  acc_t* Y1;  // [CB][PT]
  const acc_t* s1;
  const acc_t* b1;
  int64_t c0, n1, H, W, hb, wb;
  int WA, PA, PT, TH, TW, R2;
  bool relu;
  __device__ __forceinline__ void operator()(int p, int c, acc_t v) const {
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t h = hb + ai;
    const int64_t w = wb + aj;
    const int64_t cc = c0 + c;
    acc_t r = acc_t(0);
    if (cc < n1 && h >= 0 && h < H && w >= 0 && w < W) {
      r = v * s1[cc] + b1[cc];
      if (relu) r = relu_keep_nan(r);
    }
    X1[c * PA + p] = r;
    const int ti = ai - R2;
    const int tj = aj - R2;
    if (ti >= 0 && ti < TH && tj >= 0 && tj < TW) Y1[c * PT + ti * TW + tj] = v;
  }
};

template <typename acc_t, int CB>
size_t ghost_bwd_smem_bytes(int th, int tw, int R) {
  const int64_t pa = int64_t(th + 4 * R) * (tw + 4 * R);
  const int64_t pb = int64_t(th + 2 * R) * (tw + 2 * R);
  const int64_t pt = int64_t(th) * tw;
  return size_t(CB * (pa + pb + 2 * pt) + ConvShape<acc_t, CB>::kStageElems) * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads) ghost_backward_kernel(const GhostBwdArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  int64_t bid = blockIdx.x;
  const int64_t cb = bid % a.ncb;
  bid /= a.ncb;
  const int64_t tw = bid % a.tiles_w;
  bid /= a.tiles_w;
  const int64_t th = bid % a.tiles_h;
  const int64_t n = bid / a.tiles_h;

  const int k = a.k;
  const int R = k / 2;
  const int R2 = 2 * R;
  const int TH = a.TH, TW = a.TW;
  const int WA = TW + 2 * R2;
  const int PA = (TH + 2 * R2) * WA;
  const int WB = TW + 2 * R;
  const int PB = (TH + 2 * R) * WB;
  const int PT = TH * TW;
  const int K2 = k * k;
  const int64_t h0 = th * TH, w0 = tw * TW;
  const int64_t c0 = cb * CB;

  acc_t* X1 = smem;             // [CB][PA]
  acc_t* Y1 = X1 + CB * PA;     // [CB][PT]
  acc_t* GP = Y1 + CB * PT;     // [CB][PB]
  acc_t* GX = GP + CB * PB;     // [CB][PT]
  acc_t* stage = GX + CB * PT;  // conv staging

  // ---- 1. recompute y1 = W1 x and x1 on region A
  conv1x1_region<acc_t, CB>(
      stage, PA, a.C_in, a.cl,
      RegionLoad<scalar_t, acc_t>{a.x + n * a.sxn, a.sxc, a.sxh, a.sxw, a.H, a.W, h0 - R2, w0 - R2, WA},
      WeightRowLoad<scalar_t, acc_t>{a.w1, c0, a.init, a.C_in},
      BwdEpi<acc_t>{X1, Y1, a.s1, a.b1, c0, a.n1, a.H, a.W, h0 - R2, w0 - R2, WA, PA, PT, TH, TW, R2, a.relu});
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t gplane = a.Hg * a.Wg;
  const scalar_t* go_n = a.go + n * a.sgn;

  // ---- 2. gradient reaching x1 directly (x1 channels that survive the cut), and their gate gradient.
  // Warp w owns channels w, w + 8, ...; lane l owns tile pixels l, l + 32, ... here and in steps 3d and 4, so every
  // GX element is only ever touched by one thread.
  for (int c = warp; c < CB; c += kWarps) {
    const int64_t cc = c0 + c;
    for (int t = lane; t < PT; t += 32) {
      const int ti = t / TW;
      const int tj = t - ti * TW;
      const int64_t h = h0 + ti, w = w0 + tj;
      acc_t g = acc_t(0);
      if (cc < a.n1 && h < a.H && w < a.W) {
        const acc_t gov = to_acc<acc_t>(go_n[cc * a.sgc + h * a.sgh + w * a.sgw]);
        g = gov;
        if (a.gate != nullptr) {
          const GateSrc<acc_t> s = gate_source<acc_t>(h, w, a.H, a.W, a.Hg, a.Wg, a.bilinear);
          g = gov * gate_sample<acc_t>(a.gate + (n * a.OC + cc) * gplane, a.Wg, s, a.bilinear);
          if (a.ggate != nullptr)
            gate_scatter<acc_t>(a.ggate + (n * a.OC + cc) * gplane, a.Wg, s, a.bilinear,
                                gov * X1[c * PA + (ti + R2) * WA + (tj + R2)]);
        }
      }
      GX[c * PT + t] = g;
    }
  }

  // ---- 3. cheap outputs, one j at a time
  if (a.init + c0 * a.rm1 < a.OC) {  // block-uniform
    for (int64_t j = 0; j < a.rm1; ++j) {
      // 3a. g2 = d/d(pre2) on region B (0 outside the image / for cut channels); s2, b2 sums and the gate
      //     gradient on T.
      for (int c = warp; c < CB; c += kWarps) {
        const int64_t cc = c0 + c;
        const int64_t o2 = cc * a.rm1 + j;
        const int64_t oc = a.init + o2;
        const bool valid = cc < a.n1 && oc < a.OC;  // warp-uniform
        const acc_t s2v = valid ? a.s2[o2] : acc_t(0);
        const acc_t b2v = valid ? a.b2[o2] : acc_t(0);
        const scalar_t* wk = a.w2 + (valid ? o2 : 0) * K2;
        acc_t sum_s = acc_t(0), sum_b = acc_t(0);
        for (int b = lane; b < PB; b += 32) {
          const int bi = b / WB;
          const int bj = b - bi * WB;
          const int64_t h = h0 - R + bi, w = w0 - R + bj;
          acc_t g = acc_t(0);
          if (valid && h >= 0 && h < a.H && w >= 0 && w < a.W) {
            // B(bi, bj) = A(bi + R, bj + R); tap (dy, dx) reads A(bi + dy, bj + dx) = image (h + dy - R, w + dx - R)
            const acc_t* xr = X1 + c * PA + bi * WA + bj;
            acc_t y2 = acc_t(0);
            for (int dy = 0; dy < k; ++dy)
              for (int dx = 0; dx < k; ++dx) y2 += to_acc<acc_t>(wk[dy * k + dx]) * xr[dy * WA + dx];
            const acc_t pre2 = y2 * s2v + b2v;
            const acc_t gov = to_acc<acc_t>(go_n[oc * a.sgc + h * a.sgh + w * a.sgw]);
            g = gov;
            GateSrc<acc_t> s{};
            if (a.gate != nullptr) {
              s = gate_source<acc_t>(h, w, a.H, a.W, a.Hg, a.Wg, a.bilinear);
              g = gov * gate_sample<acc_t>(a.gate + (n * a.OC + oc) * gplane, a.Wg, s, a.bilinear);
            }
            if (a.relu) g = pre2 > acc_t(0) ? g : acc_t(0);  // torch's relu backward: 0 at 0 and at NaN
            const bool own = bi >= R && bi < R + TH && bj >= R && bj < R + TW;
            if (own) {
              sum_s += g * y2;
              sum_b += g;
              if (a.ggate != nullptr) {
                const acc_t x2 = a.relu ? relu_keep_nan(pre2) : pre2;
                gate_scatter<acc_t>(a.ggate + (n * a.OC + oc) * gplane, a.Wg, s, a.bilinear, gov * x2);
              }
            }
          }
          GP[c * PB + b] = g;
        }
        sum_s = warp_sum(sum_s);
        sum_b = warp_sum(sum_b);
        if (valid && lane == 0) {
          if (a.gs2 != nullptr) atomicAdd(a.gs2 + o2, sum_s);
          if (a.gb2 != nullptr) atomicAdd(a.gb2 + o2, sum_b);
        }
      }
      __syncthreads();  // GP complete

      for (int c = warp; c < CB; c += kWarps) {
        const int64_t cc = c0 + c;
        const int64_t o2 = cc * a.rm1 + j;
        const int64_t oc = a.init + o2;
        if (!(cc < a.n1 && oc < a.OC)) continue;  // warp-uniform
        const acc_t s2v = a.s2[o2];
        const scalar_t* wk = a.w2 + o2 * K2;
        // 3c. grad W2[o2][dy][dx] = sum_T gy2(t) * x1(t + (dy - R, dx - R)); gy2 = g2 * s2.
        //     T(ti, tj) = B(ti + R, tj + R); the x1 tap is A(ti + R + dy, tj + R + dx).
        if (a.gw2 != nullptr) {
          for (int tap = 0; tap < K2; ++tap) {
            const int dy = tap / k;
            const int dx = tap - dy * k;
            acc_t sum = acc_t(0);
            for (int t = lane; t < PT; t += 32) {
              const int ti = t / TW;
              const int tj = t - ti * TW;
              sum += (GP[c * PB + (ti + R) * WB + (tj + R)] * s2v) * X1[c * PA + (ti + R + dy) * WA + (tj + R + dx)];
            }
            sum = warp_sum(sum);
            if (lane == 0) atomicAdd(a.gw2 + o2 * K2 + tap, sum);
          }
        }
        // 3d. transposed depthwise: gx1(t) += sum_taps gy2(t - (dy - R, dx - R)) * W2[dy][dx];
        //     the gy2 read is B(ti + 2R - dy, tj + 2R - dx), inside B for every tap.
        for (int t = lane; t < PT; t += 32) {
          const int ti = t / TW;
          const int tj = t - ti * TW;
          if (h0 + ti >= a.H || w0 + tj >= a.W) continue;
          const acc_t* gr = GP + c * PB + (ti + R2) * WB + (tj + R2);
          acc_t s = acc_t(0);
          for (int dy = 0; dy < k; ++dy)
            for (int dx = 0; dx < k; ++dx) s += (gr[-(dy * WB + dx)] * s2v) * to_acc<acc_t>(wk[dy * k + dx]);
          GX[c * PT + t] += s;
        }
      }
      __syncthreads();  // the next j rewrites GP
    }
  }

  // ---- 4. g1 = gx1 * act'(pre1) on T: s1, b1 sums and gy1 = g1 * s1 for grad_x / grad_W1.
  const int64_t HW = a.H * a.W;
  for (int c = warp; c < CB; c += kWarps) {
    const int64_t cc = c0 + c;
    if (cc >= a.n1) continue;  // warp-uniform
    const acc_t s1v = a.s1[cc];
    const acc_t b1v = a.b1[cc];
    acc_t sum_s = acc_t(0), sum_b = acc_t(0);
    for (int t = lane; t < PT; t += 32) {
      const int ti = t / TW;
      const int tj = t - ti * TW;
      const int64_t h = h0 + ti, w = w0 + tj;
      if (h >= a.H || w >= a.W) continue;
      const acc_t y1 = Y1[c * PT + t];
      acc_t g = GX[c * PT + t];
      if (a.relu) g = (y1 * s1v + b1v) > acc_t(0) ? g : acc_t(0);
      sum_s += g * y1;
      sum_b += g;
      if (a.gy1 != nullptr) a.gy1[(n * a.n1 + cc) * HW + h * a.W + w] = g * s1v;
    }
    sum_s = warp_sum(sum_s);
    sum_b = warp_sum(sum_b);
    if (lane == 0) {
      if (a.gs1 != nullptr) atomicAdd(a.gs1 + cc, sum_s);
      if (a.gb1 != nullptr) atomicAdd(a.gb1 + cc, sum_b);
    }
  }
}

// ---- backward: grad_x = W1^T gy1 ------------------------------------------------------------------------------
//
// Per image: out[k][p] = sum_{c < n1} W1[c][k] * gy1[c][p]. A block computes a 64 (k) x 64 (pixel) tile; each
// thread 4 x 4 of it. Consecutive threads take consecutive pixels (NCHW) or consecutive channels (channels_last),
// so the stores coalesce in either layout.
constexpr int kGT = 64;  // output tile side of the GEMM kernels
constexpr int kGC = 16;  // reduction chunk

template <typename scalar_t, typename acc_t>
struct GradXArgs {
  const scalar_t* w;  // [rows >= Cv, K] contiguous
  const acc_t* g;     // [N, Cv, P]
  scalar_t* gx;       // [N, K, H, W], strides sn..sw
  int64_t Cv, K, P, W;
  int64_t sn, sc, sh, sw;
  int64_t tiles_p, tiles_k;
  bool cl;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ghost_grad_x_kernel(const GradXArgs<scalar_t, acc_t> a) {
  __shared__ acc_t As[kGC][kGT];  // W1[c0 + cc][k0 + kk]
  __shared__ acc_t Bs[kGC][kGT];  // gy1[c0 + cc][p0 + pp]
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
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t px = p0 + pl[i];
    if (px >= a.P) continue;
    const int64_t h = px / a.W;
    const int64_t w = px - h * a.W;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t kx = k0 + kl[j];
      if (kx < a.K) a.gx[n * a.sn + kx * a.sc + h * a.sh + w * a.sw] = static_cast<scalar_t>(acc[i][j]);
    }
  }
}

// ---- backward: grad_W1 = sum over (n, pixels) of gy1 x^T (split over the pixels, atomics) ---------------------

template <typename scalar_t, typename acc_t>
struct GradWArgs {
  const acc_t* g;     // [N, Cv, P]
  const scalar_t* x;  // [N, K, H, W], strides sn..sw
  acc_t* gw;          // [rows >= Cv, K], zeroed
  int64_t Cv, K, P, W, R;  // R = N * P: the flattened reduction index r = n * P + p
  int64_t sn, sc, sh, sw;
  int64_t tiles_c, tiles_k, nsplit, chunk;
  bool cl;
};

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) ghost_grad_w1_kernel(const GradWArgs<scalar_t, acc_t> a) {
  __shared__ acc_t Gs[kGC][kGT + 1];  // gy1 at (r0 + rr, channel c0 + cc)
  __shared__ acc_t Xs[kGC][kGT + 1];  // x at (r0 + rr, input channel k0 + kk)
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
          const int64_t h = px / a.W;
          const int64_t w = px - h * a.W;
          v = to_acc<acc_t>(a.x[nn * a.sn + kx * a.sc + h * a.sh + w * a.sw]);
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

// The tile minimising (number of tiles) x (region pixels per tile + a fixed per-block cost) whose shared memory
// fits `budget`; th = 0 when none fits. SmemFn(th, tw) -> bytes, WorkFn(th, tw) -> region pixels.
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
    TORCH_CHECK(t.th != 0, op, ": the depthwise kernel is too large for this GPU's shared memory (needs ",
                smem_of(1, 1), " bytes for a 1x1 tile, the device allows ", optin, ")");
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

// ---- argument checks -----------------------------------------------------------------------------------------

struct GhostDims {
  int64_t N, C_in, H, W, init, cheap, k, rm1, OC, n1, Hg, Wg;
  bool has_gate, bilinear;
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

GhostDims check_ghost_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1,
                           const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2, const at::Tensor& b2,
                           int64_t out_channels, const std::optional<at::Tensor>& gate, c10::string_view gate_mode) {
  TORCH_CHECK(x.is_cuda(), op, ": expected x on a CUDA device, got ", x.device());
  check_layout(x, op, "x");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": expected x of dtype float32, float64, float16 or bfloat16, got ", dt);
  GhostDims d{};
  d.N = x.size(0);
  d.C_in = x.size(1);
  d.H = x.size(2);
  d.W = x.size(3);
  TORCH_CHECK(w1.dim() == 4 && w1.size(0) >= 1 && w1.size(1) == d.C_in && w1.size(2) == 1 && w1.size(3) == 1, op,
              ": expected primary_weight of shape [init, ", d.C_in, ", 1, 1] with init >= 1, got ", w1.sizes());
  check_tensor(w1, x, dt, op, "primary_weight");
  TORCH_CHECK(w1.is_contiguous(), op, ": expected primary_weight contiguous, got strides ", w1.strides());
  d.init = w1.size(0);
  TORCH_CHECK(w2.dim() == 4 && w2.size(1) == 1 && w2.size(2) == w2.size(3) && w2.size(2) % 2 == 1 &&
                  w2.size(0) >= d.init && w2.size(0) % d.init == 0,
              op, ": expected cheap_weight of shape [init*(ratio-1), 1, k, k] with init = ", d.init,
              ", ratio >= 2 and an odd k, got ", w2.sizes());
  check_tensor(w2, x, dt, op, "cheap_weight");
  TORCH_CHECK(w2.is_contiguous(), op, ": expected cheap_weight contiguous, got strides ", w2.strides());
  d.cheap = w2.size(0);
  d.k = w2.size(2);
  d.rm1 = d.cheap / d.init;
  check_vector(s1, x, d.init, op, "primary_scale");
  check_vector(b1, x, d.init, op, "primary_bias");
  check_vector(s2, x, d.cheap, op, "cheap_scale");
  check_vector(b2, x, d.cheap, op, "cheap_bias");
  TORCH_CHECK(out_channels >= 1 && out_channels <= d.init + d.cheap, op, ": expected out_channels in [1, ",
              d.init + d.cheap, "], got ", out_channels);
  d.OC = out_channels;
  d.n1 = std::min(d.init, d.OC);
  d.has_gate = gate.has_value() && gate->defined();
  d.bilinear = false;
  d.Hg = d.Wg = 0;
  if (d.has_gate) {
    const at::Tensor& g = *gate;
    TORCH_CHECK(g.dim() == 4 && g.size(0) == d.N && g.size(1) == d.OC, op, ": expected gate of shape [", d.N, ", ",
                d.OC, ", Hg, Wg], got ", g.sizes());
    TORCH_CHECK(g.numel() > 0 || d.N * d.H * d.W == 0, op, ": expected a gate with Hg, Wg >= 1, got ", g.sizes());
    check_tensor(g, x, dt, op, "gate");
    TORCH_CHECK(g.is_contiguous(), op, ": expected gate contiguous (NCHW), got strides ", g.strides());
    d.Hg = g.size(2);
    d.Wg = g.size(3);
    TORCH_CHECK(gate_mode == "nearest" || gate_mode == "bilinear", op,
                ": expected gate_mode 'nearest' or 'bilinear', got '", std::string(gate_mode), "'");
    d.bilinear = gate_mode == "bilinear";
  }
  return d;
}

// ---- forward launch ------------------------------------------------------------------------------------------

template <typename scalar_t, int CB>
void run_ghost_forward(const GhostDims& d, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1,
                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2, const at::Tensor& b2,
                       const std::optional<at::Tensor>& gate, bool relu, const at::Tensor& out) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int R = static_cast<int>(d.k / 2);
  const TileChoice tile = choose_tile_or_fail(
      kFwdOp, d.H, d.W, kDefaultSmem, [&](int th, int tw) { return ghost_fwd_smem_bytes<acc_t, CB>(th, tw, R); },
      [&](int th, int tw) { return int64_t(th + 2 * R) * (tw + 2 * R); });

  GhostFwdArgs<scalar_t, acc_t> a{};
  a.x = x.data_ptr<scalar_t>();
  a.w1 = w1.data_ptr<scalar_t>();
  a.s1 = s1.data_ptr<acc_t>();
  a.b1 = b1.data_ptr<acc_t>();
  a.w2 = w2.data_ptr<scalar_t>();
  a.s2 = s2.data_ptr<acc_t>();
  a.b2 = b2.data_ptr<acc_t>();
  a.gate = d.has_gate ? gate->data_ptr<scalar_t>() : nullptr;
  a.out = out.data_ptr<scalar_t>();
  a.C_in = d.C_in;
  a.H = d.H;
  a.W = d.W;
  a.init = d.init;
  a.rm1 = d.rm1;
  a.OC = d.OC;
  a.n1 = d.n1;
  a.Hg = d.Hg;
  a.Wg = d.Wg;
  a.sxn = x.stride(0);
  a.sxc = x.stride(1);
  a.sxh = x.stride(2);
  a.sxw = x.stride(3);
  a.son = out.stride(0);
  a.soc = out.stride(1);
  a.soh = out.stride(2);
  a.sow = out.stride(3);
  a.tiles_h = cdiv(d.H, tile.th);
  a.tiles_w = cdiv(d.W, tile.tw);
  a.ncb = cdiv(d.n1, CB);
  a.k = static_cast<int>(d.k);
  a.TH = tile.th;
  a.TW = tile.tw;
  a.relu = relu;
  a.bilinear = d.bilinear;
  a.cl = is_channels_last(x);

  const unsigned int grid = grid_size(kFwdOp, d.N * a.tiles_h * a.tiles_w * a.ncb);
  auto kernel = ghost_forward_kernel<scalar_t, acc_t, CB>;
  set_smem_limit(kernel, tile.smem);
  kernel<<<grid, kThreads, tile.smem, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ghost_module_kernel_cuda(const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& primary_scale,
                              const at::Tensor& primary_bias, const at::Tensor& cheap_weight,
                              const at::Tensor& cheap_scale, const at::Tensor& cheap_bias, int64_t out_channels,
                              bool relu, const std::optional<at::Tensor>& gate, c10::string_view gate_mode,
                              const at::Tensor& out) {
  const GhostDims d = check_ghost_args(kFwdOp, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                                       cheap_scale, cheap_bias, out_channels, gate, gate_mode);
  TORCH_CHECK(out.dim() == 4 && out.size(0) == d.N && out.size(1) == d.OC && out.size(2) == d.H &&
                  out.size(3) == d.W,
              kFwdOp, ": expected out of shape [", d.N, ", ", d.OC, ", ", d.H, ", ", d.W, "], got ", out.sizes());
  check_tensor(out, x, x.scalar_type(), kFwdOp, "out");
  check_dense_like(out, x, kFwdOp, "out");
  if (d.N == 0 || d.H == 0 || d.W == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_forward_cuda", [&] {
    constexpr int kWide = std::is_same<scalar_t, double>::value ? 16 : 32;
    if (d.n1 <= 8)
      run_ghost_forward<scalar_t, 8>(d, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                                     cheap_bias, gate, relu, out);
    else
      run_ghost_forward<scalar_t, kWide>(d, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                                         cheap_scale, cheap_bias, gate, relu, out);
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
void run_ghost_backward(const GhostDims& d, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                        const at::Tensor& s1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2,
                        const at::Tensor& b2, const std::optional<at::Tensor>& gate, bool relu, at::TensorList grads) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int CB = 8;
  const at::ScalarType acc_dtype = acc_type(x.scalar_type());
  const bool need_gx = needed(grads[0]);
  const bool need_gw1 = needed(grads[1]);
  AccBuffer gw1, gs1, gb1, gw2, gs2, gb2, ggate;
  gw1.init(grads[1], acc_dtype);
  gs1.init(grads[2], acc_dtype);
  gb1.init(grads[3], acc_dtype);
  gw2.init(grads[4], acc_dtype);
  gs2.init(grads[5], acc_dtype);
  gb2.init(grads[6], acc_dtype);
  if (d.has_gate) ggate.init(grads[7], acc_dtype);

  const int64_t HW = d.H * d.W;
  if (d.N * HW > 0) {
    const auto stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor gy1;
    if (need_gx || need_gw1) gy1 = at::empty({d.N, d.n1, HW}, x.options().dtype(acc_dtype));  // fully written

    // 1. main kernel
    const int R = static_cast<int>(d.k / 2);
    const TileChoice tile = choose_tile_or_fail(
        kBwdOp, d.H, d.W, 2 * kDefaultSmem,
        [&](int th, int tw) { return ghost_bwd_smem_bytes<acc_t, CB>(th, tw, R); },
        [&](int th, int tw) { return int64_t(th + 4 * R) * (tw + 4 * R); });
    GhostBwdArgs<scalar_t, acc_t> a{};
    a.go = grad_out.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.w1 = w1.data_ptr<scalar_t>();
    a.s1 = s1.data_ptr<acc_t>();
    a.b1 = b1.data_ptr<acc_t>();
    a.w2 = w2.data_ptr<scalar_t>();
    a.s2 = s2.data_ptr<acc_t>();
    a.b2 = b2.data_ptr<acc_t>();
    a.gate = d.has_gate ? gate->data_ptr<scalar_t>() : nullptr;
    a.gs1 = gs1.ptr<acc_t>();
    a.gb1 = gb1.ptr<acc_t>();
    a.gw2 = gw2.ptr<acc_t>();
    a.gs2 = gs2.ptr<acc_t>();
    a.gb2 = gb2.ptr<acc_t>();
    a.ggate = ggate.ptr<acc_t>();
    a.gy1 = gy1.defined() ? gy1.data_ptr<acc_t>() : nullptr;
    a.C_in = d.C_in;
    a.H = d.H;
    a.W = d.W;
    a.init = d.init;
    a.rm1 = d.rm1;
    a.OC = d.OC;
    a.n1 = d.n1;
    a.Hg = d.Hg;
    a.Wg = d.Wg;
    a.sxn = x.stride(0);
    a.sxc = x.stride(1);
    a.sxh = x.stride(2);
    a.sxw = x.stride(3);
    a.sgn = grad_out.stride(0);
    a.sgc = grad_out.stride(1);
    a.sgh = grad_out.stride(2);
    a.sgw = grad_out.stride(3);
    a.tiles_h = cdiv(d.H, tile.th);
    a.tiles_w = cdiv(d.W, tile.tw);
    a.ncb = cdiv(d.n1, CB);
    a.k = static_cast<int>(d.k);
    a.TH = tile.th;
    a.TW = tile.tw;
    a.relu = relu;
    a.bilinear = d.bilinear;
    a.cl = is_channels_last(x);
    const unsigned int grid = grid_size(kBwdOp, d.N * a.tiles_h * a.tiles_w * a.ncb);
    auto kernel = ghost_backward_kernel<scalar_t, acc_t, CB>;
    set_smem_limit(kernel, tile.smem);
    kernel<<<grid, kThreads, tile.smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 2. grad_x = W1^T gy1
    if (need_gx) {
      const at::Tensor& gx = grads[0];
      GradXArgs<scalar_t, acc_t> g{};
      g.w = w1.data_ptr<scalar_t>();
      g.g = gy1.data_ptr<acc_t>();
      g.gx = gx.data_ptr<scalar_t>();
      g.Cv = d.n1;
      g.K = d.C_in;
      g.P = HW;
      g.W = d.W;
      g.sn = gx.stride(0);
      g.sc = gx.stride(1);
      g.sh = gx.stride(2);
      g.sw = gx.stride(3);
      g.tiles_p = cdiv(HW, kGT);
      g.tiles_k = cdiv(d.C_in, kGT);
      g.cl = is_channels_last(gx);
      const unsigned int grid_x = grid_size(kBwdOp, d.N * g.tiles_p * g.tiles_k);
      ghost_grad_x_kernel<scalar_t, acc_t><<<grid_x, kThreads, 0, stream>>>(g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }

    // 3. grad_W1 = sum gy1 x^T
    if (need_gw1) {
      GradWArgs<scalar_t, acc_t> g{};
      g.g = gy1.data_ptr<acc_t>();
      g.x = x.data_ptr<scalar_t>();
      g.gw = gw1.ptr<acc_t>();
      g.Cv = d.n1;
      g.K = d.C_in;
      g.P = HW;
      g.W = d.W;
      g.R = d.N * HW;
      g.sn = x.stride(0);
      g.sc = x.stride(1);
      g.sh = x.stride(2);
      g.sw = x.stride(3);
      g.tiles_c = cdiv(d.n1, kGT);
      g.tiles_k = cdiv(d.C_in, kGT);
      const int64_t tiles = g.tiles_c * g.tiles_k;
      const int64_t target = 4 * int64_t(device_attribute(cudaDevAttrMultiProcessorCount));
      int64_t nsplit = std::max<int64_t>(1, cdiv(target, tiles));
      nsplit = std::min<int64_t>(nsplit, std::max<int64_t>(1, cdiv(g.R, 256)));
      g.chunk = cdiv(cdiv(g.R, nsplit), kGC) * kGC;
      g.nsplit = cdiv(g.R, g.chunk);
      g.cl = is_channels_last(x);
      const unsigned int grid_w = grid_size(kBwdOp, tiles * g.nsplit);
      ghost_grad_w1_kernel<scalar_t, acc_t><<<grid_w, kThreads, 0, stream>>>(g);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  }

  for (const AccBuffer* b : {&gw1, &gs1, &gb1, &gw2, &gs2, &gb2, &ggate}) b->finish();
}

void ghost_module_backward_kernel_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& primary_weight, const at::Tensor& primary_scale,
                                       const at::Tensor& primary_bias, const at::Tensor& cheap_weight,
                                       const at::Tensor& cheap_scale, const at::Tensor& cheap_bias,
                                       int64_t out_channels, bool relu, const std::optional<at::Tensor>& gate,
                                       c10::string_view gate_mode, at::TensorList grads) {
  const GhostDims d = check_ghost_args(kBwdOp, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                                       cheap_scale, cheap_bias, out_channels, gate, gate_mode);
  TORCH_CHECK(grad_out.dim() == 4 && grad_out.size(0) == d.N && grad_out.size(1) == d.OC &&
                  grad_out.size(2) == d.H && grad_out.size(3) == d.W,
              kBwdOp, ": expected grad_out of shape [", d.N, ", ", d.OC, ", ", d.H, ", ", d.W, "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.device() == x.device(), kBwdOp, ": expected grad_out on ", x.device(), ", got ",
              grad_out.device());
  TORCH_CHECK(grad_out.scalar_type() == x.scalar_type(), kBwdOp, ": expected grad_out of dtype ", x.scalar_type(),
              ", got ", grad_out.scalar_type());
  TORCH_CHECK(grads.size() == 8, kBwdOp,
              ": expected 8 gradient buffers (x, primary_weight, primary_scale, primary_bias, cheap_weight, "
              "cheap_scale, cheap_bias, gate), got ",
              grads.size());
  const at::ScalarType dt = x.scalar_type();
  const at::ScalarType acc = acc_type(dt);
  if (needed(grads[0])) {
    check_grad(grads[0], x, dt, kBwdOp, "grad_x");
    check_dense_like(grads[0], x, kBwdOp, "grad_x");
  }
  check_grad(grads[1], primary_weight, dt, kBwdOp, "grad_primary_weight");
  check_grad(grads[2], primary_scale, acc, kBwdOp, "grad_primary_scale");
  check_grad(grads[3], primary_bias, acc, kBwdOp, "grad_primary_bias");
  check_grad(grads[4], cheap_weight, dt, kBwdOp, "grad_cheap_weight");
  check_grad(grads[5], cheap_scale, acc, kBwdOp, "grad_cheap_scale");
  check_grad(grads[6], cheap_bias, acc, kBwdOp, "grad_cheap_bias");
  if (d.has_gate) {
    check_grad(grads[7], *gate, dt, kBwdOp, "grad_gate");
  } else {
    TORCH_CHECK(!needed(grads[7]), kBwdOp, ": got a grad_gate buffer of shape ", grads[7].sizes(),
                " but no gate; expected an empty tensor");
  }
  bool any = false;
  for (const at::Tensor& g : grads) any = any || needed(g);
  if (!any) return;

  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_backward_cuda", [&] {
    run_ghost_backward<scalar_t>(d, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                                 cheap_scale, cheap_bias, gate, relu, grads);
  });
}

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::ghost_module_kernel_cuda), ghostfast::GhostModuleKernel>, "ghost_module_kernel_cuda: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::ghost_module_backward_kernel_cuda), ghostfast::GhostModuleBackwardKernel>, "ghost_module_backward_kernel_cuda: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CUDA, m) {
  m.impl("_ghost_module_kernel", &ghostfast::ghost_module_kernel_cuda);
  m.impl("_ghost_module_backward_kernel", &ghostfast::ghost_module_backward_kernel_cuda);
}
