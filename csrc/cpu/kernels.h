// The CPU backend: hand-written C++ kernels, parallel over the batch with
// at::parallel_for, inner loops written for the compiler's vectorizer.
// Tensors arrive checked, contiguous in the layout named by `nhwc`.
//
// CpuKernels hands each call to the kernels of the instruction-set level in
// use (capability.h). This header is also the prelude of every level's
// translation unit: everything from torch and the standard library is
// included here, before the level's target switch, so that only our own
// kernels are compiled for a wider instruction set (an inline function of a
// header compiled for AVX2 in one unit could be the copy the linker keeps
// for all of them).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "../ops.h"
#include "capability.h"

// Compiles the functions that follow for target t (a GCC/Clang target
// string), until CAE_CPU_TARGET_END.
#define CAE_CPU_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define CAE_CPU_TARGET_BEGIN(t) \
  CAE_CPU_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define CAE_CPU_TARGET_END CAE_CPU_PRAGMA(clang attribute pop)
#else
#define CAE_CPU_TARGET_BEGIN(t) CAE_CPU_PRAGMA(GCC push_options) CAE_CPU_PRAGMA(GCC target(t))
#define CAE_CPU_TARGET_END CAE_CPU_PRAGMA(GCC pop_options)
#endif

namespace cae {
namespace cpu {

// relu_output gate: a gradient passes where the fused ReLU's output is
// positive. Done on the bits (value AND all-ones-or-zero), so it never
// branches and an inf or NaN gradient is zeroed, not multiplied, where the
// gate is closed.
template <bool Gated, typename T>
inline T gate(T value, const T* gate_data, int64_t i) {
  if constexpr (Gated) {
    using Bits = std::conditional_t<sizeof(T) == 8, uint64_t, uint32_t>;
    Bits bits;
    std::memcpy(&bits, &value, sizeof(T));
    bits &= Bits(0) - Bits(gate_data[i] > T(0));
    std::memcpy(&value, &bits, sizeof(T));
  }
  return value;
}

template <typename T>
inline T relu(T v) {
  return v < T(0) ? T(0) : v;  // NaN stays NaN, as in torch.relu
}

// Sums over the batch are split into this many fixed chunks whatever the
// thread count, so gradients are bitwise reproducible from run to run.
constexpr int64_t kBatchChunks = 64;

// Calls f with std::true_type when the gate tensor is present, so the
// gated and plain inner loops are compiled separately.
template <class F>
inline void with_gate(const OptTensor& gate_tensor, F&& f) {
  if (gate_tensor.has_value()) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <typename T>
inline const T* data_or_null(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

}  // namespace cpu

struct CpuKernels {
  static constexpr const char* name = "CPU";
  static constexpr const char* supported_dtypes = "float32, float64";
  static bool supports(at::ScalarType t) { return t == at::kFloat || t == at::kDouble; }
  CAE_BACKEND_KERNELS
};

}  // namespace cae
