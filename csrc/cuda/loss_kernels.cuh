// The autoencoder's loss in one launch, its gradient in another: binary
// cross-entropy on logits, mean over every element, and the RMSE of
// sigmoid(logits) against the target (ops.h sigmoid_cross_entropy); the
// __global__ kernels and their torch-free launchers.
#pragma once

#include "common.cuh"
#include "grid_sums.cuh"

namespace cae {
namespace cuda {

// Per block: the sums of the cross-entropy and of the squared error.
constexpr int kLossSums = 2;

template <typename T, typename Acc>
struct LossArgs {
  T* loss;     // 0-d
  T* rmse;     // 0-d
  const T* x;  // logits, `count` elements
  const T* t;  // target, in the logits' layout
  index_t count;
  GridSums<Acc> sums;  // kLossSums per block
};

template <typename Acc>
CAE_DEVICE Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + exp(-x));
}

// softplus(x) - x t, as PyTorch's binary_cross_entropy_with_logits computes
// it: (1 - t) x - log_sigmoid(x), log_sigmoid(x) = min(x, 0) - log1p(exp(-|x|)):
// no overflow for large |x|.
template <typename Acc>
CAE_DEVICE Acc cross_entropy(Acc x, Acc t) {
  return (Acc(1) - t) * x - ((x < Acc(0) ? x : Acc(0)) - log1p(exp(-fabs(x))));
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) sigmoid_cross_entropy_kernel(LossArgs<T, Acc> a) {
  __shared__ Acc scratch[kWarps];
  __shared__ int flag;
  Acc ce = Acc(0), se = Acc(0);
  const index_t step = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.count; i += step) {
    const Acc x = static_cast<Acc>(a.x[i]), t = static_cast<Acc>(a.t[i]);
    ce += cross_entropy(x, t);
    const Acc d = sigmoid(x) - t;
    se += d * d;
  }
  ce = block_sum(ce, scratch);
  se = block_sum(se, scratch);
  Acc* row = a.sums.partials + static_cast<index_t>(blockIdx.x) * kLossSums;
  if (threadIdx.x == 0) row[0] = ce, row[1] = se;
  const Acc* totals = finish_grid_sums(a.sums, &flag);
  if (totals != nullptr && threadIdx.x == 0) {
    const Acc n = static_cast<Acc>(a.count);
    *a.loss = static_cast<T>(totals[0] / n);
    *a.rmse = static_cast<T>(sqrt(totals[1] / n));
  }
}

template <typename T>
struct LossGradArgs {
  T* grad_x;
  const T* grad_loss;  // 0-d, on the device: read there (no host sync)
  const T* x;
  const T* t;
  index_t count;
};

// grad_x = (sigmoid(x) - t) * grad_loss / count.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) sigmoid_cross_entropy_grad_kernel(LossGradArgs<T> a) {
  const Acc scale = static_cast<Acc>(*a.grad_loss) / static_cast<Acc>(a.count);
  const index_t step = static_cast<index_t>(gridDim.x) * kThreads;
  for (index_t i = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; i < a.count; i += step) {
    const Acc x = static_cast<Acc>(a.x[i]), t = static_cast<Acc>(a.t[i]);
    a.grad_x[i] = static_cast<T>((sigmoid(x) - t) * scale);
  }
}

// Blocks of the loss: enough to read the elements at full bandwidth, few
// enough that the last block's sums are short; fixed by the count, so the
// order of summation (and the result's bits) is too.
inline int loss_blocks(index_t count) {
  const index_t blocks = ceil_div(count, static_cast<index_t>(kThreads) * 8);
  return static_cast<int>(blocks < 1 ? 1 : blocks > kBlockFill ? kBlockFill : blocks);
}

template <typename T, typename Acc>
inline void launch_sigmoid_cross_entropy(const LossArgs<T, Acc>& a, cudaStream_t stream) {
  CAE_LAUNCH((sigmoid_cross_entropy_kernel<T, Acc>), static_cast<unsigned>(a.sums.blocks), kThreads, 0,
             stream, a);
}

template <typename T, typename Acc>
inline void launch_sigmoid_cross_entropy_grad(const LossGradArgs<T>& a, cudaStream_t stream) {
  CAE_LAUNCH((sigmoid_cross_entropy_grad_kernel<T, Acc>), flat_blocks(a.count), kThreads, 0, stream, a);
}

}  // namespace cuda
}  // namespace cae
