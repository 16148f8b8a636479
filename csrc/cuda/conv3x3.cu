// Host side of the 3x3 correlation (conv3x3 forward, conv_transpose3x3 input
// gradient), the weight gradient of both (with the bias's), the bias gradient
// alone, and a layer's whole backward (two launches: the weight gradient's
// partial sums, then the input gradient, whose extra blocks add them). The
// correlations and the weight gradient take tensor cores where the device,
// dtype and shape allow (conv3x3_mma_kernels.cuh), else the plain kernels.
#include "kernels.h"

#include "conv3x3_kernels.cuh"
#include "conv3x3_mma_kernels.cuh"

namespace cae {

bool cuda::tensor_cores_allowed(const Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  if (dtype != at::kHalf && dtype != at::kBFloat16 && !(dtype == at::kFloat && conv_allows_tf32()))
    return false;
  const int device = t.device().index();
  int major = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess,
              "cae: cannot read the compute capability of CUDA device ", device);
  return major >= 8;
}

namespace {

template <typename T>
cuda::CorrelateArgs<T> correlate_args(const CorrelateParams& p) {
  return {p.out.mutable_data_ptr<T>(),
          p.input.const_data_ptr<T>(),
          cuda::data_or_null<T>(p.input_gate),
          p.weight.const_data_ptr<T>(),
          cuda::data_or_null<T>(p.bias),
          cuda::to_int(p.input.size(0), "batch"),
          cuda::to_int(p.input.size(1), "channels"),
          cuda::to_int(p.input.size(2), "height"),
          cuda::to_int(p.input.size(3), "width"),
          cuda::to_int(p.out.size(1), "channels"),
          cuda::to_int(p.out.size(2), "height"),
          cuda::to_int(p.out.size(3), "width"),
          p.relu};
}

template <typename T>
bool launch_on_tensor_cores(const CorrelateParams& p, cuda::CorrelateWeight weight,
                            const cuda::PendingSums& sums, cudaStream_t stream) {
  using Kind = cuda::MmaKind<T>;
  if constexpr (cuda::mma_dtype<T>) {
    if (!cuda::tensor_cores_allowed(p.input)) return false;
    const cuda::CorrelateArgs<T> a = correlate_args<T>(p);
    const cuda::MmaTaps taps = weight == cuda::CorrelateWeight::OutIn          ? cuda::MmaTaps::Correlate
                               : weight == cuda::CorrelateWeight::InOutFlipped ? cuda::MmaTaps::Flipped
                                                                               : cuda::MmaTaps::ParityClasses;
    const cuda::MmaConvPlan plan = cuda::plan_correlate_mma(a, static_cast<int>(p.stride), p.nhwc, taps);
    if (!plan.ok) return false;
    cuda::check_grid(plan.blocks, "correlate");
    cuda::check_smem(plan.smem, "correlate");
    cuda::launch_correlate_mma<T, Kind>(a, plan, p.nhwc, sums.job<cuda::SumsJob<T, float>>(), stream);
    return true;
  } else {
    (void)p, (void)weight, (void)sums, (void)stream;
    return false;
  }
}

// The weight gradient's partial sums on tensor cores where the device, dtype
// and shape allow it (plan_weight_grad_mma): the partial rows, or an undefined
// tensor (nothing launched, the plain kernel's turn).
template <typename T>
at::Tensor weight_grad_on_tensor_cores(const cuda::WeightGradArgs<T>& a, const WeightGradParams& p,
                                       int columns, cudaStream_t stream) {
  if constexpr (cuda::mma_dtype<T>) {
    if (!cuda::tensor_cores_allowed(p.small)) return {};
    const int stride = static_cast<int>(p.stride);
    const cuda::MmaWeightGradPlan plan = cuda::plan_weight_grad_mma(a, stride, p.nhwc);
    if (!plan.ok) return {};
    cuda::check_smem(plan.smem, "weight_grad");
    at::Tensor partial = cuda::scratch<float>(p.small, plan.blocks, columns);
    cuda::launch_weight_grad_mma<T, cuda::MmaKind<T>>(a, plan, stride, p.nhwc,
                                                      partial.mutable_data_ptr<float>(), stream);
    return partial;
  } else {
    (void)a, (void)p, (void)columns, (void)stream;
    return {};
  }
}

}  // namespace

// float16 and bfloat16 correlations run on tensor cores where the device has
// the m16n8k16 products (sm_80 and newer) and the shape suits them
// (plan_correlate_mma); float32 ones too, on tf32, where PyTorch would let
// cuDNN convolve in TF32 (torch.backends.cudnn.allow_tf32); everything else on
// the plain kernels. The emulator's device is sm_90 (CAE_SIM_ARCH chooses
// another).
bool cuda::correlate_on_tensor_cores(const CorrelateParams& p, CorrelateWeight weight,
                                     const PendingSums& sums) {
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  bool launched = false;
  CAE_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "cae_correlate_mma_cuda",
                              [&] { launched = launch_on_tensor_cores<scalar_t>(p, weight, sums, stream); });
  return launched;
}

void CudaKernels::correlate(const CorrelateParams& p) { correlate_then_sum(p, {}); }

void CudaKernels::correlate_then_sum(const CorrelateParams& p, const cuda::PendingSums& sums) {
  CAE_DEVICE_GUARD(p.input);
  if (cuda::correlate_on_tensor_cores(p, cuda::CorrelateWeight::OutIn, sums)) {
    CAE_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int stride = static_cast<int>(p.stride);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  CAE_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "cae_correlate_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const cuda::CorrelateArgs<scalar_t> a = correlate_args<scalar_t>(p);
    const auto plan = cuda::plan_correlate<scalar_t, acc_t>(a, stride, p.nhwc);
    cuda::check_grid(plan.blocks, "correlate");
    cuda::check_smem(plan.smem, "correlate");
    cuda::launch_correlate<scalar_t, acc_t>(a, plan, stride, p.nhwc,
                                            sums.job<cuda::SumsJob<scalar_t, acc_t>>(), stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
}

void CudaKernels::weight_grad(const WeightGradParams& p) {
  const cuda::PendingSums sums = weight_grad_partials(p);
  CAE_DEVICE_GUARD(p.small);
  CAE_DISPATCH_FLOATING_TYPES(p.small.scalar_type(), "cae_weight_grad_sums_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    cuda::launch_reduce_partials(sums.job<cuda::SumsJob<scalar_t, acc_t>>(), CAE_CURRENT_STREAM());
    CAE_KERNEL_LAUNCH_CHECK();
  });
}

cuda::PendingSums CudaKernels::weight_grad_partials(const WeightGradParams& p) {
  const Tensor &out = p.grad_weight, &a_t = p.small, &b_t = p.large;
  const OptTensor &a_gate = p.small_gate, &b_gate = p.large_gate;
  const int64_t stride = p.stride;
  const bool nhwc = p.nhwc;
  CAE_DEVICE_GUARD(a_t);
  const cudaStream_t stream = CAE_CURRENT_STREAM();
  at::Tensor partial;
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
    // Partial rows: the weight's sums, then the bias's.
    const int columns = cuda::to_int(out.numel() + p.grad_bias.numel(), "weight size");
    partial = weight_grad_on_tensor_cores(a, p, columns, stream);
    if (partial.defined()) {
      CAE_KERNEL_LAUNCH_CHECK();
      return;
    }
    const auto plan = cuda::plan_weight_grad<scalar_t, acc_t>(a, static_cast<int>(stride), nhwc);
    cuda::check_grid(plan.regions, "weight_grad");
    cuda::check_smem(plan.smem, "weight_grad");
    partial = cuda::scratch<acc_t>(a_t, plan.blocks, columns);
    cuda::launch_weight_grad<scalar_t, acc_t>(a, plan, static_cast<int>(stride), nhwc,
                                              partial.mutable_data_ptr<acc_t>(), stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
  return {.partial = partial, .grad_weight = out, .grad_bias = p.grad_bias};
}

void CudaKernels::conv_backward(const ConvBackwardParams& p) {
  const cuda::PendingSums sums = weight_grad_partials(p.weight_and_bias_grad());
  if (p.transposed) {
    correlate_then_sum(p.input_grad(), sums);
  } else {
    correlate_transpose_then_sum(p.input_grad(), sums);
  }
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
    cuda::launch_reduce_partials(
        cuda::SumsJob<scalar_t, acc_t>{partial.const_data_ptr<acc_t>(),
                                       chunks,
                                       a.C,
                                       {out.mutable_data_ptr<scalar_t>(), a.C, nullptr},
                                       cuda::ceil_div(a.C, 32)},
        stream);
    CAE_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cae
