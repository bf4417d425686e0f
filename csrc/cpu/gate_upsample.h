// The Ghost module's gate: upsampled on the fly to the output rows with F.interpolate's source indices
// (csrc/upsample.h; NCHW planes or channels_last rows), and the adjoint of that upsample for the gate gradient.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/vec.h"
#include "upsample.h"

namespace ghostfast::cpu {

template <typename acc_t>
struct GateTables {
  std::vector<int64_t> h0, h1, w0, w1;  // nearest: h0 == h1, w0 == w1
  std::vector<acc_t> lh, lw;            // weight of h1 / w1 (bilinear)

  void build(int64_t H, int64_t W, int64_t Hg, int64_t Wg, bool bilinear) {
    auto axis = [&](int64_t out_size, int64_t in_size, std::vector<int64_t>& i0, std::vector<int64_t>& i1,
                    std::vector<acc_t>& lam) {
      i0.resize(out_size);
      i1.resize(out_size);
      lam.resize(out_size);
      for (int64_t d = 0; d < out_size; ++d) {
        if (bilinear) {
          const LinearSource<acc_t> s = linear_source<acc_t>(d, in_size, out_size);
          i0[d] = s.i0;
          i1[d] = s.i1;
          lam[d] = s.lambda;
        } else {
          i0[d] = i1[d] = nearest_source(d, in_size, out_size);
          lam[d] = acc_t(0);
        }
      }
    };
    axis(H, Hg, h0, h1, lh);
    axis(W, Wg, w0, w1, lw);
  }
};

template <typename acc_t, typename scalar_t>
inline acc_t bilerp(const scalar_t* r0, const scalar_t* r1, int64_t w0, int64_t w1, acc_t lh, acc_t lw) {
  const acc_t h0l = acc_t(1) - lh;
  const acc_t w0l = acc_t(1) - lw;
  return h0l * (w0l * static_cast<acc_t>(r0[w0]) + lw * static_cast<acc_t>(r0[w1])) +
         lh * (w0l * static_cast<acc_t>(r1[w0]) + lw * static_cast<acc_t>(r1[w1]));
}

// horizontal pass of the upsample for gate row r: dst[w] = row r at the W output columns
template <typename acc_t, typename scalar_t>
inline void gate_hrow(acc_t* dst, const scalar_t* r, int64_t W, const GateTables<acc_t>& t, bool bilinear) {
  if (!bilinear) {
    for (int64_t w = 0; w < W; ++w) dst[w] = static_cast<acc_t>(r[t.w0[w]]);
  } else {
    for (int64_t w = 0; w < W; ++w) {
      const acc_t lw = t.lw[w];
      dst[w] = (acc_t(1) - lw) * static_cast<acc_t>(r[t.w0[w]]) + lw * static_cast<acc_t>(r[t.w1[w]]);
    }
  }
}

// upsampled gate of one channel (plane gp = [Hg][Wg]) on rows [ha, hb): dst[(h - ha)*W + w]. The gate rows they
// read are upsampled horizontally once each into hr (hr_rows rows of W + V), then blended per output row
// (vectorized); with more distinct gate rows than hr holds (a gate taller than 2x the output), row by row.
template <typename acc_t, typename scalar_t>
void gate_rows(acc_t* dst, acc_t* hr, int64_t hr_rows, const scalar_t* gp, int64_t ha, int64_t hb, int64_t W,
               int64_t Wg, const GateTables<acc_t>& t, bool bilinear) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t glo = t.h0[ha], ghi = t.h1[hb - 1];
  const int64_t hs = W + V;  // hr row stride
  if (ghi - glo + 1 > hr_rows) {
    for (int64_t h = ha; h < hb; ++h) {
      acc_t* d = dst + (h - ha) * W;
      const scalar_t* r0 = gp + t.h0[h] * Wg;
      if (!bilinear) {
        for (int64_t w = 0; w < W; ++w) d[w] = static_cast<acc_t>(r0[t.w0[w]]);
      } else {
        const scalar_t* r1 = gp + t.h1[h] * Wg;
        const acc_t lh = t.lh[h];
        for (int64_t w = 0; w < W; ++w) d[w] = bilerp<acc_t>(r0, r1, t.w0[w], t.w1[w], lh, t.lw[w]);
      }
    }
    return;
  }
  int64_t last = glo - 1;
  for (int64_t h = ha; h < hb; ++h) {
    for (const int64_t g : {t.h0[h], t.h1[h]}) {
      if (g > last) {
        gate_hrow(hr + (g - glo) * hs, gp + g * Wg, W, t, bilinear);
        last = g;
      }
    }
  }
  for (int64_t h = ha; h < hb; ++h) {
    acc_t* d = dst + (h - ha) * W;
    const acc_t* r0 = hr + (t.h0[h] - glo) * hs;
    if (!bilinear) {
      int64_t w = 0;
      for (; w + V <= W; w += V) Vec::loadu(r0 + w).store(d + w);
      for (; w < W; ++w) d[w] = r0[w];
    } else {
      const acc_t* r1 = hr + (t.h1[h] - glo) * hs;
      const Vec l1(t.lh[h]), l0(acc_t(1) - t.lh[h]);
      int64_t w = 0;
      for (; w + V <= W; w += V) (l0 * Vec::loadu(r0 + w) + l1 * Vec::loadu(r1 + w)).store(d + w);
      for (; w < W; ++w) d[w] = (acc_t(1) - t.lh[h]) * r0[w] + t.lh[h] * r1[w];
    }
  }
}

// Horizontal adjoint of the upsample for one gate row: u[w0[w]] += (1 - lw) v[w], u[w1[w]] += lw v[w] with
// v[w] = vals[w * stride]. The source columns never decrease with w (w1 is w0 or w0 + 1): the sums of the current
// column and the next one are carried in registers and each column is written once.
template <typename acc_t>
inline void hscatter(acc_t* u, const acc_t* vals, int64_t stride, int64_t W, const GateTables<acc_t>& t,
                     bool bilinear) {
  int64_t p = t.w0[0];
  acc_t s0 = acc_t(0), s1 = acc_t(0);  // pending sums of columns p and p + 1
  for (int64_t w = 0; w < W; ++w) {
    const int64_t i0 = t.w0[w];
    while (p < i0) {
      u[p] += s0;
      s0 = s1;
      s1 = acc_t(0);
      ++p;
    }
    const acc_t v = vals[w * stride];
    if (!bilinear) {
      s0 += v;
    } else {
      const acc_t lw = t.lw[w];
      s0 += (acc_t(1) - lw) * v;
      if (t.w1[w] != i0) s1 += lw * v;
      else s0 += lw * v;
    }
  }
  u[p] += s0;
  if (s1 != acc_t(0)) u[p + 1] += s1;
}

// Adjoint of the gate upsample over consecutive output rows (in increasing order). A row of values holds W pixels of
// `stride` interleaved channels (NCHW: one channel, stride 1; channels_last: the row of all channels). add(h, vals)
// spreads it vertically onto accumulators of the gate rows h reads (vectorized); flush() spreads each accumulated
// gate row horizontally into the gate gradient (channel c at ug + c * ug_cstride, rows from gh_lo, Wg wide) for the
// channels [c_lo, c_hi), once per gate row.
template <typename acc_t>
struct GateAdjoint {
  std::vector<acc_t> buf;
  int64_t W = 0, stride = 1, L = 0, Wg = 0, cap = 0, hs = 0;
  int64_t glo = 0, ghi = -1;  // accumulated gate rows [glo, ghi]
  const GateTables<acc_t>* t = nullptr;
  bool bilinear = false;
  acc_t* ug = nullptr;
  int64_t ug_cstride = 0, gh_lo = 0, c_lo = 0, c_hi = 1;

  void init(int64_t W_, int64_t stride_, int64_t Wg_, int64_t rows, const GateTables<acc_t>* t_, bool bilinear_) {
    W = W_;
    stride = stride_;
    L = W * stride;
    Wg = Wg_;
    cap = std::max<int64_t>(rows, 2);
    hs = L + Vectorized<acc_t>::size();
    buf.assign(static_cast<size_t>(cap * hs), acc_t(0));
    t = t_;
    bilinear = bilinear_;
  }
  void begin(acc_t* ug_, int64_t ug_cstride_, int64_t gh_lo_, int64_t c_lo_, int64_t c_hi_) {
    ug = ug_;
    ug_cstride = ug_cstride_;
    gh_lo = gh_lo_;
    c_lo = c_lo_;
    c_hi = c_hi_;
    glo = 0;
    ghi = -1;
  }
  // spread accumulated rows [glo, upto) horizontally into ug and drop them
  void flush_below(int64_t upto) {
    const int64_t n = std::min(upto, ghi + 1) - glo;
    if (n <= 0) return;
    for (int64_t i = 0; i < n; ++i) {
      const acc_t* r = buf.data() + i * hs;
      for (int64_t c = c_lo; c < c_hi; ++c)
        hscatter(ug + c * ug_cstride + (glo + i - gh_lo) * Wg, r + c, stride, W, *t, bilinear);
    }
    const int64_t keep = ghi + 1 - (glo + n);
    if (keep > 0) std::memmove(buf.data(), buf.data() + n * hs, static_cast<size_t>(keep * hs) * sizeof(acc_t));
    glo += n;
    if (glo > ghi) {
      glo = 0;
      ghi = -1;
    }
  }
  void flush() { flush_below(ghi + 1); }
  acc_t* row(int64_t g) {  // the accumulator of gate row g >= glo (zeroed when new)
    if (ghi < glo) {
      glo = g;
      ghi = g - 1;
    }
    if (g - glo + 1 > cap) flush_below(g - cap + 1);
    if (ghi < glo) {
      glo = g;
      ghi = g - 1;
    }
    while (ghi < g) {
      ++ghi;
      std::fill_n(buf.data() + (ghi - glo) * hs, hs, acc_t(0));
    }
    return buf.data() + (g - glo) * hs;
  }
  void add(int64_t h, const acc_t* vals) {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const int64_t g0 = t->h0[h];
    flush_below(g0);  // rows below g0 are complete (h increases, h0 never decreases)
    if (!bilinear) {
      acc_t* r = row(g0);
      int64_t i = 0;
      for (; i + V <= L; i += V) (Vec::loadu(r + i) + Vec::loadu(vals + i)).store(r + i);
      for (; i < L; ++i) r[i] += vals[i];
    } else {
      const acc_t l1 = t->lh[h], l0 = acc_t(1) - l1;
      const int64_t g1 = t->h1[h];
      row(g0);
      acc_t* r1 = row(g1);
      acc_t* r0 = buf.data() + (g0 - glo) * hs;  // row(g1) may have moved the buffer
      const Vec v0(l0), v1(l1);
      int64_t i = 0;
      for (; i + V <= L; i += V) {
        const Vec x = Vec::loadu(vals + i);
        at::vec::fmadd(x, v0, Vec::loadu(r0 + i)).store(r0 + i);
        at::vec::fmadd(x, v1, Vec::loadu(r1 + i)).store(r1 + i);
      }
      for (; i < L; ++i) {
        r0[i] += vals[i] * l0;
        r1[i] += vals[i] * l1;
      }
    }
  }
};

// channels_last: the upsampled gate of channels [0, oc) on output rows visited in increasing order, as [w][oc] rows.
// Each gate row is upsampled horizontally once into a small cache (monotone rows: three slots suffice), output rows
// blend two cached rows (bilinear) or point at one (nearest).
template <typename acc_t>
struct GateRowCache {
  std::vector<acc_t> data, blend;
  int64_t L = 0, hs = 0;
  int64_t key[3] = {-1, -1, -1};

  void init(int64_t W, int64_t oc) {
    L = W * oc;
    hs = L + Vectorized<acc_t>::size();
    data.assign(static_cast<size_t>(3 * hs), acc_t(0));
    blend.assign(static_cast<size_t>(hs), acc_t(0));
    reset();
  }
  void reset() { key[0] = key[1] = key[2] = -1; }  // a new image
  template <typename scalar_t>
  const acc_t* slot(int64_t g, int64_t pinned, const scalar_t* gn, int64_t oc, int64_t W, int64_t Hg, int64_t Wg,
                    const GateTables<acc_t>& t, bool bilinear) {
    int64_t victim = -1;
    for (int i = 0; i < 3; ++i) {
      if (key[i] == g) return data.data() + i * hs;
      if (key[i] != pinned && (victim < 0 || key[i] < key[victim])) victim = i;
    }
    acc_t* dst = data.data() + victim * hs;
    key[victim] = g;
    for (int64_t c = 0; c < oc; ++c) {
      const scalar_t* r = gn + c * Hg * Wg + g * Wg;
      if (!bilinear) {
        for (int64_t w = 0; w < W; ++w) dst[w * oc + c] = static_cast<acc_t>(r[t.w0[w]]);
      } else {
        for (int64_t w = 0; w < W; ++w) {
          const acc_t lw = t.lw[w];
          dst[w * oc + c] = (acc_t(1) - lw) * static_cast<acc_t>(r[t.w0[w]]) + lw * static_cast<acc_t>(r[t.w1[w]]);
        }
      }
    }
    return dst;
  }
  // the gate row of output row h: [w][oc]
  template <typename scalar_t>
  const acc_t* row(int64_t h, const scalar_t* gn, int64_t oc, int64_t W, int64_t Hg, int64_t Wg,
                   const GateTables<acc_t>& t, bool bilinear) {
    using Vec = Vectorized<acc_t>;
    constexpr int64_t V = Vec::size();
    const int64_t g0 = t.h0[h];
    const acc_t* r0 = slot(g0, -2, gn, oc, W, Hg, Wg, t, bilinear);
    if (!bilinear) return r0;
    const int64_t g1 = t.h1[h];
    const acc_t* r1 = slot(g1, g0, gn, oc, W, Hg, Wg, t, bilinear);
    const acc_t l1 = t.lh[h], l0 = acc_t(1) - l1;
    const Vec v0(l0), v1(l1);
    acc_t* d = blend.data();
    int64_t i = 0;
    for (; i + V <= L; i += V) (v0 * Vec::loadu(r0 + i) + v1 * Vec::loadu(r1 + i)).store(d + i);
    for (; i < L; ++i) d[i] = l0 * r0[i] + l1 * r1[i];
    return d;
  }
};

}  // namespace ghostfast::cpu
