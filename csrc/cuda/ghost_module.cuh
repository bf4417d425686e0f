// What the Ghost module's CUDA forward (ghost_module.cu) and backward (ghost_module_backward.cu) share: the
// dimensions and argument checks of both schemas, and the load of x (NCHW or channels_last) over a block's region.
//
//   x1  = act(bn1(W1 x))                 init channels (1x1 conv); z1 = W1 x
//   x2  = act(bn2(dw_k(x1)))             cheap = init*(ratio-1) channels; cheap channel o reads x1 channel o/(ratio-1)
//   out = cat(x1, x2)[:, :out_channels]  (* upsample(gate, (H, W), gate_mode) when a gate is given)
// The depthwise conv (dw x dw, dw in {1, 3, 5, 7}) zero-pads the activated x1 (padding R = dw/2). Schema and
// conventions: ../ghost_module.cpp; the spec: ghostfast/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <string>

#include "common.h"
#include "cuda/common.cuh"

namespace ghostfast {

struct GhostDims {
  int64_t N, C_in, H, W, init, cheap, dw, ratio_m1, out_channels;
  int64_t n1;      // x1 channels kept: min(init, out_channels)
  int64_t Hg, Wg;  // the gate's plane (0 without a gate)
  bool has_gate, bilinear;
};

// The checks both kernels make of x, the weights, out_channels and the gate.
inline GhostDims check_ghost_args(const char* op, const at::Tensor& x, const at::Tensor& primary_weight,
                                  const at::Tensor& cheap_weight, int64_t out_channels,
                                  const std::optional<at::Tensor>& gate, c10::string_view gate_mode) {
  check_x(x, c10::DeviceType::CUDA, op);
  const at::ScalarType dt = x.scalar_type();
  GhostDims d{};
  d.N = x.size(0);
  d.C_in = x.size(1);
  d.H = x.size(2);
  d.W = x.size(3);
  const at::Tensor& w1 = primary_weight;
  TORCH_CHECK(w1.defined() && w1.dim() == 4 && w1.size(0) >= 1, op,
              ": expected primary_weight of shape [init, C_in, 1, 1] with init >= 1, got ",
              w1.defined() ? w1.sizes() : at::IntArrayRef{});
  d.init = w1.size(0);
  check_param(w1, x, dt, op, "primary_weight", {d.init, d.C_in, 1, 1});
  const at::Tensor& w2 = cheap_weight;
  TORCH_CHECK(w2.defined() && w2.dim() == 4, op, ": expected cheap_weight of shape [init*(ratio-1), 1, dw, dw], got ",
              w2.defined() ? w2.sizes() : at::IntArrayRef{});
  d.cheap = w2.size(0);
  d.dw = w2.size(3);
  TORCH_CHECK(d.cheap >= d.init && d.cheap % d.init == 0, op, ": expected cheap_weight.shape[0] a positive multiple ",
              "of init = ", d.init, " (init * (ratio - 1)), got ", d.cheap);
  TORCH_CHECK(d.dw == 1 || d.dw == 3 || d.dw == 5 || d.dw == 7, op,
              ": expected a depthwise size dw of 1, 3, 5 or 7, got cheap_weight of shape ", w2.sizes());
  check_param(w2, x, dt, op, "cheap_weight", {d.cheap, 1, d.dw, d.dw});
  d.ratio_m1 = d.cheap / d.init;
  TORCH_CHECK(out_channels >= 1 && out_channels <= d.init + d.cheap, op, ": expected out_channels in [1, ",
              d.init + d.cheap, "], got ", out_channels);
  d.out_channels = out_channels;
  d.n1 = std::min(d.init, d.out_channels);
  d.has_gate = gate.has_value() && gate->defined();
  d.bilinear = false;
  d.Hg = d.Wg = 0;
  if (d.has_gate) {
    const at::Tensor& g = *gate;
    TORCH_CHECK(g.dim() == 4 && g.size(0) == d.N && g.size(1) == d.out_channels, op, ": expected gate of shape [",
                d.N, ", ", d.out_channels, ", Hg, Wg], got ", g.sizes());
    check_param(g, x, dt, op, "gate", g.sizes());
    TORCH_CHECK(g.numel() > 0 || d.N * d.H * d.W == 0, op, ": expected a gate with Hg, Wg >= 1, got ", g.sizes());
    d.Hg = g.size(2);
    d.Wg = g.size(3);
    TORCH_CHECK(gate_mode == "nearest" || gate_mode == "bilinear", op,
                ": expected gate_mode 'nearest' or 'bilinear', got '", std::string(gate_mode), "'");
    d.bilinear = gate_mode == "bilinear";
  }
  return d;
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

}  // namespace ghostfast
