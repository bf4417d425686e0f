// The vector layer of the CPU kernels (both ops): at::vec::Vectorized<acc_t> loads and stores from / to the tensor
// dtypes (whole or partial vectors), lane masks, fixed-order reductions, non-temporal stores and the sigmoid (the
// Ghost module's activations on top of it: cpu/activation.h).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#define GHOSTFAST_STREAM_STORES 1
#endif

namespace ghostfast::cpu {

using at::vec::Vectorized;

// the accumulation dtype acc_t: float for float / half / bfloat16, double for double
template <typename scalar_t>
using acc_of = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

inline int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return div_up(a, b) * b; }

// V = Vectorized<acc_t>::size() lanes, loaded from / stored to the tensor dtype T (T == acc_t, or float16 /
// bfloat16 with acc_t float).
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

// f(i, count) over [0, n) in steps of one vector; the last step may be partial (count < V)
template <typename acc_t, typename F>
inline void vfor(int64_t n, const F& f) {
  constexpr int64_t V = Vectorized<acc_t>::size();
  for (int64_t i = 0; i < n; i += V) f(i, std::min<int64_t>(V, n - i));
}

// the first n lanes of v, zeros after
template <typename acc_t>
inline Vectorized<acc_t> keep_first(const Vectorized<acc_t>& v, int64_t n) {
  if (n >= Vectorized<acc_t>::size()) return v;
  return Vectorized<acc_t>::set(Vectorized<acc_t>(acc_t(0)), v, n);
}

// A lane mask for select_lanes(): all bits set (keep) or none (zero). Padding by selection, not by multiplying with
// 0 / 1: 0 * Inf is NaN, and the lanes a mask drops hold real values of a neighbouring row.
template <typename acc_t>
inline acc_t lane_mask(bool keep) {
  using bits_t = std::conditional_t<sizeof(acc_t) == 8, uint64_t, uint32_t>;
  const bits_t b = keep ? ~bits_t(0) : bits_t(0);
  acc_t m;
  std::memcpy(&m, &b, sizeof(m));
  return m;
}

// v where the mask lane is set, +0 elsewhere (mask lanes from lane_mask)
template <typename acc_t>
inline Vectorized<acc_t> select_lanes(const Vectorized<acc_t>& mask, const Vectorized<acc_t>& v) {
  return v & mask;
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

template <typename acc_t>
inline Vectorized<acc_t> vsigmoid(const Vectorized<acc_t>& z) {
  const Vectorized<acc_t> one(acc_t(1));
  return one / (one + z.neg().exp());
}

#if defined(CPU_CAPABILITY_AVX2)
// float: exp inlined (Cody-Waite reduction and the Cephes expf polynomial, about 1 ulp on the clamped range), so
// consecutive vectors overlap instead of serialising on a library call. exp(-z) is clamped to [2^-126, 2^127]:
// the gate saturates far earlier (|z| > 17 rounds to 0 or 1 up to 6e-39). Below z = -ln(FLT_MAX), where expf(-z)
// overflows, the gate is exactly 0 as eager's 1 / (1 + inf) (sigmoid(-inf) = 0: a backward's g (1 - g) is then 0,
// not 6e-39, and 0 * inf gives eager's NaN). NaN in, NaN out.
template <>
inline Vectorized<float> vsigmoid<float>(const Vectorized<float>& zv) {
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
  const __m256 overflow = _mm256_cmp_ps(z, _mm256_set1_ps(-88.72283935546875f), _CMP_LT_OQ);
  return _mm256_blendv_ps(_mm256_andnot_ps(overflow, g), z, _mm256_cmp_ps(z, z, _CMP_UNORD_Q));
}
#endif

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

inline void stream_fence() {
#ifdef GHOSTFAST_STREAM_STORES
  _mm_sfence();
#endif
}

// touch [p, p + n) into the cache ahead of use (a chunk of a channel plane the hardware prefetcher has not seen)
template <typename T>
inline void prefetch_range(const T* p, int64_t n) {
  const char* b = reinterpret_cast<const char*>(p);
  const char* e = reinterpret_cast<const char*>(p + n);
  for (; b < e; b += 64) __builtin_prefetch(b);
}

}  // namespace ghostfast::cpu
