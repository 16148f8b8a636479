// What every backend (csrc/cpu/, csrc/cuda/) hands the ops of ops.h: a struct
// of static kernel entry points, its set declared once here by
// CAE_BACKEND_KERNELS. Tensors arrive checked, contiguous in the layout named
// by `nhwc`, outputs preallocated; ops.h says what each kernel computes.
// Lean on purpose: nvcc parses it once per GPU architecture (cuda/kernels.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace cae {
using at::Tensor;
using OptTensor = std::optional<Tensor>;
}  // namespace cae

#define CAE_BACKEND_KERNELS                                                                 \
  static void correlate(const Tensor& out, const Tensor& x, const OptTensor& x_gate,        \
                        const Tensor& w, const OptTensor& bias, int64_t stride, bool relu,  \
                        bool nhwc);                                                         \
  static void correlate_transpose(const Tensor& out, const Tensor& g, const OptTensor& g_gate, \
                                  const Tensor& w, const OptTensor& bias, int64_t stride,   \
                                  bool relu, bool nhwc);                                    \
  static void weight_grad(const Tensor& out, const Tensor& a, const OptTensor& a_gate,      \
                          const Tensor& b, const OptTensor& b_gate, int64_t stride,         \
                          bool nhwc, const Tensor& bias_out, bool bias_of_b);               \
  static void bias_grad(const Tensor& out, const Tensor& g, const OptTensor& g_gate,        \
                        bool nhwc);                                                         \
  static void max_pool(const Tensor& out, const Tensor& x, bool nhwc);                      \
  static void max_pool_grad(const Tensor& grad_input, const Tensor& grad_output,            \
                            const Tensor& x, bool nhwc);
