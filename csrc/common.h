// Argument checks shared by the CPU and CUDA kernels: a clear error, never a crash inside a kernel.
#pragma once

#include <ATen/ATen.h>

#include <string>

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

inline void check_same_format(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  check_layout(t, op, name);
  TORCH_CHECK(is_channels_last(t) == is_channels_last(x), op, ": expected ", name, " in the input's memory format (",
              is_channels_last(x) ? "channels_last" : "NCHW", ")");
}

inline void check_tensor(const at::Tensor& t, const at::Tensor& x, at::ScalarType dtype, const char* op,
                         const char* name) {
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous() || t.dim() == 4, op, ": expected ", name, " contiguous");
}

// float32 for float16 / bfloat16 / float32 inputs, float64 for float64.
inline at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace ghostfast
