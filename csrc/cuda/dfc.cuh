// What the DFC attention's CUDA forward (dfc.cu) and backward (dfc_backward.cu) share: the dimensions and argument
// checks of both schemas, the 2x2 average pool of x (NCHW or channels_last) and the 1x1 conv's region load / epilogue.
//
//   a3 = bn3(W3 avgpool2x2(x))            [N, C, HP, WP], HP = H // 2, WP = W // 2
//   a4 = bn4(h 1x5 conv of a3)            zero padding (2 columns) of the biased a3
//   z  = bn5(v 5x1 conv of a4)            zero padding (2 rows) of the biased a4
//   g  = sigmoid(z)                       mode 'gate': written at [N, C, HP, WP];
//                                         'nearest' / 'bilinear': upsampled to [N, C, H, W] as F.interpolate does
// Schema and conventions: ../dfc.cpp; the spec: ghostfast/reference.py.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

#include "common.h"
#include "cuda/common.cuh"

namespace ghostfast {

constexpr int kTaps = 5;  // the 1x5 and 5x1 depthwise convs
constexpr int kModeGate = 0, kModeNearest = 1, kModeBilinear = 2;

struct DfcDims {
  int64_t N, C_in, H, W, C, HP, WP;
  int mode;
};

// The checks both kernels make of x, the three weights and the mode.
inline DfcDims check_dfc_args(const char* op, const at::Tensor& x, const at::Tensor& conv_weight,
                              const at::Tensor& h_weight, const at::Tensor& v_weight, c10::string_view mode) {
  check_x(x, c10::DeviceType::CUDA, op);
  const at::ScalarType dt = x.scalar_type();
  DfcDims d{};
  d.N = x.size(0);
  d.C_in = x.size(1);
  d.H = x.size(2);
  d.W = x.size(3);
  d.HP = d.H / 2;
  d.WP = d.W / 2;
  const at::Tensor& cw = conv_weight;
  TORCH_CHECK(cw.defined() && cw.dim() == 4 && cw.size(0) >= 1, op,
              ": expected conv_weight of shape [C, C_in, 1, 1] with C >= 1, got ",
              cw.defined() ? cw.sizes() : at::IntArrayRef{});
  d.C = cw.size(0);
  check_param(cw, x, dt, op, "conv_weight", {d.C, d.C_in, 1, 1});
  check_param(h_weight, x, dt, op, "h_weight", {d.C, 1, 1, kTaps});
  check_param(v_weight, x, dt, op, "v_weight", {d.C, 1, kTaps, 1});
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

// Margin of a pooled dimension of `size` cut into tiles of `t`: `tiled` when t < size, else 0 (one tile covers it).
inline int margin(int t, int64_t size, int tiled) { return t < size ? tiled : 0; }

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

// a3 = y3 * scale + shift on the region, 0 outside the image (the h conv's zero padding) and for channels past C;
// optionally y3 itself on the tile (the backward's bn3 scale gradient). scale / shift are indexed by the block's
// channel c (the forward's folded table, the backward's vectors from channel c0 on).
template <typename acc_t>
struct A3Epi {
  acc_t* a3;   // [CB][PA]
  acc_t* y3t;  // [CB][PT] or null
  const acc_t* scale;
  const acc_t* shift;
  int64_t c0, C, HP, WP, pb_h, pb_w;
  int WA, PA, PT, TH, TW, mh, mw;
  __device__ __forceinline__ void operator()(int p, int c, acc_t v) const {
    const int ai = p / WA;
    const int aj = p - ai * WA;
    const int64_t pi = pb_h + ai;
    const int64_t pj = pb_w + aj;
    acc_t r = acc_t(0);
    if (c0 + c < C && pi >= 0 && pi < HP && pj >= 0 && pj < WP) r = v * scale[c] + shift[c];
    a3[c * PA + p] = r;
    if (y3t != nullptr) {
      const int ti = ai - mh;
      const int tj = aj - mw;
      if (ti >= 0 && ti < TH && tj >= 0 && tj < TW) y3t[c * PT + ti * TW + tj] = v;
    }
  }
};

}  // namespace ghostfast
