// Host side of the 3x3 transposed correlation (conv_transpose3x3 forward,
// conv3x3 input gradient): on tensor cores where conv3x3.cu's
// correlate_mma_kernel takes it (stride 1 and 2), else the plain kernel.
#include "kernels.h"

#include "conv_transpose3x3_kernels.cuh"

namespace cae {

void CudaKernels::correlate_transpose(const CorrelateParams& p) { correlate_transpose_then_sum(p, {}); }

void CudaKernels::correlate_transpose_then_sum(const CorrelateParams& p, const cuda::PendingSums& sums) {
  const Tensor &out = p.out, &g = p.input, &w = p.weight;
  const OptTensor &g_gate = p.input_gate, &bias = p.bias;
  const int64_t stride = p.stride;
  const bool relu = p.relu, nhwc = p.nhwc;
  CAE_DEVICE_GUARD(g);
  // At stride 1 the transposed correlation is a correlation with the flipped
  // kernel, at stride 2 one per parity class of the output pixels: tensor
  // cores where conv3x3.cu's kernel takes it.
  const cuda::CorrelateWeight weight =
      stride == 1 ? cuda::CorrelateWeight::InOutFlipped : cuda::CorrelateWeight::InOutParityClasses;
  if (cuda::correlate_on_tensor_cores(p, weight, sums)) {
    CAE_KERNEL_LAUNCH_CHECK();
    return;
  }
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  CAE_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cae_correlate_transpose_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::CorrelateTransposeArgs<scalar_t> a{out.mutable_data_ptr<scalar_t>(),
                                                   g.const_data_ptr<scalar_t>(),
                                                   cuda::data_or_null<scalar_t>(g_gate),
                                                   w.const_data_ptr<scalar_t>(),
                                                   cuda::data_or_null<scalar_t>(bias),
                                                   cuda::to_int(g.size(0), "batch"),
                                                   cuda::to_int(g.size(1), "channels"),
                                                   cuda::to_int(g.size(2), "height"),
                                                   cuda::to_int(g.size(3), "width"),
                                                   cuda::to_int(out.size(1), "channels"),
                                                   cuda::to_int(out.size(2), "height"),
                                                   cuda::to_int(out.size(3), "width"),
                                                   relu};
    const auto plan = cuda::plan_correlate_transpose<scalar_t, acc_t>(a, static_cast<int>(stride), nhwc);
    cuda::check_grid(plan.blocks, "correlate_transpose");
    cuda::check_smem(plan.smem, "correlate_transpose");
    cuda::launch_correlate_transpose<scalar_t, acc_t>(a, plan, static_cast<int>(stride), nhwc,
                                                      sums.job<cuda::SumsJob<scalar_t, acc_t>>(), stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cae
