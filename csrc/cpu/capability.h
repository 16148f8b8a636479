// The CPU kernels are compiled once per instruction-set level, as ATen does
// with its per-capability builds: csrc/cpu/level_<name>.cpp compiles the
// sources of csrc/cpu/level/ into namespace cae::cpu::<name>, with that
// level's target and its own vector width and register tiles. One build then
// runs the best kernels for the CPU it lands on, chosen at load time:
//
//   baseline  the compiler's default target: SSE2 on x86-64, NEON on aarch64
//   avx2      AVX2 + FMA, 32-byte vectors, 16 vector registers (x86-64 only)
//   avx512    AVX-512 F/BW/DQ/VL, 64-byte vectors, 32 registers (x86-64 only)
//
// CAE_CPU_CAPABILITY=<name> in the environment, or set_capability(), selects
// a lower level (an error where the CPU lacks the one asked for).
#pragma once

#include <string>
#include <vector>

#include "../backend.h"

#if defined(__x86_64__) || defined(_M_X64)
#define CAE_CPU_X86 1
#endif

namespace cae {
namespace cpu {

enum class Capability { baseline = 0, avx2 = 1, avx512 = 2 };

// Every level's kernels, the same set as every backend's (backend.h).
namespace baseline {
struct Kernels {
  CAE_BACKEND_KERNELS
};
}  // namespace baseline
#ifdef CAE_CPU_X86
namespace avx2 {
struct Kernels {
  CAE_BACKEND_KERNELS
};
}  // namespace avx2
namespace avx512 {
struct Kernels {
  CAE_BACKEND_KERNELS
};
}  // namespace avx512
#endif

const char* capability_name(Capability level);
// The levels this CPU can run, lowest first.
std::vector<Capability> supported_capabilities();
// The level the ops use now: the best supported, unless lowered.
Capability active_capability();
// Selects a level by name; a clear error for an unknown name or a level this
// CPU cannot run.
void set_capability(const std::string& name);

}  // namespace cpu
}  // namespace cae
