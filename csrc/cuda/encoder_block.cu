// Host side of the fused encoder block's forward (encoder_block_kernels.cuh).
#include "encoder_block_args.h"

namespace cae {

static_assert(cuda::kPoolNoWinner == kPoolNoWinner, "the kernels' winner code is the ops'");

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
    auto a = cuda::encoder_block_args<scalar_t>(p.input, p.weights, p.out.size(2), p.out.size(3), p.relu);
    a.out = p.out.mutable_data_ptr<scalar_t>();
    a.winners = p.winners ? p.winners->mutable_data_ptr<unsigned char>() : nullptr;
    a.a1 = cuda::mutable_or_null<scalar_t>(p.interior_a1);
    a.a2 = cuda::mutable_or_null<scalar_t>(p.interior_a2);
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
