// Host side of the loss and its gradient (loss_kernels.cuh).
#include "kernels.h"

#include "loss_kernels.cuh"

namespace cae {

bool CudaKernels::sigmoid_cross_entropy(const SigmoidCrossEntropyParams& p) {
  CAE_DEVICE_GUARD(p.logits);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  CAE_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "cae_sigmoid_cross_entropy_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int blocks = cuda::loss_blocks(p.logits.numel());
    const auto workspace =
        cuda::grid_sums_workspace<acc_t>(p.logits, cuda::kLossSums, blocks, stream, "sigmoid_cross_entropy");
    const cuda::LossArgs<scalar_t, acc_t> a{p.loss.mutable_data_ptr<scalar_t>(),
                                            p.rmse.mutable_data_ptr<scalar_t>(),
                                            p.logits.const_data_ptr<scalar_t>(),
                                            p.target.const_data_ptr<scalar_t>(),
                                            p.logits.numel(),
                                            workspace.sums};
    cuda::launch_sigmoid_cross_entropy(a, stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

bool CudaKernels::sigmoid_cross_entropy_grad(const SigmoidCrossEntropyGradParams& p) {
  CAE_DEVICE_GUARD(p.logits);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  CAE_DISPATCH_FLOATING_TYPES(p.logits.scalar_type(), "cae_sigmoid_cross_entropy_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::LossGradArgs<scalar_t> a{
        p.grad_logits.mutable_data_ptr<scalar_t>(), p.grad_loss.const_data_ptr<scalar_t>(),
        p.logits.const_data_ptr<scalar_t>(), p.target.const_data_ptr<scalar_t>(), p.logits.numel()};
    cuda::launch_sigmoid_cross_entropy_grad<scalar_t, acc_t>(a, stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
  return true;
}

}  // namespace cae
