// Host side of the 3x3 correlation (conv3x3 forward, conv_transpose3x3 input
// gradient), the weight gradient of both (with the bias's), and the bias
// gradient alone.
#include "kernels.h"

#include "conv3x3_kernels.cuh"
#include "conv3x3_mma_kernels.cuh"

namespace cae {

namespace {

// float16 and bfloat16 correlations run on tensor cores where the device has
// the m16n8k16 products (sm_80 and newer) and the shape suits them
// (plan_correlate_mma); float32 ones too, on tf32, where PyTorch would let
// cuDNN convolve in TF32 (torch.backends.cudnn.allow_tf32); everything else on
// the plain kernel. The emulator's device is sm_90 (CAE_SIM_ARCH chooses
// another).
template <typename T>
bool correlate_on_tensor_cores(const cuda::CorrelateArgs<T>& a, int stride, bool nhwc, int device,
                               cudaStream_t stream) {
  using Kind = std::conditional_t<std::is_same_v<T, at::Half>, cuda::MmaF16,
                                  std::conditional_t<std::is_same_v<T, float>, cuda::MmaTF32, cuda::MmaBF16>>;
  if constexpr (std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, float>) {
    if (std::is_same_v<T, float> && !cuda::conv_allows_tf32()) return false;
    int major = 0;
    TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess,
                "cae: cannot read the compute capability of CUDA device ", device);
    if (major < 8) return false;
    const cuda::MmaConvPlan plan = cuda::plan_correlate_mma(a, stride, nhwc);
    if (!plan.ok) return false;
    cuda::check_grid(plan.blocks, "correlate");
    cuda::check_smem(plan.smem, "correlate");
    cuda::launch_correlate_mma<T, Kind>(a, plan, nhwc, stream);
    return true;
  } else {
    (void)a, (void)stride, (void)nhwc, (void)device, (void)stream;
    return false;
  }
}

}  // namespace

void CudaKernels::correlate(const CorrelateParams& p) {
  const Tensor &out = p.out, &x = p.input, &w = p.weight;
  const OptTensor &x_gate = p.input_gate, &bias = p.bias;
  const int64_t stride = p.stride;
  const bool relu = p.relu, nhwc = p.nhwc;
  CAE_DEVICE_GUARD(x);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  CAE_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_correlate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::CorrelateArgs<scalar_t> a{out.mutable_data_ptr<scalar_t>(),
                                          x.const_data_ptr<scalar_t>(),
                                          cuda::data_or_null<scalar_t>(x_gate),
                                          w.const_data_ptr<scalar_t>(),
                                          cuda::data_or_null<scalar_t>(bias),
                                          cuda::to_int(x.size(0), "batch"),
                                          cuda::to_int(x.size(1), "channels"),
                                          cuda::to_int(x.size(2), "height"),
                                          cuda::to_int(x.size(3), "width"),
                                          cuda::to_int(out.size(1), "channels"),
                                          cuda::to_int(out.size(2), "height"),
                                          cuda::to_int(out.size(3), "width"),
                                          relu};
    if (correlate_on_tensor_cores(a, static_cast<int>(stride), nhwc, x.device().index(), stream)) {
      CAE_KERNEL_LAUNCH_CHECK();
      return;
    }
    const auto plan = cuda::plan_correlate<scalar_t, acc_t>(a, static_cast<int>(stride), nhwc);
    cuda::check_grid(plan.blocks, "correlate");
    cuda::check_smem(plan.smem, "correlate");
    cuda::launch_correlate<scalar_t, acc_t>(a, plan, static_cast<int>(stride), nhwc, stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
}

void CudaKernels::weight_grad(const WeightGradParams& p) {
  const Tensor &out = p.grad_weight, &a_t = p.small, &b_t = p.large;
  const OptTensor &a_gate = p.small_gate, &b_gate = p.large_gate;
  const int64_t stride = p.stride;
  const bool nhwc = p.nhwc;
  CAE_DEVICE_GUARD(a_t);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  CAE_DISPATCH_FLOATING_TYPES(a_t.scalar_type(), "cae_weight_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::WeightGradArgs<scalar_t> a{out.mutable_data_ptr<scalar_t>(),
                                           a_t.const_data_ptr<scalar_t>(),
                                           cuda::data_or_null<scalar_t>(a_gate),
                                           b_t.const_data_ptr<scalar_t>(),
                                           cuda::data_or_null<scalar_t>(b_gate),
                                           cuda::to_int(a_t.size(0), "batch"),
                                           cuda::to_int(a_t.size(1), "channels"),
                                           cuda::to_int(a_t.size(2), "height"),
                                           cuda::to_int(a_t.size(3), "width"),
                                           cuda::to_int(b_t.size(1), "channels"),
                                           cuda::to_int(b_t.size(2), "height"),
                                           cuda::to_int(b_t.size(3), "width"),
                                           p.grad_output_is_large};
    const auto plan = cuda::plan_weight_grad<scalar_t, acc_t>(a, static_cast<int>(stride), nhwc);
    cuda::check_grid(plan.regions, "weight_grad");
    cuda::check_smem(plan.smem, "weight_grad");
    // Partial rows: the weight's sums, then the bias's.
    const int outputs = cuda::to_int(out.numel(), "weight size");
    const int columns = cuda::to_int(out.numel() + p.grad_bias.numel(), "weight size");
    at::Tensor partial = cuda::scratch<acc_t>(a_t, plan.blocks, columns);
    cuda::launch_weight_grad<scalar_t, acc_t>(a, plan, static_cast<int>(stride), nhwc,
                                              partial.mutable_data_ptr<acc_t>(), stream);
    CAE_KERNEL_LAUNCH_CHECK();
    cuda::launch_reduce_partials<scalar_t, acc_t>(
        partial.const_data_ptr<acc_t>(), plan.blocks, columns,
        {out.mutable_data_ptr<scalar_t>(), outputs, p.grad_bias.mutable_data_ptr<scalar_t>()}, stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
}

void CudaKernels::bias_grad(const BiasGradParams& p) {
  const Tensor &out = p.grad_bias, &g = p.grad_output;
  const OptTensor& g_gate = p.gate;
  const bool nhwc = p.nhwc;
  CAE_DEVICE_GUARD(g);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  TORCH_CHECK(nhwc || g.size(1) <= 65535, "cae: bias_grad supports at most 65535 channels in NCHW, got ",
              g.size(1));
  CAE_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cae_bias_grad_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::BiasGradArgs<scalar_t> a{
        out.mutable_data_ptr<scalar_t>(),     g.const_data_ptr<scalar_t>(),
        cuda::data_or_null<scalar_t>(g_gate), cuda::to_int(g.size(0), "batch"),
        cuda::to_int(g.size(1), "channels"),  g.size(2) * g.size(3)};
    const int chunks = cuda::plan_bias_chunks(g.size(0) * a.HW);
    at::Tensor partial = cuda::scratch<acc_t>(g, chunks, a.C);
    cuda::launch_bias_grad<scalar_t, acc_t>(a, chunks, nhwc, partial.mutable_data_ptr<acc_t>(), stream);
    CAE_KERNEL_LAUNCH_CHECK();
    cuda::launch_reduce_partials<scalar_t, acc_t>(partial.const_data_ptr<acc_t>(), chunks, a.C,
                                                  {out.mutable_data_ptr<scalar_t>(), a.C, nullptr}, stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cae
