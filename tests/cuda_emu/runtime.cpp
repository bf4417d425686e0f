// The scheduler of the CUDA emulation (cuda_emu_runtime.h): one fiber per CUDA thread, run on the calling OS thread.
//
// A block runs in phases. Every thread that can run runs, in the configured order, until it reaches __syncthreads, a
// warp shuffle or its end. Then the shuffles whose 32 lanes have all arrived exchange their values (the lanes go on
// in the next round of the same phase), and when every thread waits at one barrier (same file and line) the barrier
// opens: the next phase, in a fresh order for kRandom. Anything else is an error the launch raises: a barrier some
// threads reach while others exited or wait at another barrier, a shuffle whose mask does not name exactly the
// waiting lanes of a full warp, lanes of one shuffle at different call sites or counts. Shared memory is poisoned
// (0xFF bytes) before each block and its guard zones are checked after it.
#include "cuda_emu_runtime.h"
#include "registry.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <numeric>
#include <sstream>
#include <vector>

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim{1, 1, 1};
dim3 gridDim{1, 1, 1};

#if defined(__x86_64__) && !defined(GHOSTFAST_EMU_UCONTEXT)
// Saves the callee-saved registers on the current stack, stores the stack pointer in *save, switches to `load`
// (a stack saved the same way, or one prepared by Fiber::start) and returns there.
extern "C" void ghostfast_emu_switch(void** save, void* load);
asm(R"(
  .text
  .p2align 4
  .globl ghostfast_emu_switch
  .hidden ghostfast_emu_switch
  .type ghostfast_emu_switch, @function
ghostfast_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ghostfast_emu_switch, .-ghostfast_emu_switch
)");
#define GHOSTFAST_EMU_ASM_SWITCH 1
#else
#include <ucontext.h>
#endif

namespace ghostfast_emu {
namespace {

enum State : int { kReady, kBarrier, kWarpWait, kDone };

constexpr size_t kStackBytes = 256 * 1024;  // virtual; only touched pages are committed
constexpr size_t kGuardBytes = 256;         // poisoned guard zone around each shared-memory region
constexpr size_t kStaticArenaBytes = Config::kStaticSmemMax + 64 * kGuardBytes;

struct Fiber {
  char* stack = nullptr;  // the mapping: a PROT_NONE page, then the stack
  size_t mapped = 0;
#if GHOSTFAST_EMU_ASM_SWITCH
  void* sp = nullptr;
#else
  ucontext_t ctx;
#endif
  int tid = 0;
  State state = kReady;
  const char* file = nullptr;  // where it waits
  int line = 0;
  int64_t shuffles = 0;  // shuffles done in this block (lanes of one shuffle must agree)
  unsigned mask = 0;
  uint64_t bits = 0, result = 0;
  int op = 0, arg = 0, width = 0;
};

struct Emu {
  Config config;
  Stats stats;
  std::string log;
  std::vector<Fiber> fibers;
#if GHOSTFAST_EMU_ASM_SWITCH
  void* sched_sp = nullptr;
#else
  ucontext_t sched_ctx;
#endif
  Fiber* current = nullptr;
  void (*body)(void*) = nullptr;
  void* ctx = nullptr;
  std::string error;  // the first error of the running launch
  std::map<const void*, int> max_dynamic_smem;
  // shared memory of the running block
  std::vector<unsigned char> dyn;  // guard | smem | guard
  size_t dyn_bytes = 0;
  std::vector<unsigned char> stat;  // static slots, each followed by a guard zone
  std::map<const void*, std::pair<size_t, size_t>> slots;  // key -> (offset, bytes)
  size_t stat_bytes = 0;
  size_t stat_used = 0;
  uint64_t rng = 0;
};

Emu& emu() {
  static Emu e;
  return e;
}

uint64_t next_random(uint64_t& s) {  // splitmix64
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void order_into(std::vector<int>& order, int n, int mode, uint64_t& rng) {
  order.resize(n);
  std::iota(order.begin(), order.end(), 0);
  if (mode == kReverse) {
    std::reverse(order.begin(), order.end());
  } else if (mode == kRandom) {
    for (int i = n - 1; i > 0; --i) std::swap(order[i], order[next_random(rng) % uint64_t(i + 1)]);
  }
}

std::string where(const char* file, int line) {
  std::string f = file ? file : "?";
  const size_t slash = f.rfind('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

// "P = {GhostForwardArgs<float, float>}" of launch<P...>'s signature: the kernel's parameter types
std::string kernel_label(const char* signature) {
  const std::string s(signature);
  const size_t b = s.find("P = {");
  const size_t e = b == std::string::npos ? b : s.find("}", b);
  return b == std::string::npos ? s : "kernel(" + s.substr(b + 5, e - b - 5) + ")";
}

void fail(const std::string& what) {
  Emu& e = emu();
  if (!e.error.empty()) return;
  std::ostringstream s;
  s << "cuda_emu: block (" << blockIdx.x << ", " << blockIdx.y << ", " << blockIdx.z << "): " << what;
  e.error = s.str();
}

[[noreturn]] void fiber_main() {
  Emu& e = emu();
  Fiber* f = e.current;
  e.body(e.ctx);
  f->state = kDone;
#if GHOSTFAST_EMU_ASM_SWITCH
  ghostfast_emu_switch(&f->sp, e.sched_sp);
#else
  swapcontext(&f->ctx, &e.sched_ctx);
#endif
  __builtin_unreachable();
}

#if !GHOSTFAST_EMU_ASM_SWITCH
void fiber_main_c() { fiber_main(); }
#endif

void ensure_fibers(int n) {
  Emu& e = emu();
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  while (static_cast<int>(e.fibers.size()) < n) {
    Fiber f;
    f.mapped = kStackBytes + page;
    void* m = mmap(nullptr, f.mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) throw EmuError("cuda_emu: cannot map a fiber stack");
    mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting the next stack
    f.stack = static_cast<char*>(m);
    e.fibers.push_back(f);
  }
}

void start(Fiber& f) {
  f.state = kReady;
  f.shuffles = 0;
#if GHOSTFAST_EMU_ASM_SWITCH
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + f.mapped) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;                                     // fiber_main's (never used) return address
  *--sp = reinterpret_cast<void*>(&fiber_main);        // where ghostfast_emu_switch's `ret` goes
  for (int i = 0; i < 6; ++i) *--sp = nullptr;         // rbp rbx r12 r13 r14 r15
  f.sp = sp;
#else
  getcontext(&f.ctx);
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  f.ctx.uc_stack.ss_sp = f.stack + page;
  f.ctx.uc_stack.ss_size = f.mapped - page;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_main_c, 0);
#endif
}

void resume(Fiber& f) {
  Emu& e = emu();
  e.current = &f;
  const unsigned bx = blockDim.x, by = blockDim.y;
  threadIdx.x = f.tid % bx;
  threadIdx.y = (f.tid / bx) % by;
  threadIdx.z = f.tid / (bx * by);
#if GHOSTFAST_EMU_ASM_SWITCH
  ghostfast_emu_switch(&e.sched_sp, f.sp);
#else
  swapcontext(&e.sched_ctx, &f.ctx);
#endif
  e.current = nullptr;
}

void yield_to_scheduler() {
  Emu& e = emu();
  Fiber* f = e.current;
#if GHOSTFAST_EMU_ASM_SWITCH
  ghostfast_emu_switch(&f->sp, e.sched_sp);
#else
  swapcontext(&f->ctx, &e.sched_ctx);
#endif
}

// The shuffles of warp w whose lanes have all arrived; false (and an error) when the warp is stuck.
bool resolve_warp(int w, int nthreads, bool& released) {
  Emu& e = emu();
  const int lo = 32 * w, hi = std::min(nthreads, lo + 32);
  int waiting = 0;
  for (int t = lo; t < hi; ++t) waiting += e.fibers[t].state == kWarpWait;
  if (waiting == 0) return true;
  const unsigned present = (hi - lo == 32) ? 0xffffffffu : ((1u << (hi - lo)) - 1u);
  if (waiting != hi - lo) return true;  // the others may still arrive; decided when nothing else can run
  const Fiber& f0 = e.fibers[lo];
  for (int t = lo; t < hi; ++t) {
    const Fiber& f = e.fibers[t];
    if (f.file != f0.file || f.line != f0.line || f.shuffles != f0.shuffles || f.op != f0.op ||
        f.width != f0.width) {
      fail("warp " + std::to_string(w) + ": lanes " + std::to_string(lo) + " and " + std::to_string(t) +
           " are in different shuffles (" + where(f0.file, f0.line) + " #" + std::to_string(f0.shuffles) + ", " +
           where(f.file, f.line) + " #" + std::to_string(f.shuffles) + ")");
      return false;
    }
    if (f.mask != present) {
      fail("shuffle at " + where(f.file, f.line) + ": mask " + std::to_string(f.mask) +
           " does not name exactly the warp's lanes");
      return false;
    }
  }
  for (int t = lo; t < hi; ++t) {
    Fiber& f = e.fibers[t];
    const int lane = t - lo, width = f.width, base = lane & ~(width - 1);
    int src = lane;
    switch (f.op) {
      case kShflIdx: src = base + (f.arg & (width - 1)); break;
      case kShflUp: src = (lane - f.arg >= base) ? lane - f.arg : lane; break;
      case kShflDown: src = (lane + f.arg < base + width) ? lane + f.arg : lane; break;
      default: src = lane ^ f.arg; break;
    }
    if (src < 0 || lo + src >= hi) {
      fail("shuffle at " + where(f.file, f.line) + ": lane " + std::to_string(lane) + " reads absent lane " +
           std::to_string(src));
      return false;
    }
    f.result = e.fibers[lo + src].bits;
  }
  for (int t = lo; t < hi; ++t) {
    e.fibers[t].state = kReady;
    ++e.fibers[t].shuffles;
  }
  ++e.stats.warp_syncs;
  released = true;
  return true;
}

void poison_shared() {
  Emu& e = emu();
  std::fill(e.dyn.begin(), e.dyn.end(), 0xFF);
  std::fill(e.stat.begin(), e.stat.end(), 0xFF);
  e.slots.clear();
  e.stat_used = kGuardBytes;
  e.stat_bytes = 0;
}

void check_guards() {
  Emu& e = emu();
  auto intact = [](const unsigned char* p, size_t n) {
    return std::all_of(p, p + n, [](unsigned char b) { return b == 0xFF; });
  };
  if (!intact(e.dyn.data(), kGuardBytes))
    fail("a write below the dynamic shared memory (" + std::to_string(e.dyn_bytes) + " bytes)");
  if (!intact(e.dyn.data() + kGuardBytes + e.dyn_bytes, kGuardBytes))
    fail("a write past the end of the dynamic shared memory (" + std::to_string(e.dyn_bytes) + " bytes)");
  if (!intact(e.stat.data(), kGuardBytes)) fail("a write below the first static __shared__ array");
  for (const auto& s : e.slots) {
    if (!intact(e.stat.data() + s.second.first + s.second.second, kGuardBytes))
      fail("a write past the end of a static __shared__ array (" + std::to_string(s.second.second) + " bytes)");
  }
}

void run_block(int nthreads, std::vector<int>& order) {
  Emu& e = emu();
  for (int t = 0; t < nthreads; ++t) {
    e.fibers[t].tid = t;
    start(e.fibers[t]);
  }
  order_into(order, nthreads, e.config.thread_order, e.rng);
  const int nwarps = (nthreads + 31) / 32;
  for (;;) {
    for (int t : order) {
      Fiber& f = e.fibers[t];
      if (f.state == kReady) resume(f);  // runs to its next barrier, shuffle or end
    }
    bool released = false;
    for (int w = 0; w < nwarps; ++w)
      if (!resolve_warp(w, nthreads, released)) return;
    if (released) continue;
    // nothing ready and no shuffle complete: all done, a barrier, or stuck
    int done = 0, barrier = 0, shuffle = 0;
    const Fiber* first_barrier = nullptr;
    const Fiber* first_shuffle = nullptr;
    for (int t = 0; t < nthreads; ++t) {
      const Fiber& f = e.fibers[t];
      if (f.state == kDone) ++done;
      if (f.state == kBarrier) {
        ++barrier;
        if (!first_barrier) first_barrier = &f;
      }
      if (f.state == kWarpWait) {
        ++shuffle;
        if (!first_shuffle) first_shuffle = &f;
      }
    }
    if (done == nthreads) return;
    if (shuffle > 0) {
      fail("shuffle at " + where(first_shuffle->file, first_shuffle->line) + " (thread " +
           std::to_string(first_shuffle->tid) + ") waits for lanes that exited or wait at a barrier (" +
           std::to_string(done) + " threads exited, " + std::to_string(barrier) + " at a barrier)");
      return;
    }
    if (done > 0) {
      fail("__syncthreads at " + where(first_barrier->file, first_barrier->line) + " reached by " +
           std::to_string(barrier) + " threads while " + std::to_string(done) + " had exited");
      return;
    }
    for (int t = 0; t < nthreads; ++t) {
      const Fiber& f = e.fibers[t];
      if (f.file != first_barrier->file || f.line != first_barrier->line) {
        fail("divergent __syncthreads: thread " + std::to_string(first_barrier->tid) + " at " +
             where(first_barrier->file, first_barrier->line) + ", thread " + std::to_string(t) + " at " +
             where(f.file, f.line));
        return;
      }
    }
    for (int t = 0; t < nthreads; ++t) e.fibers[t].state = kReady;
    ++e.stats.barriers;
    if (e.config.thread_order == kRandom) order_into(order, nthreads, kRandom, e.rng);
  }
}

}  // namespace

Registrar& registrar() {
  static Registrar r;
  return r;
}

Config& config() { return emu().config; }
Stats& stats() { return emu().stats; }
std::string& launch_log() { return emu().log; }

void reset() {
  Emu& e = emu();
  e.stats = Stats{};
  e.log.clear();
  e.max_dynamic_smem.clear();
}

void syncthreads(const char* file, int line) {
  Emu& e = emu();
  Fiber* f = e.current;
  if (f == nullptr) throw EmuError("cuda_emu: __syncthreads outside a kernel");
  f->state = kBarrier;
  f->file = file;
  f->line = line;
  yield_to_scheduler();
}

uint64_t shfl_bits(const char* file, int line, unsigned mask, uint64_t bits, int op, int arg, int width) {
  Emu& e = emu();
  Fiber* f = e.current;
  if (f == nullptr) throw EmuError("cuda_emu: a warp shuffle outside a kernel");
  if (width <= 0 || width > 32 || (width & (width - 1)) != 0) {
    fail("shuffle at " + where(file, line) + ": width " + std::to_string(width) + " is not a power of 2 <= 32");
    width = 32;
  }
  f->state = kWarpWait;
  f->file = file;
  f->line = line;
  f->mask = mask;
  f->bits = bits;
  f->op = op;
  f->arg = arg;
  f->width = width;
  yield_to_scheduler();
  return f->result;
}

void* dynamic_shared(size_t align) {
  Emu& e = emu();
  unsigned char* p = e.dyn.data() + kGuardBytes;
  if (reinterpret_cast<uintptr_t>(p) % align != 0) fail("dynamic shared memory misaligned");
  return p;
}

void* static_shared_slot(const void* key, size_t bytes, size_t align) {
  Emu& e = emu();
  auto it = e.slots.find(key);
  if (it == e.slots.end()) {
    size_t off = (e.stat_used + align - 1) / align * align;
    e.stat_bytes += bytes;
    if (e.stat_bytes > size_t(Config::kStaticSmemMax)) {
      fail("static __shared__ arrays exceed " + std::to_string(Config::kStaticSmemMax) + " bytes");
    }
    if (off + bytes + kGuardBytes > e.stat.size()) {  // (never resized: threads hold pointers into it)
      fail("static __shared__ arrays overflow the emulator's arena");
      off = kGuardBytes;
      bytes = 0;
    }
    e.stat_used = off + bytes + kGuardBytes;
    it = e.slots.emplace(key, std::make_pair(off, bytes)).first;
  }
  return e.stat.data() + it->second.first;
}

void set_max_dynamic_smem(const void* kernel, int bytes) { emu().max_dynamic_smem[kernel] = bytes; }

cudaError_t device_attribute(int* value, cudaDeviceAttr attr) {
  const Config& c = config();
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = c.sm_count; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = c.smem_optin_max; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

void run_launch(const LaunchConfig& cfg, void (*body)(void*), void* ctx) {
  Emu& e = emu();
  e.error.clear();
  const uint64_t nthreads64 = uint64_t(cfg.block.x) * cfg.block.y * cfg.block.z;
  const uint64_t nblocks = uint64_t(cfg.grid.x) * cfg.grid.y * cfg.grid.z;
  std::ostringstream line;
  line << cfg.signature << "|" << cfg.kernel << "|" << cfg.grid.x << "," << cfg.grid.y << "," << cfg.grid.z << "|" << cfg.block.x << ","
       << cfg.block.y << "," << cfg.block.z << "|" << cfg.smem << "\n";
  e.log += line.str();
  // the launch configuration checks of the CUDA runtime (cudaErrorInvalidConfiguration and friends)
  if (nthreads64 == 0 || nthreads64 > 1024 || cfg.block.z > 64)
    throw EmuError("cuda_emu: invalid block " + std::to_string(cfg.block.x) + "x" + std::to_string(cfg.block.y) +
                   "x" + std::to_string(cfg.block.z));
  if (nblocks == 0 || cfg.grid.x > 2147483647u || cfg.grid.y > 65535u || cfg.grid.z > 65535u)
    throw EmuError("cuda_emu: invalid grid " + std::to_string(cfg.grid.x) + "x" + std::to_string(cfg.grid.y) + "x" +
                   std::to_string(cfg.grid.z));
  if (cfg.smem > size_t(Config::kDefaultDynamicSmem)) {
    auto it = e.max_dynamic_smem.find(cfg.kernel);
    if (it == e.max_dynamic_smem.end() || size_t(it->second) < cfg.smem)
      throw EmuError("cuda_emu: " + std::to_string(cfg.smem) +
                     " bytes of dynamic shared memory without cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
    if (it->second > e.config.smem_optin_max)
      throw EmuError("cuda_emu: cudaFuncSetAttribute asked for " + std::to_string(it->second) +
                     " bytes of dynamic shared memory, the device allows " + std::to_string(e.config.smem_optin_max));
  }
  const int nthreads = static_cast<int>(nthreads64);
  ensure_fibers(nthreads);
  e.body = body;
  e.ctx = ctx;
  e.dyn_bytes = cfg.smem;
  e.dyn.assign(cfg.smem + 2 * kGuardBytes, 0xFF);
  e.stat.assign(kStaticArenaBytes, 0xFF);
  blockDim = cfg.block;
  gridDim = cfg.grid;
  e.rng = e.config.seed * 0x2545f4914f6cdd1dull + uint64_t(e.stats.launches);
  ++e.stats.launches;

  std::vector<int> block_order;
  order_into(block_order, static_cast<int>(nblocks), e.config.block_order, e.rng);
  std::vector<int> thread_order;
  for (int b : block_order) {
    blockIdx.x = b % cfg.grid.x;
    blockIdx.y = (b / cfg.grid.x) % cfg.grid.y;
    blockIdx.z = b / (cfg.grid.x * cfg.grid.y);
    poison_shared();
    run_block(nthreads, thread_order);
    check_guards();
    ++e.stats.blocks;
    e.stats.threads += nthreads;
    if (!e.error.empty()) break;
  }
  if (!e.error.empty()) throw EmuError(e.error + " [" + kernel_label(cfg.signature) + "]");
}

}  // namespace ghostfast_emu
