// Host side of the fused encoder block's forward (encoder_block_kernels.cuh).
#include "kernels.h"

#include "encoder_block_kernels.cuh"

namespace cae {

// False (nothing launched) where not even a one-pixel tile fits the
// shared-memory budget: w2 and w_down stay whole in shared memory, so C1 up to
// 32 channels in float32 (23 strided), 22 in float64 (16 strided); any C0 (in
// chunks). ops.h then composes the block from the per-op kernels.
bool CudaKernels::encoder_block(const EncoderBlockParams& p) {
  CAE_DEVICE_GUARD(p.input);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  bool launched = false;
  CAE_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "cae_encoder_block_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::EncoderBlockArgs<scalar_t> a{p.out.mutable_data_ptr<scalar_t>(),
                                             cuda::mutable_or_null<scalar_t>(p.interior_a1),
                                             cuda::mutable_or_null<scalar_t>(p.interior_a2),
                                             p.input.const_data_ptr<scalar_t>(),
                                             p.w1.const_data_ptr<scalar_t>(),
                                             p.b1.const_data_ptr<scalar_t>(),
                                             p.w2.const_data_ptr<scalar_t>(),
                                             p.b2.const_data_ptr<scalar_t>(),
                                             cuda::data_or_null<scalar_t>(p.w_down),
                                             cuda::data_or_null<scalar_t>(p.b_down),
                                             cuda::to_int(p.input.size(0), "batch"),
                                             cuda::to_int(p.input.size(1), "channels"),
                                             cuda::to_int(p.w1.size(0), "channels"),
                                             cuda::to_int(p.input.size(2), "height"),
                                             cuda::to_int(p.input.size(3), "width"),
                                             cuda::to_int(p.out.size(2), "height"),
                                             cuda::to_int(p.out.size(3), "width"),
                                             p.relu};
    const auto plan = cuda::plan_encoder_block<scalar_t, acc_t>(a, p.nhwc);
    if (!plan.ok) return;
    cuda::check_grid(plan.blocks, "encoder_block");
    cuda::check_smem(plan.smem, "encoder_block");
    cuda::launch_encoder_block<scalar_t, acc_t>(a, plan, p.nhwc, stream);
    CAE_KERNEL_LAUNCH_CHECK();
    launched = true;
  });
  return launched;
}

}  // namespace cae
