// The path from each registered op to a backend's kernels, written once.
//
// A backend is a struct of static kernel entry points (backend.h; CpuKernels
// in csrc/cpu/, CudaKernels in csrc/cuda/). Every op checks its arguments
// (shapes.h), puts its tensors in one memory format, allocates the result and
// hands the backend raw work, one params struct with named fields a kernel
// (backend.h):
//
//   correlate            y = act(bias + conv3x3_stride(gate(x), w))
//   correlate_transpose  x = act(bias + conv3x3_stride^T(gate(y), w))
//   weight_grad          dw[s, l] = sum gate(small)[s] * shifted gate(large)[l],
//                        and in the same pass db = the sum of the gated output
//                        gradient (the large side when grad_output_is_large)
//   bias_grad            db[c] = sum gate(g)[c]
//   conv_backward        correlate_transpose or correlate, and weight_grad:
//                        a whole layer's backward, sharing work between them
//   max_pool, max_pool_grad
//
// where gate(t) zeroes t where the gate tensor (a fused ReLU's output) is not
// positive. The convolution's backward is the transposed convolution's
// forward and vice versa, so four convolution kernels serve both op families.
#pragma once

#include <torch/library.h>

#include <tuple>

#include "backend.h"
#include "shapes.h"

#ifndef CAE_NAMESPACE
#define CAE_NAMESPACE cae
#endif

namespace cae {

inline constexpr const char* kOpNames[] = {
    "conv3x3",           "conv3x3_grad_input",           "conv3x3_grad_weight",
    "conv_transpose3x3", "conv_transpose3x3_grad_input", "conv_transpose3x3_grad_weight",
    "conv3x3_backward",  "conv_transpose3x3_backward",   "bias_grad",
    "max_pool2x2",       "max_pool2x2_grad_input",       "encoder_block"};

template <class K>
struct Ops {
  static void check_dtype(const Tensor& input) {
    TORCH_CHECK(K::supports(input.scalar_type()), "cae: the ", K::name, " kernels do not support dtype ",
                input.scalar_type(), " (supported: ", K::supported_dtypes, ")");
  }

  // What every op of the two convolution families checks first: the input,
  // its dtype on this backend, the stride, and (where given) the weight, whose
  // input channels are dim 1 ([C_out, C_in, 3, 3]) or, transposed, dim 0.
  static void check_input(const Tensor& input, int64_t stride) {
    check_activation(input, "input", input);
    check_dtype(input);
    check_stride(stride);
  }

  static void check_input_and_weight(const Tensor& input, int64_t stride, const Tensor& weight,
                                     bool transposed) {
    check_input(input, stride);
    check_weight(weight, input, transposed ? "[C_in, C_out, 3, 3]" : "[C_out, C_in, 3, 3]");
    check_input_channels(input, weight.size(transposed ? 0 : 1), weight);
  }

  static Tensor conv3x3(const Tensor& input, const Tensor& weight, const OptTensor& bias, int64_t stride,
                        bool relu) {
    check_input_and_weight(input, stride, weight, false);
    check_bias(bias, input, weight.size(0));
    const bool nhwc = is_channels_last(input);
    const auto format = memory_format(nhwc);
    auto output = at::empty({input.size(0), weight.size(0), conv_output_size(input.size(2), stride),
                             conv_output_size(input.size(3), stride)},
                            input.options().memory_format(format));
    if (output.numel() == 0) return output;
    K::correlate({.out = output,
                  .input = input.contiguous(format),
                  .input_gate = std::nullopt,
                  .weight = weight.contiguous(),
                  .bias = contiguous_in(bias, at::MemoryFormat::Contiguous),
                  .stride = stride,
                  .relu = relu,
                  .nhwc = nhwc});
    return output;
  }

  // What the input-gradient and whole-backward ops check.
  static void check_backward_args(const Tensor& grad_output, const OptTensor& relu_output,
                                  const Tensor& weight, const Tensor& input, int64_t stride,
                                  bool transposed) {
    check_input_and_weight(input, stride, weight, transposed);
    if (transposed) {
      check_transpose_grad_output(grad_output, input, weight.size(1), stride);
    } else {
      check_activation(grad_output, "grad_output", input);
      check_same_shape(grad_output, "grad_output",
                       {input.size(0), weight.size(0), conv_output_size(input.size(2), stride),
                        conv_output_size(input.size(3), stride)},
                       "the convolution's output");
    }
    check_relu_output(relu_output, grad_output);
  }

  static Tensor conv3x3_grad_input(const Tensor& grad_output, const OptTensor& relu_output,
                                   const Tensor& weight, const Tensor& input, int64_t stride) {
    check_backward_args(grad_output, relu_output, weight, input, stride, false);
    const bool nhwc = is_channels_last(input);
    const auto format = memory_format(nhwc);
    auto grad_input = at::empty(input.sizes(), input.options().memory_format(format));
    if (grad_input.numel() == 0) return grad_input;
    if (grad_output.numel() == 0) return grad_input.zero_();
    K::correlate_transpose({.out = grad_input,
                            .input = grad_output.contiguous(format),
                            .input_gate = contiguous_in(relu_output, format),
                            .weight = weight.contiguous(),
                            .bias = std::nullopt,
                            .stride = stride,
                            .relu = false,
                            .nhwc = nhwc});
    return grad_input;
  }

  // The weight's gradient and, from the same pass over the samples, the
  // bias's: the gated grad_output summed per channel (alone where the weight
  // has nothing to sum over). grad_output is weight_grad's small side
  // (convolution) or large side (transposed convolution).
  static std::tuple<Tensor, Tensor> weight_and_bias_grads(Tensor grad_weight, const Tensor& grad_output,
                                                          const OptTensor& relu_output, const Tensor& input,
                                                          int64_t stride, bool transposed) {
    const bool nhwc = is_channels_last(input);
    const auto format = memory_format(nhwc);
    auto grad_bias = at::empty({grad_output.size(1)}, grad_output.options());
    if (grad_output.numel() == 0) return {grad_weight.zero_(), grad_bias.zero_()};
    const Tensor g = grad_output.contiguous(format);
    const OptTensor gate = contiguous_in(relu_output, format);
    if (input.numel() == 0) {
      K::bias_grad({.grad_bias = grad_bias, .grad_output = g, .gate = gate, .nhwc = nhwc});
      return {grad_weight.zero_(), grad_bias};
    }
    const Tensor x = input.contiguous(format);
    const OptTensor no_gate;
    K::weight_grad({.grad_weight = grad_weight,
                    .grad_bias = grad_bias,
                    .small = transposed ? x : g,
                    .small_gate = transposed ? no_gate : gate,
                    .large = transposed ? g : x,
                    .large_gate = transposed ? gate : no_gate,
                    .stride = stride,
                    .nhwc = nhwc,
                    .grad_output_is_large = transposed});
    return {grad_weight, grad_bias};
  }

  static std::tuple<Tensor, Tensor> conv3x3_grad_weight(const Tensor& grad_output,
                                                        const OptTensor& relu_output, const Tensor& input,
                                                        int64_t stride) {
    check_input(input, stride);
    check_activation(grad_output, "grad_output", input);
    TORCH_CHECK(grad_output.size(0) == input.size(0) &&
                    grad_output.size(2) == conv_output_size(input.size(2), stride) &&
                    grad_output.size(3) == conv_output_size(input.size(3), stride),
                "cae: grad_output of sizes ", grad_output.sizes(), " does not match a stride-", stride,
                " convolution of input of sizes ", input.sizes());
    check_relu_output(relu_output, grad_output);
    return weight_and_bias_grads(at::empty({grad_output.size(1), input.size(1), 3, 3}, input.options()),
                                 grad_output, relu_output, input, stride, false);
  }

  static Tensor conv_transpose3x3(const Tensor& input, const Tensor& weight, const OptTensor& bias,
                                  int64_t stride, bool relu) {
    check_input_and_weight(input, stride, weight, true);
    check_bias(bias, input, weight.size(1));
    const bool nhwc = is_channels_last(input);
    const auto format = memory_format(nhwc);
    auto output = at::empty({input.size(0), weight.size(1), input.size(2) * stride, input.size(3) * stride},
                            input.options().memory_format(format));
    if (output.numel() == 0) return output;
    K::correlate_transpose({.out = output,
                            .input = input.contiguous(format),
                            .input_gate = std::nullopt,
                            .weight = weight.contiguous(),
                            .bias = contiguous_in(bias, at::MemoryFormat::Contiguous),
                            .stride = stride,
                            .relu = relu,
                            .nhwc = nhwc});
    return output;
  }

  static void check_transpose_grad_output(const Tensor& grad_output, const Tensor& input, int64_t channels,
                                          int64_t stride) {
    check_activation(grad_output, "grad_output", input);
    check_same_shape(grad_output, "grad_output",
                     {input.size(0), channels, input.size(2) * stride, input.size(3) * stride},
                     "the transposed convolution's output");
  }

  static Tensor conv_transpose3x3_grad_input(const Tensor& grad_output, const OptTensor& relu_output,
                                             const Tensor& weight, const Tensor& input, int64_t stride) {
    check_backward_args(grad_output, relu_output, weight, input, stride, true);
    const bool nhwc = is_channels_last(input);
    const auto format = memory_format(nhwc);
    auto grad_input = at::empty(input.sizes(), input.options().memory_format(format));
    if (grad_input.numel() == 0) return grad_input;
    if (grad_output.numel() == 0) return grad_input.zero_();
    K::correlate({.out = grad_input,
                  .input = grad_output.contiguous(format),
                  .input_gate = contiguous_in(relu_output, format),
                  .weight = weight.contiguous(),
                  .bias = std::nullopt,
                  .stride = stride,
                  .relu = false,
                  .nhwc = nhwc});
    return grad_input;
  }

  static std::tuple<Tensor, Tensor> conv_transpose3x3_grad_weight(const Tensor& grad_output,
                                                                  const OptTensor& relu_output,
                                                                  const Tensor& input, int64_t stride) {
    check_input(input, stride);
    check_transpose_grad_output(grad_output, input, grad_output.size(1), stride);
    check_relu_output(relu_output, grad_output);
    return weight_and_bias_grads(at::empty({input.size(1), grad_output.size(1), 3, 3}, input.options()),
                                 grad_output, relu_output, input, stride, true);
  }

  // The whole backward (grad_input, grad_weight, grad_bias), which autograd
  // takes when it needs the first two: the backend's conv_backward shares work
  // between them (backend.h); empty tensors take the separate ops' paths.
  static std::tuple<Tensor, Tensor, Tensor> conv_backward(const Tensor& grad_output,
                                                          const OptTensor& relu_output, const Tensor& weight,
                                                          const Tensor& input, int64_t stride,
                                                          bool transposed) {
    check_backward_args(grad_output, relu_output, weight, input, stride, transposed);
    if (input.numel() > 0 && grad_output.numel() > 0) {
      const bool nhwc = is_channels_last(input);
      const auto format = memory_format(nhwc);
      auto grad_input = at::empty(input.sizes(), input.options().memory_format(format));
      auto grad_weight = at::empty(weight.sizes(), input.options());
      auto grad_bias = at::empty({grad_output.size(1)}, grad_output.options());
      K::conv_backward({.grad_input = grad_input,
                        .grad_weight = grad_weight,
                        .grad_bias = grad_bias,
                        .grad_output = grad_output.contiguous(format),
                        .relu_output = contiguous_in(relu_output, format),
                        .weight = weight.contiguous(),
                        .input = input.contiguous(format),
                        .stride = stride,
                        .nhwc = nhwc,
                        .transposed = transposed});
      return {grad_input, grad_weight, grad_bias};
    }
    if (transposed) {
      auto [grad_weight, grad_bias] = conv_transpose3x3_grad_weight(grad_output, relu_output, input, stride);
      return {conv_transpose3x3_grad_input(grad_output, relu_output, weight, input, stride), grad_weight,
              grad_bias};
    }
    auto [grad_weight, grad_bias] = conv3x3_grad_weight(grad_output, relu_output, input, stride);
    return {conv3x3_grad_input(grad_output, relu_output, weight, input, stride), grad_weight, grad_bias};
  }

  static std::tuple<Tensor, Tensor, Tensor> conv3x3_backward(const Tensor& grad_output,
                                                             const OptTensor& relu_output,
                                                             const Tensor& weight, const Tensor& input,
                                                             int64_t stride) {
    return conv_backward(grad_output, relu_output, weight, input, stride, false);
  }

  static std::tuple<Tensor, Tensor, Tensor> conv_transpose3x3_backward(const Tensor& grad_output,
                                                                       const OptTensor& relu_output,
                                                                       const Tensor& weight,
                                                                       const Tensor& input, int64_t stride) {
    return conv_backward(grad_output, relu_output, weight, input, stride, true);
  }

  static Tensor bias_grad(const Tensor& grad_output, const OptTensor& relu_output) {
    check_activation(grad_output, "grad_output", grad_output);
    check_dtype(grad_output);
    check_relu_output(relu_output, grad_output);
    const bool nhwc = is_channels_last(grad_output);
    const auto format = memory_format(nhwc);
    auto grad_bias = at::empty({grad_output.size(1)}, grad_output.options());
    if (grad_output.numel() == 0) return grad_bias.zero_();
    K::bias_grad({.grad_bias = grad_bias,
                  .grad_output = grad_output.contiguous(format),
                  .gate = contiguous_in(relu_output, format),
                  .nhwc = nhwc});
    return grad_bias;
  }

  static Tensor max_pool2x2(const Tensor& input) {
    check_activation(input, "input", input);
    check_dtype(input);
    const bool nhwc = is_channels_last(input);
    const auto format = memory_format(nhwc);
    auto output = at::empty(
        {input.size(0), input.size(1), pool_output_size(input.size(2)), pool_output_size(input.size(3))},
        input.options().memory_format(format));
    if (output.numel() == 0) return output;
    K::max_pool({.out = output, .input = input.contiguous(format), .nhwc = nhwc});
    return output;
  }

  static Tensor max_pool2x2_grad_input(const Tensor& grad_output, const Tensor& input) {
    check_activation(input, "input", input);
    check_dtype(input);
    check_activation(grad_output, "grad_output", input);
    check_same_shape(
        grad_output, "grad_output",
        {input.size(0), input.size(1), pool_output_size(input.size(2)), pool_output_size(input.size(3))},
        "the max-pool's output");
    const bool nhwc = is_channels_last(input);
    const auto format = memory_format(nhwc);
    auto grad_input = at::empty(input.sizes(), input.options().memory_format(format));
    if (grad_input.numel() == 0) return grad_input;
    K::max_pool_grad({.grad_input = grad_input,
                      .grad_output = grad_output.contiguous(format),
                      .input = input.contiguous(format),
                      .nhwc = nhwc});
    return grad_input;
  }

  // An encoder block's forward: a1 = act(conv3x3(input, w1, b1)), a2 =
  // act(conv3x3(a1, w2, b2)), out = max_pool2x2(a2), or with a third weight
  // act(conv3x3(a2, w_down, b_down, stride 2)). One kernel where the backend
  // fuses it (K::encoder_block, optional) and takes the shape, else composed
  // from this struct's per-op functions.
  static Tensor encoder_block(const Tensor& input, at::TensorList weights, at::TensorList biases, bool relu) {
    TORCH_CHECK(weights.size() == 2 || weights.size() == 3,
                "cae: encoder_block takes 2 weights (pool) or 3 (strided), got ", weights.size());
    TORCH_CHECK(biases.size() == weights.size(),
                "cae: encoder_block takes a bias per weight: ", weights.size(), " weights, ", biases.size(),
                " biases");
    const bool strided = weights.size() == 3;
    check_input_and_weight(input, 1, weights[0], false);
    const int64_t channels = weights[0].size(0);
    for (size_t i = 0; i < weights.size(); ++i) {
      if (i > 0) {
        check_weight(weights[i], input, "[C1, C1, 3, 3]");
        TORCH_CHECK(weights[i].size(0) == channels && weights[i].size(1) == channels,
                    "cae: encoder_block's weight ", i, " must have sizes [", channels, ", ", channels,
                    ", 3, 3], got ", weights[i].sizes());
      }
      check_bias(biases[i], input, channels);
    }
    if constexpr (requires(const EncoderBlockParams& p) { K::encoder_block(p); }) {
      const bool nhwc = is_channels_last(input);
      auto output = at::empty(
          {input.size(0), channels, pool_output_size(input.size(2)), pool_output_size(input.size(3))},
          input.options().memory_format(memory_format(nhwc)));
      if (output.numel() == 0) return output;
      if (K::encoder_block({.out = output,
                            .interior_a1 = std::nullopt,
                            .interior_a2 = std::nullopt,
                            .input = input.contiguous(memory_format(nhwc)),
                            .w1 = weights[0].contiguous(),
                            .b1 = biases[0].contiguous(),
                            .w2 = weights[1].contiguous(),
                            .b2 = biases[1].contiguous(),
                            .w_down = strided ? OptTensor(weights[2].contiguous()) : std::nullopt,
                            .b_down = strided ? OptTensor(biases[2].contiguous()) : std::nullopt,
                            .relu = relu,
                            .nhwc = nhwc})) {
        return output;
      }
    }
    const Tensor a1 = conv3x3(input, weights[0], biases[0], 1, relu);
    const Tensor a2 = conv3x3(a1, weights[1], biases[1], 1, relu);
    return strided ? conv3x3(a2, weights[2], biases[2], 2, relu) : max_pool2x2(a2);
  }

  static void register_all(torch::Library& m) {
    m.impl("conv3x3", &conv3x3);
    m.impl("conv3x3_grad_input", &conv3x3_grad_input);
    m.impl("conv3x3_grad_weight", &conv3x3_grad_weight);
    m.impl("conv_transpose3x3", &conv_transpose3x3);
    m.impl("conv_transpose3x3_grad_input", &conv_transpose3x3_grad_input);
    m.impl("conv_transpose3x3_grad_weight", &conv_transpose3x3_grad_weight);
    m.impl("conv3x3_backward", &conv3x3_backward);
    m.impl("conv_transpose3x3_backward", &conv_transpose3x3_backward);
    m.impl("bias_grad", &bias_grad);
    m.impl("max_pool2x2", &max_pool2x2);
    m.impl("max_pool2x2_grad_input", &max_pool2x2_grad_input);
    m.impl("encoder_block", &encoder_block);
  }
};

}  // namespace cae
