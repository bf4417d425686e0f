// The DFC attention backward on the CPU (_dfc_backward_kernel): per (image, band) task the forward chain recomputed
// on the band +- 4 pooled rows, then walked back (U^T(grad) * g (1 - g), transposed 5x1, bn4, transposed 1x5, bn3)
// and two GEMMs (grad_W3, grad_x); per-channel sums in per-chunk partial rows summed in chunk order.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu/dfc.h"
#include "cpu/gemm.h"
#include "cpu/vec.h"
#include "upsample.h"

namespace ghostfast::cpu::dfc {

// Bytes of scratch a task aims for: a band's rows are capped so it stays in L2.
constexpr int64_t kBwdBudget = 1536 << 10;

template <typename scalar_t>
void DfcCpu<scalar_t>::build_adjoint() {
  if (mode == Mode::kGate) return;
  auto build = [&](int64_t in, int64_t out, std::vector<int64_t>& ptr, std::vector<int64_t>& idx,
                   std::vector<acc_t>& wt) {
    std::vector<int64_t> src, dst;
    std::vector<acc_t> w;
    for (int64_t d = 0; d < out; ++d) {
      if (mode == Mode::kNearest) {
        src.push_back(nearest_source(d, in, out));
        dst.push_back(d);
        w.push_back(acc_t(1));
      } else {
        const auto s = linear_source<acc_t>(d, in, out);
        src.push_back(s.i0);
        dst.push_back(d);
        w.push_back(acc_t(1) - s.lambda);
        src.push_back(s.i1);
        dst.push_back(d);
        w.push_back(s.lambda);
      }
    }
    ptr.assign(in + 1, 0);
    for (int64_t s : src) ++ptr[s + 1];
    for (int64_t i = 0; i < in; ++i) ptr[i + 1] += ptr[i];
    std::vector<int64_t> fill(ptr.begin(), ptr.end() - 1);
    idx.resize(src.size());
    wt.resize(src.size());
    for (size_t e = 0; e < src.size(); ++e) {
      const int64_t at = fill[src[e]]++;
      idx[at] = dst[e];
      wt[at] = w[e];
    }
  };
  build(HP, H, adj_h_ptr, adj_h_idx, adj_h_wt);
  build(WP, W, adj_w_ptr, adj_w_idx, adj_w_wt);
}

// Partial row layout (per chunk): [0, 6 Cp): sums of s3, b3, s4, b4, s5, b5; [6 Cp, 11 Cp): h taps [5][Cp];
// [11 Cp, 16 Cp): v taps [5][Cp]; then grad_W3 [C][Cinp] when needed.

// gg = U^T(grad) on pooled row r of one channel plane (NCHW): rows first (vectors along W), then columns.
// R: W + 2 vectors of scratch.
template <typename scalar_t>
void DfcCpu<scalar_t>::gather_row_nchw(const scalar_t* gplane, int64_t r, acc_t* GG, acc_t* R) const {
  std::fill(R, R + W, acc_t(0));
  for (int64_t j = adj_h_ptr[r]; j < adj_h_ptr[r + 1]; ++j) {
    const scalar_t* gr = gplane + adj_h_idx[j] * W;
    const Vec wt(adj_h_wt[j]);
    vfor<acc_t>(W, [&](int64_t i, int64_t m) {
      vstore<acc_t>(R + i, at::vec::fmadd(wt, vload<acc_t>(gr + i, m), vload<acc_t>(R + i, m)), m);
    });
  }
  if (mode == Mode::kNearest && W == 2 * WP) {
    vfor<acc_t>(WP, [&](int64_t w, int64_t m) {
      const auto pr = at::vec::deinterleave2(Vec::loadu(R + 2 * w), Vec::loadu(R + 2 * w + V));
      vstore<acc_t>(GG + w, pr.first + pr.second, m);
    });
    return;
  }
  for (int64_t w = 0; w < WP; ++w) {
    acc_t sum(0);
    for (int64_t j = adj_w_ptr[w]; j < adj_w_ptr[w + 1]; ++j) sum += adj_w_wt[j] * R[adj_w_idx[j]];
    GG[w] = sum;
  }
}

// NCHW: all channels of one band, compact planes (pitch WP) over the band's rows +- 4, flattened vector loops.
template <typename scalar_t>
void DfcCpu<scalar_t>::bwd_nchw(const scalar_t* grad, scalar_t* gx, bool need_x, bool need_w3, int64_t n, int64_t r0,
                                int64_t r1,
                                Scratch<acc_t>& s, acc_t* part) const {
  const int64_t a0 = std::max<int64_t>(r0 - 4, 0), a1 = std::min<int64_t>(r1 + 4, HP);
  const int64_t q0 = std::max<int64_t>(r0 - 2, 0), q1 = std::min<int64_t>(r1 + 2, HP);
  const int64_t e0 = r0 - 4, ne = r1 - r0 + 8;  // extended rows [e0, e0 + ne), zero outside the image
  const int64_t npix = (a1 - a0) * WP, ldp = round_up(npix, V);
  const int64_t no = r1 - r0, npo = no * WP, ldo = round_up(npo, V);
  const int64_t oa = (r0 - a0) * WP;  // the owned rows inside the [a0, a1) planes

  acc_t* P = s.p.get(Cin * ldp);
  pool_nchw(n, a0, a1, P, ldp);
  acc_t* Y3 = s.y.get(C * ldp);
  gemm_k_panels<acc_t, false>(C, ldp, Cin, w3, Cin, 1, P, ldp, nullptr, Y3, ldp, true);
  acc_t* GY3 = (need_x || need_w3) ? s.gy3.get(C * ldo) : nullptr;

  acc_t* A3 = s.a3.get(npix + 4);  // a3 rows [a0, a1) at A3 + 2, two zeros each side
  A3[0] = A3[1] = A3[npix + 2] = A3[npix + 3] = acc_t(0);
  acc_t* Y4 = s.y4.get(npix);
  acc_t* A4e = s.a4.get(ne * WP);   // a4 on the extended rows
  acc_t* GY5e = s.gy5.get(ne * WP);  // gy5 on the extended rows (rows [q0, q1) written)
  std::fill(A4e, A4e + ne * WP, acc_t(0));
  std::fill(GY5e, GY5e + ne * WP, acc_t(0));
  acc_t* GG = s.gg.get((q1 - q0) * WP);
  acc_t* GY4 = s.gy4.get(npo + 4);  // gy4 owned rows at GY4 + 2, two zeros each side
  GY4[0] = GY4[1] = GY4[npo + 2] = GY4[npo + 3] = acc_t(0);
  acc_t* R = s.row.get(W + 2 * V);
  std::fill(R, R + W + 2 * V, acc_t(0));
  const acc_t* mk[5] = {mask[0].data(), mask[1].data(), nullptr, mask[3].data(), mask[4].data()};
  const scalar_t* gbase = grad + n * C * Ho * Wo;
  acc_t* A4i = A4e + (a0 - e0) * WP;
  const int64_t gq = (q0 - e0) * WP;  // GG[0] in extended coordinates

  for (int64_t c = 0; c < C; ++c) {
    const acc_t* y3c = Y3 + c * ldp;
    const acc_t* hk = hw.data() + c * 5;
    const acc_t* vk = vw.data() + c * 5;
    const Vec s3c(s3[c]), b3c(b3[c]), s4c(s4[c]), b4c(b4[c]), s5c(s5[c]), b5c(b5[c]);
    const Vec one(acc_t(1));
    Vec hv[5], vv[5];
    for (int t = 0; t < 5; ++t) {
      hv[t] = Vec(hk[t]);
      vv[t] = Vec(vk[t]);
    }
    // ---- forward recompute on rows [a0, a1)
    vfor<acc_t>(npix, [&](int64_t i, int64_t m) {
      vstore<acc_t>(A3 + 2 + i, at::vec::fmadd(s3c, vload<acc_t>(y3c + i, m), b3c), m);
    });
    vfor<acc_t>(npix, [&](int64_t i, int64_t m) {
      Vec acc = hv[2] * vload<acc_t>(A3 + i + 2, m);
      for (int t : {0, 1, 3, 4})
        acc = at::vec::fmadd(hv[t], select_lanes(vload<acc_t>(mk[t] + i, m), vload<acc_t>(A3 + i + t, m)), acc);
      vstore<acc_t>(Y4 + i, acc, m);
      vstore<acc_t>(A4i + i, at::vec::fmadd(s4c, acc, b4c), m);
    });
    // ---- gg on rows [q0, q1)
    const scalar_t* gplane = gbase + c * Ho * Wo;
    if (mode == Mode::kGate) {
      vfor<acc_t>((q1 - q0) * WP,
                  [&](int64_t i, int64_t m) { vstore<acc_t>(GG + i, vload<acc_t>(gplane + q0 * WP + i, m), m); });
    } else {
      for (int64_t r = q0; r < q1; ++r) gather_row_nchw(gplane, r, GG + (r - q0) * WP, R);
    }
    // ---- y5, sigmoid, BN5 on rows [q0, q1); sums over the owned rows
    Vec as5(acc_t(0)), ab5(acc_t(0));
    auto stage5 = [&](int64_t lo, int64_t hi, bool own) {
      vfor<acc_t>(hi - lo, [&](int64_t j, int64_t m) {
        const int64_t i = lo + j;
        Vec y5 = vv[0] * vload<acc_t>(A4e + i - 2 * WP, m);
        for (int t = 1; t < 5; ++t) y5 = at::vec::fmadd(vv[t], vload<acc_t>(A4e + i + (t - 2) * WP, m), y5);
        const Vec g = vsigmoid(at::vec::fmadd(s5c, y5, b5c));
        const Vec gz = vload<acc_t>(GG + i - gq, m) * g * (one - g);
        if (own) {
          as5 = at::vec::fmadd(gz, y5, as5);
          ab5 = ab5 + gz;
        }
        vstore<acc_t>(GY5e + i, gz * s5c, m);
      });
    };
    stage5(gq, 4 * WP, false);
    stage5(4 * WP, (4 + no) * WP, true);
    stage5((4 + no) * WP, (q1 - e0) * WP, false);
    // ---- owned rows: 5x1 transposed, BN4, then 1x5 transposed, BN3
    Vec as4(acc_t(0)), ab4(acc_t(0)), as3(acc_t(0)), ab3(acc_t(0));
    Vec ah[5], av[5];
    for (int t = 0; t < 5; ++t) ah[t] = av[t] = Vec(acc_t(0));
    vfor<acc_t>(npo, [&](int64_t j, int64_t m) {
      const int64_t i = 4 * WP + j;
      const Vec gy5 = vload<acc_t>(GY5e + i, m);
      for (int t = 0; t < 5; ++t) av[t] = at::vec::fmadd(gy5, vload<acc_t>(A4e + i + (t - 2) * WP, m), av[t]);
      Vec ga4 = vv[0] * vload<acc_t>(GY5e + i + 2 * WP, m);
      for (int t = 1; t < 5; ++t) ga4 = at::vec::fmadd(vv[t], vload<acc_t>(GY5e + i - (t - 2) * WP, m), ga4);
      as4 = at::vec::fmadd(ga4, vload<acc_t>(Y4 + oa + j, m), as4);
      ab4 = ab4 + ga4;
      vstore<acc_t>(GY4 + 2 + j, ga4 * s4c, m);
    });
    acc_t* gy3c = GY3 ? GY3 + c * ldo : nullptr;
    vfor<acc_t>(npo, [&](int64_t j, int64_t m) {
      const Vec gy4 = vload<acc_t>(GY4 + 2 + j, m);
      ah[2] = at::vec::fmadd(gy4, vload<acc_t>(A3 + 2 + oa + j, m), ah[2]);
      Vec ga3 = hv[2] * gy4;
      for (int t : {0, 1, 3, 4}) {
        // a3 at column w + t - 2; gy4 at column w - t + 2 (mask 4 - t)
        ah[t] = at::vec::fmadd(gy4, select_lanes(vload<acc_t>(mk[t] + j, m), vload<acc_t>(A3 + oa + j + t, m)), ah[t]);
        ga3 = at::vec::fmadd(hv[t], select_lanes(vload<acc_t>(mk[4 - t] + j, m), vload<acc_t>(GY4 + j + 4 - t, m)),
                             ga3);
      }
      as3 = at::vec::fmadd(ga3, vload<acc_t>(y3c + oa + j, m), as3);
      ab3 = ab3 + ga3;
      if (gy3c) vstore<acc_t>(gy3c + j, ga3 * s3c, m);
    });
    if (gy3c) std::fill(gy3c + npo, gy3c + ldo, acc_t(0));
    part[c] += hsum(as3);
    part[Cp + c] += hsum(ab3);
    part[2 * Cp + c] += hsum(as4);
    part[3 * Cp + c] += hsum(ab4);
    part[4 * Cp + c] += hsum(as5);
    part[5 * Cp + c] += hsum(ab5);
    for (int t = 0; t < 5; ++t) {
      part[(6 + t) * Cp + c] += hsum(ah[t]);
      part[(11 + t) * Cp + c] += hsum(av[t]);
    }
  }

  if (need_w3) {
    // grad_W3[c][k] += sum_p gy3[c][p] * pooled[k][p] over the owned pixels: B = pooled^T [p][Cinp].
    acc_t* PT = s.pt.get(npo * Cinp);
    transpose(P + oa, Cin, npo, ldp, PT, Cinp);
    for (int64_t p = 0; p < npo; ++p) std::fill(PT + p * Cinp + Cin, PT + (p + 1) * Cinp, acc_t(0));
    gemm_k_panels<acc_t, true>(C, Cinp, npo, GY3, ldo, 1, PT, Cinp, nullptr, part + 16 * Cp, Cinp, true);
  }
  if (need_x) {
    acc_t* GP = s.gp.get(Cin * ldo);
    gemm_k_panels<acc_t, false>(Cin, ldo, C, w3, 1, Cin, GY3, ldo, nullptr, GP, ldo, true);
    const bool odd_w = W % 2 == 1;
    for (int64_t k = 0; k < Cin; ++k) {
      scalar_t* gk = gx + (n * Cin + k) * H * W;
      for (int64_t o = 0; o < no; ++o) {
        scalar_t* x0 = gk + (2 * (r0 + o)) * W;
        scalar_t* x1 = x0 + W;
        dup2(GP + k * ldo + o * WP, acc_t(0.25), x0, WP);
        std::memcpy(x1, x0, 2 * WP * sizeof(scalar_t));
        if (odd_w) x0[W - 1] = x1[W - 1] = scalar_t(0);
      }
      if (H % 2 == 1 && r1 == HP) std::fill(gk + (H - 1) * W, gk + H * W, scalar_t(0));
    }
  }
}

// gg at pooled pixel (r, w) for channels [c0, c0 + cbp) (channels_last); channels >= C get zero.
template <typename scalar_t>
void DfcCpu<scalar_t>::gather_pix_cl(const scalar_t* gimg, int64_t r, int64_t w, int64_t c0, int64_t cbp,
                                     acc_t* GG) const {
  const int64_t cv = std::min(C - c0, cbp);
  auto cnt = [&](int64_t j) { return std::max<int64_t>(0, std::min<int64_t>(V, cv - j)); };
  if (mode == Mode::kGate) {
    const scalar_t* src = gimg + (r * WP + w) * C + c0;
    for (int64_t j = 0; j < cbp; j += V) {
      const int64_t m = cnt(j);
      (m > 0 ? vload<acc_t>(src + j, m) : Vec(acc_t(0))).store(GG + j);
    }
    return;
  }
  std::fill(GG, GG + cbp, acc_t(0));
  for (int64_t jh = adj_h_ptr[r]; jh < adj_h_ptr[r + 1]; ++jh) {
    const int64_t oh = adj_h_idx[jh];
    const acc_t wh = adj_h_wt[jh];
    for (int64_t jw = adj_w_ptr[w]; jw < adj_w_ptr[w + 1]; ++jw) {
      const Vec wt(wh * adj_w_wt[jw]);
      const scalar_t* src = gimg + (oh * W + adj_w_idx[jw]) * C + c0;
      for (int64_t j = 0; j < cbp; j += V) {
        const int64_t m = cnt(j);
        if (m > 0) at::vec::fmadd(wt, vload<acc_t>(src + j, m), Vec::loadu(GG + j)).store(GG + j);
      }
    }
  }
}

// channels_last: all channels of one band, one vector of channels at a time through zero-padded buffers, the
// per-channel sums in registers.
template <typename scalar_t>
void DfcCpu<scalar_t>::bwd_cl(const scalar_t* grad, scalar_t* gx, bool need_x, bool need_w3, int64_t n, int64_t r0,
                              int64_t r1,
                              Scratch<acc_t>& s, acc_t* part) const {
  const int64_t a0 = std::max<int64_t>(r0 - 4, 0), a1 = std::min<int64_t>(r1 + 4, HP);
  const int64_t q0 = std::max<int64_t>(r0 - 2, 0), q1 = std::min<int64_t>(r1 + 2, HP);
  const int64_t e0 = r0 - 4, ne = r1 - r0 + 8;  // extended rows [e0, e0 + ne), zero outside the image
  const int64_t na = a1 - a0, npix = na * WP;
  const int64_t no = r1 - r0, npo = no * WP, wpp = WP + 4;
  constexpr int64_t L = V;

  acc_t* P = s.p.get(npix * Cinp);
  pool_cl(n, a0, a1, P);
  acc_t* Y3 = s.y.get(npix * Cp);
  conv1x1_cl(P, npix, 0, C, Cp, Y3, s);
  acc_t* GY3 = (need_x || need_w3) ? s.gy3.get(npo * Cp) : nullptr;
  const scalar_t* gimg = grad + n * Ho * Wo * C;

  acc_t* A3 = s.a3.get(na * wpp * L);   // a3 rows [a0, a1), 2 zero columns each side
  acc_t* Y4 = s.y4.get(npix * L);       // y4 rows [a0, a1)
  acc_t* A4 = s.a4.get(ne * WP * L);    // a4 on the extended rows
  acc_t* GY5 = s.gy5.get(ne * WP * L);  // gy5 on the extended rows (rows [q0, q1) written)
  acc_t* GY4 = s.gy4.get(no * wpp * L);  // gy4 owned rows, 2 zero columns each side
  std::fill(A3, A3 + na * wpp * L, acc_t(0));
  std::fill(A4, A4 + ne * WP * L, acc_t(0));
  std::fill(GY5, GY5 + ne * WP * L, acc_t(0));
  std::fill(GY4, GY4 + no * wpp * L, acc_t(0));
  // U^T(grad) on rows [q0, q1) for all channels, pixel-major: one pass over the incoming grad.
  acc_t* GG = s.gg.get((q1 - q0) * WP * Cp);
  for (int64_t r = q0; r < q1; ++r) {
    for (int64_t w = 0; w < WP; ++w) gather_pix_cl(gimg, r, w, 0, Cp, GG + ((r - q0) * WP + w) * Cp);
  }
  const Vec one(acc_t(1)), zero(acc_t(0));

  for (int64_t c = 0; c < Cp; c += L) {
    const Vec s3v = Vec::loadu(s3.data() + c), b3v = Vec::loadu(b3.data() + c), s4v = Vec::loadu(s4.data() + c);
    const Vec b4v = Vec::loadu(b4.data() + c), s5v = Vec::loadu(s5.data() + c), b5v = Vec::loadu(b5.data() + c);
    Vec hv[5], vv[5];
    for (int t = 0; t < 5; ++t) {
      hv[t] = Vec::loadu(hwt.data() + t * Cp + c);
      vv[t] = Vec::loadu(vwt.data() + t * Cp + c);
    }
    // ---- forward recompute on rows [a0, a1)
    for (int64_t r = 0; r < na; ++r) {
      for (int64_t w = 0; w < WP; ++w) {
        at::vec::fmadd(s3v, Vec::loadu(Y3 + (r * WP + w) * Cp + c), b3v).store(A3 + (r * wpp + w + 2) * L);
      }
    }
    for (int64_t r = 0; r < na; ++r) {
      const acc_t* a = A3 + r * wpp * L;
      acc_t* a4 = A4 + (a0 - e0 + r) * WP * L;
      for (int64_t w = 0; w < WP; ++w) {
        Vec acc = hv[0] * Vec::loadu(a + w * L);
        for (int t = 1; t < 5; ++t) acc = at::vec::fmadd(hv[t], Vec::loadu(a + (w + t) * L), acc);
        acc.store(Y4 + (r * WP + w) * L);
        at::vec::fmadd(s4v, acc, b4v).store(a4 + w * L);
      }
    }
    // ---- y5, sigmoid, BN5 on rows [q0, q1)
    Vec as5 = zero, ab5 = zero;
    for (int64_t r = q0; r < q1; ++r) {
      const bool own = r >= r0 && r < r1;
      for (int64_t w = 0; w < WP; ++w) {
        const int64_t i = ((r - e0) * WP + w) * L;
        Vec y5 = vv[0] * Vec::loadu(A4 + i - 2 * WP * L);
        for (int t = 1; t < 5; ++t) y5 = at::vec::fmadd(vv[t], Vec::loadu(A4 + i + (t - 2) * WP * L), y5);
        const Vec g = vsigmoid(at::vec::fmadd(s5v, y5, b5v));
        const Vec gz = Vec::loadu(GG + ((r - q0) * WP + w) * Cp + c) * g * (one - g);
        if (own) {
          as5 = at::vec::fmadd(gz, y5, as5);
          ab5 = ab5 + gz;
        }
        (gz * s5v).store(GY5 + i);
      }
    }
    // ---- owned rows: 5x1 transposed, BN4
    Vec as4 = zero, ab4 = zero, as3 = zero, ab3 = zero, ah[5], av[5];
    for (int t = 0; t < 5; ++t) ah[t] = av[t] = zero;
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t w = 0; w < WP; ++w) {
        const int64_t i = ((r - e0) * WP + w) * L;
        const Vec gy5 = Vec::loadu(GY5 + i);
        for (int t = 0; t < 5; ++t) av[t] = at::vec::fmadd(gy5, Vec::loadu(A4 + i + (t - 2) * WP * L), av[t]);
        Vec ga4 = vv[0] * Vec::loadu(GY5 + i + 2 * WP * L);
        for (int t = 1; t < 5; ++t) ga4 = at::vec::fmadd(vv[t], Vec::loadu(GY5 + i - (t - 2) * WP * L), ga4);
        as4 = at::vec::fmadd(ga4, Vec::loadu(Y4 + ((r - a0) * WP + w) * L), as4);
        ab4 = ab4 + ga4;
        (ga4 * s4v).store(GY4 + ((r - r0) * wpp + w + 2) * L);
      }
    }
    // ---- owned rows: 1x5 transposed, BN3
    for (int64_t r = r0; r < r1; ++r) {
      const acc_t* a = A3 + (r - a0) * wpp * L;
      const acc_t* g4 = GY4 + (r - r0) * wpp * L;
      for (int64_t w = 0; w < WP; ++w) {
        const Vec gy4 = Vec::loadu(g4 + (w + 2) * L);
        Vec ga3 = hv[0] * Vec::loadu(g4 + (w + 4) * L);
        for (int t = 0; t < 5; ++t) ah[t] = at::vec::fmadd(gy4, Vec::loadu(a + (w + t) * L), ah[t]);
        for (int t = 1; t < 5; ++t) ga3 = at::vec::fmadd(hv[t], Vec::loadu(g4 + (w + 4 - t) * L), ga3);
        const int64_t p = (r - a0) * WP + w;
        as3 = at::vec::fmadd(ga3, Vec::loadu(Y3 + p * Cp + c), as3);
        ab3 = ab3 + ga3;
        if (GY3) (ga3 * s3v).store(GY3 + ((r - r0) * WP + w) * Cp + c);
      }
    }
    auto add = [&](int64_t off, const Vec& v) { (Vec::loadu(part + off + c) + v).store(part + off + c); };
    add(0, as3);
    add(Cp, ab3);
    add(2 * Cp, as4);
    add(3 * Cp, ab4);
    add(4 * Cp, as5);
    add(5 * Cp, ab5);
    for (int t = 0; t < 5; ++t) {
      add((6 + t) * Cp, ah[t]);
      add((11 + t) * Cp, av[t]);
    }
  }

  if (need_w3) {
    // grad_W3[c][k] += sum_p gy3[p][c] * pooled[p][k] over the owned pixels.
    gemm_k_panels<acc_t, true>(C, Cinp, npo, GY3, 1, Cp, P + (r0 - a0) * WP * Cinp, Cinp, nullptr, part + 16 * Cp,
                               Cinp, true);
  }
  if (need_x) {
    acc_t* GP = s.gp.get(std::max<int64_t>(npo, 1) * Cinp);
    // B = W3 [C][Cin] is not padded: its ragged last columns go through a zero-padded copy (b_end)
    gemm_k_panels<acc_t, false>(npo, Cin, C, GY3, Cp, 1, w3, Cin, w3 + C * Cin, GP, Cinp, true);
    const Vec quarter(acc_t(0.25));
    const bool odd_w = W % 2 == 1;
    scalar_t* gimgx = gx + n * H * W * Cin;
    auto zero_pix = [&](int64_t h, int64_t w) {
      scalar_t* d = gimgx + (h * W + w) * Cin;
      std::fill(d, d + Cin, scalar_t(0));
    };
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t w = 0; w < WP; ++w) {
        const acc_t* src = GP + ((r - r0) * WP + w) * Cinp;
        scalar_t* d00 = gimgx + ((2 * r) * W + 2 * w) * Cin;
        scalar_t* d01 = d00 + Cin;
        scalar_t* d10 = d00 + W * Cin;
        scalar_t* d11 = d10 + Cin;
        vfor<acc_t>(Cin, [&](int64_t i, int64_t m) {
          const Vec v = Vec::loadu(src + i) * quarter;
          vstore<acc_t>(d00 + i, v, m);
          vstore<acc_t>(d01 + i, v, m);
          vstore<acc_t>(d10 + i, v, m);
          vstore<acc_t>(d11 + i, v, m);
        });
      }
      if (odd_w) {
        zero_pix(2 * r, W - 1);
        zero_pix(2 * r + 1, W - 1);
      }
    }
    if (H % 2 == 1 && r1 == HP) std::fill(gimgx + (H - 1) * W * Cin, gimgx + H * W * Cin, scalar_t(0));
  }
}

// Sums every chunk's partial row into `total` (length part_len(need_w3)), chunk by chunk in order.
template <typename scalar_t>
void DfcCpu<scalar_t>::backward(const scalar_t* grad, scalar_t* gx, bool need_x, bool need_w3,
                                std::vector<acc_t>& total) {
  build_adjoint();
  const int64_t plen = part_len(need_w3);
  total.assign(plen, acc_t(0));
  if (N == 0) return;
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t row_bytes = (2 * Cinp + 3 * Cp) * WP * static_cast<int64_t>(sizeof(acc_t));
  const int64_t cap_rows = std::max<int64_t>(16, kBwdBudget / std::max<int64_t>(row_bytes, 1));
  int64_t nb = div_up(HP, cap_rows);
  if (N < threads) nb = std::max(nb, div_up(threads, N));
  nb = std::min(nb, HP);
  const int64_t tasks = N * nb;
  const int64_t chunks = std::min(tasks, threads);
  std::vector<acc_t> parts(chunks * plen, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    Scratch<acc_t> s;
    for (int64_t ch = begin; ch < end; ++ch) {
      acc_t* part = parts.data() + ch * plen;
      for (int64_t t = ch * tasks / chunks; t < (ch + 1) * tasks / chunks; ++t) {
        const int64_t n = t / nb, band = t % nb;
        const int64_t r0 = band * HP / nb, r1 = (band + 1) * HP / nb;
        if (r0 >= r1) continue;
        if (cl) {
          bwd_cl(grad, gx, need_x, need_w3, n, r0, r1, s, part);
        } else {
          bwd_nchw(grad, gx, need_x, need_w3, n, r0, r1, s, part);
        }
      }
    }
  });
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const acc_t* p = parts.data() + ch * plen;
    for (int64_t i = 0; i < plen; ++i) total[i] += p[i];
  }
}

void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor* params, Mode mode, bool cl,
              at::TensorList grads, const bool* need) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghostfast_dfc_backward_cpu", [&] {
    using acc_t = typename DfcCpu<scalar_t>::acc_t;
    DfcCpu<scalar_t> k(x, params[0], params[3], params[6], mode, cl);
    const at::Tensor* const vectors[6] = {&params[1], &params[2], &params[4], &params[5], &params[7], &params[8]};
    k.load_affine(vectors);
    std::vector<acc_t> total;
    k.backward(grad.data_ptr<scalar_t>(), need[0] ? grads[0].data_ptr<scalar_t>() : nullptr, need[0], need[1],
               total);
    const int64_t C = k.C, Cin = k.Cin, Cp = k.Cp, Cinp = k.Cinp;
    if (need[1]) {
      scalar_t* d = grads[1].data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t i = 0; i < Cin; ++i) d[c * Cin + i] = static_cast<scalar_t>(total[16 * Cp + c * Cinp + i]);
      }
    }
    auto vec_out = [&](int idx, int64_t off) {
      if (!need[idx]) return;
      acc_t* d = grads[idx].data_ptr<acc_t>();
      for (int64_t c = 0; c < C; ++c) d[c] = total[off + c];
    };
    auto taps_out = [&](int idx, int64_t off) {
      if (!need[idx]) return;
      scalar_t* d = grads[idx].data_ptr<scalar_t>();
      for (int64_t c = 0; c < C; ++c) {
        for (int64_t t = 0; t < 5; ++t) d[c * 5 + t] = static_cast<scalar_t>(total[off + t * Cp + c]);
      }
    };
    vec_out(2, 0);
    vec_out(3, Cp);
    taps_out(4, 6 * Cp);
    vec_out(5, 2 * Cp);
    vec_out(6, 3 * Cp);
    taps_out(7, 11 * Cp);
    vec_out(8, 4 * Cp);
    vec_out(9, 5 * Cp);
  });
}

}  // namespace ghostfast::cpu::dfc
