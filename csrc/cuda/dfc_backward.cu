// Fused DFC attention backward on CUDA: the gradient of the gate (pooled or full resolution, any strides) and x (NCHW
// or channels_last) -> the gradients of x (x's layout), of the three weights and of the folded bn3 / bn4 / bn5
// vectors (accumulation dtype) (the math: dfc.cuh).
//
// Up to three launches (plus zero-fills of the accumulators and, for fp16/bf16 weights, a cast):
//   1. main: a block owns (n, tile, CB channels) with a margin of 4 pooled rows / columns: it recomputes a3, a4, z
//      and g, gathers the gradient of g (for the upsampled modes: the adjoint of the upsample, by testing which
//      full-resolution pixels read each pooled pixel with the forward's own index math), and walks back through
//      the sigmoid, bn5, the 5x1 conv, bn4, the 1x5 conv and bn3. Per-channel sums and the 1x5 / 5x1 weight grads
//      are reduced per warp over the tile's own pixels and added with atomics into zeroed accumulation buffers;
//      gy3 = d/d(W3 pool(x)) of the tile goes to a workspace [N, C, HP*WP].
//   2. grad_x = pool^T (W3^T gy3): a tiled GEMM per image (gemm.cuh); each pooled pixel's value / 4 goes to its 2x2
//      window, the row / column the pool floors off (odd H / W) gets 0. Every element written once, no atomics.
//   3. grad_W3 = sum over (n, pooled pixels) of gy3 pool(x)^T: a split-K tiled GEMM, atomics.
// The atomics make the last bits of the parameter gradients depend on the order blocks finish.
//
// Accumulation: float for float / half / bfloat16, double for double. All global offsets are int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>

#include "common.h"
#include "cuda/common.cuh"
#include "cuda/dfc.cuh"
#include "cuda/gemm.cuh"
#include "cuda/upsample.cuh"
#include "kernel_signatures.h"

namespace ghostfast {
namespace {

constexpr const char* kOp = "ghostfast::_dfc_backward_kernel (CUDA)";

// ---- main kernel -----------------------------------------------------------------------------------------------
//
// Region as in the forward with m = 4 on tiled dimensions (no ring): a3 is exact on the region, a4 on columns
// [m/2, WA - m/2), z, g and gy5 on rows [m/2, HA - m/2) of those (computed only there, 0 elsewhere), ga4 / gy4 on
// rows [m, HA - m) (the tile's rows) and columns [m/2, WA - m/2) (computed only there), ga3 on the tile. Reductions
// and gy3 use the tile's pixels only, so every pooled pixel is counted by exactly one block.
// Shared memory: S0 = a3, S1 = a4 then gy4, S2 = gy5 ([CB][PA] each), Y3 = y3 on the tile ([CB][PT]).
// Channel passes: warp w owns channels w, w + 8, ...; its lanes walk the pixels, then the warp reduces its sums.

template <typename scalar_t, typename acc_t>
struct DfcBackwardArgs {
  const scalar_t* grad;  // the incoming gradient: [N, C, HP, WP] ('gate') or [N, C, H, W]; strides sgn..sgw
  const scalar_t* x;
  const scalar_t* conv_weight;
  const acc_t* conv_scale;
  const acc_t* conv_bias;
  const scalar_t* h_weight;
  const acc_t* h_scale;
  const acc_t* h_bias;
  const scalar_t* v_weight;
  const acc_t* v_scale;
  const acc_t* v_bias;
  acc_t* grad_conv_scale;  // [C] or null, and so on
  acc_t* grad_conv_bias;
  acc_t* grad_h_weight;  // [C, 5]
  acc_t* grad_h_scale;
  acc_t* grad_h_bias;
  acc_t* grad_v_weight;  // [C, 5]
  acc_t* grad_v_scale;
  acc_t* grad_v_bias;
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
size_t dfc_backward_smem_bytes(int ha, int wa, int th, int tw) {
  return size_t(CB * (3 * int64_t(ha) * wa + int64_t(th) * tw) + ConvShape<acc_t, CB>::kStageElems) *
         sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads) dfc_backward_kernel(const DfcBackwardArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const BlockTile blk = block_tile(a.tiles_h, a.tiles_w, a.ncb);
  const int64_t n = blk.n;

  const int TH = a.TH, TW = a.TW, mh = a.mh, mw = a.mw;
  const int HA = TH + 2 * mh;
  const int WA = TW + 2 * mw;
  const int PA = HA * WA;
  const int PT = TH * TW;
  const int64_t i0 = blk.th * TH, j0 = blk.tw * TW;
  const int64_t pb_h = i0 - mh, pb_w = j0 - mw;
  const int64_t c0 = blk.cb * CB;
  acc_t* S0 = smem;             // a3
  acc_t* S1 = S0 + CB * PA;     // a4, then gy4
  acc_t* S2 = S1 + CB * PA;     // gy5
  acc_t* Y3 = S2 + CB * PA;     // y3 on the tile [CB][PT]
  acc_t* stage = Y3 + CB * PT;  // conv staging

  // ---- 1. a3 on the region, y3 on the tile
  conv1x1_region<acc_t, CB>(
      stage, PA, a.C_in, a.cl,
      PooledRegionLoad<scalar_t, acc_t>{a.x + n * a.sxn, a.sxc, a.sxh, a.sxw, a.HP, a.WP, pb_h, pb_w, WA},
      WeightRowLoad<scalar_t, acc_t>{a.conv_weight, c0, a.C, a.C_in},
      A3Epi<acc_t>{S0, Y3, a.conv_scale + c0, a.conv_bias + c0, c0, a.C, a.HP, a.WP, pb_h, pb_w, WA, PA, PT,
                   TH, TW, mh, mw});
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
        s += to_acc<acc_t>(a.h_weight[cc * kTaps + t]) * ((jj >= 0 && jj < WA) ? row[jj] : acc_t(0));
      }
      r = s * a.h_scale[cc] + a.h_bias[cc];
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
  //         bn5 sums on the tile.
  for (int c = warp; c < CB; c += kWarps) {
    const int64_t cc = c0 + c;
    if (cc >= a.C) continue;  // warp-uniform; S2 of this channel is then never read
    acc_t vwt[kTaps];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) vwt[t] = to_acc<acc_t>(a.v_weight[cc * kTaps + t]);
    const acc_t s5 = a.v_scale[cc], b5 = a.v_bias[cc];
    const scalar_t* gplane = a.grad + n * a.sgn + cc * a.sgc;
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
      if (a.grad_v_scale != nullptr) atomicAdd(a.grad_v_scale + cc, sum_s);
      if (a.grad_v_bias != nullptr) atomicAdd(a.grad_v_bias + cc, sum_b);
    }
  }
  __syncthreads();

  // ---- 4a. grad v_weight[t] = sum_tile gy5(i, j) * a4(i + t - 2, j)
  if (a.grad_v_weight != nullptr) {
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
        if (lane == 0) atomicAdd(a.grad_v_weight + cc * kTaps + t, sum);
      }
    }
  }
  __syncthreads();  // a4 is dead: S1 takes gy4

  // ---- 4b. ga4 = transposed 5x1 conv of gy5 on rows [mh, HA - mh) x columns [qw, WA - qw); gy4 = ga4 * s4 -> S1
  //          (0 elsewhere); bn4 sums on the tile (y4 recomputed from a3).
  for (int c = warp; c < CB; c += kWarps) {
    const int64_t cc = c0 + c;
    if (cc >= a.C) continue;
    acc_t vwt[kTaps], hwt[kTaps];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) {
      vwt[t] = to_acc<acc_t>(a.v_weight[cc * kTaps + t]);
      hwt[t] = to_acc<acc_t>(a.h_weight[cc * kTaps + t]);
    }
    const acc_t s4 = a.h_scale[cc];
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
      if (a.grad_h_scale != nullptr) atomicAdd(a.grad_h_scale + cc, sum_s);
      if (a.grad_h_bias != nullptr) atomicAdd(a.grad_h_bias + cc, sum_b);
    }
  }
  __syncthreads();

  // ---- 5. grad h_weight[t] = sum_tile gy4(i, j) * a3(i, j + t - 2); ga3 = transposed 1x5 conv of gy4 on the tile;
  //         bn3 sums; gy3 = ga3 * s3 -> workspace.
  const int64_t PP = a.HP * a.WP;
  for (int c = warp; c < CB; c += kWarps) {
    const int64_t cc = c0 + c;
    if (cc >= a.C) continue;
    acc_t hwt[kTaps];
#pragma unroll
    for (int t = 0; t < kTaps; ++t) hwt[t] = to_acc<acc_t>(a.h_weight[cc * kTaps + t]);
    if (a.grad_h_weight != nullptr) {
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
        if (lane == 0) atomicAdd(a.grad_h_weight + cc * kTaps + t, sum);
      }
    }
    const acc_t s3 = a.conv_scale[cc];
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
      if (a.grad_conv_scale != nullptr) atomicAdd(a.grad_conv_scale + cc, sum_s);
      if (a.grad_conv_bias != nullptr) atomicAdd(a.grad_conv_bias + cc, sum_b);
    }
  }
}

// ---- the 1x1 conv's GEMMs: where grad_x goes, what grad_W3 reads -------------------------------------------------

// grad_x for pooled pixel p = pi * WP + pj of image n: the 2x2 window (2 pi, 2 pj) gets v / 4; the last pooled row /
// column also zeroes the row / column avgpool floors off (odd H / W). Strides sn..sw.
template <typename scalar_t, typename acc_t>
struct PoolGradXStore {
  scalar_t* gx;
  int64_t H, W, HP, WP, sn, sc, sh, sw;
  struct Site {
    int64_t offset;  // of (n, channel 0, 2 pi, 2 pj)
    bool last_r, last_c;
  };
  __device__ __forceinline__ Site at(int64_t n, int64_t px) const {
    const int64_t pi = px / WP;
    const int64_t pj = px - pi * WP;
    return {n * sn + (2 * pi) * sh + (2 * pj) * sw, (H & 1) != 0 && pi == HP - 1, (W & 1) != 0 && pj == WP - 1};
  }
  __device__ __forceinline__ void write(const Site& s, int64_t kx, acc_t acc) const {
    scalar_t* d = gx + s.offset + kx * sc;
    const scalar_t v = static_cast<scalar_t>(acc * acc_t(0.25));
    const scalar_t zero = static_cast<scalar_t>(0.0f);
    d[0] = v;
    d[sw] = v;
    d[sh] = v;
    d[sh + sw] = v;
    if (s.last_r) {
      d[2 * sh] = zero;
      d[2 * sh + sw] = zero;
    }
    if (s.last_c) {
      d[2 * sw] = zero;
      d[sh + 2 * sw] = zero;
    }
    if (s.last_r && s.last_c) d[2 * sh + 2 * sw] = zero;
  }
};

// avgpool2x2(x)[n, k, pi, pj] for pooled pixel p = pi * WP + pj.
template <typename scalar_t, typename acc_t>
struct PooledInputLoad {
  const scalar_t* x;
  int64_t WP, sn, sc, sh, sw;
  __device__ __forceinline__ acc_t operator()(int64_t n, int64_t kx, int64_t px) const {
    const int64_t pi = px / WP;
    const int64_t pj = px - pi * WP;
    return pooled_at<acc_t>(x + n * sn + kx * sc, pi, pj, sh, sw);
  }
};

// ---- launch ----------------------------------------------------------------------------------------------------

template <typename scalar_t>
void run_dfc_backward(const DfcDims& d, const at::Tensor& grad, const at::Tensor& x, const at::Tensor& conv_weight,
                      const at::Tensor& conv_scale, const at::Tensor& conv_bias, const at::Tensor& h_weight,
                      const at::Tensor& h_scale, const at::Tensor& h_bias, const at::Tensor& v_weight,
                      const at::Tensor& v_scale, const at::Tensor& v_bias, bool cl, at::TensorList grads) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int CB = 8;
  const at::ScalarType acc_dtype = acc_type(x.scalar_type());
  const bool need_gx = grad_requested(grads[0]);
  const bool need_gw3 = grad_requested(grads[1]);
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
    const TileChoice tile = choose_tile(
        kOp, d.HP, d.WP, 2 * kDefaultSmem,
        [&](int th, int tw) {
          const auto r = region(th, tw);
          return dfc_backward_smem_bytes<acc_t, CB>(r.first, r.second, th, tw);
        },
        [&](int th, int tw) {
          const auto r = region(th, tw);
          return int64_t(r.first) * r.second;
        });
    DfcBackwardArgs<scalar_t, acc_t> a{};
    a.grad = grad.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.conv_weight = conv_weight.data_ptr<scalar_t>();
    a.conv_scale = conv_scale.data_ptr<acc_t>();
    a.conv_bias = conv_bias.data_ptr<acc_t>();
    a.h_weight = h_weight.data_ptr<scalar_t>();
    a.h_scale = h_scale.data_ptr<acc_t>();
    a.h_bias = h_bias.data_ptr<acc_t>();
    a.v_weight = v_weight.data_ptr<scalar_t>();
    a.v_scale = v_scale.data_ptr<acc_t>();
    a.v_bias = v_bias.data_ptr<acc_t>();
    a.grad_conv_scale = gs3.ptr<acc_t>();
    a.grad_conv_bias = gb3.ptr<acc_t>();
    a.grad_h_weight = ghw.ptr<acc_t>();
    a.grad_h_scale = gs4.ptr<acc_t>();
    a.grad_h_bias = gb4.ptr<acc_t>();
    a.grad_v_weight = gvw.ptr<acc_t>();
    a.grad_v_scale = gs5.ptr<acc_t>();
    a.grad_v_bias = gb5.ptr<acc_t>();
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
    a.cl = cl;
    const unsigned int grid = grid_size(kOp, d.N * a.tiles_h * a.tiles_w * a.ncb);
    auto kernel = dfc_backward_kernel<scalar_t, acc_t, CB>;
    set_smem_limit(kernel, tile.smem);
    kernel<<<grid, kThreads, tile.smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 2. grad_x = pool^T (W3^T gy3)
    if (need_gx) {
      const at::Tensor& gx = grads[0];
      const PoolGradXStore<scalar_t, acc_t> store{gx.data_ptr<scalar_t>(), d.H, d.W, d.HP, d.WP, gx.stride(0),
                                                  gx.stride(1), gx.stride(2), gx.stride(3)};
      launch_conv1x1_grad_input<scalar_t, acc_t>(kOp, conv_weight.data_ptr<scalar_t>(), gy3.data_ptr<acc_t>(), d.N,
                                                 d.C, d.C_in, PP, cl, store, stream);
    }

    // 3. grad_W3 = sum gy3 pool(x)^T
    if (need_gw3) {
      const PooledInputLoad<scalar_t, acc_t> xload{x.data_ptr<scalar_t>(), d.WP, x.stride(0), x.stride(1),
                                                   x.stride(2), x.stride(3)};
      launch_conv1x1_grad_weight<acc_t>(kOp, gy3.data_ptr<acc_t>(), gw3.ptr<acc_t>(), d.N, d.C, d.C_in, PP,
                                        cl, xload, stream);
    }
  }

  for (const AccBuffer* b : {&gw3, &gs3, &gb3, &ghw, &gs4, &gb4, &gvw, &gs5, &gb5}) b->finish();
}

void dfc_backward_kernel_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& conv_weight,
                              const at::Tensor& conv_scale, const at::Tensor& conv_bias, const at::Tensor& h_weight,
                              const at::Tensor& h_scale, const at::Tensor& h_bias, const at::Tensor& v_weight,
                              const at::Tensor& v_scale, const at::Tensor& v_bias, c10::string_view mode,
                              at::TensorList grads) {
  const DfcDims d = check_dfc_args(kOp, x, conv_weight, h_weight, v_weight, mode);
  const at::ScalarType acc = acc_type(x.scalar_type());
  check_param(conv_scale, x, acc, kOp, "conv_scale", {d.C});
  check_param(conv_bias, x, acc, kOp, "conv_bias", {d.C});
  check_param(h_scale, x, acc, kOp, "h_scale", {d.C});
  check_param(h_bias, x, acc, kOp, "h_bias", {d.C});
  check_param(v_scale, x, acc, kOp, "v_scale", {d.C});
  check_param(v_bias, x, acc, kOp, "v_bias", {d.C});
  const bool pooled = d.mode == kModeGate;
  check_output(grad, x, kOp, "grad", {d.N, d.C, pooled ? d.HP : d.H, pooled ? d.WP : d.W});
  check_grads(kOp, grads, x,
              {{"grads[0] (x)", &x, false},
               {"grads[1] (conv_weight)", &conv_weight, false},
               {"grads[2] (conv_scale)", &conv_scale, true},
               {"grads[3] (conv_bias)", &conv_bias, true},
               {"grads[4] (h_weight)", &h_weight, false},
               {"grads[5] (h_scale)", &h_scale, true},
               {"grads[6] (h_bias)", &h_bias, true},
               {"grads[7] (v_weight)", &v_weight, false},
               {"grads[8] (v_scale)", &v_scale, true},
               {"grads[9] (v_bias)", &v_bias, true}});
  if (!any_requested(grads)) return;
  TORCH_CHECK(d.N == 0 || (d.H >= 2 && d.W >= 2), kOp, ": the 2x2 average pool needs H and W >= 2, got ", d.H, "x",
              d.W);
  const bool cl =
      grad_requested(grads[0]) ? pick_channels_last(kOp, x, {{"grads[0] (x)", grads[0]}}) : is_channels_last(x);

  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfc_backward_cuda", [&] {
    run_dfc_backward<scalar_t>(d, grad, x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight,
                               v_scale, v_bias, cl, grads);
  });
}

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::dfc_backward_kernel_cuda), ghostfast::DfcBackwardKernel>,
              "dfc_backward_kernel_cuda: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CUDA, m) { m.impl("_dfc_backward_kernel", &ghostfast::dfc_backward_kernel_cuda); }
