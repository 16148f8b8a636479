// Host side of the 2x2 max-pool and its input gradient.
#include "kernels.h"

#include "max_pool2x2_kernels.cuh"

namespace cae {
namespace {

template <bool Backward>
void max_pool_impl(const Tensor& out, const Tensor& x, const Tensor* grad_output, bool nhwc) {
  CAE_DEVICE_GUARD(x);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  const Tensor& pooled = Backward ? *grad_output : out;  // the [N, C, H_out, W_out] side
  CAE_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_max_pool_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::MaxPoolArgs<scalar_t> a{out.mutable_data_ptr<scalar_t>(),
                                        x.const_data_ptr<scalar_t>(),
                                        Backward ? grad_output->const_data_ptr<scalar_t>() : nullptr,
                                        cuda::to_int(x.size(0), "batch"),
                                        cuda::to_int(x.size(1), "channels"),
                                        cuda::to_int(x.size(2), "height"),
                                        cuda::to_int(x.size(3), "width"),
                                        cuda::to_int(pooled.size(2), "height"),
                                        cuda::to_int(pooled.size(3), "width")};
    cuda::launch_max_pool<scalar_t, acc_t, Backward>(a, nhwc, stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

void CudaKernels::max_pool(const MaxPoolParams& p) { max_pool_impl<false>(p.out, p.input, nullptr, p.nhwc); }

void CudaKernels::max_pool_grad(const MaxPoolGradParams& p) {
  max_pool_impl<true>(p.grad_input, p.input, &p.grad_output, p.nhwc);
}

}  // namespace cae
