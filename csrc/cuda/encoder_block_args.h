// The fused encoder block kernels' arguments from an op's tensors (host side
// of encoder_block.cu and encoder_block_backward.cu).
#pragma once

#include "kernels.h"

#include "encoder_block_kernels.cuh"

namespace cae {
namespace cuda {

// The block's input, parameters and sizes; no outputs (out, winners, a1, a2
// null).
template <typename T>
inline EncoderBlockArgs<T> encoder_block_args(const Tensor& input, const EncoderBlockWeights& w,
                                              int64_t H_out, int64_t W_out, bool relu) {
  return {.out = nullptr,
          .winners = nullptr,
          .a1 = nullptr,
          .a2 = nullptr,
          .x = input.const_data_ptr<T>(),
          .w1 = w.w1.const_data_ptr<T>(),
          .b1 = w.b1.const_data_ptr<T>(),
          .w2 = w.w2.const_data_ptr<T>(),
          .b2 = w.b2.const_data_ptr<T>(),
          .w_down = data_or_null<T>(w.w_down),
          .b_down = data_or_null<T>(w.b_down),
          .N = to_int(input.size(0), "batch"),
          .C0 = to_int(input.size(1), "channels"),
          .C1 = to_int(w.w1.size(0), "channels"),
          .H = to_int(input.size(2), "height"),
          .W = to_int(input.size(3), "width"),
          .H_out = to_int(H_out, "height"),
          .W_out = to_int(W_out, "width"),
          .relu = relu,
          .tensor_cores = std::is_same_v<at::opmath_type<T>, float> && tensor_cores_allowed(input)};
}

}  // namespace cuda
}  // namespace cae
