// Which level's kernels the CPU backend runs (capability.h), and CpuKernels'
// hand-over to them. Compiled for the baseline: it runs on every CPU.
#include "capability.h"

#include <atomic>
#include <cstdlib>

#include "kernels.h"

namespace cae {
namespace cpu {
namespace {

bool cpu_has(Capability level) {
  switch (level) {
    case Capability::baseline:
      return true;
#ifdef CAE_CPU_X86
    // __builtin_cpu_supports also checks that the OS saves the wide registers.
    case Capability::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case Capability::avx512:
      return cpu_has(Capability::avx2) && __builtin_cpu_supports("avx512f") &&
             __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vl");
#endif
    default:
      return false;
  }
}

constexpr Capability kAllLevels[] = {Capability::baseline, Capability::avx2, Capability::avx512};

// "baseline, avx2, ...": the names of levels, for messages.
template <class Levels>
std::string joined_names(const Levels& levels) {
  std::string names;
  for (Capability level : levels) names += std::string(names.empty() ? "" : ", ") + capability_name(level);
  return names;
}

Capability parse(const std::string& name) {
  for (Capability level : kAllLevels) {
    if (name != capability_name(level)) continue;
    TORCH_CHECK(cpu_has(level), "cae: CPU capability '", name, "' is not available on this CPU",
#ifndef CAE_CPU_X86
                " (this build's architecture has only the baseline level)",
#endif
                "; it supports: ", joined_names(supported_capabilities()));
    return level;
  }
  TORCH_CHECK(false, "cae: unknown CPU capability '", name, "'; expected one of: ", joined_names(kAllLevels));
}

// The best level this CPU runs, or the one CAE_CPU_CAPABILITY names.
Capability initial_level() {
  const char* requested = std::getenv("CAE_CPU_CAPABILITY");
  if (requested != nullptr && *requested != '\0') return parse(requested);
  return supported_capabilities().back();
}

std::atomic<int>& active_level() {
  static std::atomic<int> level{static_cast<int>(initial_level())};
  return level;
}

// Calls f with the active level's kernel struct.
template <class F>
void with_level(F&& f) {
  switch (active_capability()) {
#ifdef CAE_CPU_X86
    case Capability::avx512:
      return f(avx512::Kernels{});
    case Capability::avx2:
      return f(avx2::Kernels{});
#endif
    default:
      return f(baseline::Kernels{});
  }
}

}  // namespace

const char* capability_name(Capability level) {
  switch (level) {
    case Capability::avx2:
      return "avx2";
    case Capability::avx512:
      return "avx512";
    default:
      return "baseline";
  }
}

std::vector<Capability> supported_capabilities() {
  std::vector<Capability> levels;
  for (Capability level : kAllLevels)
    if (cpu_has(level)) levels.push_back(level);
  return levels;
}

Capability active_capability() {
  return static_cast<Capability>(active_level().load(std::memory_order_relaxed));
}

void set_capability(const std::string& name) {
  active_level().store(static_cast<int>(parse(name)), std::memory_order_relaxed);
}

}  // namespace cpu

void CpuKernels::correlate(const CorrelateParams& p) {
  cpu::with_level([&](auto k) { k.correlate(p); });
}

void CpuKernels::correlate_transpose(const CorrelateParams& p) {
  cpu::with_level([&](auto k) { k.correlate_transpose(p); });
}

void CpuKernels::weight_grad(const WeightGradParams& p) {
  cpu::with_level([&](auto k) { k.weight_grad(p); });
}

void CpuKernels::conv_backward(const ConvBackwardParams& p) {
  cpu::with_level([&](auto k) { k.conv_backward(p); });
}

void CpuKernels::bias_grad(const BiasGradParams& p) {
  cpu::with_level([&](auto k) { k.bias_grad(p); });
}

void CpuKernels::max_pool(const MaxPoolParams& p) {
  cpu::with_level([&](auto k) { k.max_pool(p); });
}

void CpuKernels::max_pool_grad(const MaxPoolGradParams& p) {
  cpu::with_level([&](auto k) { k.max_pool_grad(p); });
}

}  // namespace cae
