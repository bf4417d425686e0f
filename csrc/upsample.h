// Source indices of the gate upsample, index for index as F.interpolate computes them (ATen's UpSample.h:
// nearest uses a float32 scale in/out; bilinear with align_corners=False uses the accumulation type acc_t).
// Shared by the CPU and CUDA kernels of both ops.
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>

namespace ghostfast {

C10_HOST_DEVICE inline int64_t nearest_source(int64_t dst, int64_t in_size, int64_t out_size) {
  if (out_size == in_size) return dst;
  if (out_size == 2 * in_size) return dst >> 1;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  const int64_t src = static_cast<int64_t>(::floorf(static_cast<float>(dst) * scale));
  return src < in_size - 1 ? src : in_size - 1;
}

template <typename acc_t>
struct LinearSource {
  int64_t i0;
  int64_t i1;
  acc_t lambda;  // weight of i1; i0 gets 1 - lambda
};

template <typename acc_t>
C10_HOST_DEVICE inline LinearSource<acc_t> linear_source(int64_t dst, int64_t in_size, int64_t out_size) {
  const acc_t scale = static_cast<acc_t>(in_size) / static_cast<acc_t>(out_size);
  acc_t real = scale * (static_cast<acc_t>(dst) + static_cast<acc_t>(0.5)) - static_cast<acc_t>(0.5);
  if (real < static_cast<acc_t>(0)) real = static_cast<acc_t>(0);
  int64_t i0 = static_cast<int64_t>(::floor(real));
  if (i0 > in_size - 1) i0 = in_size - 1;
  acc_t lambda = real - static_cast<acc_t>(i0);
  if (lambda < static_cast<acc_t>(0)) lambda = static_cast<acc_t>(0);
  if (lambda > static_cast<acc_t>(1)) lambda = static_cast<acc_t>(1);
  return {i0, i0 + (i0 < in_size - 1 ? 1 : 0), lambda};
}

}  // namespace ghostfast
