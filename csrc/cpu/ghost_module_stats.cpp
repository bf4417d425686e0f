// Training-mode BatchNorm statistics of the Ghost module on the CPU (_ghost_module_stats_kernel): the forward's row
// walk without `out`; per sub-block and channel, the values of z1 = W1 x (stage 1) or z2 = dw(act(bn1(z1))) (stage
// 2) give a (count, mean, M2) chunk (mean first, then the squared deviations from it: no cancellation when
// |mean| >> std), merged into the group's running partial with Chan's formula, the groups merged in group order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "batch_norm.h"
#include "cpu/activation.h"
#include "cpu/depthwise.h"
#include "cpu/gemm.h"
#include "cpu/ghost_module.h"
#include "cpu/vec.h"

namespace ghostfast::cpu::ghost_module {
namespace {

template <typename acc_t>
struct StatParts {  // one group's running (count, mean, M2) per channel
  std::vector<int64_t> n;
  std::vector<acc_t> mean, m2;

  void init(int64_t channels) {
    n.assign(static_cast<size_t>(channels), 0);
    mean.assign(static_cast<size_t>(channels), acc_t(0));
    m2.assign(static_cast<size_t>(channels), acc_t(0));
  }

  // Chan et al.: merge a chunk of nb values with mean mb and sum of squared deviations m2b into channel c
  void merge(int64_t c, int64_t nb, acc_t mb, acc_t m2b) {
    if (nb <= 0) return;
    const int64_t na = n[c];
    if (na == 0) {
      n[c] = nb;
      mean[c] = mb;
      m2[c] = m2b;
      return;
    }
    const int64_t nt = na + nb;
    const acc_t delta = mb - mean[c];
    mean[c] += delta * static_cast<acc_t>(static_cast<double>(nb) / static_cast<double>(nt));
    m2[c] += m2b + delta * delta * static_cast<acc_t>(static_cast<double>(na) * static_cast<double>(nb) /
                                                      static_cast<double>(nt));
    n[c] = nt;
  }

  // every channel of `other` merged into this one
  void merge_all(const StatParts& other) {
    for (size_t c = 0; c < n.size(); ++c) merge(static_cast<int64_t>(c), other.n[c], other.mean[c], other.m2[c]);
  }

  // each channel's mean and biased variance into the [channels] tensors mean and var
  void write(const at::Tensor& mean_out, const at::Tensor& var_out) const {
    acc_t* mp = mean_out.data_ptr<acc_t>();
    acc_t* vp = var_out.data_ptr<acc_t>();
    for (size_t c = 0; c < n.size(); ++c) {
      mp[c] = mean[c];
      vp[c] = m2[c] / static_cast<acc_t>(n[c]);
    }
  }
};

// (mean, M2) of p[0 .. cnt), cnt >= 1: the mean first, then the squared deviations from it
template <typename acc_t>
inline void chunk_stats(const acc_t* p, int64_t cnt, acc_t& mean, acc_t& m2) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  Vec s0(acc_t(0)), s1(acc_t(0));
  int64_t i = 0;
  for (; i + 2 * V <= cnt; i += 2 * V) {
    s0 = s0 + Vec::loadu(p + i);
    s1 = s1 + Vec::loadu(p + i + V);
  }
  for (; i + V <= cnt; i += V) s0 = s0 + Vec::loadu(p + i);
  if (i < cnt) s1 = s1 + Vec::loadu(p + i, static_cast<int>(cnt - i));
  mean = hsum(s0 + s1) / static_cast<acc_t>(cnt);
  const Vec mv(mean);
  Vec q0(acc_t(0)), q1(acc_t(0));
  i = 0;
  for (; i + 2 * V <= cnt; i += 2 * V) {
    const Vec d0 = Vec::loadu(p + i) - mv, d1 = Vec::loadu(p + i + V) - mv;
    q0 = at::vec::fmadd(d0, d0, q0);
    q1 = at::vec::fmadd(d1, d1, q1);
  }
  for (; i + V <= cnt; i += V) {
    const Vec d0 = Vec::loadu(p + i) - mv;
    q0 = at::vec::fmadd(d0, d0, q0);
  }
  if (i < cnt) {
    const Vec d1 = keep_first(Vec::loadu(p + i, static_cast<int>(cnt - i)) - mv, cnt - i);
    q1 = at::vec::fmadd(d1, d1, q1);
  }
  m2 = hsum(q0 + q1);
}

// channels_last: the chunk of np >= 1 pixels (stride ld) of channels [0, nch), vectorized along the channels, merged
// into sp's channels [0, nch)
template <typename acc_t>
void chunk_stats_pm(const acc_t* p, int64_t np, int64_t ld, int64_t nch, StatParts<acc_t>& sp) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  __at_align__ acc_t mt[V], qt[V];
  const Vec inv_n(acc_t(1) / static_cast<acc_t>(np));
  for (int64_t c = 0; c < nch; c += V) {
    Vec s0(acc_t(0)), s1(acc_t(0));
    int64_t i = 0;
    for (; i + 1 < np; i += 2) {
      s0 = s0 + Vec::loadu(p + i * ld + c);
      s1 = s1 + Vec::loadu(p + (i + 1) * ld + c);
    }
    if (i < np) s0 = s0 + Vec::loadu(p + i * ld + c);
    const Vec mv = (s0 + s1) * inv_n;
    Vec q0(acc_t(0)), q1(acc_t(0));
    for (i = 0; i + 1 < np; i += 2) {
      const Vec d0 = Vec::loadu(p + i * ld + c) - mv, d1 = Vec::loadu(p + (i + 1) * ld + c) - mv;
      q0 = at::vec::fmadd(d0, d0, q0);
      q1 = at::vec::fmadd(d1, d1, q1);
    }
    if (i < np) {
      const Vec d0 = Vec::loadu(p + i * ld + c) - mv;
      q0 = at::vec::fmadd(d0, d0, q0);
    }
    mv.store(mt);
    (q0 + q1).store(qt);
    const int64_t m = std::min<int64_t>(V, nch - c);
    for (int64_t l = 0; l < m; ++l) sp.merge(c + l, np, mt[l], qt[l]);
  }
}

template <Act A, typename scalar_t>
void stats_planar_segment(const Ctx<scalar_t>& cx, int stage, const Segment& sg, FwdWs<acc_of<scalar_t>>& ws,
                          StatParts<acc_of<scalar_t>>& sp) {
  using acc_t = acc_of<scalar_t>;
  const Geometry& d = cx.d;
  const int64_t W = d.W, H = d.H, R = d.R, K = d.K, KK = d.KK, Wp = W + 2 * R, HW = d.HW, G = ws.G;
  const int64_t n = sg.n, r0 = sg.r0, r1 = sg.r1;
  const scalar_t* xn = cx.x + n * d.C * HW;
  acc_t* z = ws.z.data();
  acc_t* ds = ws.ds.data();
  const acc_t** rows = ws.rows.data();

  int64_t lo = std::max<int64_t>(r0 - R, 0), hi = lo;  // the window holds rows [lo, hi)
  for (int64_t s = r0, e; s < r1; s = e) {
    e = std::min(s + G, r1);
    const int64_t nlo = std::max<int64_t>(s - R, 0), nhi = std::min(e + R, H);
    if (nlo > lo) {
      const int64_t keep = std::max<int64_t>(hi - nlo, 0);
      shift_rows(z, d.n_x1, ws.z_ps, W, nlo - lo, keep);
      shift_rows(ds, d.n_src, ws.ds_ps, Wp, nlo - lo, keep);
      lo = nlo;
      hi = std::max(hi, nlo);
    }
    if (nhi > hi) {
      // stage 1: z1 = W1 x as is; stage 2: x1 = act(z1 s1 + b1) and its padded copy
      const int64_t np = (nhi - hi) * W;
      acc_t* z0 = z + (hi - lo) * W;
      Epilogue<acc_t> epi;
      if (stage == 2) {
        epi.kind = Epilogue<acc_t>::ROW;
        epi.scale = cx.s1.data();
        epi.bias = cx.b1.data();
      }
      if (cx.zl != nullptr) {  // z1 given (A is Act::None for stage 1)
        const acc_t* zn = cx.zl + n * d.n_x1 * HW + hi * W;
        for (int64_t c = 0; c < d.n_x1; ++c)
          affine_act_row<A>(z0 + c * ws.z_ps, zn + c * HW, np, stage == 2 ? cx.s1[c] : acc_t(1),
                            stage == 2 ? cx.b1[c] : acc_t(0));
      } else {
        Gemm<acc_t, acc_t, scalar_t, acc_t, false, A>::run(d.n_x1, np, d.C, cx.w1.data(), d.C, 1, xn + hi * W, HW,
                                                        cx.x_end, z0, ws.z_ps, true, epi);
      }
      for (int64_t c = 0; c < d.n_src; ++c) {
        const acc_t* zc = z0 + c * ws.z_ps;
        acc_t* dsc = ds + c * ws.ds_ps;
        for (int64_t h = hi; h < nhi; ++h) copy_row_padded(dsc + (h - lo) * Wp + R, zc + (h - hi) * W, W);
      }
      hi = nhi;
    }
    const int64_t cnt = (e - s) * W;
    acc_t mean, m2;
    if (stage == 1) {
      for (int64_t c = 0; c < d.n_x1; ++c) {
        chunk_stats(z + c * ws.z_ps + (s - lo) * W, cnt, mean, m2);
        sp.merge(c, cnt, mean, m2);
      }
      continue;
    }
    for (int64_t o = 0; o < d.n_cheap; ++o) {
      const acc_t* plane = ds + (o / d.rm1) * ws.ds_ps;
      for (int64_t i = 0; i < e - s + K - 1; ++i) {
        const int64_t hh = s - R + i;
        rows[i] = (hh >= 0 && hh < H) ? plane + (hh - lo) * Wp : ws.zero.data();
      }
      dw_rows_planar(rows, e - s, K, cx.w2.data() + o * KK, W, ws.t.data(), W, false);
      chunk_stats(ws.t.data(), cnt, mean, m2);
      sp.merge(o, cnt, mean, m2);
    }
  }
}

template <Act A, typename scalar_t>
void stats_cl_segment(const Ctx<scalar_t>& cx, int stage, const Segment& sg, FwdWs<acc_of<scalar_t>>& ws,
                      StatParts<acc_of<scalar_t>>& sp) {
  using acc_t = acc_of<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Geometry& d = cx.d;
  const int64_t W = d.W, H = d.H, R = d.R, K = d.K, Wp = W + 2 * R, HW = d.HW, G = ws.G, C = d.C;
  const int64_t Zc = cx.Zc, Cq = cx.Cq, Cds = cx.Cds;
  const int64_t n = sg.n, r0 = sg.r0, r1 = sg.r1;
  const scalar_t* xn = cx.x + n * HW * C;
  acc_t* z = ws.z.data();
  acc_t* ds = ws.ds.data();
  const acc_t** rows = ws.rows.data();
  const int64_t zrs = W * Zc, dsrs = Wp * Cds;  // row strides

  int64_t lo = std::max<int64_t>(r0 - R, 0), hi = lo;
  for (int64_t s = r0, e; s < r1; s = e) {
    e = std::min(s + G, r1);
    const int64_t nlo = std::max<int64_t>(s - R, 0), nhi = std::min(e + R, H);
    if (nlo > lo) {
      const int64_t keep = std::max<int64_t>(hi - nlo, 0);
      shift_rows(z, 1, 0, zrs, nlo - lo, keep);
      if (d.n_cheap > 0) shift_rows(ds, 1, 0, dsrs, nlo - lo, keep);
      lo = nlo;
      hi = std::max(hi, nlo);
    }
    if (nhi > hi) {
      // stage 1: z1 = x W1^T as is; stage 2: x1 = act(z1 s1 + b1) and its padded copy (one channel per cheap one)
      const int64_t np = (nhi - hi) * W;
      acc_t* z0 = z + (hi - lo) * zrs;
      Epilogue<acc_t> epi;
      if (stage == 2) {
        epi.kind = Epilogue<acc_t>::COL;
        epi.scale = cx.s1.data();
        epi.bias = cx.b1.data();
      }
      if (cx.zl != nullptr) {  // z1 given (A is Act::None for stage 1)
        const acc_t* zp = cx.zl + (n * HW + hi * W) * d.n_x1;
        for (int64_t p = 0; p < np; ++p) {
          if (stage == 2) {
            affine_act_pixel<A>(z0 + p * Zc, zp + p * d.n_x1, d.n_x1, Zc, cx);
          } else {
            std::fill_n(z0 + p * Zc, Zc, acc_t(0));
            std::copy_n(zp + p * d.n_x1, d.n_x1, z0 + p * Zc);
          }
        }
      } else {
        Gemm<acc_t, scalar_t, acc_t, acc_t, false, A>::run(np, d.n_x1, C, xn + hi * W * C, C, 1, cx.w1.data(), Zc,
                                                        nullptr, z0, Zc, true, epi);
      }
      if (d.n_cheap > 0) {
        for (int64_t h = hi; h < nhi; ++h) {
          for (int64_t w = 0; w < W; ++w) {
            acc_t* dst = ds + (h - lo) * dsrs + (w + R) * Cds;
            const acc_t* src = z0 + ((h - hi) * W + w) * Zc;
            if (d.rm1 == 1) {
              for (int64_t c = 0; c < Cds; c += V) Vec::loadu(src + c).store(dst + c);
            } else {
              for (int64_t o = 0; o < d.n_cheap; ++o) dst[o] = src[o / d.rm1];
            }
          }
        }
      }
      hi = nhi;
    }
    if (stage == 1) {
      chunk_stats_pm(z + (s - lo) * zrs, (e - s) * W, Zc, d.n_x1, sp);
      continue;
    }
    acc_t* t = ws.t.data();
    for (int64_t h = s; h < e; ++h) {
      for (int64_t ky = 0; ky < K; ++ky) {
        const int64_t hh = h + ky - R;
        rows[ky] = (hh >= 0 && hh < H) ? ds + (hh - lo) * dsrs : nullptr;
      }
      dw_row_pm(rows, K, cx.w2.data(), Cq, Cds, Cq / V, W, t, Cq, false);
      chunk_stats_pm(t, W, Cq, d.n_cheap, sp);
    }
  }
}

template <typename scalar_t>
void stats_impl(const Geometry& geo, int stage, const at::Tensor& x, const at::Tensor& w1, const BatchNormArgs& bn1,
                const at::Tensor& w2, const at::Tensor& mean, const at::Tensor& var) {
  using acc_t = acc_of<scalar_t>;
  Ctx<scalar_t> cx;
  cx.prepare(geo, x, w1, w2, std::nullopt, false);
  cx.fold_batch_norms(bn1, nullptr);
  const Geometry& d = cx.d;
  const int64_t channels = stage == 1 ? d.n_x1 : d.n_cheap;
  const int64_t ng = num_groups(d.N * d.H);
  const auto groups = split_rows(d.N, d.H, ng);
  std::vector<StatParts<acc_t>> parts(static_cast<size_t>(ng));
  // stage 1 (z1) has no activation: one instantiation
  dispatch_act(stage == 1 ? Act::None : d.act, [&](auto act) {
    constexpr Act A = decltype(act)::value;
    at::parallel_for(0, ng, 1, [&](int64_t gb, int64_t ge) {
      auto ws = make_fwd_ws(cx);
      for (int64_t g = gb; g < ge; ++g) {
        parts[g].init(channels);
        for (const Segment& sg : groups[g]) {
          if (d.cl) stats_cl_segment<A>(cx, stage, sg, ws, parts[g]);
          else stats_planar_segment<A>(cx, stage, sg, ws, parts[g]);
        }
      }
    });
  });
  StatParts<acc_t> tot;
  tot.init(channels);
  for (const auto& part : parts) tot.merge_all(part);  // in group order: independent of the thread count
  tot.write(mean, var);
}

// z1 given (the _z1 kernels): the mean and biased variance of each channel of z1 itself. NCHW: a chunk per (image,
// channel) plane, the channels split among the threads; channels_last: a fixed number of pixel groups (so the result
// does not depend on the thread count), each in chunks of kPixels pixels copied to a padded block, merged in order.
template <typename acc_t>
void z1_stats_impl(const at::Tensor& z1, bool cl, const at::Tensor& mean, const at::Tensor& var) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  constexpr int64_t kPixels = 64;
  const int64_t N = z1.size(0), C = z1.size(1), HW = z1.size(2) * z1.size(3);
  const acc_t* p = z1.data_ptr<acc_t>();
  StatParts<acc_t> tot;
  tot.init(C);
  if (!cl) {
    at::parallel_for(0, C, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c)
        for (int64_t n = 0; n < N; ++n) {
          acc_t m, q;
          chunk_stats(p + (n * C + c) * HW, HW, m, q);
          tot.merge(c, HW, m, q);  // channel c is this thread's only
        }
    });
  } else {
    const int64_t rows = N * HW, Cpad = round_up(C, V);
    const int64_t ng = std::max<int64_t>(1, std::min<int64_t>(64, rows / (4 * kPixels)));
    std::vector<StatParts<acc_t>> parts(static_cast<size_t>(ng));
    at::parallel_for(0, ng, 1, [&](int64_t gb, int64_t ge) {
      std::vector<acc_t> blk(static_cast<size_t>(kPixels * Cpad), acc_t(0));
      for (int64_t g = gb; g < ge; ++g) {
        parts[g].init(C);
        const int64_t r0 = rows * g / ng, r1 = rows * (g + 1) / ng;
        for (int64_t r = r0; r < r1; r += kPixels) {
          const int64_t np = std::min(kPixels, r1 - r);
          for (int64_t i = 0; i < np; ++i) std::copy_n(p + (r + i) * C, C, blk.data() + i * Cpad);
          chunk_stats_pm(blk.data(), np, Cpad, C, parts[g]);
        }
      }
    });
    for (const auto& part : parts) tot.merge_all(part);
  }
  tot.write(mean, var);
}

}  // namespace

void z1_stats(const at::Tensor& z1, bool cl, const at::Tensor& mean, const at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES(z1.scalar_type(), "ghost_module_z1_stats_cpu",
                             [&] { z1_stats_impl<scalar_t>(z1, cl, mean, var); });
}

void stats(const Geometry& geo, int stage, const at::Tensor& x, const at::Tensor& primary_weight,
           const BatchNormArgs& bn1, const at::Tensor& cheap_weight, const at::Tensor& mean, const at::Tensor& var) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_stats_cpu", [&] {
    stats_impl<scalar_t>(geo, stage, x, primary_weight, bn1, cheap_weight, mean, var);
  });
}

}  // namespace ghostfast::cpu::ghost_module
