// The CPU backend: hand-written C++ kernels, parallel over the batch with
// at::parallel_for, inner loops written for the compiler's vectorizer.
// Tensors arrive checked, contiguous in the layout named by `nhwc`.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "../ops.h"

namespace cae {
namespace cpu {

// [lo, hi): the output positions o whose tap k reads input position
// stride * o + k - 1 inside [0, input_size).
inline std::pair<int64_t, int64_t> tap_range(int64_t k, int64_t stride,
                                             int64_t input_size,
                                             int64_t output_size) {
  const int64_t lo = k == 0 ? 1 : 0;
  const int64_t last_input = input_size - k;  // stride * o <= input_size - k
  const int64_t hi = last_input < 0 ? 0 : std::min(output_size, last_input / stride + 1);
  return {lo, std::max(lo, hi)};
}

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
  static bool supports(at::ScalarType t) {
    return t == at::kFloat || t == at::kDouble;
  }
  CAE_BACKEND_KERNELS
};

}  // namespace cae
