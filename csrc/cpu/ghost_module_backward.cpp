// The Ghost module backward on the CPU (_ghost_module_backward_kernel, and _ghost_module_stats_backward_kernel
// through Ctx::stats): per row sub-block, x1 recomputed over the sub-block + 2R rows and g2*s2 over the sub-block + R
// rows, then the transposed depthwise, the BN / activation chain, grad_W1 = (g1*s1) x^T and grad_x = W1^T (g1*s1) on
// the owned rows; the gate gradient runs the gate upsample's adjoint. Reductions go to per-group partials.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/activation.h"
#include "cpu/depthwise.h"
#include "cpu/gate_upsample.h"
#include "cpu/gemm.h"
#include "cpu/ghost_module.h"
#include "cpu/vec.h"

namespace ghostfast::cpu::ghost_module {
namespace {

template <typename acc_t>
struct Partials {  // one group's share of the reduced gradients
  std::vector<acc_t> w1;      // NCHW: [n_x1][C]; channels_last: [n_x1][Cpad]
  std::vector<acc_t> s1, b1;  // [Zc]
  std::vector<acc_t> w2;      // NCHW: [n_cheap][KK]; channels_last: [KK][Cq]
  std::vector<acc_t> s2, b2;  // [Cq]
};

struct GateSeg {  // a segment's slice of the gate gradient: gate rows [gh_lo, gh_lo + ghn), all channels
  int64_t offset = 0, gh_lo = 0, ghn = 0;
};

// NCHW grad_W1: the dot-product kernel from this many pixels per block, else a transposed copy of x's block
constexpr int64_t kDotMinPixels = 256;

template <typename acc_t>
struct BwdWs {
  int64_t G = 1, cap1 = 1, cap2 = 1, hr_rows = 0;
  GateAdjoint<acc_t> adj, adjB, adjC;
  GateRowCache<acc_t> gcB, gcC;
  bool stream = false;  // non-temporal stores to grad_x
  int64_t z_ps = 0, ds_ps = 0, q_ps = 0, gy_ld = 0;
  std::vector<acc_t> z, ds, q, gy1, t, gx, vr, gt, accw, tx, x1, zero, xt, hr;
  std::vector<const acc_t*> rows;
};

template <typename scalar_t>
BwdWs<acc_of<scalar_t>> make_bwd_ws(const Ctx<scalar_t>& cx) {
  using acc_t = acc_of<scalar_t>;
  constexpr int64_t V = Vectorized<acc_t>::size();
  const Geometry& d = cx.d;
  BwdWs<acc_t> ws;
  const int64_t W = d.W, Wp = W + 2 * d.R;
  const int64_t slack = 2 * V + 2 * d.K;
  const int64_t row_bytes =
      static_cast<int64_t>(sizeof(acc_t)) *
      (d.cl ? (W * cx.Zc * 2 + (d.n_cheap > 0 ? Wp * (cx.Cds + cx.Cq) : 0))
            : (2 * d.n_x1 * W + (d.n_src + d.n_cheap) * Wp));
  ws.G = pick_rows(row_bytes, 4 * d.R, d.H);
  ws.cap1 = ws.G + 4 * d.R;
  ws.cap2 = ws.G + 2 * d.R;
  if (!d.cl) {
    ws.z_ps = ws.cap1 * W + slack;
    ws.ds_ps = ws.cap1 * Wp + slack;
    ws.q_ps = ws.cap2 * Wp + slack;
    ws.gy_ld = ws.G * W + slack;
    ws.z.assign(static_cast<size_t>(d.n_x1 * ws.z_ps), acc_t(0));
    ws.ds.assign(static_cast<size_t>(d.n_src * ws.ds_ps), acc_t(0));
    ws.q.assign(static_cast<size_t>(d.n_cheap * ws.q_ps), acc_t(0));
    ws.gy1.assign(static_cast<size_t>(d.n_x1 * ws.gy_ld), acc_t(0));
    ws.t.assign(static_cast<size_t>(W + slack), acc_t(0));
    ws.gx.assign(static_cast<size_t>(W + slack), acc_t(0));
    ws.vr.assign(static_cast<size_t>(W + slack), acc_t(0));
    if (d.gated) {
      ws.gt.assign(static_cast<size_t>(ws.cap2 * W + slack), acc_t(0));
      ws.hr_rows = 2 * ws.cap2 + 2;
      ws.hr.assign(static_cast<size_t>(ws.hr_rows * (W + V)), acc_t(0));
      ws.adj.init(W, 1, d.Wg, 4, &cx.gt, d.bilinear);
    }
    ws.accw.assign(static_cast<size_t>(d.KK * V), acc_t(0));
    ws.zero.assign(static_cast<size_t>(Wp + slack), acc_t(0));
    ws.xt.assign(static_cast<size_t>(kDotMinPixels * cx.Cpad), acc_t(0));
  } else {
    ws.z.assign(static_cast<size_t>(ws.cap1 * W * cx.Zc + slack), acc_t(0));
    if (d.n_cheap > 0) {
      ws.ds.assign(static_cast<size_t>(ws.cap1 * Wp * cx.Cds + slack), acc_t(0));
      ws.q.assign(static_cast<size_t>(ws.cap2 * Wp * cx.Cq + slack), acc_t(0));
    }
    ws.gy1.assign(static_cast<size_t>(ws.G * W * cx.Zc + slack), acc_t(0));
    ws.t.assign(static_cast<size_t>(W * cx.Cq + slack), acc_t(0));
    ws.vr.assign(static_cast<size_t>(W * d.oc + slack), acc_t(0));
    if (d.gated) {
      ws.gcB.init(W, d.oc);
      ws.gcC.init(W, d.oc);
      ws.adjB.init(W, d.oc, d.Wg, 4, &cx.gt, d.bilinear);
      ws.adjC.init(W, d.oc, d.Wg, 4, &cx.gt, d.bilinear);
    }
    ws.tx.assign(static_cast<size_t>(cx.Zc + slack), acc_t(0));
    ws.x1.assign(static_cast<size_t>(cx.Zc + slack), acc_t(0));
  }
  ws.rows.assign(static_cast<size_t>(d.K), nullptr);
  return ws;
}

template <Act A, typename scalar_t>
void bwd_planar_segment(const Ctx<scalar_t>& cx, const scalar_t* go, scalar_t* gx_out, const Needs& nd,
                        const Segment& sg, Partials<acc_of<scalar_t>>& pt, acc_of<scalar_t>* ug, const GateSeg& gs,
                        BwdWs<acc_of<scalar_t>>& ws) {
  using acc_t = acc_of<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Geometry& d = cx.d;
  const int64_t W = d.W, H = d.H, R = d.R, K = d.K, KK = d.KK, Wp = W + 2 * R, HW = d.HW, G = ws.G, C = d.C;
  const int64_t n = sg.n, r0 = sg.r0, r1 = sg.r1;
  const bool primary = nd.primary();
  const bool gate_grad = ug != nullptr;
  const scalar_t* xn = cx.x + n * C * HW;
  const int st = cx.stats;  // statistics backward (1, 2): no grad_out, dz from the coefficients
  const bool go_in = st == 0 || st == 3;  // 3: grad_out plus the stage-2 statistics' gradient
  const scalar_t* gon = go_in ? go + n * d.oc * HW : nullptr;
  scalar_t* gxn = nd.x ? gx_out + n * C * HW : nullptr;
  const int64_t gplane = d.Hg * d.Wg;
  const scalar_t* gn = d.gated ? cx.gate + n * d.oc * gplane : nullptr;
  acc_t* z = ws.z.data();    // raw W1 x, rows [xlo, xhi)
  acc_t* ds = ws.ds.data();  // x1, zero-padded, rows [xlo, xhi)
  acc_t* q = ws.q.data();    // g2 * s2, zero-padded, rows [qlo, qhi)
  acc_t* gy1 = ws.gy1.data();
  acc_t* t = ws.t.data();
  acc_t* gx = ws.gx.data();
  acc_t* vr = ws.vr.data();
  acc_t* gt = ws.gt.data();
  const acc_t** rows = ws.rows.data();

  int64_t xlo = std::max<int64_t>(r0 - 2 * R, 0), xhi = xlo;
  int64_t qlo = std::max<int64_t>(r0 - R, 0), qhi = qlo;
  for (int64_t s = r0, e; s < r1; s = e) {
    e = std::min(s + G, r1);
    // ---- x1 on rows [s - 2R, e + 2R) ----
    const int64_t nlo = std::max<int64_t>(s - 2 * R, 0), nhi = std::min(e + 2 * R, H);
    if (nlo > xlo) {
      const int64_t keep = std::max<int64_t>(xhi - nlo, 0);
      shift_rows(z, d.n_x1, ws.z_ps, W, nlo - xlo, keep);
      shift_rows(ds, d.n_src, ws.ds_ps, Wp, nlo - xlo, keep);
      xlo = nlo;
      xhi = std::max(xhi, nlo);
    }
    if (nhi > xhi) {
      const int64_t np = (nhi - xhi) * W;
      acc_t* z0 = z + (xhi - xlo) * W;
      if (cx.zl != nullptr) {  // z1 given: its rows, zero-padded to whole vectors
        const acc_t* zn = cx.zl + n * d.n_x1 * HW + xhi * W;
        const int64_t padded = round_up(np, V);
        for (int64_t c = 0; c < d.n_x1; ++c) {
          std::copy_n(zn + c * HW, np, z0 + c * ws.z_ps);
          std::fill(z0 + c * ws.z_ps + np, z0 + c * ws.z_ps + padded, acc_t(0));
        }
      } else {
        Gemm<acc_t, acc_t, scalar_t, acc_t, false>::run(d.n_x1, np, C, cx.w1.data(), C, 1, xn + xhi * W, HW,
                                                        cx.x_end, z0, ws.z_ps, true);
      }
      for (int64_t c = 0; c < d.n_src; ++c) {
        const Vec sv(cx.s1[c]), bv(cx.b1[c]);
        for (int64_t h = xhi; h < nhi; ++h) {
          const acc_t* src = z0 + c * ws.z_ps + (h - xhi) * W;
          acc_t* dst = ds + c * ws.ds_ps + (h - xlo) * Wp + R;
          for (int64_t w = 0; w < W; w += V)
            keep_first(act_v<A>(at::vec::fmadd(Vec::loadu(src + w), sv, bv)), W - w).store(dst + w);
        }
      }
      xhi = nhi;
    }
    // ---- g2 * s2 on rows [s - R, e + R); reductions of the cheap half on the owned rows ----
    const int64_t qnlo = std::max<int64_t>(s - R, 0), qnhi = std::min(e + R, H);
    if (qnlo > qlo) {
      const int64_t keep = std::max<int64_t>(qhi - qnlo, 0);
      shift_rows(q, d.n_cheap, ws.q_ps, Wp, qnlo - qlo, keep);
      qlo = qnlo;
      qhi = std::max(qhi, qnlo);
    }
    if (qnhi > qhi) {
      for (int64_t o = 0; o < d.n_cheap; ++o) {
        const acc_t* plane = ds + (o / d.rm1) * ws.ds_ps;
        acc_t* qp = q + o * ws.q_ps;
        const int64_t oci = d.init + o;
        const scalar_t* gop = go_in ? gon + oci * HW : nullptr;
        if (go_in) {
          if (o + 1 < d.n_cheap) prefetch_range(gop + HW + qhi * W, (qnhi - qhi) * W);
          else prefetch_range(gon + s * W, (e - s) * W);  // the primary chain's first channel
        }
        const Vec sv(cx.s2[o]), bv(cx.b2[o]);
        // statistics backward (stage 2): the coefficients of dz (the vectors are empty otherwise)
        const Vec av(st ? cx.ca[o] : acc_t(0)), cv(st ? cx.cc[o] : acc_t(0));
        const Vec mv(st ? cx.cm[o] : acc_t(0));
        Vec rs(acc_t(0)), rb(acc_t(0));
        bool owned_any = false;
        if (nd.w2) std::fill(ws.accw.begin(), ws.accw.end(), acc_t(0));
        if (gn != nullptr)
          gate_rows(gt, ws.hr.data(), ws.hr_rows, gn + oci * gplane, qhi, qnhi, W, d.Wg, cx.gt, d.bilinear);
        if (gate_grad) ws.adj.begin(ug + gs.offset + oci * gs.ghn * d.Wg, 0, gs.gh_lo, 0, 1);
        for (int64_t h = qhi; h < qnhi; ++h) {
          for (int64_t ky = 0; ky < K; ++ky) {
            const int64_t hh = h + ky - R;
            rows[ky] = (hh >= 0 && hh < H) ? plane + (hh - xlo) * Wp : ws.zero.data();
          }
          dw_row_planar(rows, K, cx.w2.data() + o * KK, W, t, false);
          const acc_t* gtr = gt + (h - qhi) * W;
          const bool owned = h >= r0 && h < r1;
          const scalar_t* gor = go_in ? gop + h * W : nullptr;
          acc_t* qrow = qp + (h - qlo) * Wp + R;
          if (st == 2) {
            // dz2 = a + c (z2 - mean): the upstream gradient of the depthwise output itself
            for (int64_t w = 0; w < W; w += V)
              keep_first(at::vec::fmadd(cv, Vec::loadu(t + w) - mv, av), W - w).store(qrow + w);
          }
          for (int64_t w = 0; w < W && go_in; w += V) {
            const int64_t m = std::min<int64_t>(V, W - w);
            const Vec c2 = Vec::loadu(t + w);
            const Vec y2 = at::vec::fmadd(c2, sv, bv);
            const Vec gov = vload<acc_t>(gor + w, m);
            Vec g2 = gn != nullptr ? gov * Vec::loadu(gtr + w) : gov;
            g2 = act_grad_v<A>(g2, y2);  // the activation's backward from the pre-activation y2
            g2 = keep_first(g2, m);
            if (st == 3)  // dz2 = g2 s2 + a + c (z2 - mean)
              keep_first(at::vec::fmadd(cv, c2 - mv, at::vec::fmadd(g2, sv, av)), m).store(qrow + w);
            else
              (g2 * sv).store(qrow + w);
            if (owned) {
              rs = at::vec::fmadd(g2, keep_first(c2, m), rs);  // c2 past W: the next row's values (maybe Inf)
              rb = rb + g2;
              if (gate_grad) (gov * act_v<A>(y2)).store(vr + w);
            }
          }
          if (owned) {
            owned_any = true;
            if (nd.w2) dwgrad_row_planar(rows, K, qrow, W, ws.accw.data());
            if (gate_grad) ws.adj.add(h, vr);
          }
        }
        if (gate_grad) ws.adj.flush();
        if (owned_any) {
          pt.s2[o] += hsum(rs);
          pt.b2[o] += hsum(rb);
          if (nd.w2)
            for (int64_t k = 0; k < KK; ++k) pt.w2[o * KK + k] += hsum(Vec::loadu(ws.accw.data() + k * V));
        }
      }
      qhi = qnhi;
    }
    // ---- owned rows [s, e): grad of x1, the BN1 / act chain, g1 * s1 ----
    if (primary || gate_grad) {
      for (int64_t c = 0; c < d.n_x1; ++c) {
        const scalar_t* gop = go_in ? gon + c * HW : nullptr;
        if (go_in && c + 1 < d.n_x1) prefetch_range(gop + HW + s * W, (e - s) * W);
        const acc_t* zc = z + c * ws.z_ps;
        const Vec sv(cx.s1[c]), bv(cx.b1[c]);
        // statistics backward (stage 1): the coefficients of dz (the vectors are empty otherwise)
        const Vec av(st == 1 ? cx.ca[c] : acc_t(0)), cv(st == 1 ? cx.cc[c] : acc_t(0));
        const Vec mv(st == 1 ? cx.cm[c] : acc_t(0));
        Vec rs(acc_t(0)), rb(acc_t(0));
        if (gn != nullptr)
          gate_rows(gt, ws.hr.data(), ws.hr_rows, gn + c * gplane, s, e, W, d.Wg, cx.gt, d.bilinear);
        if (gate_grad) ws.adj.begin(ug + gs.offset + c * gs.ghn * d.Wg, 0, gs.gh_lo, 0, 1);
        for (int64_t h = s; h < e; ++h) {
          const scalar_t* gor = go_in ? gop + h * W : nullptr;
          const acc_t* gtr = gt + (h - s) * W;
          if (st == 1) {
            // dz1 = a + c (z1 - mean) is grad_out of the primary conv itself: no BN1 / act chain
            const acc_t* zr = zc + (h - xlo) * W;
            acc_t* gyr = gy1 + c * ws.gy_ld + (h - s) * W;
            for (int64_t w = 0; w < W; w += V)
              keep_first(at::vec::fmadd(cv, Vec::loadu(zr + w) - mv, av), W - w).store(gyr + w);
            continue;
          }
          if (primary) {
            if (st == 2) {
              // no direct gradient of x1: only the transposed depthwise below
              for (int64_t w = 0; w < W; w += V) Vec(acc_t(0)).store(gx + w);
            } else {
              for (int64_t w = 0; w < W; w += V) {
                const Vec gov = vload<acc_t>(gor + w, std::min<int64_t>(V, W - w));
                (gn != nullptr ? gov * Vec::loadu(gtr + w) : gov).store(gx + w);
              }
            }
            for (int64_t j = 0; j < d.rm1; ++j) {
              const int64_t o = c * d.rm1 + j;
              if (o >= d.n_cheap) break;
              const acc_t* qp = q + o * ws.q_ps;
              for (int64_t ky = 0; ky < K; ++ky) {
                const int64_t hh = h - R + ky;
                rows[ky] = (hh >= 0 && hh < H) ? qp + (hh - qlo) * Wp : ws.zero.data();
              }
              dw_row_planar(rows, K, cx.w2f.data() + o * KK, W, gx, true);
            }
          }
          const acc_t* zr = zc + (h - xlo) * W;
          acc_t* gyr = gy1 + c * ws.gy_ld + (h - s) * W;
          for (int64_t w = 0; w < W; w += V) {
            const int64_t m = std::min<int64_t>(V, W - w);
            const Vec zv = Vec::loadu(zr + w);
            const Vec y1 = at::vec::fmadd(zv, sv, bv);
            if (gate_grad) (vload<acc_t>(gor + w, m) * act_v<A>(y1)).store(vr + w);
            if (primary) {
              Vec g1 = Vec::loadu(gx + w);
              g1 = act_grad_v<A>(g1, y1);
              g1 = keep_first(g1, m);
              rs = at::vec::fmadd(g1, keep_first(zv, m), rs);  // zv past W: the next row's z (maybe Inf)
              rb = rb + g1;
              (g1 * sv).store(gyr + w);
            }
          }
          if (gate_grad) ws.adj.add(h, vr);
        }
        if (gate_grad) ws.adj.flush();
        if (primary) {
          pt.s1[c] += hsum(rs);
          pt.b1[c] += hsum(rb);
        }
      }
    }
    // ---- grad_W1 += (g1 s1) x^T, grad_x = W1^T (g1 s1) on the owned rows; z1 given: dz1 = g1 s1 ----
    const int64_t np = (e - s) * W;
    if (d.z1_in) {
      if (nd.x)
        for (int64_t c = 0; c < d.n_x1; ++c) std::copy_n(gy1 + c * ws.gy_ld, np, gxn + c * HW + s * W);
      continue;
    }
    if (nd.w1) {
      if (np >= kDotMinPixels) {
        DotGemm<acc_t, scalar_t>::run(d.n_x1, C, np, gy1, ws.gy_ld, xn + s * W, HW, pt.w1.data(), C);
      } else {
        // few pixels (small images): transpose x's block, then the broadcast GEMM over the pixels
        acc_t* xt = ws.xt.data();
        for (int64_t k = 0; k < C; ++k) {
          const scalar_t* xr = xn + k * HW + s * W;
          for (int64_t i = 0; i < np; ++i) xt[i * cx.Cpad + k] = static_cast<acc_t>(xr[i]);
        }
        Gemm<acc_t, acc_t, acc_t, acc_t, true>::run(d.n_x1, C, np, gy1, ws.gy_ld, 1, xt, cx.Cpad, nullptr,
                                                    pt.w1.data(), C, false);
      }
    }
    if (nd.x) {
      Epilogue<acc_t> epi;
      epi.stream = ws.stream;
      Gemm<acc_t, acc_t, acc_t, scalar_t, false>::run(C, np, d.n_x1, cx.w1r.data(), d.n_x1, 1, gy1, ws.gy_ld,
                                                      nullptr, gxn + s * W, HW, false, epi);
    }
  }
}

template <Act A, typename scalar_t>
void bwd_cl_segment(const Ctx<scalar_t>& cx, const scalar_t* go, scalar_t* gx_out, const Needs& nd,
                    const Segment& sg, Partials<acc_of<scalar_t>>& pt, acc_of<scalar_t>* ug, const GateSeg& gs,
                    BwdWs<acc_of<scalar_t>>& ws) {
  using acc_t = acc_of<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Geometry& d = cx.d;
  const int64_t W = d.W, H = d.H, R = d.R, K = d.K, Wp = W + 2 * R, HW = d.HW, G = ws.G, C = d.C, oc = d.oc;
  const int64_t Zc = cx.Zc, Cq = cx.Cq, Cds = cx.Cds, Cpad = cx.Cpad;
  const int64_t zrs = W * Zc, dsrs = Wp * Cds, qrs = Wp * Cq;
  const int64_t n = sg.n, r0 = sg.r0, r1 = sg.r1;
  const bool primary = nd.primary();
  const bool gate_grad = ug != nullptr;
  const int st = cx.stats;  // statistics backward (1, 2): no grad_out, dz from the coefficients
  const bool go_in = st == 0 || st == 3;  // 3: grad_out plus the stage-2 statistics' gradient
  const scalar_t* xn = cx.x + n * HW * C;
  const scalar_t* gon = go_in ? go + n * HW * oc : nullptr;
  scalar_t* gxn = nd.x ? gx_out + n * HW * C : nullptr;
  const scalar_t* gn = d.gated ? cx.gate + n * oc * d.Hg * d.Wg : nullptr;
  const acc_t* s1p = cx.s1.data();  // zero-padded to whole vectors
  const acc_t* b1p = cx.b1.data();
  const acc_t* s2p = cx.s2.data();
  const acc_t* b2p = cx.b2.data();
  acc_t* z = ws.z.data();
  acc_t* ds = ws.ds.data();
  acc_t* q = ws.q.data();
  acc_t* gy1 = ws.gy1.data();
  acc_t* t = ws.t.data();
  acc_t* vr = ws.vr.data();
  acc_t* tx = ws.tx.data();
  acc_t* x1t = ws.x1.data();
  const acc_t** rows = ws.rows.data();

  if (gn != nullptr) {
    ws.gcB.reset();
    ws.gcC.reset();
  }
  if (gate_grad) {
    ws.adjB.begin(ug + gs.offset, gs.ghn * d.Wg, gs.gh_lo, d.init, oc);
    ws.adjC.begin(ug + gs.offset, gs.ghn * d.Wg, gs.gh_lo, 0, d.n_x1);
  }

  int64_t xlo = std::max<int64_t>(r0 - 2 * R, 0), xhi = xlo;
  int64_t qlo = std::max<int64_t>(r0 - R, 0), qhi = qlo;
  for (int64_t s = r0, e; s < r1; s = e) {
    e = std::min(s + G, r1);
    // ---- x1 on rows [s - 2R, e + 2R) ----
    const int64_t nlo = std::max<int64_t>(s - 2 * R, 0), nhi = std::min(e + 2 * R, H);
    if (nlo > xlo) {
      const int64_t keep = std::max<int64_t>(xhi - nlo, 0);
      shift_rows(z, 1, 0, zrs, nlo - xlo, keep);
      if (d.n_cheap > 0) shift_rows(ds, 1, 0, dsrs, nlo - xlo, keep);
      xlo = nlo;
      xhi = std::max(xhi, nlo);
    }
    if (nhi > xhi) {
      const int64_t np = (nhi - xhi) * W;
      acc_t* z0 = z + (xhi - xlo) * zrs;
      if (cx.zl != nullptr) {  // z1 given: its pixels, zero-padded to Zc channels
        const acc_t* zp = cx.zl + (n * HW + xhi * W) * d.n_x1;
        for (int64_t p = 0; p < np; ++p) {
          std::copy_n(zp + p * d.n_x1, d.n_x1, z0 + p * Zc);
          std::fill(z0 + p * Zc + d.n_x1, z0 + (p + 1) * Zc, acc_t(0));
        }
      } else {
        Gemm<acc_t, scalar_t, acc_t, acc_t, false>::run(np, d.n_x1, C, xn + xhi * W * C, C, 1, cx.w1.data(), Zc,
                                                        nullptr, z0, Zc, true);
      }
      if (d.n_cheap > 0) {
        for (int64_t h = xhi; h < nhi; ++h) {
          for (int64_t w = 0; w < W; ++w) {
            const acc_t* src = z0 + ((h - xhi) * W + w) * Zc;
            acc_t* dst = ds + (h - xlo) * dsrs + (w + R) * Cds;
            acc_t* x1dst = d.rm1 == 1 ? dst : x1t;
            for (int64_t c = 0; c < Zc; c += V)
              act_v<A>(at::vec::fmadd(Vec::loadu(src + c), Vec::loadu(s1p + c), Vec::loadu(b1p + c)))
                  .store(x1dst + c);
            if (d.rm1 != 1)
              for (int64_t o = 0; o < d.n_cheap; ++o) dst[o] = x1t[o / d.rm1];
          }
        }
      }
      xhi = nhi;
    }
    // ---- g2 * s2 on rows [s - R, e + R); reductions of the cheap half on the owned rows ----
    const int64_t qnlo = std::max<int64_t>(s - R, 0), qnhi = std::min(e + R, H);
    if (qnlo > qlo) {
      const int64_t keep = std::max<int64_t>(qhi - qnlo, 0);
      if (d.n_cheap > 0) shift_rows(q, 1, 0, qrs, qnlo - qlo, keep);
      qlo = qnlo;
      qhi = std::max(qhi, qnlo);
    }
    if (qnhi > qhi && d.n_cheap > 0) {
      for (int64_t h = qhi; h < qnhi; ++h) {
        for (int64_t ky = 0; ky < K; ++ky) {
          const int64_t hh = h + ky - R;
          rows[ky] = (hh >= 0 && hh < H) ? ds + (hh - xlo) * dsrs : nullptr;
        }
        dw_row_pm(rows, K, cx.w2.data(), Cq, Cds, Cq / V, W, t, Cq, false);
        const acc_t* gt = gn != nullptr ? ws.gcB.row(h, gn, oc, W, d.Hg, d.Wg, cx.gt, d.bilinear) : nullptr;
        const bool owned = h >= r0 && h < r1;
        const scalar_t* gor = go_in ? gon + h * W * oc : nullptr;
        if (go_in && h + 1 < H) prefetch_range(gor + W * oc, W * oc);
        acc_t* qrow = q + (h - qlo) * qrs;
        if (st == 2) {
          // dz2 = a + c (z2 - mean): the upstream gradient of the depthwise output itself
          const acc_t* ca = cx.ca.data();
          const acc_t* cc = cx.cc.data();
          const acc_t* cm = cx.cm.data();
          for (int64_t w = 0; w < W; ++w)
            for (int64_t c = 0; c < d.n_cheap; c += V) {
              const int64_t m = std::min<int64_t>(V, d.n_cheap - c);
              const Vec dz = at::vec::fmadd(Vec::loadu(cc + c), Vec::loadu(t + w * Cq + c) - Vec::loadu(cm + c),
                                            Vec::loadu(ca + c));
              keep_first(dz, m).store(qrow + (w + R) * Cq + c);
            }
        }
        for (int64_t w = 0; w < W && go_in; ++w) {
          for (int64_t c = 0; c < d.n_cheap; c += V) {
            const int64_t m = std::min<int64_t>(V, d.n_cheap - c);
            const Vec c2 = Vec::loadu(t + w * Cq + c);
            const Vec y2 = at::vec::fmadd(c2, Vec::loadu(s2p + c), Vec::loadu(b2p + c));
            const Vec gov = vload<acc_t>(gor + w * oc + d.init + c, m);
            Vec g2 = gn != nullptr ? gov * Vec::loadu(gt + w * oc + d.init + c) : gov;
            g2 = act_grad_v<A>(g2, y2);  // the activation's backward from the pre-activation y2
            g2 = keep_first(g2, m);
            if (st == 3)  // dz2 = g2 s2 + a + c (z2 - mean)
              keep_first(at::vec::fmadd(Vec::loadu(cx.cc.data() + c), c2 - Vec::loadu(cx.cm.data() + c),
                                        at::vec::fmadd(g2, Vec::loadu(s2p + c), Vec::loadu(cx.ca.data() + c))),
                         m).store(qrow + (w + R) * Cq + c);
            else
              (g2 * Vec::loadu(s2p + c)).store(qrow + (w + R) * Cq + c);
            if (owned) {
              at::vec::fmadd(g2, c2, Vec::loadu(pt.s2.data() + c)).store(pt.s2.data() + c);
              (Vec::loadu(pt.b2.data() + c) + g2).store(pt.b2.data() + c);
              if (gate_grad) vstore<acc_t>(vr + w * oc + d.init + c, gov * act_v<A>(y2), m);
            }
          }
        }
        if (owned && nd.w2) dwgrad_row_pm(rows, K, qrow + R * Cq, Cq, Cds, Cq / V, W, pt.w2.data());
        if (owned && gate_grad) ws.adjB.add(h, vr);
      }
      qhi = qnhi;
    } else if (qnhi > qhi) {
      qhi = qnhi;
    }
    // ---- owned rows [s, e): grad of x1, the BN1 / act chain, g1 * s1 ----
    if (primary || gate_grad) {
      for (int64_t h = s; h < e; ++h) {
        const acc_t* gt = gn != nullptr ? ws.gcC.row(h, gn, oc, W, d.Hg, d.Wg, cx.gt, d.bilinear) : nullptr;
        const scalar_t* gor = go_in ? gon + h * W * oc : nullptr;
        const bool cheap = primary && d.n_cheap > 0;
        if (cheap) {
          for (int64_t ky = 0; ky < K; ++ky) {
            const int64_t hh = h - R + ky;
            rows[ky] = (hh >= 0 && hh < H) ? q + (hh - qlo) * qrs : nullptr;
          }
          dw_row_pm(rows, K, cx.w2f.data(), Cq, Cq, Cq / V, W, t, Cq, false);
        }
        if (st == 1) {
          // dz1 = a + c (z1 - mean) is grad_out of the primary conv itself: no BN1 / act chain
          for (int64_t w = 0; w < W; ++w) {
            const acc_t* zp = z + (h - xlo) * zrs + w * Zc;
            for (int64_t c = 0; c < d.n_x1; c += V) {
              const Vec dz = at::vec::fmadd(Vec::loadu(cx.cc.data() + c),
                                            Vec::loadu(zp + c) - Vec::loadu(cx.cm.data() + c),
                                            Vec::loadu(cx.ca.data() + c));
              keep_first(dz, std::min<int64_t>(V, d.n_x1 - c)).store(gy1 + ((h - s) * W + w) * Zc + c);
            }
          }
          continue;
        }
        for (int64_t w = 0; w < W; ++w) {
          const acc_t* zp = z + (h - xlo) * zrs + w * Zc;
          if (cheap && d.rm1 != 1) {
            for (int64_t c = 0; c < Zc; ++c) {
              acc_t sacc = acc_t(0);
              for (int64_t j = 0; j < d.rm1; ++j) {
                const int64_t o = c * d.rm1 + j;
                if (o < d.n_cheap) sacc += t[w * Cq + o];
              }
              tx[c] = sacc;
            }
          }
          for (int64_t c = 0; c < d.n_x1; c += V) {
            const int64_t m = std::min<int64_t>(V, d.n_x1 - c);
            const Vec gov = go_in ? vload<acc_t>(gor + w * oc + c, m) : Vec(acc_t(0));
            const Vec zv = Vec::loadu(zp + c);
            const Vec y1 = at::vec::fmadd(zv, Vec::loadu(s1p + c), Vec::loadu(b1p + c));
            if (gate_grad) vstore<acc_t>(vr + w * oc + c, gov * act_v<A>(y1), m);
            if (primary) {
              Vec g1 = gn != nullptr ? gov * Vec::loadu(gt + w * oc + c) : gov;
              if (cheap) {
                if (d.rm1 == 1) {
                  if (c < Cq) g1 = g1 + Vec::loadu(t + w * Cq + c);
                } else {
                  g1 = g1 + Vec::loadu(tx + c);
                }
              }
              g1 = act_grad_v<A>(g1, y1);
              g1 = keep_first(g1, m);
              at::vec::fmadd(g1, zv, Vec::loadu(pt.s1.data() + c)).store(pt.s1.data() + c);
              (Vec::loadu(pt.b1.data() + c) + g1).store(pt.b1.data() + c);
              (g1 * Vec::loadu(s1p + c)).store(gy1 + ((h - s) * W + w) * Zc + c);
            }
          }
        }
        if (gate_grad) ws.adjC.add(h, vr);
      }
    }
    // ---- grad_W1 += (g1 s1)^T x, grad_x = (g1 s1) W1 on the owned rows; z1 given: dz1 = g1 s1 ----
    const int64_t np = (e - s) * W;
    if (d.z1_in) {
      if (nd.x)
        for (int64_t p = 0; p < np; ++p) std::copy_n(gy1 + p * Zc, d.n_x1, gxn + (s * W + p) * C);
      continue;
    }
    if (nd.w1)
      Gemm<acc_t, acc_t, scalar_t, acc_t, true>::run(d.n_x1, C, np, gy1, 1, Zc, xn + s * W * C, C, cx.x_end,
                                                     pt.w1.data(), Cpad, true);
    if (nd.x) {
      Epilogue<acc_t> epi;
      epi.stream = ws.stream;
      Gemm<acc_t, acc_t, acc_t, scalar_t, false>::run(np, C, d.n_x1, gy1, Zc, 1, cx.w1r.data(), Cpad, nullptr,
                                                      gxn + s * W * C, C, false, epi);
    }
  }  if (gate_grad) {
    ws.adjB.flush();
    ws.adjC.flush();
  }
}

template <typename scalar_t>
void backward_impl(const Geometry& geo, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& w1,
                   const at::Tensor& s1, const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2,
                   const at::Tensor& b2, const std::optional<at::Tensor>& gate, at::TensorList grads,
                   const Needs& nd, const StatsGradient& stats) {
  using acc_t = acc_of<scalar_t>;
  const int stats_stage = stats.stage;
  Ctx<scalar_t> cx;
  cx.prepare(geo, x, w1, w2, gate, true);
  cx.load_affine(s1, b1, s2, b2);
  cx.set_stats(stats);
  const Geometry& d = cx.d;
  const int64_t ng = num_groups(d.N * d.H);
  const auto groups = split_rows(d.N, d.H, ng);

  // the gate gradient: one slice per segment (the gate rows its output rows read), summed per image afterwards
  const bool gate_grad = nd.gate && d.gated;
  std::vector<std::vector<GateSeg>> gsegs(static_cast<size_t>(ng));
  int64_t ug_total = 0;
  for (int64_t g = 0; g < ng; ++g) {
    for (const Segment& sg : groups[g]) {
      GateSeg gs;
      if (gate_grad) {
        gs.gh_lo = cx.gt.h0[sg.r0];
        gs.ghn = cx.gt.h1[sg.r1 - 1] - gs.gh_lo + 1;
        gs.offset = ug_total;
        ug_total += d.oc * gs.ghn * d.Wg;
      }
      gsegs[g].push_back(gs);
    }
  }
  std::vector<acc_t> ug(static_cast<size_t>(ug_total), acc_t(0));

  const int64_t w1_ld = d.cl ? cx.Cpad : d.C;
  std::vector<Partials<acc_t>> parts(static_cast<size_t>(ng));
  const scalar_t* go = stats_stage == 0 || stats_stage == 3 ? grad_out.data_ptr<scalar_t>() : nullptr;
  scalar_t* gx = nd.x ? grads[0].data_ptr<scalar_t>() : nullptr;

  const bool stream = nd.x && grads[0].numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
  // the statistics backward of stage 1 (z1) has no activation: one instantiation
  dispatch_act(stats_stage == 1 ? Act::None : d.act, [&](auto act) {
    constexpr Act A = decltype(act)::value;
    at::parallel_for(0, ng, 1, [&](int64_t gb, int64_t ge) {
      auto ws = make_bwd_ws(cx);
      ws.stream = stream;
      for (int64_t g = gb; g < ge; ++g) {
        Partials<acc_t>& pt = parts[g];
        if (nd.w1) pt.w1.assign(static_cast<size_t>(d.n_x1 * w1_ld), acc_t(0));
        pt.s1.assign(static_cast<size_t>(cx.Zc), acc_t(0));
        pt.b1.assign(static_cast<size_t>(cx.Zc), acc_t(0));
        pt.w2.assign(static_cast<size_t>(d.cl ? d.KK * cx.Cq : d.n_cheap * d.KK), acc_t(0));
        pt.s2.assign(static_cast<size_t>(cx.Cq), acc_t(0));
        pt.b2.assign(static_cast<size_t>(cx.Cq), acc_t(0));
        for (size_t i = 0; i < groups[g].size(); ++i) {
          acc_t* ugp = gate_grad ? ug.data() : nullptr;
          if (d.cl) bwd_cl_segment<A>(cx, go, gx, nd, groups[g][i], pt, ugp, gsegs[g][i], ws);
          else bwd_planar_segment<A>(cx, go, gx, nd, groups[g][i], pt, ugp, gsegs[g][i], ws);
        }
      }
      if (stream) stream_fence();
    });
  });

  // ---- sum the groups' partials in group order ----
  if (nd.w1) {
    scalar_t* dst = grads[1].data_ptr<scalar_t>();
    at::parallel_for(0, d.init, 1, [&](int64_t cb, int64_t ce) {
      for (int64_t c = cb; c < ce; ++c)
        for (int64_t k = 0; k < d.C; ++k) {
          acc_t v = acc_t(0);
          if (c < d.n_x1)
            for (int64_t g = 0; g < ng; ++g) v += parts[g].w1[c * w1_ld + k];
          dst[c * d.C + k] = static_cast<scalar_t>(v);
        }
    });
  }
  auto vec_grad = [&](bool need, int idx, int64_t count, int64_t valid, std::vector<acc_t> Partials<acc_t>::*field) {
    if (!need) return;
    acc_t* dst = grads[idx].data_ptr<acc_t>();
    for (int64_t c = 0; c < count; ++c) {
      acc_t v = acc_t(0);
      if (c < valid)
        for (int64_t g = 0; g < ng; ++g) v += (parts[g].*field)[c];
      dst[c] = v;
    }
  };
  vec_grad(nd.s1, 2, d.init, d.n_x1, &Partials<acc_t>::s1);
  vec_grad(nd.b1, 3, d.init, d.n_x1, &Partials<acc_t>::b1);
  vec_grad(nd.s2, 5, d.init * d.rm1, d.n_cheap, &Partials<acc_t>::s2);
  vec_grad(nd.b2, 6, d.init * d.rm1, d.n_cheap, &Partials<acc_t>::b2);
  if (nd.w2) {
    scalar_t* dst = grads[4].data_ptr<scalar_t>();
    for (int64_t o = 0; o < d.init * d.rm1; ++o)
      for (int64_t k = 0; k < d.KK; ++k) {
        acc_t v = acc_t(0);
        if (o < d.n_cheap)
          for (int64_t g = 0; g < ng; ++g) v += d.cl ? parts[g].w2[k * cx.Cq + o] : parts[g].w2[o * d.KK + k];
        dst[o * d.KK + k] = static_cast<scalar_t>(v);
      }
  }
  if (nd.gate) {
    scalar_t* dst = grads[7].data_ptr<scalar_t>();
    const int64_t gplane = d.Hg * d.Wg;
    if (!gate_grad) {
      grads[7].zero_();
    } else {
      // segments of each image, in row order
      std::vector<std::vector<const GateSeg*>> per_image(static_cast<size_t>(d.N));
      for (int64_t g = 0; g < ng; ++g)
        for (size_t i = 0; i < groups[g].size(); ++i) per_image[groups[g][i].n].push_back(&gsegs[g][i]);
      at::parallel_for(0, d.N * d.oc, 1, [&](int64_t pb, int64_t pe) {
        std::vector<acc_t> row(static_cast<size_t>(d.Wg));
        for (int64_t pl = pb; pl < pe; ++pl) {
          const int64_t n = pl / d.oc, c = pl % d.oc;
          for (int64_t gh = 0; gh < d.Hg; ++gh) {
            std::fill(row.begin(), row.end(), acc_t(0));
            for (const GateSeg* gs : per_image[n]) {
              if (gh < gs->gh_lo || gh >= gs->gh_lo + gs->ghn) continue;
              const acc_t* src = ug.data() + gs->offset + (c * gs->ghn + gh - gs->gh_lo) * d.Wg;
              for (int64_t w = 0; w < d.Wg; ++w) row[w] += src[w];
            }
            scalar_t* o = dst + pl * gplane + gh * d.Wg;
            for (int64_t w = 0; w < d.Wg; ++w) o[w] = static_cast<scalar_t>(row[w]);
          }
        }
      });
    }
  }
}

}  // namespace

void backward(const Geometry& geo, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& primary_weight,
              const at::Tensor& primary_scale, const at::Tensor& primary_bias, const at::Tensor& cheap_weight,
              const at::Tensor& cheap_scale, const at::Tensor& cheap_bias, const std::optional<at::Tensor>& gate,
              at::TensorList grads, const Needs& nd, const StatsGradient& stats) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_backward_cpu", [&] {
    backward_impl<scalar_t>(geo, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                            cheap_bias, gate, grads, nd, stats);
  });
}

}  // namespace ghostfast::cpu::ghost_module
