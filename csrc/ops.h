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

#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "backend.h"
#include "shapes.h"

#ifndef CAE_NAMESPACE
#define CAE_NAMESPACE cae
#endif

namespace cae {

inline constexpr const char* kOpNames[] = {"conv3x3",
                                           "conv3x3_grad_input",
                                           "conv3x3_grad_weight",
                                           "conv_transpose3x3",
                                           "conv_transpose3x3_grad_input",
                                           "conv_transpose3x3_grad_weight",
                                           "conv3x3_backward",
                                           "conv_transpose3x3_backward",
                                           "bias_grad",
                                           "max_pool2x2",
                                           "max_pool2x2_grad_input",
                                           "encoder_block",
                                           "encoder_block_backward",
                                           "decoder_block",
                                           "decoder_block_backward",
                                           "decoder_block_loss",
                                           "decoder_block_loss_backward",
                                           "sigmoid_cross_entropy",
                                           "sigmoid_cross_entropy_backward",
                                           "adam_"};

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

  // --- Blocks: a chain of the ops above, whose backward recomputes the
  // chain's interior from the block's input instead of keeping it.

  static void check_block_biases(const char* op, at::TensorList weights, at::TensorList biases) {
    TORCH_CHECK(biases.size() == weights.size(), "cae: ", op, " takes a bias per weight: ", weights.size(),
                " weights, ", biases.size(), " biases");
  }

  // The block's own checks, then the first convolution's as its op runs them;
  // the others' weights must be [C1, C1, 3, 3] (as a fused kernel takes
  // them), so a bad weight fails before anything runs.
  static void check_encoder_block(const Tensor& input, at::TensorList weights, at::TensorList biases) {
    TORCH_CHECK(weights.size() == 2 || weights.size() == 3,
                "cae: encoder_block takes 2 weights (pool) or 3 (strided), got ", weights.size());
    check_block_biases("encoder_block", weights, biases);
    check_input_and_weight(input, 1, weights[0], false);
    const int64_t channels = weights[0].size(0);
    check_bias(biases[0], input, channels);
    for (size_t i = 1; i < weights.size(); ++i) {
      check_weight(weights[i], input, "[C1, C1, 3, 3]");
      TORCH_CHECK(weights[i].size(0) == channels && weights[i].size(1) == channels,
                  "cae: encoder_block's weight ", i, " must have sizes [", channels, ", ", channels,
                  ", 3, 3], got ", weights[i].sizes());
      check_bias(biases[i], input, channels);
    }
  }

  // Whether a block has work for a fused kernel (else the composed path
  // handles the empty tensors).
  static bool fusable(const Tensor& input, at::TensorList weights) {
    return input.numel() > 0 &&
           std::all_of(weights.begin(), weights.end(), [](const Tensor& w) { return w.numel() > 0; });
  }

  using BlockGrads = std::tuple<Tensor, std::vector<Tensor>, std::vector<Tensor>>;

  // A fused backward's results, allocated: every weight's and bias's gradient,
  // and the input's where asked (else the empty tensor the op returns).
  static BlockGrads empty_block_grads(const Tensor& input, at::TensorList weights, at::TensorList biases,
                                      bool input_grad, at::MemoryFormat format) {
    std::vector<Tensor> grad_weights, grad_biases;
    for (size_t i = 0; i < weights.size(); ++i) {
      grad_weights.push_back(at::empty(weights[i].sizes(), weights[i].options()));
      grad_biases.push_back(at::empty(biases[i].sizes(), biases[i].options()));
    }
    return {input_grad ? at::empty(input.sizes(), input.options().memory_format(format))
                       : at::empty({0}, input.options()),
            grad_weights, grad_biases};
  }

  // a1 and a2 (with `interior`: the backward's recompute, which needs no
  // `out` from the composed path) and the block's output with, for the pool,
  // its windows' winner codes (an empty tensor for the strided block).
  struct EncoderActivations {
    Tensor a1, a2, out, winners;
  };

  // The pool's winner codes (backend.h EncoderBlockParams::winners) from a2
  // and the pooled output, composed: PyTorch's max-pool indices are its
  // winners (row-major, the first maximum, a NaN over everything), as ours.
  static Tensor pool_winner_codes(const Tensor& a2, const Tensor& out, bool relu, at::MemoryFormat format) {
    if (out.numel() == 0) return at::empty(out.sizes(), out.options().dtype(at::kByte).memory_format(format));
    const Tensor index = std::get<1>(at::max_pool2d_with_indices(a2, {2, 2}, {2, 2}, {0, 0}, {1, 1}, true));
    const Tensor row = at::div(index, a2.size(3), "floor");
    Tensor code = at::remainder(row, 2) * 2 + at::remainder(index - row * a2.size(3), 2);
    if (relu) code.masked_fill_(out.le(0).logical_or(out.isnan()), kPoolNoWinner);
    return code.to(at::kByte).contiguous(format);
  }

  static EncoderActivations encoder_block_activations(const Tensor& input, at::TensorList weights,
                                                      at::TensorList biases, bool relu, bool interior) {
    const bool strided = weights.size() == 3;
    if constexpr (requires(const EncoderBlockParams& p) { K::encoder_block(p); }) {
      if (fusable(input, weights)) {
        const bool nhwc = is_channels_last(input);
        const auto options = input.options().memory_format(memory_format(nhwc));
        const int64_t n = input.size(0), h = input.size(2), w = input.size(3);
        EncoderActivations acts;
        if (interior) {
          acts.a1 = at::empty({n, weights[0].size(0), h, w}, options);
          acts.a2 = at::empty({n, weights[1].size(0), h, w}, options);
        }
        acts.out = at::empty({n, weights.back().size(0), pool_output_size(h), pool_output_size(w)}, options);
        const bool winners = !interior && !strided;
        acts.winners = winners ? at::empty(acts.out.sizes(), options.dtype(at::kByte))
                               : at::empty({0}, input.options().dtype(at::kByte));
        const auto given = [&](const Tensor& t) { return interior ? OptTensor(t) : std::nullopt; };
        const auto format = memory_format(nhwc);
        if (K::encoder_block({.out = acts.out,
                              .winners = winners ? OptTensor(acts.winners) : std::nullopt,
                              .interior_a1 = given(acts.a1),
                              .interior_a2 = given(acts.a2),
                              .input = input.contiguous(format),
                              .weights = EncoderBlockWeights::of(weights, biases),
                              .relu = relu,
                              .nhwc = nhwc}))
          return acts;
      }
    }
    EncoderActivations acts;
    acts.a1 = conv3x3(input, weights[0], biases[0], 1, relu);
    acts.a2 = conv3x3(acts.a1, weights[1], biases[1], 1, relu);
    if (!interior) {
      acts.out = strided ? conv3x3(acts.a2, weights[2], biases[2], 2, relu) : max_pool2x2(acts.a2);
      acts.winners = strided
                         ? at::empty({0}, input.options().dtype(at::kByte))
                         : pool_winner_codes(acts.a2, acts.out, relu, memory_format(is_channels_last(input)));
    }
    return acts;
  }

  // act(conv(act(conv(input)))) then a max-pool (2 weights) or a stride-2
  // convolution with its activation (3 weights): the backend's fused kernel
  // where it has one (backend.h EncoderBlockParams) and it takes the shape,
  // else the per-op kernels. Returns the output and, for the pool, the
  // windows' winner codes (uint8, the output's sizes; empty for the strided
  // block), which spare the fused backward recomputing a2.
  static std::tuple<Tensor, Tensor> encoder_block(const Tensor& input, at::TensorList weights,
                                                  at::TensorList biases, bool relu) {
    check_encoder_block(input, weights, biases);
    auto acts = encoder_block_activations(input, weights, biases, relu, false);
    return {acts.out, acts.winners};
  }

  // The input gradient where needed, else an empty tensor (nothing computed),
  // and every weight's and bias's gradient. a1 and a2 are recomputed from the
  // input; `output` is the strided block's last ReLU mask (needed there with
  // `relu`, unused otherwise: the max-pool's backward reads a2); `winners`,
  // the pool's winner codes from the forward, where given spare the fused
  // kernel a2 (the composed path recomputes it anyway: its gates).
  static BlockGrads encoder_block_backward(const Tensor& grad_output, const Tensor& input,
                                           const OptTensor& output, const OptTensor& winners,
                                           at::TensorList weights, at::TensorList biases, bool relu,
                                           bool input_grad) {
    check_encoder_block(input, weights, biases);
    const bool strided = weights.size() == 3;
    check_activation(grad_output, "grad_output", input);
    check_same_shape(grad_output, "grad_output",
                     {input.size(0), weights.back().size(0), pool_output_size(input.size(2)),
                      pool_output_size(input.size(3))},
                     "the block's output");
    TORCH_CHECK(output.has_value() || !(strided && relu),
                "cae: encoder_block_backward needs the output of a strided block with relu (its ReLU mask)");
    check_relu_output(output, grad_output, "output");
    if (winners.has_value()) {
      TORCH_CHECK(!strided,
                  "cae: encoder_block_backward takes winners for a pool block only (2 weights), got ",
                  weights.size(), " weights");
      TORCH_CHECK(winners->scalar_type() == at::kByte,
                  "cae: winners must have dtype Byte (the forward's), got ", winners->scalar_type());
      TORCH_CHECK(winners->device() == input.device(), "cae: winners is on device ", winners->device(),
                  " but input is on device ", input.device());
      check_same_shape(*winners, "winners", grad_output.sizes(), "the shape of grad_output");
    }
    if constexpr (requires(const EncoderBlockBackwardParams& p) { K::encoder_block_backward(p); }) {
      if (fusable(input, weights)) {
        const bool nhwc = is_channels_last(input);
        const auto format = memory_format(nhwc);
        auto grads = empty_block_grads(input, weights, biases, input_grad, format);
        const auto& [grad_input, grad_weights, grad_biases] = grads;
        if (K::encoder_block_backward(
                {.grad_input = input_grad ? OptTensor(grad_input) : std::nullopt,
                 .grad_weights = grad_weights,
                 .grad_biases = grad_biases,
                 .grad_output = grad_output.contiguous(format),
                 .input = input.contiguous(format),
                 .output = strided && relu ? OptTensor(output->contiguous(format)) : std::nullopt,
                 .winners = winners ? OptTensor(winners->contiguous(format)) : std::nullopt,
                 .weights = EncoderBlockWeights::of(weights, biases),
                 .relu = relu,
                 .nhwc = nhwc}))
          return grads;
      }
    }
    const auto acts = encoder_block_activations(input, weights, biases, relu, true);
    const auto gate = [&](const Tensor& t) { return relu ? OptTensor(t) : std::nullopt; };
    std::vector<Tensor> grad_weights(weights.size()), grad_biases(weights.size());
    Tensor grad_a2, grad_a1, grad_input;
    if (strided) {
      std::tie(grad_a2, grad_weights[2], grad_biases[2]) =
          conv_backward(grad_output, relu ? output : OptTensor(), weights[2], acts.a2, 2, false);
    } else {
      grad_a2 = max_pool2x2_grad_input(grad_output, acts.a2);
    }
    std::tie(grad_a1, grad_weights[1], grad_biases[1]) =
        conv_backward(grad_a2, gate(acts.a2), weights[1], acts.a1, 1, false);
    if (input_grad) {
      std::tie(grad_input, grad_weights[0], grad_biases[0]) =
          conv_backward(grad_a1, gate(acts.a1), weights[0], input, 1, false);
    } else {
      std::tie(grad_weights[0], grad_biases[0]) = conv3x3_grad_weight(grad_a1, gate(acts.a1), input, 1);
      grad_input = at::empty({0}, input.options());
    }
    return {grad_input, grad_weights, grad_biases};
  }

  // A decoder block: every weight but the last a stride-2 transposed
  // convolution with its bias and activation, the last a linear stride-1 one;
  // its output center-cropped to output_size ([H, W]).
  // size_name: what gave output_size, for the message.
  static void check_decoder_block(const Tensor& input, at::TensorList weights, at::TensorList biases,
                                  at::IntArrayRef output_size, const char* size_name = "output_size") {
    TORCH_CHECK(!weights.empty(), "cae: decoder_block takes one or more weights, got 0");
    check_block_biases("decoder_block", weights, biases);
    const auto stride = [&](size_t i) -> int64_t { return i + 1 < weights.size() ? 2 : 1; };
    check_input_and_weight(input, stride(0), weights[0], true);
    check_bias(biases[0], input, weights[0].size(1));
    int64_t scale = stride(0);
    for (size_t i = 1; i < weights.size(); ++i) {
      check_weight(weights[i], input, "[C_in, C_out, 3, 3]");
      check_channels(weights[i - 1].size(1), weights[i].size(0), weights[i]);
      check_bias(biases[i], input, weights[i].size(1));
      scale *= stride(i);
    }
    const int64_t h = input.size(2) * scale, w = input.size(3) * scale;
    TORCH_CHECK(output_size.size() == 2 && output_size[0] >= 0 && output_size[1] >= 0 &&
                    output_size[0] <= h && output_size[1] <= w,
                "cae: decoder_block's ", size_name, " must be [H, W] within its output of [", h, ", ", w,
                "], got ", output_size);
  }

  static std::vector<Tensor> contiguous_all(at::TensorList tensors) {
    std::vector<Tensor> out;
    out.reserve(tensors.size());
    for (const Tensor& t : tensors) out.push_back(t.contiguous());
    return out;
  }

  // The transposed convolutions' outputs but the last's (the interior).
  static std::vector<Tensor> decoder_block_interior(const Tensor& input, at::TensorList weights,
                                                    at::TensorList biases, bool relu) {
    std::vector<Tensor> hidden;
    for (size_t i = 0; i + 1 < weights.size(); ++i)
      hidden.push_back(
          conv_transpose3x3(hidden.empty() ? input : hidden.back(), weights[i], biases[i], 2, relu));
    return hidden;
  }

  // The crop's corner: as ConvAutoencoder.decode rounds, top = (H - h) / 2.
  static std::pair<int64_t, int64_t> crop_corner(at::IntArrayRef full, at::IntArrayRef size) {
    return {(full[2] - size[0]) / 2, (full[3] - size[1]) / 2};
  }

  static Tensor decoder_block(const Tensor& input, at::TensorList weights, at::TensorList biases, bool relu,
                              c10::SymIntArrayRef output_size) {
    const auto size = C10_AS_INTARRAYREF_SLOW(output_size);
    check_decoder_block(input, weights, biases, size);
    return decoder_block_output(input, weights, biases, relu, size);
  }

  // The fused decoder kernels, where the backend has them and takes the block
  // (nullopt: the caller composes the per-op path): the output cropped to
  // `size`, and its loss where `loss` is given (its target in any layout);
  // the gradients, from grad_output and the loss's where given.
  static std::optional<Tensor> fused_decoder_block(const Tensor& input, at::TensorList weights,
                                                   at::TensorList biases, bool relu, at::IntArrayRef size,
                                                   std::optional<DecoderLossParams> loss) {
    if constexpr (requires(const DecoderBlockParams& p) { K::decoder_block(p); }) {
      if (!fusable(input, weights) || size[0] == 0 || size[1] == 0) return std::nullopt;
      const bool nhwc = is_channels_last(input);
      const auto format = memory_format(nhwc);
      auto out = at::empty({input.size(0), weights.back().size(1), size[0], size[1]},
                           input.options().memory_format(format));
      if (loss) loss->target = loss->target.contiguous(format);
      if (K::decoder_block({.out = out,
                            .input = input.contiguous(format),
                            .weights = contiguous_all(weights),
                            .biases = contiguous_all(biases),
                            .relu = relu,
                            .nhwc = nhwc,
                            .loss = std::move(loss)}))
        return out;
    }
    return std::nullopt;
  }

  static std::optional<BlockGrads> fused_decoder_block_backward(const OptTensor& grad_output,
                                                                const Tensor& input, at::TensorList weights,
                                                                at::TensorList biases, bool relu,
                                                                at::IntArrayRef size, bool input_grad,
                                                                std::optional<DecoderLossGradParams> loss) {
    if constexpr (requires(const DecoderBlockBackwardParams& p) { K::decoder_block_backward(p); }) {
      if (!fusable(input, weights) || size[0] == 0 || size[1] == 0) return std::nullopt;
      const bool nhwc = is_channels_last(input);
      const auto format = memory_format(nhwc);
      auto grads = empty_block_grads(input, weights, biases, input_grad, format);
      const auto& [grad_input, grad_weights, grad_biases] = grads;
      if (loss) {
        loss->logits = loss->logits.contiguous(format);
        loss->target = loss->target.contiguous(format);
      }
      if (K::decoder_block_backward(
              {.grad_input = input_grad ? OptTensor(grad_input) : std::nullopt,
               .grad_weights = grad_weights,
               .grad_biases = grad_biases,
               .grad_output = grad_output ? OptTensor(grad_output->contiguous(format)) : std::nullopt,
               .input = input.contiguous(format),
               .weights = contiguous_all(weights),
               .biases = contiguous_all(biases),
               .relu = relu,
               .nhwc = nhwc,
               .loss = std::move(loss)}))
        return grads;
    }
    return std::nullopt;
  }

  // decoder_block after its checks.
  static Tensor decoder_block_output(const Tensor& input, at::TensorList weights, at::TensorList biases,
                                     bool relu, at::IntArrayRef size) {
    if (auto out = fused_decoder_block(input, weights, biases, relu, size, std::nullopt)) return *out;
    const auto hidden = decoder_block_interior(input, weights, biases, relu);
    Tensor full =
        conv_transpose3x3(hidden.empty() ? input : hidden.back(), weights.back(), biases.back(), 1, false);
    if (full.size(2) == size[0] && full.size(3) == size[1]) return full;
    const auto [top, left] = crop_corner(full.sizes(), size);
    auto out = at::empty({full.size(0), full.size(1), size[0], size[1]},
                         full.options().memory_format(memory_format(is_channels_last(input))));
    return out.copy_(full.narrow(2, top, size[0]).narrow(3, left, size[1]));
  }

  // As encoder_block_backward; the interior is recomputed from the input (the
  // last transposed convolution is linear: its output is never needed).
  static BlockGrads decoder_block_backward(const Tensor& grad_output, const Tensor& input,
                                           at::TensorList weights, at::TensorList biases, bool relu,
                                           c10::SymIntArrayRef output_size, bool input_grad) {
    const auto size = C10_AS_INTARRAYREF_SLOW(output_size);
    check_decoder_block(input, weights, biases, size);
    check_activation(grad_output, "grad_output", input);
    check_same_shape(grad_output, "grad_output", {input.size(0), weights.back().size(1), size[0], size[1]},
                     "the block's output");
    if (auto grads = fused_decoder_block_backward(grad_output, input, weights, biases, relu, size, input_grad,
                                                  std::nullopt))
      return *grads;
    const auto hidden = decoder_block_interior(input, weights, biases, relu);
    const Tensor& last_input = hidden.empty() ? input : hidden.back();
    const std::array<int64_t, 4> full{input.size(0), weights.back().size(1), last_input.size(2),
                                      last_input.size(3)};
    Tensor grad = grad_output;
    if (full[2] != size[0] || full[3] != size[1]) {  // the crop's backward: zeros around grad_output
      const auto [top, left] = crop_corner(full, size);
      grad = at::zeros(full, grad_output.options().memory_format(memory_format(is_channels_last(input))));
      grad.narrow(2, top, size[0]).narrow(3, left, size[1]).copy_(grad_output);
    }
    std::vector<Tensor> grad_weights(weights.size()), grad_biases(weights.size());
    for (size_t i = weights.size(); i-- > 0;) {
      const Tensor& x = i == 0 ? input : hidden[i - 1];
      const int64_t stride = i + 1 < weights.size() ? 2 : 1;
      const OptTensor gate = relu && i + 1 < weights.size() ? OptTensor(hidden[i]) : std::nullopt;
      if (i > 0 || input_grad) {
        std::tie(grad, grad_weights[i], grad_biases[i]) =
            conv_backward(grad, gate, weights[i], x, stride, true);
      } else {
        std::tie(grad_weights[0], grad_biases[0]) = conv_transpose3x3_grad_weight(grad, gate, input, stride);
        grad = at::empty({0}, input.options());
      }
    }
    return {grad, grad_weights, grad_biases};
  }

  // --- The decoder block and the loss of its output (decoder_block, then
  // sigmoid_cross_entropy) in one op, the crop given by the target's size:
  // the backend computes the loss in the block's kernel where it fuses it
  // (backend.h DecoderLossParams), and its backward stages the loss's
  // gradient itself. The loss, the RMSE, the target and grad_loss are in the
  // block's accumulation dtype (float32 for float16 and bfloat16: autocast's
  // loss dtype), and the composed path computes the loss there too.

  static at::ScalarType loss_dtype(const Tensor& input) { return at::toOpMathType(input.scalar_type()); }

  static void check_decoder_block_loss(const Tensor& input, at::TensorList weights, at::TensorList biases,
                                       const Tensor& target) {
    TORCH_CHECK(target.dim() == 4, "cae: decoder_block_loss's target must be a 4-D (N, C, H, W) tensor, got ",
                target.dim(), "-D with sizes ", target.sizes());
    check_decoder_block(input, weights, biases, target.sizes().slice(2), "target's size");
    TORCH_CHECK(target.scalar_type() == loss_dtype(input),
                "cae: decoder_block_loss's target must have dtype ", loss_dtype(input),
                " (the loss's dtype for input of dtype ", input.scalar_type(), "), got ",
                target.scalar_type());
    TORCH_CHECK(target.device() == input.device(), "cae: target is on device ", target.device(),
                " but input is on device ", input.device());
    check_same_shape(target, "target",
                     {input.size(0), weights.back().size(1), target.size(2), target.size(3)},
                     "the block's output: the input's batch, the last weight's channels");
  }

  static std::tuple<Tensor, Tensor, Tensor> decoder_block_loss(const Tensor& input, at::TensorList weights,
                                                               at::TensorList biases, bool relu,
                                                               const Tensor& target) {
    check_decoder_block_loss(input, weights, biases, target);
    Tensor loss = at::empty({}, target.options()), rmse = at::empty({}, target.options());
    if (auto out = fused_decoder_block(input, weights, biases, relu, target.sizes().slice(2),
                                       DecoderLossParams{.target = target, .loss = loss, .rmse = rmse}))
      return {*out, loss, rmse};
    Tensor logits = decoder_block_output(input, weights, biases, relu, target.sizes().slice(2));
    std::tie(loss, rmse) = sigmoid_cross_entropy(logits.to(target.scalar_type()), target);
    return {logits, loss, rmse};
  }

  // The block's gradients from the loss's (grad_loss) and, where given, the
  // logits' own (grad_output); logits: the forward's output.
  static BlockGrads decoder_block_loss_backward(const Tensor& grad_loss, const OptTensor& grad_output,
                                                const Tensor& logits, const Tensor& target,
                                                const Tensor& input, at::TensorList weights,
                                                at::TensorList biases, bool relu, bool input_grad) {
    check_decoder_block_loss(input, weights, biases, target);
    check_activation(logits, "logits", input);
    check_same_shape(logits, "logits", target.sizes(), "the target's");
    if (grad_output) {
      check_activation(*grad_output, "grad_output", input);
      check_same_shape(*grad_output, "grad_output", target.sizes(), "the target's");
    }
    TORCH_CHECK(grad_loss.dim() == 0, "cae: decoder_block_loss_backward's grad_loss must be 0-D, got sizes ",
                grad_loss.sizes());
    check_like(grad_loss, "grad_loss", target);
    if (auto grads = fused_decoder_block_backward(
            grad_output, input, weights, biases, relu, target.sizes().slice(2), input_grad,
            DecoderLossGradParams{.logits = logits, .target = target, .grad_loss = grad_loss}))
      return *grads;
    Tensor grad = sigmoid_cross_entropy_backward(grad_loss, logits.to(target.scalar_type()), target);
    if (grad_output) grad = grad + *grad_output;
    return decoder_block_backward(grad.to(input.scalar_type()), input, weights, biases, relu,
                                  c10::fromIntArrayRefSlow(target.sizes().slice(2)), input_grad);
  }

  // --- The loss: binary cross-entropy on logits (mean over every element) and
  // the RMSE of sigmoid(logits) against the target, in one pass where the
  // backend fuses them (backend.h SigmoidCrossEntropyParams), else ATen's ops.

  static void check_loss(const Tensor& logits, const Tensor& target) {
    check_dtype(logits);
    check_like(target, "target", logits);
    TORCH_CHECK(target.sizes() == logits.sizes(),
                "cae: sigmoid_cross_entropy's target must have the logits' sizes ", logits.sizes(), ", got ",
                target.sizes());
  }

  // Logits and target in one layout: channels_last where the logits are.
  static std::pair<Tensor, Tensor> loss_operands(const Tensor& logits, const Tensor& target) {
    const auto format =
        logits.dim() == 4 ? memory_format(is_channels_last(logits)) : at::MemoryFormat::Contiguous;
    return {logits.contiguous(format), target.contiguous(format)};
  }

  static std::tuple<Tensor, Tensor> sigmoid_cross_entropy(const Tensor& logits, const Tensor& target) {
    check_loss(logits, target);
    const auto [x, t] = loss_operands(logits, target);
    if constexpr (requires(const SigmoidCrossEntropyParams& p) { K::sigmoid_cross_entropy(p); }) {
      if (x.numel() > 0) {
        Tensor loss = at::empty({}, x.options()), rmse = at::empty({}, x.options());
        if (K::sigmoid_cross_entropy({.loss = loss, .rmse = rmse, .logits = x, .target = t}))
          return {loss, rmse};
      }
    }
    return {at::binary_cross_entropy_with_logits(x, t), (at::sigmoid(x) - t).square().mean().sqrt()};
  }

  // The logits' gradient; grad_loss is the loss's (0-d).
  static Tensor sigmoid_cross_entropy_backward(const Tensor& grad_loss, const Tensor& logits,
                                               const Tensor& target) {
    check_loss(logits, target);
    TORCH_CHECK(grad_loss.dim() == 0,
                "cae: sigmoid_cross_entropy_backward's grad_loss must be 0-D, got sizes ", grad_loss.sizes());
    check_like(grad_loss, "grad_loss", logits);
    const auto [x, t] = loss_operands(logits, target);
    if constexpr (requires(const SigmoidCrossEntropyGradParams& p) { K::sigmoid_cross_entropy_grad(p); }) {
      if (x.numel() > 0) {
        Tensor grad = at::empty_like(x);
        if (K::sigmoid_cross_entropy_grad(
                {.grad_logits = grad, .grad_loss = grad_loss, .logits = x, .target = t}))
          return grad;
      }
    }
    return (at::sigmoid(x) - t) * (grad_loss / static_cast<double>(std::max<int64_t>(x.numel(), 1)));
  }

  // --- Adam's step (backend.h AdamParams): one launch where the backend fuses
  // it, else ATen's fused Adam after the step counts' increment, and the norm
  // as torch.nn.utils.get_total_norm computes it.

  static void check_adam(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                         const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                         const std::vector<Tensor>& steps, const Tensor& lr, double beta1, double beta2,
                         double eps, double weight_decay) {
    TORCH_CHECK(grads.size() == params.size() && exp_avgs.size() == params.size() &&
                    exp_avg_sqs.size() == params.size() && steps.size() == params.size(),
                "cae: adam_ takes one tensor per parameter in every list; got ", params.size(), " params, ",
                grads.size(), " grads, ", exp_avgs.size(), " exp_avgs, ", exp_avg_sqs.size(),
                " exp_avg_sqs and ", steps.size(), " steps");
    TORCH_CHECK(lr.dim() == 0 && lr.scalar_type() == at::kFloat,
                "cae: adam_'s lr must be a 0-D float32 tensor, got dtype ", lr.scalar_type(), " and sizes ",
                lr.sizes());
    TORCH_CHECK(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1,
                "cae: adam_'s betas must be in [0, 1), got (", beta1, ", ", beta2, ")");
    TORCH_CHECK(eps >= 0 && weight_decay >= 0, "cae: adam_'s eps and weight_decay must be non-negative, got ",
                eps, " and ", weight_decay);
    for (size_t i = 0; i < params.size(); ++i) {
      const Tensor& p = params[i];
      TORCH_CHECK(p.scalar_type() == at::kFloat, "cae: adam_ takes float32 parameters; params[", i,
                  "] has dtype ", p.scalar_type());
      TORCH_CHECK(p.device() == lr.device(), "cae: adam_'s params[", i, "] is on device ", p.device(),
                  " but lr is on device ", lr.device());
      TORCH_CHECK(p.is_non_overlapping_and_dense(), "cae: adam_'s params[", i,
                  "] must be dense (non-overlapping, no gaps), got sizes ", p.sizes(), " and strides ",
                  p.strides());
      const std::pair<const char*, const Tensor*> like_p[] = {
          {"grads", &grads[i]}, {"exp_avgs", &exp_avgs[i]}, {"exp_avg_sqs", &exp_avg_sqs[i]}};
      for (const auto& [name, t] : like_p) {
        TORCH_CHECK(t->scalar_type() == at::kFloat && t->device() == p.device() && t->sizes() == p.sizes() &&
                        t->strides() == p.strides(),
                    "cae: adam_'s ", name, "[", i, "] must be like params[", i, "] (float32 on ", p.device(),
                    ", sizes ", p.sizes(), ", strides ", p.strides(), "), got ", t->scalar_type(), " on ",
                    t->device(), ", sizes ", t->sizes(), ", strides ", t->strides());
      }
      TORCH_CHECK(
          steps[i].dim() == 0 && steps[i].scalar_type() == at::kFloat && steps[i].device() == p.device(),
          "cae: adam_'s steps[", i, "] must be a 0-D float32 tensor on ", p.device(), ", got dtype ",
          steps[i].scalar_type(), ", sizes ", steps[i].sizes(), " on ", steps[i].device());
    }
  }

  static Tensor adam_(std::vector<Tensor> params, std::vector<Tensor> grads, std::vector<Tensor> exp_avgs,
                      std::vector<Tensor> exp_avg_sqs, std::vector<Tensor> steps, const Tensor& lr,
                      double beta1, double beta2, double eps, double weight_decay) {
    check_adam(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay);
    if (params.empty()) return at::zeros({}, lr.options());
    if constexpr (requires(const AdamParams& p) { K::adam(p); }) {
      Tensor grad_norm = at::empty({}, lr.options());  // the kernel writes it: no fill launched
      if (K::adam({.params = params,
                   .grads = grads,
                   .exp_avgs = exp_avgs,
                   .exp_avg_sqs = exp_avg_sqs,
                   .steps = steps,
                   .lr = lr,
                   .beta1 = beta1,
                   .beta2 = beta2,
                   .eps = eps,
                   .weight_decay = weight_decay,
                   .grad_norm = grad_norm}))
        return grad_norm;
    }
    Tensor grad_norm = at::linalg_vector_norm(at::stack(at::_foreach_norm(grads)));
    at::_foreach_add_(steps, 1);
    at::_fused_adam_(params, grads, exp_avgs, exp_avg_sqs, {}, steps, lr, beta1, beta2, weight_decay, eps,
                     /*amsgrad=*/false, /*maximize=*/false);
    return grad_norm;
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
    m.impl("encoder_block_backward", &encoder_block_backward);
    m.impl("decoder_block", &decoder_block);
    m.impl("decoder_block_backward", &decoder_block_backward);
    m.impl("decoder_block_loss", &decoder_block_loss);
    m.impl("decoder_block_loss_backward", &decoder_block_loss_backward);
    m.impl("sigmoid_cross_entropy", &sigmoid_cross_entropy);
    m.impl("sigmoid_cross_entropy_backward", &sigmoid_cross_entropy_backward);
    m.impl("adam_", &adam_);
  }
};

}  // namespace cae
