// Fused Ghost module backward on CUDA: grad_out (any strides) and x (NCHW or channels_last) -> the gradients of x
// (x's layout), of both weights, of the folded bn1 / bn2 vectors (accumulation dtype) and of the gate (the math:
// ghost_module.cuh).
//
// Up to three launches (plus zero-fills of the accumulators and, for fp16/bf16 weights or a gate, a cast):
//   1. main: a block owns (n, tile, CB x1 channels). It recomputes x1 on the tile + 2R halo (shared memory), the
//      cheap pre-activations on tile + R, walks back through the depthwise conv, and writes grad_z1 = d/dz1 of its
//      tile into an accumulation-dtype workspace [N, n1, H*W]. Per-channel sums (the primary and cheap scale and
//      bias grads), the depthwise weight grads and the gate grad (adjoint of the upsample: a scatter) are reduced
//      per warp and added with atomics into zeroed accumulation-dtype buffers.
//   2. grad_x = W1^T grad_z1 (a tiled GEMM per image, every element written once, no atomics; gemm.cuh).
//   3. grad_W1 = sum over (n, pixels) of grad_z1 x^T (a split-K tiled GEMM, atomics into an accumulation buffer).
// The atomics make the last bits of the parameter and gate gradients depend on the order blocks finish.
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

#include "common.h"
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/ghost_module.cuh"
#include "cuda/upsample.cuh"
#include "kernel_signatures.h"

namespace ghostfast {
namespace {

constexpr const char* kOp = "ghostfast::_ghost_module_backward_kernel (CUDA)";

// ---- main kernel -----------------------------------------------------------------------------------------------
//
// Regions of a block, all in the coordinates of region A (origin at image (h0 - 2R, w0 - 2R)):
//   A = tile + 2R halo:  x1 (activated, 0 outside the image)                  X1[CB][PA]
//   B = tile + R halo:   g2 = d/d(pre2) of the current cheap output j          GP[CB][PB], B(0,0) = A(R, R)
//   T = tile:            z1 = W1 x (before bn1), gx1 = d/d(x1)                 Z1, GX [CB][PT], T(0,0) = A(2R, 2R)
// Only T's pixels contribute to reductions and to grad_z1, so every image pixel is counted by exactly one block.

template <typename scalar_t, typename acc_t>
struct GhostBackwardArgs {
  const scalar_t* grad_out;  // [N, out_channels, H, W], strides sgn..sgw
  const scalar_t* x;
  const scalar_t* primary_weight;
  const acc_t* primary_scale;
  const acc_t* primary_bias;
  const scalar_t* cheap_weight;
  const acc_t* cheap_scale;
  const acc_t* cheap_bias;
  const scalar_t* gate;
  acc_t* grad_primary_scale;  // [init] or null
  acc_t* grad_primary_bias;   // [init] or null
  acc_t* grad_cheap_weight;   // [cheap, dw*dw] or null
  acc_t* grad_cheap_scale;    // [cheap] or null
  acc_t* grad_cheap_bias;     // [cheap] or null
  acc_t* grad_gate;           // [N, out_channels, Hg, Wg] or null
  acc_t* grad_z1;             // [N, n1, H*W] or null
  int64_t C_in, H, W, init, ratio_m1, out_channels, n1, Hg, Wg;
  int64_t sxn, sxc, sxh, sxw;
  int64_t sgn, sgc, sgh, sgw;
  int64_t tiles_h, tiles_w, ncb;
  int dw, TH, TW;
  Act act;
  bool bilinear, cl;
};

// x1 on region A and z1 on the tile T.
template <typename acc_t>
struct X1Z1Epi {
  acc_t* X1;  // [CB][PA]
  acc_t* Z1;  // [CB][PT]
  const acc_t* primary_scale;
  const acc_t* primary_bias;
  int64_t c0, n1, H, W, hb, wb;
  int WA, PA, PT, TH, TW, R2;
  Act act;
  __device__ __forceinline__ void operator()(int p, int c, acc_t z1) const {
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t h = hb + ai;
    const int64_t w = wb + aj;
    const int64_t cc = c0 + c;
    acc_t r = acc_t(0);
    if (cc < n1 && h >= 0 && h < H && w >= 0 && w < W) {
      r = act_forward(act, z1 * primary_scale[cc] + primary_bias[cc]);
    }
    X1[c * PA + p] = r;
    const int ti = ai - R2;
    const int tj = aj - R2;
    if (ti >= 0 && ti < TH && tj >= 0 && tj < TW) Z1[c * PT + ti * TW + tj] = z1;
  }
};

template <typename acc_t, int CB>
size_t ghost_backward_smem_bytes(int th, int tw, int R) {
  const int64_t pa = int64_t(th + 4 * R) * (tw + 4 * R);
  const int64_t pb = int64_t(th + 2 * R) * (tw + 2 * R);
  const int64_t pt = int64_t(th) * tw;
  return size_t(CB * (pa + pb + 2 * pt) + ConvShape<acc_t, CB>::kStageElems) * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, int CB>
__global__ void __launch_bounds__(kThreads) ghost_backward_kernel(const GhostBackwardArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_raw);

  const BlockTile blk = block_tile(a.tiles_h, a.tiles_w, a.ncb);
  const int64_t n = blk.n;
  const int dw = a.dw;
  const int R = dw / 2;
  const int R2 = 2 * R;
  const int TH = a.TH, TW = a.TW;
  const int WA = TW + 2 * R2;
  const int PA = (TH + 2 * R2) * WA;
  const int WB = TW + 2 * R;
  const int PB = (TH + 2 * R) * WB;
  const int PT = TH * TW;
  const int K2 = dw * dw;
  const int64_t h0 = blk.th * TH, w0 = blk.tw * TW;
  const int64_t c0 = blk.cb * CB;

  acc_t* X1 = smem;             // [CB][PA]
  acc_t* Z1 = X1 + CB * PA;     // [CB][PT]
  acc_t* GP = Z1 + CB * PT;     // [CB][PB]
  acc_t* GX = GP + CB * PB;     // [CB][PT]
  acc_t* stage = GX + CB * PT;  // conv staging

  // ---- 1. recompute z1 = W1 x and x1 on region A
  conv1x1_region<acc_t, CB>(
      stage, PA, a.C_in, a.cl,
      RegionLoad<scalar_t, acc_t>{a.x + n * a.sxn, a.sxc, a.sxh, a.sxw, a.H, a.W, h0 - R2, w0 - R2, WA},
      WeightRowLoad<scalar_t, acc_t>{a.primary_weight, c0, a.init, a.C_in},
      X1Z1Epi<acc_t>{X1, Z1, a.primary_scale, a.primary_bias, c0, a.n1, a.H, a.W, h0 - R2, w0 - R2, WA, PA, PT, TH,
                     TW, R2, a.act});
  __syncthreads();

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t gplane = a.Hg * a.Wg;
  const scalar_t* go_n = a.grad_out + n * a.sgn;

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
          g = gov * gate_sample<acc_t>(a.gate + (n * a.out_channels + cc) * gplane, a.Wg, s, a.bilinear);
          if (a.grad_gate != nullptr)
            gate_scatter<acc_t>(a.grad_gate + (n * a.out_channels + cc) * gplane, a.Wg, s, a.bilinear,
                                gov * X1[c * PA + (ti + R2) * WA + (tj + R2)]);
        }
      }
      GX[c * PT + t] = g;
    }
  }

  // ---- 3. cheap outputs, one j at a time
  if (a.init + c0 * a.ratio_m1 < a.out_channels) {  // block-uniform
    for (int64_t j = 0; j < a.ratio_m1; ++j) {
      // 3a. g2 = d/d(pre2) on region B (0 outside the image / for cut channels); the cheap scale / bias sums and
      //     the gate gradient on T.
      for (int c = warp; c < CB; c += kWarps) {
        const int64_t cc = c0 + c;
        const int64_t o2 = cc * a.ratio_m1 + j;
        const int64_t oc = a.init + o2;
        const bool valid = cc < a.n1 && oc < a.out_channels;  // warp-uniform
        const acc_t s2v = valid ? a.cheap_scale[o2] : acc_t(0);
        const acc_t b2v = valid ? a.cheap_bias[o2] : acc_t(0);
        const scalar_t* wk = a.cheap_weight + (valid ? o2 : 0) * K2;
        acc_t sum_s = acc_t(0), sum_b = acc_t(0);
        for (int b = lane; b < PB; b += 32) {
          const int bi = b / WB;
          const int bj = b - bi * WB;
          const int64_t h = h0 - R + bi, w = w0 - R + bj;
          acc_t g = acc_t(0);
          if (valid && h >= 0 && h < a.H && w >= 0 && w < a.W) {
            // B(bi, bj) = A(bi + R, bj + R); tap (dy, dx) reads A(bi + dy, bj + dx) = image (h + dy - R, w + dx - R)
            const acc_t* xr = X1 + c * PA + bi * WA + bj;
            acc_t z2 = acc_t(0);
            for (int dy = 0; dy < dw; ++dy)
              for (int dx = 0; dx < dw; ++dx) z2 += to_acc<acc_t>(wk[dy * dw + dx]) * xr[dy * WA + dx];
            const acc_t pre2 = z2 * s2v + b2v;
            const acc_t gov = to_acc<acc_t>(go_n[oc * a.sgc + h * a.sgh + w * a.sgw]);
            g = gov;
            GateSrc<acc_t> s{};
            if (a.gate != nullptr) {
              s = gate_source<acc_t>(h, w, a.H, a.W, a.Hg, a.Wg, a.bilinear);
              g = gov * gate_sample<acc_t>(a.gate + (n * a.out_channels + oc) * gplane, a.Wg, s, a.bilinear);
            }
            g = act_backward(a.act, g, pre2);  // from the pre-activation
            const bool own = bi >= R && bi < R + TH && bj >= R && bj < R + TW;
            if (own) {
              sum_s += g * z2;
              sum_b += g;
              if (a.grad_gate != nullptr) {
                const acc_t x2 = act_forward(a.act, pre2);
                gate_scatter<acc_t>(a.grad_gate + (n * a.out_channels + oc) * gplane, a.Wg, s, a.bilinear,
                                    gov * x2);
              }
            }
          }
          GP[c * PB + b] = g;
        }
        sum_s = warp_sum(sum_s);
        sum_b = warp_sum(sum_b);
        if (valid && lane == 0) {
          if (a.grad_cheap_scale != nullptr) atomicAdd(a.grad_cheap_scale + o2, sum_s);
          if (a.grad_cheap_bias != nullptr) atomicAdd(a.grad_cheap_bias + o2, sum_b);
        }
      }
      __syncthreads();  // GP complete

      for (int c = warp; c < CB; c += kWarps) {
        const int64_t cc = c0 + c;
        const int64_t o2 = cc * a.ratio_m1 + j;
        const int64_t oc = a.init + o2;
        if (!(cc < a.n1 && oc < a.out_channels)) continue;  // warp-uniform
        const acc_t s2v = a.cheap_scale[o2];
        const scalar_t* wk = a.cheap_weight + o2 * K2;
        // 3c. grad W2[o2][dy][dx] = sum_T gz2(t) * x1(t + (dy - R, dx - R)); gz2 = g2 * cheap_scale.
        //     T(ti, tj) = B(ti + R, tj + R); the x1 tap is A(ti + R + dy, tj + R + dx).
        if (a.grad_cheap_weight != nullptr) {
          for (int tap = 0; tap < K2; ++tap) {
            const int dy = tap / dw;
            const int dx = tap - dy * dw;
            acc_t sum = acc_t(0);
            for (int t = lane; t < PT; t += 32) {
              const int ti = t / TW;
              const int tj = t - ti * TW;
              sum += (GP[c * PB + (ti + R) * WB + (tj + R)] * s2v) * X1[c * PA + (ti + R + dy) * WA + (tj + R + dx)];
            }
            sum = warp_sum(sum);
            if (lane == 0) atomicAdd(a.grad_cheap_weight + o2 * K2 + tap, sum);
          }
        }
        // 3d. transposed depthwise: gx1(t) += sum_taps gz2(t - (dy - R, dx - R)) * W2[dy][dx];
        //     the gz2 read is B(ti + 2R - dy, tj + 2R - dx), inside B for every tap.
        for (int t = lane; t < PT; t += 32) {
          const int ti = t / TW;
          const int tj = t - ti * TW;
          if (h0 + ti >= a.H || w0 + tj >= a.W) continue;
          const acc_t* gr = GP + c * PB + (ti + R2) * WB + (tj + R2);
          acc_t s = acc_t(0);
          for (int dy = 0; dy < dw; ++dy)
            for (int dx = 0; dx < dw; ++dx) s += (gr[-(dy * WB + dx)] * s2v) * to_acc<acc_t>(wk[dy * dw + dx]);
          GX[c * PT + t] += s;
        }
      }
      __syncthreads();  // the next j rewrites GP
    }
  }

  // ---- 4. g1 = gx1 * act'(pre1) on T: the primary scale / bias sums and grad_z1 = g1 * primary_scale for grad_x /
  //         grad_W1.
  const int64_t HW = a.H * a.W;
  for (int c = warp; c < CB; c += kWarps) {
    const int64_t cc = c0 + c;
    if (cc >= a.n1) continue;  // warp-uniform
    const acc_t s1v = a.primary_scale[cc];
    const acc_t b1v = a.primary_bias[cc];
    acc_t sum_s = acc_t(0), sum_b = acc_t(0);
    for (int t = lane; t < PT; t += 32) {
      const int ti = t / TW;
      const int tj = t - ti * TW;
      const int64_t h = h0 + ti, w = w0 + tj;
      if (h >= a.H || w >= a.W) continue;
      const acc_t z1 = Z1[c * PT + t];
      acc_t g = GX[c * PT + t];
      g = act_backward(a.act, g, z1 * s1v + b1v);  // from the pre-activation
      sum_s += g * z1;
      sum_b += g;
      if (a.grad_z1 != nullptr) a.grad_z1[(n * a.n1 + cc) * HW + h * a.W + w] = g * s1v;
    }
    sum_s = warp_sum(sum_s);
    sum_b = warp_sum(sum_b);
    if (lane == 0) {
      if (a.grad_primary_scale != nullptr) atomicAdd(a.grad_primary_scale + cc, sum_s);
      if (a.grad_primary_bias != nullptr) atomicAdd(a.grad_primary_bias + cc, sum_b);
    }
  }
}

// ---- the 1x1 conv's GEMMs: where grad_x goes, what grad_W1 reads -------------------------------------------------

// grad_x[n, k, h, w] for pixel p = h * W + w of image n, strides sn..sw.
template <typename scalar_t, typename acc_t>
struct GradXStore {
  scalar_t* gx;
  int64_t W, sn, sc, sh, sw;
  struct Site {
    int64_t offset;  // of (n, channel 0, h, w)
  };
  __device__ __forceinline__ Site at(int64_t n, int64_t px) const {
    const int64_t h = px / W;
    const int64_t w = px - h * W;
    return {n * sn + h * sh + w * sw};
  }
  __device__ __forceinline__ void write(const Site& s, int64_t kx, acc_t v) const {
    gx[s.offset + kx * sc] = static_cast<scalar_t>(v);
  }
};

// x[n, k, h, w] for pixel p = h * W + w.
template <typename scalar_t, typename acc_t>
struct InputLoad {
  const scalar_t* x;
  int64_t W, sn, sc, sh, sw;
  __device__ __forceinline__ acc_t operator()(int64_t n, int64_t kx, int64_t px) const {
    const int64_t h = px / W;
    const int64_t w = px - h * W;
    return to_acc<acc_t>(x[n * sn + kx * sc + h * sh + w * sw]);
  }
};

// ---- launch ----------------------------------------------------------------------------------------------------

template <typename scalar_t>
void run_ghost_backward(const GhostDims& d, const at::Tensor& grad_out, const at::Tensor& x,
                        const at::Tensor& primary_weight, const at::Tensor& primary_scale,
                        const at::Tensor& primary_bias, const at::Tensor& cheap_weight, const at::Tensor& cheap_scale,
                        const at::Tensor& cheap_bias, const std::optional<at::Tensor>& gate, Act act, bool cl,
                        at::TensorList grads) {
  using acc_t = typename AccOf<scalar_t>::type;
  constexpr int CB = 8;
  const at::ScalarType acc_dtype = acc_type(x.scalar_type());
  const bool need_gx = grad_requested(grads[0]);
  const bool need_gw1 = grad_requested(grads[1]);
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
    at::Tensor grad_z1;
    if (need_gx || need_gw1) grad_z1 = at::empty({d.N, d.n1, HW}, x.options().dtype(acc_dtype));  // fully written

    // 1. main kernel
    const int R = static_cast<int>(d.dw / 2);
    const TileChoice tile = choose_tile(
        kOp, d.H, d.W, 2 * kDefaultSmem,
        [&](int th, int tw) { return ghost_backward_smem_bytes<acc_t, CB>(th, tw, R); },
        [&](int th, int tw) { return int64_t(th + 4 * R) * (tw + 4 * R); });
    GhostBackwardArgs<scalar_t, acc_t> a{};
    a.grad_out = grad_out.data_ptr<scalar_t>();
    a.x = x.data_ptr<scalar_t>();
    a.primary_weight = primary_weight.data_ptr<scalar_t>();
    a.primary_scale = primary_scale.data_ptr<acc_t>();
    a.primary_bias = primary_bias.data_ptr<acc_t>();
    a.cheap_weight = cheap_weight.data_ptr<scalar_t>();
    a.cheap_scale = cheap_scale.data_ptr<acc_t>();
    a.cheap_bias = cheap_bias.data_ptr<acc_t>();
    a.gate = d.has_gate ? gate->data_ptr<scalar_t>() : nullptr;
    a.grad_primary_scale = gs1.ptr<acc_t>();
    a.grad_primary_bias = gb1.ptr<acc_t>();
    a.grad_cheap_weight = gw2.ptr<acc_t>();
    a.grad_cheap_scale = gs2.ptr<acc_t>();
    a.grad_cheap_bias = gb2.ptr<acc_t>();
    a.grad_gate = ggate.ptr<acc_t>();
    a.grad_z1 = grad_z1.defined() ? grad_z1.data_ptr<acc_t>() : nullptr;
    a.C_in = d.C_in;
    a.H = d.H;
    a.W = d.W;
    a.init = d.init;
    a.ratio_m1 = d.ratio_m1;
    a.out_channels = d.out_channels;
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
    a.dw = static_cast<int>(d.dw);
    a.TH = tile.th;
    a.TW = tile.tw;
    a.act = act;
    a.bilinear = d.bilinear;
    a.cl = cl;
    const unsigned int grid = grid_size(kOp, d.N * a.tiles_h * a.tiles_w * a.ncb);
    auto kernel = ghost_backward_kernel<scalar_t, acc_t, CB>;
    set_smem_limit(kernel, tile.smem);
    kernel<<<grid, kThreads, tile.smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();

    // 2. grad_x = W1^T grad_z1
    if (need_gx) {
      const at::Tensor& gx = grads[0];
      const GradXStore<scalar_t, acc_t> store{gx.data_ptr<scalar_t>(), d.W, gx.stride(0), gx.stride(1), gx.stride(2),
                                              gx.stride(3)};
      launch_conv1x1_grad_input<scalar_t, acc_t>(kOp, primary_weight.data_ptr<scalar_t>(),
                                                 grad_z1.data_ptr<acc_t>(), d.N, d.n1, d.C_in, HW,
                                                 cl, store, stream);
    }

    // 3. grad_W1 = sum grad_z1 x^T
    if (need_gw1) {
      const InputLoad<scalar_t, acc_t> xload{x.data_ptr<scalar_t>(), d.W, x.stride(0), x.stride(1), x.stride(2),
                                             x.stride(3)};
      launch_conv1x1_grad_weight<acc_t>(kOp, grad_z1.data_ptr<acc_t>(), gw1.ptr<acc_t>(), d.N, d.n1, d.C_in, HW,
                                        cl, xload, stream);
    }
  }

  for (const AccBuffer* b : {&gw1, &gs1, &gb1, &gw2, &gs2, &gb2, &ggate}) b->finish();
}

void ghost_module_backward_kernel_cuda(const at::Tensor& grad_out, const at::Tensor& x,
                                       const at::Tensor& primary_weight, const at::Tensor& primary_scale,
                                       const at::Tensor& primary_bias, const at::Tensor& cheap_weight,
                                       const at::Tensor& cheap_scale, const at::Tensor& cheap_bias,
                                       int64_t out_channels, int64_t act, const std::optional<at::Tensor>& gate,
                                       c10::string_view gate_mode, at::TensorList grads) {
  const GhostDims d = check_ghost_args(kOp, x, primary_weight, cheap_weight, out_channels, gate, gate_mode);
  const Act a = check_act(kOp, act);
  const at::ScalarType acc = acc_type(x.scalar_type());
  check_param(primary_scale, x, acc, kOp, "primary_scale", {d.init});
  check_param(primary_bias, x, acc, kOp, "primary_bias", {d.init});
  check_param(cheap_scale, x, acc, kOp, "cheap_scale", {d.cheap});
  check_param(cheap_bias, x, acc, kOp, "cheap_bias", {d.cheap});
  check_output(grad_out, x, kOp, "grad_out", {d.N, d.out_channels, d.H, d.W});
  check_grads(kOp, grads, x,
              {{"grads[0] (x)", &x, false},
               {"grads[1] (primary_weight)", &primary_weight, false},
               {"grads[2] (primary_scale)", &primary_scale, true},
               {"grads[3] (primary_bias)", &primary_bias, true},
               {"grads[4] (cheap_weight)", &cheap_weight, false},
               {"grads[5] (cheap_scale)", &cheap_scale, true},
               {"grads[6] (cheap_bias)", &cheap_bias, true},
               {"grads[7] (gate)", d.has_gate ? &*gate : nullptr, false}});
  if (!any_requested(grads)) return;
  const bool cl =
      grad_requested(grads[0]) ? pick_channels_last(kOp, x, {{"grads[0] (x)", grads[0]}}) : is_channels_last(x);

  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_backward_cuda", [&] {
    run_ghost_backward<scalar_t>(d, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight,
                                 cheap_scale, cheap_bias, gate, a, cl, grads);
  });
}

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::ghost_module_backward_kernel_cuda),
                             ghostfast::GhostModuleBackwardKernel>,
              "ghost_module_backward_kernel_cuda: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CUDA, m) {
  m.impl("_ghost_module_backward_kernel", &ghostfast::ghost_module_backward_kernel_cuda);
}
