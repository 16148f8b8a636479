// Output sizes and argument checks shared by every backend, so the CPU, CUDA
// and emulated kernels cannot disagree on what an op accepts or returns.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/irange.h>

#include <optional>

namespace cae {

// 3x3 convolution, padding 1: output is ceil(size / stride).
inline int64_t conv_output_size(int64_t input_size, int64_t stride) {
  return (input_size + stride - 1) / stride;
}

// 2x2 max-pool with ceil_mode: odd sizes round up (7 -> 4).
inline int64_t pool_output_size(int64_t input_size) { return (input_size + 1) / 2; }

// The layout a kernel indexes in: the input's own, as PyTorch's convolution
// chooses it (ambiguous strides, e.g. one channel, read as the strides say).
inline bool is_channels_last(const at::Tensor& t) {
  return t.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
}

inline at::MemoryFormat memory_format(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

inline void check_stride(int64_t stride) {
  TORCH_CHECK(stride == 1 || stride == 2, "cae: stride must be 1 or 2, got ", stride);
}

// dtype and device must match the op's input.
inline void check_like(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), "cae: ", name, " has dtype ", t.scalar_type(),
              " but input has dtype ", input.scalar_type());
  TORCH_CHECK(t.device() == input.device(), "cae: ", name, " is on device ", t.device(),
              " but input is on device ", input.device());
}

// An activation (N, C, H, W) tensor of the op.
inline void check_activation(const at::Tensor& t, const char* name, const at::Tensor& input) {
  TORCH_CHECK(t.dim() == 4, "cae: ", name, " must be a 4-D (N, C, H, W) tensor, got ", t.dim(),
              "-D with sizes ", t.sizes());
  check_like(t, name, input);
}

inline void check_same_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected,
                             const char* what) {
  TORCH_CHECK(t.sizes() == expected, "cae: ", name, " must have sizes ", expected, " (", what, "), got ",
              t.sizes());
}

// A 3x3 weight [rows, cols, 3, 3], where rows are the channels of the
// small (strided) side and cols those of the large side: [C_out, C_in] for
// the convolution, [C_in, C_out] for the transposed convolution.
inline void check_weight(const at::Tensor& weight, const at::Tensor& input, const char* layout) {
  TORCH_CHECK(weight.dim() == 4 && weight.size(2) == 3 && weight.size(3) == 3, "cae: weight must be ", layout,
              ", got sizes ", weight.sizes());
  check_like(weight, "weight", input);
}

inline void check_bias(const std::optional<at::Tensor>& bias, const at::Tensor& input, int64_t channels) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == channels, "cae: bias must have sizes [", channels,
              "], got ", bias->sizes());
  check_like(*bias, "bias", input);
}

// The forward's output when ReLU was fused: the gradient passes where it is
// positive, so it must match grad_output exactly.
inline void check_relu_output(const std::optional<at::Tensor>& relu_output, const at::Tensor& grad_output,
                              const char* name = "relu_output") {
  if (!relu_output.has_value()) return;
  check_activation(*relu_output, name, grad_output);
  check_same_shape(*relu_output, name, grad_output.sizes(), "the shape of grad_output");
}

// `channels`: the input's, or inside a block the previous convolution's output's.
inline void check_channels(int64_t channels, int64_t expected, const at::Tensor& weight) {
  TORCH_CHECK(channels == expected, "cae: input has ", channels, " channels but weight of sizes ",
              weight.sizes(), " expects ", expected);
}

inline void check_input_channels(const at::Tensor& input, int64_t expected, const at::Tensor& weight) {
  check_channels(input.size(1), expected, weight);
}

inline std::optional<at::Tensor> contiguous_in(const std::optional<at::Tensor>& t, at::MemoryFormat format) {
  if (!t.has_value()) return t;
  return t->contiguous(format);
}

}  // namespace cae
