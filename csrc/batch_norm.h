// BatchNorm folded per channel inside the launch, from the live tensors (shared by the CPU and CUDA kernels).
//
// A stage's BatchNorm arrives as four optional per-channel vectors and eps (the schemas' `bnK_weight`,
// `bnK_bias`, `bnK_mean`, `bnK_var`, `bnK_eps`) and is applied as `y = z * scale + shift` with
//     scale = weight * 1 / sqrt(var + eps),    shift = bias - mean * scale,
// a missing vector standing for the identity (weight 1, bias 0, mean 0; no var: no 1/sqrt). So one form covers
// an eval-mode BatchNorm (running statistics), a training-mode one (the batch statistics as mean and var), a
// BatchNorm without affine parameters, a conv bias with no BatchNorm (bias only), already folded (scale, shift)
// pairs (weight, bias), and no normalisation at all. There is no cache of folded values that could go stale: the
// kernels read what the module holds now. Each vector may have its own dtype (float32, float64, float16,
// bfloat16): a half model's BatchNorm is half, autocast's stays float32, batch statistics come in the
// accumulation dtype. Folding happens in the accumulation dtype (float64 for float64 inputs, else float32).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <type_traits>

#if defined(__CUDACC__)
#define GHOSTFAST_HOST_DEVICE __host__ __device__
#else
#define GHOSTFAST_HOST_DEVICE
#endif

namespace ghostfast {

enum class VectorType : int8_t { kNone = 0, kFloat, kDouble, kHalf, kBFloat16 };

// One optional per-channel vector, type-erased so that one kernel instantiation reads any of the four dtypes.
struct ChannelVector {
  const void* data = nullptr;
  VectorType type = VectorType::kNone;

  GHOSTFAST_HOST_DEVICE bool present() const { return type != VectorType::kNone; }

  template <typename acc_t>
  GHOSTFAST_HOST_DEVICE acc_t at(int64_t c, acc_t missing) const {
    switch (type) {
      case VectorType::kFloat: return static_cast<acc_t>(static_cast<const float*>(data)[c]);
      case VectorType::kDouble: return static_cast<acc_t>(static_cast<const double*>(data)[c]);
      case VectorType::kHalf: return static_cast<acc_t>(static_cast<float>(static_cast<const c10::Half*>(data)[c]));
      case VectorType::kBFloat16:
        return static_cast<acc_t>(static_cast<float>(static_cast<const c10::BFloat16*>(data)[c]));
      default: return missing;
    }
  }
};

// The four vectors and eps of one BatchNorm stage, passed by value into kernels.
struct BatchNormArgs {
  ChannelVector weight, bias, mean, var;
  double eps = 0.0;

  // (scale, shift) of channel c in the accumulation dtype.
  template <typename acc_t>
  GHOSTFAST_HOST_DEVICE void fold(int64_t c, acc_t& scale, acc_t& shift) const {
    acc_t s = weight.at<acc_t>(c, acc_t(1));
    if (var.present()) {
      const acc_t v = var.at<acc_t>(c, acc_t(0)) + static_cast<acc_t>(eps);
      if constexpr (sizeof(acc_t) == sizeof(float)) {
        s = s / sqrtf(v);
      } else {
        s = s / sqrt(v);
      }
    }
    scale = s;
    shift = bias.at<acc_t>(c, acc_t(0)) - mean.at<acc_t>(c, acc_t(0)) * s;
  }

#if !defined(__CUDACC__)
  // Host side: (scale, shift) of channels [0, n) into two arrays, the same values as fold() per channel. Each
  // vector's dtype is dispatched once, not per element, and the loops are plain array arithmetic the compiler
  // vectorises (the per-element switch of fold() cost ~2.6 ns a channel: ~7.5 us per DFC call at 3 x 960).
  template <typename acc_t>
  void fold_all(int64_t n, acc_t* scale, acc_t* shift) const {
    load(weight, n, scale, acc_t(1));
    if (var.present()) {
      load(var, n, shift, acc_t(0));  // shift holds var + eps for a moment
      const acc_t e = static_cast<acc_t>(eps);
      for (int64_t c = 0; c < n; ++c) scale[c] = scale[c] / std::sqrt(shift[c] + e);
    }
    load(mean, n, shift, acc_t(0));
    for (int64_t c = 0; c < n; ++c) shift[c] = -(shift[c] * scale[c]);
    if (bias.present()) {
      visit(bias, [&](const auto* b) {
        for (int64_t c = 0; c < n; ++c) shift[c] = to_acc<acc_t>(b[c]) + shift[c];
      });
    }
  }

 private:
  template <typename acc_t, typename T>
  static acc_t to_acc(T v) {
    if constexpr (std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>) {
      return static_cast<acc_t>(static_cast<float>(v));
    } else {
      return static_cast<acc_t>(v);
    }
  }

  // f(typed pointer) for a present vector
  template <typename F>
  static void visit(const ChannelVector& v, F&& f) {
    switch (v.type) {
      case VectorType::kFloat: f(static_cast<const float*>(v.data)); break;
      case VectorType::kDouble: f(static_cast<const double*>(v.data)); break;
      case VectorType::kHalf: f(static_cast<const c10::Half*>(v.data)); break;
      case VectorType::kBFloat16: f(static_cast<const c10::BFloat16*>(v.data)); break;
      default: break;
    }
  }

  // dst[c] = v[c] in acc_t, or `missing` when v is absent
  template <typename acc_t>
  static void load(const ChannelVector& v, int64_t n, acc_t* dst, acc_t missing) {
    if (!v.present()) {
      std::fill_n(dst, n, missing);
      return;
    }
    visit(v, [&](const auto* p) {
      for (int64_t c = 0; c < n; ++c) dst[c] = to_acc<acc_t>(p[c]);
    });
  }
#endif
};

// Host side: checks one optional vector (1-D, `channels` long, contiguous, on x's device, a floating dtype the
// kernels read) and erases its type. A clear error naming what was expected and what came.
inline ChannelVector channel_vector(const std::optional<at::Tensor>& t, int64_t channels, const at::Tensor& x,
                                    const char* op, const char* name) {
  ChannelVector v;
  if (!t.has_value() || !t->defined()) return v;
  const at::Tensor& u = *t;
  TORCH_CHECK(u.device() == x.device(), op, ": expected ", name, " on ", x.device(), ", got ", u.device());
  TORCH_CHECK(u.dim() == 1 && u.size(0) == channels, op, ": expected ", name, " of shape (", channels, ",), got ",
              u.sizes());
  TORCH_CHECK(u.is_contiguous(), op, ": expected ", name, " contiguous, got strides ", u.strides());
  switch (u.scalar_type()) {
    case at::kFloat: v.type = VectorType::kFloat; break;
    case at::kDouble: v.type = VectorType::kDouble; break;
    case at::kHalf: v.type = VectorType::kHalf; break;
    case at::kBFloat16: v.type = VectorType::kBFloat16; break;
    default:
      TORCH_CHECK(false, op, ": expected ", name, " of dtype float32, float64, float16 or bfloat16, got ",
                  u.scalar_type());
  }
  v.data = u.data_ptr();
  return v;
}

inline BatchNormArgs batch_norm_args(const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
                                     const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& var,
                                     double eps, int64_t channels, const at::Tensor& x, const char* op,
                                     const char* stage) {
  const std::string s(stage);
  BatchNormArgs bn;
  bn.weight = channel_vector(weight, channels, x, op, (s + "_weight").c_str());
  bn.bias = channel_vector(bias, channels, x, op, (s + "_bias").c_str());
  bn.mean = channel_vector(mean, channels, x, op, (s + "_mean").c_str());
  bn.var = channel_vector(var, channels, x, op, (s + "_var").c_str());
  bn.eps = eps;
  return bn;
}

}  // namespace ghostfast
