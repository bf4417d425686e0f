// The CUDA execution model on the CPU, for tests: the built-in indices, __syncthreads, warp shuffles, sequential
// atomics, shared memory (poisoned before every block) and kernel launches. Each CUDA thread of a block is a fiber
// on one OS thread; the threads of a block run between barriers in the order configure() picks (forward, reverse,
// random: a different permutation per phase), blocks run one after another (forward, reverse or random order).
// Misuse (divergent or partial barriers and shuffles, writes outside shared memory, bad launch configurations)
// raises at the launch: ghostfast_emu::EmuError. Plain C++, no torch: the kernel TUs see it through cuda_emu.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

// ---- the CUDA runtime types and built-ins the kernels and launch code name ------------------------------------
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
};
extern uint3 threadIdx;  // set by the scheduler before it resumes a thread
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;

typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorLaunchFailure = 719 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace ghostfast_emu {

struct EmuError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Config {
  int thread_order = kForward;
  int block_order = kForward;
  uint64_t seed = 0;
  int sm_count = 132;                  // H100 / H200 SXM
  int smem_optin_max = 232448;         // sm_90: 227 KB of dynamic shared memory per block, opted in
  static constexpr int kStaticSmemMax = 48 * 1024;
  static constexpr int kDefaultDynamicSmem = 48 * 1024;
};
Config& config();

// Counters over all launches since reset().
struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, barriers = 0, warp_syncs = 0, atomics = 0;
};
Stats& stats();
std::string& launch_log();  // one line per launch: "<launch signature>|kernel address|grid|block|dynamic smem"
void reset();

// ---- device side --------------------------------------------------------------------------------------------
void syncthreads(const char* file, int line);

enum ShflOp : int { kShflIdx = 0, kShflUp = 1, kShflDown = 2, kShflXor = 3 };
uint64_t shfl_bits(const char* file, int line, unsigned mask, uint64_t bits, int op, int arg, int width);

template <typename T>
T shfl(const char* file, int line, int op, unsigned mask, T v, int arg, int width) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "shuffle of a type over 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  bits = shfl_bits(file, line, mask, bits, op, arg, width);
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

inline int64_t& atomic_count() { return stats().atomics; }

// Fibers interleave only at barriers and shuffles, so a read-modify-write is atomic as it stands.
template <typename T>
T atomic_add(T* p, T v) {
  ++atomic_count();
  const T old = *p;
  *p = old + v;
  return old;
}

// The block's dynamic shared memory (`extern __shared__`), `align`-aligned, poisoned (0xFF bytes: NaN in float and
// double) before each block, with poisoned guard zones either side that must still be intact after the block.
void* dynamic_shared(size_t align);
// Static shared memory: one slot per declaration (Tag: a lambda type unique to the declaration and instantiation),
// carved per block from a poisoned arena with guard zones between slots.
void* static_shared_slot(const void* key, size_t bytes, size_t align);
template <typename A, typename Tag>
A& static_shared(Tag) {
  static const char key = 0;
  return *static_cast<A*>(static_shared_slot(&key, sizeof(A), alignof(A)));
}

// ---- host side ----------------------------------------------------------------------------------------------
struct LaunchConfig {
  dim3 grid, block;
  size_t smem;
  const void* kernel;
  const char* signature;
};
void run_launch(const LaunchConfig& cfg, void (*body)(void*), void* ctx);
void set_max_dynamic_smem(const void* kernel, int bytes);
cudaError_t device_attribute(int* value, cudaDeviceAttr attr);

template <typename... P>
struct Launch {
  void (*kernel)(P...);
  LaunchConfig cfg;
  template <typename... A>
  void operator()(A&&... a) const {
    // The kernel's parameters, copied once as a launch copies them; every thread gets its own copy by value.
    std::tuple<std::decay_t<P>...> params(std::forward<A>(a)...);
    auto body = [&]() { std::apply(kernel, params); };
    using Body = decltype(body);
    run_launch(cfg, [](void* c) { (*static_cast<Body*>(c))(); }, &body);
  }
};

template <typename... P>
Launch<P...> launch(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem = 0, cudaStream_t = nullptr) {
  return Launch<P...>{kernel, LaunchConfig{grid, block, smem, reinterpret_cast<const void*>(kernel),
                                           __PRETTY_FUNCTION__}};
}

}  // namespace ghostfast_emu

// ---- the CUDA runtime API calls the launch code makes ---------------------------------------------------------
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int /*device*/) {
  return ghostfast_emu::device_attribute(value, attr);
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* kernel, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  ghostfast_emu::set_max_dynamic_smem(reinterpret_cast<const void*>(kernel), value);
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) { return e == cudaSuccess ? "no error" : "emulated error"; }

// ---- device built-ins ----------------------------------------------------------------------------------------
inline float atomicAdd(float* p, float v) { return ghostfast_emu::atomic_add(p, v); }
inline double atomicAdd(double* p, double v) { return ghostfast_emu::atomic_add(p, v); }
inline int atomicAdd(int* p, int v) { return ghostfast_emu::atomic_add(p, v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return ghostfast_emu::atomic_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return ghostfast_emu::atomic_add(p, v);
}
template <typename T>
inline T __ldg(const T* p) {
  return *p;
}
inline void __threadfence() {}
inline void __threadfence_block() {}
