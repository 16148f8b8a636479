// Test hook of the emulated build only (cae_kernels.sim compiles it; nvcc
// never sees it): kernels with the bugs the emulator must catch, launched
// through CAE_LAUNCH from a torch op exactly as the real kernels are, so the
// tests can check that each one reaches Python as a RuntimeError.
//
//   torch.ops.cae_sim._sim_fault(fault)   fault: see launch_fault below
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

__global__ void fill_kernel(float* out) { out[threadIdx.x] = 1.0f; }

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
  } else if (fault == "none") {
    CAE_LAUNCH(fill_kernel, 1, 32, 0, nullptr, out);
  } else {
    TORCH_CHECK(false, "cae_sim: unknown fault ", fault);
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(CAE_NAMESPACE, m) { m.def("_sim_fault(str fault) -> ()", &launch_fault); }
