// What the DFC attention's CPU translation units (dfc.cpp, dfc_forward.cpp, dfc_backward.cpp) share: one call's
// prepared weights, folded BatchNorms and upsample tables (DfcCpu), the 2x2 average pool and the 1x1 conv.
//
// Forward, one at::parallel_for over tasks (image, band of pooled gate rows, block of channels):
//   a = s3 * (W3 pool(x)) + b3     pooled rows of the band + 2 halo rows each side (clipped), pooled on load,
//                                  one register-blocked GEMM [C_blk x C_in] x [C_in x pixels] (cpu/gemm.h)
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
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "batch_norm.h"
#include "cpu/gemm.h"
#include "cpu/vec.h"
#include "upsample.h"

namespace ghostfast::cpu::dfc {

enum class Mode { kGate, kNearest, kBilinear };

// ---- per-task scratch ----

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

// ---- one call: converted parameters, upsample tables; forward and backward task bodies ----

template <typename scalar_t>
struct DfcCpu {
  using acc_t = acc_of<scalar_t>;
  using Vec = Vectorized<acc_t>;
  static constexpr int64_t V = Vec::size();

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
  // NCHW: the 1x5 conv runs on compact rows (pitch WP) flattened; mask[t][q] drops the taps that cross a row end
  // (lane masks for select_lanes: the dropped taps read the neighbouring row, which may hold an Inf).
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


  // x and the weights (x's dtype); the BatchNorms come through fold_batch_norms (forward) or load_affine (backward)
  DfcCpu(const at::Tensor& xt, const at::Tensor& conv_weight, const at::Tensor& h_weight, const at::Tensor& v_weight,
         Mode mode_, bool cl_)
      : mode(mode_), cl(cl_) {
    N = xt.size(0);
    Cin = xt.size(1);
    H = xt.size(2);
    W = xt.size(3);
    C = conv_weight.size(0);
    HP = H / 2;
    WP = W / 2;
    Cp = round_up(std::max<int64_t>(C, 1), V);
    Cinp = round_up(std::max<int64_t>(Cin, 1), V);
    Ho = mode == Mode::kGate ? HP : H;
    Wo = mode == Mode::kGate ? WP : W;
    x = xt.data_ptr<scalar_t>();

    const scalar_t* cw = conv_weight.data_ptr<scalar_t>();
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
    const scalar_t* hwp = h_weight.data_ptr<scalar_t>();
    const scalar_t* vwp = v_weight.data_ptr<scalar_t>();
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
    for (std::vector<acc_t>* v : {&s3, &b3, &s4, &b4, &s5, &b5}) v->assign(Cp, acc_t(0));
    if (!cl) {
      const int64_t len = (HP + 8) * WP + V;
      for (int64_t t = 0; t < 5; ++t) {
        if (t == 2) continue;
        mask[t].resize(len);
        for (int64_t q = 0; q < len; ++q) {
          const int64_t col = q % WP + t - 2;
          mask[t][q] = lane_mask<acc_t>(col >= 0 && col < WP);
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

  // forward: the live BatchNorms folded per channel (bn3 after the 1x1 conv, bn4 after the 1x5, bn5 after the 5x1)
  void fold_batch_norms(const BatchNormArgs& bn3, const BatchNormArgs& bn4, const BatchNormArgs& bn5) {
    bn3.fold_all<acc_t>(C, s3.data(), b3.data());
    bn4.fold_all<acc_t>(C, s4.data(), b4.data());
    bn5.fold_all<acc_t>(C, s5.data(), b5.data());
  }

  // backward: the folded vectors as given (accumulation dtype), in the order s3, b3, s4, b4, s5, b5
  void load_affine(const at::Tensor* const* vectors) {
    std::vector<acc_t>* dst[6] = {&s3, &b3, &s4, &b4, &s5, &b5};
    for (int i = 0; i < 6; ++i) std::copy_n(vectors[i]->data_ptr<acc_t>(), C, dst[i]->begin());
  }

  // ---- forward (dfc_forward.cpp) ----
  void forward(scalar_t* out) const;
  bool plan_rows(int64_t r0, int64_t r1, int64_t& g0, int64_t& g1, int64_t& o0, int64_t& o1) const;
  void col_upsample(const acc_t* g, acc_t* d) const;
  void fwd_nchw(scalar_t* out, int64_t n, int64_t c0, int64_t c1, int64_t r0, int64_t r1, Scratch<acc_t>& s) const;
  void fwd_cl(scalar_t* out, int64_t n, int64_t c0, int64_t c1, int64_t r0, int64_t r1, Scratch<acc_t>& s) const;

  // ---- backward (dfc_backward.cpp) ----
  void backward(const scalar_t* grad, scalar_t* gx, bool need_x, bool need_w3, std::vector<acc_t>& total);
  void build_adjoint();
  int64_t part_len(bool need_w3) const { return 16 * Cp + (need_w3 ? C * Cinp : 0); }
  void gather_row_nchw(const scalar_t* gplane, int64_t r, acc_t* GG, acc_t* R) const;
  void gather_pix_cl(const scalar_t* gimg, int64_t r, int64_t w, int64_t c0, int64_t cbp, acc_t* GG) const;
  void bwd_nchw(const scalar_t* grad, scalar_t* gx, bool need_x, bool need_w3, int64_t n, int64_t r0, int64_t r1,
                Scratch<acc_t>& s, acc_t* part) const;
  void bwd_cl(const scalar_t* grad, scalar_t* gx, bool need_x, bool need_w3, int64_t n, int64_t r0, int64_t r1,
              Scratch<acc_t>& s, acc_t* part) const;

  // ---- shared ----
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
    const Vec quarter(acc_t(0.25));
    for (int64_t r = a0; r < a1; ++r) {
      for (int64_t w = 0; w < WP; ++w) {
        const scalar_t* p00 = x + ((n * H + 2 * r) * W + 2 * w) * Cin;
        const scalar_t* p01 = p00 + Cin;
        const scalar_t* p10 = p00 + W * Cin;
        const scalar_t* p11 = p10 + Cin;
        acc_t* d = P + ((r - a0) * WP + w) * Cinp;
        vfor<acc_t>(Cin, [&](int64_t i, int64_t m) {
          const Vec v = (vload<acc_t>(p00 + i, m) + vload<acc_t>(p01 + i, m)) +
                      (vload<acc_t>(p10 + i, m) + vload<acc_t>(p11 + i, m));
          vstore<acc_t>(d + i, v * quarter, m);
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
      gemm_k_panels<acc_t, false>(npix, cbp, Cin, P, Cinp, 1, w3t.data() + c0, Cp, nullptr, Y, cbp, true);
      return;
    }
    const int64_t ldq = round_up(npix, V);
    acc_t* PT = s.pt.get(Cin * ldq);
    transpose(P, npix, Cin, Cinp, PT, ldq);
    for (int64_t k = 0; k < Cin; ++k) std::fill(PT + k * ldq + npix, PT + (k + 1) * ldq, acc_t(0));
    acc_t* YT = s.gp.get(cb * ldq);
    gemm_k_panels<acc_t, false>(cb, ldq, Cin, w3 + c0 * Cin, Cin, 1, PT, ldq, nullptr, YT, ldq, true);
    transpose(YT, cb, npix, ldq, Y, cbp);
    if (cb < cbp) {
      for (int64_t p = 0; p < npix; ++p) std::fill(Y + p * cbp + cb, Y + (p + 1) * cbp, acc_t(0));
    }
  }

  // dst[2w] = dst[2w + 1] = scale * src[w] for w < n
  static void dup2(const acc_t* src, acc_t scale, scalar_t* dst, int64_t n) {
    int64_t w = 0;
    if constexpr (std::is_same_v<acc_t, scalar_t>) {
      const Vec s(scale);
      for (; w + V <= n; w += V) {
        const Vec v = Vec::loadu(src + w) * s;
        const auto pr = at::vec::interleave2(v, v);
        pr.first.store(dst + 2 * w);
        pr.second.store(dst + 2 * w + V);
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
      for (; i + V <= n; i += V) Vec::loadu(src + i).store(dst + i);
    }
    for (; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i]);
  }
};

// ---- entry points (arguments checked by dfc.cpp; out / grad non-empty) ----

// dfc_forward.cpp: `out` of _dfc_kernel
void forward(const at::Tensor& x, const at::Tensor& conv_weight, const BatchNormArgs& bn3, const at::Tensor& h_weight,
             const BatchNormArgs& bn4, const at::Tensor& v_weight, const BatchNormArgs& bn5, Mode mode, bool cl,
             const at::Tensor& out);

// dfc_backward.cpp: the gradients need[i] asks for into grads (the backward kernel's order); params: conv_weight,
// conv_scale, conv_bias, h_weight, h_scale, h_bias, v_weight, v_scale, v_bias
void backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor* params, Mode mode, bool cl,
              at::TensorList grads, const bool* need);

}  // namespace ghostfast::cpu::dfc
