// Host side of the fused decoder block (decoder_block_kernels.cuh).
#include "kernels.h"

#include "decoder_block_kernels.cuh"

namespace cae {

namespace {

// The kernels' view of a block: pointers, channels and the crop (its corner
// as ops.h crop_corner rounds it).
template <typename T>
cuda::DecoderBlockArgs<T> decoder_args(T* out, const Tensor& input, const std::vector<Tensor>& weights,
                                       const std::vector<Tensor>& biases, int64_t H_out, int64_t W_out,
                                       bool relu) {
  cuda::DecoderBlockArgs<T> a{};
  const int L = static_cast<int>(weights.size());
  a.out = out;
  a.x = input.const_data_ptr<T>();
  a.layers = L;
  a.C[0] = cuda::to_int(input.size(1), "channels");
  for (int i = 0; i < L && i < cuda::kDecoderMaxLayers; ++i) {
    a.w[i] = weights[i].const_data_ptr<T>();
    a.b[i] = biases[i].const_data_ptr<T>();
    a.C[i + 1] = cuda::to_int(weights[i].size(1), "channels");
  }
  a.N = cuda::to_int(input.size(0), "batch");
  a.H = cuda::to_int(input.size(2), "height");
  a.W = cuda::to_int(input.size(3), "width");
  a.H_out = cuda::to_int(H_out, "height");
  a.W_out = cuda::to_int(W_out, "width");
  const int64_t scale = int64_t{1} << (L - 1);
  a.top = static_cast<int>((input.size(2) * scale - H_out) / 2);
  a.left = static_cast<int>((input.size(3) * scale - W_out) / 2);
  a.relu = relu;
  return a;
}

}  // namespace

// False (nothing launched) for more than kDecoderMaxLayers layers, or where
// one image's planes (the input and every hidden layer's output, with a
// one-pixel border) and the largest layer's weights do not fit the
// shared-memory budget: the autoencoder's decoder (8 x 4 x 4 -> 16 x 16 x 16
// -> 1 x 32 x 32) fits in float32, float16 and bfloat16, not in float64.
bool CudaKernels::decoder_block(const DecoderBlockParams& p) {
  if (p.weights.size() > static_cast<size_t>(cuda::kDecoderMaxLayers)) return false;
  CAE_DEVICE_GUARD(p.input);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  bool launched = false;
  CAE_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "cae_decoder_block_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto a = decoder_args<scalar_t>(p.out.mutable_data_ptr<scalar_t>(), p.input, p.weights, p.biases,
                                          p.out.size(2), p.out.size(3), p.relu);
    const auto plan = cuda::plan_decoder_block<scalar_t, acc_t>(a, p.nhwc);
    if (!plan.ok) return;
    cuda::check_grid(plan.blocks, "decoder_block");
    cuda::check_smem(plan.smem, "decoder_block");
    cuda::launch_decoder_block<scalar_t, acc_t>(a, plan, p.nhwc, stream);
    CAE_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

}  // namespace cae
