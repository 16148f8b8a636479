// The CUDA backend: hand-written kernels (the *_kernels.cuh headers) behind
// the static interface every backend has (csrc/backend.h).
// Tensors arrive checked, contiguous in the layout named by `nhwc`, outputs
// preallocated. Each entry point guards the device, launches on the current
// stream and checks every launch.
//
// The same sources build twice: by nvcc (CUDA dispatch key of the cae ops),
// and by g++ with -DCAE_SIM -DCAE_NAMESPACE=cae_sim, where csrc/sim/cuda_sim.h
// runs the kernels on the CPU (CPU key of the cae_sim ops, see
// cae_kernels/sim.py). Torch headers come first: common.cuh then brings in
// either the CUDA runtime or the emulator.
#pragma once

// Lean includes on purpose: nvcc parses every header once per GPU
// architecture, so the kernels see the Tensor class, not torch/library.h
// (only register.cpp needs that, through ../ops.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>

#include "../backend.h"
#ifndef CAE_SIM
// What common.cuh's CAE_DEVICE_GUARD / CAE_CURRENT_STREAM /
// CAE_KERNEL_LAUNCH_CHECK name in the nvcc build.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include <limits>
#include <optional>

#include "common.cuh"
#ifndef CAE_HOST_ONLY  // device code: not in the host-compiled files
#include "grid_sums.cuh"
#include "mma.cuh"
#endif

// float32 and float64, and float16 / bfloat16 with float32 accumulation
// (at::opmath_type).
#define CAE_DISPATCH_FLOATING_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)

namespace cae {
namespace cuda {

template <typename T>
inline const T* data_or_null(const OptTensor& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

template <typename T>
inline T* mutable_or_null(const OptTensor& t) {
  return t.has_value() ? t->mutable_data_ptr<T>() : nullptr;
}

// Sizes of one dimension are int in the kernels (offsets are 64-bit).
inline int to_int(int64_t v, const char* what) {
  TORCH_CHECK(v <= std::numeric_limits<int>::max(), "cae: ", what, " of ", v,
              " is too large for the CUDA kernels");
  return static_cast<int>(v);
}

// A launch's block count must fit grid.x.
inline void check_grid(int64_t blocks, const char* op) {
  TORCH_CHECK(blocks < (int64_t{1} << 31), "cae: ", op, " needs ", blocks,
              " CUDA blocks, more than a grid holds; split the batch");
}

// Dynamic shared memory a launch may take without the opt-in attribute. The
// planners stay under it by construction; this catches a planner bug on the
// host (the emulator would accept more).
inline void check_smem(size_t bytes, const char* op) {
  TORCH_CHECK(bytes <= 48 * 1024, "cae: internal error: ", op, " planned ", bytes,
              " bytes of shared memory per block (at most 49152)");
}

#ifndef CAE_HOST_ONLY  // the CUDA runtime (or the emulator) is there
// Dynamic shared memory one block of the current device may opt in to: for
// the kernels that keep whole images in shared memory (227 KiB on sm_90, 64
// on sm_75; the planners decline what does not fit).
inline size_t smem_opt_in_limit() {
  int device = 0, bytes = 0;
  TORCH_CHECK(
      cudaGetDevice(&device) == cudaSuccess &&
          cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess,
      "cae: cannot read the CUDA device's shared memory per block");
  return static_cast<size_t>(bytes);
}

// What a whole-image kernel may plan for its dynamic shared memory: the limit
// less its own __shared__ variables, which come out of the same limit (the
// grid sums' flag, a block sum's scratch: 1,040 bytes at most in the SASS
// report; kept to 2 KiB so that a planner never fills the last bytes).
inline size_t smem_dynamic_budget() { return smem_opt_in_limit() - 2048; }

// Lets `kernel` launch with `bytes` of dynamic shared memory: above 48 KiB a
// kernel must opt in, or its launch fails (the emulator checks it too).
template <class Kernel>
inline void allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return;
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  TORCH_CHECK(e == cudaSuccess, "cae: cannot give a CUDA kernel ", bytes,
              " bytes of shared memory: ", cudaGetErrorString(e));
}

// The workspace of a kernel that finishes its sums with finish_grid_sums
// (grid_sums.cuh): `size` sums for each of `blocks` blocks, its tickets
// cleared on `stream`. `storage` must outlive the launch's queuing (the
// caching allocator orders its reuse on the stream).
template <typename Acc>
struct GridSumsWorkspace {
  at::Tensor storage;
  GridSums<Acc> sums;
};

template <typename Acc>
inline GridSumsWorkspace<Acc> grid_sums_workspace(const at::Tensor& like, int size, int blocks,
                                                  cudaStream_t stream, const char* op) {
  GridSumsWorkspace<Acc> w;
  w.storage = like.new_empty({static_cast<int64_t>(grid_sums_bytes<Acc>(size, blocks))},
                             like.options().dtype(at::kByte));
  w.sums = grid_sums_at<Acc>(w.storage.mutable_data_ptr(), size, blocks);
  const cudaError_t e = cudaMemsetAsync(w.sums.tickets, 0, grid_sums_ticket_bytes<Acc>(blocks), stream);
  TORCH_CHECK(e == cudaSuccess, "cae: ", op, " could not clear its tickets: ", cudaGetErrorString(e));
  return w;
}
#endif

// Whether PyTorch lets convolutions on CUDA run in TF32
// (torch.backends.cudnn.allow_tf32); float32 correlations then use tensor
// cores. Host-compiled (precision.cpp): nvcc does not parse ATen/Context.h.
bool conv_allows_tf32();

// Whether t's products may run on tensor cores on t's device: float16 and
// bfloat16, float32 on TF32 only where conv_allows_tf32(); sm_80 and newer.
bool tensor_cores_allowed(const Tensor& t);

#ifndef CAE_HOST_ONLY
// The tensor-core products' input type for T: float16, bfloat16, or float32
// on tf32 (mma_dtype<T> says whether T has one).
template <typename T>
constexpr bool mma_dtype =
    std::is_same_v<T, at::Half> || std::is_same_v<T, at::BFloat16> || std::is_same_v<T, float>;
template <typename T>
using MmaKind = std::conditional_t<std::is_same_v<T, at::Half>, MmaF16,
                                   std::conditional_t<std::is_same_v<T, float>, MmaTF32, MmaBF16>>;
#endif

// The 3x3 correlation on tensor cores, where the device, dtype and shape
// allow it (conv3x3.cu); false: nothing launched, the caller's plain kernel
// runs. OutIn: p.weight is [C_out, C_in, 3, 3] (correlate); InOutFlipped: it
// is [C_in, C_out, 3, 3] and read flipped (correlate_transpose at stride 1);
// InOutParityClasses: [C_in, C_out, 3, 3], correlate_transpose at stride 2 (a
// correlation per parity class of the output pixels).
// Inside the caller's device guard.
// Pending sums (PendingSums, below) are added by extra blocks, as in the plain
// kernels.
enum class CorrelateWeight { OutIn, InOutFlipped, InOutParityClasses };
struct PendingSums;
bool correlate_on_tensor_cores(const CorrelateParams& p, CorrelateWeight weight, const PendingSums& sums);

// Scratch for per-block partial sums, in the accumulation type.
template <typename Acc>
inline at::Tensor scratch(const at::Tensor& like, int64_t rows, int64_t cols) {
  return like.new_empty({rows, cols}, like.options().dtype(c10::CppTypeToScalarType<Acc>::value));
}

// A weight gradient's per-block partial sums, not yet added: conv_backward
// hands them to the input gradient's launch (SumsJob in conv3x3_kernels.cuh),
// weight_grad to a launch of their own. Type-erased between the two dtype
// dispatches.
struct PendingSums {
  at::Tensor partial;      // [rows, columns] in the accumulation type; undefined: none
  at::Tensor grad_weight;  // columns [0, grad_weight.numel())
  at::Tensor grad_bias;    // the rest

  // The kernels' view, a SumsJob<T, Acc> (raw pointers; no blocks when none).
  template <class Job>
  Job job() const {
    using T = typename Job::value_type;
    using Acc = typename Job::acc_type;
    if (!partial.defined()) return Job{};
    const int rows = to_int(partial.size(0), "partial rows"),
              cols = to_int(partial.size(1), "partial columns");
    return Job{partial.const_data_ptr<Acc>(),
               rows,
               cols,
               {grad_weight.mutable_data_ptr<T>(), to_int(grad_weight.numel(), "weight size"),
                grad_bias.mutable_data_ptr<T>()},
               (cols + 31) / 32};  // blocks of 32 columns
  }
};

}  // namespace cuda

struct CudaKernels {
  static constexpr const char* name = "CUDA";
  static constexpr const char* supported_dtypes = "float32, float64, float16, bfloat16";
  static bool supports(at::ScalarType t) {
    return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
  }
  CAE_BACKEND_KERNELS
  // The fused encoder block (encoder_block.cu); false: not for this shape.
  static bool encoder_block(const EncoderBlockParams& p);
  // Its backward in one launch (encoder_block_backward.cu); false: not for this shape.
  static bool encoder_block_backward(const EncoderBlockBackwardParams& p);
  // The fused decoder block (decoder_block.cu); false: not for this shape.
  static bool decoder_block(const DecoderBlockParams& p);
  static bool decoder_block_backward(const DecoderBlockBackwardParams& p);
  // The loss and its gradient (loss.cu): every shape.
  static bool sigmoid_cross_entropy(const SigmoidCrossEntropyParams& p);
  static bool sigmoid_cross_entropy_grad(const SigmoidCrossEntropyGradParams& p);
  // Adam's step with the gradients' norm (adam.cu): float32, at most
  // kAdamMaxTensors tensors (false beyond: ops.h composes it).
  static bool adam(const AdamParams& p);

 private:
  // weight_grad up to its partial sums, and the correlations with extra
  // blocks that add pending sums (none: the plain op).
  static cuda::PendingSums weight_grad_partials(const WeightGradParams& p);
  static void correlate_then_sum(const CorrelateParams& p, const cuda::PendingSums& sums);
  static void correlate_transpose_then_sum(const CorrelateParams& p, const cuda::PendingSums& sums);
};

}  // namespace cae
