// What the Ghost module's CPU translation units share: the problem geometry, the row walk's work split, the prepared
// weights and folded BatchNorms (Ctx), the forward workspace, and the entry points of ghost_module_{forward,
// backward,stats}.cpp (called by ghost_module.cpp after its argument checks).
//
// Work split. The N*H output rows are cut into one contiguous range per thread (a "group"); a group walks its range
// image by image ("segments", at most one per image it touches) in sub-blocks of G rows. x1 (1x1 conv + BN + act,
// recomputed: nothing but `out` / the gradients is stored at full size) lives in a sliding window of rows that covers
// the sub-block plus the depthwise halo; rows shared with the next sub-block move to the window's start instead of
// being recomputed, so halo rows are computed twice only where two groups meet. G is picked so the window stays in
// L2. Reductions (weight, BN and gate gradients, statistics) go to per-group partials summed in group order: the
// result depends on the thread count only.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <type_traits>
#include <vector>

#include "batch_norm.h"
#include "cpu/activation.h"
#include "cpu/gate_upsample.h"
#include "cpu/vec.h"

namespace ghostfast::cpu::ghost_module {

struct Geometry {
  int64_t N = 0, C = 0, H = 0, W = 0, HW = 0;
  int64_t init = 0, rm1 = 0, K = 1, KK = 1, oc = 0;
  int64_t n_x1 = 0;     // x1 channels that matter: min(init, oc)
  int64_t n_cheap = 0;  // cheap channels kept: max(oc - init, 0)
  int64_t n_src = 0;    // x1 channels the kept cheap channels read: ceil(n_cheap / rm1)
  int64_t R = 0;        // depthwise halo (0 without cheap channels)
  int64_t Hg = 0, Wg = 0;
  Act act = Act::None;  // both halves' activation (cpu/activation.h), dispatched once per launch
  bool cl = false, gated = false, bilinear = false;
  // x is z1 itself (the _z1 kernels: the primary conv computed by the caller, C == init, float / double): no GEMM,
  // the row walks read z1 (Ctx::zl); the backward's grads[0] is dz1, the gradient of z1
  bool z1_in = false;
};

// which gradients a backward call computes (the non-empty tensors of its `grads`)
struct Needs {
  bool x = false, w1 = false, s1 = false, b1 = false, w2 = false, s2 = false, b2 = false, gate = false;
  bool primary() const { return x || w1 || s1 || b1; }  // g1 (the primary chain) is needed
};

// The statistics backward (_ghost_module_stats_backward_kernel): no grad_out; the stage's z (1: z1, 2: z2) gets
// dz = coef_a + coef_c * (z - mean) per channel as its upstream gradient.
struct StatsGradient {
  int stage = 0;
  const at::Tensor* coef_a = nullptr;
  const at::Tensor* coef_c = nullptr;
  const at::Tensor* mean = nullptr;
};

// ---- entry points (geometry and arguments checked by ghost_module.cpp; N, H, W > 0) ----

// ghost_module_forward.cpp: `out` of _ghost_module_kernel
void forward(const Geometry& geo, const at::Tensor& x, const at::Tensor& primary_weight, const BatchNormArgs& bn1,
             const at::Tensor& cheap_weight, const BatchNormArgs& bn2, const std::optional<at::Tensor>& gate,
             const at::Tensor& out);

// ghost_module_stats.cpp: mean and biased var of z1 (stage 1) or z2 (stage 2) per channel
void stats(const Geometry& geo, int stage, const at::Tensor& x, const at::Tensor& primary_weight,
           const BatchNormArgs& bn1, const at::Tensor& cheap_weight, const at::Tensor& mean, const at::Tensor& var);

// ghost_module_stats.cpp: mean and biased var per channel of z1 [N, C, H, W] itself (float / double, N*H*W > 0)
void z1_stats(const at::Tensor& z1, bool channels_last, const at::Tensor& mean, const at::Tensor& var);

// ghost_module_backward.cpp: the gradients `nd` asks for into `grads` (the backward kernel's order); with `stats`,
// the statistics backward (no grad_out, gate or cheap_scale / cheap_bias: pass undefined tensors)
void backward(const Geometry& geo, const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& primary_weight,
              const at::Tensor& primary_scale, const at::Tensor& primary_bias, const at::Tensor& cheap_weight,
              const at::Tensor& cheap_scale, const at::Tensor& cheap_bias, const std::optional<at::Tensor>& gate,
              at::TensorList grads, const Needs& nd, const StatsGradient& stats);

// ---- work split ----

struct Segment {
  int64_t n, r0, r1;
};

inline int64_t num_groups(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
}

// one contiguous range of the N*H rows per group, cut at image boundaries
inline std::vector<std::vector<Segment>> split_rows(int64_t N, int64_t H, int64_t groups) {
  std::vector<std::vector<Segment>> out(static_cast<size_t>(groups));
  const int64_t total = N * H;
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = total * g / groups, end = total * (g + 1) / groups;
    for (int64_t r = begin; r < end;) {
      const int64_t n = r / H, h = r % H;
      const int64_t h_end = std::min(H, h + (end - r));
      out[g].push_back({n, h, h_end});
      r += h_end - h;
    }
  }
  return out;
}

// rows per sub-block: the window (G + halo rows of `row_bytes`) within ~512 KiB of L2, at least 4 rows (fewer
// would move more halo rows from one sub-block to the next than they compute)
inline int64_t pick_rows(int64_t row_bytes, int64_t halo_rows, int64_t H) {
  constexpr int64_t kBudget = 512 * 1024;
  int64_t g = kBudget / std::max<int64_t>(row_bytes, 1) - halo_rows;
  g = std::max<int64_t>(g, 4);
  return std::min(g, std::max<int64_t>(H, 1));
}

// drop the first `drop` rows of each plane of a row window, keeping the next `keep`
template <typename T>
inline void shift_rows(T* base, int64_t planes, int64_t plane_stride, int64_t row_stride, int64_t drop, int64_t keep) {
  if (drop <= 0 || keep <= 0) return;
  for (int64_t p = 0; p < planes; ++p) {
    T* b = base + p * plane_stride;
    std::memmove(b, b + drop * row_stride, static_cast<size_t>(keep * row_stride) * sizeof(T));
  }
}

// outputs at least this large are written with non-temporal stores (they would not stay in cache anyway)
constexpr int64_t kStreamBytes = int64_t(8) << 20;

// ---- prepared weights and BatchNorms ----

template <typename scalar_t>
struct Ctx {
  using acc_t = acc_of<scalar_t>;
  static constexpr int64_t V = Vectorized<acc_t>::size();
  Geometry d;
  int64_t Zc = 0;    // n_x1 rounded up to vectors
  int64_t Cq = 0;    // n_cheap rounded up to vectors
  int64_t Cds = 0;   // channels_last: channels of the depthwise source window (Zc when rm1 == 1, else Cq)
  int64_t Cpad = 0;  // C rounded up to vectors
  const scalar_t* x = nullptr;
  const scalar_t* x_end = nullptr;
  const scalar_t* gate = nullptr;
  // The BatchNorms folded per channel (y = z * scale + shift): s1 / b1 of the x1 channels, zero-padded to Zc;
  // s2 / b2 of the kept cheap channels, zero-padded to Cq.
  std::vector<acc_t> s1, b1, s2, b2;
  std::vector<acc_t> w1;   // NCHW: W1 [n_x1][C]; channels_last: W1^T [C][Zc]
  std::vector<acc_t> w1r;  // backward: NCHW W1^T [C][n_x1]; channels_last W1 [n_x1][Cpad]
  std::vector<acc_t> w2;   // NCHW: [n_cheap][KK]; channels_last: [KK][Cq]
  std::vector<acc_t> w2f;  // backward, the kernel flipped (transposed depthwise), same layouts
  GateTables<acc_t> gt;
  // Statistics backward: 0 = the Ghost module backward (grad_out given); 1 / 2 = the stage whose z gets
  // dz = ca + cc * (z - cm) per channel. ca / cc / cm are padded with zeros to whole vectors.
  int stats = 0;
  std::vector<acc_t> ca, cc, cm;
  // Library GEMM (forward, float / double): z1 = W1 x of the whole batch by ATen (MKL / oneDNN) before the row walk,
  // which then reads it instead of running its own GEMM: NCHW [N][n_x1][HW], channels_last [N*HW][n_x1]. With
  // Geometry::z1_in, the input x itself (every kernel).
  const acc_t* zl = nullptr;

  void prepare(const Geometry& geo, const at::Tensor& x_t, const at::Tensor& w1_t, const at::Tensor& w2_t,
               const std::optional<at::Tensor>& gate_t, bool backward, bool own_gemm = true) {
    d = geo;
    x = x_t.data_ptr<scalar_t>();
    x_end = x + x_t.numel();
    gate = d.gated ? gate_t->data_ptr<scalar_t>() : nullptr;
    if (geo.z1_in) own_gemm = false;  // no primary weight: z1 is the input
    const scalar_t* pw = own_gemm ? w1_t.data_ptr<scalar_t>() : nullptr;
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      if (geo.z1_in) zl = x;
    }
    const scalar_t* cw = w2_t.data_ptr<scalar_t>();
    const int64_t C = d.C, KK = d.KK;
    Zc = round_up(std::max<int64_t>(d.n_x1, 1), V);
    Cq = round_up(std::max<int64_t>(d.n_cheap, 1), V);
    Cds = d.rm1 == 1 ? Zc : Cq;
    Cpad = round_up(std::max<int64_t>(C, 1), V);
    if (!d.cl) {
      if (own_gemm) {  // the library GEMM (Ctx::zl) reads the weight tensor itself
        w1.assign(static_cast<size_t>(d.n_x1 * C), acc_t(0));
        for (int64_t i = 0; i < d.n_x1 * C; ++i) w1[i] = static_cast<acc_t>(pw[i]);
      }
      w2.assign(static_cast<size_t>(d.n_cheap * KK), acc_t(0));
      for (int64_t i = 0; i < d.n_cheap * KK; ++i) w2[i] = static_cast<acc_t>(cw[i]);
      if (backward) {
        if (own_gemm) {
          w1r.assign(static_cast<size_t>(C * d.n_x1), acc_t(0));  // W1^T [C][n_x1] for grad_x
          for (int64_t c = 0; c < d.n_x1; ++c)
            for (int64_t k = 0; k < C; ++k) w1r[k * d.n_x1 + c] = w1[c * C + k];
        }
        w2f.assign(w2.size(), acc_t(0));
        for (int64_t o = 0; o < d.n_cheap; ++o)
          for (int64_t t = 0; t < KK; ++t) w2f[o * KK + t] = w2[o * KK + (KK - 1 - t)];
      }
    } else {
      if (own_gemm) {
        w1.assign(static_cast<size_t>(C * Zc), acc_t(0));
        for (int64_t c = 0; c < d.n_x1; ++c)
          for (int64_t k = 0; k < C; ++k) w1[k * Zc + c] = static_cast<acc_t>(pw[c * C + k]);
      }
      if (backward && own_gemm) {
        w1r.assign(static_cast<size_t>(d.n_x1 * Cpad), acc_t(0));
        for (int64_t c = 0; c < d.n_x1; ++c)
          for (int64_t k = 0; k < C; ++k) w1r[c * Cpad + k] = static_cast<acc_t>(pw[c * C + k]);
      }
      w2.assign(static_cast<size_t>(KK * Cq), acc_t(0));
      if (backward) w2f.assign(static_cast<size_t>(KK * Cq), acc_t(0));
      for (int64_t o = 0; o < d.n_cheap; ++o)
        for (int64_t t = 0; t < KK; ++t) {
          w2[t * Cq + o] = static_cast<acc_t>(cw[o * KK + t]);
          if (backward) w2f[t * Cq + o] = static_cast<acc_t>(cw[o * KK + (KK - 1 - t)]);
        }
    }
    if (d.gated) gt.build(d.H, d.W, d.Hg, d.Wg, d.bilinear);
    s1.assign(static_cast<size_t>(Zc), acc_t(0));
    b1.assign(static_cast<size_t>(Zc), acc_t(0));
    s2.assign(static_cast<size_t>(Cq), acc_t(0));
    b2.assign(static_cast<size_t>(Cq), acc_t(0));
    for (int64_t o = 0; o < d.n_cheap; ++o) s2[o] = acc_t(1);  // no second BatchNorm (statistics): the identity
  }

  // forward and statistics: fold the live BatchNorms (bn2: nullptr for the statistics kernels)
  void fold_batch_norms(const BatchNormArgs& bn1, const BatchNormArgs* bn2) {
    bn1.fold_all<acc_t>(d.n_x1, s1.data(), b1.data());
    if (bn2 != nullptr) bn2->fold_all<acc_t>(d.n_cheap, s2.data(), b2.data());
  }

  // backward: the folded vectors as given (accumulation dtype); cheap_* undefined: the identity
  void load_affine(const at::Tensor& s1_t, const at::Tensor& b1_t, const at::Tensor& s2_t, const at::Tensor& b2_t) {
    std::copy_n(s1_t.data_ptr<acc_t>(), d.n_x1, s1.begin());
    std::copy_n(b1_t.data_ptr<acc_t>(), d.n_x1, b1.begin());
    if (s2_t.defined()) std::copy_n(s2_t.data_ptr<acc_t>(), d.n_cheap, s2.begin());
    if (b2_t.defined()) std::copy_n(b2_t.data_ptr<acc_t>(), d.n_cheap, b2.begin());
  }

  void set_stats(const StatsGradient& sg) {
    stats = sg.stage;
    if (stats == 0) return;
    const int64_t n = sg.coef_a->numel();
    const int64_t len = round_up(std::max<int64_t>({n, Zc, Cq, int64_t(1)}), V);
    auto pad = [&](std::vector<acc_t>& v, const at::Tensor& t) {
      v.assign(static_cast<size_t>(len), acc_t(0));
      const acc_t* p = t.data_ptr<acc_t>();
      for (int64_t i = 0; i < n; ++i) v[i] = p[i];
    };
    pad(ca, *sg.coef_a);
    pad(cc, *sg.coef_c);
    pad(cm, *sg.mean);
  }
};

// z1 given (Ctx::zl), NCHW: dst[0 .. cnt) = act(src * s + b), whole vectors (dst is padded; nothing read past
// src[cnt - 1])
template <Act A, typename acc_t>
inline void affine_act_row(acc_t* dst, const acc_t* src, int64_t cnt, acc_t s, acc_t b) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec sv(s), bv(b);
  int64_t i = 0;
  for (; i + V <= cnt; i += V) act_v<A>(at::vec::fmadd(Vec::loadu(src + i), sv, bv)).store(dst + i);
  if (i < cnt) act_v<A>(at::vec::fmadd(vload<acc_t>(src + i, cnt - i), sv, bv)).store(dst + i);
}

// z1 given, channels_last: one pixel's x1 channels, dst[0 .. Zc) = act(src * s1 + b1) (zero-padded s1 / b1:
// the padding lanes are act(0) = 0, as the GEMM's epilogue writes them)
template <Act A, typename scalar_t>
inline void affine_act_pixel(acc_of<scalar_t>* dst, const acc_of<scalar_t>* src, int64_t n, int64_t Zc,
                             const Ctx<scalar_t>& cx) {
  using acc_t = acc_of<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  for (int64_t c = 0; c < Zc; c += V) {
    const Vec v = c + V <= n ? Vec::loadu(src + c) : vload<acc_t>(src + c, n - c);
    act_v<A>(at::vec::fmadd(v, Vec::loadu(cx.s1.data() + c), Vec::loadu(cx.b1.data() + c))).store(dst + c);
  }
}

// ---- library GEMM (issue 13 item 3) ----

// Whether the forward computes x1's GEMM with ATen's (MKL / oneDNN) for the whole batch (Ctx::zl) instead of its own
// register-blocked GEMM per sub-block. GHOSTFAST_CPU_GEMM=own / library forces one (tests, A/B runs); otherwise the
// measured rule (benchmarks/results/cpu-2core/NOTES.md, "GEMM where a library wins").
bool use_library_gemm(const Geometry& g, at::ScalarType dtype);

// z1 = W1 x by ATen for the library path (float / double inputs): NCHW [N][n_x1][HW], channels_last [N*HW][n_x1]
at::Tensor library_z1(const Geometry& g, const at::Tensor& x, const at::Tensor& primary_weight);

// ---- forward workspace (the forward and the statistics kernels) ----

template <typename acc_t>
struct FwdWs {
  int64_t G = 1, cap = 1, hr_rows = 0;
  bool stream = false;  // non-temporal stores to `out`
  GateRowCache<acc_t> gcache;
  int64_t z_ps = 0, ds_ps = 0;
  std::vector<acc_t> z, ds, t, gt, zero, orow, hr;
  std::vector<const acc_t*> rows;
};

template <typename scalar_t>
FwdWs<acc_of<scalar_t>> make_fwd_ws(const Ctx<scalar_t>& cx) {
  using acc_t = acc_of<scalar_t>;
  constexpr int64_t V = Vectorized<acc_t>::size();
  const Geometry& d = cx.d;
  FwdWs<acc_t> ws;
  const int64_t Wp = d.W + 2 * d.R;
  const int64_t slack = 2 * V + 2 * d.K;
  const int64_t row_bytes =
      static_cast<int64_t>(sizeof(acc_t)) *
      (d.cl ? (d.W * cx.Zc + (d.n_cheap > 0 ? Wp * cx.Cds : 0)) : (d.n_x1 * d.W + d.n_src * Wp));
  ws.G = pick_rows(row_bytes, 2 * d.R, d.H);
  ws.cap = ws.G + 2 * d.R;
  if (!d.cl) {
    ws.z_ps = ws.cap * d.W + slack;
    ws.ds_ps = ws.cap * Wp + slack;
    ws.z.assign(static_cast<size_t>(d.n_x1 * ws.z_ps), acc_t(0));
    ws.ds.assign(static_cast<size_t>(d.n_src * ws.ds_ps), acc_t(0));
    ws.t.assign(static_cast<size_t>(ws.G * d.W + slack), acc_t(0));
    if (d.gated) {
      ws.gt.assign(static_cast<size_t>(ws.G * d.W + slack), acc_t(0));
      ws.hr_rows = 2 * ws.G + 2;
      ws.hr.assign(static_cast<size_t>(ws.hr_rows * (d.W + V)), acc_t(0));
    }
    ws.zero.assign(static_cast<size_t>(Wp + slack), acc_t(0));
  } else {
    ws.z.assign(static_cast<size_t>(ws.cap * d.W * cx.Zc + slack), acc_t(0));
    if (d.n_cheap > 0) ws.ds.assign(static_cast<size_t>(ws.cap * Wp * cx.Cds + slack), acc_t(0));
    ws.t.assign(static_cast<size_t>(d.W * cx.Cq + slack), acc_t(0));
    if (d.gated) ws.gcache.init(d.W, d.oc);
    ws.orow.assign(static_cast<size_t>(d.W * d.oc + slack), acc_t(0));
  }
  ws.rows.assign(static_cast<size_t>(ws.G + d.K), nullptr);
  return ws;
}

// dst[R .. R + W) = src[0 .. W) with zeros written past W (the pads of the padded rows stay zero)
template <typename acc_t>
inline void copy_row_padded(acc_t* dst, const acc_t* src, int64_t W) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t w = 0;
  for (; w + V <= W; w += V) Vec::loadu(src + w).store(dst + w);
  if (w < W) keep_first(Vec::loadu(src + w), W - w).store(dst + w);
}

}  // namespace ghostfast::cpu::ghost_module
