// Compile-only check that the self-test kernels are valid CUDA and that the
// nvcc side of CAE_LAUNCH / CAE_DYNAMIC_SHARED expands correctly:
//   nvcc -std=c++17 -I<repo> -c tests/sim/nvcc_check.cu -o /dev/null
// (run by run_sim_selftest.sh when nvcc is available; needs no GPU).
#include "csrc/cuda/common.cuh"
#include "tests/sim/sim_kernels.cuh"

void launch_everything(float* f, double* d, int* i, unsigned* u, unsigned long long* ull, Rec* rec,
                       cudaStream_t s) {
  CAE_LAUNCH(record_indices, dim3(2, 2, 3), dim3(4, 3, 5), 0, s, rec);
  CAE_LAUNCH((block_sum<float, 256>), 4, 256, 0, s, f, f);
  CAE_LAUNCH((block_sum<long long, 128>), 3, 128, 0, s, reinterpret_cast<long long*>(ull),
             reinterpret_cast<long long*>(ull));
  CAE_LAUNCH(block_sum_missing_barrier, 2, 256, 0, s, f, f);
  CAE_LAUNCH((warp_shuffles<float>), 2, 64, 0, s, f, f, f, f, f, f);
  CAE_LAUNCH((warp_shuffles<double>), 2, 64, 0, s, d, d, d, d, d, d);
  CAE_LAUNCH((warp_shuffles<unsigned long long>), 2, 64, 0, s, ull, ull, ull, ull, ull, ull);
  CAE_LAUNCH(absent_lanes, 1, 32, 0, s, f, d, i, ull, f);
  CAE_LAUNCH(votes, 1, 64, 0, s, u, i, i, i, i);
  CAE_LAUNCH(sync_counts, 1, 200, 0, s, i, i, i);
  CAE_LAUNCH(atomics, 64, 256, 0, s, f, d, i, ull, i, i, u, u);
  CAE_LAUNCH(dyn_smem, 3, 64, 50 * sizeof(float), s, f, 50);
  CAE_LAUNCH(params_are_private, 1, 96, 0, s, 1000, i);
  CAE_LAUNCH(warps_in_3d_block, 1, dim3(8, 4, 3), 0, s, u, u);
  CAE_LAUNCH(noarg_kernel, 2, 2, 0, s);
  CAE_LAUNCH(warp_smem_exchange, 3, 64, 0, s, i, true);
  CAE_LAUNCH(stack_hog, 1, 32, 0, s, i, 10);
  CAE_LAUNCH((conv3x3_tiled<float, 1>), dim3(4, 4, 8), dim3(TILE, TILE), 0, s, f, f, f, f, 8, 64, 64, 4, 64,
             64);
  CAE_LAUNCH((conv3x3_tiled<double, 2>), dim3(2, 2, 3), dim3(TILE, TILE), 0, s, d, d, d, d, 2, 20, 33, 3, 10,
             17);
}
