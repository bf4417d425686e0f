// Argument checks shared by the CPU and CUDA kernels: a clear error naming what was expected and what came, never a
// crash inside a kernel.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

namespace ghostfast {

// NCHW-contiguous or channels_last-contiguous; the kernels index through the layout flag.
inline bool is_channels_last(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline void check_layout(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 4 && (t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast)), op,
              ": expected ", name, " to be a 4-D tensor contiguous in NCHW or channels_last, got shape ",
              t.sizes(), " strides ", t.strides());
}

// float32 for float16 / bfloat16 / float32 inputs, float64 for float64.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// The input x of a kernel: defined, on a `device` device, float32 / float64 / float16 / bfloat16, 4-D and dense in
// NCHW or channels_last.
inline void check_x(const at::Tensor& x, c10::DeviceType device, const char* op) {
  TORCH_CHECK(x.defined(), op, ": expected x to be a tensor, got an undefined tensor");
  TORCH_CHECK(x.device().type() == device, op, ": expected x on ", c10::DeviceTypeName(device, true), ", got ",
              x.device());
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": expected x of dtype float32, float64, float16 or bfloat16, got ", dt);
  check_layout(x, op, "x");
}

// A weight, a folded per-channel vector, a statistics output or a parameter's gradient: defined, on x's device, of
// `dtype` and `shape`, contiguous.
inline void check_param(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype, const char* op,
                        const char* name, at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), " (x's device), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": expected ", name, " contiguous, got strides ", t.strides());
}

// An activation-sized output or gradient (out, grad_out, grad_x): defined, on x's device, x's dtype, `shape`. Its
// layout is checked by pick_channels_last.
inline void check_output(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name,
                         at::IntArrayRef shape) {
  TORCH_CHECK(t.defined(), op, ": expected ", name, " to be a tensor, got an undefined tensor");
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), " (x's device), got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": expected ", name, " of dtype ", x.scalar_type(),
              " (x's dtype), got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": expected ", name, " of shape ", shape, ", got ", t.sizes());
}

// The Ghost module kernels' activation (schema argument `int act`): the codes of ghostfast.reference.ACT_CODES,
// the same in every backend. Each backend implements them in one place (cpu/activation.h, cuda/common.cuh).
enum class Act : int { None = 0, Relu = 1, Relu6 = 2, Hardswish = 3, Silu = 4 };
constexpr int64_t kNumActs = 5;

inline Act check_act(const char* op, int64_t act) {
  TORCH_CHECK(act >= 0 && act < kNumActs, op, ": expected act an activation code in [0, ", kNumActs,
              ") (0 none, 1 relu, 2 relu6, 3 hardswish, 4 silu: ghostfast.reference.ACT_CODES), got ", act);
  return static_cast<Act>(act);
}

// An entry of a backward kernel's `grads`: an undefined or empty tensor marks a gradient that is not needed.
inline bool grad_requested(const at::Tensor& g) { return g.defined() && g.numel() > 0; }

// The layout a kernel indexes x and the activation-sized `tensors` with: x's own when they all are dense in it, else
// the other one when they all are dense in that (a layout is ambiguous where sizes are 1: C_in == 1 or 1x1 images
// read the same either way, and then the outputs' layout decides). Leave empty tensors out.
inline bool pick_channels_last(const char* op, const at::Tensor& x,
                               const std::vector<std::pair<const char*, at::Tensor>>& tensors) {
  auto dense_in = [&](at::MemoryFormat f) {
    if (!x.is_contiguous(f)) return false;
    for (const auto& nt : tensors) {
      if (!nt.second.is_contiguous(f)) return false;
    }
    return true;
  };
  const bool pref_cl = is_channels_last(x);
  const auto pref = pref_cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const auto other = pref_cl ? at::MemoryFormat::Contiguous : at::MemoryFormat::ChannelsLast;
  if (dense_in(pref)) return pref_cl;
  if (dense_in(other)) return !pref_cl;
  for (const auto& nt : tensors) {
    TORCH_CHECK(nt.second.is_contiguous(pref), op, ": expected ", nt.first, " contiguous in x's memory format (",
                pref_cl ? "channels_last" : "NCHW", "), got shape ", nt.second.sizes(), " strides ",
                nt.second.strides());
  }
  TORCH_CHECK(false, op, ": expected x and ", tensors.size() == 1 ? tensors[0].first : "the activation tensors",
              " in one memory format");
}

}  // namespace ghostfast
