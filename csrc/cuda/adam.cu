// Host side of Adam's step (adam_kernels.cuh).
#include "kernels.h"

#include "adam_kernels.cuh"

namespace cae {

bool CudaKernels::adam(const AdamParams& p) {
  const int tensors = static_cast<int>(p.params.size());
  if (tensors > cuda::kAdamMaxTensors) return false;
  CAE_DEVICE_GUARD(p.lr);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  cuda::AdamArgs a{};
  a.offset[0] = 0;
  for (int k = 0; k < tensors; ++k) {
    a.param[k] = p.params[k].mutable_data_ptr<float>();
    a.grad[k] = p.grads[k].const_data_ptr<float>();
    a.exp_avg[k] = p.exp_avgs[k].mutable_data_ptr<float>();
    a.exp_avg_sq[k] = p.exp_avg_sqs[k].mutable_data_ptr<float>();
    a.step[k] = p.steps[k].mutable_data_ptr<float>();
    a.offset[k + 1] = a.offset[k] + p.params[k].numel();
  }
  a.tensors = tensors;
  a.lr = p.lr.const_data_ptr<float>();
  a.grad_norm = p.grad_norm.mutable_data_ptr<float>();
  a.beta1 = p.beta1, a.beta2 = p.beta2, a.eps = p.eps, a.weight_decay = p.weight_decay;
  const auto workspace =
      cuda::grid_sums_workspace<float>(p.lr, 1, cuda::adam_blocks(a.offset[tensors]), stream, "adam_");
  a.sums = workspace.sums;
  cuda::launch_adam(a, stream);
  CAE_KERNEL_LAUNCH_CHECK();
  return true;
}

}  // namespace cae
