// Fused DFC attention forward on CUDA, one launch: x (NCHW or channels_last) -> the gate sigmoid(bn5(5x1(bn4(1x5(
// bn3(1x1(avgpool2x2(x)))))))) in x's layout, pooled ('gate') or upsampled to H x W, with bn3 / bn4 / bn5 folded per
// channel inside the launch (the math: dfc.cuh).
//
// A block owns (image n, tile TH x TW of pooled pixels, block of CB channels). It folds bn3, bn4 and bn5 for its CB
// channels into shared-memory tables, pools x while staging it and computes a3 on the tile plus a margin of 2 pooled
// rows / columns each side (no margin along a dimension one tile covers; for 'bilinear' one more row / column after
// the tile, the upper neighbour the interpolation reads) into shared memory, then a4, then z and the gate. 'gate'
// stores the tile; the upsampled modes park the gate in shared memory and write every full-resolution pixel whose
// (lower) source index lies in the tile: each output element is written exactly once.
//
// Region of a block (pooled coordinates, origin at (i0 - mh, j0 - mw)): rows [i0 - mh, i0 + TH + rh + mh), columns
// [j0 - mw, j0 + TW + rw + mw); m = 2 where the dimension is tiled (0 where one tile covers it), r = 1 for bilinear
// on a tiled dimension. Every stage is computed on the whole region with reads outside the region taken as 0:
// a3 is exact everywhere, a4 on columns [mw, WA - mw), z on rows [mh, HA - mh) of those: the tile and its ring.
// (Where m = 0 the region is the whole dimension, so a read outside it is a read outside the image: 0 is exact.)
//
// Accumulation: float for float / half / bfloat16, double for double. All global offsets are int64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include "batch_norm.h"
#include "common.h"
#include "cuda/common.cuh"
#include "cuda/dfc.cuh"
#include "cuda/gemm.cuh"
#include "cuda/upsample.cuh"
#include "kernel_signatures.h"

namespace ghostfast {
namespace {

constexpr const char* kOp = "ghostfast::_dfc_kernel (CUDA)";

template <typename scalar_t, typename acc_t>
struct DfcForwardArgs {
  const scalar_t* x;
  const scalar_t* conv_weight;  // [C, C_in]
  BatchNormArgs bn3;
  const scalar_t* h_weight;  // [C, 5]
  BatchNormArgs bn4;
  const scalar_t* v_weight;  // [C, 5]
  BatchNormArgs bn5;
  scalar_t* out;
  int64_t C_in, C, H, W, HP, WP;
  int64_t sxn, sxc, sxh, sxw;
  int64_t son, soc, soh, sow;
  int64_t tiles_h, tiles_w, ncb;
  int TH, TW, mh, mw, rh, rw;
  int mode;
  bool cl;
};

// Shared memory: bn3, bn4, bn5 scale and shift [CB] each | a3 then the gate [CB][PA] | a4 [CB][PA] | conv staging.
// (The tables first, at fixed offsets: ptxas then allots 80 registers for float / half instead of 119.)
template <typename acc_t, int CB>
size_t dfc_forward_smem_bytes(int ha, int wa) {
  return size_t(6 * CB + 2 * CB * int64_t(ha) * wa + ConvShape<acc_t, CB>::kStageElems) * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads) dfc_forward_kernel(const DfcForwardArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const BlockTile blk = block_tile(a.tiles_h, a.tiles_w, a.ncb);
  const int64_t n = blk.n;
  const int TH = a.TH, TW = a.TW, mh = a.mh, mw = a.mw;
  const int HA = TH + a.rh + 2 * mh;
  const int WA = TW + a.rw + 2 * mw;
  const int PA = HA * WA;
  const int64_t i0 = blk.th * TH, j0 = blk.tw * TW;
  const int64_t pb_h = i0 - mh, pb_w = j0 - mw;  // pooled coordinates of region pixel (0, 0)
  const int64_t c0 = blk.cb * CB;
  acc_t* bn3_scale = smem;  // [CB] each
  acc_t* bn3_shift = bn3_scale + CB;
  acc_t* bn4_scale = bn3_shift + CB;
  acc_t* bn4_shift = bn4_scale + CB;
  acc_t* bn5_scale = bn4_shift + CB;
  acc_t* bn5_shift = bn5_scale + CB;
  acc_t* S0 = bn5_shift + CB;   // a3, then the gate      [CB][PA]
  acc_t* S1 = S0 + CB * PA;     // a4                     [CB][PA]
  acc_t* stage = S1 + CB * PA;  // conv staging

  fold_batch_norm<acc_t>(a.bn3, c0, CB, a.C, bn3_scale, bn3_shift);
  fold_batch_norm<acc_t>(a.bn4, c0, CB, a.C, bn4_scale, bn4_shift);
  fold_batch_norm<acc_t>(a.bn5, c0, CB, a.C, bn5_scale, bn5_shift);
  __syncthreads();

  // ---- a3
  conv1x1_region<acc_t, CB>(
      stage, PA, a.C_in, a.cl,
      PooledRegionLoad<scalar_t, acc_t>{a.x + n * a.sxn, a.sxc, a.sxh, a.sxw, a.HP, a.WP, pb_h, pb_w, WA},
      WeightRowLoad<scalar_t, acc_t>{a.conv_weight, c0, a.C, a.C_in},
      A3Epi<acc_t>{S0, nullptr, bn3_scale, bn3_shift, c0, a.C, a.HP, a.WP, pb_h, pb_w, WA, PA, 0, TH, TW, mh, mw});
  __syncthreads();

  // ---- a4 = bn4(1x5 conv of a3), 0 outside the image
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
      r = s * bn4_scale[c] + bn4_shift[c];
    }
    S1[e] = r;
  }
  __syncthreads();

  // ---- gate = sigmoid(bn5(5x1 conv of a4)) on the tile and its ring (G = (TH + rh) x (TW + rw))
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
      s += to_acc<acc_t>(a.v_weight[cc * kTaps + t]) * ((ii >= 0 && ii < HA) ? col[ii * WA] : acc_t(0));
    }
    const acc_t g = sigmoid_acc(s * bn5_scale[c] + bn5_shift[c]);
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
      v = bilinear_blend(lh.lambda, lw.lambda, gs[r0 + q0], gs[r0 + q1], gs[r1 + q0], gs[r1 + q1]);
    }
    a.out[n * a.son + cc * a.soc + hf * a.soh + wf * a.sow] = static_cast<scalar_t>(v);
  }
}

template <typename scalar_t>
void run_dfc_forward(const DfcDims& d, const at::Tensor& x, const at::Tensor& conv_weight, const BatchNormArgs& bn3,
                     const at::Tensor& h_weight, const BatchNormArgs& bn4, const at::Tensor& v_weight,
                     const BatchNormArgs& bn5, bool cl, const at::Tensor& out) {
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
  const TileChoice tile = choose_tile(
      kOp, d.HP, d.WP, kDefaultSmem,
      [&](int th, int tw) {
        const auto r = region(th, tw);
        return dfc_forward_smem_bytes<acc_t, CB>(r.first, r.second);
      },
      [&](int th, int tw) {
        const auto r = region(th, tw);
        return int64_t(r.first) * r.second;
      });

  DfcForwardArgs<scalar_t, acc_t> a{};
  a.x = x.data_ptr<scalar_t>();
  a.conv_weight = conv_weight.data_ptr<scalar_t>();
  a.bn3 = bn3;
  a.h_weight = h_weight.data_ptr<scalar_t>();
  a.bn4 = bn4;
  a.v_weight = v_weight.data_ptr<scalar_t>();
  a.bn5 = bn5;
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
  a.cl = cl;

  const unsigned int grid = grid_size(kOp, d.N * a.tiles_h * a.tiles_w * a.ncb);
  auto kernel = dfc_forward_kernel<scalar_t, acc_t, CB>;
  set_smem_limit(kernel, tile.smem);
  kernel<<<grid, kThreads, tile.smem, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void dfc_kernel_cuda(const at::Tensor& x, const at::Tensor& conv_weight, const std::optional<at::Tensor>& bn3_weight,
                     const std::optional<at::Tensor>& bn3_bias, const std::optional<at::Tensor>& bn3_mean,
                     const std::optional<at::Tensor>& bn3_var, double bn3_eps, const at::Tensor& h_weight,
                     const std::optional<at::Tensor>& bn4_weight, const std::optional<at::Tensor>& bn4_bias,
                     const std::optional<at::Tensor>& bn4_mean, const std::optional<at::Tensor>& bn4_var,
                     double bn4_eps, const at::Tensor& v_weight, const std::optional<at::Tensor>& bn5_weight,
                     const std::optional<at::Tensor>& bn5_bias, const std::optional<at::Tensor>& bn5_mean,
                     const std::optional<at::Tensor>& bn5_var, double bn5_eps, c10::string_view mode,
                     const at::Tensor& out) {
  const DfcDims d = check_dfc_args(kOp, x, conv_weight, h_weight, v_weight, mode);
  const BatchNormArgs bn3 = batch_norm_args(bn3_weight, bn3_bias, bn3_mean, bn3_var, bn3_eps, d.C, x, kOp, "bn3");
  const BatchNormArgs bn4 = batch_norm_args(bn4_weight, bn4_bias, bn4_mean, bn4_var, bn4_eps, d.C, x, kOp, "bn4");
  const BatchNormArgs bn5 = batch_norm_args(bn5_weight, bn5_bias, bn5_mean, bn5_var, bn5_eps, d.C, x, kOp, "bn5");
  const bool pooled = d.mode == kModeGate;
  check_output(out, x, kOp, "out", {d.N, d.C, pooled ? d.HP : d.H, pooled ? d.WP : d.W});
  const bool cl = pick_channels_last(kOp, x, {{"out", out}});
  if (out.numel() == 0) return;
  TORCH_CHECK(d.H >= 2 && d.W >= 2, kOp, ": the 2x2 average pool needs H and W >= 2, got ", d.H, "x", d.W);

  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dfc_forward_cuda", [&] {
    run_dfc_forward<scalar_t>(d, x, conv_weight, bn3, h_weight, bn4, v_weight, bn5, cl, out);
  });
}

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::dfc_kernel_cuda), ghostfast::DfcKernel>,
              "dfc_kernel_cuda: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CUDA, m) { m.impl("_dfc_kernel", &ghostfast::dfc_kernel_cuda); }
