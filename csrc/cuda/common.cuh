// The shared layer of the CUDA kernels of both ops: launch constants, the accumulation dtype, warp reductions, the
// per-block BatchNorm fold, the tile chooser and launch helpers, and the host wrappers' argument checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>

#include "batch_norm.h"
#include "common.h"

namespace ghostfast {

constexpr int kThreads = 256;               // every kernel runs 256 threads per block
constexpr int kWarps = kThreads / 32;
constexpr size_t kDefaultSmem = 48 * 1024;  // dynamic shared memory usable without opting in

// acc_t: float for float / half / bfloat16, double for double.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

template <typename acc_t, typename T>
__device__ __forceinline__ acc_t to_acc(T v) {
  return static_cast<acc_t>(v);
}

// F.relu: negative -> 0, NaN passes through.
template <typename acc_t>
__device__ __forceinline__ acc_t relu_keep_nan(acc_t v) {
  return v < acc_t(0) ? acc_t(0) : v;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The (image n, tile row, tile column, channel block) a block owns; the channel block varies fastest.
struct BlockTile {
  int64_t n, th, tw, cb;
};

__device__ __forceinline__ BlockTile block_tile(int64_t tiles_h, int64_t tiles_w, int64_t ncb) {
  int64_t bid = blockIdx.x;
  BlockTile t;
  t.cb = bid % ncb;
  bid /= ncb;
  t.tw = bid % tiles_w;
  bid /= tiles_w;
  t.th = bid % tiles_h;
  t.n = bid / tiles_h;
  return t;
}

// BatchNorm `bn` folded for channels c0 .. c0 + count - 1 into per-block tables: scale[i], shift[i] of channel c0 + i
// (0 for channels past `channels`). Block-wide; the caller syncs before reading the tables.
template <typename acc_t>
__device__ __forceinline__ void fold_batch_norm(const BatchNormArgs& bn, int64_t c0, int64_t count, int64_t channels,
                                                acc_t* scale, acc_t* shift) {
  for (int64_t i = threadIdx.x; i < count; i += kThreads) {
    acc_t s = acc_t(0), b = acc_t(0);
    if (c0 + i < channels) bn.fold<acc_t>(c0 + i, s, b);
    scale[i] = s;
    shift[i] = b;
  }
}

// ---- launch helpers (host) ------------------------------------------------------------------------------------

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An attribute of the current device (ATen/cuda/CUDAContext.h is not included: it needs cuSPARSE's headers).
inline int device_attribute(cudaDeviceAttr attr) {
  int value = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attr, c10::cuda::current_device()));
  return value;
}

struct TileChoice {
  int th = 0, tw = 0;
  size_t smem = 0;
};

// The tile (at most 64 x 64 of a rows x cols plane) minimising (number of tiles) x (region pixels per tile + a fixed
// per-block cost) whose shared memory fits `budget` (capped at what the device allows a block).
// SmemFn(th, tw) -> bytes, WorkFn(th, tw) -> region pixels. A 1x1 tile fits every size the ops allow (dw <= 7, the
// DFC's 5 taps), so failing to find one is an error, not a fallback.
template <typename SmemFn, typename WorkFn>
TileChoice choose_tile(const char* op, int64_t rows, int64_t cols, size_t budget, SmemFn smem_of, WorkFn work_of) {
  constexpr int kMaxSide = 64;
  budget = std::min(budget, static_cast<size_t>(device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin)));
  TileChoice best;
  double best_cost = std::numeric_limits<double>::infinity();
  const int hmax = static_cast<int>(std::min<int64_t>(rows, kMaxSide));
  const int wmax = static_cast<int>(std::min<int64_t>(cols, kMaxSide));
  for (int th = 1; th <= hmax; ++th) {
    for (int tw = 1; tw <= wmax; ++tw) {
      const size_t smem = smem_of(th, tw);
      if (smem > budget) continue;
      const double tiles = double((rows + th - 1) / th) * double((cols + tw - 1) / tw);
      const double cost = tiles * (double(work_of(th, tw)) + 64.0);
      if (cost < best_cost * (1.0 - 1e-9) ||
          (cost <= best_cost * (1.0 + 1e-9) && (tw > best.tw || (tw == best.tw && th > best.th)))) {
        best_cost = cost;
        best.th = th;
        best.tw = tw;
        best.smem = smem;
      }
    }
  }
  TORCH_CHECK(best.th != 0, op, ": no tile fits this GPU's shared memory (a 1x1 tile needs ", smem_of(1, 1),
              " bytes, the kernel may use ", budget, ")");
  return best;
}

template <typename Kernel>
void set_smem_limit(Kernel kernel, size_t bytes) {
  if (bytes > kDefaultSmem)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

inline unsigned int grid_size(const char* op, int64_t blocks) {
  TORCH_CHECK(blocks <= std::numeric_limits<int>::max(), op, ": the problem needs ", blocks,
              " blocks, more than one launch can take (", std::numeric_limits<int>::max(), ")");
  return static_cast<unsigned int>(blocks);
}

// ---- argument checks (host): each names the op, the argument, what was expected and what came ----------------

// x: on a CUDA device, dense in NCHW or channels_last, a dtype the kernels instantiate.
inline void check_input(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected x on a CUDA device, got ", x.device());
  check_layout(x, op, "x");
  const at::ScalarType dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, op,
              ": expected x of dtype float32, float64, float16 or bfloat16, got ", dt);
}

// A weight: x's device and dtype, contiguous (its shape is checked by the caller).
inline void check_weight(const at::Tensor& w, const at::Tensor& x, const char* op, const char* name) {
  check_tensor(w, x, x.scalar_type(), op, name);
  TORCH_CHECK(w.is_contiguous(), op, ": expected ", name, " contiguous, got strides ", w.strides());
}

// An activation-shaped tensor (out, grad_out): the given sizes, x's device and dtype.
inline void check_sized(const at::Tensor& t, const at::Tensor& x, at::IntArrayRef sizes, const char* op,
                        const char* name, const std::string& context = "") {
  TORCH_CHECK(t.sizes() == sizes, op, ": expected ", name, " of shape ", sizes, context, ", got ", t.sizes());
  TORCH_CHECK(t.device() == x.device(), op, ": expected ", name, " on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": expected ", name, " of dtype ", x.scalar_type(), ", got ",
              t.scalar_type());
}

// `t` dense in x's memory format (channels_last when x is channels_last, else NCHW). Shapes where both formats
// coincide (a 1x1 gate, one channel) pass either way; the kernels index through the strides.
inline void check_dense_like(const at::Tensor& t, const at::Tensor& x, const char* op, const char* name) {
  const bool cl = is_channels_last(x);
  TORCH_CHECK(t.dim() == 4 && t.is_contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous),
              op, ": expected ", name, " dense in the input's memory format (", cl ? "channels_last" : "NCHW",
              "), got shape ", t.sizes(), " strides ", t.strides());
}

// A folded BatchNorm vector of the backward kernels: [n], contiguous, the accumulation dtype.
inline void check_acc_vector(const at::Tensor& v, const at::Tensor& x, int64_t n, const char* op, const char* name) {
  const at::ScalarType acc = acc_type(x.scalar_type());
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, op, ": expected ", name, " of shape [", n, "], got ", v.sizes());
  TORCH_CHECK(v.device() == x.device(), op, ": expected ", name, " on ", x.device(), ", got ", v.device());
  TORCH_CHECK(v.scalar_type() == acc, op, ": expected ", name, " of dtype ", acc, " (the accumulation dtype of ",
              x.scalar_type(), " inputs), got ", v.scalar_type());
  TORCH_CHECK(v.is_contiguous(), op, ": expected ", name, " contiguous, got strides ", v.strides());
}

// ---- gradient buffers of the backward kernels (host) ------------------------------------------------------------

// An empty tensor in `grads` marks a gradient that is not needed.
inline bool needed(const at::Tensor& g) { return g.defined() && g.numel() > 0; }

inline void check_grad(const at::Tensor& g, const at::Tensor& like, at::ScalarType dtype, const char* op,
                       const char* name) {
  if (!needed(g)) return;
  TORCH_CHECK(g.sizes() == like.sizes(), op, ": expected ", name, " of shape ", like.sizes(), ", got ", g.sizes());
  TORCH_CHECK(g.device() == like.device(), op, ": expected ", name, " on ", like.device(), ", got ", g.device());
  TORCH_CHECK(g.scalar_type() == dtype, op, ": expected ", name, " of dtype ", dtype, ", got ", g.scalar_type());
}

inline bool any_needed(at::TensorList grads) {
  for (const at::Tensor& g : grads)
    if (needed(g)) return true;
  return false;
}

// An accumulation-dtype buffer for a reduced gradient: the gradient itself when it already is a contiguous
// acc-dtype tensor (zeroed here), else a zeroed workspace copied into it by finish().
struct AccBuffer {
  at::Tensor grad, acc;
  void init(const at::Tensor& g, at::ScalarType acc_dtype) {
    if (!needed(g)) return;
    grad = g;
    if (g.scalar_type() == acc_dtype && g.is_contiguous()) {
      g.zero_();
      acc = g;
    } else {
      acc = at::zeros(g.sizes(), g.options().dtype(acc_dtype));
    }
  }
  template <typename acc_t>
  acc_t* ptr() const {
    return acc.defined() ? acc.data_ptr<acc_t>() : nullptr;
  }
  void finish() const {
    if (grad.defined() && !acc.is_same(grad)) grad.copy_(acc);
  }
};

}  // namespace ghostfast
