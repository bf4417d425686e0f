// The gate upsample on the GPU, on top of F.interpolate's index math (../upsample.h): sampling a pooled-resolution
// gate [Hg, Wg] plane at a full-resolution pixel, and the two adjoints the backward kernels use.
#pragma once

#include <cstdint>

#include "cuda/common.cuh"
#include "upsample.h"

namespace ghostfast {

// The bilinear blend of four neighbours, in the association of ATen's upsample_bilinear2d.
template <typename acc_t>
__device__ __forceinline__ acc_t bilinear_blend(acc_t lh, acc_t lw, acc_t v00, acc_t v01, acc_t v10, acc_t v11) {
  const acc_t one = acc_t(1);
  return (one - lh) * ((one - lw) * v00 + lw * v01) + lh * ((one - lw) * v10 + lw * v11);
}

template <typename acc_t>
struct GateSrc {
  int64_t h0, h1, w0, w1;
  acc_t lh, lw;  // weights of h1 / w1 (bilinear); 0 for nearest
};

// Where full-resolution pixel (h, w) of an H x W output reads a Hg x Wg gate.
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
  return bilinear_blend(s.lh, s.lw, to_acc<acc_t>(g[s.h0 * Wg + s.w0]), to_acc<acc_t>(g[s.h0 * Wg + s.w1]),
                        to_acc<acc_t>(g[s.h1 * Wg + s.w0]), to_acc<acc_t>(g[s.h1 * Wg + s.w1]));
}

// Adjoint of gate_sample by scatter: add `v` (a full-resolution gradient) into the (n, channel) plane of the gate
// gradient. Neighbouring pixels (and tiles) share gate pixels: atomics.
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

// Adjoint of the upsample by gather, for a 2x upsample of a HP x WP plane to H x W (H in {2 HP, 2 HP + 1}): the
// gradient reaching pooled pixel (pi, pj) from the (n, channel) plane g [H, W] (strides sgh, sgw). The
// full-resolution rows / columns reading it lie in [2*pi - 2, 2*pi + 4) (nearest: [2*pi, 2*pi + 3); bilinear:
// [2*pi - 1, 2*pi + 4)); membership is decided by the forward's own index math.
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

}  // namespace ghostfast
