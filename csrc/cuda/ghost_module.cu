// Fused Ghost module forward on CUDA, one launch: x (NCHW or channels_last) -> out = cat(x1, x2)[:, :out_channels]
// (* the upsampled gate) in x's layout, with bn1 and bn2 folded per channel inside the launch (the math:
// ghost_module.cuh).
//
// A block owns (image n, spatial tile TH x TW, block of CB x1 channels). It folds bn1 for its CB x1 channels and bn2
// for their cheap channels into shared-memory tables, computes x1 on the tile plus a halo of R = dw/2 into shared
// memory (the 1x1 conv runs over C_in in chunks staged in shared memory, register-blocked 8 channels x CB/8 pixels
// per thread), writes x1 on the tile's pixels, then computes the cheap channels of its x1 channels from shared
// memory; scale / shift, activation and the gate are applied on the way out.
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
#include <optional>
#include <type_traits>

#include "batch_norm.h"
#include "common.h"
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/ghost_module.cuh"
#include "cuda/upsample.cuh"
#include "kernel_signatures.h"

namespace ghostfast {
namespace {

constexpr const char* kOp = "ghostfast::_ghost_module_kernel (CUDA)";

template <typename scalar_t, typename acc_t>
struct GhostForwardArgs {
  const scalar_t* x;
  const scalar_t* primary_weight;  // [init, C_in]
  BatchNormArgs bn1;               // [init]
  const scalar_t* cheap_weight;    // [cheap, dw*dw]
  BatchNormArgs bn2;               // [cheap]
  const scalar_t* gate;            // [N, out_channels, Hg, Wg] contiguous, or null
  scalar_t* out;
  int64_t C_in, H, W, init, cheap, ratio_m1, out_channels, n1, Hg, Wg;
  int64_t sxn, sxc, sxh, sxw;
  int64_t son, soc, soh, sow;
  int64_t tiles_h, tiles_w, ncb;
  int dw, TH, TW;
  Act act;
  bool bilinear, cl;
};

// x1 on the region (tile + R halo): act(z1 * scale + shift), 0 outside the image (the depthwise's zero padding) and
// for channels past init. scale / shift: bn1's table of the block's channels.
template <typename acc_t>
struct X1Epi {
  acc_t* x1s;  // [CB][PA]
  const acc_t* scale;
  const acc_t* shift;
  int64_t c0, init, H, W, hb, wb;
  int WA, PA;
  Act act;
  __device__ __forceinline__ void operator()(int p, int c, acc_t z1) const {
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t h = hb + ai;
    const int64_t w = wb + aj;
    acc_t r = acc_t(0);
    if (c0 + c < init && h >= 0 && h < H && w >= 0 && w < W) {
      r = act_forward(act, z1 * scale[c] + shift[c]);
    }
    x1s[c * PA + p] = r;
  }
};

// Shared memory: bn1 scale, shift [CB] each | x1 [CB][PA] | conv staging | bn2 scale, shift [CB*ratio_m1] each.
// (Of the three orders tried, this one gives ptxas the fewest registers summed over the six instantiations.)
template <typename acc_t, int CB>
size_t ghost_forward_smem_bytes(int th, int tw, int R, int64_t ratio_m1) {
  const int64_t pa = int64_t(th + 2 * R) * (tw + 2 * R);
  return size_t(CB * pa + ConvShape<acc_t, CB>::kStageElems + 2 * CB * (1 + ratio_m1)) * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads) ghost_forward_kernel(const GhostForwardArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const BlockTile blk = block_tile(a.tiles_h, a.tiles_w, a.ncb);
  const int64_t n = blk.n;
  const int R = a.dw / 2;
  const int TH = a.TH, TW = a.TW;
  const int WA = TW + 2 * R;
  const int PA = (TH + 2 * R) * WA;
  const int PT = TH * TW;
  const int64_t h0 = blk.th * TH, w0 = blk.tw * TW;
  const int64_t hb = h0 - R, wb = w0 - R;  // image coordinates of region pixel (0, 0)
  const int64_t c0 = blk.cb * CB;
  const int64_t NQ = CB * a.ratio_m1;  // the block's cheap channels: q = c_local*(ratio-1) + j
  acc_t* bn1_scale = smem;                                       // [CB]
  acc_t* bn1_shift = bn1_scale + CB;                             // [CB]
  acc_t* x1s = bn1_shift + CB;                                   // [CB][PA]
  acc_t* stage = x1s + CB * PA;                                  // conv staging
  acc_t* bn2_scale = stage + ConvShape<acc_t, CB>::kStageElems;  // [NQ]
  acc_t* bn2_shift = bn2_scale + NQ;                             // [NQ]
  const bool has_cheap = a.init + c0 * a.ratio_m1 < a.out_channels;  // block-uniform

  fold_batch_norm<acc_t>(a.bn1, c0, CB, a.init, bn1_scale, bn1_shift);
  if (has_cheap) fold_batch_norm<acc_t>(a.bn2, c0 * a.ratio_m1, NQ, a.cheap, bn2_scale, bn2_shift);
  __syncthreads();

  conv1x1_region<acc_t, CB>(
      stage, PA, a.C_in, a.cl,
      RegionLoad<scalar_t, acc_t>{a.x + n * a.sxn, a.sxc, a.sxh, a.sxw, a.H, a.W, hb, wb, WA},
      WeightRowLoad<scalar_t, acc_t>{a.primary_weight, c0, a.init, a.C_in},
      X1Epi<acc_t>{x1s, bn1_scale, bn1_shift, c0, a.init, a.H, a.W, hb, wb, WA, PA, a.act});
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
      v *= gate_sample<acc_t>(a.gate + (n * a.out_channels + cc) * gplane, a.Wg, s, a.bilinear);
    }
    a.out[n * a.son + cc * a.soc + h * a.soh + w * a.sow] = static_cast<scalar_t>(v);
  }

  // Cheap channels o2 = c*(ratio-1) + j of this block's x1 channels, where they survive the cut.
  if (has_cheap) {
    const int64_t total = NQ * PT;  // q = c_local*(ratio-1) + j: output channel init + c0*(ratio-1) + q
    const int dw = a.dw;
    const int K2 = dw * dw;
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
      const int c = static_cast<int>(q / a.ratio_m1);
      const int64_t j = q - c * a.ratio_m1;
      const int ti = t / TW;
      const int tj = t - ti * TW;
      const int64_t h = h0 + ti, w = w0 + tj, cc = c0 + c;
      const int64_t o2 = cc * a.ratio_m1 + j;
      const int64_t oc = a.init + o2;
      if (cc >= a.init || oc >= a.out_channels || h >= a.H || w >= a.W) continue;
      const scalar_t* wk = a.cheap_weight + o2 * K2;
      // region pixel (ti + dy, tj + dx) = image (h + dy - R, w + dx - R)
      const acc_t* xr = x1s + c * PA + ti * WA + tj;
      acc_t z2 = acc_t(0);
      for (int dy = 0; dy < dw; ++dy)
        for (int dx = 0; dx < dw; ++dx) z2 += to_acc<acc_t>(wk[dy * dw + dx]) * xr[dy * WA + dx];
      acc_t v = act_forward(a.act, z2 * bn2_scale[q] + bn2_shift[q]);
      if (a.gate != nullptr) {
        const GateSrc<acc_t> s = gate_source<acc_t>(h, w, a.H, a.W, a.Hg, a.Wg, a.bilinear);
        v *= gate_sample<acc_t>(a.gate + (n * a.out_channels + oc) * gplane, a.Wg, s, a.bilinear);
      }
      a.out[n * a.son + oc * a.soc + h * a.soh + w * a.sow] = static_cast<scalar_t>(v);
    }
  }
}

template <typename scalar_t, int CB>
void run_ghost_forward(const GhostDims& d, const at::Tensor& x, const at::Tensor& primary_weight,
                       const BatchNormArgs& bn1, const at::Tensor& cheap_weight, const BatchNormArgs& bn2,
                       const std::optional<at::Tensor>& gate, Act act, bool cl, const at::Tensor& out) {
  using acc_t = typename AccOf<scalar_t>::type;
  const int R = static_cast<int>(d.dw / 2);
  const TileChoice tile = choose_tile(
      kOp, d.H, d.W, kDefaultSmem,
      [&](int th, int tw) { return ghost_forward_smem_bytes<acc_t, CB>(th, tw, R, d.ratio_m1); },
      [&](int th, int tw) { return int64_t(th + 2 * R) * (tw + 2 * R); });

  GhostForwardArgs<scalar_t, acc_t> a{};
  a.x = x.data_ptr<scalar_t>();
  a.primary_weight = primary_weight.data_ptr<scalar_t>();
  a.bn1 = bn1;
  a.cheap_weight = cheap_weight.data_ptr<scalar_t>();
  a.bn2 = bn2;
  a.gate = d.has_gate ? gate->data_ptr<scalar_t>() : nullptr;
  a.out = out.data_ptr<scalar_t>();
  a.C_in = d.C_in;
  a.H = d.H;
  a.W = d.W;
  a.init = d.init;
  a.cheap = d.cheap;
  a.ratio_m1 = d.ratio_m1;
  a.out_channels = d.out_channels;
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
  a.dw = static_cast<int>(d.dw);
  a.TH = tile.th;
  a.TW = tile.tw;
  a.act = act;
  a.bilinear = d.bilinear;
  a.cl = cl;

  const unsigned int grid = grid_size(kOp, d.N * a.tiles_h * a.tiles_w * a.ncb);
  auto kernel = ghost_forward_kernel<scalar_t, acc_t, CB>;
  set_smem_limit(kernel, tile.smem);
  kernel<<<grid, kThreads, tile.smem, c10::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void ghost_module_kernel_cuda(const at::Tensor& x, const at::Tensor& primary_weight,
                              const std::optional<at::Tensor>& bn1_weight, const std::optional<at::Tensor>& bn1_bias,
                              const std::optional<at::Tensor>& bn1_mean, const std::optional<at::Tensor>& bn1_var,
                              double bn1_eps, const at::Tensor& cheap_weight,
                              const std::optional<at::Tensor>& bn2_weight, const std::optional<at::Tensor>& bn2_bias,
                              const std::optional<at::Tensor>& bn2_mean, const std::optional<at::Tensor>& bn2_var,
                              double bn2_eps, int64_t out_channels, int64_t act, const std::optional<at::Tensor>& gate,
                              c10::string_view gate_mode, const at::Tensor& out) {
  const GhostDims d = check_ghost_args(kOp, x, primary_weight, cheap_weight, out_channels, gate, gate_mode);
  const Act a = check_act(kOp, act);
  const BatchNormArgs bn1 = batch_norm_args(bn1_weight, bn1_bias, bn1_mean, bn1_var, bn1_eps, d.init, x, kOp, "bn1");
  const BatchNormArgs bn2 = batch_norm_args(bn2_weight, bn2_bias, bn2_mean, bn2_var, bn2_eps, d.cheap, x, kOp, "bn2");
  check_output(out, x, kOp, "out", {d.N, d.out_channels, d.H, d.W});
  const bool cl = pick_channels_last(kOp, x, {{"out", out}});
  if (d.N == 0 || d.H == 0 || d.W == 0) return;

  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_forward_cuda", [&] {
    constexpr int kWide = std::is_same<scalar_t, double>::value ? 16 : 32;
    if (d.n1 <= 8)
      run_ghost_forward<scalar_t, 8>(d, x, primary_weight, bn1, cheap_weight, bn2, gate, a, cl, out);
    else
      run_ghost_forward<scalar_t, kWide>(d, x, primary_weight, bn1, cheap_weight, bn2, gate, a, cl, out);
  });
}

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::ghost_module_kernel_cuda), ghostfast::GhostModuleKernel>,
              "ghost_module_kernel_cuda: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CUDA, m) { m.impl("_ghost_module_kernel", &ghostfast::ghost_module_kernel_cuda); }
