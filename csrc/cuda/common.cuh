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
//                 (template arguments) wrap it in parentheses, or bind it
//                 to a local first (what csrc/cuda does):
//                   CAE_LAUNCH((conv3x3<float, 2>), grid, block, 0, stream, x, y);
//                   const auto kernel = conv3x3<float, 2>;
//     grid, block anything dim3 can be constructed from (dim3, unsigned, int)
//     smem_bytes  dynamic shared memory in bytes (0 if unused)
//     stream      a cudaStream_t (0 / nullptr allowed)
//   Under CAE_SIM the launch runs to completion before returning and throws
//   std::runtime_error on an invalid configuration or a detected kernel bug.
//
//   CAE_DYNAMIC_SHARED(T, name);   inside a kernel: declares `T* name`
//     pointing at the block's dynamic shared memory (smem_bytes of CAE_LAUNCH).
//
// Host glue for the .cu files: CAE_DISPATCH_KEY, CAE_DEVICE_GUARD(tensor),
// CAE_CURRENT_STREAM(), CAE_KERNEL_LAUNCH_CHECK(). In the nvcc build they name
// c10 CUDA classes, whose headers kernels.h includes; under CAE_SIM they are
// no-ops. This header includes nothing of torch in either build.
//
// Everything below the launch section is torch-free device/host code shared by
// the *_kernels.cuh headers: index types, vector loads, compile-time dispatch.
#pragma once

#include <cstddef>
#include <cstdint>
#include <type_traits>
#include <utility>

// --- Dispatch key and host glue: macros only, for every file of both builds,
// including the host-compiled register.cpp (CAE_HOST_ONLY).
#if defined(CAE_SIM)
// The emulated kernels are registered for the CPU key of the cae_sim ops and
// run on CPU tensors; a failed launch throws, so there is nothing to check.
#define CAE_DISPATCH_KEY CPU
#define CAE_DEVICE_GUARD(tensor) ((void)(tensor))
#define CAE_CURRENT_STREAM() (static_cast<cudaStream_t>(nullptr))
#define CAE_KERNEL_LAUNCH_CHECK() ((void)0)
#else
// Expanded only in the .cu files' host code, which includes the c10 headers
// (kernels.h); this header itself stays torch-free.
#define CAE_DISPATCH_KEY CUDA
#define CAE_DEVICE_GUARD(tensor) const c10::cuda::CUDAGuard cae_device_guard_((tensor).device())
// = at::cuda::getCurrentCUDAStream(), without ATen/cuda/CUDAContext.h (cuBLAS,
// cuSPARSE, ... headers that every architecture's pass would parse again).
#define CAE_CURRENT_STREAM() (c10::cuda::getCurrentCUDAStream().stream())
#define CAE_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif

#ifndef CAE_HOST_ONLY

// --- Launching kernels
#if defined(CAE_SIM)

#include "../sim/cuda_sim.h"

#define CAE_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  ::cae_sim::launch(#kernel, (kernel), dim3(grid), dim3(block), (smem_bytes), (stream), ##__VA_ARGS__)
#define CAE_DYNAMIC_SHARED(T, name) T* name = ::cae_sim::dynamic_shared<T>()

#elif defined(__CUDACC__)

#define CAE_LAUNCH(kernel, grid, block, smem_bytes, stream, ...) \
  kernel<<<(grid), (block), (smem_bytes), (stream)>>>(__VA_ARGS__)
#define CAE_DYNAMIC_SHARED(T, name)                             \
  extern __shared__ __align__(16) unsigned char cae_smem_raw[]; \
  T* name = reinterpret_cast<T*>(cae_smem_raw)

#else
#error "common.cuh: compile with nvcc, or with a C++ compiler and -DCAE_SIM (CPU emulation)"
#endif

#define CAE_DEVICE __device__ __forceinline__
#define CAE_HOST_DEVICE __host__ __device__ __forceinline__
#if defined(CAE_SIM)
#define CAE_UNROLL _Pragma("GCC unroll 16")
#else
#define CAE_UNROLL _Pragma("unroll")
#endif

namespace cae {
namespace cuda {

// Global memory offsets are 64-bit (batch 256 of 1M-element images is past
// 2^31); sizes of one dimension and offsets inside a block's tile are int.
using index_t = int64_t;

// Kernels run 256-thread blocks: 8 warps, enough to hide latency where 2-4
// blocks share an SM, small enough that the tiny layers of the autoencoder
// still give hundreds of blocks. The fused encoder backward takes 512 where
// one of its blocks fills an SM's shared memory (plan_encoder_block_backward):
// the helpers it shares take a block's thread count, kThreads by default.
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Dynamic shared memory per block: under the 48 KiB a block may take without
// the opt-in attribute, and small enough that 4 blocks (32 warps) fit on an
// SM of sm_80 and newer.
constexpr size_t kSmemBudget = 44 * 1024;
// Blocks a launch should have (two per SM of an H200's 132): the fused
// kernels pack images into a block only while the grid keeps this many; the
// loss uses at most this many (its last block adds every block's sums).
constexpr index_t kBlockFill = 264;
// Flat (elementwise) kernels: grid-stride loops over at most this many blocks.
constexpr index_t kMaxFlatBlocks = 4096;

CAE_HOST_DEVICE int ceil_div(int a, int b) { return (a + b - 1) / b; }
CAE_HOST_DEVICE index_t ceil_div(index_t a, index_t b) { return (a + b - 1) / b; }

// The gradient gate of a fused ReLU: v where the forward output was positive.
template <typename Acc>
CAE_DEVICE Acc gated(Acc v, Acc gate) {
  return gate > Acc(0) ? v : Acc(0);
}

template <typename Acc>
CAE_DEVICE Acc relu(Acc v) {
  return v < Acc(0) ? Acc(0) : v;  // NaN stays NaN, as in torch.relu
}

// Loads x[i] as the accumulation type, zeroed where the gate (a ReLU output of
// the same layout, or nullptr) is not positive.
template <typename Acc, typename T>
CAE_DEVICE Acc load_gated(const T* __restrict__ x, const T* __restrict__ gate, index_t i) {
  const Acc v = static_cast<Acc>(x[i]);
  return gate == nullptr ? v : gated(v, static_cast<Acc>(gate[i]));
}

// N values of T moved as one aligned access (ld.global.v4 and friends): the
// caller checks alignment and divisibility at run time (vector_ok below).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// x[at], ..., x[at + N - 1] and the same elements of its gate (nullptr: none)
// as loaded, by one vector load each; zeros where !inside (a halo, or channels
// past a short last chunk). Nothing reads the values here, so a loop can
// issue several of these loads before it waits for the first (batched_walk).
template <typename T, int N>
struct RawGated {
  Vec<T, N> x, gate;

  // Element j in the accumulation type, gated like load_gated.
  template <typename Acc>
  CAE_DEVICE Acc value(int j, bool has_gate) const {
    const Acc e = static_cast<Acc>(x.v[j]);
    return has_gate ? gated(e, static_cast<Acc>(gate.v[j])) : e;
  }
};

template <int N, typename T>
CAE_DEVICE RawGated<T, N> load_raw(const T* __restrict__ x, const T* __restrict__ gate, index_t at,
                                   bool inside) {
  RawGated<T, N> r{};
  if (inside) {
    r.x = *reinterpret_cast<const Vec<T, N>*>(x + at);
    if (gate != nullptr) r.gate = *reinterpret_cast<const Vec<T, N>*>(gate + at);
  }
  return r;
}

// Element (n, c, y, x) of an [N, C, H, W] tensor in the layout.
template <bool NHWC>
CAE_DEVICE index_t pixel_offset(int n, int c, int y, int x, int C, int H, int W) {
  return NHWC ? ((static_cast<index_t>(n) * H + y) * W + x) * C + c
              : ((static_cast<index_t>(n) * C + c) * H + y) * W + x;
}

// One element copied from global to shared memory by cp.async (sm_80 and
// newer): no register holds it, so a thread issues every copy of a staging
// before it waits once (async_copies_wait), where a load waits for its value
// before its store. Zero where !inside (the instruction's src-size 0: src is
// not read). Below sm_80, a load and a store.
template <typename T>
CAE_DEVICE void copy_async(T* dst, const T* src, bool inside) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8, "copy_async: 4- or 8-byte elements");
#if defined(CAE_SIM)
  ::cae_sim::copy_async(dst, src, sizeof(T), !inside);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned to = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(to), "l"(src), "n"(sizeof(T)),
               "r"(inside ? static_cast<int>(sizeof(T)) : 0)
               : "memory");
#else
  *dst = inside ? *src : T(0);
#endif
}

// `count` bytes of global memory staged at `base` plus src's offset within
// its 4-byte word (returned: where the bytes start), so that src's whole
// words go by copy_async (for the caller's staged_barrier); the few bytes
// before the first whole word and after the last by plain loads.
CAE_DEVICE const unsigned char* stage_bytes(uint32_t* base, const unsigned char* __restrict__ src, int count,
                                            int tid, int threads) {
  const int lead = static_cast<int>(reinterpret_cast<uintptr_t>(src) % 4);
  unsigned char* dst = reinterpret_cast<unsigned char*>(base) + lead;
  const int to_word = (4 - lead) % 4, head = count < to_word ? count : to_word;
  const int words = (count - head) / 4, tail = head + 4 * words;
  const auto* src_words = reinterpret_cast<const uint32_t*>(src + head);
  auto* dst_words = reinterpret_cast<uint32_t*>(dst + head);
  for (int i = tid; i < words; i += threads) copy_async(dst_words + i, src_words + i, true);
  for (int i = tid; i < head; i += threads) dst[i] = src[i];
  for (int i = tail + tid; i < count; i += threads) dst[i] = src[i];
  return dst;
}

// One element staged into shared memory: by copy_async where T is the
// accumulation type (for the caller's staged_barrier), else loaded and
// converted; zero where !inside.
template <typename Acc, typename T>
CAE_DEVICE void stage_element(Acc* dst, const T* __restrict__ src, bool inside) {
  if constexpr (std::is_same<T, Acc>::value) {
    copy_async(dst, src, inside);
  } else {
    *dst = inside ? static_cast<Acc>(*src) : Acc(0);
  }
}

// This thread's copy_async copies are done (cp.async.wait_all).
CAE_DEVICE void async_copies_wait() {
#if defined(CAE_SIM)
  ::cae_sim::copy_async_wait_all();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// The barrier that ends a staging: every thread's copies (copy_async) are in
// shared memory and visible to the block.
CAE_DEVICE void staged_barrier() {
  async_copies_wait();
  __syncthreads();
}

// Widest vector of T that is at most 16 bytes, and at most `limit` elements.
template <typename T, int limit = 16>
constexpr int vec_width() {
  return (16 / sizeof(T)) < static_cast<size_t>(limit) ? static_cast<int>(16 / sizeof(T)) : limit;
}

// A run of `count` elements starting at p can be read as Vec<T, N>s when p is
// aligned and count, and the stride between runs, are multiples of N.
template <int N, typename T>
inline bool vector_ok(const T* p, int64_t count, int64_t stride) {
  return N > 1 && reinterpret_cast<uintptr_t>(p) % (sizeof(T) * N) == 0 && count % N == 0 && stride % N == 0;
}

// Compile-time dispatch of run-time choices (the kernels are templates over
// stride, layout, output-channel block and gating).
template <class F>
inline void with_bool(bool value, F&& f) {
  if (value) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

template <class F>
inline void with_stride(int stride, F&& f) {
  if (stride == 1) {
    f(std::integral_constant<int, 1>{});
  } else {
    f(std::integral_constant<int, 2>{});
  }
}

// Output channels per thread: the channel counts of the autoencoder (1, 8,
// 16) each get an exact block; other counts round up (16: several groups).
inline int channel_block(int channels) {
  return channels <= 1 ? 1 : channels <= 4 ? 4 : channels <= 8 ? 8 : 16;
}

template <class F>
inline void with_channel_block(int channels, F&& f) {
  switch (channel_block(channels)) {
    case 1:
      f(std::integral_constant<int, 1>{});
      break;
    case 4:
      f(std::integral_constant<int, 4>{});
      break;
    case 8:
      f(std::integral_constant<int, 8>{});
      break;
    default:
      f(std::integral_constant<int, 16>{});
      break;
  }
}

// A grid-stride launch over `count` items: blocks, capped.
inline unsigned flat_blocks(index_t count) {
  const index_t blocks = ceil_div(count, static_cast<index_t>(kThreads));
  return static_cast<unsigned>(blocks < kMaxFlatBlocks ? (blocks < 1 ? 1 : blocks) : kMaxFlatBlocks);
}

// The output tile of one block of the convolution kernels: `samples` images
// x `rows` x `cols` pixels, one pixel per thread (rows * cols * samples ==
// kThreads). Powers of two, cols up to a warp: 28x28 -> 8x32 (1 image),
// 14x14 -> 16x16, 7x7 -> 8x8 (4 images), 4x4 -> 4x4 (16 images). Images of
// the tiny late layers share a block, so a batch of 256 still fills the GPU.
struct OutputTile {
  int rows, cols, samples;
  int tiles_y, tiles_x, sample_groups;
  index_t blocks() const { return static_cast<index_t>(tiles_y) * tiles_x * sample_groups; }
};

inline int pow2_at_least(int n, int lo, int hi) {
  int p = lo;
  while (p < n && p < hi) p *= 2;
  return p;
}

// The smallest tile of at most `hi` that covers n in as few tiles as `hi`
// does: 7 for 14 and 8 (two tiles of 7, not 8 and an idle 2), 5 for 14 and 6.
inline int balanced_tile(int n, int hi) { return ceil_div(n, ceil_div(n, hi)); }

inline OutputTile plan_output_tile(int N, int H, int W) {
  OutputTile t;
  t.cols = pow2_at_least(W, 2, 32);
  t.rows = pow2_at_least(H, 2, kThreads / t.cols);
  t.samples = kThreads / (t.rows * t.cols);
  t.tiles_y = ceil_div(H, t.rows);
  t.tiles_x = ceil_div(W, t.cols);
  t.sample_groups = ceil_div(N, t.samples);
  return t;
}

// Where a block's tile starts: blockIdx.x enumerates (sample group, tile row,
// tile column), column fastest.
struct TileOrigin {
  int n0, y0, x0;
};

CAE_HOST_DEVICE TileOrigin tile_origin(index_t block, int tiles_x, int tiles_y, int rows, int cols,
                                       int samples) {
  const int tx = static_cast<int>(block % tiles_x);
  block /= tiles_x;
  const int ty = static_cast<int>(block % tiles_y);
  block /= tiles_y;
  return TileOrigin{static_cast<int>(block) * samples, ty * rows, tx * cols};
}

// Input channels staged in shared memory per pass: as many as fit in
// `budget` given the per-channel and fixed costs (in elements), balanced so
// that every pass but the last has the same count, and a multiple of `align`
// (the vector width) when the channel count is.
inline int plan_channel_chunk(int channels, size_t per_channel_bytes, size_t fixed_bytes, size_t budget,
                              int align) {
  if (channels <= 0) return 1;  // nothing to stage: the channel loop runs no pass
  size_t fit = budget > fixed_bytes ? (budget - fixed_bytes) / per_channel_bytes : 1;
  int max_chunk = static_cast<int>(fit < 1 ? 1 : (fit > static_cast<size_t>(channels) ? channels : fit));
  const int passes = ceil_div(channels, max_chunk);
  int chunk = ceil_div(channels, passes);
  if (align > 1 && channels % align == 0 && chunk % align != 0) {
    const int down = chunk / align * align;
    const int up = chunk + (align - chunk % align);
    chunk = up <= max_chunk ? up : (down > 0 ? down : chunk);
  }
  return chunk;
}

// Shared-memory planes get an odd element stride: threads that walk the
// channels of one pixel then hit distinct banks.
inline int odd_stride(int n) { return n | 1; }

}  // namespace cuda
}  // namespace cae

#endif  // CAE_HOST_ONLY
