// The Ghost module forward on the CPU (_ghost_module_kernel): per row sub-block, x1 = act(bn1(W1 x)) by the GEMM
// with BN + act fused into its stores (NCHW: along pixels, C[c][p] += W1[c][k] x[k][p]; channels_last: along
// channels, C[p][c] += x[p][k] W1^T[k][c]), the cheap depthwise on the padded x1 window (NCHW: two output rows per
// pass; channels_last: vectors of channels), bn2 + act, the gate, and `out` written once (non-temporal when large).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "batch_norm.h"
#include "cpu/activation.h"
#include "cpu/depthwise.h"
#include "cpu/gate_upsample.h"
#include "cpu/gemm.h"
#include "cpu/ghost_module.h"
#include "cpu/vec.h"

namespace ghostfast::cpu::ghost_module {
namespace {

// dst[0 .. cnt) = [gate *] act(src [* s + b]) (affine optional; A = Act::None: no activation)
template <Act A, typename acc_t, typename scalar_t>
inline void store_out(scalar_t* dst, const acc_t* src, int64_t cnt, const acc_t* gate, bool affine, acc_t s, acc_t b,
                      bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec sv(s), bv(b);
  auto value = [&](int64_t i) {
    Vec v = Vec::loadu(src + i);
    if (affine) v = at::vec::fmadd(v, sv, bv);
    v = act_v<A>(v);
    if (gate != nullptr) v = v * Vec::loadu(gate + i);
    return v;
  };
  int64_t i = 0;
  if constexpr (can_stream<acc_t, scalar_t>()) {
    if (stream && (reinterpret_cast<uintptr_t>(dst) % sizeof(acc_t)) == 0) {
      // plain stores up to a 32-byte boundary, then whole aligned vectors streamed
      const int64_t head = static_cast<int64_t>((32 - reinterpret_cast<uintptr_t>(dst) % 32) % 32 / sizeof(acc_t));
      if (head > 0) {
        const int64_t m = std::min(head, cnt);
        vstore<acc_t>(dst, value(0), m);
        i = m;
      }
      for (; i + V <= cnt; i += V) stream_store<acc_t>(dst + i, value(i));
    }
  }
  for (; i + V <= cnt; i += V) vstore<acc_t>(dst + i, value(i));
  if (i < cnt) vstore<acc_t>(dst + i, value(i), cnt - i);
}

// The measured rule for the library GEMM (`use_library_gemm`; benchmarks/results/cpu-2core/gemm_choice.csv: float32,
// 2 threads, every Ghost-module shape of timm's GhostNets; NOTES.md). On images larger than 14x14 the own GEMM's tiles
// stay in cache and the library's z1 round trip through memory costs more (1.05-1.2x slower). On 14x14 and 7x7
// images the library wins clearly with a long reduction (C_in >= 400: 0.72-0.9x, 0.85-0.88x with cold caches); with
// shorter ones it wins less (0.81-0.97x at batch 8, the 160 -> 960 layers at batch 1) or loses (1.03-1.2x at batch
// 1), and whole models measured no better with those included, so they keep the own GEMM.
bool library_gemm_wins(const Geometry& g) { return g.HW <= 196 && g.C >= 400; }

template <Act A, typename scalar_t>
void fwd_planar_segment(const Ctx<scalar_t>& cx, scalar_t* out, const Segment& sg, FwdWs<acc_of<scalar_t>>& ws) {
  using acc_t = acc_of<scalar_t>;
  const Geometry& d = cx.d;
  const int64_t W = d.W, H = d.H, R = d.R, K = d.K, KK = d.KK, Wp = W + 2 * R, HW = d.HW, G = ws.G;
  const int64_t n = sg.n, r0 = sg.r0, r1 = sg.r1;
  const scalar_t* xn = cx.x + n * d.C * HW;
  scalar_t* on = out + n * d.oc * HW;
  const int64_t gplane = d.Hg * d.Wg;
  const scalar_t* gn = d.gated ? cx.gate + n * d.oc * gplane : nullptr;
  acc_t* z = ws.z.data();
  acc_t* ds = ws.ds.data();
  const acc_t** rows = ws.rows.data();

  int64_t lo = std::max<int64_t>(r0 - R, 0), hi = lo;  // the window holds x1 rows [lo, hi)
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
      // x1 of the new rows: W1 [n_x1 x C] times x [C x pixels], then BN + act in place and the padded copy
      const int64_t np = (nhi - hi) * W;
      acc_t* z0 = z + (hi - lo) * W;
      Epilogue<acc_t> epi;
      epi.kind = Epilogue<acc_t>::ROW;
      epi.scale = cx.s1.data();
      epi.bias = cx.b1.data();
      if (cx.zl != nullptr) {
        const acc_t* zn = cx.zl + n * d.n_x1 * HW + hi * W;
        for (int64_t c = 0; c < d.n_x1; ++c)
          affine_act_row<A>(z0 + c * ws.z_ps, zn + c * HW, np, cx.s1[c], cx.b1[c]);
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
    const acc_t* gv = d.gated ? ws.gt.data() : nullptr;
    // primary channels
    for (int64_t c = 0; c < d.n_x1; ++c) {
      if (gn != nullptr)
        gate_rows(ws.gt.data(), ws.hr.data(), ws.hr_rows, gn + c * gplane, s, e, W, d.Wg, cx.gt, d.bilinear);
      store_out<Act::None, acc_t>(on + c * HW + s * W, z + c * ws.z_ps + (s - lo) * W, cnt, gv, false, acc_t(0),
                                  acc_t(0), ws.stream);
    }
    // cheap channels
    for (int64_t o = 0; o < d.n_cheap; ++o) {
      const acc_t* plane = ds + (o / d.rm1) * ws.ds_ps;
      for (int64_t i = 0; i < e - s + K - 1; ++i) {
        const int64_t hh = s - R + i;
        rows[i] = (hh >= 0 && hh < H) ? plane + (hh - lo) * Wp : ws.zero.data();
      }
      dw_rows_planar(rows, e - s, K, cx.w2.data() + o * KK, W, ws.t.data(), W, false);
      const int64_t oc_idx = d.init + o;
      if (gn != nullptr)
        gate_rows(ws.gt.data(), ws.hr.data(), ws.hr_rows, gn + oc_idx * gplane, s, e, W, d.Wg, cx.gt, d.bilinear);
      store_out<A, acc_t>(on + oc_idx * HW + s * W, ws.t.data(), cnt, gv, true, cx.s2[o], cx.b2[o], ws.stream);
    }
  }
}

template <Act A, typename scalar_t>
void fwd_cl_segment(const Ctx<scalar_t>& cx, scalar_t* out, const Segment& sg, FwdWs<acc_of<scalar_t>>& ws) {
  using acc_t = acc_of<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Geometry& d = cx.d;
  const int64_t W = d.W, H = d.H, R = d.R, K = d.K, Wp = W + 2 * R, HW = d.HW, G = ws.G, C = d.C, oc = d.oc;
  const int64_t Zc = cx.Zc, Cq = cx.Cq, Cds = cx.Cds;
  const int64_t n = sg.n, r0 = sg.r0, r1 = sg.r1;
  const scalar_t* xn = cx.x + n * HW * C;
  scalar_t* on = out + n * HW * oc;
  const scalar_t* gn = d.gated ? cx.gate + n * oc * d.Hg * d.Wg : nullptr;
  acc_t* z = ws.z.data();
  acc_t* ds = ws.ds.data();
  const acc_t** rows = ws.rows.data();
  const int64_t zrs = W * Zc, dsrs = Wp * Cds;  // row strides
  if (gn != nullptr) ws.gcache.reset();

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
      // x1 of the new rows: x [pixels x C] times W1^T [C x n_x1], then BN + act in place
      const int64_t np = (nhi - hi) * W;
      acc_t* z0 = z + (hi - lo) * zrs;
      Epilogue<acc_t> epi;
      epi.kind = Epilogue<acc_t>::COL;
      epi.scale = cx.s1.data();
      epi.bias = cx.b1.data();
      if (cx.zl != nullptr) {
        const acc_t* zp = cx.zl + (n * HW + hi * W) * d.n_x1;
        for (int64_t p = 0; p < np; ++p) affine_act_pixel<A>(z0 + p * Zc, zp + p * d.n_x1, d.n_x1, Zc, cx);
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
    const int64_t n_x1 = d.n_x1, n_cheap = d.n_cheap, init = d.init;
    for (int64_t h = s; h < e; ++h) {
      const acc_t* gt =
          gn != nullptr ? ws.gcache.row(h, gn, oc, W, d.Hg, d.Wg, cx.gt, d.bilinear) : nullptr;
      acc_t* t = ws.t.data();
      if (n_cheap > 0) {
        for (int64_t ky = 0; ky < K; ++ky) {
          const int64_t hh = h + ky - R;
          rows[ky] = (hh >= 0 && hh < H) ? ds + (hh - lo) * dsrs : nullptr;
        }
        dw_row_pm(rows, K, cx.w2.data(), Cq, Cds, Cq / V, W, t, Cq, false);
      }
      // the whole output row, pixel by pixel (whole-vector writes run into channels written right after), then
      // streamed to `out` in one contiguous piece
      const acc_t* zr = z + (h - lo) * zrs;
      acc_t* orow = ws.orow.data();
      for (int64_t w = 0; w < W; ++w) {
        acc_t* op = orow + w * oc;
        const acc_t* gp = gt != nullptr ? gt + w * oc : nullptr;
        for (int64_t c = 0; c < n_x1; c += V) {
          Vec v = Vec::loadu(zr + w * Zc + c);
          if (gp != nullptr) v = v * Vec::loadu(gp + c);
          v.store(op + c);
        }
        for (int64_t c = 0; c < n_cheap; c += V) {
          Vec v = at::vec::fmadd(Vec::loadu(t + w * Cq + c), Vec::loadu(cx.s2.data() + c),
                                 Vec::loadu(cx.b2.data() + c));
          v = act_v<A>(v);
          if (gp != nullptr) v = v * Vec::loadu(gp + init + c);
          v.store(op + init + c);
        }
      }
      store_out<Act::None, acc_t>(on + h * W * oc, orow, W * oc, nullptr, false, acc_t(0), acc_t(0), ws.stream);
    }
  }
}

template <typename scalar_t>
void forward_impl(const Geometry& geo, const at::Tensor& x, const at::Tensor& w1, const BatchNormArgs& bn1,
                  const at::Tensor& w2, const BatchNormArgs& bn2, const std::optional<at::Tensor>& gate,
                  const at::Tensor& out) {
  bool library = false;
  if constexpr (std::is_same_v<scalar_t, acc_of<scalar_t>>) {
    library = !geo.z1_in && use_library_gemm(geo, x.scalar_type());  // z1_in: x is z1 (Ctx::prepare)
  }
  Ctx<scalar_t> cx;
  cx.prepare(geo, x, w1, w2, gate, false, !library);
  cx.fold_batch_norms(bn1, &bn2);
  at::Tensor zl;  // the library GEMM's z1 (kept alive for the row walk)
  if constexpr (std::is_same_v<scalar_t, acc_of<scalar_t>>) {
    if (library) {
      zl = library_z1(geo, x, w1);
      cx.zl = zl.data_ptr<scalar_t>();
    }
  }
  const int64_t ng = num_groups(geo.N * geo.H);
  const auto groups = split_rows(geo.N, geo.H, ng);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  const bool stream = out.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
  dispatch_act(geo.act, [&](auto act) {
    constexpr Act A = decltype(act)::value;
    at::parallel_for(0, ng, 1, [&](int64_t gb, int64_t ge) {
      auto ws = make_fwd_ws(cx);
      ws.stream = stream;
      for (int64_t g = gb; g < ge; ++g)
        for (const Segment& sg : groups[g]) {
          if (geo.cl) fwd_cl_segment<A>(cx, out_p, sg, ws);
          else fwd_planar_segment<A>(cx, out_p, sg, ws);
        }
      if (stream) stream_fence();
    });
  });
}

}  // namespace

bool use_library_gemm(const Geometry& g, at::ScalarType dtype) {
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  const char* env = std::getenv("GHOSTFAST_CPU_GEMM");
  if (env != nullptr && std::strcmp(env, "own") == 0) return false;
  if (env != nullptr && std::strcmp(env, "library") == 0) return true;
  return library_gemm_wins(g);
}

at::Tensor library_z1(const Geometry& g, const at::Tensor& x, const at::Tensor& primary_weight) {
  const at::Tensor w = primary_weight.view({g.init, g.C}).narrow(0, 0, g.n_x1);
  // one buffer per thread, reused (a fresh allocation of a few MB is a fresh mmap: its page faults cost more than
  // the library GEMM saves)
  // InferenceMode: the buffer is an inference tensor whichever mode first allocated it, and written only under the
  // guard (an inference tensor written outside InferenceMode raises; a normal one allocated outside and written
  // inside would be counted as a version bump). Nothing here is differentiated: the kernels sit below autograd.
  c10::InferenceMode guard;
  static thread_local at::Tensor buffer;
  const int64_t need = g.N * g.HW * g.n_x1;
  if (!buffer.defined() || buffer.scalar_type() != x.scalar_type() || buffer.numel() < need)
    buffer = at::empty({need}, x.options().memory_format(at::MemoryFormat::Contiguous));
  if (g.cl) {  // [N*HW][C] (a view of the channels_last input) times W1^T
    at::Tensor z = buffer.narrow(0, 0, need).view({g.N * g.HW, g.n_x1});
    at::mm_out(z, x.permute({0, 2, 3, 1}).reshape({g.N * g.HW, g.C}), w.t());
    return z;
  }
  at::Tensor z = buffer.narrow(0, 0, need).view({g.N, g.n_x1, g.HW});  // [N][n_x1][HW]
  const at::Tensor xv = x.view({g.N, g.C, g.HW});
  for (int64_t n = 0; n < g.N; ++n) {
    at::Tensor zn = z.select(0, n);
    at::mm_out(zn, w, xv.select(0, n));
  }
  return z;
}

void forward(const Geometry& geo, const at::Tensor& x, const at::Tensor& primary_weight, const BatchNormArgs& bn1,
             const at::Tensor& cheap_weight, const BatchNormArgs& bn2, const std::optional<at::Tensor>& gate,
             const at::Tensor& out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_forward_cpu", [&] {
    forward_impl<scalar_t>(geo, x, primary_weight, bn1, cheap_weight, bn2, gate, out);
  });
}

}  // namespace ghostfast::cpu::ghost_module
