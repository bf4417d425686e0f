// CPU kernel of _depthwise_bn_kernel (schema and semantics: csrc/depthwise_bn.cpp): a K x K depthwise conv of any
// stride with zero padding and the BatchNorm folded per channel, float32 / float64.
//
// NCHW, one (n, c) plane per task: the plane's rows are first split into `stride` phases with the padding laid in
// (phase q of row r holds x[r][stride * j + q - padding] at j, zero outside the image), so that every tap of a
// strided output row is a contiguous run of one phase: out[i][j] += w[ky][kx] * phase[kx % s][i*s - p + ky][j + kx / s],
// vectorized along j. channels_last, one output row (n, i) per task: vectorized along the channels, the weight
// transposed to [K*K, C] once per call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <type_traits>
#include <vector>

#include "batch_norm.h"
#include "common.h"
#include "cpu/vec.h"
#include "kernel_signatures.h"

namespace ghostfast {
namespace {

constexpr const char* kOp = "ghostfast::_depthwise_bn_kernel (CPU)";

using cpu::div_up;
using cpu::round_up;
using cpu::Vectorized;

constexpr int64_t kMaxK = 7;

struct Geom {
  int64_t N, C, H, W, K, s, p, Ho, Wo;
};

// Phase q of padded row r: phases[(q * H + r) * L + j] = x[r][S * j + q - p], zero where that is outside the image
// (every element of the phase rows written). S == 1 is a shifted copy, S == 2 a de-interleave (strided loads the
// compiler vectorizes).
template <typename T, int SC>
inline void split_phases(const T* xp, const Geom& g, int64_t L, T* phases) {
  const int64_t S = SC ? SC : g.s;
  for (int64_t q = 0; q < S; ++q) {
    // j with 0 <= S * j + q - p < W
    const int64_t j0 = std::min<int64_t>(L, div_up(std::max<int64_t>(g.p - q, 0), S));
    const int64_t last = g.W - 1 + g.p - q;
    const int64_t j1 = std::max<int64_t>(j0, std::min<int64_t>(L, last >= 0 ? last / S + 1 : 0));
    for (int64_t r = 0; r < g.H; ++r) {
      T* dst = phases + (q * g.H + r) * L;
      const T* src = xp + r * g.W + (S * j0 + q - g.p);
      std::fill(dst, dst + j0, T(0));
      const int64_t n = j1 - j0;
      T* d = dst + j0;
      for (int64_t k = 0; k < n; ++k) d[k] = src[S * k];
      std::fill(dst + j1, dst + L, T(0));
    }
  }
}

// One (n, c) plane: K, S compile-time (0: the run-time g.K / g.s).
template <typename T, int KC, int SC>
void planar_plane(const T* xp, const T* wc, T scale, T shift, T* op, const Geom& g, int64_t L, T* phases) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t K = KC ? KC : g.K, s = SC ? SC : g.s;
  split_phases<T, SC>(xp, g, L, phases);
  // per tap: its weight as a vector and its offset in the phases of a row (phase kx % s, shift kx / s)
  Vec wv[kMaxK * kMaxK];
  int64_t off[kMaxK];
  for (int64_t t = 0; t < K * K; ++t) wv[t] = Vec(wc[t]);
  for (int64_t kx = 0; kx < K; ++kx) off[kx] = (kx % s) * g.H * L + kx / s;
  const Vec sc(scale), sh(shift);
  for (int64_t i = 0; i < g.Ho; ++i) {
    const int64_t r0 = i * s - g.p;
    const int64_t ky0 = std::max<int64_t>(0, -r0), ky1 = std::min<int64_t>(K, g.H - r0);
    T* orow = op + i * g.Wo;
    for (int64_t j = 0; j < g.Wo; j += V) {
      Vec a(T(0));
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const T* base = phases + (r0 + ky) * L + j;
#pragma GCC unroll 7
        for (int64_t kx = 0; kx < K; ++kx) a = at::vec::fmadd(wv[ky * K + kx], Vec::loadu(base + off[kx]), a);
      }
      a = at::vec::fmadd(a, sc, sh);
      if (j + V <= g.Wo) {
        a.store(orow + j);
      } else {
        a.store(orow + j, static_cast<int>(g.Wo - j));
      }
    }
  }
}

template <typename T>
void planar(const T* x, const T* w, const T* scale, const T* shift, T* out, const Geom& g) {
  constexpr int64_t V = Vectorized<T>::size();
  const int64_t L = round_up(g.Wo, V) + (g.K - 1) / g.s + 1;  // phase row length: every vector load stays inside
  auto run = [&](auto plane) {
    at::parallel_for(0, g.N * g.C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> phases(static_cast<size_t>(g.s * g.H * L));
      for (int64_t nc = begin; nc < end; ++nc) {
        const int64_t c = nc % g.C;
        plane(x + nc * g.H * g.W, w + c * g.K * g.K, scale[c], shift[c], out + nc * g.Ho * g.Wo, g, L,
              phases.data());
      }
    });
  };
  if (g.K == 3 && g.s == 1) return run(planar_plane<T, 3, 1>);
  if (g.K == 3 && g.s == 2) return run(planar_plane<T, 3, 2>);
  if (g.K == 5 && g.s == 1) return run(planar_plane<T, 5, 1>);
  if (g.K == 5 && g.s == 2) return run(planar_plane<T, 5, 2>);
  return run(planar_plane<T, 0, 0>);
}

template <typename T>
void channels_last(const T* x, const T* w, const T* scale, const T* shift, T* out, const Geom& g) {
  using Vec = Vectorized<T>;
  constexpr int64_t V = Vec::size();
  const int64_t C = g.C, K = g.K;
  std::vector<T> wt(static_cast<size_t>(K * K * C));  // [K*K, C]
  for (int64_t c = 0; c < C; ++c)
    for (int64_t t = 0; t < K * K; ++t) wt[t * C + c] = w[c * K * K + t];
  at::parallel_for(0, g.N * g.Ho, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ni = begin; ni < end; ++ni) {
      const int64_t n = ni / g.Ho, i = ni % g.Ho;
      T* orow = out + ni * g.Wo * C;
      for (int64_t j = 0; j < g.Wo; ++j) {
        for (int64_t c = 0; c < C; c += V) {
          const int cnt = static_cast<int>(std::min<int64_t>(V, C - c));
          Vec a(T(0));
          for (int64_t ky = 0; ky < K; ++ky) {
            const int64_t r = i * g.s - g.p + ky;
            if (r < 0 || r >= g.H) continue;
            const T* xrow = x + ((n * g.H + r) * g.W) * C + c;
            for (int64_t kx = 0; kx < K; ++kx) {
              const int64_t col = j * g.s - g.p + kx;
              if (col < 0 || col >= g.W) continue;
              const T* wp = wt.data() + (ky * K + kx) * C + c;
              const T* xv = xrow + col * C;
              a = at::vec::fmadd(cnt == V ? Vec::loadu(wp) : Vec::loadu(wp, cnt),
                                 cnt == V ? Vec::loadu(xv) : Vec::loadu(xv, cnt), a);
            }
          }
          const Vec sc = cnt == V ? Vec::loadu(scale + c) : Vec::loadu(scale + c, cnt);
          const Vec sh = cnt == V ? Vec::loadu(shift + c) : Vec::loadu(shift + c, cnt);
          at::vec::fmadd(a, sc, sh).store(orow + j * C + c, cnt);
        }
      }
    }
  });
}

void depthwise_bn_cpu(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bn_weight,
                      const std::optional<at::Tensor>& bn_bias, const std::optional<at::Tensor>& bn_mean,
                      const std::optional<at::Tensor>& bn_var, double bn_eps, int64_t stride, int64_t padding,
                      const at::Tensor& out) {
  check_x(x, c10::DeviceType::CPU, kOp);
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, kOp, ": expected x of dtype float32 or float64, got ", dt);
  Geom g{x.size(0), x.size(1), x.size(2), x.size(3), 0, stride, padding, 0, 0};
  TORCH_CHECK(weight.defined() && weight.dim() == 4, kOp, ": expected weight of shape [C, 1, K, K], got ",
              weight.defined() ? weight.sizes() : at::IntArrayRef{});
  g.K = weight.size(3);
  TORCH_CHECK(g.K >= 1 && g.K <= kMaxK, kOp, ": expected a kernel size K in [1, ", kMaxK, "], got weight of shape ",
              weight.sizes());
  check_param(weight, x, dt, kOp, "weight", {g.C, 1, g.K, g.K});
  TORCH_CHECK(stride >= 1, kOp, ": expected stride >= 1, got ", stride);
  TORCH_CHECK(padding >= 0, kOp, ": expected padding >= 0, got ", padding);
  TORCH_CHECK(g.H + 2 * padding >= g.K && g.W + 2 * padding >= g.K, kOp, ": input of shape ", x.sizes(),
              " with padding ", padding, " is smaller than the kernel ", g.K);
  g.Ho = (g.H + 2 * padding - g.K) / stride + 1;
  g.Wo = (g.W + 2 * padding - g.K) / stride + 1;
  check_output(out, x, kOp, "out", {g.N, g.C, g.Ho, g.Wo});
  const bool cl = pick_channels_last(kOp, x, {{"out", out}});
  const BatchNormArgs bn = batch_norm_args(bn_weight, bn_bias, bn_mean, bn_var, bn_eps, g.C, x, kOp, "bn");
  if (out.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(dt, "depthwise_bn_cpu", [&] {
    using T = scalar_t;
    constexpr int64_t V = Vectorized<T>::size();
    std::vector<T> scale(static_cast<size_t>(round_up(g.C, V))), shift(scale.size());
    bn.fold_all<T>(g.C, scale.data(), shift.data());
    const T* xp = x.const_data_ptr<T>();
    const T* wp = weight.const_data_ptr<T>();
    T* op = out.mutable_data_ptr<T>();
    if (cl) {
      channels_last<T>(xp, wp, scale.data(), shift.data(), op, g);
    } else {
      planar<T>(xp, wp, scale.data(), shift.data(), op, g);
    }
  });
}

static_assert(std::is_same_v<decltype(depthwise_bn_cpu), DepthwiseBnKernel>);

}  // namespace
}  // namespace ghostfast

TORCH_LIBRARY_IMPL(ghostfast, CPU, m) {
  m.impl("_depthwise_bn_kernel", &ghostfast::depthwise_bn_cpu);
}
