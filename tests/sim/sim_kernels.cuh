// Kernels of the cuda_sim self-test.  Plain CUDA source: compiled by g++
// through csrc/sim/cuda_sim.h (test_cuda_sim.cpp) and by nvcc
// (nvcc_check.cu), so both sides of csrc/cuda/common.cuh are exercised.
#pragma once
#include "csrc/cuda/common.cuh"

struct Rec {
  uint3 t, b;
  dim3 bd, gd;
};

__global__ void record_indices(Rec* out) {
  const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  out[block * threads + t] = Rec{threadIdx, blockIdx, blockDim, gridDim};
}

template <class T, int BLOCK>
__global__ void block_sum(const T* __restrict__ x, T* __restrict__ out) {
  __shared__ T s[BLOCK];
  const int t = threadIdx.x;
  s[t] = x[blockIdx.x * BLOCK + t];
  __syncthreads();
  for (int st = BLOCK / 2; st > 0; st >>= 1) {
    if (t < st) s[t] += s[t + st];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

// BUG on purpose: no __syncthreads between filling s and the first step.
__global__ void block_sum_missing_barrier(const float* __restrict__ x, float* __restrict__ out) {
  __shared__ float s[256];
  const int t = threadIdx.x;
  s[t] = x[blockIdx.x * 256 + t];
  for (int st = 128; st > 0; st >>= 1) {
    if (t < st) s[t] += s[t + st];
    __syncthreads();
  }
  if (t == 0) out[blockIdx.x] = s[0];
}

template <class T>
__device__ __forceinline__ T warp_sum_down(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <class T, int WIDTH>
__device__ __forceinline__ T segment_sum_xor(T v) {
  for (int o = WIDTH / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o, WIDTH);
  return v;
}

template <class T>
__global__ void warp_shuffles(const T* __restrict__ x, T* __restrict__ down, T* __restrict__ xor32,
                              T* __restrict__ xor16, T* __restrict__ scan8, T* __restrict__ bcast8) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const T v = x[i];
  down[i] = warp_sum_down(v);  // meaningful in lane 0 only
  xor32[i] = segment_sum_xor<T, 32>(v);
  xor16[i] = segment_sum_xor<T, 16>(v);
  T s = v;  // inclusive scan inside segments of 8 lanes
  for (int o = 1; o < 8; o <<= 1) {
    const T u = __shfl_up_sync(0xffffffffu, s, o, 8);
    if (lane % 8 >= o) s += u;
  }
  scan8[i] = s;
  bcast8[i] = __shfl_sync(0xffffffffu, v, 3, 8);  // lane 3 of each group of 8
}

// Lanes 0..15 shuffle among themselves, lanes 16..31 likewise (disjoint masks
// in flight at the same time); lane k of the low half asks for lane k+16,
// which is absent from its mask.
__global__ void absent_lanes(float* outf, double* outd, int* outi, unsigned long long* outu,
                             float* same_half) {
  const unsigned lane = threadIdx.x;
  const unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
  const float f = __shfl_sync(mask, 1.0f + lane, lane ^ 16);
  const double d = __shfl_sync(mask, 2.0 + lane, lane ^ 16);
  const int i = __shfl_sync(mask, static_cast<int>(lane), lane ^ 16);
  const unsigned long long u = __shfl_sync(mask, 5ull + lane, lane ^ 16);
  same_half[lane] = __shfl_sync(mask, 100.0f + lane, (lane & 16) | 1);
  outf[lane] = f, outd[lane] = d, outi[lane] = i, outu[lane] = u;
}

__global__ void votes(unsigned* ballot, int* any, int* all, int* any_none, int* all_sub) {
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  ballot[threadIdx.x] = __ballot_sync(0xffffffffu, lane % 3 == 0);
  any[threadIdx.x] = __any_sync(0xffffffffu, lane == 7);
  all[threadIdx.x] = __all_sync(0xffffffffu, lane < 31);
  any_none[threadIdx.x] = __any_sync(0xffffffffu, 0);
  int a = -1;
  if (lane < 8) a = __all_sync(0x000000ffu, lane < 8);  // only the lanes that take part
  all_sub[threadIdx.x] = a;
  __syncwarp();
  (void)warp;
}

__global__ void sync_counts(int* cnt, int* land, int* lor) {
  const int t = threadIdx.x;
  cnt[t] = __syncthreads_count(t % 4 == 0);
  land[t] = __syncthreads_and(t < 1000);
  lor[t] = __syncthreads_or(t == 77);
}

__global__ void atomics(float* f, double* d, int* i, unsigned long long* u, int* mx, int* mn,
                        unsigned* cas_hits, unsigned* cas_word) {
  const int g = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(f, 1.0f);
  atomicAdd(d, 0.5);
  atomicAdd(i, 2);
  atomicAdd(u, 3ull);
  atomicMax(mx, g);
  atomicMin(mn, -g);
  if (atomicCAS(cas_word, 0u, 1u) == 0u) atomicAdd(cas_hits, 1u);  // exactly one winner
}

__global__ void dyn_smem(float* out, int n) {
  CAE_DYNAMIC_SHARED(float, buf);
  const int t = threadIdx.x;
  if (t < n && t % 2 == 0) buf[t] = static_cast<float>(t + blockIdx.x);
  __syncthreads();
  if (t < n) out[blockIdx.x * n + t] = buf[t];
}

__global__ void early_return_before_barrier(float* out) {
  __shared__ float s[64];
  if (threadIdx.x == 5) return;  // BUG: thread 5 never reaches the barrier
  s[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = s[(threadIdx.x + 1) % 64];
}

__global__ void warp_vs_block_deadlock(int* out) {
  if (threadIdx.x < 16)
    __syncwarp();  // waits for lanes 16..31, which wait at __syncthreads
  else
    __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void divergent_barriers(int* out) {
  if (threadIdx.x < 32) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1;
}

__global__ void lane_not_in_mask(int* out) {
  out[threadIdx.x] = __shfl_sync(0x1u, 7, 0);  // lanes 1..31 are not in the mask
}

__global__ void full_mask_partial_warp(int* out) {
  out[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x), 0);  // block of 48 threads
}

__global__ void trap_kernel(int* out) {
  if (blockIdx.x == 2 && threadIdx.x == 3) __trap();
  out[threadIdx.x] = 0;
}

__global__ void params_are_private(int n, int* out) {
  n += threadIdx.x;  // each thread owns its copy
  __syncthreads();
  out[threadIdx.x] = n;
}

__global__ void warps_in_3d_block(unsigned* first_linear, unsigned* lane_of) {
  const unsigned linear = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  first_linear[linear] = __shfl_sync(0xffffffffu, linear, 0);
  lane_of[linear] =
      __popc(__ballot_sync(0xffffffffu, 1) & ((1u << (linear % 32)) - 1u));  // lane id via ballot
}

__global__ void noarg_kernel() {}

// Each block's place in the order the blocks ran: a ticket per block.
__global__ void block_tickets(unsigned* tickets, unsigned* next) {
  if (threadIdx.x == 0)
    tickets[blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z)] = atomicAdd(next, 1u);
}

// --- A realistic templated kernel: 3x3 convolution, padding 1, stride S, with
// an input tile plus halo in shared memory; one block = TILE x TILE outputs of
// one (image, output channel).
constexpr int TILE = 16;

template <class T, int S>
__global__ void __launch_bounds__(TILE* TILE)
    conv3x3_tiled(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ bias,
                  T* __restrict__ y, int Cin, int H, int W, int Cout, int Ho, int Wo) {
  constexpr int IT = (TILE - 1) * S + 3;  // input tile side, halo included
  __shared__ T tile[IT][IT + 1];          // +1: avoid bank conflicts on the GPU
  __shared__ T wsh[9];
  const int n = blockIdx.z / Cout, co = blockIdx.z % Cout;
  const int ox = blockIdx.x * TILE + threadIdx.x, oy = blockIdx.y * TILE + threadIdx.y;
  const int ix0 = static_cast<int>(blockIdx.x) * TILE * S - 1,
            iy0 = static_cast<int>(blockIdx.y) * TILE * S - 1;
  const int tid = threadIdx.y * TILE + threadIdx.x;
  const bool active = ox < Wo && oy < Ho;  // guard flag: every thread reaches every barrier
  T acc = bias[co];
  for (int ci = 0; ci < Cin; ++ci) {
    const T* xp = x + (static_cast<size_t>(n) * Cin + ci) * H * W;
    for (int i = tid; i < IT * IT; i += TILE * TILE) {
      const int ty = i / IT, tx = i % IT, gy = iy0 + ty, gx = ix0 + tx;
      tile[ty][tx] = (gy >= 0 && gy < H && gx >= 0 && gx < W) ? __ldg(xp + gy * W + gx) : T(0);
    }
    if (tid < 9) wsh[tid] = w[(static_cast<size_t>(co) * Cin + ci) * 9 + tid];
    __syncthreads();
    if (active)
      for (int ky = 0; ky < 3; ++ky)
        for (int kx = 0; kx < 3; ++kx)
          acc += wsh[ky * 3 + kx] * tile[threadIdx.y * S + ky][threadIdx.x * S + kx];
    __syncthreads();
  }
  if (active) y[((static_cast<size_t>(n) * Cout + co) * Ho + oy) * Wo + ox] = acc;
}

// Lanes exchange values through shared memory; __syncwarp orders each write
// before the neighbour's read (without it: a race, see --race-warp).
__global__ void warp_smem_exchange(int* out, bool with_syncwarp) {
  __shared__ int s[64];
  const int t = threadIdx.x;
  s[t] = t * 10;
  if (with_syncwarp) __syncwarp();
  out[t] = s[t ^ 1];
}

__global__ void mismatched_warp_intrinsics(int* out) {
  if (threadIdx.x < 16)
    __syncwarp();
  else
    out[threadIdx.x] = __ballot_sync(0xffffffffu, 1);  // same mask, different intrinsic
}

// Launched with one float too few of dynamic shared memory (ASan must report).
__global__ void dyn_smem_overrun(float* out) {
  CAE_DYNAMIC_SHARED(float, buf);
  buf[threadIdx.x] = 1.0f;
  __syncthreads();
  out[threadIdx.x] = buf[0];
}

__device__ __noinline__ int deep_recursion(int d) {
  volatile char pad[1024];
  pad[0] = static_cast<char>(d);
  return d == 0 ? pad[0] : deep_recursion(d - 1) + pad[0];
}

// Needs ~1 MiB of stack per thread: must hit the guard page, not corrupt memory.
__global__ void stack_hog(int* out, int depth) { out[threadIdx.x] = deep_recursion(depth); }
