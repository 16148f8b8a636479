// Host side of the fused encoder block's backward
// (encoder_block_backward_kernels.cuh).
#include "encoder_block_args.h"

#include "encoder_block_backward_kernels.cuh"

namespace cae {

// False (nothing launched) where one image's planes (x, a1, a2 padded, and
// the strided block's output gradient) and the weights do not fit the
// device's opt-in shared memory: 28 x 28 with 16 channels fits float32 on
// sm_90 (150 KiB pool, 173 KiB strided, with a 512-thread block's scratch),
// not float64, nor anything of that size on sm_75 (64 KiB). ops.h then runs
// the composed backward.
bool CudaKernels::encoder_block_backward(const EncoderBlockBackwardParams& p) {
  CAE_DEVICE_GUARD(p.input);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  bool launched = false;
  CAE_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "cae_encoder_block_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto grad = [&](const std::vector<Tensor>& v, size_t i) {
      return i < v.size() ? v[i].mutable_data_ptr<scalar_t>() : static_cast<scalar_t*>(nullptr);
    };
    const cuda::EncoderBlockBackwardArgs<scalar_t> a{
        cuda::encoder_block_args<scalar_t>(p.input, p.weights, p.grad_output.size(2), p.grad_output.size(3),
                                           p.relu),
        cuda::mutable_or_null<scalar_t>(p.grad_input),
        grad(p.grad_weights, 0),
        grad(p.grad_biases, 0),
        grad(p.grad_weights, 1),
        grad(p.grad_biases, 1),
        grad(p.grad_weights, 2),
        grad(p.grad_biases, 2),
        p.grad_output.const_data_ptr<scalar_t>(),
        cuda::data_or_null<scalar_t>(p.output),
        p.winners ? p.winners->const_data_ptr<unsigned char>() : nullptr};
    const auto plan =
        cuda::plan_encoder_block_backward<scalar_t, acc_t>(a, p.nhwc, cuda::smem_dynamic_budget());
    if (!plan.ok) return;
    cuda::check_grid(plan.blocks, "encoder_block_backward");
    const int blocks = static_cast<int>(plan.blocks);
    const auto workspace =
        cuda::grid_sums_workspace<acc_t>(p.input, plan.t.sums, blocks, stream, "encoder_block_backward");
    cuda::with_bool(p.nhwc, [&](auto layout) {
      const auto kernel = cuda::encoder_block_backward_kernel<scalar_t, acc_t, decltype(layout)::value>;
      cuda::allow_smem(kernel, plan.smem);
      CAE_LAUNCH(kernel, static_cast<unsigned>(plan.blocks), plan.t.threads, plan.smem, stream, a, plan.t,
                 workspace.sums);
    });
    CAE_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

}  // namespace cae
