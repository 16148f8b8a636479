// Test hook of the emulated build only (cae_kernels.sim compiles it; nvcc
// never sees it): one warp's product through the wrappers the kernels use
// (csrc/cuda/mma.cuh), its fragments loaded here element by element as the
// PTX ISA lays them out, so that a wrong index in the emulator's gather shows
// as D != A B + C.
//
//   torch.ops.cae_sim._sim_mma(a, b, c [16, 8] float32) -> d
//   a [16, 16], b [16, 8]: both float16 or both bfloat16 (m16n8k16)
//   a [16, 8], b [8, 8]: float32, passed to the tf32 product as they are
//   (m16n8k8; the product ignores the low 13 mantissa bits)
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include "../cuda/mma.cuh"

namespace {

template <typename T, class Kind>
__global__ void mma_check_kernel(const T* a, const T* b, const float* c, float* d) {
  const int g = threadIdx.x / 4, t = threadIdx.x % 4;
  const uint32_t af[4] = {cae::cuda::pack2(a[g * 16 + 2 * t], a[g * 16 + 2 * t + 1]),
                          cae::cuda::pack2(a[(g + 8) * 16 + 2 * t], a[(g + 8) * 16 + 2 * t + 1]),
                          cae::cuda::pack2(a[g * 16 + 2 * t + 8], a[g * 16 + 2 * t + 9]),
                          cae::cuda::pack2(a[(g + 8) * 16 + 2 * t + 8], a[(g + 8) * 16 + 2 * t + 9])};
  const uint32_t bf[2] = {cae::cuda::pack2(b[(2 * t) * 8 + g], b[(2 * t + 1) * 8 + g]),
                          cae::cuda::pack2(b[(2 * t + 8) * 8 + g], b[(2 * t + 9) * 8 + g])};
  const float cf[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                       c[(g + 8) * 8 + 2 * t + 1]};
  float df[4];
  cae::cuda::mma_m16n8k16<Kind>(df, af, bf, cf);
  d[g * 8 + 2 * t] = df[0], d[g * 8 + 2 * t + 1] = df[1];
  d[(g + 8) * 8 + 2 * t] = df[2], d[(g + 8) * 8 + 2 * t + 1] = df[3];
}

__global__ void mma_check_tf32_kernel(const float* a, const float* b, const float* c, float* d) {
  const int g = threadIdx.x / 4, t = threadIdx.x % 4;
  const uint32_t af[4] = {__float_as_uint(a[g * 8 + t]), __float_as_uint(a[(g + 8) * 8 + t]),
                          __float_as_uint(a[g * 8 + t + 4]), __float_as_uint(a[(g + 8) * 8 + t + 4])};
  const uint32_t bf[2] = {__float_as_uint(b[t * 8 + g]), __float_as_uint(b[(t + 4) * 8 + g])};
  const float cf[4] = {c[g * 8 + 2 * t], c[g * 8 + 2 * t + 1], c[(g + 8) * 8 + 2 * t],
                       c[(g + 8) * 8 + 2 * t + 1]};
  float df[4];
  cae::cuda::mma_m16n8k8_tf32(df, af, bf, cf);
  d[g * 8 + 2 * t] = df[0], d[g * 8 + 2 * t + 1] = df[1];
  d[(g + 8) * 8 + 2 * t] = df[2], d[(g + 8) * 8 + 2 * t + 1] = df[3];
}

at::Tensor mma_check(const at::Tensor& a, const at::Tensor& b, const at::Tensor& c) {
  const int64_t k = a.scalar_type() == at::kFloat ? 8 : 16;
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, k}) && b.sizes() == at::IntArrayRef({k, 8}) &&
                  c.sizes() == at::IntArrayRef({16, 8}),
              "_sim_mma: a [16, ", k, "], b [", k, ", 8], c [16, 8], got ", a.sizes(), ", ", b.sizes(), ", ",
              c.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && c.scalar_type() == at::kFloat,
              "_sim_mma: a and b of one dtype, c float32, got ", a.scalar_type(), ", ", b.scalar_type(), ", ",
              c.scalar_type());
  const at::Tensor ac = a.contiguous(), bc = b.contiguous(), cc = c.contiguous();
  at::Tensor d = cc.new_empty(cc.sizes());
  if (a.scalar_type() == at::kFloat) {
    CAE_LAUNCH(mma_check_tf32_kernel, 1, 32, 0, nullptr, ac.const_data_ptr<float>(),
               bc.const_data_ptr<float>(), cc.const_data_ptr<float>(), d.mutable_data_ptr<float>());
  } else if (a.scalar_type() == at::kHalf) {
    CAE_LAUNCH((mma_check_kernel<at::Half, cae::cuda::MmaF16>), 1, 32, 0, nullptr,
               ac.const_data_ptr<at::Half>(), bc.const_data_ptr<at::Half>(), cc.const_data_ptr<float>(),
               d.mutable_data_ptr<float>());
  } else {
    TORCH_CHECK(a.scalar_type() == at::kBFloat16, "_sim_mma: float16, bfloat16 or float32, got ",
                a.scalar_type());
    CAE_LAUNCH((mma_check_kernel<at::BFloat16, cae::cuda::MmaBF16>), 1, 32, 0, nullptr,
               ac.const_data_ptr<at::BFloat16>(), bc.const_data_ptr<at::BFloat16>(),
               cc.const_data_ptr<float>(), d.mutable_data_ptr<float>());
  }
  return d;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(CAE_NAMESPACE, m) {
  m.def("_sim_mma(Tensor a, Tensor b, Tensor c) -> Tensor", &mma_check);
}
