// common.cuh -- definitions shared by every CUDA kernel of cae_kernels.
//
// The same kernel source is compiled two ways:
//   * by nvcc for the GPU;
//   * by a C++ compiler with -DCAE_SIM (no GPU), where csrc/sim/cuda_sim.h
//     runs every CUDA thread as a fiber on the CPU (see csrc/sim/README.md).
//
// Launch contract (both builds):
//   CAE_LAUNCH(kernel, grid, block, smem_bytes, stream, args...);
//     kernel      a __global__ function; if its name contains commas
//                 (template arguments) wrap it in parentheses:
//                   CAE_LAUNCH((conv3x3<float, 2>), grid, block, 0, stream, x, y);
//     grid, block anything dim3 can be constructed from (dim3, unsigned, int)
//     smem_bytes  dynamic shared memory in bytes (0 if unused)
//     stream      a cudaStream_t (0 / nullptr allowed)
//   Under CAE_SIM the launch runs to completion before returning and throws
//   std::runtime_error on an invalid configuration or a detected kernel bug.
//
//   CAE_DYNAMIC_SHARED(T, name);   inside a kernel: declares `T* name`
//     pointing at the block's dynamic shared memory (smem_bytes of CAE_LAUNCH).
#pragma once

#if defined(CAE_SIM)

#include "../sim/cuda_sim.h"

#define CAE_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::cae_sim::launch(#kernel, (kernel), dim3(grid), dim3(block), (smem_bytes), (stream), ##__VA_ARGS__)
#define CAE_DYNAMIC_SHARED(T, name) T* name = ::cae_sim::dynamic_shared<T>()

#elif defined(__CUDACC__)

#define CAE_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)
#define CAE_DYNAMIC_SHARED(T, name)                              \
  extern __shared__ __align__(16) unsigned char cae_smem_raw[]; \
  T* name = reinterpret_cast<T*>(cae_smem_raw)

#else
#error "common.cuh: compile with nvcc, or with a C++ compiler and -DCAE_SIM (CPU emulation)"
#endif
