// Adam's step over a list of float32 parameters in one launch, with the
// gradients' 2-norm (ops.h adam_); the __global__ kernel and its torch-free
// launcher.
//
// The tensors are one flat index space (tensor k's elements from offset[k]);
// a thread walks it with a grid stride and advances its tensor index as the
// index passes each tensor's end (no search, no division). Each element is
// torch.optim.Adam's update as its fused CUDA kernel writes it; the sums of
// the squared gradients meet in finish_grid_sums (fixed order: the same bits
// every run), whose last block writes the norm and increments the step
// counts: every other block has read them by then.
#pragma once

#include "common.cuh"
#include "grid_sums.cuh"

namespace cae {
namespace cuda {

// Parameter tensors per launch (the conv autoencoder has 16); the host
// composes longer lists from ATen's ops.
constexpr int kAdamMaxTensors = 32;

struct AdamArgs {
  float* param[kAdamMaxTensors];
  const float* grad[kAdamMaxTensors];
  float* exp_avg[kAdamMaxTensors];
  float* exp_avg_sq[kAdamMaxTensors];
  float* step[kAdamMaxTensors];         // 0-d each, incremented by the kernel
  index_t offset[kAdamMaxTensors + 1];  // tensor k: [offset[k], offset[k + 1])
  int tensors;
  const float* lr;  // 0-d, read on the device (a schedule fills it in place)
  float* grad_norm;
  double beta1, beta2, eps, weight_decay;
  GridSums<float> sums;  // one sum per block
};

__global__ void __launch_bounds__(kThreads) adam_kernel(AdamArgs a) {
  __shared__ float scratch[kWarps];
  __shared__ int flag;
  const index_t stride = static_cast<index_t>(gridDim.x) * kThreads;
  const float beta1 = static_cast<float>(a.beta1), beta2 = static_cast<float>(a.beta2);
  const float eps = static_cast<float>(a.eps), weight_decay = static_cast<float>(a.weight_decay);
  const double lr = *a.lr;
  float squares = 0.f;
  int k = -1;
  float step_size = 0.f, bias_correction2_sqrt = 1.f;
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.offset[a.tensors];
       i += stride) {
    if (k < 0 || i >= a.offset[k + 1]) {
      do ++k;
      while (i >= a.offset[k + 1]);
      // This step's count (incremented by the last block), and its bias
      // corrections in double, as torch's fused Adam computes them.
      const double step = static_cast<double>(*a.step[k]) + 1.0;
      step_size = static_cast<float>(lr / (1.0 - pow(a.beta1, step)));
      bias_correction2_sqrt = static_cast<float>(sqrt(1.0 - pow(a.beta2, step)));
    }
    const index_t e = i - a.offset[k];
    float g = a.grad[k][e];
    squares += g * g;
    float p = a.param[k][e];
    if (weight_decay != 0.f) g += weight_decay * p;
    const float m = beta1 * a.exp_avg[k][e] + (1.f - beta1) * g;
    const float v = beta2 * a.exp_avg_sq[k][e] + (1.f - beta2) * g * g;
    a.exp_avg[k][e] = m;
    a.exp_avg_sq[k][e] = v;
    p -= step_size * m / (sqrtf(v) / bias_correction2_sqrt + eps);
    a.param[k][e] = p;
  }
  squares = block_sum(squares, scratch);
  if (threadIdx.x == 0) a.sums.partials[blockIdx.x] = squares;
  const float* totals = finish_grid_sums(a.sums, &flag);
  if (totals == nullptr) return;
  if (threadIdx.x == 0) *a.grad_norm = sqrtf(totals[0]);
  if (static_cast<int>(threadIdx.x) < a.tensors) *a.step[threadIdx.x] += 1.f;
}

// Blocks: an element per thread, at most kBlockFill; fixed by the count, so
// the order of summation (and the norm's bits) is too. A model's step is a few
// thousand parameters: the kernel's time is its loads' round trips, one per
// grid-stride iteration, so more blocks (not more elements a thread).
inline int adam_blocks(index_t count) {
  const index_t blocks = ceil_div(count, static_cast<index_t>(kThreads));
  return static_cast<int>(blocks < 1 ? 1 : blocks > kBlockFill ? kBlockFill : blocks);
}

inline void launch_adam(const AdamArgs& a, cudaStream_t stream) {
  CAE_LAUNCH(adam_kernel, static_cast<unsigned>(a.sums.blocks), kThreads, 0, stream, a);
}

}  // namespace cuda
}  // namespace cae
