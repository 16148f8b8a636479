// Test hook of the emulated build only (cae_kernels.sim compiles it; nvcc
// never sees it): kernels with the bugs the emulator must catch, launched
// through CAE_LAUNCH from a torch op exactly as the real kernels are, so the
// tests can check that each one reaches Python as a RuntimeError.
//
//   torch.ops.cae_sim._sim_fault(fault)   fault: see launch_fault below
//   torch.ops.cae_sim._sim_copy_async()   cp.async's emulation (copy_async_kernel)
#include <ATen/core/Tensor.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <string>

#include "../cuda/common.cuh"

namespace {

// Thread 0 returns before a barrier the others wait at.
__global__ void early_return_kernel(float* out) {
  if (threadIdx.x == 0) return;
  __syncthreads();
  out[threadIdx.x] = 1.0f;
}

// Two halves of the block wait at different barriers.
__global__ void divergent_barrier_kernel(float* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
    out[threadIdx.x] = 1.0f;
  } else {
    __syncthreads();
    out[threadIdx.x] = 2.0f;
  }
}

// Lane 0 waits for lane 1 at __syncwarp, lane 1 waits for the block at
// __syncthreads: nobody can move.
__global__ void deadlock_kernel(float* out) {
  if (threadIdx.x == 0) {
    __syncwarp(0x3u);
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.0f;
}

// A full-warp shuffle in a warp whose upper half has left.
__global__ void shuffle_mask_kernel(float* out) {
  if (threadIdx.x % 32 >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.0f, 1);
}

// Copies by cp.async that the thread never waits for.
__global__ void unwaited_copies_kernel(float* out) {
  __shared__ float s[64];
  cae::cuda::copy_async(s + threadIdx.x, out + threadIdx.x, true);
}

__global__ void fill_kernel(float* out) { out[threadIdx.x] = 1.0f; }

// cp.async as the emulator runs it: a copy is done at the thread's wait, not
// before (what the GPU guarantees), and zero-fills where asked. out: the
// shared word before the wait, after it, and a zero-filled word.
__global__ void copy_async_kernel(const float* in, float* out) {
  __shared__ float s[2];
  s[0] = -1.0f, s[1] = -1.0f;
  cae::cuda::copy_async(s, in, true);
  cae::cuda::copy_async(s + 1, in, false);
  out[0] = s[0];
  cae::cuda::async_copies_wait();
  out[1] = s[0], out[2] = s[1];
}

at::Tensor copy_async_semantics() {
  const float in = 3.0f;
  auto out = at::zeros({3});
  CAE_LAUNCH(copy_async_kernel, 1, 1, 0, nullptr, &in, out.mutable_data_ptr<float>());
  return out;
}

void launch_fault(const std::string& fault) {
  float out[1024] = {};
  if (fault == "early_return") {
    CAE_LAUNCH(early_return_kernel, 1, 64, 0, nullptr, out);
  } else if (fault == "divergent_barrier") {
    CAE_LAUNCH(divergent_barrier_kernel, 1, 64, 0, nullptr, out);
  } else if (fault == "deadlock") {
    CAE_LAUNCH(deadlock_kernel, 1, 64, 0, nullptr, out);
  } else if (fault == "shuffle_mask") {
    CAE_LAUNCH(shuffle_mask_kernel, 1, 32, 0, nullptr, out);
  } else if (fault == "too_many_threads") {
    CAE_LAUNCH(fill_kernel, 1, 2048, 0, nullptr, out);
  } else if (fault == "empty_grid") {
    CAE_LAUNCH(fill_kernel, 0, 32, 0, nullptr, out);
  } else if (fault == "unwaited_copies") {
    CAE_LAUNCH(unwaited_copies_kernel, 1, 64, 0, nullptr, out);
  } else if (fault == "none") {
    CAE_LAUNCH(fill_kernel, 1, 32, 0, nullptr, out);
  } else {
    TORCH_CHECK(false, "cae_sim: unknown fault ", fault);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(CAE_NAMESPACE, m) {
  m.def("_sim_fault(str fault) -> ()", &launch_fault);
  m.def("_sim_copy_async() -> Tensor", &copy_async_semantics);
}
