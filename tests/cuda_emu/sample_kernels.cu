// Small CUDA kernels, correct and deliberately broken, that prove the emulation harness can fail: each broken
// variant carries one defect of a class the harness must catch (a missing barrier, an unwritten output, a write past
// shared or global memory, a read past global memory, a divergent barrier or shuffle). Built and rewritten exactly
// as csrc/cuda/*.cu (build.py); x and out are float32, 1-D, n a multiple of 256.
#include <ATen/ATen.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

namespace ghostfast_sample {
namespace {

constexpr int kThreads = 256;

enum Variant : int64_t {
  kReverse = 0,               // out = x reversed within each block of 256 (shared memory, barrier): correct
  kReverseNoBarrier = 1,      // ... without the barrier: reads shared memory other threads have not written yet
  kCopySkipLast = 2,          // out = x, but the last element is never written
  kDynamicOverrun = 3,        // out = x through dynamic shared memory, one element written past its end
  kStaticOverrun = 4,         // out = x through a static __shared__ array, one element written past its end
  kDivergentBarrier = 5,      // out = x with a __syncthreads only half the block reaches
  kPartialShuffle = 6,        // out = x with a full-mask shuffle only half of each warp executes
  kGlobalWritePast = 7,       // out[i + 1] = x[i]: the last thread writes past out
  kGlobalReadPast = 8,        // out[i] = x[i + 1]: the last thread reads past x
  kWarpSumAtomic = 9,         // out[0] += sum(x): warp shuffles and atomics (out zeroed by the caller): correct
  kChunked = 10,              // one block: out[t] = sum_k x[256 k + (t + 1) % 256], chunks staged in shared memory
  kChunkedNoReuseBarrier = 11,  // ... without the barrier before a chunk overwrites the previous one
  kWriteInput = 12,           // out = x, and x zeroed behind the caller's back
};

template <bool kBarrier>
__global__ void __launch_bounds__(kThreads) reverse_kernel(const float* x, float* out) {
  __shared__ float s[kThreads];
  const int64_t base = int64_t(blockIdx.x) * kThreads;
  s[threadIdx.x] = x[base + threadIdx.x];
  if (kBarrier) __syncthreads();
  out[base + threadIdx.x] = s[kThreads - 1 - threadIdx.x];
}

__global__ void __launch_bounds__(kThreads) copy_skip_last_kernel(const float* x, float* out, int64_t n) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n - 1) out[i] = x[i];
}

__global__ void __launch_bounds__(kThreads) dynamic_overrun_kernel(const float* x, float* out) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* s = reinterpret_cast<float*>(smem_raw);  // kThreads floats
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  s[threadIdx.x + 1] = x[i];
  __syncthreads();
  out[i] = threadIdx.x == 0 ? x[i] : s[threadIdx.x];
}

__global__ void __launch_bounds__(kThreads) static_overrun_kernel(const float* x, float* out) {
  __shared__ float s[kThreads];
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  s[threadIdx.x + 1] = x[i];
  __syncthreads();
  out[i] = threadIdx.x == 0 ? x[i] : s[threadIdx.x];
}

__global__ void __launch_bounds__(kThreads) divergent_barrier_kernel(const float* x, float* out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (threadIdx.x < kThreads / 2) __syncthreads();
  out[i] = x[i];
}

__global__ void __launch_bounds__(kThreads) partial_shuffle_kernel(const float* x, float* out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  float v = x[i];
  if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 0);
  out[i] = v;
}

__global__ void __launch_bounds__(kThreads) shifted_copy_kernel(const float* x, float* out, int64_t n, int write_shift,
                                                                int read_shift) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (i < n) out[i + write_shift] = x[i + read_shift];
}

__global__ void __launch_bounds__(kThreads) warp_sum_atomic_kernel(const float* x, float* out) {
  float v = x[int64_t(blockIdx.x) * kThreads + threadIdx.x];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) atomicAdd(out, v);
}

template <bool kReuseBarrier>
__global__ void __launch_bounds__(kThreads) chunked_kernel(const float* x, float* out, int64_t chunks) {
  __shared__ float s[kThreads];
  float acc = 0.0f;
  for (int64_t k = 0; k < chunks; ++k) {
    if (kReuseBarrier) __syncthreads();  // the previous chunk's readers are done with s
    s[threadIdx.x] = x[k * kThreads + threadIdx.x];
    __syncthreads();
    acc += s[(threadIdx.x + 1) % kThreads];
  }
  out[threadIdx.x] = acc;
}

__global__ void __launch_bounds__(kThreads) write_input_kernel(const float* x, float* out) {
  const int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  out[i] = x[i];
  const_cast<float*>(x)[i] = 0.0f;
}

void sample_kernel(const at::Tensor& x, const at::Tensor& out, int64_t variant) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && x.is_contiguous() &&
                  out.is_contiguous() && x.dim() == 1 && x.numel() % kThreads == 0 && x.numel() > 0,
              "sample_kernel: x and out float32, contiguous, 1-D, a positive multiple of 256 elements");
  const int64_t n = x.numel();
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const unsigned int blocks = static_cast<unsigned int>(n / kThreads);
  switch (variant) {
    case kReverse: reverse_kernel<true><<<blocks, kThreads>>>(xp, op); break;
    case kReverseNoBarrier: reverse_kernel<false><<<blocks, kThreads>>>(xp, op); break;
    case kCopySkipLast: copy_skip_last_kernel<<<blocks, kThreads>>>(xp, op, n); break;
    case kDynamicOverrun: dynamic_overrun_kernel<<<blocks, kThreads, kThreads * sizeof(float)>>>(xp, op); break;
    case kStaticOverrun: static_overrun_kernel<<<blocks, kThreads>>>(xp, op); break;
    case kDivergentBarrier: divergent_barrier_kernel<<<blocks, kThreads>>>(xp, op); break;
    case kPartialShuffle: partial_shuffle_kernel<<<blocks, kThreads>>>(xp, op); break;
    case kGlobalWritePast: shifted_copy_kernel<<<blocks, kThreads>>>(xp, op, n, 1, 0); break;
    case kGlobalReadPast: shifted_copy_kernel<<<blocks, kThreads>>>(xp, op, n, 0, 1); break;
    case kWarpSumAtomic: warp_sum_atomic_kernel<<<blocks, kThreads>>>(xp, op); break;
    case kChunked: chunked_kernel<true><<<1, kThreads>>>(xp, op, n / kThreads); break;
    case kChunkedNoReuseBarrier: chunked_kernel<false><<<1, kThreads>>>(xp, op, n / kThreads); break;
    case kWriteInput: write_input_kernel<<<blocks, kThreads>>>(xp, op); break;
    default: TORCH_CHECK(false, "sample_kernel: unknown variant ", variant);
  }
}

}  // namespace
}  // namespace ghostfast_sample

TORCH_LIBRARY_IMPL(ghostfast, CUDA, m) { m.impl("_sample_kernel", &ghostfast_sample::sample_kernel); }
