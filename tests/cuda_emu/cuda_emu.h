// Force-included (g++ -include) into every emulated CUDA translation unit (csrc/cuda/*.cu as build.py rewrites
// them, tests/cuda_emu/sample_kernels.cu): the headers the sources include, then the CUDA keywords and intrinsics
// mapped onto the emulation runtime (cuda_emu_runtime.h). The shims in include/ stand in for cuda_runtime.h,
// c10/cuda/*.h and torch/library.h.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include "cuda_emu_runtime.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
// `__shared__` declarations are rewritten by build.py (a static one into ghostfast_emu::static_shared, the
// `extern` one into ghostfast_emu::dynamic_shared); a bare __shared__ left over does not compile.
#define __syncthreads() ::ghostfast_emu::syncthreads(__FILE__, __LINE__)
// width: the optional last argument (32 when left out)
#define GHOSTFAST_EMU_SHFL(op, mask, v, arg, ...) \
  ::ghostfast_emu::shfl(__FILE__, __LINE__, op, mask, v, arg, (__VA_ARGS__ + 0) ? (__VA_ARGS__ + 0) : 32)
#define __shfl_sync(mask, v, lane, ...) GHOSTFAST_EMU_SHFL(::ghostfast_emu::kShflIdx, mask, v, lane, __VA_ARGS__)
#define __shfl_up_sync(mask, v, d, ...) GHOSTFAST_EMU_SHFL(::ghostfast_emu::kShflUp, mask, v, d, __VA_ARGS__)
#define __shfl_down_sync(mask, v, d, ...) GHOSTFAST_EMU_SHFL(::ghostfast_emu::kShflDown, mask, v, d, __VA_ARGS__)
#define __shfl_xor_sync(mask, v, m, ...) GHOSTFAST_EMU_SHFL(::ghostfast_emu::kShflXor, mask, v, m, __VA_ARGS__)
#define __expf(x) ::expf(x)
#define __logf(x) ::logf(x)
#define __fdividef(a, b) ((a) / (b))
#define rsqrtf(x) (1.0f / ::sqrtf(x))

// The host code checks that its tensors are on the device the kernels run on: here the CPU, where the emulated
// kernels read and write them. (Every header that names c10::DeviceType::CUDA is included above.)
#define CUDA CPU
