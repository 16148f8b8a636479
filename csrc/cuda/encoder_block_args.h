// The fused encoder block kernels' arguments from an op's tensors (host side
// of encoder_block.cu and encoder_block_backward.cu).
#pragma once

#include "kernels.h"

#include "encoder_block_kernels.cuh"

namespace cae {
namespace cuda {

// The block's input, parameters and sizes; no outputs (out, a1, a2 null).
template <typename T>
inline EncoderBlockArgs<T> encoder_block_args(const Tensor& input, const EncoderBlockWeights& w,
                                              int64_t H_out, int64_t W_out, bool relu) {
  return {nullptr,
          nullptr,
          nullptr,
          input.const_data_ptr<T>(),
          w.w1.const_data_ptr<T>(),
          w.b1.const_data_ptr<T>(),
          w.w2.const_data_ptr<T>(),
          w.b2.const_data_ptr<T>(),
          data_or_null<T>(w.w_down),
          data_or_null<T>(w.b_down),
          to_int(input.size(0), "batch"),
          to_int(input.size(1), "channels"),
          to_int(w.w1.size(0), "channels"),
          to_int(input.size(2), "height"),
          to_int(input.size(3), "width"),
          to_int(H_out, "height"),
          to_int(W_out, "width"),
          relu,
          std::is_same_v<at::opmath_type<T>, float> && tensor_cores_allowed(input)};
}

}  // namespace cuda
}  // namespace cae
