// The 1x1 conv / GEMM pieces of both ops: the register-blocked 1x1 conv over a block's shared-memory region (the
// forward and backward main kernels), and the backward's two GEMMs, grad_input = W^T gz and grad_weight = sum gz x^T.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/common.cuh"

namespace ghostfast {

// ---- register-blocked 1x1 conv over a shared-memory region -----------------------------------------------------
//
// out[c][p] = sum_k Wrow(c, k) * X(k, p) for the CB channels of the block and the npix pixels of a region.
// Threads: NCG = CB/8 channel groups of NPT = 256/NCG pixel lanes; a thread accumulates 8 channels x PPT pixels
// (p = chunk + lane + i*NPT). The pixels run in passes of kPixChunk; per pass C_in is staged in chunks of KC
// channels: xs[KC][LDX] (X converted to acc_t, 0 outside the image) and ws[KC][CB] (weights).
constexpr int kPixChunk = 256;  // pixels per pass

template <typename acc_t, int CB>
struct ConvShape {
  static constexpr int CPT = 8;
  static constexpr int NCG = CB / CPT;
  static constexpr int NPT = kThreads / NCG;
  static constexpr int PPT = kPixChunk / NPT;
  static constexpr int KC = sizeof(acc_t) == 8 ? 4 : 8;
  static constexpr int LDX = kPixChunk + 4;
  static constexpr int kStageElems = KC * LDX + KC * CB;
  static_assert(CB % CPT == 0 && kThreads % NCG == 0 && kPixChunk % NPT == 0 && NPT % 32 == 0, "conv shape");
};

// XLoad(k, p) -> acc_t: input channel k (< K) at region pixel p (< npix), 0 outside the image.
// WLoad(c, k) -> acc_t: weight of the block's channel c (< CB) for input channel k (< K), 0 for channels past
// the weight's rows. Epi(p, c, v): the result for region pixel p, channel c; called once per (p, c).
// Syncs inside (not when K = 0); the caller syncs after it before reading what Epi wrote.
template <typename acc_t, int CB, typename XLoad, typename WLoad, typename Epi>
__device__ __forceinline__ void conv1x1_region(acc_t* __restrict__ stage, int npix, int64_t K, bool channel_fast,
                                               const XLoad& xload, const WLoad& wload, const Epi& epi) {
  using S = ConvShape<acc_t, CB>;
  acc_t* xs = stage;                   // [KC][LDX]
  acc_t* ws = stage + S::KC * S::LDX;  // [KC][CB]
  const int tid = threadIdx.x;
  const int cg = tid / S::NPT;
  const int pt = tid - cg * S::NPT;
  for (int pc0 = 0; pc0 < npix; pc0 += kPixChunk) {
    acc_t acc[S::PPT][S::CPT];
#pragma unroll
    for (int i = 0; i < S::PPT; ++i)
#pragma unroll
      for (int j = 0; j < S::CPT; ++j) acc[i][j] = acc_t(0);
    for (int64_t k0 = 0; k0 < K; k0 += S::KC) {
      __syncthreads();  // the previous chunk's readers are done with xs / ws
      for (int e = tid; e < S::KC * kPixChunk; e += kThreads) {
        int kk, pp;
        if (channel_fast) {  // channels_last: consecutive threads read consecutive channels
          kk = e % S::KC;
          pp = e / S::KC;
        } else {
          pp = e % kPixChunk;
          kk = e / kPixChunk;
        }
        const int p = pc0 + pp;
        const int64_t k = k0 + kk;
        xs[kk * S::LDX + pp] = (p < npix && k < K) ? xload(k, p) : acc_t(0);
      }
      for (int e = tid; e < S::KC * CB; e += kThreads) {
        const int kk = e % S::KC;
        const int c = e / S::KC;
        const int64_t k = k0 + kk;
        ws[kk * CB + c] = k < K ? wload(c, k) : acc_t(0);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < S::KC; ++kk) {
        acc_t xv[S::PPT], wv[S::CPT];
#pragma unroll
        for (int i = 0; i < S::PPT; ++i) xv[i] = xs[kk * S::LDX + pt + i * S::NPT];
#pragma unroll
        for (int j = 0; j < S::CPT; ++j) wv[j] = ws[kk * CB + cg * S::CPT + j];
#pragma unroll
        for (int i = 0; i < S::PPT; ++i)
#pragma unroll
          for (int j = 0; j < S::CPT; ++j) acc[i][j] += xv[i] * wv[j];
      }
    }
#pragma unroll
    for (int i = 0; i < S::PPT; ++i) {
      const int p = pc0 + pt + i * S::NPT;
      if (p < npix) {
#pragma unroll
        for (int j = 0; j < S::CPT; ++j) epi(p, cg * S::CPT + j, acc[i][j]);
      }
    }
  }
}

// Row c0 + c of a contiguous [rows, K] weight; 0 past the last row.
template <typename scalar_t, typename acc_t>
struct WeightRowLoad {
  const scalar_t* w;
  int64_t c0, rows, K;
  __device__ __forceinline__ acc_t operator()(int c, int64_t k) const {
    const int64_t r = c0 + c;
    return r < rows ? to_acc<acc_t>(w[r * K + k]) : acc_t(0);
  }
};

// ---- backward GEMMs of the 1x1 conv ----------------------------------------------------------------------------
//
// gz: the gradient of the 1x1 conv's output, an acc-dtype workspace [N, Cv, P] (P pixels per image).
constexpr int kGT = 64;  // output tile side of the GEMM kernels
constexpr int kGC = 16;  // reduction chunk

// grad_input, per image: out[k][p] = sum_{c < Cv} W[c][k] * gz[c][p]. A block computes a 64 (k) x 64 (pixel) tile,
// each thread 4 x 4 of it. Consecutive threads take consecutive pixels (NCHW) or consecutive channels
// (channels_last), so the stores coalesce in either layout.
// Store: `Site at(n, p)` locates pixel p of image n once, `write(site, k, v)` stores channel k's value there.
template <typename scalar_t, typename acc_t>
struct GradInputArgs {
  const scalar_t* w;  // [rows >= Cv, K] contiguous
  const acc_t* gz;    // [N, Cv, P]
  int64_t Cv, K, P;
  int64_t tiles_p, tiles_k;
  bool cl;
};

template <typename scalar_t, typename acc_t, typename Store>
__global__ void __launch_bounds__(kThreads)
    conv1x1_grad_input_kernel(const GradInputArgs<scalar_t, acc_t> a, const Store store) {
  __shared__ acc_t As[kGC][kGT];  // W[c0 + cc][k0 + kk]
  __shared__ acc_t Bs[kGC][kGT];  // gz[c0 + cc][p0 + pp]
  int64_t bid = blockIdx.x;
  const int64_t ptile = bid % a.tiles_p;
  bid /= a.tiles_p;
  const int64_t ktile = bid % a.tiles_k;
  const int64_t n = bid / a.tiles_k;
  const int64_t p0 = ptile * kGT, k0 = ktile * kGT;
  const int tid = threadIdx.x;
  const int f = tid & 15, s = tid >> 4;
  int kl[4], pl[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    kl[i] = a.cl ? f + 16 * i : s + 16 * i;
    pl[i] = a.cl ? s + 16 * i : f + 16 * i;
  }
  acc_t acc[4][4];  // [pixel i][channel j]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  const acc_t* gn = a.gz + n * a.Cv * a.P;
  for (int64_t c0 = 0; c0 < a.Cv; c0 += kGC) {
    __syncthreads();
    for (int e = tid; e < kGC * kGT; e += kThreads) {
      const int cc = e / kGT;
      const int kk = e - cc * kGT;
      const int64_t c = c0 + cc;
      const int64_t kx = k0 + kk;
      const int64_t px = p0 + kk;
      As[cc][kk] = (c < a.Cv && kx < a.K) ? to_acc<acc_t>(a.w[c * a.K + kx]) : acc_t(0);
      Bs[cc][kk] = (c < a.Cv && px < a.P) ? gn[c * a.P + px] : acc_t(0);
    }
    __syncthreads();
#pragma unroll
    for (int cc = 0; cc < kGC; ++cc) {
      acc_t av[4], bv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) av[j] = As[cc][kl[j]];
#pragma unroll
      for (int i = 0; i < 4; ++i) bv[i] = Bs[cc][pl[i]];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[j] * bv[i];
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t px = p0 + pl[i];
    if (px >= a.P) continue;
    const auto site = store.at(n, px);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t kx = k0 + kl[j];
      if (kx < a.K) store.write(site, kx, acc[i][j]);
    }
  }
}

// grad_weight = sum over (n, pixels) of gz x^T, split over the flattened reduction index r = n * P + p (atomics
// into a zeroed acc-dtype [rows >= Cv, K] buffer). XLoad(n, k, p) -> acc_t: the conv's input channel k at pixel p.
// (XLoad travels inside the args, the Store of grad_input as a parameter of its own: with these placements ptxas
// gives both kernels 64 registers for float, with the other ones 80.) Needs R > 0.
template <typename acc_t, typename XLoad>
struct GradWeightArgs {
  XLoad xload;
  const acc_t* gz;  // [N, Cv, P]
  acc_t* gw;        // [rows >= Cv, K], zeroed
  int64_t Cv, K, P, R;  // R = N * P
  int64_t tiles_c, tiles_k, nsplit, chunk;
  bool cl;
};

template <typename acc_t, typename XLoad>
__global__ void __launch_bounds__(kThreads)
    conv1x1_grad_weight_kernel(const GradWeightArgs<acc_t, XLoad> a) {
  __shared__ acc_t Gs[kGC][kGT + 1];  // gz at (r0 + rr, channel c0 + cc)
  __shared__ acc_t Xs[kGC][kGT + 1];  // the input at (r0 + rr, input channel k0 + kk)
  int64_t bid = blockIdx.x;
  const int64_t split = bid % a.nsplit;
  bid /= a.nsplit;
  const int64_t ktile = bid % a.tiles_k;
  const int64_t ctile = bid / a.tiles_k;
  const int64_t c0 = ctile * kGT, k0 = ktile * kGT;
  const int64_t rb = split * a.chunk;
  const int64_t re = rb + a.chunk < a.R ? rb + a.chunk : a.R;
  const int tid = threadIdx.x;
  const int f = tid & 15, s = tid >> 4;
  acc_t acc[4][4];  // [input channel f + 16 i][channel s + 16 j]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = acc_t(0);
  for (int64_t r0 = rb; r0 < re; r0 += kGC) {
    __syncthreads();
    for (int e = tid; e < kGC * kGT; e += kThreads) {
      {
        const int rr = e % kGC;
        const int cc = e / kGC;
        const int64_t r = r0 + rr;
        const int64_t c = c0 + cc;
        acc_t v = acc_t(0);
        if (r < re && c < a.Cv) {
          const int64_t nn = r / a.P;
          const int64_t px = r - nn * a.P;
          v = a.gz[(nn * a.Cv + c) * a.P + px];
        }
        Gs[rr][cc] = v;
      }
      {
        int rr, kk;
        if (a.cl) {
          kk = e % kGT;
          rr = e / kGT;
        } else {
          rr = e % kGC;
          kk = e / kGC;
        }
        const int64_t r = r0 + rr;
        const int64_t kx = k0 + kk;
        acc_t v = acc_t(0);
        if (r < re && kx < a.K) {
          const int64_t nn = r / a.P;
          v = a.xload(nn, kx, r - nn * a.P);
        }
        Xs[rr][kk] = v;
      }
    }
    __syncthreads();
#pragma unroll
    for (int rr = 0; rr < kGC; ++rr) {
      acc_t gv[4], xv[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) gv[j] = Gs[rr][s + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[i] = Xs[rr][f + 16 * i];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += gv[j] * xv[i];
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t c = c0 + s + 16 * j;
    if (c >= a.Cv) continue;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t kx = k0 + f + 16 * i;
      if (kx < a.K) atomicAdd(a.gw + c * a.K + kx, acc[i][j]);
    }
  }
}

// ---- launches (host) -------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t, typename Store>
void launch_conv1x1_grad_input(const char* op, const scalar_t* w, const acc_t* gz, int64_t N, int64_t Cv, int64_t K,
                               int64_t P, bool channels_last, const Store& store, cudaStream_t stream) {
  GradInputArgs<scalar_t, acc_t> a{};
  a.w = w;
  a.gz = gz;
  a.Cv = Cv;
  a.K = K;
  a.P = P;
  a.tiles_p = cdiv(P, kGT);
  a.tiles_k = cdiv(K, kGT);
  a.cl = channels_last;
  const unsigned int grid = grid_size(op, N * a.tiles_p * a.tiles_k);
  conv1x1_grad_input_kernel<scalar_t, acc_t, Store><<<grid, kThreads, 0, stream>>>(a, store);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Splits the reduction so that about 4 blocks per SM run, each at least 256 reduction indices long.
template <typename acc_t, typename XLoad>
void launch_conv1x1_grad_weight(const char* op, const acc_t* gz, acc_t* gw, int64_t N, int64_t Cv, int64_t K,
                                int64_t P, bool channels_last, const XLoad& xload, cudaStream_t stream) {
  GradWeightArgs<acc_t, XLoad> a{};
  a.xload = xload;
  a.gz = gz;
  a.gw = gw;
  a.Cv = Cv;
  a.K = K;
  a.P = P;
  a.R = N * P;
  a.tiles_c = cdiv(Cv, kGT);
  a.tiles_k = cdiv(K, kGT);
  const int64_t tiles = a.tiles_c * a.tiles_k;
  const int64_t target = 4 * int64_t(device_attribute(cudaDevAttrMultiProcessorCount));
  int64_t nsplit = std::max<int64_t>(1, cdiv(target, tiles));
  nsplit = std::min<int64_t>(nsplit, std::max<int64_t>(1, cdiv(a.R, 256)));
  a.chunk = cdiv(cdiv(a.R, nsplit), kGC) * kGC;
  a.nsplit = cdiv(a.R, a.chunk);
  a.cl = channels_last;
  const unsigned int grid = grid_size(op, tiles * a.nsplit);
  conv1x1_grad_weight_kernel<acc_t, XLoad><<<grid, kThreads, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace ghostfast
