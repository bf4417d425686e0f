// The DFC attention forward on the CPU (_dfc_kernel): per task (image, band of pooled rows, block of channels) the
// pooled x, the 1x1 conv as one GEMM, bn3, the 1x5 and 5x1 depthwise convs with bn4 / bn5, the sigmoid and `out`
// written once (the gate, or upsampled nearest / bilinear). NCHW on compact planes, channels_last pixel-major.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "batch_norm.h"
#include "cpu/dfc.h"
#include "cpu/gemm.h"
#include "cpu/vec.h"

namespace ghostfast::cpu::dfc {

// Bytes of scratch a task aims for: a band's rows are capped so it stays in L2.
constexpr int64_t kFwdBudget = 768 << 10;

// Gate rows [g0, g1) and output rows [o0, o1) of the band owning gate rows [r0, r1); false if it owns none.
template <typename scalar_t>
bool DfcCpu<scalar_t>::plan_rows(int64_t r0, int64_t r1, int64_t& g0, int64_t& g1, int64_t& o0, int64_t& o1) const {
  if (mode == Mode::kGate) {
    g0 = o0 = r0;
    g1 = o1 = r1;
    return r1 > r0;
  }
  o0 = std::lower_bound(row_lo.begin(), row_lo.end(), r0) - row_lo.begin();
  o1 = std::lower_bound(row_lo.begin(), row_lo.end(), r1) - row_lo.begin();
  if (o0 >= o1) return false;
  g0 = row_lo[o0];
  g1 = row_hi[o1 - 1] + 1;
  return true;
}

// One gate row (WP values, readable from g[-V] to g[WP + V]) upsampled along W into d[0, W). Vector
// stores may run up to 2 vectors past d + W: callers give room and fill rows in increasing order.
template <typename scalar_t>
void DfcCpu<scalar_t>::col_upsample(const acc_t* g, acc_t* d) const {
  const bool twice = W == 2 * WP;
  if (mode == Mode::kNearest) {
    if (twice) {
      for (int64_t w = 0; w < WP; w += V) {
        const Vec v = Vec::loadu(g + w);
        const auto pr = at::vec::interleave2(v, v);
        pr.first.store(d + 2 * w);
        pr.second.store(d + 2 * w + V);
      }
    } else {
      for (int64_t ow = 0; ow < W; ++ow) d[ow] = g[near_w[ow]];
    }
    return;
  }
  if (twice && WP >= 2) {
    // scale 1/2: out[2w] = 1/4 g[w - 1] + 3/4 g[w], out[2w + 1] = 3/4 g[w] + 1/4 g[w + 1]; the two border
    // columns (clamped sources) from the tables.
    const Vec q1(acc_t(0.25)), q3(acc_t(0.75));
    for (int64_t w = 0; w < WP; w += V) {
      const Vec v = Vec::loadu(g + w);
      const Vec ev = q1 * Vec::loadu(g + w - 1) + q3 * v;
      const Vec od = q3 * v + q1 * Vec::loadu(g + w + 1);
      const auto pr = at::vec::interleave2(ev, od);
      pr.first.store(d + 2 * w);
      pr.second.store(d + 2 * w + V);
    }
    d[0] = bl0[0] * g[bw0[0]] + bl1[0] * g[bw1[0]];
    d[W - 1] = bl0[W - 1] * g[bw0[W - 1]] + bl1[W - 1] * g[bw1[W - 1]];
    return;
  }
  for (int64_t ow = 0; ow < W; ++ow) d[ow] = bl0[ow] * g[bw0[ow]] + bl1[ow] * g[bw1[ow]];
}

// NCHW: per channel, compact planes (pitch WP) over the band's rows, every stage one flattened vector loop.
template <typename scalar_t>
void DfcCpu<scalar_t>::fwd_nchw(scalar_t* out, int64_t n, int64_t c0, int64_t c1, int64_t r0, int64_t r1,
                                Scratch<acc_t>& s) const {
  int64_t g0, g1, o0, o1;
  if (!plan_rows(r0, r1, g0, g1, o0, o1)) return;
  const int64_t a0 = std::max<int64_t>(g0 - 2, 0), a1 = std::min<int64_t>(g1 + 2, HP);
  const int64_t npix = (a1 - a0) * WP, ldp = round_up(npix, V);
  const int64_t cb = c1 - c0, ng = g1 - g0, nbe = ng + 4, ea = a0 - (g0 - 2);

  acc_t* P = s.p.get(Cin * ldp);
  pool_nchw(n, a0, a1, P, ldp);
  acc_t* Y = s.y.get(cb * ldp);
  gemm_k_panels<acc_t, false>(cb, ldp, Cin, w3 + c0 * Cin, Cin, 1, P, ldp, nullptr, Y, ldp, true);

  acc_t* A3 = s.a3.get(npix + 4);  // a3 of rows [a0, a1) at A3 + 2; two zeros each side
  A3[0] = A3[1] = A3[npix + 2] = A3[npix + 3] = acc_t(0);
  acc_t* B = s.b.get(nbe * WP);  // b rows [g0 - 2, g1 + 2); zero outside the image (never written)
  std::fill(B, B + nbe * WP, acc_t(0));
  acc_t* Gbuf = s.g.get(ng * WP + 4 * V);  // gate rows [g0, g1) at G, readable a vector either side
  std::fill(Gbuf, Gbuf + ng * WP + 4 * V, acc_t(0));
  acc_t* G = Gbuf + 2 * V;
  acc_t* Bi = B + ea * WP;
  const acc_t* m0 = mask[0].data();
  const acc_t* m1 = mask[1].data();
  const acc_t* m3 = mask[3].data();
  const acc_t* m4 = mask[4].data();

  for (int64_t c = c0; c < c1; ++c) {
    const acc_t* yc = Y + (c - c0) * ldp;
    const acc_t* hk = hw.data() + c * 5;
    const acc_t* vk = vw.data() + c * 5;
    const Vec s3c(s3[c]), b3c(b3[c]), s4c(s4[c]), b4c(b4[c]), s5c(s5[c]), b5c(b5[c]);
    const Vec h0(hk[0]), h1(hk[1]), h2(hk[2]), h3(hk[3]), h4(hk[4]);
    const Vec v0(vk[0]), v1(vk[1]), v2(vk[2]), v3(vk[3]), v4(vk[4]);
    vfor<acc_t>(npix, [&](int64_t i, int64_t m) {
      vstore<acc_t>(A3 + 2 + i, at::vec::fmadd(s3c, vload<acc_t>(yc + i, m), b3c), m);
    });
    vfor<acc_t>(npix, [&](int64_t i, int64_t m) {
      Vec acc = h2 * vload<acc_t>(A3 + i + 2, m);
      acc = at::vec::fmadd(h0, select_lanes(vload<acc_t>(m0 + i, m), vload<acc_t>(A3 + i, m)), acc);
      acc = at::vec::fmadd(h1, select_lanes(vload<acc_t>(m1 + i, m), vload<acc_t>(A3 + i + 1, m)), acc);
      acc = at::vec::fmadd(h3, select_lanes(vload<acc_t>(m3 + i, m), vload<acc_t>(A3 + i + 3, m)), acc);
      acc = at::vec::fmadd(h4, select_lanes(vload<acc_t>(m4 + i, m), vload<acc_t>(A3 + i + 4, m)), acc);
      vstore<acc_t>(Bi + i, at::vec::fmadd(s4c, acc, b4c), m);
    });
    vfor<acc_t>(ng * WP, [&](int64_t i, int64_t m) {
      Vec acc = v0 * vload<acc_t>(B + i, m);
      acc = at::vec::fmadd(v1, vload<acc_t>(B + WP + i, m), acc);
      acc = at::vec::fmadd(v2, vload<acc_t>(B + 2 * WP + i, m), acc);
      acc = at::vec::fmadd(v3, vload<acc_t>(B + 3 * WP + i, m), acc);
      acc = at::vec::fmadd(v4, vload<acc_t>(B + 4 * WP + i, m), acc);
      vstore<acc_t>(G + i, vsigmoid(at::vec::fmadd(s5c, acc, b5c)), m);
    });

    scalar_t* oc = out + (n * C + c) * Ho * Wo;
    if (mode == Mode::kGate) {
      put(oc + g0 * WP, G, ng * WP);
      continue;
    }
    // Straight into `out` (a staging buffer for float16 / bfloat16).
    const int64_t no = o1 - o0;
    acc_t* d0;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      d0 = oc + o0 * W;
    } else {
      d0 = s.o.get(no * W);
    }
    // Each row: full vectors, the last one masked at the row's end.
    auto st = [&](acc_t* p, const Vec& v, const acc_t* end) {
      const int64_t room = end - p;
      if (room >= V) {
        v.store(p);
      } else if (room > 0) {
        v.store(p, room);
      }
    };
    if (mode == Mode::kNearest && W == 2 * WP) {
      for (int64_t oh = o0; oh < o1;) {
        int64_t oe = oh + 1;  // rows [oh, oe) repeat the same gate row
        while (oe < o1 && near_h[oe] == near_h[oh]) ++oe;
        const acc_t* g = G + (near_h[oh] - g0) * WP;
        for (int64_t w = 0; w < WP; w += V) {
          const Vec v = Vec::loadu(g + w);
          const auto pr = at::vec::interleave2(v, v);
          for (int64_t r = oh; r < oe; ++r) {
            acc_t* d = d0 + (r - o0) * W;
            st(d + 2 * w, pr.first, d + W);
            st(d + 2 * w + V, pr.second, d + W);
          }
        }
        oh = oe;
      }
    } else {
      // Upsample along W once per gate row, then along H.
      acc_t* Gc = s.gc.get(ng * W + 3 * V);
      for (int64_t gi = 0; gi < ng; ++gi) col_upsample(G + gi * WP, Gc + gi * W);
      for (int64_t oh = o0; oh < o1; ++oh) {
        acc_t* d = d0 + (oh - o0) * W;
        if (mode == Mode::kNearest) {
          const acc_t* src = Gc + (near_h[oh] - g0) * W;
          for (int64_t i = 0; i < W; i += V) st(d + i, Vec::loadu(src + i), d + W);
        } else {
          const auto& L = lin_h[oh];
          const acc_t* ga = Gc + (L.i0 - g0) * W;
          const acc_t* gb = Gc + (L.i1 - g0) * W;
          const Vec l0(acc_t(1) - L.lambda), l1(L.lambda);
          for (int64_t i = 0; i < W; i += V) st(d + i, l0 * Vec::loadu(ga + i) + l1 * Vec::loadu(gb + i), d + W);
        }
      }
    }
    if constexpr (!std::is_same_v<acc_t, scalar_t>) put(oc + o0 * W, d0, no * W);
  }
}

// channels_last: one vector of channels at a time through zero-padded stencil buffers (fixed 5 taps), the gate
// of the whole channel block kept pixel-major so the output is written pixel by pixel.
template <typename scalar_t>
void DfcCpu<scalar_t>::fwd_cl(scalar_t* out, int64_t n, int64_t c0, int64_t c1, int64_t r0, int64_t r1,
                              Scratch<acc_t>& s) const {
  int64_t g0, g1, o0, o1;
  if (!plan_rows(r0, r1, g0, g1, o0, o1)) return;
  const int64_t a0 = std::max<int64_t>(g0 - 2, 0), a1 = std::min<int64_t>(g1 + 2, HP);
  const int64_t na = a1 - a0, npix = na * WP;
  const int64_t cb = c1 - c0, cbp = round_up(cb, V);
  const int64_t wpp = WP + 4, ng = g1 - g0, nbe = ng + 4, ea = a0 - (g0 - 2);

  acc_t* P = s.p.get(npix * Cinp);
  pool_cl(n, a0, a1, P);
  acc_t* Y = s.y.get(npix * cbp);
  conv1x1_cl(P, npix, c0, cb, cbp, Y, s);
  acc_t* A3 = s.a3.get(na * wpp * V);  // a3 rows [a0, a1), 2 zero columns each side
  acc_t* B = s.b.get(nbe * WP * V);    // b rows [g0 - 2, g1 + 2), zero outside the image
  std::fill(A3, A3 + na * wpp * V, acc_t(0));
  std::fill(B, B + nbe * WP * V, acc_t(0));
  acc_t* G = s.g.get(ng * WP * cbp);

  for (int64_t j = 0; j < cbp; j += V) {
    const int64_t c = c0 + j;
    const Vec s3v = Vec::loadu(s3.data() + c), b3v = Vec::loadu(b3.data() + c), s4v = Vec::loadu(s4.data() + c);
    const Vec b4v = Vec::loadu(b4.data() + c), s5v = Vec::loadu(s5.data() + c), b5v = Vec::loadu(b5.data() + c);
    Vec hv[5], vv[5];
    for (int t = 0; t < 5; ++t) {
      hv[t] = Vec::loadu(hwt.data() + t * Cp + c);
      vv[t] = Vec::loadu(vwt.data() + t * Cp + c);
    }
    for (int64_t r = 0; r < na; ++r) {
      for (int64_t w = 0; w < WP; ++w) {
        at::vec::fmadd(s3v, Vec::loadu(Y + (r * WP + w) * cbp + j), b3v).store(A3 + (r * wpp + w + 2) * V);
      }
    }
    for (int64_t r = 0; r < na; ++r) {
      const acc_t* a = A3 + r * wpp * V;
      acc_t* b = B + (ea + r) * WP * V;
      for (int64_t w = 0; w < WP; ++w) {
        Vec acc = hv[0] * Vec::loadu(a + w * V);
        for (int t = 1; t < 5; ++t) acc = at::vec::fmadd(hv[t], Vec::loadu(a + (w + t) * V), acc);
        at::vec::fmadd(s4v, acc, b4v).store(b + w * V);
      }
    }
    for (int64_t gi = 0; gi < ng; ++gi) {
      for (int64_t w = 0; w < WP; ++w) {
        const acc_t* b = B + (gi * WP + w) * V;
        Vec acc = vv[0] * Vec::loadu(b);
        for (int t = 1; t < 5; ++t) acc = at::vec::fmadd(vv[t], Vec::loadu(b + t * WP * V), acc);
        vsigmoid(at::vec::fmadd(s5v, acc, b5v)).store(G + (gi * WP + w) * cbp + j);
      }
    }
  }

  if (mode == Mode::kGate) {
    for (int64_t g = g0; g < g1; ++g) {
      for (int64_t w = 0; w < WP; ++w) {
        copy_vec(out + ((n * HP + g) * WP + w) * C + c0, G + ((g - g0) * WP + w) * cbp, cb);
      }
    }
  } else if (mode == Mode::kNearest) {
    for (int64_t oh = o0; oh < o1; ++oh) {
      const acc_t* gr = G + (near_h[oh] - g0) * WP * cbp;
      scalar_t* orow = out + (n * H + oh) * W * C + c0;
      for (int64_t ow = 0; ow < W; ++ow) copy_vec(orow + ow * C, gr + near_w[ow] * cbp, cb);
    }
  } else {
    for (int64_t oh = o0; oh < o1; ++oh) {
      const auto& L = lin_h[oh];
      const acc_t* ga = G + (L.i0 - g0) * WP * cbp;
      const acc_t* gb = G + (L.i1 - g0) * WP * cbp;
      const Vec h0(acc_t(1) - L.lambda), h1(L.lambda);
      scalar_t* orow = out + (n * H + oh) * W * C + c0;
      for (int64_t ow = 0; ow < W; ++ow) {
        const int64_t i0 = bw0[ow] * cbp, i1 = bw1[ow] * cbp;
        const Vec w0(bl0[ow]), w1(bl1[ow]);
        scalar_t* dst = orow + ow * C;
        vfor<acc_t>(cb, [&](int64_t j, int64_t m) {
          // The association of PyTorch's upsample_bilinear2d.
          const Vec v = h0 * (w0 * Vec::loadu(ga + i0 + j) + w1 * Vec::loadu(ga + i1 + j)) +
                      h1 * (w0 * Vec::loadu(gb + i0 + j) + w1 * Vec::loadu(gb + i1 + j));
          vstore<acc_t>(dst + j, v, m);
        });
      }
    }
  }
}

template <typename scalar_t>
void DfcCpu<scalar_t>::forward(scalar_t* out) const {
  if (N == 0 || C == 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t gran = cl ? V : 4;  // channel-block granularity: one vector (channels_last) or one GEMM tile
  const int64_t row_bytes = (Cinp + 2 * Cp) * WP * static_cast<int64_t>(sizeof(acc_t));
  const int64_t cap_rows = std::max<int64_t>(8, kFwdBudget / std::max<int64_t>(row_bytes, 1));
  int64_t nb = std::min<int64_t>(HP, div_up(HP, cap_rows));
  const int64_t units = div_up(C, gran);
  int64_t ncb = 1;
  if (N * nb < threads) {
    // Split channels first (no halo to recompute), then rows.
    ncb = std::min(units, div_up(threads, N * nb));
    if (N * nb * ncb < threads) nb = std::min<int64_t>(HP, div_up(threads, N * ncb));
  }
  const int64_t tasks = N * nb * ncb;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / (nb * ncb);
      const int64_t band = (t / ncb) % nb;
      const int64_t cj = t % ncb;
      const int64_t r0 = band * HP / nb, r1 = (band + 1) * HP / nb;
      const int64_t c0 = std::min(C, (cj * units / ncb) * gran);
      const int64_t c1 = std::min(C, ((cj + 1) * units / ncb) * gran);
      if (c0 >= c1 || r0 >= r1) continue;
      if (cl) {
        fwd_cl(out, n, c0, c1, r0, r1, s);
      } else {
        fwd_nchw(out, n, c0, c1, r0, r1, s);
      }
    }
  });
}

void forward(const at::Tensor& x, const at::Tensor& conv_weight, const BatchNormArgs& bn3, const at::Tensor& h_weight,
             const BatchNormArgs& bn4, const at::Tensor& v_weight, const BatchNormArgs& bn5, Mode mode, bool cl,
             const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghostfast_dfc_forward_cpu", [&] {
    DfcCpu<scalar_t> k(x, conv_weight, h_weight, v_weight, mode, cl);
    k.fold_batch_norms(bn3, bn4, bn5);
    k.forward(out.data_ptr<scalar_t>());
  });
}

}  // namespace ghostfast::cpu::dfc
