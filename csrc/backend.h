// What every backend (csrc/cpu/, csrc/cuda/) hands the ops of ops.h: a struct
// of static kernel entry points, its set declared once here by
// CAE_BACKEND_KERNELS, each taking one params struct with named fields.
// Tensors arrive checked, contiguous in the layout named by `nhwc`, outputs
// preallocated; ops.h says what each kernel computes.
// Lean on purpose: nvcc parses it once per GPU architecture (cuda/kernels.h).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

namespace cae {
using at::Tensor;
using OptTensor = std::optional<Tensor>;

// Every kernel reads the large side (the convolution's input, the transposed
// convolution's output) through 3x3 windows of stride `stride`, whose
// positions make the small side. A gate is a fused ReLU's output: the
// tensor it gates passes where the gate is positive (the backward's mask).

// correlate:           out (small side) = act(bias + correlate(gate(input), weight))
// correlate_transpose: out (large side) = act(bias + correlate^T(gate(input), weight))
struct CorrelateParams {
  Tensor out;
  Tensor input;
  OptTensor input_gate;
  Tensor weight;   // [C_small, C_large, 3, 3] read as the correlation needs it
  OptTensor bias;  // [C_out]
  int64_t stride;
  bool relu;
  bool nhwc;
};

// grad_weight[c_small, c_large, ky, kx] = sum of gate(small)[c_small] times
// gate(large)[c_large] under tap (ky, kx), over samples and positions; in the
// same pass grad_bias = the per-channel sum of the gated output gradient,
// which is the large side for a transposed convolution, else the small.
struct WeightGradParams {
  Tensor grad_weight;
  Tensor grad_bias;
  Tensor small;
  OptTensor small_gate;
  Tensor large;
  OptTensor large_gate;
  int64_t stride;
  bool nhwc;
  bool grad_output_is_large;
};

// grad_bias[c] = sum of gate(grad_output)[:, c] (a bias trained without its weight).
struct BiasGradParams {
  Tensor grad_bias;
  Tensor grad_output;
  OptTensor gate;
  bool nhwc;
};

// A convolution's backward (or, with `transposed`, a transposed
// convolution's): grad_input, grad_weight and grad_bias as correlate_transpose
// (correlate) and weight_grad compute them, in one pass over the samples where
// a backend can share work between the two (the CPU copies the gated output
// gradient once for both; CUDA adds the weight gradient's partial sums in the
// input gradient's launch).
struct ConvBackwardParams {
  Tensor grad_input;
  Tensor grad_weight;
  Tensor grad_bias;
  Tensor grad_output;
  OptTensor relu_output;
  Tensor weight;  // as the op takes it: [C_out, C_in, 3, 3], transposed [C_in, C_out, 3, 3]
  Tensor input;
  int64_t stride;
  bool nhwc;
  bool transposed;

  // The two kernels' work, for a backend that runs them one after the other.
  CorrelateParams input_grad() const {  // correlate (transposed), else correlate_transpose
    return {.out = grad_input,
            .input = grad_output,
            .input_gate = relu_output,
            .weight = weight,
            .bias = std::nullopt,
            .stride = stride,
            .relu = false,
            .nhwc = nhwc};
  }
  WeightGradParams weight_and_bias_grad() const {
    return {.grad_weight = grad_weight,
            .grad_bias = grad_bias,
            .small = transposed ? input : grad_output,
            .small_gate = transposed ? std::nullopt : relu_output,
            .large = transposed ? grad_output : input,
            .large_gate = transposed ? relu_output : std::nullopt,
            .stride = stride,
            .nhwc = nhwc,
            .grad_output_is_large = transposed};
  }
};

// out = max_pool2x2(input), ceil mode; with grad_output set, grad_input gets
// each window's gradient at its winner instead (max_pool_grad).
struct MaxPoolParams {
  Tensor out;
  Tensor input;
  bool nhwc;
};

struct MaxPoolGradParams {
  Tensor grad_input;
  Tensor grad_output;
  Tensor input;
  bool nhwc;
};

// The pool's winner code where no element takes the gradient (EncoderBlockParams::winners).
constexpr int kPoolNoWinner = 4;

// An encoder block's parameters as its fused kernels take them: w1 [C1, C0,
// 3, 3], w2 (and the strided block's w_down) [C1, C1, 3, 3], a bias each,
// contiguous.
struct EncoderBlockWeights {
  Tensor w1, b1, w2, b2;
  OptTensor w_down, b_down;

  // From the ops' lists: [w1, w2] or [w1, w2, w_down], and a bias per weight.
  static EncoderBlockWeights of(at::TensorList weights, at::TensorList biases) {
    const bool strided = weights.size() == 3;
    return {.w1 = weights[0].contiguous(),
            .b1 = biases[0].contiguous(),
            .w2 = weights[1].contiguous(),
            .b2 = biases[1].contiguous(),
            .w_down = strided ? OptTensor(weights[2].contiguous()) : std::nullopt,
            .b_down = strided ? OptTensor(biases[2].contiguous()) : std::nullopt};
  }
};

// An encoder block's forward (ops.h encoder_block) where a backend fuses it:
// a1 = act(b1 + correlate(input, w1)), a2 = act(b2 + correlate(a1, w2)), out
// = max_pool2x2(a2), or with w_down act(b_down + correlate_stride2(a2,
// w_down)). interior_a1/_a2, where given, receive a1 and a2 as well (the
// backward's recompute reads them); winners, where given (the pool), each
// window's winner code: 0 to 3, the element (row-major) whose gradient the
// output's is, or kPoolNoWinner where the ReLU there is closed. The kernel
// returns false for a shape it does not take; ops.h then composes the block
// from the per-op kernels.
struct EncoderBlockParams {
  Tensor out;
  OptTensor winners;
  OptTensor interior_a1;
  OptTensor interior_a2;
  Tensor input;
  EncoderBlockWeights weights;
  bool relu;
  bool nhwc;
};

// An encoder block's backward (ops.h encoder_block_backward) where a backend
// fuses it: with a1, a2 recomputed from `input`, grad_weights / grad_biases
// (w1, w2[, w_down] order) and, where given, grad_input get the gradients the
// composed backward computes. `output` is the strided block's output, its last
// ReLU's mask (with relu; absent otherwise); `winners` the pool's winner
// codes from the forward (EncoderBlockParams), where given: a2 is then not
// recomputed. False: nothing computed, the shape is not taken; ops.h then
// runs the composed backward.
struct EncoderBlockBackwardParams {
  OptTensor grad_input;
  std::vector<Tensor> grad_weights, grad_biases;
  Tensor grad_output;
  Tensor input;
  OptTensor output;
  OptTensor winners;
  EncoderBlockWeights weights;
  bool relu;
  bool nhwc;
};

// The autoencoder's loss computed inside a decoder block's kernels (ops.h
// decoder_block_loss): against target (the output's shape and layout, in the
// output's accumulation dtype: float32 for float16 and bfloat16), loss and
// rmse as SigmoidCrossEntropyParams has them, 0-d in that dtype. The
// backward's: the output's gradient is the loss's, from the saved logits,
// the target and grad_loss (0-d, on the device).
struct DecoderLossParams {
  Tensor target;
  Tensor loss;
  Tensor rmse;
};

struct DecoderLossGradParams {
  Tensor logits;
  Tensor target;
  Tensor grad_loss;
};

// A decoder block's forward (ops.h decoder_block) where a backend fuses it:
// weights[i] [C_i, C_i+1, 3, 3] a stride-2 transposed convolution with its
// bias and activation, the last a linear stride-1 one, whose output is
// center-cropped (corner as ops.h crop_corner) to out's height and width;
// and the loss of out where given. False for a shape the kernel does not
// take; ops.h then composes the block.
struct DecoderBlockParams {
  Tensor out;
  Tensor input;
  std::vector<Tensor> weights;  // contiguous
  std::vector<Tensor> biases;   // contiguous
  bool relu;
  bool nhwc;
  std::optional<DecoderLossParams> loss;
};

// The decoder block's backward (ops.h decoder_block_backward) where a backend
// fuses it: the hidden layers recomputed from input, then every weight's and
// bias's gradient (grad_weights, grad_biases: preallocated like weights and
// biases), and grad_input where given. The output's gradient: grad_output,
// plus the loss's where `loss` is given (grad_output may then be absent).
// False for a shape the kernel does not take; ops.h then runs the per-op
// chain.
struct DecoderBlockBackwardParams {
  OptTensor grad_input;
  std::vector<Tensor> grad_weights;
  std::vector<Tensor> grad_biases;
  OptTensor grad_output;  // [N, C_L, crop height, crop width]
  Tensor input;
  std::vector<Tensor> weights;  // contiguous
  std::vector<Tensor> biases;   // contiguous
  bool relu;
  bool nhwc;
  std::optional<DecoderLossGradParams> loss;
};

// The autoencoder's loss where a backend fuses it (ops.h
// sigmoid_cross_entropy): loss = the mean of the binary cross-entropy on
// logits, rmse = sqrt(mean((sigmoid(logits) - target)^2)), both 0-d; logits
// and target in one layout, any shape, at least one element. With grad:
// grad_logits = (sigmoid(logits) - target) * grad_loss / numel, grad_loss 0-d
// on the device. False: not fused here (ops.h composes it from ATen ops).
struct SigmoidCrossEntropyParams {
  Tensor loss;
  Tensor rmse;
  Tensor logits;
  Tensor target;
};

struct SigmoidCrossEntropyGradParams {
  Tensor grad_logits;
  Tensor grad_loss;
  Tensor logits;
  Tensor target;
};

// Adam's step over a list of parameters where a backend fuses it (ops.h
// adam_): torch.optim.Adam's update (amsgrad and maximize off, weight_decay
// added to the gradient), each parameter's step count incremented first, and
// the 2-norm of all the gradients (as read, before weight decay) into
// grad_norm. float32; each gradient and state tensor strided as its
// parameter, all dense; steps, lr and grad_norm 0-d on the parameters'
// device. False: not fused here (ops.h composes it from ATen's ops).
struct AdamParams {
  std::vector<Tensor> params;
  std::vector<Tensor> grads;
  std::vector<Tensor> exp_avgs;
  std::vector<Tensor> exp_avg_sqs;
  std::vector<Tensor> steps;
  Tensor lr;
  double beta1, beta2, eps, weight_decay;
  Tensor grad_norm;
};

}  // namespace cae

#define CAE_BACKEND_KERNELS                                  \
  static void correlate(const CorrelateParams& p);           \
  static void correlate_transpose(const CorrelateParams& p); \
  static void weight_grad(const WeightGradParams& p);        \
  static void bias_grad(const BiasGradParams& p);            \
  static void conv_backward(const ConvBackwardParams& p);    \
  static void max_pool(const MaxPoolParams& p);              \
  static void max_pool_grad(const MaxPoolGradParams& p);
