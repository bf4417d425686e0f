// torch.ops.ghostfast_emu: the emulated CUDA entry points of csrc/cuda (each under its schema name, the same C++
// signature as kernel_signatures.h, schemas inferred from it), the sample kernels of sample_kernels.cu and the
// emulator's controls. Compiled against the real torch/library.h; the emulated TUs registered their functions in
// the registry (registry.h) at static initialisation, looked up here at call time.
#include <torch/library.h>

#include "cuda_emu_runtime.h"
#include "kernel_signatures.h"
#include "registry.h"

namespace {

template <const char* Name, typename Sig>
struct Forward;
template <const char* Name, typename... A>
struct Forward<Name, void(A...)> {
  static void call(A... a) { ghostfast_emu::registered<void(A...)>(Name)(a...); }
};

constexpr char kGhost[] = "_ghost_module_kernel";
constexpr char kGhostBackward[] = "_ghost_module_backward_kernel";
constexpr char kDfc[] = "_dfc_kernel";
constexpr char kDfcBackward[] = "_dfc_backward_kernel";
constexpr char kSample[] = "_sample_kernel";
using SampleKernel = void(const at::Tensor& x, const at::Tensor& out, int64_t variant);

// thread_order, block_order: 0 forward, 1 reverse, 2 random (seeded); sm_count: what cudaDeviceGetAttribute says
void configure(int64_t thread_order, int64_t block_order, int64_t seed, int64_t sm_count) {
  TORCH_CHECK(thread_order >= 0 && thread_order <= 2 && block_order >= 0 && block_order <= 2,
              "cuda_emu: orders are 0 (forward), 1 (reverse) or 2 (random)");
  TORCH_CHECK(sm_count >= 1, "cuda_emu: sm_count >= 1");
  auto& c = ghostfast_emu::config();
  c.thread_order = static_cast<int>(thread_order);
  c.block_order = static_cast<int>(block_order);
  c.seed = static_cast<uint64_t>(seed);
  c.sm_count = static_cast<int>(sm_count);
}

void reset() { ghostfast_emu::reset(); }

// [launches, blocks, threads, barriers, warp_syncs, atomics] since reset()
at::Tensor stats() {
  const auto& s = ghostfast_emu::stats();
  const int64_t v[] = {s.launches, s.blocks, s.threads, s.barriers, s.warp_syncs, s.atomics};
  return at::tensor(at::IntArrayRef(v, 6), at::kLong);
}

std::string launch_log() { return ghostfast_emu::launch_log(); }

}  // namespace

TORCH_LIBRARY(ghostfast_emu, m) {
  m.def("_ghost_module_kernel", &Forward<kGhost, ghostfast::GhostModuleKernel>::call);
  m.def("_ghost_module_backward_kernel", &Forward<kGhostBackward, ghostfast::GhostModuleBackwardKernel>::call);
  m.def("_dfc_kernel", &Forward<kDfc, ghostfast::DfcKernel>::call);
  m.def("_dfc_backward_kernel", &Forward<kDfcBackward, ghostfast::DfcBackwardKernel>::call);
  m.def("_sample_kernel", &Forward<kSample, SampleKernel>::call);
  m.def("configure", &configure);
  m.def("reset", &reset);
  m.def("stats", &stats);
  m.def("launch_log", &launch_log);
}
