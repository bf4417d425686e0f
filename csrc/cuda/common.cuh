// The shared layer of the CUDA kernels of both ops: launch constants, the accumulation dtype, the sigmoid and the
// Ghost module's activations, warp reductions, the per-block BatchNorm fold, the tile chooser and launch helpers,
// and the host wrappers' argument checks.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>

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

__device__ __forceinline__ float sigmoid_acc(float z) { return 1.0f / (1.0f + ::expf(-z)); }
__device__ __forceinline__ double sigmoid_acc(double z) { return 1.0 / (1.0 + ::exp(-z)); }

// The Ghost module's activations (common.h's Act, the same for a whole launch: a uniform branch), the one place the
// CUDA kernels compute them: act_forward(act, y) and act_backward(act, g, y) = g * act'(y), both of the
// pre-activation y (after the BatchNorm), as eager PyTorch computes them (cpu/activation.h has the table). The
// forwards let NaN through; the backward at a NaN y is g for relu, relu6 and hardswish (threshold_backward and
// hardtanh_backward test y <= 0), NaN for silu.
template <typename acc_t>
__device__ __forceinline__ acc_t act_forward(Act act, acc_t y) {
  const acc_t zero(0), six(6);
  switch (act) {
    case Act::Relu:
      return y < zero ? zero : y;
    case Act::Relu6:
      return y < zero ? zero : (y > six ? six : y);
    case Act::Hardswish: {
      acc_t t = y + acc_t(3);
      t = t < zero ? zero : (t > six ? six : t);
      return y * t / six;
    }
    case Act::Silu:
      return y * sigmoid_acc(y);
    default:
      return y;
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t act_backward(Act act, acc_t g, acc_t y) {
  const acc_t zero(0), one(1), three(3);
  switch (act) {
    case Act::Relu:
      return y <= zero ? zero : g;  // threshold_backward: g at NaN
    case Act::Relu6:
      return (y <= zero || y >= acc_t(6)) ? zero : g;  // hardtanh_backward
    case Act::Hardswish:
      return y <= -three ? zero : (y < three ? g * (y / three + acc_t(0.5)) : g);  // hardswish_backward
    case Act::Silu: {
      const acc_t s = sigmoid_acc(y);
      return g * s * (one + y * (one - s));
    }
    default:
      return g;
  }
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

// ---- argument checks (host), on top of ../common.h: each names the op, the argument, what was expected and what
// came. The kernels index x, out, grad_out and grad_x through their strides; `cl` (from pick_channels_last) only
// picks the thread mapping that coalesces.

// One entry of a backward kernel's `grads`: its name, the input it is the gradient of (null: none, e.g. no gate),
// and whether it is in the accumulation dtype (the folded vectors) rather than the input's.
struct GradSlot {
  const char* name;
  const at::Tensor* input;
  bool acc_dtype;
};

// grads[0] is x's gradient (activation-sized: its layout is checked by pick_channels_last), the others are
// parameter-like (contiguous). Empty tensors mark gradients that are not needed.
inline void check_grads(const char* op, at::TensorList grads, const at::Tensor& x,
                        std::initializer_list<GradSlot> slots) {
  TORCH_CHECK(grads.size() == slots.size(), op, ": expected ", slots.size(), " tensors in grads, got ", grads.size());
  const at::ScalarType acc = acc_type(x.scalar_type());
  size_t i = 0;
  for (const GradSlot& s : slots) {
    const at::Tensor& g = grads[i];
    if (grad_requested(g)) {
      TORCH_CHECK(s.input != nullptr, op, ": expected ", s.name, " empty (its input was not given), got shape ",
                  g.sizes());
      if (i == 0) {
        check_output(g, x, op, s.name, x.sizes());
      } else {
        check_param(g, x, s.acc_dtype ? acc : x.scalar_type(), op, s.name, s.input->sizes());
      }
    }
    ++i;
  }
}

inline bool any_requested(at::TensorList grads) {
  for (const at::Tensor& g : grads)
    if (grad_requested(g)) return true;
  return false;
}

// ---- gradient buffers of the backward kernels (host) ------------------------------------------------------------

// An accumulation-dtype buffer for a reduced gradient: the gradient itself when it already is a contiguous
// acc-dtype tensor (zeroed here), else a zeroed workspace copied into it by finish().
struct AccBuffer {
  at::Tensor grad, acc;
  void init(const at::Tensor& g, at::ScalarType acc_dtype) {
    if (!grad_requested(g)) return;
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
