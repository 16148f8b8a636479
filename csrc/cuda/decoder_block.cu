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
  a.tensor_cores = std::is_same_v<at::opmath_type<T>, float> && cuda::tensor_cores_allowed(input);
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
    const auto plan = cuda::plan_decoder_block<scalar_t, acc_t>(a, p.nhwc, false, cuda::kSmemBudget);
    if (!plan.ok) return;
    cuda::check_grid(plan.blocks, "decoder_block");
    cuda::check_smem(plan.smem, "decoder_block");
    cuda::DecoderLoss<acc_t> loss{};
    cuda::GridSumsWorkspace<acc_t> workspace;  // the loss's sums; kept until the launch
    if (p.loss) {
      workspace = cuda::grid_sums_workspace<acc_t>(p.input, cuda::kLossSums, static_cast<int>(plan.blocks),
                                                   stream, "decoder_block_loss");
      loss = {p.loss->target.const_data_ptr<acc_t>(), p.loss->loss.mutable_data_ptr<acc_t>(),
              p.loss->rmse.mutable_data_ptr<acc_t>(), workspace.sums};
    }
    cuda::launch_decoder_block<scalar_t, acc_t>(a, plan, loss, p.nhwc, stream);
    CAE_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

// Whole planes (no strips) and all of them at once: false where one image's
// do not fit the device's opt-in shared memory (the autoencoder's decoder
// takes 98 KB in float32, 196 KB in float64: sm_90's 227 KiB holds both,
// sm_75's 64 KiB neither).
bool CudaKernels::decoder_block_backward(const DecoderBlockBackwardParams& p) {
  if (p.weights.size() > static_cast<size_t>(cuda::kDecoderMaxLayers)) return false;
  CAE_DEVICE_GUARD(p.input);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  bool launched = false;
  CAE_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "cae_decoder_block_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::DecoderBlockBackwardArgs<scalar_t, acc_t> b{};
    const Tensor& output = p.loss ? p.loss->logits : *p.grad_output;  // its shape
    b.f =
        decoder_args<scalar_t>(nullptr, p.input, p.weights, p.biases, output.size(2), output.size(3), p.relu);
    const size_t budget = cuda::smem_dynamic_budget();
    auto plan = cuda::plan_decoder_block<scalar_t, acc_t>(b.f, p.nhwc, true, budget);
    if (p.loss && !p.grad_output) cuda::plan_loss_target<scalar_t, acc_t>(plan, b.f, budget);
    if (!plan.ok) return;
    cuda::check_grid(plan.blocks, "decoder_block_backward");
    const int blocks = static_cast<int>(plan.blocks), L = b.f.layers;
    int size = 0;
    for (int i = 0; i < L; ++i) {
      size += cuda::decoder_grad_elements(b.f.C[i], b.f.C[i + 1]);
      b.dw[i] = p.grad_weights[i].mutable_data_ptr<scalar_t>();
      b.db[i] = p.grad_biases[i].mutable_data_ptr<scalar_t>();
    }
    const auto workspace =
        cuda::grid_sums_workspace<acc_t>(p.input, size, blocks, stream, "decoder_block_backward");
    b.sums = workspace.sums;
    b.grad_output = p.grad_output ? p.grad_output->const_data_ptr<scalar_t>() : nullptr;
    if (p.loss) {
      b.loss = {p.loss->logits.const_data_ptr<scalar_t>(), p.loss->target.const_data_ptr<acc_t>(),
                p.loss->grad_loss.const_data_ptr<acc_t>()};
    }
    b.grad_input = cuda::mutable_or_null<scalar_t>(p.grad_input);
    constexpr int V = cuda::vec_width<scalar_t>(), VO = cuda::vec_width<scalar_t, cuda::kBlockGroup>();
    const int C_out = b.f.C[L], C_in = b.f.C[0];
    b.vec_grad_output = p.nhwc && b.grad_output != nullptr && cuda::vector_ok<V>(b.grad_output, C_out, C_out);
    b.vec_grad_input = p.nhwc && b.grad_input != nullptr && C_in % VO == 0 &&
                       reinterpret_cast<uintptr_t>(b.grad_input) % (sizeof(scalar_t) * VO) == 0;
    cuda::launch_decoder_block_backward(
        b, plan, p.nhwc, [&](auto kernel) { cuda::allow_smem(kernel, plan.smem); }, stream);
    CAE_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

}  // namespace cae
