// The GEMM layer of the CPU kernels (both ops): a register-blocked GEMM with a broadcast operand (tiles of 4 rows x
// 3 vectors of Vectorized<acc_t>, mixed dtypes, a fused BN + act epilogue), a dot-product GEMM and a transpose.
#pragma once

#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "cpu/activation.h"
#include "cpu/vec.h"

namespace ghostfast::cpu {

// ---------------------------------------------------------------------------------------------------------------
// GEMM with a broadcast operand: C[i][j] (+)= sum_k A(i, k) * B[k][j], i < M, j < Nc, vectorized along j.
//   A(i, k) = A[i * ai + k * ak] (any strides, any dtype: one scalar broadcast per (i, k)),
//   B[k][j] = B[k * ldb + j] (contiguous along j), C[i][j] = C[i * ldc + j].
// b_end: where B's memory ends (the tile of the last columns would read up to V - 1 elements past column Nc; past
// b_end it is copied to a zero-padded buffer first), nullptr when B is padded. c_full: C rows are padded to whole
// vectors (stores need no tail handling).
// ---------------------------------------------------------------------------------------------------------------

// Optional epilogue of the GEMM, applied before the store: C = act(C * scale + bias), scale / bias indexed by the
// row i (ROW) or the column j (COL) of C; act is the Gemm's template argument ACT (cpu/activation.h).
template <typename acc_t>
struct Epilogue {
  enum Kind { NONE, ROW, COL };
  Kind kind = NONE;
  const acc_t* scale = nullptr;
  const acc_t* bias = nullptr;
  bool stream = false;  // non-temporal stores of whole, aligned vectors (C written once, not read back here)
};

template <typename acc_t, typename a_t, typename b_t, typename c_t, bool ACCUM, Act ACT = Act::None>
struct Gemm {
  // Tiles of MR rows x NV vectors (12 accumulators, 3 loads + 4 broadcasts per 12 FMAs); column blocks narrower
  // than NV vectors (the last columns, narrow C) take MR_NARROW rows instead (2 vectors: 12 accumulators again).
  static constexpr int MR = 4;
  static constexpr int MR_NARROW = 6;
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
#pragma GCC unroll 6
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
#pragma GCC unroll 6
      for (int r = 0; r < mr; ++r) {
        const Vec a(static_cast<acc_t>(a_k[r * ai]));
#pragma GCC unroll 3
        for (int v = 0; v < nv; ++v) acc[r][v] = at::vec::fmadd(a, b[v], acc[r][v]);
      }
    }
    if (epi.kind != Epi::NONE && epi.scale != nullptr) {
#pragma GCC unroll 6
      for (int r = 0; r < mr; ++r) {
#pragma GCC unroll 3
        for (int v = 0; v < nv; ++v) {
          Vec o;
          if (epi.kind == Epi::ROW) {
            o = at::vec::fmadd(acc[r][v], Vec(epi.scale[i0 + r]), Vec(epi.bias[i0 + r]));
          } else {
            o = at::vec::fmadd(acc[r][v], Vec::loadu(epi.scale + j0 + v * V), Vec::loadu(epi.bias + j0 + v * V));
          }
          acc[r][v] = act_v<ACT>(o);
        }
      }
    }
#pragma GCC unroll 6
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

  // the full tiles of one column block, rows [0, m_full) (a multiple of mr): one call per column block, the tile
  // inlined
  template <int mr, int nv>
  static void tile_rows(int64_t m_full, int64_t K, const a_t* A, int64_t ai, int64_t ak, const b_t* B, int64_t ldb,
                        c_t* C, int64_t ldc, int64_t last_n, const Epi& epi, int64_t j0) {
    for (int64_t i = 0; i < m_full; i += mr)
      tile<mr, nv>(K, A + i * ai, ai, ak, B, ldb, C + i * ldc, ldc, last_n, epi, i, j0);
  }

  static TileFn pick(int mr, int nv) {
    static constexpr TileFn table[MR_NARROW][NV] = {
        {tile<1, 1>, tile<1, 2>, tile<1, 3>},
        {tile<2, 1>, tile<2, 2>, tile<2, 3>},
        {tile<3, 1>, tile<3, 2>, tile<3, 3>},
        {tile<4, 1>, tile<4, 2>, tile<4, 3>},
        {tile<5, 1>, tile<5, 2>, nullptr},
        {tile<6, 1>, tile<6, 2>, nullptr},
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
      const int64_t rows = nv == NV ? MR : MR_NARROW;
      const int64_t m_full = M / rows * rows;
      c_t* cj = C + jv * V;
      switch (nv) {
        case 1: tile_rows<MR_NARROW, 1>(m_full, K, A, ai, ak, bt, ldbt, cj, ldc, last_n, epi, jv * V); break;
        case 2: tile_rows<MR_NARROW, 2>(m_full, K, A, ai, ak, bt, ldbt, cj, ldc, last_n, epi, jv * V); break;
        default: tile_rows<MR, NV>(m_full, K, A, ai, ak, bt, ldbt, cj, ldc, last_n, epi, jv * V); break;
      }
      if (m_full < M) {
        pick(static_cast<int>(M - m_full), nv)(K, A + m_full * ai, ai, ak, bt, ldbt, cj + m_full * ldc, ldc, last_n,
                                               epi, m_full, jv * V);
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

// C (+)= A B (acc_t operands, Gemm's arguments) with K cut into panels: a [kKPanel x 3 vectors] panel of B stays in
// L1 while the rows of A stream past it (the DFC's long reductions: its weight gradient over the pixels of a band).
template <typename acc_t, bool ACCUM>
void gemm_k_panels(int64_t M, int64_t Nc, int64_t K, const acc_t* A, int64_t ai, int64_t ak, const acc_t* B,
                   int64_t ldb, const acc_t* b_end, acc_t* C, int64_t ldc, bool c_full) {
  constexpr int64_t kKPanel = 256;
  for (int64_t k0 = 0; k0 < std::max<int64_t>(K, 1); k0 += kKPanel) {
    const int64_t kc = std::min(kKPanel, K - k0);
    if (k0 == 0) {
      Gemm<acc_t, acc_t, acc_t, acc_t, ACCUM>::run(M, Nc, kc, A, ai, ak, B, ldb, b_end, C, ldc, c_full);
    } else {
      Gemm<acc_t, acc_t, acc_t, acc_t, true>::run(M, Nc, kc, A + k0 * ak, ai, ak, B + k0 * ldb, ldb, b_end, C, ldc,
                                                  c_full);
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

}  // namespace ghostfast::cpu
