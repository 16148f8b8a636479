// cuda_sim.h -- run CUDA kernel source on the CPU with CUDA semantics.
//
// CI has no GPU, but must still execute the exact kernel source that nvcc
// compiles: with -DCAE_SIM, csrc/cuda/common.cuh includes this header and the
// .cu files compile as ordinary C++ (C++17 or later; -std=c++20 next to
// torch). Each CUDA thread becomes a fiber with its own small stack, switched
// cooperatively at barriers; the blocks of a grid run one after another on
// the calling OS thread. Kernel bugs that are undefined behaviour on a GPU
// (barriers skipped or divergent, bad warp masks, deadlock, bad launches)
// throw std::runtime_error out of the launch.
//
// Everything else -- what is exact and what is strict, the launch contract,
// the rules for kernel authors, schedules (CAE_SIM_SCHEDULE), the ASan and
// TSan support, configuration (CAE_SIM_USE_UCONTEXT, CAE_SIM_STACK_SIZE,
// CAE_SIM_STACK_KB) and the self-test -- is documented in one place:
// csrc/sim/README.md.
#pragma once

#if defined(__CUDACC__)
#error "cuda_sim.h emulates CUDA on the CPU; do not compile it with nvcc"
#endif
#if defined(__VECTOR_TYPES_H__)
#error "cuda_sim.h cannot be combined with the CUDA runtime headers (it defines dim3, float4, ...)"
#endif

#include <algorithm>
#include <cmath>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>  // before defining __noinline__: libstdc++ uses __attribute__((__noinline__))
#include <mutex>
#include <numeric>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------
#if defined(__SANITIZE_ADDRESS__)
#define CAE_SIM_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CAE_SIM_ASAN 1
#endif
#endif
#ifndef CAE_SIM_ASAN
#define CAE_SIM_ASAN 0
#endif

#if defined(__SANITIZE_THREAD__)
#define CAE_SIM_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define CAE_SIM_TSAN 1
#endif
#endif
#ifndef CAE_SIM_TSAN
#define CAE_SIM_TSAN 0
#endif

// The hand-written switch saves only what the SysV x86-64 ABI calls
// callee-saved (rbx, rbp, r12-r15, rsp); MXCSR / x87 control words are shared
// by all fibers (kernels must not change rounding modes).  With CET shadow
// stacks a `ret` to a new stack would fault, so use ucontext there.
#ifndef CAE_SIM_USE_UCONTEXT
#if defined(__x86_64__) && !(defined(__CET__) && (__CET__ & 2))
#define CAE_SIM_USE_UCONTEXT 0
#else
#define CAE_SIM_USE_UCONTEXT 1
#endif
#endif
#if CAE_SIM_USE_UCONTEXT
#include <ucontext.h>
#endif

#ifndef CAE_SIM_STACK_SIZE
#if CAE_SIM_ASAN
#define CAE_SIM_STACK_SIZE (256u * 1024u)  // ASan frames carry redzones
#elif CAE_SIM_TSAN
#define CAE_SIM_STACK_SIZE (128u * 1024u)
#else
#define CAE_SIM_STACK_SIZE (64u * 1024u)
#endif
#endif

#if CAE_SIM_ASAN
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
#if CAE_SIM_TSAN
#include <sanitizer/tsan_interface.h>
extern "C" {
// Exported by the TSan runtime (dynamic annotations); not in its public header.
void AnnotateIgnoreReadsBegin(const char* file, int line);
void AnnotateIgnoreReadsEnd(const char* file, int line);
void AnnotateIgnoreWritesBegin(const char* file, int line);
void AnnotateIgnoreWritesEnd(const char* file, int line);
}
#endif

// ---------------------------------------------------------------------------
// CUDA keywords, built-in types and host API stubs
// ---------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __shared__ static
#define __forceinline__ __inline__ __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// __restrict__ is a native GCC/Clang keyword.

struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};
// Vector types with CUDA's alignment (vectorised loads rely on it).
struct alignas(8) int2 {
  int x, y;
};
struct alignas(16) int4 {
  int x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
struct alignas(8) float2 {
  float x, y;
};
struct float3 {
  float x, y, z;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
struct alignas(16) double2 {
  double x, y;
};
inline int2 make_int2(int x, int y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint3 make_uint3(unsigned x, unsigned y, unsigned z) { return {x, y, z}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float3 make_float3(float x, float y, float z) { return {x, y, z}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline double2 make_double2(double x, double y) { return {x, y}; }

inline constexpr int warpSize = 32;

typedef struct CUstream_st* cudaStream_t;  // opaque, like the real one
enum cudaError { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorInvalidConfiguration = 9 };
typedef enum cudaError cudaError_t;
// Launch failures are thrown as std::runtime_error, so the error state is
// always clean.
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
inline cudaError_t cudaDeviceSynchronize() { return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
// The emulated device's compute capability: sm_90 unless CAE_SIM_ARCH names
// another (e.g. 75), read at every call, so that host code choosing a kernel
// by architecture (tensor cores from sm_80 on) runs either way in tests.
// So is the shared memory a block may opt in to (cudaFuncSetAttribute):
// 64 KiB on sm_75, 163 on sm_80/87, 99 on sm_86/89/120, else 227.
enum cudaDeviceAttr {
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
inline int cae_sim_arch() {
  const char* env = std::getenv("CAE_SIM_ARCH");
  return env != nullptr && *env != 0 ? std::atoi(env) : 90;
}
inline int cae_sim_smem_opt_in_limit(int arch) {
  if (arch < 80) return 64 * 1024;
  if (arch == 80 || arch == 87) return 163 * 1024;
  if (arch == 86 || arch == 89 || arch >= 120) return 99 * 1024;
  return 227 * 1024;
}
inline cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
  (void)device;
  const int arch = cae_sim_arch();
  if (arch < 10) return cudaErrorInvalidValue;
  *value = attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? cae_sim_smem_opt_in_limit(arch)
           : attr == cudaDevAttrComputeCapabilityMajor     ? arch / 10
                                                           : arch % 10;
  return cudaSuccess;
}
inline const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess                     ? "no error"
         : e == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                                              : "error";
}

namespace cae_sim {
namespace detail {

// ---------------------------------------------------------------------------
// Sanitizer hooks (no-ops in plain builds)
// ---------------------------------------------------------------------------
#if CAE_SIM_TSAN
// The emulator's bookkeeping is touched by different fibers without
// synchronization (that is the point: only barriers synchronize).  It runs
// in ignore regions so TSan neither reports it nor -- more importantly --
// derives happens-before from it.
// `depth` counts a fiber's open regions.  A fiber never holds them while
// switched out (yield_to_scheduler closes and reopens them): TSan refuses to
// destroy a fiber with ignores enabled, and an aborted block destroys fibers
// blocked in a barrier.
inline void quiet_begin() {
  AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
  AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
}
inline void quiet_end() {
  AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
  AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
}
struct Quiet {
  int* depth;
  explicit Quiet(int* d) : depth(d) {
    quiet_begin();
    if (depth) ++*depth;
  }
  ~Quiet() {
    if (depth) --*depth;
    quiet_end();
  }
  Quiet(const Quiet&) = delete;
  Quiet& operator=(const Quiet&) = delete;
};
inline void tsan_release(void* p) { __tsan_release(p); }
inline void tsan_acquire(void* p) { __tsan_acquire(p); }
#else
struct Quiet {
  explicit Quiet(int*) {}  // user-provided: no unused-variable warnings
};
inline void quiet_begin() {}
inline void quiet_end() {}
inline void tsan_release(void*) {}
inline void tsan_acquire(void*) {}
#endif

// ---------------------------------------------------------------------------
// State
// ---------------------------------------------------------------------------
enum class St : unsigned char { Runnable, AtBarrier, AtWarp, Done, Aborted };
enum class WK : unsigned char { Sync, Idx, Up, Down, Xor, Ballot, Any, All };
enum class Bar : unsigned char { Plain, Count, And, Or };

struct Fiber {         // one CUDA thread
  void* sp = nullptr;  // saved stack pointer (hand-written switch)
#if CAE_SIM_USE_UCONTEXT
  ucontext_t ctx;
#endif
  char* stack_lo = nullptr;
  uint3 tid{0, 0, 0};
  unsigned linear = 0;
  St state = St::Runnable;
  bool at_top = false;  // stack is at the top of fiber_main's loop (fresh or parked)
  int bar_result = 0;   // value of __syncthreads_count/_and/_or
  // Warp collective in flight: this lane's input and, once complete, its output.
  uint64_t w_val = 0;
  int w_arg = 0;  // srcLane / delta / laneMask / predicate
  unsigned w_mask = 0;
  uint64_t w_res = 0;
  bool w_poison = false;
  const char* wait_what = "";
  const char* wait_file = "";
  int wait_line = 0;
  void* asan_fake = nullptr;
  void* tsan_fiber = nullptr;
  int quiet = 0;       // open TSan ignore regions of this fiber
  char tsan_lane = 0;  // TSan sync object: released by this lane at warp ops
  // cp.async copies issued and not yet waited for (copy_async): done at the
  // thread's wait (copy_async_wait_all), not before, so a read before the wait
  // sees what was there.
  struct AsyncCopy {
    void* dst;
    const void* src;
    int bytes;
    bool zero;
  };
  std::vector<AsyncCopy> copies;
};

struct WarpOp {  // a pending warp-level collective (one per distinct mask)
  WK kind;
  unsigned mask, arrived;
  int width;
  const char* what;
  const char* file;
  int line;
};

enum class Order { Forward, Reverse, Shuffle };

struct Launch {
  const char* name = "";
  dim3 grid_dim, block_dim;
  uint3 block_idx{0, 0, 0};
  unsigned nthreads = 0;
  size_t smem_bytes = 0;
  unsigned char* dyn_smem = nullptr;
  std::vector<Fiber> fibers;
  std::vector<std::vector<WarpOp>> warp_ops;
  std::vector<unsigned> order;
  Order sched = Order::Forward;
  uint64_t seed = 0, rng = 0;
  unsigned done = 0, first_exited = 0;
  // __syncthreads state of the current generation
  unsigned bar_arrived = 0;
  Bar bar_kind = Bar::Plain;
  const char* bar_what = "";
  const char* bar_file = "";
  int bar_line = 0, bar_count = 0, bar_and = 1, bar_or = 0;
  bool failed = false;
  std::string error;
  void (*invoke)(const void*) = nullptr;
  const void* pack = nullptr;
  // scheduler context
  void* sched_sp = nullptr;
#if CAE_SIM_USE_UCONTEXT
  ucontext_t sched_ctx, proto_ctx;
#endif
  const void* asan_main_bottom = nullptr;
  size_t asan_main_size = 0;
  void* asan_main_fake = nullptr;
  void* tsan_main = nullptr;
  char tsan_bar = 0, tsan_block_begin = 0, tsan_block_end = 0;
  char tsan_bar_gen[2] = {0, 0};
  unsigned bar_gen = 0;
  // fiber stacks: cached across launches, one guard page below each
  char* stacks = nullptr;
  size_t stack_count = 0, stack_size = 0, stack_stride = 0;
};

// One launch at a time (static shared memory is global): these globals are
// only touched under launch_mutex().  The current launch / fiber pointers are
// read with relaxed atomics so that TSan treats them as atomic (no report, no
// happens-before).
inline Launch g_state;
inline Launch* g_launch = nullptr;
inline Fiber* g_fiber = nullptr;
inline thread_local bool t_in_launch = false;
inline std::string g_schedule_override;
inline bool g_has_override = false;
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

// Launches per kernel name since the last reset (see launch_counts()), and
// the names found for kernel addresses; both under launch_mutex().
inline std::map<std::string, uint64_t> g_launch_counts;
inline std::map<const void*, std::string> g_kernel_names;
// The launch recorder (see set_launch_recording()), under launch_mutex().
inline bool g_recording = false;
inline bool g_dry_run = false;
}  // namespace detail

// One recorded launch: the kernel (as kernel_name() gives it) and its
// configuration.
struct LaunchRecord {
  std::string kernel;
  dim3 grid, block;
  size_t smem_bytes;
};

namespace detail {
inline std::vector<LaunchRecord> g_launch_records;

// The kernel's own name where the dynamic symbol table has it (templates
// instantiated in a named namespace), demangled without its return and
// parameter types: "cae::cuda::correlate_kernel<float, float, 1, 4, false>".
// Otherwise `name`, the text CAE_LAUNCH was given.
inline const std::string& kernel_name(const char* name, const void* kernel) {
  auto found = g_kernel_names.find(kernel);
  if (found != g_kernel_names.end()) return found->second;
  std::string result = name;
  Dl_info info;
  if (kernel != nullptr && dladdr(kernel, &info) != 0 && info.dli_sname != nullptr &&
      info.dli_saddr == kernel) {
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    result = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
    std::free(demangled);
    if (result.compare(0, 5, "void ") == 0) result.erase(0, 5);
    int depth = 0;  // drop the parameter list: the last top-level "(...)"
    for (size_t i = result.size(); i-- > 0;) {
      depth += result[i] == ')' ? 1 : result[i] == '(' ? -1 : 0;
      if (depth == 0 && result[i] == '(') {
        result.erase(i);
        break;
      }
    }
  }
  return g_kernel_names.emplace(kernel, std::move(result)).first->second;
}

[[noreturn]] inline void outside_kernel() {
  throw std::logic_error("cae_sim: CUDA built-in used outside a kernel launched through CAE_LAUNCH");
}
inline Fiber* cur_fiber() {
  Fiber* f = __atomic_load_n(&g_fiber, __ATOMIC_RELAXED);
  if (__builtin_expect(f == nullptr, 0)) outside_kernel();
  return f;
}
inline Launch* cur_launch() {
  cur_fiber();
  return __atomic_load_n(&g_launch, __ATOMIC_RELAXED);
}

// ---------------------------------------------------------------------------
// Stack switching
// ---------------------------------------------------------------------------
#if !CAE_SIM_USE_UCONTEXT
// Saves callee-saved registers on the current stack, stores rsp to *save,
// loads `to` and pops the target's registers; `ret` resumes the target.
// Naked + inline: emitted once per binary (COMDAT), never instrumented.
__attribute__((naked, noinline)) inline void raw_switch(void** /*save*/, void* /*to*/) {
  __asm__ volatile(
      "pushq %rbp\n\tpushq %rbx\n\tpushq %r12\n\tpushq %r13\n\tpushq %r14\n\tpushq %r15\n\t"
      "movq %rsp, (%rdi)\n\t"
      "movq %rsi, %rsp\n\t"
      "popq %r15\n\tpopq %r14\n\tpopq %r13\n\tpopq %r12\n\tpopq %rbx\n\tpopq %rbp\n\t"
      "ret\n\t");
}
#endif

// Fiber -> scheduler.  `final`: the fiber will never be resumed.  Called
// inside the fiber's Quiet regions, which are closed while it is switched out.
inline void yield_to_scheduler(Launch* L, Fiber* f, bool final) {
  const int quiet = f->quiet;
  for (int i = 0; i < quiet; ++i) quiet_end();
#if CAE_SIM_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &f->asan_fake, L->asan_main_bottom, L->asan_main_size);
#endif
#if CAE_SIM_TSAN
  __tsan_switch_to_fiber(L->tsan_main, __tsan_switch_to_fiber_no_sync);
#endif
#if CAE_SIM_USE_UCONTEXT
  swapcontext(&f->ctx, &L->sched_ctx);
#else
  raw_switch(&f->sp, L->sched_sp);
#endif
  for (int i = 0; i < quiet; ++i) quiet_begin();
#if CAE_SIM_ASAN
  __sanitizer_finish_switch_fiber(f->asan_fake, &L->asan_main_bottom, &L->asan_main_size);
#endif
  (void) final;
}

// Scheduler -> fiber; returns when the fiber blocks, exits or aborts.
inline void resume(Launch* L, Fiber* f) {
  f->at_top = false;
  __atomic_store_n(&g_fiber, f, __ATOMIC_RELAXED);
#if CAE_SIM_ASAN
  __sanitizer_start_switch_fiber(&L->asan_main_fake, f->stack_lo, L->stack_size);
#endif
#if CAE_SIM_TSAN
  __tsan_switch_to_fiber(f->tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if CAE_SIM_USE_UCONTEXT
  swapcontext(&L->sched_ctx, &f->ctx);
#else
  raw_switch(&L->sched_sp, f->sp);
#endif
#if CAE_SIM_ASAN
  __sanitizer_finish_switch_fiber(L->asan_main_fake, nullptr, nullptr);
#endif
  __atomic_store_n(&g_fiber, static_cast<Fiber*>(nullptr), __ATOMIC_RELAXED);
}

// ---------------------------------------------------------------------------
// Errors raised inside a fiber.  C++ exceptions cannot cross a stack switch,
// so the fiber records the message, marks itself aborted and switches away
// for good; the scheduler throws.  No heap object may live in the abandoned
// frames (LeakSanitizer), hence the fixed buffer.
// ---------------------------------------------------------------------------
[[noreturn]] inline void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] inline void fail(const char* fmt, ...) {
  Launch* L = __atomic_load_n(&g_launch, __ATOMIC_RELAXED);
  Fiber* f = __atomic_load_n(&g_fiber, __ATOMIC_RELAXED);
  Quiet q(&f->quiet);
  char buf[1536];
  int n = snprintf(buf, sizeof buf, "cae_sim: kernel '%s', block (%u,%u,%u), thread (%u,%u,%u): ", L->name,
                   L->block_idx.x, L->block_idx.y, L->block_idx.z, f->tid.x, f->tid.y, f->tid.z);
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf + n, sizeof buf - n, fmt, ap);
  va_end(ap);
  if (!L->failed) {
    L->failed = true;
    L->error.assign(buf);
  }
  f->state = St::Aborted;
  tsan_release(&L->tsan_block_end);
  yield_to_scheduler(L, f, true);
  __builtin_unreachable();
}

inline bool same_site(const char* f1, int l1, const char* f2, int l2) {
  return l1 == l2 && (f1 == f2 || std::strcmp(f1, f2) == 0);
}

// ---------------------------------------------------------------------------
// Block barrier: __syncthreads and its _count/_and/_or variants
// ---------------------------------------------------------------------------
inline int block_barrier(Bar kind, const char* what, int pred, const char* file, int line) {
  Fiber* f = cur_fiber();
  Quiet q(&f->quiet);
  Launch* L = __atomic_load_n(&g_launch, __ATOMIC_RELAXED);
  if (L->done > 0) {
    const uint3 e = L->fibers[L->first_exited].tid;
    fail(
        "%s at %s:%d reached after thread (%u,%u,%u) of the block exited; every thread must reach every "
        "barrier (do not return early before __syncthreads, use a guard flag)",
        what, file, line, e.x, e.y, e.z);
  }
  if (L->bar_arrived == 0) {
    L->bar_kind = kind, L->bar_what = what, L->bar_file = file, L->bar_line = line;
    L->bar_count = 0, L->bar_and = 1, L->bar_or = 0;
  } else if (kind != L->bar_kind || !same_site(file, line, L->bar_file, L->bar_line)) {
    fail("reached %s at %s:%d while other threads of the block wait at %s at %s:%d (divergent barriers)",
         what, file, line, L->bar_what, L->bar_file, L->bar_line);
  }
  L->bar_count += pred != 0;
  L->bar_and &= pred != 0;
  L->bar_or |= pred != 0;
  f->state = St::AtBarrier;
  f->wait_what = what, f->wait_file = file, f->wait_line = line;
  const unsigned gen = L->bar_gen;
  tsan_release(&L->tsan_bar_gen[gen & 1]);
  if (++L->bar_arrived == L->nthreads) {  // last one in: release everybody
    ++L->bar_gen;
    const int result = kind == Bar::Count ? L->bar_count : kind == Bar::And ? L->bar_and : L->bar_or;
    for (Fiber& g : L->fibers) g.state = St::Runnable, g.bar_result = result;
    L->bar_arrived = 0;
  }
  yield_to_scheduler(L, f, false);  // even the last one yields: others resume in schedule order
  tsan_acquire(&L->tsan_bar_gen[gen & 1]);
  return f->bar_result;
}

// ---------------------------------------------------------------------------
// Warp-level collectives: shuffles, votes, __syncwarp
// ---------------------------------------------------------------------------
inline void complete_warp_op(Launch* L, unsigned base, const WarpOp& op) {
  Fiber* lanes = &L->fibers[base];
  const unsigned mask = op.mask;
  unsigned ballot = 0;
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1) && lanes[l].w_arg) ballot |= 1u << l;
  const unsigned w = static_cast<unsigned>(op.width);
  for (unsigned l = 0; l < 32; ++l) {
    if (!(mask >> l & 1)) continue;
    Fiber& d = lanes[l];
    d.state = St::Runnable;
    d.w_poison = false;
    const unsigned seg = l & ~(w - 1), pos = l - seg;  // segment start, position inside it
    unsigned src = l;
    switch (op.kind) {
      case WK::Sync:
        break;
      case WK::Ballot:
        d.w_res = ballot;
        continue;
      case WK::Any:
        d.w_res = ballot != 0;
        continue;
      case WK::All:
        d.w_res = ballot == mask;
        continue;
      case WK::Idx:
        src = seg + (static_cast<unsigned>(d.w_arg) & (w - 1));
        break;
      case WK::Up: {
        const unsigned delta = static_cast<unsigned>(d.w_arg);
        src = pos >= delta ? l - delta : l;  // below the segment: own value
        break;
      }
      case WK::Down: {
        const unsigned delta = static_cast<unsigned>(d.w_arg);
        src = delta < w - pos ? l + delta : l;  // past the segment: own value
        break;
      }
      case WK::Xor:
        src = l ^ (static_cast<unsigned>(d.w_arg) & 31u);
        if (src > seg + w - 1) src = l;  // later segments are out of reach: own value
        break;
    }
    if (op.kind == WK::Sync) continue;
    if (src == l)
      d.w_res = d.w_val;
    else if (!(mask >> src & 1))
      d.w_poison = true;  // source lane not taking part: undefined on a GPU
    else
      d.w_res = lanes[src].w_val;
  }
}

inline uint64_t warp_op(WK kind, const char* what, unsigned mask, uint64_t val, int arg, int width,
                        bool* poison, const char* file, int line) {
  Fiber* f = cur_fiber();
  Quiet q(&f->quiet);
  Launch* L = __atomic_load_n(&g_launch, __ATOMIC_RELAXED);
  const unsigned lane = f->linear & 31, warp = f->linear >> 5, base = warp * 32;
  const unsigned nlanes = std::min(32u, L->nthreads - base);
  const unsigned exist = nlanes == 32 ? ~0u : (1u << nlanes) - 1;
  if (!(mask >> lane & 1))
    fail("%s(mask=0x%08x) at %s:%d called by lane %u, which is not in the mask", what, mask, file, line,
         lane);
  if (mask & ~exist)
    fail("%s(mask=0x%08x) at %s:%d names lanes 0x%08x that do not exist (warp %u has %u threads)", what, mask,
         file, line, mask & ~exist, warp, nlanes);
  if (width < 1 || width > 32 || (width & (width - 1)))
    fail("%s at %s:%d: width %d is not a power of two in [1, 32]", what, file, line, width);
  for (unsigned l = 0; l < 32; ++l)
    if ((mask >> l & 1) && L->fibers[base + l].state == St::Done)
      fail("%s(mask=0x%08x) at %s:%d: lane %u of the mask has already exited", what, mask, file, line, l);
  std::vector<WarpOp>& ops = L->warp_ops[warp];
  size_t k = 0;
  for (; k < ops.size(); ++k) {
    WarpOp& o = ops[k];
    if (o.mask == mask) {
      if (o.kind != kind || o.width != width)
        fail(
            "%s(mask=0x%08x, width=%d) at %s:%d while lanes 0x%08x wait in %s(mask=0x%08x, width=%d) at "
            "%s:%d",
            what, mask, width, file, line, o.arrived, o.what, o.mask, o.width, o.file, o.line);
      break;
    }
    // A pending collective with an overlapping but different mask is legal
    // (e.g. lanes 8..31 wait in __syncwarp() while lanes 0..7 finish a
    // __shfl_sync(0xff, ...)); if it can never complete, the scheduler
    // reports the deadlock.
  }
  if (k == ops.size()) ops.push_back(WarpOp{kind, mask, 0u, width, what, file, line});
  f->w_val = val, f->w_arg = arg, f->w_mask = mask;
  f->state = St::AtWarp;
  f->wait_what = what, f->wait_file = file, f->wait_line = line;
  tsan_release(&f->tsan_lane);
  ops[k].arrived |= 1u << lane;
  if (ops[k].arrived == mask) {
    complete_warp_op(L, base, ops[k]);
    ops.erase(ops.begin() + static_cast<std::ptrdiff_t>(k));
  }
  yield_to_scheduler(L, f, false);
#if CAE_SIM_TSAN
  for (unsigned l = 0; l < 32; ++l)
    if (mask >> l & 1) tsan_acquire(&L->fibers[base + l].tsan_lane);
#endif
  *poison = f->w_poison;
  return f->w_res;
}

// Called when the kernel function of a thread has returned: strict checks,
// then the fiber parks at the top of its loop until the next block needs it.
inline void thread_exit(Launch* L, Fiber* f) {
  Quiet q(&f->quiet);
  if (L->bar_arrived > 0)
    fail(
        "returned while %u of %u threads wait at %s at %s:%d; every thread must reach every barrier (do not "
        "return early before __syncthreads, use a guard flag)",
        L->bar_arrived, L->nthreads, L->bar_what, L->bar_file, L->bar_line);
  if (!f->copies.empty())
    fail(
        "returned with %zu cp.async copies never waited for (cp.async.wait_all before the barrier that "
        "publishes them)",
        f->copies.size());
  const unsigned lane = f->linear & 31;
  for (const WarpOp& o : L->warp_ops[f->linear >> 5])
    if (o.mask >> lane & 1)
      fail("returned while lanes 0x%08x wait for it in %s(mask=0x%08x) at %s:%d", o.arrived, o.what, o.mask,
           o.file, o.line);
  f->state = St::Done;
  if (L->done++ == 0) L->first_exited = f->linear;
  tsan_release(&L->tsan_block_end);
  f->at_top = true;
  yield_to_scheduler(L, f, false);
}

// Entry point of every fiber (entered by `ret` or makecontext).  A fiber runs
// one CUDA thread per iteration: when the kernel returns it parks, and the
// next block (or launch) resumes it for another thread.  Its stack frames
// stay balanced, so a TSan fiber (and its shadow call stack) can be reused
// instead of being created per thread per block, which is slow.
[[noreturn]] inline void fiber_main() {
#if CAE_SIM_ASAN
  {
    Launch* L = __atomic_load_n(&g_launch, __ATOMIC_RELAXED);
    __sanitizer_finish_switch_fiber(nullptr, &L->asan_main_bottom, &L->asan_main_size);
  }
#endif
  for (;;) {
    Launch* L = __atomic_load_n(&g_launch, __ATOMIC_RELAXED);
    Fiber* f = __atomic_load_n(&g_fiber, __ATOMIC_RELAXED);
    tsan_acquire(&L->tsan_block_begin);
    char what[512];
    what[0] = 0;
    f->copies.clear();  // a thread of an aborted block may have left some
    try {
      L->invoke(L->pack);
    } catch (const std::exception& e) {
      snprintf(what, sizeof what, "%s", e.what());
    } catch (...) {
      snprintf(what, sizeof what, "unknown exception");
    }
    if (what[0]) fail("exception thrown in kernel: %s", what);  // outside the catch: no live exception object
    thread_exit(L, f);
  }
}

// ---------------------------------------------------------------------------
// Scheduler
// ---------------------------------------------------------------------------
inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline void parse_schedule(Launch& L) {
  std::string s;
  if (g_has_override) {
    s = g_schedule_override;
  } else if (const char* e = std::getenv("CAE_SIM_SCHEDULE")) {
    s = e;
  }
  if (s.empty() || s == "forward") {
    L.sched = Order::Forward;
  } else if (s == "reverse") {
    L.sched = Order::Reverse;
  } else if (s == "shuffle" || s.compare(0, 8, "shuffle:") == 0) {
    L.sched = Order::Shuffle;
    L.seed = s.size() > 8 ? std::strtoull(s.c_str() + 8, nullptr, 0) : 0;
  } else {
    throw std::runtime_error("cae_sim: invalid CAE_SIM_SCHEDULE '" + s +
                             "' (forward, reverse or shuffle:<seed>)");
  }
}

// The order the blocks of a grid run in, one after another: the schedule's
// too, since a GPU runs blocks in any order (and at once). Forward: x fastest,
// then y, then z; reverse: the other way round; shuffle: k -> (a k + c) mod
// blocks, a permutation for any a coprime to the count (no table: a grid may
// hold 2^31 blocks), a and c from the seed.
struct BlockOrder {
  uint64_t blocks, a = 1, c = 0;
  Order sched;
  dim3 grid;
  BlockOrder(const Launch& L, dim3 g)
      : blocks(static_cast<uint64_t>(g.x) * g.y * g.z), sched(L.sched), grid(g) {
    if (sched != Order::Shuffle || blocks < 2) return;
    uint64_t rng = L.seed ^ 0xB10C0DE5ull;
    c = splitmix64(rng) % blocks;
    a = splitmix64(rng) % blocks | 1;
    while (std::gcd(a, blocks) != 1) a += 2;  // an odd a: blocks' factor 2 is never shared
  }
  uint3 block(uint64_t k) const {
    const uint64_t i = sched == Order::Forward ? k
                       : sched == Order::Reverse
                           ? blocks - 1 - k
                           : static_cast<uint64_t>((static_cast<unsigned __int128>(a) * k + c) % blocks);
    return uint3{static_cast<unsigned>(i % grid.x), static_cast<unsigned>(i / grid.x % grid.y),
                 static_cast<unsigned>(i / (static_cast<uint64_t>(grid.x) * grid.y))};
  }
};

inline size_t stack_size_from_env() {
  size_t sz = CAE_SIM_STACK_SIZE;
  if (const char* e = std::getenv("CAE_SIM_STACK_KB")) {
    const unsigned long kb = std::strtoul(e, nullptr, 10);
    if (kb >= 16) sz = kb * 1024;
  }
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return (sz + page - 1) / page * page;
}

inline void ensure_stacks(Launch& L, unsigned n, size_t size) {
  if (L.stacks && L.stack_count >= n && L.stack_size == size) return;
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  if (L.stacks) {
#if CAE_SIM_ASAN
    // Frames left on the stacks keep their redzones poisoned, and ASan does
    // not clear shadow memory on munmap: memory mapped there later (Python's
    // own) would report stack-buffer-underflow.
    __asan_unpoison_memory_region(L.stacks, L.stack_count * L.stack_stride);
#endif
    munmap(L.stacks, L.stack_count * L.stack_stride);
  }
  L.stacks = nullptr;
  for (Fiber& f : L.fibers) f.at_top = false;  // their stacks are gone
  const size_t stride = size + page;
  void* p =
      mmap(nullptr, n * stride, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) throw std::runtime_error("cae_sim: cannot allocate fiber stacks");
  L.stacks = static_cast<char*>(p);
  L.stack_count = n, L.stack_size = size, L.stack_stride = stride;
  for (unsigned i = 0; i < n; ++i)  // guard page at the low end: overflow faults instead of corrupting
    mprotect(L.stacks + i * stride, page, PROT_NONE);
}

// Gives a fiber a fresh stack frame (first use, or its previous thread was
// abandoned mid-kernel because the block failed).
inline void init_fiber(Launch& L, Fiber& f) {
  char* lo = f.stack_lo;
#if CAE_SIM_ASAN
  // Abandoned frames keep their redzones poisoned; the new frames would trip
  // over them.
  __asan_unpoison_memory_region(lo, L.stack_size);
#endif
#if CAE_SIM_TSAN
  if (f.tsan_fiber) __tsan_destroy_fiber(f.tsan_fiber);  // its shadow call stack is unbalanced
  f.tsan_fiber = __tsan_create_fiber(0);
#endif
  f.at_top = true;
#if CAE_SIM_USE_UCONTEXT
  f.ctx = L.proto_ctx;
  f.ctx.uc_stack.ss_sp = lo;
  f.ctx.uc_stack.ss_size = L.stack_size;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, reinterpret_cast<void (*)()>(&fiber_main), 0);
#else
  // Initial frame as raw_switch expects it: 6 registers, then the address
  // `ret` jumps to, then a null return address for fiber_main so that it
  // starts with rsp = 8 (mod 16) like any called function.
  void** sp = reinterpret_cast<void**>(reinterpret_cast<uintptr_t>(lo + L.stack_size) & ~uintptr_t(15));
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_main);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  f.sp = sp;
#endif
}

inline std::string tid_str(uint3 t) {
  return "(" + std::to_string(t.x) + "," + std::to_string(t.y) + "," + std::to_string(t.z) + ")";
}

inline std::string deadlock_message(const Launch& L) {
  std::string m = std::string("cae_sim: deadlock in kernel '") + L.name + "', block " + tid_str(L.block_idx) +
                  ": no thread can make progress.";
  if (L.bar_arrived > 0) {
    for (const Fiber& f : L.fibers)
      if (f.state == St::AtBarrier) {
        m += " " + std::to_string(L.bar_arrived) + " of " + std::to_string(L.nthreads) +
             " threads (e.g. thread " + tid_str(f.tid) + ") wait at " + L.bar_what + " at " + L.bar_file +
             ":" + std::to_string(L.bar_line) + ";";
        break;
      }
  }
  unsigned shown = 0;
  for (const Fiber& f : L.fibers)
    if (f.state == St::AtWarp && shown++ < 4) {
      char mask[16];
      snprintf(mask, sizeof mask, "0x%08x", f.w_mask);
      m += std::string(" thread ") + tid_str(f.tid) + " waits in " + f.wait_what + "(mask=" + mask + ") at " +
           f.wait_file + ":" + std::to_string(f.wait_line) + ";";
    }
  if (L.done > 0)
    m += " " + std::to_string(L.done) + " thread(s) exited, e.g. thread " +
         tid_str(L.fibers[L.first_exited].tid) + ".";
  return m;
}

inline void run_block(Launch& L) {
  const unsigned n = L.nthreads;
  const dim3 bd = L.block_dim;
  for (unsigned i = 0; i < n; ++i) {
    Fiber& f = L.fibers[i];
    f.linear = i;
    f.tid = uint3{i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y)};
    f.state = St::Runnable;
    if (!f.at_top) {
      f.asan_fake = nullptr;
      f.quiet = 0;
      init_fiber(L, f);
    }
#if CAE_SIM_TSAN
    char name[96];
    snprintf(name, sizeof name, "cae_sim block (%u,%u,%u) thread (%u,%u,%u)", L.block_idx.x, L.block_idx.y,
             L.block_idx.z, f.tid.x, f.tid.y, f.tid.z);
    __tsan_set_fiber_name(f.tsan_fiber, name);
#endif
  }
  L.done = 0, L.bar_arrived = 0;
  for (auto& w : L.warp_ops) w.clear();
  tsan_release(&L.tsan_block_begin);
  struct Cleanup {  // also runs when the block fails
    Launch& L;
    ~Cleanup() {
      // Everything the block did happens-before what follows (next block,
      // host code).  Threads that did not finish last released at a barrier.
      tsan_acquire(&L.tsan_block_end);
      tsan_acquire(&L.tsan_bar);
      tsan_acquire(&L.tsan_bar_gen[0]);
      tsan_acquire(&L.tsan_bar_gen[1]);
      for (unsigned i = 0; i < L.nthreads; ++i) tsan_acquire(&L.fibers[i].tsan_lane);
    }
  } cleanup{L};

  if (L.sched == Order::Shuffle) {
    L.rng = L.seed ^ (0x9E3779B97F4A7C15ull *
                      (1 + L.block_idx.x + 65536ull * (L.block_idx.y + 65536ull * L.block_idx.z)));
    for (unsigned i = 0; i < n; ++i) L.order[i] = i;
  }
  // Each pass runs every runnable fiber (in schedule order) until it blocks or
  // exits.  A pass in which nothing could run is a deadlock.
  while (L.done < n) {
    if (L.sched == Order::Shuffle)
      for (unsigned i = n - 1; i > 0; --i) std::swap(L.order[i], L.order[splitmix64(L.rng) % (i + 1)]);
    bool progressed = false;
    for (unsigned k = 0; k < n && !L.failed; ++k) {
      const unsigned t = L.sched == Order::Forward ? k : L.sched == Order::Reverse ? n - 1 - k : L.order[k];
      if (L.fibers[t].state != St::Runnable) continue;
      resume(&L, &L.fibers[t]);
      progressed = true;
    }
    if (L.failed) return;
    if (!progressed) {
      L.failed = true;
      L.error = deadlock_message(L);
      return;
    }
  }
}

inline void check_config(const char* name, dim3 g, dim3 b, size_t smem) {
  std::string why;
  const unsigned long long threads = 1ull * b.x * b.y * b.z;
  if (g.x == 0 || g.y == 0 || g.z == 0)
    why = "grid has a zero dimension";
  else if (g.x > 2147483647u || g.y > 65535u || g.z > 65535u)
    why = "grid dimension too large";
  else if (b.x == 0 || b.y == 0 || b.z == 0)
    why = "block has a zero dimension";
  else if (b.x > 1024 || b.y > 1024 || b.z > 64 || threads > 1024)
    why = "more than 1024 threads per block (or block.z > 64)";
  else if (smem > 227u * 1024u)
    why = "more than 227 KiB of dynamic shared memory";
  if (!why.empty())
    throw std::runtime_error(std::string("cae_sim: invalid configuration argument launching '") + name +
                             "' with grid (" + std::to_string(g.x) + "," + std::to_string(g.y) + "," +
                             std::to_string(g.z) + "), block (" + std::to_string(b.x) + "," +
                             std::to_string(b.y) + "," + std::to_string(b.z) + "), " + std::to_string(smem) +
                             " bytes dynamic shared memory: " + why);
}

// Counts a launch that passed check_config. Not inside run_launch: a call
// there changes what GCC fears getcontext may clobber (-Wclobbered).
inline void count_launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t smem) {
  if (t_in_launch) return;  // run_launch refuses it (and this thread holds the mutex)
  std::lock_guard<std::mutex> lock(launch_mutex());
  const std::string& kernel_text = kernel_name(name, kernel);
  ++g_launch_counts[kernel_text];
  if (g_recording) g_launch_records.push_back({kernel_text, grid, block, smem});
}

// Dynamic shared memory above 48 KiB must be opted in per kernel
// (cudaFuncSetAttribute), as on the GPU, where the launch fails otherwise.
inline std::map<const void*, size_t> g_smem_opt_in;

inline void check_smem_opt_in(const char* name, const void* kernel, size_t smem) {
  if (smem <= 48u * 1024u) return;
  size_t allowed = 0;
  {
    std::lock_guard<std::mutex> lock(launch_mutex());
    const auto it = g_smem_opt_in.find(kernel);
    if (it != g_smem_opt_in.end()) allowed = it->second;
  }
  if (smem > allowed)
    throw std::runtime_error(
        std::string("cae_sim: invalid configuration argument launching '") + name +
        "': " + std::to_string(smem) + " bytes of dynamic shared memory, more than 48 KiB and than the " +
        std::to_string(allowed) +
        " opted in with cudaFuncSetAttribute(cudaFuncAttributeMaxDynamicSharedMemorySize)");
}

inline bool dry_run() {
  std::lock_guard<std::mutex> lock(launch_mutex());
  return g_dry_run;
}

inline void run_launch(const char* name, dim3 grid, dim3 block, size_t smem, void (*invoke)(const void*),
                       const void* pack) {
  check_config(name, grid, block, smem);
  if (t_in_launch) throw std::runtime_error("cae_sim: kernel launch from device code is not supported");
  std::lock_guard<std::mutex> lock(launch_mutex());
  t_in_launch = true;
  Quiet q(nullptr);
  Launch& L = g_state;
  struct Reset {
    Launch& L;
    ~Reset() {
      std::free(L.dyn_smem);
      L.dyn_smem = nullptr;
      __atomic_store_n(&g_launch, static_cast<Launch*>(nullptr), __ATOMIC_RELAXED);
      t_in_launch = false;
    }
  } reset{L};
  parse_schedule(L);
  L.name = name, L.grid_dim = grid, L.block_dim = block, L.smem_bytes = smem;
  L.invoke = invoke, L.pack = pack;
  L.nthreads = block.x * block.y * block.z;
  L.failed = false;
  L.error.clear();
  if (L.fibers.size() < L.nthreads) L.fibers.resize(L.nthreads);
  L.order.resize(L.nthreads);
  L.warp_ops.resize((L.nthreads + 31) / 32);
  ensure_stacks(L, L.nthreads, stack_size_from_env());
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (unsigned i = 0; i < L.nthreads; ++i) L.fibers[i].stack_lo = L.stacks + i * L.stack_stride + page;
#if CAE_SIM_USE_UCONTEXT
  getcontext(&L.proto_ctx);  // once per launch: getcontext makes a syscall
#endif
#if CAE_SIM_TSAN
  L.tsan_main = __tsan_get_current_fiber();
#endif
  __atomic_store_n(&g_launch, &L, __ATOMIC_RELAXED);
  const BlockOrder order(L, grid);
  for (uint64_t k = 0; k < order.blocks && !L.failed; ++k) {
    L.block_idx = order.block(k);
    // Exact-size allocation so ASan sees overruns; 0xFF bytes = NaN.
    L.dyn_smem = static_cast<unsigned char*>(std::malloc(smem ? smem : 1));
    if (!L.dyn_smem) throw std::bad_alloc();
    std::memset(L.dyn_smem, 0xFF, smem);
    run_block(L);
    std::free(L.dyn_smem);
    L.dyn_smem = nullptr;
  }
  if (L.failed) {
    std::string msg = L.error;
    throw std::runtime_error(msg);
  }
}

template <class... P>
std::tuple<P...> convert_args(P... p) {  // implicit conversions exactly as in a call
  return std::tuple<P...>(std::move(p)...);
}

template <class Pack>
void invoke_pack(const void* p) {
  const Pack& pk = *static_cast<const Pack*>(p);
  auto args = pk.args;  // every CUDA thread gets its own copy of the parameters
  std::apply(pk.kernel, std::move(args));
}

template <class T>
T poison_value() {
  static_assert(sizeof(T) <= 8, "warp intrinsics take values of at most 8 bytes");
  unsigned char b[sizeof(T)];
  if (std::is_integral<T>::value || std::is_enum<T>::value) {
    const uint64_t p = 0xDEADBEEFDEADBEEFull;
    std::memcpy(b, &p, sizeof(T));
  } else {
    std::memset(b, 0xFF, sizeof(T));  // NaN for float, double, half, bfloat16
  }
  T v;
  std::memcpy(&v, b, sizeof(T));
  return v;
}

template <class T>
T shfl(WK kind, const char* what, unsigned mask, T var, int arg, int width, const char* file, int line) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8,
                "warp shuffles take trivially copyable values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bool poison = false;
  const uint64_t r = warp_op(kind, what, mask, bits, arg, width, &poison, file, line);
  if (poison) return poison_value<T>();
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Public host API
// ---------------------------------------------------------------------------
// Launch `kernel` over `grid` x `block` threads.  Use CAE_LAUNCH instead of
// calling this directly.  Throws std::runtime_error on an invalid
// configuration or on any error detected while the kernel runs.
template <class... P, class... A>
void launch(const char* name, void (*kernel)(P...), dim3 grid, dim3 block, size_t smem_bytes,
            cudaStream_t stream, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "CAE_LAUNCH: wrong number of kernel arguments");
  (void)stream;  // one OS thread, in order: every launch is synchronous
  struct Pack {
    void (*kernel)(P...);
    std::tuple<std::decay_t<P>...> args;
  };
  const Pack pack{kernel, detail::convert_args<std::decay_t<P>...>(std::forward<A>(args)...)};
  detail::check_config(name, grid, block, smem_bytes);
  detail::check_smem_opt_in(name, reinterpret_cast<const void*>(kernel), smem_bytes);
  detail::count_launch(name, reinterpret_cast<const void*>(kernel), grid, block, smem_bytes);
  if (detail::dry_run()) return;  // counted and recorded, not run (see set_dry_run())
  detail::run_launch(name, grid, block, smem_bytes, &detail::invoke_pack<Pack>, &pack);
}

// Launches since the last reset_launch_counts(), per kernel: a launch counts
// once its configuration passed the checks, whether the kernel then failed or
// not. Names as kernel_name() gives them.
inline std::vector<std::pair<std::string, uint64_t>> launch_counts() {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  return {detail::g_launch_counts.begin(), detail::g_launch_counts.end()};
}

inline void reset_launch_counts() {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  detail::g_launch_counts.clear();
}

// The launch recorder: while on, every launch that passed the configuration
// checks is appended to a list (kernel, grid, block, dynamic shared memory);
// take_launch_records() hands the list over and empties it. Turning it on
// empties the list.
inline void set_launch_recording(bool on) {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  detail::g_recording = on;
  if (on) detail::g_launch_records.clear();
}

inline std::vector<LaunchRecord> take_launch_records() {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  return std::exchange(detail::g_launch_records, {});
}

// Dry run: launches are checked, counted and recorded but their threads never
// run, so whatever the kernels would write (outputs, scratch) keeps the
// values it had. For launch shapes of large problems in seconds; the results
// are garbage.
inline void set_dry_run(bool on) {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  detail::g_dry_run = on;
}

// Dynamic shared memory of the current block (see CAE_DYNAMIC_SHARED).
template <class T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::cur_launch()->dyn_smem);
}

// Override CAE_SIM_SCHEDULE ("forward", "reverse", "shuffle:<seed>");
// nullptr goes back to the environment variable.
inline void set_schedule(const char* spec) {
  std::lock_guard<std::mutex> lock(detail::launch_mutex());
  detail::g_has_override = spec != nullptr;
  detail::g_schedule_override = spec ? spec : "";
}

}  // namespace cae_sim

// ---------------------------------------------------------------------------
// Device built-ins
// ---------------------------------------------------------------------------
#define threadIdx (static_cast<const uint3&>(::cae_sim::detail::cur_fiber()->tid))
#define blockIdx (static_cast<const uint3&>(::cae_sim::detail::cur_launch()->block_idx))
#define blockDim (static_cast<const dim3&>(::cae_sim::detail::cur_launch()->block_dim))
#define gridDim (static_cast<const dim3&>(::cae_sim::detail::cur_launch()->grid_dim))

// Barriers: default arguments record the call site for error messages.
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::cae_sim::detail::block_barrier(::cae_sim::detail::Bar::Plain, "__syncthreads", 0, file, line);
}
inline int __syncthreads_count(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cae_sim::detail::block_barrier(::cae_sim::detail::Bar::Count, "__syncthreads_count", pred, file,
                                          line);
}
inline int __syncthreads_and(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cae_sim::detail::block_barrier(::cae_sim::detail::Bar::And, "__syncthreads_and", pred, file, line);
}
inline int __syncthreads_or(int pred, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cae_sim::detail::block_barrier(::cae_sim::detail::Bar::Or, "__syncthreads_or", pred, file, line);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
  bool p;
  ::cae_sim::detail::warp_op(::cae_sim::detail::WK::Sync, "__syncwarp", mask, 0, 0, 32, &p, file, line);
}

template <class T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, const char* file = __builtin_FILE(),
              int line = __builtin_LINE()) {
  return ::cae_sim::detail::shfl(::cae_sim::detail::WK::Idx, "__shfl_sync", mask, var, srcLane, width, file,
                                 line);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                 const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cae_sim::detail::shfl(::cae_sim::detail::WK::Up, "__shfl_up_sync", mask, var,
                                 static_cast<int>(delta), width, file, line);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned int delta, int width = warpSize,
                   const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cae_sim::detail::shfl(::cae_sim::detail::WK::Down, "__shfl_down_sync", mask, var,
                                 static_cast<int>(delta), width, file, line);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize,
                  const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return ::cae_sim::detail::shfl(::cae_sim::detail::WK::Xor, "__shfl_xor_sync", mask, var, laneMask, width,
                                 file, line);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  bool p;
  return static_cast<unsigned>(::cae_sim::detail::warp_op(::cae_sim::detail::WK::Ballot, "__ballot_sync",
                                                          mask, 0, pred != 0, 32, &p, file, line));
}
inline int __any_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  bool p;
  return static_cast<int>(::cae_sim::detail::warp_op(::cae_sim::detail::WK::Any, "__any_sync", mask, 0,
                                                     pred != 0, 32, &p, file, line));
}
inline int __all_sync(unsigned mask, int pred, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
  bool p;
  return static_cast<int>(::cae_sim::detail::warp_op(::cae_sim::detail::WK::All, "__all_sync", mask, 0,
                                                     pred != 0, 32, &p, file, line));
}

[[noreturn]] inline void __trap() { ::cae_sim::detail::fail("__trap() called"); }

// ---------------------------------------------------------------------------
// Tensor cores: mma.sync.aligned.{m16n8k16 (f16, bf16), m16n8k8 (tf32)}.row.col
// .f32 with fp32 accumulation, as the PTX ISA specifies the fragments ("Matrix
// Fragments for mma.m16n8k16 / .m16n8k8"). A warp collective: every lane
// leaves its fragments in the warp's slots, a warp barrier, each lane computes
// its four elements of D from all the lanes' fragments, a second barrier
// before the slots are reused. With groupID g = lane / 4 and t = lane % 4:
//   f16/bf16 A (16 x 16, row): a[r] holds 2 elements (low half first):
//            rows g (a[0], a[2]) or g + 8 (a[1], a[3]); columns 2t, 2t + 1,
//            plus 8 in a[2], a[3]
//            B (16 x 8, col): b[0] rows 2t, 2t + 1, b[1] rows 2t + 8, 2t + 9;
//            column g
//   tf32     A (16 x 8): a[0] (g, t), a[1] (g + 8, t), a[2] (g, t + 4),
//            a[3] (g + 8, t + 4); B (8 x 8): b[0] (t, g), b[1] (t + 4, g)
//   C, D (16 x 8, f32): c[0], c[1] row g, c[2], c[3] row g + 8; columns 2t,
//            2t + 1
// Products are exact in fp32 (tf32 inputs: the low 13 mantissa bits are
// ignored, as the hardware does); the sum runs in k order in fp32.
// ---------------------------------------------------------------------------
namespace cae_sim {
enum class MmaType : unsigned char { F16, BF16, TF32 };
namespace detail {
struct MmaLane {
  uint32_t a[4], b[2];
};
inline MmaLane g_mma_lanes[32][32];  // [warp][lane]; blocks run one at a time

inline float half_bits_to_float(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  float v;
  if (exp == 0x1f) {
    const uint32_t bits = sign | 0x7f800000u | (mant << 13);  // inf, NaN
    std::memcpy(&v, &bits, 4);
    return v;
  }
  v = exp == 0 ? std::ldexp(static_cast<float>(mant), -24)
               : std::ldexp(static_cast<float>(mant | 0x400u), static_cast<int>(exp) - 25);
  return sign ? -v : v;
}

inline float mma_element(MmaType type, uint32_t word, int half) {
  float v;
  if (type == MmaType::TF32) {
    const uint32_t bits = word & ~0x1fffu;
    std::memcpy(&v, &bits, 4);
    return v;
  }
  const uint32_t h = half ? word >> 16 : word & 0xffffu;
  if (type == MmaType::F16) return half_bits_to_float(h);
  const uint32_t bits = h << 16;  // bfloat16: the upper half of a float
  std::memcpy(&v, &bits, 4);
  return v;
}

// A[r][k] and B[k][n] of the warp's fragments.
inline float mma_a(MmaType type, const MmaLane* lanes, int r, int k) {
  if (type == MmaType::TF32) return mma_element(type, lanes[(r % 8) * 4 + k % 4].a[(r / 8) + 2 * (k / 4)], 0);
  return mma_element(type, lanes[(r % 8) * 4 + (k % 8) / 2].a[(r / 8) + 2 * (k / 8)], k % 2);
}
inline float mma_b(MmaType type, const MmaLane* lanes, int k, int n) {
  if (type == MmaType::TF32) return mma_element(type, lanes[n * 4 + k % 4].b[k / 4], 0);
  return mma_element(type, lanes[n * 4 + (k % 8) / 2].b[k / 8], k % 2);
}
}  // namespace detail

// cp.async (global -> shared, `bytes` of 4, 8 or 16; zeros where `zero`, the
// instruction's src-size 0): queued, and done by this thread's
// copy_async_wait_all, as the GPU guarantees nothing before it.
inline void copy_async(void* dst, const void* src, int bytes, bool zero) {
  detail::cur_fiber()->copies.push_back({dst, src, bytes, zero});
}
inline void copy_async_wait_all() {
  auto& copies = detail::cur_fiber()->copies;
  for (const auto& c : copies) {
    if (c.zero) {
      std::memset(c.dst, 0, c.bytes);
    } else {
      std::memcpy(c.dst, c.src, c.bytes);
    }
  }
  copies.clear();
}

// d = A B + c of the warp's fragments (every lane of a whole warp calls it).
inline void mma_sync(MmaType type, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                     const float (&c)[4], const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  using namespace detail;
  const unsigned linear = cur_fiber()->linear, lane = linear & 31;
  if (linear >> 5 >= 32)
    fail("mma.sync at %s:%d: warp %u of a block of at most 32 warps", file, line, linear >> 5);
  MmaLane* lanes = g_mma_lanes[linear >> 5];
  std::memcpy(lanes[lane].a, a, sizeof a);
  std::memcpy(lanes[lane].b, b, sizeof b);
  bool p;
  warp_op(WK::Sync, "mma.sync", 0xffffffffu, 0, 0, 32, &p, file, line);  // all 32 lanes, as .aligned requires
  const int k_size = type == MmaType::TF32 ? 8 : 16;
  const int g = static_cast<int>(lane / 4), t = static_cast<int>(lane % 4);
  float out[4];
  for (int j = 0; j < 4; ++j) {
    const int r = g + 8 * (j / 2), n = 2 * t + j % 2;
    float s = c[j];
    for (int k = 0; k < k_size; ++k) s += mma_a(type, lanes, r, k) * mma_b(type, lanes, k, n);
    out[j] = s;
  }
  warp_op(WK::Sync, "mma.sync", 0xffffffffu, 0, 0, 32, &p, file, line);  // every lane has read the slots
  std::memcpy(d, out, sizeof out);
}
}  // namespace cae_sim

// Fences: one OS thread runs everything, a compiler barrier is enough.
inline void __threadfence() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence_block() { __asm__ __volatile__("" ::: "memory"); }
inline void __threadfence_system() { __asm__ __volatile__("" ::: "memory"); }

template <class T>
inline T __ldg(const T* p) {
  return *p;
}
template <class T>
inline T __ldcg(const T* p) {
  return *p;
}

// ---------------------------------------------------------------------------
// Atomics: real (relaxed) __atomic operations, so TSan sees them as atomic.
// ---------------------------------------------------------------------------
namespace cae_sim {
namespace detail {
template <class T, class F>
T atomic_update(T* addr, F f) {  // CAS loop for operations with no builtin
  T old;
  __atomic_load(addr, &old, __ATOMIC_RELAXED);
  T desired;
  do {
    desired = f(old);
  } while (!__atomic_compare_exchange(addr, &old, &desired, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
}  // namespace detail
}  // namespace cae_sim

#define CAE_SIM_ATOMIC_INT(T)                                                                 \
  inline T atomicAdd(T* a, T v) { return __atomic_fetch_add(a, v, __ATOMIC_RELAXED); }        \
  inline T atomicSub(T* a, T v) { return __atomic_fetch_sub(a, v, __ATOMIC_RELAXED); }        \
  inline T atomicExch(T* a, T v) { return __atomic_exchange_n(a, v, __ATOMIC_RELAXED); }      \
  inline T atomicAnd(T* a, T v) { return __atomic_fetch_and(a, v, __ATOMIC_RELAXED); }        \
  inline T atomicOr(T* a, T v) { return __atomic_fetch_or(a, v, __ATOMIC_RELAXED); }          \
  inline T atomicXor(T* a, T v) { return __atomic_fetch_xor(a, v, __ATOMIC_RELAXED); }        \
  inline T atomicMax(T* a, T v) {                                                             \
    return ::cae_sim::detail::atomic_update(a, [v](T o) { return o < v ? v : o; });           \
  }                                                                                           \
  inline T atomicMin(T* a, T v) {                                                             \
    return ::cae_sim::detail::atomic_update(a, [v](T o) { return v < o ? v : o; });           \
  }                                                                                           \
  inline T atomicCAS(T* a, T compare, T val) {                                                \
    __atomic_compare_exchange_n(a, &compare, val, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED); \
    return compare; /* holds the old value either way */                                      \
  }
CAE_SIM_ATOMIC_INT(int)
CAE_SIM_ATOMIC_INT(unsigned int)
CAE_SIM_ATOMIC_INT(unsigned long long)
CAE_SIM_ATOMIC_INT(long long)
#undef CAE_SIM_ATOMIC_INT

inline float atomicAdd(float* a, float v) {
  return ::cae_sim::detail::atomic_update(a, [v](float o) { return o + v; });
}
inline double atomicAdd(double* a, double v) {
  return ::cae_sim::detail::atomic_update(a, [v](double o) { return o + v; });
}
inline float atomicExch(float* a, float v) {
  float old;
  __atomic_exchange(a, &v, &old, __ATOMIC_RELAXED);
  return old;
}
inline unsigned int atomicInc(unsigned int* a, unsigned int m) {
  return ::cae_sim::detail::atomic_update(a, [m](unsigned int o) { return o >= m ? 0u : o + 1; });
}
inline unsigned int atomicDec(unsigned int* a, unsigned int m) {
  return ::cae_sim::detail::atomic_update(a, [m](unsigned int o) { return (o == 0 || o > m) ? m : o - 1; });
}

// ---------------------------------------------------------------------------
// Math and bit intrinsics.  Fast-math variants are computed exactly.
// ---------------------------------------------------------------------------
inline float __fdividef(float a, float b) { return a / b; }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float x, float y) { return powf(x, y); }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / sqrtf(x); }
inline float __fsqrt_rn(float x) { return sqrtf(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __saturatef(float x) { return x > 0.0f ? (x < 1.0f ? x : 1.0f) : 0.0f; }  // NaN -> 0
inline int __float2int_rn(float x) { return static_cast<int>(nearbyintf(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(floorf(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(ceilf(x)); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline int __float_as_int(float x) {
  int i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline unsigned __float_as_uint(float x) {
  unsigned i;
  std::memcpy(&i, &x, 4);
  return i;
}
inline float __int_as_float(int i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline float __uint_as_float(unsigned i) {
  float x;
  std::memcpy(&x, &i, 4);
  return x;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline unsigned __brev(unsigned x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0F0F0F0Fu) | ((x & 0x0F0F0F0Fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned __umulhi(unsigned a, unsigned b) { return static_cast<unsigned>((1ull * a * b) >> 32); }
inline int __mulhi(int a, int b) { return static_cast<int>((1ll * a * b) >> 32); }
__extension__ typedef unsigned __int128 cae_sim_u128;  // __extension__: quiet under -Wpedantic
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return static_cast<unsigned long long>((static_cast<cae_sim_u128>(a) * b) >> 64);
}

// CUDA's global min/max overloads (device code calls them unqualified).
// Non-template overloads in the global namespace: they neither hide nor make
// std::min/std::max ambiguous, and headers parsed before are unaffected.
#define CAE_SIM_MINMAX(R, A, B, MIN, MAX) \
  inline R min(A a, B b) { return MIN; }  \
  inline R max(A a, B b) { return MAX; }
#define CAE_SIM_MINMAX_INT(R, A, B)                                                                        \
  CAE_SIM_MINMAX(R, A, B, (static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b)), \
                 (static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a) : static_cast<R>(b)))
CAE_SIM_MINMAX_INT(int, int, int)
CAE_SIM_MINMAX_INT(unsigned int, unsigned int, unsigned int)
CAE_SIM_MINMAX_INT(unsigned int, int, unsigned int)
CAE_SIM_MINMAX_INT(unsigned int, unsigned int, int)
CAE_SIM_MINMAX_INT(long, long, long)
CAE_SIM_MINMAX_INT(unsigned long, unsigned long, unsigned long)
CAE_SIM_MINMAX_INT(unsigned long, long, unsigned long)
CAE_SIM_MINMAX_INT(unsigned long, unsigned long, long)
CAE_SIM_MINMAX_INT(long long, long long, long long)
CAE_SIM_MINMAX_INT(unsigned long long, unsigned long long, unsigned long long)
CAE_SIM_MINMAX_INT(unsigned long long, long long, unsigned long long)
CAE_SIM_MINMAX_INT(unsigned long long, unsigned long long, long long)
CAE_SIM_MINMAX(float, float, float, fminf(a, b), fmaxf(a, b))
CAE_SIM_MINMAX(double, double, double, fmin(a, b), fmax(a, b))
CAE_SIM_MINMAX(double, float, double, fmin(a, b), fmax(a, b))
CAE_SIM_MINMAX(double, double, float, fmin(a, b), fmax(a, b))
#undef CAE_SIM_MINMAX_INT
#undef CAE_SIM_MINMAX
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a > b ? a : b; }

// Host runtime calls of the kernels that keep more than 48 KiB in shared
// memory: the opt-in is recorded per kernel and checked at launch
// (detail::check_smem_opt_in); memsets run at once (launches are synchronous).
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
template <class... P>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(P...), cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 ||
      value > cae_sim_smem_opt_in_limit(cae_sim_arch()))
    return cudaErrorInvalidValue;
  std::lock_guard<std::mutex> lock(cae_sim::detail::launch_mutex());
  cae_sim::detail::g_smem_opt_in[reinterpret_cast<const void*>(kernel)] = static_cast<size_t>(value);
  return cudaSuccess;
}
inline cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream = nullptr) {
  (void)stream;
  std::memset(p, value, bytes);
  return cudaSuccess;
}
