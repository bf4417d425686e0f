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
  check_input(x, op);
  GhostDims d{};
  d.N = x.size(0);
  d.C_in = x.size(1);
  d.H = x.size(2);
  d.W = x.size(3);
  const at::Tensor& w1 = primary_weight;
  TORCH_CHECK(w1.dim() == 4 && w1.size(0) >= 1 && w1.size(1) == d.C_in && w1.size(2) == 1 && w1.size(3) == 1, op,
              ": expected primary_weight of shape [init, ", d.C_in, ", 1, 1] with init >= 1, got ", w1.sizes());
  check_weight(w1, x, op, "primary_weight");
  d.init = w1.size(0);
  const at::Tensor& w2 = cheap_weight;
  const int64_t dw = w2.dim() == 4 ? w2.size(2) : 0;
  TORCH_CHECK(w2.dim() == 4 && w2.size(1) == 1 && w2.size(3) == dw && (dw == 1 || dw == 3 || dw == 5 || dw == 7) &&
                  w2.size(0) >= d.init && w2.size(0) % d.init == 0,
              op, ": expected cheap_weight of shape [init*(ratio-1), 1, dw, dw] with init = ", d.init,
              ", ratio >= 2 and dw in {1, 3, 5, 7}, got ", w2.sizes());
  check_weight(w2, x, op, "cheap_weight");
  d.cheap = w2.size(0);
  d.dw = dw;
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
    TORCH_CHECK(g.numel() > 0 || d.N * d.H * d.W == 0, op, ": expected a gate with Hg, Wg >= 1, got ", g.sizes());
    check_tensor(g, x, x.scalar_type(), op, "gate");
    TORCH_CHECK(g.is_contiguous(), op, ": expected gate contiguous (NCHW), got strides ", g.strides());
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
