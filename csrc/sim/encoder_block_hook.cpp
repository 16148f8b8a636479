// A test hook of the emulated build only (cae_kernels.sim compiles it; nvcc
// never sees it): the fused encoder block's kernel with its interior outputs,
// which the forward op does not ask for (the backward's recompute will).
//
//   torch.ops.cae_sim._sim_encoder_block_interiors(input, weights, biases, relu)
//       -> (out, a1, a2), or an error where the kernel declines the shape
#include <torch/library.h>

#include <tuple>

#include "../cuda/kernels.h"
#include "../shapes.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> encoder_block_interiors(const at::Tensor& input,
                                                                       at::TensorList weights,
                                                                       at::TensorList biases, bool relu) {
  TORCH_CHECK((weights.size() == 2 || weights.size() == 3) && biases.size() == weights.size(),
              "cae: encoder_block takes 2 or 3 weights and a bias each, got ", weights.size(), " and ",
              biases.size());
  const bool nhwc = cae::is_channels_last(input);
  const auto options = input.options().memory_format(cae::memory_format(nhwc));
  const int64_t n = input.size(0), c = weights[0].size(0), h = input.size(2), w = input.size(3);
  auto out = at::empty({n, c, cae::pool_output_size(h), cae::pool_output_size(w)}, options);
  auto a1 = at::empty({n, c, h, w}, options), a2 = at::empty({n, c, h, w}, options);
  const bool launched =
      cae::CudaKernels::encoder_block({.out = out,
                                       .interior_a1 = a1,
                                       .interior_a2 = a2,
                                       .input = input.contiguous(cae::memory_format(nhwc)),
                                       .weights = cae::EncoderBlockWeights::of(weights, biases),
                                       .relu = relu,
                                       .nhwc = nhwc});
  TORCH_CHECK(launched, "cae: the fused encoder block declined input of sizes ", input.sizes(), " with ", c,
              " channels");
  return {out, a1, a2};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(CAE_NAMESPACE, m) {
  m.def(
      "_sim_encoder_block_interiors(Tensor input, Tensor[] weights, Tensor[] biases, bool relu) -> "
      "(Tensor, Tensor, Tensor)",
      &encoder_block_interiors);
}
