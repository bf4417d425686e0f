// Fused DFC attention on the CPU (schema and conventions: ../dfc.cpp; the spec: ghostfast/reference.py).
//
// Forward, one at::parallel_for over tasks (image, band of pooled gate rows, block of channels):
//   a = s3 * (W3 pool(x)) + b3     pooled rows of the band + 2 halo rows each side (clipped), pooled on load,
//                                  one register-blocked at::vec GEMM [C_blk x C_in] x [C_in x pixels]
//   b = s4 * (1x5 conv a) + b4     zero outside [0, WP) (the padding applies to the biased a)
//   z = s5 * (5x1 conv b) + b5     zero rows outside [0, HP)
//   out = sigmoid(z), written straight into `out` at the pooled resolution or upsampled (nearest / bilinear, the
//   source indices of upsample.h): a task writes the full-resolution rows whose lower source row it owns, so every
//   element of `out` is written exactly once. No intermediate full-size tensor; everything else is in per-task
//   scratch. Channels are independent after the 1x1 conv, so small batches split channels before rows (no halo).
// Backward, one parallel region over chunks of (image, band) tasks, all channels per task: the forward chain is
//   recomputed on the band +-4 pooled rows, then walked back: gz = U^T(grad) * g (1 - g), transposed 5x1, BN4,
//   transposed 1x5, BN3, then two GEMMs: grad_W3 += gy3 pooled(x)^T and grad_x = pool^T (W3^T gy3). Per-channel
//   sums and weight grads accumulate in a per-chunk partial row (owned pixels only), summed over the chunks in
//   chunk order: deterministic for a given thread count, no atomics.
// NCHW works per channel on compact planes (pitch WP, every stage one vector loop over the flattened pixels, the
// 1x5 padding by column masks); channels_last works on pixel-major scratch, one vector of channels at a time.
// Accumulation: float for float / half / bfloat16, double for double.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "common.h"
#include "kernel_signatures.h"
#include "upsample.h"

namespace ghostfast {
namespace {

constexpr const char* kFwdOp = "ghostfast::_dfc_kernel (CPU)";
constexpr const char* kBwdOp = "ghostfast::_dfc_backward_kernel (CPU)";

enum class Mode { kGate, kNearest, kBilinear };

Mode parse_mode(c10::string_view mode, const char* op) {
  const std::string m(mode.data(), mode.size());
  if (m == "gate") return Mode::kGate;
  if (m == "nearest") return Mode::kNearest;
  if (m == "bilinear") return Mode::kBilinear;
  TORCH_CHECK(false, op, ": expected mode 'gate', 'nearest' or 'bilinear', got '", m, "'");
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t v, int64_t m) { return ceil_div(v, m) * m; }

// ---------------------------------------------------------------------------------------------------------------
// Vector helpers
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
using Vec = at::vec::Vectorized<T>;

template <typename T>
inline Vec<T> vload(const T* p, int64_t n) {
  return n == Vec<T>::size() ? Vec<T>::loadu(p) : Vec<T>::loadu(p, n);
}

template <typename T>
inline void vstore(T* p, const Vec<T>& v, int64_t n) {
  if (n == Vec<T>::size()) {
    v.store(p);
  } else {
    v.store(p, n);
  }
}

// n (<= lanes) elements of x's dtype as a vector of the accumulation type; lanes past n are zero.
template <typename acc_t, typename scalar_t>
inline Vec<acc_t> load_as(const scalar_t* p, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    return vload(p, n);
  } else {
    alignas(64) acc_t tmp[Vec<acc_t>::size()];
    for (int64_t i = 0; i < Vec<acc_t>::size(); ++i) tmp[i] = i < n ? static_cast<acc_t>(p[i]) : acc_t(0);
    return Vec<acc_t>::loadu(tmp);
  }
}

template <typename acc_t, typename scalar_t>
inline void store_as(scalar_t* p, const Vec<acc_t>& v, int64_t n) {
  if constexpr (std::is_same_v<acc_t, scalar_t>) {
    vstore(p, v, n);
  } else {
    alignas(64) acc_t tmp[Vec<acc_t>::size()];
    v.store(tmp);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<scalar_t>(tmp[i]);
  }
}

// f(i, count) over [0, n) in steps of one vector; the last step may be partial (count < lanes).
template <typename T, typename F>
inline void vfor(int64_t n, const F& f) {
  constexpr int64_t kLanes = Vec<T>::size();
  for (int64_t i = 0; i < n; i += kLanes) f(i, std::min<int64_t>(kLanes, n - i));
}

template <typename T>
inline Vec<T> vsigmoid(const Vec<T>& z) {
  const Vec<T> one(T(1));
  return one / (one + z.neg().exp());
}

#if defined(CPU_CAPABILITY_AVX2)
// float: exp inlined (Cody-Waite reduction and the Cephes expf polynomial, about 1 ulp on the clamped range), so
// consecutive vectors overlap instead of serialising on a library call. exp(-z) is clamped to [2^-126, 2^127]:
// the gate saturates far earlier (|z| > 17 rounds to 0 or 1 up to 6e-39). NaN in, NaN out.
template <>
inline Vec<float> vsigmoid<float>(const Vec<float>& zv) {
  const __m256 z = zv;
  const __m256 t = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), z), _mm256_set1_ps(-87.0f)),
                                 _mm256_set1_ps(88.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), t);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 ex = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 g = _mm256_div_ps(one, _mm256_add_ps(one, ex));
  return _mm256_blendv_ps(g, z, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
}
#endif

template <typename T>
inline T hsum(const Vec<T>& v) {
  alignas(64) T tmp[Vec<T>::size()];
  v.store(tmp);
  T s(0);
  for (int64_t i = 0; i < Vec<T>::size(); ++i) s += tmp[i];
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// GEMM: C[m][n] (+)= sum_k A(m, k) * B[k][n], A read by strides (broadcast), B and C rows contiguous along n.
// N must be a multiple of the vector width (callers pad their buffers). Single-threaded: called inside tasks.
// ---------------------------------------------------------------------------------------------------------------

#define GF_UNROLL _Pragma("GCC unroll 16")

template <typename T, int MR, int NV>
inline void gemm_tile(int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb, T* C, int64_t ldc,
                      bool accumulate) {
  using V = Vec<T>;
  constexpr int64_t kLanes = V::size();
  V c[MR][NV];  // fully unrolled below, so the accumulators stay in registers
  GF_UNROLL for (int m = 0; m < MR; ++m) {
    GF_UNROLL for (int v = 0; v < NV; ++v) c[m][v] = accumulate ? V::loadu(C + m * ldc + v * kLanes) : V(T(0));
  }
  const T* a = A;
  const T* b = B;
  for (int64_t k = 0; k < K; ++k, a += sak, b += ldb) {
    V bv[NV];
    GF_UNROLL for (int v = 0; v < NV; ++v) bv[v] = V::loadu(b + v * kLanes);
    GF_UNROLL for (int m = 0; m < MR; ++m) {
      const V am(a[m * sam]);
      GF_UNROLL for (int v = 0; v < NV; ++v) c[m][v] = at::vec::fmadd(am, bv[v], c[m][v]);
    }
  }
  GF_UNROLL for (int m = 0; m < MR; ++m) {
    GF_UNROLL for (int v = 0; v < NV; ++v) c[m][v].store(C + m * ldc + v * kLanes);
  }
}

template <typename T, int NV>
inline void gemm_rows(int64_t M, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb, T* C,
                      int64_t ldc, bool accumulate) {
  constexpr int64_t MR = 6;  // 6 x 2 vectors: 12 accumulators, 2 loads and 6 broadcasts per 12 FMAs
  int64_t m = 0;
  for (; m + MR <= M; m += MR) {
    gemm_tile<T, MR, NV>(K, A + m * sam, sam, sak, B, ldb, C + m * ldc, ldc, accumulate);
  }
  const T* a = A + m * sam;
  T* c = C + m * ldc;
  switch (M - m) {
    case 5: gemm_tile<T, 5, NV>(K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
    case 4: gemm_tile<T, 4, NV>(K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
    case 3: gemm_tile<T, 3, NV>(K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
    case 2: gemm_tile<T, 2, NV>(K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
    case 1: gemm_tile<T, 1, NV>(K, a, sam, sak, B, ldb, c, ldc, accumulate); break;
    default: break;
  }
}

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const T* A, int64_t sam, int64_t sak, const T* B, int64_t ldb, T* C,
          int64_t ldc, bool accumulate) {
  constexpr int64_t kLanes = Vec<T>::size();
  constexpr int64_t KC = 256;  // a [KC x 2 vectors] panel of B stays in L1 while the M rows stream past it
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    if (!accumulate) {
      for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, T(0));
    }
    return;
  }
  const int64_t nfull = N / kLanes * kLanes, ntail = N - nfull;
  std::vector<T> bt, ct;  // the ragged last columns, through zero-padded copies
  if (ntail > 0) {
    bt.assign(std::min(KC, K) * kLanes, T(0));
    ct.assign(M * kLanes, T(0));
  }
  for (int64_t k0 = 0; k0 < K; k0 += KC) {
    const int64_t kc = std::min(KC, K - k0);
    const bool acc = accumulate || k0 > 0;
    const T* a = A + k0 * sak;
    const T* b = B + k0 * ldb;
    int64_t n = 0;
    for (; n + 2 * kLanes <= nfull; n += 2 * kLanes) gemm_rows<T, 2>(M, kc, a, sam, sak, b + n, ldb, C + n, ldc, acc);
    for (; n < nfull; n += kLanes) gemm_rows<T, 1>(M, kc, a, sam, sak, b + n, ldb, C + n, ldc, acc);
    if (ntail > 0) {
      for (int64_t k = 0; k < kc; ++k) std::copy(b + k * ldb + nfull, b + k * ldb + N, bt.data() + k * kLanes);
      if (acc) {
        for (int64_t m = 0; m < M; ++m) std::copy(C + m * ldc + nfull, C + m * ldc + N, ct.data() + m * kLanes);
      }
      gemm_rows<T, 1>(M, kc, a, sam, sak, bt.data(), kLanes, ct.data(), kLanes, acc);
      for (int64_t m = 0; m < M; ++m) {
        std::copy(ct.data() + m * kLanes, ct.data() + m * kLanes + ntail, C + m * ldc + nfull);
      }
    }
  }
}

// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols (8 x 8 register blocks where at::vec has them).
template <typename T>
void transpose(const T* src, int64_t rows, int64_t cols, int64_t lds, T* dst, int64_t ldd) {
  constexpr int kB = 8;
  int64_t i = 0;
  for (; i + kB <= rows; i += kB) {
    int64_t j = 0;
    for (; j + kB <= cols; j += kB) at::vec::transpose_mxn<T, kB, kB>(src + i * lds + j, lds, dst + j * ldd + i, ldd);
    if (j < cols) {
      at::vec::transpose_mxn<T>(src + i * lds + j, lds, dst + j * ldd + i, ldd, kB, static_cast<int>(cols - j));
    }
  }
  for (; i < rows; ++i) {
    for (int64_t j = 0; j < cols; ++j) dst[j * ldd + i] = src[i * lds + j];
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Per-task scratch
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct Buf {
  std::vector<T> v;
  T* get(int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(n);
    return v.data();
  }
};

template <typename T>
struct Scratch {
  Buf<T> p, y, b, g, gc, o, row, a3, y4, a4, gy5, gy4, gy3, gg, pt, gp;
};

// Bytes of scratch a task aims for: a band's rows are capped so it stays in L2.
constexpr int64_t kFwdBudget = 768 << 10;
constexpr int64_t kBwdBudget = 1536 << 10;

// ---------------------------------------------------------------------------------------------------------------
// The kernel object: converted parameters, upsample tables, forward and backward task bodies.
// ---------------------------------------------------------------------------------------------------------------

template <typename scalar_t>
struct DfcCpu {
  using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
  using V = Vec<acc_t>;
  static constexpr int64_t kLanes = V::size();

  int64_t N, Cin, C, H, W, HP, WP, Cp, Cinp;
  int64_t Ho, Wo;  // output / incoming-grad spatial size
  Mode mode;
  bool cl;
  const scalar_t* x;

  const acc_t* w3;  // [C][Cin]: the tensor itself, or w3_store for float16 / bfloat16
  std::vector<acc_t> w3_store;
  // channels_last: the 1x1 conv is a GEMM against B = W3^T [Cin][Cp], transposed once per call, when C_in <= the
  // pooled pixels; otherwise (small images, many input channels) W3 x pooled^T, and the small result is transposed.
  bool use_wt = false;
  std::vector<acc_t> w3t;
  std::vector<acc_t> hw, vw;    // [C][5]
  std::vector<acc_t> hwt, vwt;  // [5][Cp], zero padded
  std::vector<acc_t> s3, b3, s4, b4, s5, b5;  // [Cp], zero padded
  // NCHW: the 1x5 conv runs on compact rows (pitch WP) flattened; mask[t][q] zeroes the taps that cross a row end.
  std::vector<acc_t> mask[5];

  // Forward: per output row, the lowest (owner) and highest gate row it reads.
  std::vector<int64_t> row_lo, row_hi;
  std::vector<int64_t> near_h, near_w;  // nearest source indices
  std::vector<LinearSource<acc_t>> lin_h;
  std::vector<int64_t> bw0, bw1;  // bilinear column sources and weights
  std::vector<acc_t> bl0, bl1;
  // Backward: the upsample's adjoint as lists per pooled index: (full-res index, weight), CSR.
  std::vector<int64_t> adj_h_ptr, adj_h_idx, adj_w_ptr, adj_w_idx;
  std::vector<acc_t> adj_h_wt, adj_w_wt;

  DfcCpu(const at::Tensor& xt, const at::Tensor* params, Mode mode_, bool cl_) : mode(mode_), cl(cl_) {
    N = xt.size(0);
    Cin = xt.size(1);
    H = xt.size(2);
    W = xt.size(3);
    C = params[0].size(0);
    HP = H / 2;
    WP = W / 2;
    Cp = round_up(std::max<int64_t>(C, 1), kLanes);
    Cinp = round_up(std::max<int64_t>(Cin, 1), kLanes);
    Ho = mode == Mode::kGate ? HP : H;
    Wo = mode == Mode::kGate ? WP : W;
    x = xt.data_ptr<scalar_t>();

    const scalar_t* cw = params[0].data_ptr<scalar_t>();
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      w3 = cw;
    } else {
      w3_store.resize(C * Cin);
      for (int64_t i = 0; i < C * Cin; ++i) w3_store[i] = static_cast<acc_t>(cw[i]);
      w3 = w3_store.data();
    }
    if (cl && Cin <= N * HP * WP) {
      use_wt = true;
      w3t.assign(Cin * Cp, acc_t(0));
      transpose(w3, C, Cin, Cin, w3t.data(), Cp);
    }
    const scalar_t* hwp = params[3].data_ptr<scalar_t>();
    const scalar_t* vwp = params[6].data_ptr<scalar_t>();
    hw.resize(C * 5);
    vw.resize(C * 5);
    hwt.assign(5 * Cp, acc_t(0));
    vwt.assign(5 * Cp, acc_t(0));
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t t = 0; t < 5; ++t) {
        hw[c * 5 + t] = hwt[t * Cp + c] = static_cast<acc_t>(hwp[c * 5 + t]);
        vw[c * 5 + t] = vwt[t * Cp + c] = static_cast<acc_t>(vwp[c * 5 + t]);
      }
    }
    auto vec = [&](const at::Tensor& t, std::vector<acc_t>& v) {
      v.assign(Cp, acc_t(0));
      std::copy(t.data_ptr<acc_t>(), t.data_ptr<acc_t>() + C, v.begin());
    };
    vec(params[1], s3);
    vec(params[2], b3);
    vec(params[4], s4);
    vec(params[5], b4);
    vec(params[7], s5);
    vec(params[8], b5);
    if (!cl) {
      const int64_t len = (HP + 8) * WP + kLanes;
      for (int64_t t = 0; t < 5; ++t) {
        if (t == 2) continue;
        mask[t].resize(len);
        for (int64_t q = 0; q < len; ++q) {
          const int64_t col = q % WP + t - 2;
          mask[t][q] = (col >= 0 && col < WP) ? acc_t(1) : acc_t(0);
        }
      }
    }

    if (mode == Mode::kNearest) {
      near_h.resize(H);
      near_w.resize(W);
      for (int64_t i = 0; i < H; ++i) near_h[i] = nearest_source(i, HP, H);
      for (int64_t i = 0; i < W; ++i) near_w[i] = nearest_source(i, WP, W);
      row_lo = near_h;
      row_hi = near_h;
    } else if (mode == Mode::kBilinear) {
      lin_h.resize(H);
      row_lo.resize(H);
      row_hi.resize(H);
      for (int64_t i = 0; i < H; ++i) {
        lin_h[i] = linear_source<acc_t>(i, HP, H);
        row_lo[i] = lin_h[i].i0;
        row_hi[i] = lin_h[i].i1;
      }
      bw0.resize(W);
      bw1.resize(W);
      bl0.resize(W);
      bl1.resize(W);
      for (int64_t i = 0; i < W; ++i) {
        const auto s = linear_source<acc_t>(i, WP, W);
        bw0[i] = s.i0;
        bw1[i] = s.i1;
        bl1[i] = s.lambda;
        bl0[i] = acc_t(1) - s.lambda;
      }
    }
  }

  void build_adjoint() {
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

  // Gate rows [g0, g1) and output rows [o0, o1) of the band owning gate rows [r0, r1); false if it owns none.
  bool plan_rows(int64_t r0, int64_t r1, int64_t& g0, int64_t& g1, int64_t& o0, int64_t& o1) const {
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

  // ---- pooling: P[k][(r - a0) * WP + w] (NCHW, row pitch ldp, zero to ldp) or P[(r - a0) * WP + w][k] (pitch Cinp)

  void pool_nchw(int64_t n, int64_t a0, int64_t a1, acc_t* P, int64_t ldp) const {
    const int64_t npix = (a1 - a0) * WP;
    for (int64_t k = 0; k < Cin; ++k) {
      acc_t* pk = P + k * ldp;
      for (int64_t r = a0; r < a1; ++r) {
        const scalar_t* x0 = x + ((n * Cin + k) * H + 2 * r) * W;
        const scalar_t* x1 = x0 + W;
        acc_t* d = pk + (r - a0) * WP;
        for (int64_t w = 0; w < WP; ++w) {
          d[w] = acc_t(0.25) * ((static_cast<acc_t>(x0[2 * w]) + static_cast<acc_t>(x0[2 * w + 1])) +
                                (static_cast<acc_t>(x1[2 * w]) + static_cast<acc_t>(x1[2 * w + 1])));
        }
      }
      std::fill(pk + npix, pk + ldp, acc_t(0));
    }
  }

  void pool_cl(int64_t n, int64_t a0, int64_t a1, acc_t* P) const {
    const V quarter(acc_t(0.25));
    for (int64_t r = a0; r < a1; ++r) {
      for (int64_t w = 0; w < WP; ++w) {
        const scalar_t* p00 = x + ((n * H + 2 * r) * W + 2 * w) * Cin;
        const scalar_t* p01 = p00 + Cin;
        const scalar_t* p10 = p00 + W * Cin;
        const scalar_t* p11 = p10 + Cin;
        acc_t* d = P + ((r - a0) * WP + w) * Cinp;
        vfor<acc_t>(Cin, [&](int64_t i, int64_t m) {
          const V v = (load_as<acc_t>(p00 + i, m) + load_as<acc_t>(p01 + i, m)) +
                      (load_as<acc_t>(p10 + i, m) + load_as<acc_t>(p11 + i, m));
          vstore(d + i, v * quarter, m);
        });
        std::fill(d + Cin, d + Cinp, acc_t(0));
      }
    }
  }

  // channels_last: Y[p][j] = y3 of channel c0 + j at pooled pixel p (pitch cbp, channels cb..cbp zero), from
  // P [npix][Cinp]: one GEMM against W3^T, or W3 x P^T and a transpose of the (small) result.
  void conv1x1_cl(const acc_t* P, int64_t npix, int64_t c0, int64_t cb, int64_t cbp, acc_t* Y,
                  Scratch<acc_t>& s) const {
    if (use_wt) {
      gemm<acc_t>(npix, cbp, Cin, P, Cinp, 1, w3t.data() + c0, Cp, Y, cbp, false);
      return;
    }
    const int64_t ldq = round_up(npix, kLanes);
    acc_t* PT = s.pt.get(Cin * ldq);
    transpose(P, npix, Cin, Cinp, PT, ldq);
    for (int64_t k = 0; k < Cin; ++k) std::fill(PT + k * ldq + npix, PT + (k + 1) * ldq, acc_t(0));
    acc_t* YT = s.gp.get(cb * ldq);
    gemm<acc_t>(cb, ldq, Cin, w3 + c0 * Cin, Cin, 1, PT, ldq, YT, ldq, false);
    transpose(YT, cb, npix, ldq, Y, cbp);
    if (cb < cbp) {
      for (int64_t p = 0; p < npix; ++p) std::fill(Y + p * cbp + cb, Y + (p + 1) * cbp, acc_t(0));
    }
  }

  // dst[2w] = dst[2w + 1] = scale * src[w] for w < n
  static void dup2(const acc_t* src, acc_t scale, scalar_t* dst, int64_t n) {
    int64_t w = 0;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      const V s(scale);
      for (; w + kLanes <= n; w += kLanes) {
        const V v = V::loadu(src + w) * s;
        const auto pr = at::vec::interleave2(v, v);
        pr.first.store(dst + 2 * w);
        pr.second.store(dst + 2 * w + kLanes);
      }
    }
    for (; w < n; ++w) dst[2 * w] = dst[2 * w + 1] = static_cast<scalar_t>(scale * src[w]);
  }

  static void put(scalar_t* dst, const acc_t* src, int64_t n) {
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      std::memcpy(dst, src, n * sizeof(acc_t));
    } else {
      for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
    }
  }

  static void copy_vec(scalar_t* dst, const acc_t* src, int64_t n) {
    int64_t i = 0;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      for (; i + kLanes <= n; i += kLanes) V::loadu(src + i).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }

  // One gate row (WP values, readable from g[-kLanes] to g[WP + kLanes]) upsampled along W into d[0, W). Vector
  // stores may run up to 2 vectors past d + W: callers give room and fill rows in increasing order.
  void col_upsample(const acc_t* g, acc_t* d) const {
    const bool twice = W == 2 * WP;
    if (mode == Mode::kNearest) {
      if (twice) {
        for (int64_t w = 0; w < WP; w += kLanes) {
          const V v = V::loadu(g + w);
          const auto pr = at::vec::interleave2(v, v);
          pr.first.store(d + 2 * w);
          pr.second.store(d + 2 * w + kLanes);
        }
      } else {
        for (int64_t ow = 0; ow < W; ++ow) d[ow] = g[near_w[ow]];
      }
      return;
    }
    if (twice && WP >= 2) {
      // scale 1/2: out[2w] = 1/4 g[w - 1] + 3/4 g[w], out[2w + 1] = 3/4 g[w] + 1/4 g[w + 1]; the two border
      // columns (clamped sources) from the tables.
      const V q1(acc_t(0.25)), q3(acc_t(0.75));
      for (int64_t w = 0; w < WP; w += kLanes) {
        const V v = V::loadu(g + w);
        const V ev = q1 * V::loadu(g + w - 1) + q3 * v;
        const V od = q3 * v + q1 * V::loadu(g + w + 1);
        const auto pr = at::vec::interleave2(ev, od);
        pr.first.store(d + 2 * w);
        pr.second.store(d + 2 * w + kLanes);
      }
      d[0] = bl0[0] * g[bw0[0]] + bl1[0] * g[bw1[0]];
      d[W - 1] = bl0[W - 1] * g[bw0[W - 1]] + bl1[W - 1] * g[bw1[W - 1]];
      return;
    }
    for (int64_t ow = 0; ow < W; ++ow) d[ow] = bl0[ow] * g[bw0[ow]] + bl1[ow] * g[bw1[ow]];
  }

  // =============================================================================================================
  // Forward
  // =============================================================================================================

  // NCHW: per channel, compact planes (pitch WP) over the band's rows, every stage one flattened vector loop.
  void fwd_nchw(scalar_t* out, int64_t n, int64_t c0, int64_t c1, int64_t r0, int64_t r1, Scratch<acc_t>& s) const {
    int64_t g0, g1, o0, o1;
    if (!plan_rows(r0, r1, g0, g1, o0, o1)) return;
    const int64_t a0 = std::max<int64_t>(g0 - 2, 0), a1 = std::min<int64_t>(g1 + 2, HP);
    const int64_t npix = (a1 - a0) * WP, ldp = round_up(npix, kLanes);
    const int64_t cb = c1 - c0, ng = g1 - g0, nbe = ng + 4, ea = a0 - (g0 - 2);

    acc_t* P = s.p.get(Cin * ldp);
    pool_nchw(n, a0, a1, P, ldp);
    acc_t* Y = s.y.get(cb * ldp);
    gemm<acc_t>(cb, ldp, Cin, w3 + c0 * Cin, Cin, 1, P, ldp, Y, ldp, false);

    acc_t* A3 = s.a3.get(npix + 4);  // a3 of rows [a0, a1) at A3 + 2; two zeros each side
    A3[0] = A3[1] = A3[npix + 2] = A3[npix + 3] = acc_t(0);
    acc_t* B = s.b.get(nbe * WP);  // b rows [g0 - 2, g1 + 2); zero outside the image (never written)
    std::fill(B, B + nbe * WP, acc_t(0));
    acc_t* Gbuf = s.g.get(ng * WP + 4 * kLanes);  // gate rows [g0, g1) at G, readable a vector either side
    std::fill(Gbuf, Gbuf + ng * WP + 4 * kLanes, acc_t(0));
    acc_t* G = Gbuf + 2 * kLanes;
    acc_t* Bi = B + ea * WP;
    const acc_t* m0 = mask[0].data();
    const acc_t* m1 = mask[1].data();
    const acc_t* m3 = mask[3].data();
    const acc_t* m4 = mask[4].data();

    for (int64_t c = c0; c < c1; ++c) {
      const acc_t* yc = Y + (c - c0) * ldp;
      const acc_t* hk = hw.data() + c * 5;
      const acc_t* vk = vw.data() + c * 5;
      const V s3c(s3[c]), b3c(b3[c]), s4c(s4[c]), b4c(b4[c]), s5c(s5[c]), b5c(b5[c]);
      const V h0(hk[0]), h1(hk[1]), h2(hk[2]), h3(hk[3]), h4(hk[4]);
      const V v0(vk[0]), v1(vk[1]), v2(vk[2]), v3(vk[3]), v4(vk[4]);
      vfor<acc_t>(npix, [&](int64_t i, int64_t m) { vstore(A3 + 2 + i, at::vec::fmadd(s3c, vload(yc + i, m), b3c), m); });
      vfor<acc_t>(npix, [&](int64_t i, int64_t m) {
        V acc = h2 * vload(A3 + i + 2, m);
        acc = at::vec::fmadd(h0, vload(m0 + i, m) * vload(A3 + i, m), acc);
        acc = at::vec::fmadd(h1, vload(m1 + i, m) * vload(A3 + i + 1, m), acc);
        acc = at::vec::fmadd(h3, vload(m3 + i, m) * vload(A3 + i + 3, m), acc);
        acc = at::vec::fmadd(h4, vload(m4 + i, m) * vload(A3 + i + 4, m), acc);
        vstore(Bi + i, at::vec::fmadd(s4c, acc, b4c), m);
      });
      vfor<acc_t>(ng * WP, [&](int64_t i, int64_t m) {
        V acc = v0 * vload(B + i, m);
        acc = at::vec::fmadd(v1, vload(B + WP + i, m), acc);
        acc = at::vec::fmadd(v2, vload(B + 2 * WP + i, m), acc);
        acc = at::vec::fmadd(v3, vload(B + 3 * WP + i, m), acc);
        acc = at::vec::fmadd(v4, vload(B + 4 * WP + i, m), acc);
        vstore(G + i, vsigmoid(at::vec::fmadd(s5c, acc, b5c)), m);
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
      auto st = [&](acc_t* p, const V& v, const acc_t* end) {
        const int64_t room = end - p;
        if (room >= kLanes) {
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
          for (int64_t w = 0; w < WP; w += kLanes) {
            const V v = V::loadu(g + w);
            const auto pr = at::vec::interleave2(v, v);
            for (int64_t r = oh; r < oe; ++r) {
              acc_t* d = d0 + (r - o0) * W;
              st(d + 2 * w, pr.first, d + W);
              st(d + 2 * w + kLanes, pr.second, d + W);
            }
          }
          oh = oe;
        }
      } else {
        // Upsample along W once per gate row, then along H.
        acc_t* Gc = s.gc.get(ng * W + 3 * kLanes);
        for (int64_t gi = 0; gi < ng; ++gi) col_upsample(G + gi * WP, Gc + gi * W);
        for (int64_t oh = o0; oh < o1; ++oh) {
          acc_t* d = d0 + (oh - o0) * W;
          if (mode == Mode::kNearest) {
            const acc_t* src = Gc + (near_h[oh] - g0) * W;
            for (int64_t i = 0; i < W; i += kLanes) st(d + i, V::loadu(src + i), d + W);
          } else {
            const auto& L = lin_h[oh];
            const acc_t* ga = Gc + (L.i0 - g0) * W;
            const acc_t* gb = Gc + (L.i1 - g0) * W;
            const V l0(acc_t(1) - L.lambda), l1(L.lambda);
            for (int64_t i = 0; i < W; i += kLanes) st(d + i, l0 * V::loadu(ga + i) + l1 * V::loadu(gb + i), d + W);
          }
        }
      }
      if constexpr (!std::is_same_v<acc_t, scalar_t>) put(oc + o0 * W, d0, no * W);
    }
  }

  // channels_last: one vector of channels at a time through zero-padded stencil buffers (fixed 5 taps), the gate
  // of the whole channel block kept pixel-major so the output is written pixel by pixel.
  void fwd_cl(scalar_t* out, int64_t n, int64_t c0, int64_t c1, int64_t r0, int64_t r1, Scratch<acc_t>& s) const {
    int64_t g0, g1, o0, o1;
    if (!plan_rows(r0, r1, g0, g1, o0, o1)) return;
    const int64_t a0 = std::max<int64_t>(g0 - 2, 0), a1 = std::min<int64_t>(g1 + 2, HP);
    const int64_t na = a1 - a0, npix = na * WP;
    const int64_t cb = c1 - c0, cbp = round_up(cb, kLanes);
    const int64_t wpp = WP + 4, ng = g1 - g0, nbe = ng + 4, ea = a0 - (g0 - 2);

    acc_t* P = s.p.get(npix * Cinp);
    pool_cl(n, a0, a1, P);
    acc_t* Y = s.y.get(npix * cbp);
    conv1x1_cl(P, npix, c0, cb, cbp, Y, s);
    acc_t* A3 = s.a3.get(na * wpp * kLanes);  // a3 rows [a0, a1), 2 zero columns each side
    acc_t* B = s.b.get(nbe * WP * kLanes);    // b rows [g0 - 2, g1 + 2), zero outside the image
    std::fill(A3, A3 + na * wpp * kLanes, acc_t(0));
    std::fill(B, B + nbe * WP * kLanes, acc_t(0));
    acc_t* G = s.g.get(ng * WP * cbp);

    for (int64_t j = 0; j < cbp; j += kLanes) {
      const int64_t c = c0 + j;
      const V s3v = V::loadu(s3.data() + c), b3v = V::loadu(b3.data() + c), s4v = V::loadu(s4.data() + c);
      const V b4v = V::loadu(b4.data() + c), s5v = V::loadu(s5.data() + c), b5v = V::loadu(b5.data() + c);
      V hv[5], vv[5];
      for (int t = 0; t < 5; ++t) {
        hv[t] = V::loadu(hwt.data() + t * Cp + c);
        vv[t] = V::loadu(vwt.data() + t * Cp + c);
      }
      for (int64_t r = 0; r < na; ++r) {
        for (int64_t w = 0; w < WP; ++w) {
          at::vec::fmadd(s3v, V::loadu(Y + (r * WP + w) * cbp + j), b3v).store(A3 + (r * wpp + w + 2) * kLanes);
        }
      }
      for (int64_t r = 0; r < na; ++r) {
        const acc_t* a = A3 + r * wpp * kLanes;
        acc_t* b = B + (ea + r) * WP * kLanes;
        for (int64_t w = 0; w < WP; ++w) {
          V acc = hv[0] * V::loadu(a + w * kLanes);
          for (int t = 1; t < 5; ++t) acc = at::vec::fmadd(hv[t], V::loadu(a + (w + t) * kLanes), acc);
          at::vec::fmadd(s4v, acc, b4v).store(b + w * kLanes);
        }
      }
      for (int64_t gi = 0; gi < ng; ++gi) {
        for (int64_t w = 0; w < WP; ++w) {
          const acc_t* b = B + (gi * WP + w) * kLanes;
          V acc = vv[0] * V::loadu(b);
          for (int t = 1; t < 5; ++t) acc = at::vec::fmadd(vv[t], V::loadu(b + t * WP * kLanes), acc);
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
        const V h0(acc_t(1) - L.lambda), h1(L.lambda);
        scalar_t* orow = out + (n * H + oh) * W * C + c0;
        for (int64_t ow = 0; ow < W; ++ow) {
          const int64_t i0 = bw0[ow] * cbp, i1 = bw1[ow] * cbp;
          const V w0(bl0[ow]), w1(bl1[ow]);
          scalar_t* dst = orow + ow * C;
          vfor<acc_t>(cb, [&](int64_t j, int64_t m) {
            // The association of PyTorch's upsample_bilinear2d.
            const V v = h0 * (w0 * V::loadu(ga + i0 + j) + w1 * V::loadu(ga + i1 + j)) +
                        h1 * (w0 * V::loadu(gb + i0 + j) + w1 * V::loadu(gb + i1 + j));
            store_as<acc_t>(dst + j, v, m);
          });
        }
      }
    }
  }

  void forward(scalar_t* out) const {
    if (N == 0 || C == 0) return;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t gran = cl ? kLanes : 4;  // channel-block granularity: one vector (channels_last) or one GEMM tile
    const int64_t row_bytes = (Cinp + 2 * Cp) * WP * static_cast<int64_t>(sizeof(acc_t));
    const int64_t cap_rows = std::max<int64_t>(8, kFwdBudget / std::max<int64_t>(row_bytes, 1));
    int64_t nb = std::min<int64_t>(HP, ceil_div(HP, cap_rows));
    const int64_t units = ceil_div(C, gran);
    int64_t ncb = 1;
    if (N * nb < threads) {
      // Split channels first (no halo to recompute), then rows.
      ncb = std::min(units, ceil_div(threads, N * nb));
      if (N * nb * ncb < threads) nb = std::min<int64_t>(HP, ceil_div(threads, N * ncb));
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

  // =============================================================================================================
  // Backward
  // =============================================================================================================
  // Partial row layout (per chunk): [0, 6 Cp): sums of s3, b3, s4, b4, s5, b5; [6 Cp, 11 Cp): h taps [5][Cp];
  // [11 Cp, 16 Cp): v taps [5][Cp]; then grad_W3 [C][Cinp] when needed.

  int64_t part_len(bool need_w3) const { return 16 * Cp + (need_w3 ? C * Cinp : 0); }

  // gg = U^T(grad) on pooled row r of one channel plane (NCHW): rows first (vectors along W), then columns.
  // R: W + 2 vectors of scratch.
  void gather_row_nchw(const scalar_t* gplane, int64_t r, acc_t* GG, acc_t* R) const {
    std::fill(R, R + W, acc_t(0));
    for (int64_t j = adj_h_ptr[r]; j < adj_h_ptr[r + 1]; ++j) {
      const scalar_t* gr = gplane + adj_h_idx[j] * W;
      const V wt(adj_h_wt[j]);
      vfor<acc_t>(W, [&](int64_t i, int64_t m) {
        vstore(R + i, at::vec::fmadd(wt, load_as<acc_t>(gr + i, m), vload(R + i, m)), m);
      });
    }
    if (mode == Mode::kNearest && W == 2 * WP) {
      vfor<acc_t>(WP, [&](int64_t w, int64_t m) {
        const auto pr = at::vec::deinterleave2(V::loadu(R + 2 * w), V::loadu(R + 2 * w + kLanes));
        vstore(GG + w, pr.first + pr.second, m);
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
  void bwd_nchw(const scalar_t* grad, scalar_t* gx, bool need_x, bool need_w3, int64_t n, int64_t r0, int64_t r1,
                Scratch<acc_t>& s, acc_t* part) const {
    const int64_t a0 = std::max<int64_t>(r0 - 4, 0), a1 = std::min<int64_t>(r1 + 4, HP);
    const int64_t q0 = std::max<int64_t>(r0 - 2, 0), q1 = std::min<int64_t>(r1 + 2, HP);
    const int64_t e0 = r0 - 4, ne = r1 - r0 + 8;  // extended rows [e0, e0 + ne), zero outside the image
    const int64_t npix = (a1 - a0) * WP, ldp = round_up(npix, kLanes);
    const int64_t no = r1 - r0, npo = no * WP, ldo = round_up(npo, kLanes);
    const int64_t oa = (r0 - a0) * WP;  // the owned rows inside the [a0, a1) planes

    acc_t* P = s.p.get(Cin * ldp);
    pool_nchw(n, a0, a1, P, ldp);
    acc_t* Y3 = s.y.get(C * ldp);
    gemm<acc_t>(C, ldp, Cin, w3, Cin, 1, P, ldp, Y3, ldp, false);
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
    acc_t* R = s.row.get(W + 2 * kLanes);
    std::fill(R, R + W + 2 * kLanes, acc_t(0));
    const acc_t* mk[5] = {mask[0].data(), mask[1].data(), nullptr, mask[3].data(), mask[4].data()};
    const scalar_t* gbase = grad + n * C * Ho * Wo;
    acc_t* A4i = A4e + (a0 - e0) * WP;
    const int64_t gq = (q0 - e0) * WP;  // GG[0] in extended coordinates

    for (int64_t c = 0; c < C; ++c) {
      const acc_t* y3c = Y3 + c * ldp;
      const acc_t* hk = hw.data() + c * 5;
      const acc_t* vk = vw.data() + c * 5;
      const V s3c(s3[c]), b3c(b3[c]), s4c(s4[c]), b4c(b4[c]), s5c(s5[c]), b5c(b5[c]);
      const V one(acc_t(1));
      V hv[5], vv[5];
      for (int t = 0; t < 5; ++t) {
        hv[t] = V(hk[t]);
        vv[t] = V(vk[t]);
      }
      // ---- forward recompute on rows [a0, a1)
      vfor<acc_t>(npix, [&](int64_t i, int64_t m) { vstore(A3 + 2 + i, at::vec::fmadd(s3c, vload(y3c + i, m), b3c), m); });
      vfor<acc_t>(npix, [&](int64_t i, int64_t m) {
        V acc = hv[2] * vload(A3 + i + 2, m);
        for (int t : {0, 1, 3, 4}) acc = at::vec::fmadd(hv[t], vload(mk[t] + i, m) * vload(A3 + i + t, m), acc);
        vstore(Y4 + i, acc, m);
        vstore(A4i + i, at::vec::fmadd(s4c, acc, b4c), m);
      });
      // ---- gg on rows [q0, q1)
      const scalar_t* gplane = gbase + c * Ho * Wo;
      if (mode == Mode::kGate) {
        vfor<acc_t>((q1 - q0) * WP, [&](int64_t i, int64_t m) { vstore(GG + i, load_as<acc_t>(gplane + q0 * WP + i, m), m); });
      } else {
        for (int64_t r = q0; r < q1; ++r) gather_row_nchw(gplane, r, GG + (r - q0) * WP, R);
      }
      // ---- y5, sigmoid, BN5 on rows [q0, q1); sums over the owned rows
      V as5(acc_t(0)), ab5(acc_t(0));
      auto stage5 = [&](int64_t lo, int64_t hi, bool own) {
        vfor<acc_t>(hi - lo, [&](int64_t j, int64_t m) {
          const int64_t i = lo + j;
          V y5 = vv[0] * vload(A4e + i - 2 * WP, m);
          for (int t = 1; t < 5; ++t) y5 = at::vec::fmadd(vv[t], vload(A4e + i + (t - 2) * WP, m), y5);
          const V g = vsigmoid(at::vec::fmadd(s5c, y5, b5c));
          const V gz = vload(GG + i - gq, m) * g * (one - g);
          if (own) {
            as5 = at::vec::fmadd(gz, y5, as5);
            ab5 = ab5 + gz;
          }
          vstore(GY5e + i, gz * s5c, m);
        });
      };
      stage5(gq, 4 * WP, false);
      stage5(4 * WP, (4 + no) * WP, true);
      stage5((4 + no) * WP, (q1 - e0) * WP, false);
      // ---- owned rows: 5x1 transposed, BN4, then 1x5 transposed, BN3
      V as4(acc_t(0)), ab4(acc_t(0)), as3(acc_t(0)), ab3(acc_t(0));
      V ah[5], av[5];
      for (int t = 0; t < 5; ++t) ah[t] = av[t] = V(acc_t(0));
      vfor<acc_t>(npo, [&](int64_t j, int64_t m) {
        const int64_t i = 4 * WP + j;
        const V gy5 = vload(GY5e + i, m);
        for (int t = 0; t < 5; ++t) av[t] = at::vec::fmadd(gy5, vload(A4e + i + (t - 2) * WP, m), av[t]);
        V ga4 = vv[0] * vload(GY5e + i + 2 * WP, m);
        for (int t = 1; t < 5; ++t) ga4 = at::vec::fmadd(vv[t], vload(GY5e + i - (t - 2) * WP, m), ga4);
        as4 = at::vec::fmadd(ga4, vload(Y4 + oa + j, m), as4);
        ab4 = ab4 + ga4;
        vstore(GY4 + 2 + j, ga4 * s4c, m);
      });
      acc_t* gy3c = GY3 ? GY3 + c * ldo : nullptr;
      vfor<acc_t>(npo, [&](int64_t j, int64_t m) {
        const V gy4 = vload(GY4 + 2 + j, m);
        ah[2] = at::vec::fmadd(gy4, vload(A3 + 2 + oa + j, m), ah[2]);
        V ga3 = hv[2] * gy4;
        for (int t : {0, 1, 3, 4}) {
          // a3 at column w + t - 2; gy4 at column w - t + 2 (mask 4 - t)
          ah[t] = at::vec::fmadd(gy4, vload(mk[t] + j, m) * vload(A3 + oa + j + t, m), ah[t]);
          ga3 = at::vec::fmadd(hv[t], vload(mk[4 - t] + j, m) * vload(GY4 + j + 4 - t, m), ga3);
        }
        as3 = at::vec::fmadd(ga3, vload(y3c + oa + j, m), as3);
        ab3 = ab3 + ga3;
        if (gy3c) vstore(gy3c + j, ga3 * s3c, m);
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
      gemm<acc_t>(C, Cinp, npo, GY3, ldo, 1, PT, Cinp, part + 16 * Cp, Cinp, true);
    }
    if (need_x) {
      acc_t* GP = s.gp.get(Cin * ldo);
      gemm<acc_t>(Cin, ldo, C, w3, 1, Cin, GY3, ldo, GP, ldo, false);
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
  void gather_pix_cl(const scalar_t* gimg, int64_t r, int64_t w, int64_t c0, int64_t cbp, acc_t* GG) const {
    const int64_t cv = std::min(C - c0, cbp);
    auto cnt = [&](int64_t j) { return std::max<int64_t>(0, std::min<int64_t>(kLanes, cv - j)); };
    if (mode == Mode::kGate) {
      const scalar_t* src = gimg + (r * WP + w) * C + c0;
      for (int64_t j = 0; j < cbp; j += kLanes) {
        const int64_t m = cnt(j);
        (m > 0 ? load_as<acc_t>(src + j, m) : V(acc_t(0))).store(GG + j);
      }
      return;
    }
    std::fill(GG, GG + cbp, acc_t(0));
    for (int64_t jh = adj_h_ptr[r]; jh < adj_h_ptr[r + 1]; ++jh) {
      const int64_t oh = adj_h_idx[jh];
      const acc_t wh = adj_h_wt[jh];
      for (int64_t jw = adj_w_ptr[w]; jw < adj_w_ptr[w + 1]; ++jw) {
        const V wt(wh * adj_w_wt[jw]);
        const scalar_t* src = gimg + (oh * W + adj_w_idx[jw]) * C + c0;
        for (int64_t j = 0; j < cbp; j += kLanes) {
          const int64_t m = cnt(j);
          if (m > 0) at::vec::fmadd(wt, load_as<acc_t>(src + j, m), V::loadu(GG + j)).store(GG + j);
        }
      }
    }
  }

  // channels_last: all channels of one band, one vector of channels at a time through zero-padded buffers, the
  // per-channel sums in registers.
  void bwd_cl(const scalar_t* grad, scalar_t* gx, bool need_x, bool need_w3, int64_t n, int64_t r0, int64_t r1,
              Scratch<acc_t>& s, acc_t* part) const {
    const int64_t a0 = std::max<int64_t>(r0 - 4, 0), a1 = std::min<int64_t>(r1 + 4, HP);
    const int64_t q0 = std::max<int64_t>(r0 - 2, 0), q1 = std::min<int64_t>(r1 + 2, HP);
    const int64_t e0 = r0 - 4, ne = r1 - r0 + 8;  // extended rows [e0, e0 + ne), zero outside the image
    const int64_t na = a1 - a0, npix = na * WP;
    const int64_t no = r1 - r0, npo = no * WP, wpp = WP + 4;
    constexpr int64_t L = kLanes;

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
    const V one(acc_t(1)), zero(acc_t(0));

    for (int64_t c = 0; c < Cp; c += L) {
      const V s3v = V::loadu(s3.data() + c), b3v = V::loadu(b3.data() + c), s4v = V::loadu(s4.data() + c);
      const V b4v = V::loadu(b4.data() + c), s5v = V::loadu(s5.data() + c), b5v = V::loadu(b5.data() + c);
      V hv[5], vv[5];
      for (int t = 0; t < 5; ++t) {
        hv[t] = V::loadu(hwt.data() + t * Cp + c);
        vv[t] = V::loadu(vwt.data() + t * Cp + c);
      }
      // ---- forward recompute on rows [a0, a1)
      for (int64_t r = 0; r < na; ++r) {
        for (int64_t w = 0; w < WP; ++w) {
          at::vec::fmadd(s3v, V::loadu(Y3 + (r * WP + w) * Cp + c), b3v).store(A3 + (r * wpp + w + 2) * L);
        }
      }
      for (int64_t r = 0; r < na; ++r) {
        const acc_t* a = A3 + r * wpp * L;
        acc_t* a4 = A4 + (a0 - e0 + r) * WP * L;
        for (int64_t w = 0; w < WP; ++w) {
          V acc = hv[0] * V::loadu(a + w * L);
          for (int t = 1; t < 5; ++t) acc = at::vec::fmadd(hv[t], V::loadu(a + (w + t) * L), acc);
          acc.store(Y4 + (r * WP + w) * L);
          at::vec::fmadd(s4v, acc, b4v).store(a4 + w * L);
        }
      }
      // ---- y5, sigmoid, BN5 on rows [q0, q1)
      V as5 = zero, ab5 = zero;
      for (int64_t r = q0; r < q1; ++r) {
        const bool own = r >= r0 && r < r1;
        for (int64_t w = 0; w < WP; ++w) {
          const int64_t i = ((r - e0) * WP + w) * L;
          V y5 = vv[0] * V::loadu(A4 + i - 2 * WP * L);
          for (int t = 1; t < 5; ++t) y5 = at::vec::fmadd(vv[t], V::loadu(A4 + i + (t - 2) * WP * L), y5);
          const V g = vsigmoid(at::vec::fmadd(s5v, y5, b5v));
          const V gz = V::loadu(GG + ((r - q0) * WP + w) * Cp + c) * g * (one - g);
          if (own) {
            as5 = at::vec::fmadd(gz, y5, as5);
            ab5 = ab5 + gz;
          }
          (gz * s5v).store(GY5 + i);
        }
      }
      // ---- owned rows: 5x1 transposed, BN4
      V as4 = zero, ab4 = zero, as3 = zero, ab3 = zero, ah[5], av[5];
      for (int t = 0; t < 5; ++t) ah[t] = av[t] = zero;
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t w = 0; w < WP; ++w) {
          const int64_t i = ((r - e0) * WP + w) * L;
          const V gy5 = V::loadu(GY5 + i);
          for (int t = 0; t < 5; ++t) av[t] = at::vec::fmadd(gy5, V::loadu(A4 + i + (t - 2) * WP * L), av[t]);
          V ga4 = vv[0] * V::loadu(GY5 + i + 2 * WP * L);
          for (int t = 1; t < 5; ++t) ga4 = at::vec::fmadd(vv[t], V::loadu(GY5 + i - (t - 2) * WP * L), ga4);
          as4 = at::vec::fmadd(ga4, V::loadu(Y4 + ((r - a0) * WP + w) * L), as4);
          ab4 = ab4 + ga4;
          (ga4 * s4v).store(GY4 + ((r - r0) * wpp + w + 2) * L);
        }
      }
      // ---- owned rows: 1x5 transposed, BN3
      for (int64_t r = r0; r < r1; ++r) {
        const acc_t* a = A3 + (r - a0) * wpp * L;
        const acc_t* g4 = GY4 + (r - r0) * wpp * L;
        for (int64_t w = 0; w < WP; ++w) {
          const V gy4 = V::loadu(g4 + (w + 2) * L);
          V ga3 = hv[0] * V::loadu(g4 + (w + 4) * L);
          for (int t = 0; t < 5; ++t) ah[t] = at::vec::fmadd(gy4, V::loadu(a + (w + t) * L), ah[t]);
          for (int t = 1; t < 5; ++t) ga3 = at::vec::fmadd(hv[t], V::loadu(g4 + (w + 4 - t) * L), ga3);
          const int64_t p = (r - a0) * WP + w;
          as3 = at::vec::fmadd(ga3, V::loadu(Y3 + p * Cp + c), as3);
          ab3 = ab3 + ga3;
          if (GY3) (ga3 * s3v).store(GY3 + ((r - r0) * WP + w) * Cp + c);
        }
      }
      auto add = [&](int64_t off, const V& v) { (V::loadu(part + off + c) + v).store(part + off + c); };
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
      gemm<acc_t>(C, Cinp, npo, GY3, 1, Cp, P + (r0 - a0) * WP * Cinp, Cinp, part + 16 * Cp, Cinp, true);
    }
    if (need_x) {
      acc_t* GP = s.gp.get(std::max<int64_t>(npo, 1) * Cinp);
      gemm<acc_t>(npo, Cin, C, GY3, Cp, 1, w3, Cin, GP, Cinp, false);
      const V quarter(acc_t(0.25));
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
            const V v = V::loadu(src + i) * quarter;
            store_as<acc_t>(d00 + i, v, m);
            store_as<acc_t>(d01 + i, v, m);
            store_as<acc_t>(d10 + i, v, m);
            store_as<acc_t>(d11 + i, v, m);
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
  void backward(const scalar_t* grad, scalar_t* gx, bool need_x, bool need_w3, std::vector<acc_t>& total) {
    build_adjoint();
    const int64_t plen = part_len(need_w3);
    total.assign(plen, acc_t(0));
    if (N == 0) return;
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    const int64_t row_bytes = (2 * Cinp + 3 * Cp) * WP * static_cast<int64_t>(sizeof(acc_t));
    const int64_t cap_rows = std::max<int64_t>(16, kBwdBudget / std::max<int64_t>(row_bytes, 1));
    int64_t nb = ceil_div(HP, cap_rows);
    if (N < threads) nb = std::max(nb, ceil_div(threads, N));
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
};

// ---------------------------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------------------------

const char* const kParamNames[9] = {"conv_weight", "conv_scale", "conv_bias", "h_weight", "h_scale",
                                    "h_bias",      "v_weight",   "v_scale",   "v_bias"};

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor* params) {
  TORCH_CHECK(x.defined(), op, ": expected x to be a tensor, got an undefined one");
  TORCH_CHECK(x.device().is_cpu(), op, ": expected x on the CPU, got ", x.device());
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": expected x of dtype float32, float64, float16 or bfloat16, got ", dt);
  check_layout(x, op, "x");
  TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, op, ": expected x with H and W >= 2 (the 2x2 average pool), got ",
              x.sizes());
  const at::Tensor& cw = params[0];
  TORCH_CHECK(cw.defined() && cw.dim() == 4 && cw.size(1) == x.size(1) && cw.size(2) == 1 && cw.size(3) == 1, op,
              ": expected conv_weight of shape [C, ", x.size(1), ", 1, 1], got ",
              cw.defined() ? cw.sizes() : at::IntArrayRef{});
  const int64_t c = cw.size(0);
  const auto acc = acc_type(dt);
  for (int i = 0; i < 9; ++i) {
    const at::Tensor& t = params[i];
    const char* name = kParamNames[i];
    TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, got an undefined one");
    const bool weight = i == 0 || i == 3 || i == 6;
    check_tensor(t, x, weight ? dt : acc, op, name);
    TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " contiguous, got strides ", t.strides());
    if (i == 3) {
      TORCH_CHECK(t.sizes() == at::IntArrayRef({c, 1, 1, 5}), op, ": expected h_weight of shape [", c,
                  ", 1, 1, 5], got ", t.sizes());
    } else if (i == 6) {
      TORCH_CHECK(t.sizes() == at::IntArrayRef({c, 1, 5, 1}), op, ": expected v_weight of shape [", c,
                  ", 1, 5, 1], got ", t.sizes());
    } else if (!weight) {
      TORCH_CHECK(t.dim() == 1 && t.size(0) == c, op, ": expected ", name, " of shape [", c, "], got ", t.sizes());
    }
  }
}

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t c, Mode mode) {
  if (mode == Mode::kGate) return {x.size(0), c, x.size(2) / 2, x.size(3) / 2};
  return {x.size(0), c, x.size(2), x.size(3)};
}

// The layout the kernel indexes with: x's own (channels_last or NCHW) when every tensor is dense in it, else the
// other one when every tensor is dense in that (a format is ambiguous for size-1 dims, e.g. C_in == 1 or a 1x1 gate).
bool pick_channels_last(const char* op, const at::Tensor& x, const std::vector<std::pair<const char*, at::Tensor>>& ts) {
  auto dense_in = [&](at::MemoryFormat f) {
    if (!x.is_contiguous(f)) return false;
    for (const auto& nt : ts) {
      if (!nt.second.is_contiguous(f)) return false;
    }
    return true;
  };
  const bool pref_cl = is_channels_last(x);
  const auto pref = pref_cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto other = pref_cl ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  if (dense_in(pref)) return pref_cl;
  if (dense_in(other)) return !pref_cl;
  for (const auto& nt : ts) {
    TORCH_CHECK(nt.second.is_contiguous(pref), op, ": expected ", nt.first, " contiguous in the input's memory format (",
                pref_cl ? "channels_last" : "NCHW", "), got shape ", nt.second.sizes(), " strides ",
                nt.second.strides());
  }
  TORCH_CHECK(false, op, ": inconsistent memory formats");
}

void check_like(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x,
                const std::vector<int64_t>& shape) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, got an undefined one");
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": expected ", name, " of dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), op, ": expected ", name, " of shape ", at::IntArrayRef(shape),
              ", got ", t.sizes());
}

// ---------------------------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------------------------

void dfc_forward_cpu(const at::Tensor& x, const at::Tensor& conv_weight, const at::Tensor& conv_scale,
                     const at::Tensor& conv_bias, const at::Tensor& h_weight, const at::Tensor& h_scale,
                     const at::Tensor& h_bias, const at::Tensor& v_weight, const at::Tensor& v_scale,
                     const at::Tensor& v_bias, c10::string_view mode_str, const at::Tensor& out) {
  const Mode mode = parse_mode(mode_str, kFwdOp);
  const at::Tensor params[9] = {conv_weight, conv_scale, conv_bias, h_weight, h_scale,
                                h_bias,      v_weight,   v_scale,   v_bias};
  check_inputs(kFwdOp, x, params);
  check_like(kFwdOp, "out", out, x, out_shape(x, conv_weight.size(0), mode));
  if (out.numel() == 0) return;
  const bool cl = pick_channels_last(kFwdOp, x, {{"out", out}});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghostfast_dfc_forward_cpu", [&] {
    const DfcCpu<scalar_t> k(x, params, mode, cl);
    k.forward(out.data_ptr<scalar_t>());
  });
}

void dfc_backward_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& conv_weight,
                      const at::Tensor& conv_scale, const at::Tensor& conv_bias, const at::Tensor& h_weight,
                      const at::Tensor& h_scale, const at::Tensor& h_bias, const at::Tensor& v_weight,
                      const at::Tensor& v_scale, const at::Tensor& v_bias, c10::string_view mode_str,
                      at::TensorList grads) {
  const Mode mode = parse_mode(mode_str, kBwdOp);
  const at::Tensor params[9] = {conv_weight, conv_scale, conv_bias, h_weight, h_scale,
                                h_bias,      v_weight,   v_scale,   v_bias};
  check_inputs(kBwdOp, x, params);
  check_like(kBwdOp, "grad", grad, x, out_shape(x, conv_weight.size(0), mode));
  TORCH_CHECK(grads.size() == 10, kBwdOp,
              ": expected 10 grads (x, conv_weight, conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, "
              "v_scale, v_bias; empty = not needed), got ",
              grads.size());
  bool need[10];
  for (int i = 0; i < 10; ++i) {
    const at::Tensor& g = grads[i];
    const at::Tensor& like = i == 0 ? x : params[i - 1];
    const char* name = i == 0 ? "grads[0] (x)" : kParamNames[i - 1];
    need[i] = g.defined() && g.numel() > 0;
    if (!need[i]) continue;
    TORCH_CHECK(g.device() == x.device(), kBwdOp, ": expected the grad of ", name, " on ", x.device(), ", got ",
                g.device());
    TORCH_CHECK(g.scalar_type() == like.scalar_type(), kBwdOp, ": expected the grad of ", name, " of dtype ",
                like.scalar_type(), ", got ", g.scalar_type());
    TORCH_CHECK(g.sizes() == like.sizes(), kBwdOp, ": expected the grad of ", name, " of shape ", like.sizes(),
                ", got ", g.sizes());
    if (i > 0) {
      TORCH_CHECK(g.is_contiguous(), kBwdOp, ": expected the grad of ", name, " contiguous, got strides ",
                  g.strides());
    }
  }
  std::vector<std::pair<const char*, at::Tensor>> dense;  // empty tensors have no layout to check
  if (grad.numel() > 0) dense.emplace_back("grad", grad);
  if (need[0]) dense.emplace_back("grads[0] (the grad of x)", grads[0]);
  const bool cl = pick_channels_last(kBwdOp, x, dense);
  bool any = false;
  for (bool b : need) any = any || b;
  if (!any) return;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ghostfast_dfc_backward_cpu", [&] {
    using acc_t = typename DfcCpu<scalar_t>::acc_t;
    DfcCpu<scalar_t> k(x, params, mode, cl);
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

}  // namespace
}  // namespace ghostfast

static_assert(std::is_same_v<decltype(ghostfast::dfc_forward_cpu), ghostfast::DfcKernel>, "dfc_forward_cpu: C++ signature differs from kernel_signatures.h");
static_assert(std::is_same_v<decltype(ghostfast::dfc_backward_cpu), ghostfast::DfcBackwardKernel>, "dfc_backward_cpu: C++ signature differs from kernel_signatures.h");

TORCH_LIBRARY_IMPL(ghostfast, CPU, m) {
  m.impl("_dfc_kernel", &ghostfast::dfc_forward_cpu);
  m.impl("_dfc_backward_kernel", &ghostfast::dfc_backward_cpu);
}
