// Compile check: cuda_sim.h next to the torch headers (CPU build of the
// extension), in both include orders:
//   g++ -std=c++17 -DCAE_SIM -I<repo> -I<torch includes> -c tests/sim/torch_include_check.cpp
//   ... -DCAE_SIM_FIRST   (csrc/cuda/common.cuh before <torch/extension.h>)
// With -DCAE_SIM_PYBIND it is also a tiny extension module (built and called
// from Python by hand to check that kernel errors arrive as RuntimeError).
#ifdef CAE_SIM_FIRST
#include "csrc/cuda/common.cuh"
#include <torch/extension.h>
#else
#include <torch/extension.h>
#include "csrc/cuda/common.cuh"
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

template <class T>
__global__ void scale_kernel(const T* __restrict__ x, T* __restrict__ y, float s, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = i < n;
  float v = active ? static_cast<float>(x[i]) * s : 0.0f;
  // 16-bit types go through the warp shuffle too; width 16 as a bonus.
  const T w = __shfl_xor_sync(0xffffffffu, static_cast<T>(v), 1, 16);
  if (active) y[i] = static_cast<T>(0.5f * (v + static_cast<float>(w)));
  (void)min(1, 2);  // CUDA-style unqualified min/max still resolve next to torch
  (void)max(1.0f, 2.0f);
}

__global__ void early_exit_kernel(float* y) {
  if (threadIdx.x == 0) return;  // bug on purpose
  __syncthreads();
  y[threadIdx.x] = 1.0f;
}

torch::Tensor pair_mean_scale(torch::Tensor x, double s) {
  TORCH_CHECK(x.is_contiguous() && x.numel() % 32 == 0, "contiguous, multiple of 32");
  auto y = torch::empty_like(x);
  const int64_t n = x.numel();
  const unsigned blocks = static_cast<unsigned>((n + 255) / 256);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pair_mean_scale", [&] {
    CAE_LAUNCH((scale_kernel<scalar_t>), blocks, 256, 0, nullptr, x.data_ptr<scalar_t>(),
               y.data_ptr<scalar_t>(), static_cast<float>(s), n);
  });
  return y;
}

torch::Tensor buggy(torch::Tensor y) {
  CAE_LAUNCH(early_exit_kernel, 1, 64, 0, nullptr, y.data_ptr<float>());
  return y;
}

#ifdef CAE_SIM_PYBIND
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pair_mean_scale", &pair_mean_scale);
  m.def("buggy", &buggy);
}
#endif
