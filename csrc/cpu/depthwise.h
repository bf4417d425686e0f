// The Ghost module's cheap depthwise conv (K x K, K in {1, 3, 5, 7}) on zero-padded rows, and its weight gradient:
// NCHW vectorized along W, channels_last along the channels.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

#include "cpu/vec.h"

namespace ghostfast::cpu {

// The kernel sizes the op allows (csrc/ghost_module.cpp checks them); each has its own unrolled instantiation.
inline bool depthwise_size_supported(int64_t K) { return K == 1 || K == 3 || K == 5 || K == 7; }

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------

// NCHW, one output row: out[w] (+)= sum_{ky, kx} wt[ky*K + kx] * rows[ky][w + kx], w < W. rows[ky] points at the
// start of a zero-padded row (image column c at index c + R; a row outside the image is a zero row). Writes whole
// vectors (round_up(W, V) elements of out); the rows need V + K elements of slack.
template <typename acc_t, int K>
void dw_row_planar_k(const acc_t* const* rows, const acc_t* wt, int64_t W, acc_t* out, bool accumulate) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec wv[K * K];
#pragma GCC unroll 49
  for (int t = 0; t < K * K; ++t) wv[t] = Vec(wt[t]);
  for (int64_t w = 0; w < W; w += V) {
    Vec a = accumulate ? Vec::loadu(out + w) : Vec(acc_t(0));
#pragma GCC unroll 7
    for (int ky = 0; ky < K; ++ky) {
      const acc_t* r = rows[ky] + w;
#pragma GCC unroll 7
      for (int kx = 0; kx < K; ++kx) a = at::vec::fmadd(wv[ky * K + kx], Vec::loadu(r + kx), a);
    }
    a.store(out + w);
  }
}

// NCHW, two output rows from K + 1 input rows (each input row loaded once for both): out0 from rows[0 .. K),
// out1 = out0 + ostride from rows[1 .. K]. The last (partial) vectors go first: a row's overflow past W lands in the
// next row's first elements, which are written afterwards.
template <typename acc_t, int K>
void dw_rows2_planar_k(const acc_t* const* rows, const acc_t* wt, int64_t W, acc_t* out0, int64_t ostride,
                       bool accumulate) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  acc_t* out1 = out0 + ostride;
  Vec wv[K * K];
#pragma GCC unroll 49
  for (int t = 0; t < K * K; ++t) wv[t] = Vec(wt[t]);
  const int64_t wlast = (div_up(W, V) - 1) * V;
  auto one = [&](int64_t w) {
    Vec a0 = accumulate ? Vec::loadu(out0 + w) : Vec(acc_t(0));
    Vec a1 = accumulate ? Vec::loadu(out1 + w) : Vec(acc_t(0));
#pragma GCC unroll 8
    for (int r = 0; r <= K; ++r) {
      const acc_t* p = rows[r] + w;
#pragma GCC unroll 7
      for (int kx = 0; kx < K; ++kx) {
        const Vec xv = Vec::loadu(p + kx);
        if (r < K) a0 = at::vec::fmadd(wv[r * K + kx], xv, a0);
        if (r >= 1) a1 = at::vec::fmadd(wv[(r - 1) * K + kx], xv, a1);
      }
    }
    a0.store(out0 + w);
    a1.store(out1 + w);
  };
  one(wlast);
  for (int64_t w = 0; w < wlast; w += V) one(w);
}

template <typename acc_t, int K>
void dw_rows_planar_k(const acc_t* const* rows, int64_t nout, const acc_t* wt, int64_t W, acc_t* out,
                      int64_t ostride, bool accumulate) {
  int64_t i = 0;
  if constexpr (K > 1) {
    for (; i + 1 < nout; i += 2) dw_rows2_planar_k<acc_t, K>(rows + i, wt, W, out + i * ostride, ostride, accumulate);
  }
  for (; i < nout; ++i) dw_row_planar_k<acc_t, K>(rows + i, wt, W, out + i * ostride, accumulate);
}

// NCHW: nout output rows (stride ostride; ostride == W packs them back to back) from input rows rows[0 .. nout+K-1)
template <typename acc_t>
void dw_rows_planar(const acc_t* const* rows, int64_t nout, int64_t K, const acc_t* wt, int64_t W, acc_t* out,
                    int64_t ostride, bool accumulate) {
  switch (K) {
    case 1: return dw_rows_planar_k<acc_t, 1>(rows, nout, wt, W, out, ostride, accumulate);
    case 3: return dw_rows_planar_k<acc_t, 3>(rows, nout, wt, W, out, ostride, accumulate);
    case 5: return dw_rows_planar_k<acc_t, 5>(rows, nout, wt, W, out, ostride, accumulate);
    case 7: return dw_rows_planar_k<acc_t, 7>(rows, nout, wt, W, out, ostride, accumulate);
    default: TORCH_INTERNAL_ASSERT(false, "depthwise size ", K, " (the op allows 1, 3, 5, 7)");
  }
}

template <typename acc_t>
void dw_row_planar(const acc_t* const* rows, int64_t K, const acc_t* wt, int64_t W, acc_t* out, bool accumulate) {
  dw_rows_planar(rows, 1, K, wt, W, out, 0, accumulate);
}

// channels_last: out[w*os + c] (+)= sum_{ky valid, kx} wt[(ky*K + kx)*ws + c] * rows[ky][(w + kx)*ps + c] for every
// channel vector c < nvec*V and w < W; rows[ky] points at padded pixel 0 of a row (image column w at pixel w + R),
// nullptr for a row outside the image.
// (K a run-time argument here: measured faster than the fully unrolled taps at 3 channel vectors)
template <typename acc_t, int PB>
inline void dw_pm_block(const acc_t* const* rows, int64_t K, const acc_t* wt, int64_t ws, int64_t ps, int64_t w,
                        int64_t c, acc_t* out, int64_t os, bool accumulate) {
  using Vec = Vectorized<acc_t>;
  Vec a[PB];
#pragma GCC unroll 4
  for (int q = 0; q < PB; ++q) a[q] = accumulate ? Vec::loadu(out + (w + q) * os + c) : Vec(acc_t(0));
  for (int64_t ky = 0; ky < K; ++ky) {
    const acc_t* r = rows[ky];
    if (r == nullptr) continue;
    r += w * ps + c;
    const acc_t* wk = wt + ky * K * ws + c;
    for (int64_t kx = 0; kx < K; ++kx) {
      const Vec wv = Vec::loadu(wk + kx * ws);
#pragma GCC unroll 4
      for (int q = 0; q < PB; ++q) a[q] = at::vec::fmadd(wv, Vec::loadu(r + (q + kx) * ps), a[q]);
    }
  }
#pragma GCC unroll 4
  for (int q = 0; q < PB; ++q) a[q].store(out + (w + q) * os + c);
}

template <typename acc_t, int K>
void dw_row_pm_k(const acc_t* const* rows, const acc_t* wt, int64_t ws, int64_t ps, int64_t nvec, int64_t W,
                 acc_t* out, int64_t os, bool accumulate) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  for (int64_t cv = 0; cv < nvec; ++cv) {
    const int64_t c = cv * V;
    int64_t w = 0;
    for (; w + 4 <= W; w += 4) dw_pm_block<acc_t, 4>(rows, K, wt, ws, ps, w, c, out, os, accumulate);
    for (; w < W; ++w) dw_pm_block<acc_t, 1>(rows, K, wt, ws, ps, w, c, out, os, accumulate);
  }
}

template <typename acc_t>
void dw_row_pm(const acc_t* const* rows, int64_t K, const acc_t* wt, int64_t ws, int64_t ps, int64_t nvec, int64_t W,
               acc_t* out, int64_t os, bool accumulate) {
  switch (K) {
    case 1: return dw_row_pm_k<acc_t, 1>(rows, wt, ws, ps, nvec, W, out, os, accumulate);
    case 3: return dw_row_pm_k<acc_t, 3>(rows, wt, ws, ps, nvec, W, out, os, accumulate);
    case 5: return dw_row_pm_k<acc_t, 5>(rows, wt, ws, ps, nvec, W, out, os, accumulate);
    case 7: return dw_row_pm_k<acc_t, 7>(rows, wt, ws, ps, nvec, W, out, os, accumulate);
    default: TORCH_INTERNAL_ASSERT(false, "depthwise size ", K, " (the op allows 1, 3, 5, 7)");
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradient
// ---------------------------------------------------------------------------------------------------------------

// NCHW grad_w2 of one owned row: accw[(ky*K + kx)*V ..] += g[w] * rows[ky][w + kx] over w < W; rows[ky] nullptr: a
// row outside the image. The last vector's lanes past W are dropped from both factors: the row read there belongs
// to the next row (an Inf there times the zeroed g would be NaN).
template <typename acc_t, int K>
void dwgrad_row_planar_k(const acc_t* const* rows, const acc_t* g, int64_t W, acc_t* accw) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for (int64_t ky = 0; ky < K; ++ky) {
    const acc_t* r = rows[ky];
    if (r == nullptr) continue;
    acc_t* aw = accw + ky * K * V;
    Vec a[K];
    for (int kx = 0; kx < K; ++kx) a[kx] = Vec::loadu(aw + kx * V);
    int64_t w = 0;
    for (; w + V <= W; w += V) {
      const Vec gv = Vec::loadu(g + w);
#pragma GCC unroll 7
      for (int kx = 0; kx < K; ++kx) a[kx] = at::vec::fmadd(gv, Vec::loadu(r + w + kx), a[kx]);
    }
    if (w < W) {
      const Vec gv = keep_first(Vec::loadu(g + w), W - w);
#pragma GCC unroll 7
      for (int kx = 0; kx < K; ++kx) a[kx] = at::vec::fmadd(gv, keep_first(Vec::loadu(r + w + kx), W - w), a[kx]);
    }
    for (int kx = 0; kx < K; ++kx) a[kx].store(aw + kx * V);
  }
}

template <typename acc_t>
void dwgrad_row_planar(const acc_t* const* rows, int64_t K, const acc_t* g, int64_t W, acc_t* accw) {
  switch (K) {
    case 1: return dwgrad_row_planar_k<acc_t, 1>(rows, g, W, accw);
    case 3: return dwgrad_row_planar_k<acc_t, 3>(rows, g, W, accw);
    case 5: return dwgrad_row_planar_k<acc_t, 5>(rows, g, W, accw);
    case 7: return dwgrad_row_planar_k<acc_t, 7>(rows, g, W, accw);
    default: TORCH_INTERNAL_ASSERT(false, "depthwise size ", K, " (the op allows 1, 3, 5, 7)");
  }
}

// channels_last grad_w2 of one owned row: aw[(ky*K + kx)*Cq + c] += sum_w g[w*gs + c] * rows[ky][(w + kx)*ps + c]
// for every channel vector c (one register accumulator per tap: independent FMA chains); gs is Cq
template <typename acc_t, int K>
void dwgrad_row_pm_k(const acc_t* const* rows, const acc_t* g, int64_t gs, int64_t ps, int64_t nvec, int64_t W,
                     acc_t* aw) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t Cq = gs;
  for (int64_t ky = 0; ky < K; ++ky) {
    const acc_t* r = rows[ky];
    if (r == nullptr) continue;
    for (int64_t cv = 0; cv < nvec; ++cv) {
      const int64_t c = cv * V;
      Vec a[K];
#pragma GCC unroll 7
      for (int kx = 0; kx < K; ++kx) a[kx] = Vec(acc_t(0));
      for (int64_t w = 0; w < W; ++w) {
        const Vec gv = Vec::loadu(g + w * gs + c);
        const acc_t* rp = r + w * ps + c;
#pragma GCC unroll 7
        for (int kx = 0; kx < K; ++kx) a[kx] = at::vec::fmadd(gv, Vec::loadu(rp + kx * ps), a[kx]);
      }
#pragma GCC unroll 7
      for (int kx = 0; kx < K; ++kx) {
        acc_t* ap = aw + (ky * K + kx) * Cq + c;
        (Vec::loadu(ap) + a[kx]).store(ap);
      }
    }
  }
}

template <typename acc_t>
void dwgrad_row_pm(const acc_t* const* rows, int64_t K, const acc_t* g, int64_t gs, int64_t ps, int64_t nvec,
                   int64_t W, acc_t* aw) {
  switch (K) {
    case 1: return dwgrad_row_pm_k<acc_t, 1>(rows, g, gs, ps, nvec, W, aw);
    case 3: return dwgrad_row_pm_k<acc_t, 3>(rows, g, gs, ps, nvec, W, aw);
    case 5: return dwgrad_row_pm_k<acc_t, 5>(rows, g, gs, ps, nvec, W, aw);
    case 7: return dwgrad_row_pm_k<acc_t, 7>(rows, g, gs, ps, nvec, W, aw);
    default: TORCH_INTERNAL_ASSERT(false, "depthwise size ", K, " (the op allows 1, 3, 5, 7)");
  }
}

}  // namespace ghostfast::cpu
