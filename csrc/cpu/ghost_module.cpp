// Fused Ghost module on the CPU: ghostfast::_ghost_module_kernel (forward) and
// ghostfast::_ghost_module_backward_kernel (backward), and the training-mode BatchNorm statistics
// ghostfast::_ghost_module_stats_kernel / _ghost_module_stats_backward_kernel. Schemas and conventions:
// csrc/ghost_module.cpp; the math: ghostfast/reference.py (ghost_module_forward, ghost_module_stats).
//
// Work split. The N*H output rows are cut into one contiguous range per thread (a "group"); a group walks its range
// image by image ("segments", at most one per image it touches) in sub-blocks of G rows. x1 (1x1 conv + BN + act,
// recomputed: nothing but `out` / the gradients is stored at full size) lives in a sliding window of rows that covers
// the sub-block plus the depthwise halo; rows shared with the next sub-block move to the window's start instead of
// being recomputed, so halo rows are computed twice only where two groups meet. G is picked so the window stays in
// L2.
//
// Kernels. The 1x1 conv is a register-blocked GEMM (4 broadcast rows x 3 vectors of at::vec::Vectorized<acc_t>,
// BN + act fused into its stores) reading x in place: along pixels for NCHW (C[c][p] += W1[c][k] * x[k][p]) and
// along channels for channels_last (C[p][c] += x[p][k] * W1^T[k][c]). The depthwise reads a zero-padded copy of the
// x1 window (zero columns left and right, zero rows outside the image), vectorized along W (NCHW: two output rows
// per pass share their input rows) or along channels (channels_last). Large outputs (out, grad_x) are written with
// non-temporal stores on AVX2. The gate is upsampled in two passes: horizontally once per gate row (scalar),
// vertically per output row (vectorized); its gradient runs the same passes backwards.
// The backward recomputes x1 over the sub-block + 2R rows and g2*s2 over the sub-block + R rows, then runs the
// transposed depthwise, the BN / activation chain, grad_W1 = (g1*s1) x^T and grad_x = W1^T (g1*s1) on the owned rows.
//
// Statistics. The forward's row walk without `out`: per sub-block and channel a (count, mean, M2) chunk of z1 or z2,
// merged with Chan's formula (accurate when |mean| >> std). Their backward is the backward's row walk with no
// grad_out: the stage's z gets dz = coef_a + coef_c * (z - mean) as its upstream gradient (Ctx::stats).
//
// Determinism. Reductions (weight, BN and gate gradients) go to per-group partial buffers and are summed in group
// order afterwards; within a group the order is fixed. The result depends on the thread count only.
// Accumulation in acc_t: float for float / half / bfloat16, double for double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/string_view.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#define GHOSTFAST_STREAM_STORES 1
#endif

#include "common.h"
#include "kernel_signatures.h"
#include "upsample.h"

namespace ghostfast {
namespace {

using at::vec::Vectorized;

constexpr const char* kFwdOp = "ghostfast::_ghost_module_kernel (CPU)";
constexpr const char* kBwdOp = "ghostfast::_ghost_module_backward_kernel (CPU)";
constexpr const char* kStatsOp = "ghostfast::_ghost_module_stats_kernel (CPU)";
constexpr const char* kStatsBwdOp = "ghostfast::_ghost_module_stats_backward_kernel (CPU)";

template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return div_up(a, b) * b; }

// ---------------------------------------------------------------------------------------------------------------
// Vector helpers: V = Vectorized<acc_t>::size() lanes, loaded from / stored to the tensor dtype T.
// ---------------------------------------------------------------------------------------------------------------

template <typename acc_t, typename T>
inline Vectorized<acc_t> vload(const T* p) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vectorized<acc_t>::loadu(p);
  } else {
    static_assert(std::is_same_v<acc_t, float>, "reduced floating types accumulate in float");
    Vectorized<float> v;
    at::vec::load_to_float(p, v);
    return v;
  }
}

// the first n lanes (1 <= n <= V) from p, the others zero; reads nothing past p[n-1]
template <typename acc_t, typename T>
inline Vectorized<acc_t> vload(const T* p, int64_t n) {
  if (n >= Vectorized<acc_t>::size()) return vload<acc_t>(p);
  if constexpr (std::is_same_v<T, acc_t>) {
    return Vectorized<acc_t>::loadu(p, n);
  } else {
    constexpr int64_t V = Vectorized<float>::size();
    __at_align__ float tmp[V];
    for (int64_t i = 0; i < V; ++i) tmp[i] = i < n ? static_cast<float>(p[i]) : 0.f;
    return Vectorized<float>::loadu(tmp);
  }
}

template <typename acc_t, typename T>
inline void vstore(T* p, const Vectorized<acc_t>& v) {
  if constexpr (std::is_same_v<T, acc_t>) {
    v.store(p);
  } else {
    constexpr int64_t V = Vectorized<float>::size();
    __at_align__ float tmp[V];
    v.store(tmp);
    for (int64_t i = 0; i < V; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

// the first n lanes (1 <= n <= V) to p[0 .. n)
template <typename acc_t, typename T>
inline void vstore(T* p, const Vectorized<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<T, acc_t>) {
    v.store(p, static_cast<int>(n));
  } else {
    constexpr int64_t V = Vectorized<float>::size();
    __at_align__ float tmp[V];
    v.store(tmp);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

// the first n lanes of v, zeros after
template <typename acc_t>
inline Vectorized<acc_t> keep_first(const Vectorized<acc_t>& v, int64_t n) {
  if (n >= Vectorized<acc_t>::size()) return v;
  return Vectorized<acc_t>::set(Vectorized<acc_t>(acc_t(0)), v, n);
}

// F.relu: negative -> 0, NaN passes
template <typename acc_t>
inline Vectorized<acc_t> relu_v(const Vectorized<acc_t>& v) {
  const Vectorized<acc_t> zero(acc_t(0));
  return Vectorized<acc_t>::blendv(v, zero, v < zero);
}

// ReLU's backward as torch computes it (threshold_backward on the result): 0 where the result is <= 0
template <typename acc_t>
inline Vectorized<acc_t> relu_grad_v(const Vectorized<acc_t>& g, const Vectorized<acc_t>& pre) {
  const Vectorized<acc_t> zero(acc_t(0));
  return Vectorized<acc_t>::blendv(g, zero, pre <= zero);
}

// lanes summed in a fixed order
template <typename acc_t>
inline acc_t hsum(const Vectorized<acc_t>& v) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  __at_align__ acc_t t[V];
  v.store(t);
  acc_t s = t[0];
  for (int64_t i = 1; i < V; ++i) s += t[i];
  return s;
}

// Non-temporal store of a whole vector to a 32-byte aligned address (float / double outputs on AVX2): large outputs
// are written once and read by the next layer, not by this kernel; skipping the read-for-ownership of every line
// roughly halves their memory traffic. Callers fence (stream_fence) before their writes are read.
template <typename acc_t, typename T>
constexpr bool can_stream() {
#ifdef GHOSTFAST_STREAM_STORES
  return std::is_same_v<T, acc_t> && Vectorized<acc_t>::size() * sizeof(acc_t) == 32;
#else
  return false;
#endif
}

template <typename acc_t>
inline void stream_store(acc_t* p, const Vectorized<acc_t>& v) {
#ifdef GHOSTFAST_STREAM_STORES
  if constexpr (std::is_same_v<acc_t, float>) {
    _mm256_stream_ps(p, static_cast<__m256>(v));
  } else {
    _mm256_stream_pd(p, static_cast<__m256d>(v));
  }
#else
  v.store(p);
#endif
}

// touch [p, p + n) into the cache ahead of use (a chunk of a channel plane the hardware prefetcher has not seen)
template <typename T>
inline void prefetch_range(const T* p, int64_t n) {
  const char* b = reinterpret_cast<const char*>(p);
  const char* e = reinterpret_cast<const char*>(p + n);
  for (; b < e; b += 64) __builtin_prefetch(b);
}

inline void stream_fence() {
#ifdef GHOSTFAST_STREAM_STORES
  _mm_sfence();
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// GEMM with a broadcast operand: C[i][j] (+)= sum_k A(i, k) * B[k][j], i < M, j < Nc, vectorized along j.
//   A(i, k) = A[i * ai + k * ak] (any strides, any dtype: one scalar broadcast per (i, k)),
//   B[k][j] = B[k * ldb + j] (contiguous along j), C[i][j] = C[i * ldc + j].
// b_end: where B's memory ends (the tile of the last columns would read up to V - 1 elements past column Nc; past
// b_end it is copied to a zero-padded buffer first), nullptr when B is padded. c_full: C rows are padded to whole
// vectors (stores need no tail handling).
// ---------------------------------------------------------------------------------------------------------------

// Optional epilogue of the GEMM, applied before the store: C = act(C * scale + bias), scale / bias indexed by the
// row i (ROW) or the column j (COL) of C.
template <typename acc_t>
struct Epilogue {
  enum Kind { NONE, ROW, COL };
  Kind kind = NONE;
  const acc_t* scale = nullptr;
  const acc_t* bias = nullptr;
  bool relu = false;
  bool stream = false;  // non-temporal stores of whole, aligned vectors (C written once, not read back here)
};

template <typename acc_t, typename a_t, typename b_t, typename c_t, bool ACCUM>
struct Gemm {
  static constexpr int MR = 4;
  static constexpr int NV = 3;
  static constexpr int64_t V = Vectorized<acc_t>::size();
  using Vec = Vectorized<acc_t>;
  using Epi = Epilogue<acc_t>;
  using TileFn = void (*)(int64_t, const a_t*, int64_t, int64_t, const b_t*, int64_t, c_t*, int64_t, int64_t,
                          const Epi&, int64_t, int64_t);

  template <int mr, int nv>
  static void tile(int64_t K, const a_t* A, int64_t ai, int64_t ak, const b_t* B, int64_t ldb, c_t* C, int64_t ldc,
                   int64_t last_n, const Epi& epi, int64_t i0, int64_t j0) {
    Vec acc[mr][nv];
#pragma GCC unroll 4
    for (int r = 0; r < mr; ++r) {
#pragma GCC unroll 3
      for (int v = 0; v < nv; ++v) acc[r][v] = Vec(acc_t(0));
    }
    const a_t* a_k = A;
    const b_t* b_k = B;
    for (int64_t k = 0; k < K; ++k, a_k += ak, b_k += ldb) {
      Vec b[nv];
#pragma GCC unroll 3
      for (int v = 0; v < nv; ++v) b[v] = vload<acc_t>(b_k + v * V);
#pragma GCC unroll 4
      for (int r = 0; r < mr; ++r) {
        const Vec a(static_cast<acc_t>(a_k[r * ai]));
#pragma GCC unroll 3
        for (int v = 0; v < nv; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
      }
    }
    if (epi.kind != Epi::NONE && epi.scale != nullptr) {
#pragma GCC unroll 4
      for (int r = 0; r < mr; ++r) {
#pragma GCC unroll 3
        for (int v = 0; v < nv; ++v) {
          Vec o;
          if (epi.kind == Epi::ROW) {
            o = at::vec::fmadd(acc[r][v], Vec(epi.scale[i0 + r]), Vec(epi.bias[i0 + r]));
          } else {
            o = at::vec::fmadd(acc[r][v], Vec::loadu(epi.scale + j0 + v * V), Vec::loadu(epi.bias + j0 + v * V));
          }
          acc[r][v] = epi.relu ? relu_v(o) : o;
        }
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < mr; ++r) {
#pragma GCC unroll 3
      for (int v = 0; v < nv; ++v) {
        c_t* cp = C + r * ldc + v * V;
        Vec o = acc[r][v];
        if (v == nv - 1 && last_n < V) {
          if constexpr (ACCUM) o = o + vload<acc_t>(cp, last_n);
          vstore<acc_t>(cp, o, last_n);
        } else {
          if constexpr (ACCUM) o = o + vload<acc_t>(cp);
          if constexpr (!ACCUM && can_stream<acc_t, c_t>()) {
            if (epi.stream && reinterpret_cast<uintptr_t>(cp) % 32 == 0) {
              stream_store<acc_t>(reinterpret_cast<acc_t*>(cp), o);
              continue;
            }
          }
          vstore<acc_t>(cp, o);
        }
      }
    }
  }

  static TileFn pick(int mr, int nv) {
    static constexpr TileFn table[MR][NV] = {
        {tile<1, 1>, tile<1, 2>, tile<1, 3>},
        {tile<2, 1>, tile<2, 2>, tile<2, 3>},
        {tile<3, 1>, tile<3, 2>, tile<3, 3>},
        {tile<4, 1>, tile<4, 2>, tile<4, 3>},
    };
    return table[mr - 1][nv - 1];
  }

  // epi (COL) needs scale / bias readable up to round_up(Nc, V)
  static void run(int64_t M, int64_t Nc, int64_t K, const a_t* A, int64_t ai, int64_t ak, const b_t* B, int64_t ldb,
                  const b_t* b_end, c_t* C, int64_t ldc, bool c_full, const Epi& epi = Epi()) {
    if (M <= 0 || Nc <= 0) return;
    const int64_t nvec = div_up(Nc, V);
    const int64_t rem = Nc - (nvec - 1) * V;  // valid lanes of the last vector, 1..V
    // B read in place from a tensor (x): prefetch the rows of the tile two steps ahead
    const bool prefetch = b_end != nullptr && M > MR;
    std::vector<b_t> packed;
    for (int64_t jv = 0; jv < nvec; jv += NV) {
      const int nv = static_cast<int>(std::min<int64_t>(NV, nvec - jv));
      const bool last = jv + nv == nvec;
      const int64_t last_n = (last && !c_full) ? rem : V;
      const b_t* bt = B + jv * V;
      int64_t ldbt = ldb;
      if (prefetch && jv + 2 * NV < nvec) {
        const b_t* pf = B + (jv + 2 * NV) * V;
        for (int64_t k = 0; k < K; ++k) {
          __builtin_prefetch(pf + k * ldb);
          __builtin_prefetch(pf + k * ldb + NV * V - 1);
        }
      }
      if (last && rem < V && b_end != nullptr && K > 0 && bt + (K - 1) * ldb + nv * V > b_end) {
        // the tile would read past B's memory: copy its valid columns, zero-padded
        const int64_t w = nv * V;
        const int64_t valid = Nc - jv * V;
        packed.assign(static_cast<size_t>(K * w), b_t(0));
        for (int64_t k = 0; k < K; ++k)
          for (int64_t j = 0; j < valid; ++j) packed[k * w + j] = bt[k * ldb + j];
        bt = packed.data();
        ldbt = w;
      }
      for (int64_t i = 0; i < M; i += MR) {
        const int mr = static_cast<int>(std::min<int64_t>(MR, M - i));
        pick(mr, nv)(K, A + i * ai, ai, ak, bt, ldbt, C + i * ldc + jv * V, ldc, last_n, epi, i, jv * V);
      }
    }
  }
};

// Dot-product GEMM (reduction along the contiguous dimension): C[i][j] += sum_{p < P} A[i*lda + p] * B[j*ldb + p].
// Used for grad_W1 in NCHW: A = g1*s1 rows, B = x rows. Tails are loaded partially (nothing read past P).
template <typename acc_t, typename b_t>
struct DotGemm {
  static constexpr int MI = 3;
  static constexpr int MJ = 4;
  static constexpr int64_t V = Vectorized<acc_t>::size();
  using Vec = Vectorized<acc_t>;
  using TileFn = void (*)(int64_t, const acc_t*, int64_t, const b_t*, int64_t, acc_t*, int64_t);

  template <int mi, int mj>
  static void tile(int64_t P, const acc_t* A, int64_t lda, const b_t* B, int64_t ldb, acc_t* C, int64_t ldc) {
    Vec acc[mi][mj];
#pragma GCC unroll 3
    for (int i = 0; i < mi; ++i) {
#pragma GCC unroll 4
      for (int j = 0; j < mj; ++j) acc[i][j] = Vec(acc_t(0));
    }
    int64_t p = 0;
    for (; p + V <= P; p += V) {
      Vec a[mi];
#pragma GCC unroll 3
      for (int i = 0; i < mi; ++i) a[i] = Vec::loadu(A + i * lda + p);
#pragma GCC unroll 4
      for (int j = 0; j < mj; ++j) {
        const Vec b = vload<acc_t>(B + j * ldb + p);
#pragma GCC unroll 3
        for (int i = 0; i < mi; ++i) acc[i][j] = at::vec::fmadd(a[i], b, acc[i][j]);
      }
    }
    if (p < P) {
      const int64_t n = P - p;
      Vec a[mi];
      for (int i = 0; i < mi; ++i) a[i] = vload<acc_t>(A + i * lda + p, n);
      for (int j = 0; j < mj; ++j) {
        const Vec b = vload<acc_t>(B + j * ldb + p, n);
        for (int i = 0; i < mi; ++i) acc[i][j] = at::vec::fmadd(a[i], b, acc[i][j]);
      }
    }
    for (int i = 0; i < mi; ++i)
      for (int j = 0; j < mj; ++j) C[i * ldc + j] += hsum(acc[i][j]);
  }

  static TileFn pick(int mi, int mj) {
    static constexpr TileFn table[MI][MJ] = {
        {tile<1, 1>, tile<1, 2>, tile<1, 3>, tile<1, 4>},
        {tile<2, 1>, tile<2, 2>, tile<2, 3>, tile<2, 4>},
        {tile<3, 1>, tile<3, 2>, tile<3, 3>, tile<3, 4>},
    };
    return table[mi - 1][mj - 1];
  }

  static void run(int64_t M, int64_t Nn, int64_t P, const acc_t* A, int64_t lda, const b_t* B, int64_t ldb, acc_t* C,
                  int64_t ldc) {
    if (M <= 0 || Nn <= 0 || P <= 0) return;
    for (int64_t i = 0; i < M; i += MI) {
      const int mi = static_cast<int>(std::min<int64_t>(MI, M - i));
      for (int64_t j = 0; j < Nn; j += MJ) {
        const int mj = static_cast<int>(std::min<int64_t>(MJ, Nn - j));
        pick(mi, mj)(P, A + i * lda, lda, B + j * ldb, ldb, C + i * ldc + j, ldc);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Depthwise rows.
// ---------------------------------------------------------------------------------------------------------------

// NCHW, one output row: out[w] (+)= sum_{ky, kx} wt[ky*K + kx] * rows[ky][w + kx], w < W. rows[ky] points at the
// start of a zero-padded row (image column c at index c + R; a row outside the image is a zero row). Writes whole
// vectors (round_up(W, V) elements of out); the rows need V + K elements of slack.
template <typename acc_t, int KT>
void dw_row_planar_k(const acc_t* const* rows, int64_t k_rt, const acc_t* wt, int64_t W, acc_t* out, bool accumulate) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  if constexpr (KT > 0) {
    Vec wv[KT * KT];
#pragma GCC unroll 49
    for (int t = 0; t < KT * KT; ++t) wv[t] = Vec(wt[t]);
    for (int64_t w = 0; w < W; w += V) {
      Vec a = accumulate ? Vec::loadu(out + w) : Vec(acc_t(0));
#pragma GCC unroll 7
      for (int ky = 0; ky < KT; ++ky) {
        const acc_t* r = rows[ky] + w;
#pragma GCC unroll 7
        for (int kx = 0; kx < KT; ++kx) a = at::vec::fmadd(wv[ky * KT + kx], Vec::loadu(r + kx), a);
      }
      a.store(out + w);
    }
  } else {
    const int64_t K = k_rt;
    for (int64_t w = 0; w < W; w += V) {
      Vec a = accumulate ? Vec::loadu(out + w) : Vec(acc_t(0));
      for (int64_t ky = 0; ky < K; ++ky) {
        const acc_t* r = rows[ky] + w;
        for (int64_t kx = 0; kx < K; ++kx) a = at::vec::fmadd(Vec(wt[ky * K + kx]), Vec::loadu(r + kx), a);
      }
      a.store(out + w);
    }
  }
}

// NCHW, two output rows from K + 1 input rows (each input row loaded once for both): out0 from rows[0 .. K),
// out1 = out0 + ostride from rows[1 .. K]. The last (partial) vectors go first: a row's overflow past W lands in the
// next row's first elements, which are written afterwards.
template <typename acc_t, int KT>
void dw_rows2_planar_k(const acc_t* const* rows, const acc_t* wt, int64_t W, acc_t* out0, int64_t ostride,
                       bool accumulate) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  acc_t* out1 = out0 + ostride;
  Vec wv[KT * KT];
#pragma GCC unroll 49
  for (int t = 0; t < KT * KT; ++t) wv[t] = Vec(wt[t]);
  const int64_t wlast = (div_up(W, V) - 1) * V;
  auto one = [&](int64_t w) {
    Vec a0 = accumulate ? Vec::loadu(out0 + w) : Vec(acc_t(0));
    Vec a1 = accumulate ? Vec::loadu(out1 + w) : Vec(acc_t(0));
#pragma GCC unroll 8
    for (int r = 0; r <= KT; ++r) {
      const acc_t* p = rows[r] + w;
#pragma GCC unroll 7
      for (int kx = 0; kx < KT; ++kx) {
        const Vec xv = Vec::loadu(p + kx);
        if (r < KT) a0 = at::vec::fmadd(wv[r * KT + kx], xv, a0);
        if (r >= 1) a1 = at::vec::fmadd(wv[(r - 1) * KT + kx], xv, a1);
      }
    }
    a0.store(out0 + w);
    a1.store(out1 + w);
  };
  one(wlast);
  for (int64_t w = 0; w < wlast; w += V) one(w);
}

// NCHW: nout output rows (stride ostride; ostride == W packs them back to back) from input rows rows[0 .. nout+K-1)
template <typename acc_t>
void dw_rows_planar(const acc_t* const* rows, int64_t nout, int64_t K, const acc_t* wt, int64_t W, acc_t* out,
                    int64_t ostride, bool accumulate) {
  int64_t i = 0;
  switch (K) {
    case 1:
      for (; i < nout; ++i) dw_row_planar_k<acc_t, 1>(rows + i, K, wt, W, out + i * ostride, accumulate);
      return;
    case 3:
      for (; i + 1 < nout; i += 2) dw_rows2_planar_k<acc_t, 3>(rows + i, wt, W, out + i * ostride, ostride, accumulate);
      if (i < nout) dw_row_planar_k<acc_t, 3>(rows + i, K, wt, W, out + i * ostride, accumulate);
      return;
    case 5:
      for (; i + 1 < nout; i += 2) dw_rows2_planar_k<acc_t, 5>(rows + i, wt, W, out + i * ostride, ostride, accumulate);
      if (i < nout) dw_row_planar_k<acc_t, 5>(rows + i, K, wt, W, out + i * ostride, accumulate);
      return;
    case 7:
      for (; i + 1 < nout; i += 2) dw_rows2_planar_k<acc_t, 7>(rows + i, wt, W, out + i * ostride, ostride, accumulate);
      if (i < nout) dw_row_planar_k<acc_t, 7>(rows + i, K, wt, W, out + i * ostride, accumulate);
      return;
    default:
      for (; i < nout; ++i) dw_row_planar_k<acc_t, 0>(rows + i, K, wt, W, out + i * ostride, accumulate);
      return;
  }
}

template <typename acc_t>
void dw_row_planar(const acc_t* const* rows, int64_t K, const acc_t* wt, int64_t W, acc_t* out, bool accumulate) {
  dw_rows_planar(rows, 1, K, wt, W, out, 0, accumulate);
}

// channels_last: out[w*os + c] (+)= sum_{ky valid, kx} wt[(ky*K + kx)*ws + c] * rows[ky][(w + kx)*ps + c] for every
// channel vector c < nvec*V and w < W; rows[ky] points at padded pixel 0 of a row (image column w at pixel w + R).
template <typename acc_t, int KT, int PB>
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

template <typename acc_t, int KT>
void dw_row_pm_k(const acc_t* const* rows, int64_t k_rt, const acc_t* wt, int64_t ws, int64_t ps, int64_t nvec,
                 int64_t W, acc_t* out, int64_t os, bool accumulate) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  const int64_t K = KT > 0 ? KT : k_rt;
  for (int64_t cv = 0; cv < nvec; ++cv) {
    const int64_t c = cv * V;
    int64_t w = 0;
    for (; w + 4 <= W; w += 4) dw_pm_block<acc_t, KT, 4>(rows, K, wt, ws, ps, w, c, out, os, accumulate);
    for (; w < W; ++w) dw_pm_block<acc_t, KT, 1>(rows, K, wt, ws, ps, w, c, out, os, accumulate);
  }
}

template <typename acc_t>
void dw_row_pm(const acc_t* const* rows, int64_t K, const acc_t* wt, int64_t ws, int64_t ps, int64_t nvec, int64_t W,
               acc_t* out, int64_t os, bool accumulate) {
  switch (K) {
    case 1: dw_row_pm_k<acc_t, 1>(rows, K, wt, ws, ps, nvec, W, out, os, accumulate); break;
    case 3: dw_row_pm_k<acc_t, 3>(rows, K, wt, ws, ps, nvec, W, out, os, accumulate); break;
    case 5: dw_row_pm_k<acc_t, 5>(rows, K, wt, ws, ps, nvec, W, out, os, accumulate); break;
    case 7: dw_row_pm_k<acc_t, 7>(rows, K, wt, ws, ps, nvec, W, out, os, accumulate); break;
    default: dw_row_pm_k<acc_t, 0>(rows, K, wt, ws, ps, nvec, W, out, os, accumulate); break;
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Gate (upsampled with F.interpolate's source indices, csrc/upsample.h) and its adjoint.
// ---------------------------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------------------------
// Problem description, prepared weights, work split.
// ---------------------------------------------------------------------------------------------------------------

struct Geometry {
  int64_t N = 0, C = 0, H = 0, W = 0, HW = 0;
  int64_t init = 0, rm1 = 0, K = 1, KK = 1, oc = 0;
  int64_t n_x1 = 0;     // x1 channels that matter: min(init, oc)
  int64_t n_cheap = 0;  // cheap channels kept: max(oc - init, 0)
  int64_t n_src = 0;    // x1 channels the kept cheap channels read: ceil(n_cheap / rm1)
  int64_t R = 0;        // depthwise halo (0 without cheap channels)
  int64_t Hg = 0, Wg = 0;
  bool relu = true, cl = false, gated = false, bilinear = false;
};

struct Segment {
  int64_t n, r0, r1;
};

// one contiguous range of the N*H rows per group, cut at image boundaries
std::vector<std::vector<Segment>> split_rows(int64_t N, int64_t H, int64_t groups) {
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
int64_t pick_rows(int64_t row_bytes, int64_t halo_rows, int64_t H) {
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

template <typename scalar_t>
struct Ctx {
  using acc_t = acc_of<scalar_t>;
  static constexpr int64_t V = Vectorized<acc_t>::size();
  Geometry d;
  int64_t Zc = 0;    // channels_last: n_x1 rounded up to vectors
  int64_t Cq = 0;    // channels_last: n_cheap rounded up to vectors
  int64_t Cds = 0;   // channels_last: channels of the depthwise source window (Zc when rm1 == 1, else Cq)
  int64_t Cpad = 0;  // channels_last: C rounded up to vectors
  const scalar_t* x = nullptr;
  const scalar_t* x_end = nullptr;
  const scalar_t* gate = nullptr;
  const acc_t* s1 = nullptr;
  const acc_t* b1 = nullptr;
  const acc_t* s2 = nullptr;
  const acc_t* b2 = nullptr;
  std::vector<acc_t> w1;   // NCHW: W1 [n_x1][C]; channels_last: W1^T [C][Zc]
  std::vector<acc_t> w1r;  // backward: NCHW W1^T [C][n_x1]; channels_last W1 [n_x1][Cpad]
  std::vector<acc_t> w2;   // NCHW: [n_cheap][KK]; channels_last: [KK][Cq]
  std::vector<acc_t> w2f;  // backward, the kernel flipped (transposed depthwise), same layouts
  std::vector<acc_t> s1p, b1p, s2p, b2p;  // channels_last: padded with zeros to Zc / Cq
  GateTables<acc_t> gt;
  // Statistics backward (_ghost_module_stats_backward_kernel): 0 = the Ghost module backward (grad_out given);
  // 1 / 2 = no grad_out, the stage's z (1: z1, 2: z2) gets the upstream gradient dz = ca + cc * (z - cm) per
  // channel. ca / cc / cm are padded with zeros to whole vectors (channels_last reads them as vectors).
  int stats = 0;
  std::vector<acc_t> ca, cc, cm;

  void set_stats(int stage, const at::Tensor& a, const at::Tensor& c, const at::Tensor& m) {
    stats = stage;
    const int64_t n = a.numel();
    const int64_t len = round_up(std::max<int64_t>({n, Zc, Cq, int64_t(1)}), V);
    auto pad = [&](std::vector<acc_t>& v, const at::Tensor& t) {
      v.assign(static_cast<size_t>(len), acc_t(0));
      const acc_t* p = t.data_ptr<acc_t>();
      for (int64_t i = 0; i < n; ++i) v[i] = p[i];
    };
    pad(ca, a);
    pad(cc, c);
    pad(cm, m);
  }

  void prepare(const Geometry& geo, const at::Tensor& x_t, const at::Tensor& w1_t, const at::Tensor& s1_t,
               const at::Tensor& b1_t, const at::Tensor& w2_t, const at::Tensor& s2_t, const at::Tensor& b2_t,
               const std::optional<at::Tensor>& gate_t, bool backward) {
    d = geo;
    x = x_t.data_ptr<scalar_t>();
    x_end = x + x_t.numel();
    gate = d.gated ? gate_t->data_ptr<scalar_t>() : nullptr;
    s1 = s1_t.data_ptr<acc_t>();
    b1 = b1_t.data_ptr<acc_t>();
    s2 = s2_t.data_ptr<acc_t>();
    b2 = b2_t.data_ptr<acc_t>();
    const scalar_t* pw = w1_t.data_ptr<scalar_t>();
    const scalar_t* cw = w2_t.data_ptr<scalar_t>();
    const int64_t C = d.C, KK = d.KK;
    Zc = round_up(std::max<int64_t>(d.n_x1, 1), V);
    Cq = round_up(std::max<int64_t>(d.n_cheap, 1), V);
    Cds = d.rm1 == 1 ? Zc : Cq;
    Cpad = round_up(std::max<int64_t>(C, 1), V);
    if (!d.cl) {
      w1.assign(static_cast<size_t>(d.n_x1 * C), acc_t(0));
      for (int64_t i = 0; i < d.n_x1 * C; ++i) w1[i] = static_cast<acc_t>(pw[i]);
      w2.assign(static_cast<size_t>(d.n_cheap * KK), acc_t(0));
      for (int64_t i = 0; i < d.n_cheap * KK; ++i) w2[i] = static_cast<acc_t>(cw[i]);
      if (backward) {
        w1r.assign(static_cast<size_t>(C * d.n_x1), acc_t(0));  // W1^T [C][n_x1] for grad_x
        for (int64_t c = 0; c < d.n_x1; ++c)
          for (int64_t k = 0; k < C; ++k) w1r[k * d.n_x1 + c] = w1[c * C + k];
        w2f.assign(w2.size(), acc_t(0));
        for (int64_t o = 0; o < d.n_cheap; ++o)
          for (int64_t t = 0; t < KK; ++t) w2f[o * KK + t] = w2[o * KK + (KK - 1 - t)];
      }
    } else {
      w1.assign(static_cast<size_t>(C * Zc), acc_t(0));
      for (int64_t c = 0; c < d.n_x1; ++c)
        for (int64_t k = 0; k < C; ++k) w1[k * Zc + c] = static_cast<acc_t>(pw[c * C + k]);
      if (backward) {
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
      s1p.assign(static_cast<size_t>(Zc), acc_t(0));
      b1p.assign(static_cast<size_t>(Zc), acc_t(0));
      for (int64_t c = 0; c < d.n_x1; ++c) {
        s1p[c] = s1[c];
        b1p[c] = b1[c];
      }
      s2p.assign(static_cast<size_t>(Cq), acc_t(0));
      b2p.assign(static_cast<size_t>(Cq), acc_t(0));
      for (int64_t o = 0; o < d.n_cheap; ++o) {
        s2p[o] = s2[o];
        b2p[o] = b2[o];
      }
    }
    if (d.gated) gt.build(d.H, d.W, d.Hg, d.Wg, d.bilinear);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------------

// dst[0 .. cnt) = [gate *] [act](src * s + b) (affine / act optional)
template <typename acc_t, typename scalar_t>
inline void store_out(scalar_t* dst, const acc_t* src, int64_t cnt, const acc_t* gate, bool affine, acc_t s, acc_t b,
                      bool relu, bool stream) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Vec sv(s), bv(b);
  auto value = [&](int64_t i) {
    Vec v = Vec::loadu(src + i);
    if (affine) v = at::vec::fmadd(v, sv, bv);
    if (relu) v = relu_v(v);
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

// dst[R .. R + W) = src[0 .. W) with zeros written past W (the pads of the padded rows stay zero)
template <typename acc_t>
inline void copy_row_padded(acc_t* dst, const acc_t* src, int64_t W) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t w = 0;
  for (; w + V <= W; w += V) Vec::loadu(src + w).store(dst + w);
  if (w < W) keep_first(Vec::loadu(src + w), W - w).store(dst + w);
}

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

template <typename scalar_t>
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
      epi.scale = cx.s1;
      epi.bias = cx.b1;
      epi.relu = d.relu;
      Gemm<acc_t, acc_t, scalar_t, acc_t, false>::run(d.n_x1, np, d.C, cx.w1.data(), d.C, 1, xn + hi * W, HW,
                                                      cx.x_end, z0, ws.z_ps, true, epi);
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
      store_out<acc_t>(on + c * HW + s * W, z + c * ws.z_ps + (s - lo) * W, cnt, gv, false, acc_t(0), acc_t(0),
                       false, ws.stream);
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
      store_out<acc_t>(on + oc_idx * HW + s * W, ws.t.data(), cnt, gv, true, cx.s2[o], cx.b2[o], d.relu, ws.stream);
    }
  }
}

template <typename scalar_t>
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
      epi.scale = cx.s1p.data();
      epi.bias = cx.b1p.data();
      epi.relu = d.relu;
      Gemm<acc_t, scalar_t, acc_t, acc_t, false>::run(np, d.n_x1, C, xn + hi * W * C, C, 1, cx.w1.data(), Zc,
                                                      nullptr, z0, Zc, true, epi);
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
          Vec v = at::vec::fmadd(Vec::loadu(t + w * Cq + c), Vec::loadu(cx.s2p.data() + c),
                                 Vec::loadu(cx.b2p.data() + c));
          if (d.relu) v = relu_v(v);
          if (gp != nullptr) v = v * Vec::loadu(gp + init + c);
          v.store(op + init + c);
        }
      }
      store_out<acc_t>(on + h * W * oc, orow, W * oc, nullptr, false, acc_t(0), acc_t(0), false, ws.stream);
    }
  }
}

// outputs at least this large are written with non-temporal stores (they would not stay in cache anyway)
constexpr int64_t kStreamBytes = int64_t(8) << 20;

int64_t num_groups(int64_t rows) {
  return std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
}

template <typename scalar_t>
void forward_impl(const Geometry& geo, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1,
                  const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2, const at::Tensor& b2,
                  const std::optional<at::Tensor>& gate, const at::Tensor& out) {
  Ctx<scalar_t> cx;
  cx.prepare(geo, x, w1, s1, b1, w2, s2, b2, gate, false);
  const int64_t ng = num_groups(geo.N * geo.H);
  const auto groups = split_rows(geo.N, geo.H, ng);
  scalar_t* out_p = out.data_ptr<scalar_t>();
  const bool stream = out.numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
  at::parallel_for(0, ng, 1, [&](int64_t gb, int64_t ge) {
    auto ws = make_fwd_ws(cx);
    ws.stream = stream;
    for (int64_t g = gb; g < ge; ++g)
      for (const Segment& sg : groups[g]) {
        if (geo.cl) fwd_cl_segment(cx, out_p, sg, ws);
        else fwd_planar_segment(cx, out_p, sg, ws);
      }
    if (stream) stream_fence();
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------------

struct Needs {
  bool x = false, w1 = false, s1 = false, b1 = false, w2 = false, s2 = false, b2 = false, gate = false;
  bool primary() const { return x || w1 || s1 || b1; }  // g1 (the primary chain) is needed
};

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

// grad_w2 of one owned row: accw[(ky*K + kx)*V ..] += g[w] * rows[ky][w + kx] over w < W (g read as zero past W)
template <typename acc_t, int KT>
void dwgrad_row_planar_k(const acc_t* const* rows, int64_t k_rt, const acc_t* g, int64_t W, acc_t* accw) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  constexpr int KB = KT > 0 ? KT : 1;
  const int64_t K = KT > 0 ? KT : k_rt;
  for (int64_t ky = 0; ky < K; ++ky) {
    const acc_t* r = rows[ky];
    if (r == nullptr) continue;
    acc_t* aw = accw + ky * K * V;
    if constexpr (KT > 0) {
      Vec a[KB];
      for (int kx = 0; kx < KB; ++kx) a[kx] = Vec::loadu(aw + kx * V);
      for (int64_t w = 0; w < W; w += V) {
        const Vec gv = keep_first(Vec::loadu(g + w), W - w);
#pragma GCC unroll 7
        for (int kx = 0; kx < KB; ++kx) a[kx] = at::vec::fmadd(gv, Vec::loadu(r + w + kx), a[kx]);
      }
      for (int kx = 0; kx < KB; ++kx) a[kx].store(aw + kx * V);
    } else {
      for (int64_t w = 0; w < W; w += V) {
        const Vec gv = keep_first(Vec::loadu(g + w), W - w);
        for (int64_t kx = 0; kx < K; ++kx)
          at::vec::fmadd(gv, Vec::loadu(r + w + kx), Vec::loadu(aw + kx * V)).store(aw + kx * V);
      }
    }
  }
}

template <typename acc_t>
void dwgrad_row_planar(const acc_t* const* rows, int64_t K, const acc_t* g, int64_t W, acc_t* accw) {
  switch (K) {
    case 1: dwgrad_row_planar_k<acc_t, 1>(rows, K, g, W, accw); break;
    case 3: dwgrad_row_planar_k<acc_t, 3>(rows, K, g, W, accw); break;
    case 5: dwgrad_row_planar_k<acc_t, 5>(rows, K, g, W, accw); break;
    case 7: dwgrad_row_planar_k<acc_t, 7>(rows, K, g, W, accw); break;
    default: dwgrad_row_planar_k<acc_t, 0>(rows, K, g, W, accw); break;
  }
}

// channels_last grad_w2 of one owned row: aw[(ky*K + kx)*Cq + c] += sum_w g[w*gs + c] * rows[ky][(w + kx)*ps + c]
// for every channel vector c (one register accumulator per tap: independent FMA chains)
template <typename acc_t, int KT>
void dwgrad_row_pm_k(const acc_t* const* rows, int64_t k_rt, const acc_t* g, int64_t gs, int64_t ps, int64_t nvec,
                     int64_t W, acc_t* aw) {
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const int64_t K = KT > 0 ? KT : k_rt;
  const int64_t Cq = gs;
  for (int64_t ky = 0; ky < K; ++ky) {
    const acc_t* r = rows[ky];
    if (r == nullptr) continue;
    for (int64_t cv = 0; cv < nvec; ++cv) {
      const int64_t c = cv * V;
      if constexpr (KT > 0) {
        Vec a[KT];
#pragma GCC unroll 7
        for (int kx = 0; kx < KT; ++kx) a[kx] = Vec(acc_t(0));
        for (int64_t w = 0; w < W; ++w) {
          const Vec gv = Vec::loadu(g + w * gs + c);
          const acc_t* rp = r + w * ps + c;
#pragma GCC unroll 7
          for (int kx = 0; kx < KT; ++kx) a[kx] = at::vec::fmadd(gv, Vec::loadu(rp + kx * ps), a[kx]);
        }
#pragma GCC unroll 7
        for (int kx = 0; kx < KT; ++kx) {
          acc_t* ap = aw + (ky * KT + kx) * Cq + c;
          (Vec::loadu(ap) + a[kx]).store(ap);
        }
      } else {
        for (int64_t kx = 0; kx < K; ++kx) {
          Vec a0(acc_t(0)), a1(acc_t(0));
          int64_t w = 0;
          for (; w + 1 < W; w += 2) {
            a0 = at::vec::fmadd(Vec::loadu(g + w * gs + c), Vec::loadu(r + (w + kx) * ps + c), a0);
            a1 = at::vec::fmadd(Vec::loadu(g + (w + 1) * gs + c), Vec::loadu(r + (w + 1 + kx) * ps + c), a1);
          }
          if (w < W) a0 = at::vec::fmadd(Vec::loadu(g + w * gs + c), Vec::loadu(r + (w + kx) * ps + c), a0);
          acc_t* ap = aw + (ky * K + kx) * Cq + c;
          (Vec::loadu(ap) + (a0 + a1)).store(ap);
        }
      }
    }
  }
}

template <typename acc_t>
void dwgrad_row_pm(const acc_t* const* rows, int64_t K, const acc_t* g, int64_t gs, int64_t ps, int64_t nvec,
                   int64_t W, acc_t* aw) {
  switch (K) {
    case 1: dwgrad_row_pm_k<acc_t, 1>(rows, K, g, gs, ps, nvec, W, aw); break;
    case 3: dwgrad_row_pm_k<acc_t, 3>(rows, K, g, gs, ps, nvec, W, aw); break;
    case 5: dwgrad_row_pm_k<acc_t, 5>(rows, K, g, gs, ps, nvec, W, aw); break;
    case 7: dwgrad_row_pm_k<acc_t, 7>(rows, K, g, gs, ps, nvec, W, aw); break;
    default: dwgrad_row_pm_k<acc_t, 0>(rows, K, g, gs, ps, nvec, W, aw); break;
  }
}

template <typename acc_t>
inline Vectorized<acc_t> act_v(const Vectorized<acc_t>& v, bool relu) {
  return relu ? relu_v(v) : v;
}

template <typename scalar_t>
void bwd_planar_segment(const Ctx<scalar_t>& cx, const scalar_t* go, scalar_t* gx_out, const Needs& nd,
                        const Segment& sg, Partials<acc_of<scalar_t>>& pt, acc_of<scalar_t>* ug, const GateSeg& gs,
                        BwdWs<acc_of<scalar_t>>& ws) {
  using acc_t = acc_of<scalar_t>;
  using Vec = Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  const Geometry& d = cx.d;
  const int64_t W = d.W, H = d.H, R = d.R, K = d.K, KK = d.KK, Wp = W + 2 * R, HW = d.HW, G = ws.G, C = d.C;
  const int64_t n = sg.n, r0 = sg.r0, r1 = sg.r1;
  const bool relu = d.relu;
  const bool primary = nd.primary();
  const bool gate_grad = ug != nullptr;
  const scalar_t* xn = cx.x + n * C * HW;
  const int st = cx.stats;  // statistics backward: no grad_out, dz from the coefficients
  const scalar_t* gon = st == 0 ? go + n * d.oc * HW : nullptr;
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
      Gemm<acc_t, acc_t, scalar_t, acc_t, false>::run(d.n_x1, np, C, cx.w1.data(), C, 1, xn + xhi * W, HW, cx.x_end,
                                                      z0, ws.z_ps, true);
      for (int64_t c = 0; c < d.n_src; ++c) {
        const Vec sv(cx.s1[c]), bv(cx.b1[c]);
        for (int64_t h = xhi; h < nhi; ++h) {
          const acc_t* src = z0 + c * ws.z_ps + (h - xhi) * W;
          acc_t* dst = ds + c * ws.ds_ps + (h - xlo) * Wp + R;
          for (int64_t w = 0; w < W; w += V)
            keep_first(act_v(at::vec::fmadd(Vec::loadu(src + w), sv, bv), relu), W - w).store(dst + w);
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
        const scalar_t* gop = st == 0 ? gon + oci * HW : nullptr;
        if (st == 0) {
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
          const scalar_t* gor = st == 0 ? gop + h * W : nullptr;
          acc_t* qrow = qp + (h - qlo) * Wp + R;
          if (st == 2) {
            // dz2 = a + c (z2 - mean): the upstream gradient of the depthwise output itself
            for (int64_t w = 0; w < W; w += V)
              keep_first(at::vec::fmadd(cv, Vec::loadu(t + w) - mv, av), W - w).store(qrow + w);
          }
          for (int64_t w = 0; w < W && st == 0; w += V) {
            const int64_t m = std::min<int64_t>(V, W - w);
            const Vec c2 = Vec::loadu(t + w);
            const Vec y2 = at::vec::fmadd(c2, sv, bv);
            const Vec gov = vload<acc_t>(gor + w, m);
            Vec g2 = gn != nullptr ? gov * Vec::loadu(gtr + w) : gov;
            if (relu) g2 = relu_grad_v(g2, y2);
            g2 = keep_first(g2, m);
            (g2 * sv).store(qrow + w);
            if (owned) {
              rs = at::vec::fmadd(g2, c2, rs);
              rb = rb + g2;
              if (gate_grad) (gov * act_v(y2, relu)).store(vr + w);
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
        const scalar_t* gop = st == 0 ? gon + c * HW : nullptr;
        if (st == 0 && c + 1 < d.n_x1) prefetch_range(gop + HW + s * W, (e - s) * W);
        const acc_t* zc = z + c * ws.z_ps;
        const Vec sv(cx.s1[c]), bv(cx.b1[c]);
        // statistics backward (stage 1): the coefficients of dz (the vectors are empty otherwise)
        const Vec av(st ? cx.ca[c] : acc_t(0)), cv(st ? cx.cc[c] : acc_t(0));
        const Vec mv(st ? cx.cm[c] : acc_t(0));
        Vec rs(acc_t(0)), rb(acc_t(0));
        if (gn != nullptr)
          gate_rows(gt, ws.hr.data(), ws.hr_rows, gn + c * gplane, s, e, W, d.Wg, cx.gt, d.bilinear);
        if (gate_grad) ws.adj.begin(ug + gs.offset + c * gs.ghn * d.Wg, 0, gs.gh_lo, 0, 1);
        for (int64_t h = s; h < e; ++h) {
          const scalar_t* gor = st == 0 ? gop + h * W : nullptr;
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
            if (gate_grad) (vload<acc_t>(gor + w, m) * act_v(y1, relu)).store(vr + w);
            if (primary) {
              Vec g1 = Vec::loadu(gx + w);
              if (relu) g1 = relu_grad_v(g1, y1);
              g1 = keep_first(g1, m);
              rs = at::vec::fmadd(g1, zv, rs);
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
    // ---- grad_W1 += (g1 s1) x^T, grad_x = W1^T (g1 s1) on the owned rows ----
    const int64_t np = (e - s) * W;
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

template <typename scalar_t>
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
  const bool relu = d.relu;
  const bool primary = nd.primary();
  const bool gate_grad = ug != nullptr;
  const int st = cx.stats;  // statistics backward: no grad_out, dz from the coefficients
  const scalar_t* xn = cx.x + n * HW * C;
  const scalar_t* gon = st == 0 ? go + n * HW * oc : nullptr;
  scalar_t* gxn = nd.x ? gx_out + n * HW * C : nullptr;
  const scalar_t* gn = d.gated ? cx.gate + n * oc * d.Hg * d.Wg : nullptr;
  const acc_t* s1p = cx.s1p.data();
  const acc_t* b1p = cx.b1p.data();
  const acc_t* s2p = cx.s2p.data();
  const acc_t* b2p = cx.b2p.data();
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
      Gemm<acc_t, scalar_t, acc_t, acc_t, false>::run(np, d.n_x1, C, xn + xhi * W * C, C, 1, cx.w1.data(), Zc,
                                                      nullptr, z0, Zc, true);
      if (d.n_cheap > 0) {
        for (int64_t h = xhi; h < nhi; ++h) {
          for (int64_t w = 0; w < W; ++w) {
            const acc_t* src = z0 + ((h - xhi) * W + w) * Zc;
            acc_t* dst = ds + (h - xlo) * dsrs + (w + R) * Cds;
            acc_t* x1dst = d.rm1 == 1 ? dst : x1t;
            for (int64_t c = 0; c < Zc; c += V)
              act_v(at::vec::fmadd(Vec::loadu(src + c), Vec::loadu(s1p + c), Vec::loadu(b1p + c)), relu)
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
        const scalar_t* gor = st == 0 ? gon + h * W * oc : nullptr;
        if (st == 0 && h + 1 < H) prefetch_range(gor + W * oc, W * oc);
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
        for (int64_t w = 0; w < W && st == 0; ++w) {
          for (int64_t c = 0; c < d.n_cheap; c += V) {
            const int64_t m = std::min<int64_t>(V, d.n_cheap - c);
            const Vec c2 = Vec::loadu(t + w * Cq + c);
            const Vec y2 = at::vec::fmadd(c2, Vec::loadu(s2p + c), Vec::loadu(b2p + c));
            const Vec gov = vload<acc_t>(gor + w * oc + d.init + c, m);
            Vec g2 = gn != nullptr ? gov * Vec::loadu(gt + w * oc + d.init + c) : gov;
            if (relu) g2 = relu_grad_v(g2, y2);
            g2 = keep_first(g2, m);
            (g2 * Vec::loadu(s2p + c)).store(qrow + (w + R) * Cq + c);
            if (owned) {
              at::vec::fmadd(g2, c2, Vec::loadu(pt.s2.data() + c)).store(pt.s2.data() + c);
              (Vec::loadu(pt.b2.data() + c) + g2).store(pt.b2.data() + c);
              if (gate_grad) vstore<acc_t>(vr + w * oc + d.init + c, gov * act_v(y2, relu), m);
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
        const scalar_t* gor = st == 0 ? gon + h * W * oc : nullptr;
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
            const Vec gov = st == 0 ? vload<acc_t>(gor + w * oc + c, m) : Vec(acc_t(0));
            const Vec zv = Vec::loadu(zp + c);
            const Vec y1 = at::vec::fmadd(zv, Vec::loadu(s1p + c), Vec::loadu(b1p + c));
            if (gate_grad) vstore<acc_t>(vr + w * oc + c, gov * act_v(y1, relu), m);
            if (primary) {
              Vec g1 = gn != nullptr ? gov * Vec::loadu(gt + w * oc + c) : gov;
              if (cheap) {
                if (d.rm1 == 1) {
                  if (c < Cq) g1 = g1 + Vec::loadu(t + w * Cq + c);
                } else {
                  g1 = g1 + Vec::loadu(tx + c);
                }
              }
              if (relu) g1 = relu_grad_v(g1, y1);
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
    // ---- grad_W1 += (g1 s1)^T x, grad_x = (g1 s1) W1 on the owned rows ----
    const int64_t np = (e - s) * W;
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
                   const Needs& nd, int stats_stage = 0, const at::Tensor* coef_a = nullptr,
                   const at::Tensor* coef_c = nullptr, const at::Tensor* stats_mean = nullptr) {
  using acc_t = acc_of<scalar_t>;
  Ctx<scalar_t> cx;
  cx.prepare(geo, x, w1, s1, b1, w2, s2, b2, gate, true);
  if (stats_stage != 0) cx.set_stats(stats_stage, *coef_a, *coef_c, *stats_mean);
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
  const scalar_t* go = stats_stage == 0 ? grad_out.data_ptr<scalar_t>() : nullptr;
  scalar_t* gx = nd.x ? grads[0].data_ptr<scalar_t>() : nullptr;

  const bool stream = nd.x && grads[0].numel() * static_cast<int64_t>(sizeof(scalar_t)) >= kStreamBytes;
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
        if (d.cl) bwd_cl_segment(cx, go, gx, nd, groups[g][i], pt, ugp, gsegs[g][i], ws);
        else bwd_planar_segment(cx, go, gx, nd, groups[g][i], pt, ugp, gsegs[g][i], ws);
      }
    }
    if (stream) stream_fence();
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

// ---------------------------------------------------------------------------------------------------------------
// Training-mode BatchNorm statistics (_ghost_module_stats_kernel): the forward's row walk without `out`; per
// channel, each sub-block's values (stage 1: z1 = W1 x; stage 2: z2 = dw(x1)) give a (count, mean, M2) chunk
// (mean first, then the squared deviations from it: no cancellation when |mean| >> std) merged into the group's
// running partial with Chan's formula; the groups' partials are merged in group order afterwards.
// ---------------------------------------------------------------------------------------------------------------

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

template <typename scalar_t>
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
        epi.scale = cx.s1;
        epi.bias = cx.b1;
        epi.relu = d.relu;
      }
      Gemm<acc_t, acc_t, scalar_t, acc_t, false>::run(d.n_x1, np, d.C, cx.w1.data(), d.C, 1, xn + hi * W, HW,
                                                      cx.x_end, z0, ws.z_ps, true, epi);
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

template <typename scalar_t>
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
        epi.scale = cx.s1p.data();
        epi.bias = cx.b1p.data();
        epi.relu = d.relu;
      }
      Gemm<acc_t, scalar_t, acc_t, acc_t, false>::run(np, d.n_x1, C, xn + hi * W * C, C, 1, cx.w1.data(), Zc,
                                                      nullptr, z0, Zc, true, epi);
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
void stats_impl(const Geometry& geo, int stage, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1,
                const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2, const at::Tensor& b2,
                const at::Tensor& mean, const at::Tensor& var) {
  using acc_t = acc_of<scalar_t>;
  Ctx<scalar_t> cx;
  cx.prepare(geo, x, w1, s1, b1, w2, s2, b2, std::nullopt, false);
  const Geometry& d = cx.d;
  const int64_t channels = stage == 1 ? d.n_x1 : d.n_cheap;
  const int64_t ng = num_groups(d.N * d.H);
  const auto groups = split_rows(d.N, d.H, ng);
  std::vector<StatParts<acc_t>> parts(static_cast<size_t>(ng));
  at::parallel_for(0, ng, 1, [&](int64_t gb, int64_t ge) {
    auto ws = make_fwd_ws(cx);
    for (int64_t g = gb; g < ge; ++g) {
      parts[g].init(channels);
      for (const Segment& sg : groups[g]) {
        if (d.cl) stats_cl_segment(cx, stage, sg, ws, parts[g]);
        else stats_planar_segment(cx, stage, sg, ws, parts[g]);
      }
    }
  });
  StatParts<acc_t> tot;
  tot.init(channels);
  for (int64_t g = 0; g < ng; ++g)
    for (int64_t c = 0; c < channels; ++c) tot.merge(c, parts[g].n[c], parts[g].mean[c], parts[g].m2[c]);
  acc_t* mp = mean.data_ptr<acc_t>();
  acc_t* vp = var.data_ptr<acc_t>();
  for (int64_t c = 0; c < channels; ++c) {
    mp[c] = tot.mean[c];
    vp[c] = tot.m2[c] / static_cast<acc_t>(tot.n[c]);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Argument checks and entry points
// ---------------------------------------------------------------------------------------------------------------

void check_param(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype, const char* op, const char* name,
                 at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), " (x's device), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " contiguous, got strides ", t.strides());
}

// x, primary_weight / scale / bias and cheap_weight (shared by the module and the statistics kernels); sets every
// field of the geometry but oc and what depends on it (n_x1, n_cheap, n_src, R) and the gate's
Geometry check_common(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1,
                      const at::Tensor& b1, const at::Tensor& w2, bool relu) {
  TORCH_CHECK(x.defined(), op, ": expected x to be a tensor, got an undefined tensor");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected x on the CPU, got ", x.device());
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": expected x of dtype float32, float64, float16 or bfloat16, got ", dt);
  check_layout(x, op, "x");
  const at::ScalarType acc = acc_type(dt);
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.HW = g.H * g.W;
  g.cl = is_channels_last(x);
  g.relu = relu;

  TORCH_CHECK(w1.defined() && w1.dim() == 4, op, ": expected primary_weight of shape [init, C_in, 1, 1], got ",
              w1.defined() ? w1.sizes() : at::IntArrayRef{});
  g.init = w1.size(0);
  TORCH_CHECK(g.init >= 1, op, ": expected primary_weight with at least one output channel, got shape ", w1.sizes());
  check_param(w1, x, dt, op, "primary_weight", {g.init, g.C, 1, 1});
  check_param(s1, x, acc, op, "primary_scale", {g.init});
  check_param(b1, x, acc, op, "primary_bias", {g.init});

  TORCH_CHECK(w2.defined() && w2.dim() == 4, op, ": expected cheap_weight of shape [init*(ratio-1), 1, k, k], got ",
              w2.defined() ? w2.sizes() : at::IntArrayRef{});
  const int64_t cheap = w2.size(0);
  g.K = w2.size(3);
  TORCH_CHECK(cheap >= g.init && cheap % g.init == 0, op, ": expected cheap_weight.shape[0] a positive multiple of ",
              "init = ", g.init, " (init * (ratio - 1)), got ", cheap);
  TORCH_CHECK(g.K >= 1 && g.K % 2 == 1, op, ": expected an odd depthwise kernel size, got cheap_weight of shape ",
              w2.sizes());
  check_param(w2, x, dt, op, "cheap_weight", {cheap, 1, g.K, g.K});
  g.rm1 = cheap / g.init;
  g.KK = g.K * g.K;
  return g;
}

// the channels kept: sets oc, n_x1, n_cheap, n_src, R
void set_out_channels(Geometry& g, int64_t out_channels) {
  g.oc = out_channels;
  g.n_x1 = std::min(g.init, g.oc);
  g.n_cheap = std::max<int64_t>(g.oc - g.init, 0);
  g.n_src = div_up(g.n_cheap, g.rm1);
  g.R = g.n_cheap > 0 ? g.K / 2 : 0;
}

Geometry check_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1,
                    const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& s2, const at::Tensor& b2,
                    int64_t out_channels, bool relu, const std::optional<at::Tensor>& gate,
                    c10::string_view gate_mode) {
  Geometry g = check_common(op, x, w1, s1, b1, w2, relu);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t cheap = g.init * g.rm1;
  check_param(s2, x, acc, op, "cheap_scale", {cheap});
  check_param(b2, x, acc, op, "cheap_bias", {cheap});

  TORCH_CHECK(out_channels >= 1 && out_channels <= g.init + cheap, op, ": expected 1 <= out_channels <= ",
              g.init + cheap, " (init * ratio), got ", out_channels);
  set_out_channels(g, out_channels);

  const std::string mode(gate_mode.data(), gate_mode.size());
  TORCH_CHECK(mode == "nearest" || mode == "bilinear", op, ": expected gate_mode 'nearest' or 'bilinear', got '",
              mode, "'");
  g.bilinear = mode == "bilinear";
  g.gated = gate.has_value() && gate->defined();
  if (g.gated) {
    const at::Tensor& gt = *gate;
    TORCH_CHECK(gt.dim() == 4 && gt.size(0) == g.N && gt.size(1) == g.oc, op, ": expected gate of shape [", g.N, ", ",
                g.oc, ", Hg, Wg], got ", gt.sizes());
    check_param(gt, x, x.scalar_type(), op, "gate", gt.sizes());
    g.Hg = gt.size(2);
    g.Wg = gt.size(3);
    TORCH_CHECK(g.N * g.HW == 0 || (g.Hg >= 1 && g.Wg >= 1), op, ": expected a non-empty gate plane, got gate of shape ",
                gt.sizes());
  }
  return g;
}

// x contiguous in both layouts (one channel, 1x1 images, empty) reads the same either way: then the output's own
// layout picks the kernel's
void resolve_layout(Geometry& g, const at::Tensor& x, const at::Tensor& t) {
  if (x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast) && t.defined() && t.dim() == 4)
    g.cl = !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_like_output(const at::Tensor& t, const at::Tensor& x, const Geometry& g, const char* op, const char* name) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": expected ", name, " of dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == 4 && t.size(0) == g.N && t.size(1) == g.oc && t.size(2) == g.H && t.size(3) == g.W, op,
              ": expected ", name, " of shape [", g.N, ", ", g.oc, ", ", g.H, ", ", g.W, "], got ", t.sizes());
  const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  TORCH_CHECK(t.is_contiguous(fmt), op, ": expected ", name, " contiguous in x's memory format (",
              g.cl ? "channels_last" : "NCHW", "), got strides ", t.strides());
}

void ghost_module_forward_cpu(const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& primary_scale,
                              const at::Tensor& primary_bias, const at::Tensor& cheap_weight,
                              const at::Tensor& cheap_scale, const at::Tensor& cheap_bias, int64_t out_channels,
                              bool relu, const std::optional<at::Tensor>& gate, c10::string_view gate_mode,
                              const at::Tensor& out) {
  Geometry g = check_args(kFwdOp, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                          cheap_bias, out_channels, relu, gate, gate_mode);
  resolve_layout(g, x, out);
  check_like_output(out, x, g, kFwdOp, "out");
  if (g.N == 0 || g.HW == 0) return;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_forward_cpu", [&] {
    forward_impl<scalar_t>(g, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale, cheap_bias,
                           gate, out);
  });
}

void ghost_module_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& primary_weight,
                               const at::Tensor& primary_scale, const at::Tensor& primary_bias,
                               const at::Tensor& cheap_weight, const at::Tensor& cheap_scale,
                               const at::Tensor& cheap_bias, int64_t out_channels, bool relu,
                               const std::optional<at::Tensor>& gate, c10::string_view gate_mode,
                               at::TensorList grads) {
  Geometry g = check_args(kBwdOp, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                          cheap_bias, out_channels, relu, gate, gate_mode);
  resolve_layout(g, x, grad_out);
  check_like_output(grad_out, x, g, kBwdOp, "grad_out");
  TORCH_CHECK(grads.size() == 8, kBwdOp, ": expected 8 tensors in grads (x, primary_weight, primary_scale, ",
              "primary_bias, cheap_weight, cheap_scale, cheap_bias, gate), got ", grads.size());
  const at::ScalarType dt = x.scalar_type(), acc = acc_type(dt);
  static const char* names[8] = {"grads[0] (x)",           "grads[1] (primary_weight)", "grads[2] (primary_scale)",
                                 "grads[3] (primary_bias)", "grads[4] (cheap_weight)",   "grads[5] (cheap_scale)",
                                 "grads[6] (cheap_bias)",   "grads[7] (gate)"};
  const at::Tensor* inputs[8] = {&x, &primary_weight, &primary_scale, &primary_bias,
                                 &cheap_weight, &cheap_scale, &cheap_bias, g.gated ? &*gate : nullptr};
  bool need[8];
  for (int i = 0; i < 8; ++i) {
    const at::Tensor& t = grads[i];
    need[i] = t.defined() && t.numel() > 0;
    if (!need[i]) continue;
    TORCH_CHECK(inputs[i] != nullptr, kBwdOp, ": ", names[i], " is not empty but there is no gate");
    const at::ScalarType want = (i == 2 || i == 3 || i == 5 || i == 6) ? acc : dt;
    TORCH_CHECK(t.device() == x.device(), kBwdOp, ": expected ", names[i], " on ", x.device(), ", got ", t.device());
    TORCH_CHECK(t.scalar_type() == want, kBwdOp, ": expected ", names[i], " of dtype ", want, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == inputs[i]->sizes(), kBwdOp, ": expected ", names[i], " of shape ", inputs[i]->sizes(),
                ", got ", t.sizes());
    if (i == 0) {
      const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
      TORCH_CHECK(t.is_contiguous(fmt), kBwdOp, ": expected ", names[i], " contiguous in ",
                  g.cl ? "channels_last" : "NCHW", " (x's and grad_out's memory format), got strides ", t.strides());
    } else {
      TORCH_CHECK(t.is_contiguous(), kBwdOp, ": expected ", names[i], " contiguous, got strides ", t.strides());
    }
  }
  Needs nd;
  nd.x = need[0];
  nd.w1 = need[1];
  nd.s1 = need[2];
  nd.b1 = need[3];
  nd.w2 = need[4];
  nd.s2 = need[5];
  nd.b2 = need[6];
  nd.gate = need[7];
  if (g.N == 0 || g.HW == 0) {
    for (int i = 1; i < 8; ++i)
      if (need[i]) grads[i].zero_();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_backward_cpu", [&] {
    backward_impl<scalar_t>(g, grad_out, x, primary_weight, primary_scale, primary_bias, cheap_weight, cheap_scale,
                            cheap_bias, gate, grads, nd);
  });
}

// the statistics kernels: stage 1 keeps the x1 channels only (z1), stage 2 every cheap channel (z2)
Geometry check_stats_args(const char* op, const at::Tensor& x, const at::Tensor& w1, const at::Tensor& s1,
                          const at::Tensor& b1, const at::Tensor& w2, bool relu, int64_t stage) {
  TORCH_CHECK(stage == 1 || stage == 2, op, ": expected stage 1 (statistics of z1 = conv1x1(x)) or 2 (of z2, the ",
              "cheap depthwise's output), got ", stage);
  Geometry g = check_common(op, x, w1, s1, b1, w2, relu);
  set_out_channels(g, stage == 1 ? g.init : g.init * (1 + g.rm1));
  return g;
}

// cheap_scale / cheap_bias stand-ins for Ctx::prepare (the statistics kernels have no second BatchNorm)
std::pair<at::Tensor, at::Tensor> unit_affine(const at::Tensor& s1, const Geometry& g) {
  const int64_t n = std::max<int64_t>(g.init * g.rm1, 1);
  return {at::ones({n}, s1.options()), at::zeros({n}, s1.options())};
}

void ghost_module_stats_cpu(const at::Tensor& x, const at::Tensor& primary_weight, const at::Tensor& primary_scale,
                            const at::Tensor& primary_bias, const at::Tensor& cheap_weight, bool relu, int64_t stage,
                            const at::Tensor& mean, const at::Tensor& var) {
  const Geometry g =
      check_stats_args(kStatsOp, x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage);
  const at::ScalarType acc = acc_type(x.scalar_type());
  const int64_t channels = stage == 1 ? g.n_x1 : g.n_cheap;
  check_param(mean, x, acc, kStatsOp, "mean", {channels});
  check_param(var, x, acc, kStatsOp, "var", {channels});
  if (g.N == 0 || g.HW == 0) {  // no values: NaN, as torch.var_mean of an empty tensor
    mean.fill_(std::numeric_limits<double>::quiet_NaN());
    var.fill_(std::numeric_limits<double>::quiet_NaN());
    return;
  }
  const auto unit = unit_affine(primary_scale, g);
  const at::Tensor& s2 = unit.first;
  const at::Tensor& b2 = unit.second;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_stats_cpu", [&] {
    stats_impl<scalar_t>(g, static_cast<int>(stage), x, primary_weight, primary_scale, primary_bias, cheap_weight,
                         s2, b2, mean, var);
  });
}

void ghost_module_stats_backward_cpu(const at::Tensor& x, const at::Tensor& primary_weight,
                                     const at::Tensor& primary_scale, const at::Tensor& primary_bias,
                                     const at::Tensor& cheap_weight, bool relu, int64_t stage,
                                     const at::Tensor& coef_a, const at::Tensor& coef_c, const at::Tensor& mean,
                                     at::TensorList grads) {
  Geometry g =
      check_stats_args(kStatsBwdOp, x, primary_weight, primary_scale, primary_bias, cheap_weight, relu, stage);
  const at::ScalarType dt = x.scalar_type(), acc = acc_type(dt);
  const int64_t channels = stage == 1 ? g.n_x1 : g.n_cheap;
  check_param(coef_a, x, acc, kStatsBwdOp, "coef_a", {channels});
  check_param(coef_c, x, acc, kStatsBwdOp, "coef_c", {channels});
  check_param(mean, x, acc, kStatsBwdOp, "mean", {channels});
  TORCH_CHECK(grads.size() == 5, kStatsBwdOp, ": expected 5 tensors in grads (x, primary_weight, primary_scale, ",
              "primary_bias, cheap_weight), got ", grads.size());
  static const char* names[5] = {"grads[0] (x)", "grads[1] (primary_weight)", "grads[2] (primary_scale)",
                                 "grads[3] (primary_bias)", "grads[4] (cheap_weight)"};
  const at::Tensor* inputs[5] = {&x, &primary_weight, &primary_scale, &primary_bias, &cheap_weight};
  if (grads[0].defined()) resolve_layout(g, x, grads[0]);
  bool need[5];
  for (int i = 0; i < 5; ++i) {
    const at::Tensor& t = grads[i];
    need[i] = t.defined() && t.numel() > 0;
    if (!need[i]) continue;
    TORCH_CHECK(stage == 2 || i < 2, kStatsBwdOp, ": stage 1 (z1 = conv1x1(x)) depends on x and primary_weight ",
                "only; expected ", names[i], " empty, got shape ", t.sizes());
    const at::ScalarType want = (i == 2 || i == 3) ? acc : dt;
    TORCH_CHECK(t.device() == x.device(), kStatsBwdOp, ": expected ", names[i], " on ", x.device(), ", got ",
                t.device());
    TORCH_CHECK(t.scalar_type() == want, kStatsBwdOp, ": expected ", names[i], " of dtype ", want, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.sizes() == inputs[i]->sizes(), kStatsBwdOp, ": expected ", names[i], " of shape ",
                inputs[i]->sizes(), ", got ", t.sizes());
    if (i == 0) {
      const auto fmt = g.cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
      TORCH_CHECK(t.is_contiguous(fmt), kStatsBwdOp, ": expected ", names[i], " contiguous in ",
                  g.cl ? "channels_last" : "NCHW", " (x's memory format), got strides ", t.strides());
    } else {
      TORCH_CHECK(t.is_contiguous(), kStatsBwdOp, ": expected ", names[i], " contiguous, got strides ",
                  t.strides());
    }
  }
  Needs nd;
  nd.x = need[0];
  nd.w1 = need[1];
  nd.s1 = need[2];
  nd.b1 = need[3];
  nd.w2 = need[4];
  if (g.N == 0 || g.HW == 0) {
    for (int i = 0; i < 5; ++i)
      if (need[i]) grads[i].zero_();
    return;
  }
  if (!(nd.primary() || nd.w2)) return;
  const auto unit = unit_affine(primary_scale, g);
  const at::Tensor& s2 = unit.first;
  const at::Tensor& b2 = unit.second;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghost_module_stats_backward_cpu", [&] {
    backward_impl<scalar_t>(g, at::Tensor(), x, primary_weight, primary_scale, primary_bias, cheap_weight, s2, b2,
                            std::nullopt, grads, nd, static_cast<int>(stage), &coef_a, &coef_c, &mean);
  });
}

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::ghost_module_forward_cpu), ghostfast::GhostModuleKernel>, "ghost_module_forward_cpu: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::ghost_module_backward_cpu), ghostfast::GhostModuleBackwardKernel>, "ghost_module_backward_cpu: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::ghost_module_stats_cpu), ghostfast::GhostModuleStatsKernel>, "ghost_module_stats_cpu: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::ghost_module_stats_backward_cpu), ghostfast::GhostModuleStatsBackwardKernel>, "ghost_module_stats_backward_cpu: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CPU, m) {
  m.impl("_ghost_module_kernel", &ghostfast::ghost_module_forward_cpu);
  m.impl("_ghost_module_backward_kernel", &ghostfast::ghost_module_backward_cpu);
  m.impl("_ghost_module_stats_kernel", &ghostfast::ghost_module_stats_cpu);
  m.impl("_ghost_module_stats_backward_kernel", &ghostfast::ghost_module_stats_backward_cpu);
}
