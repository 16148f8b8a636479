// A convolution's or a transposed convolution's whole backward in one pass
// over the samples (ConvBackwardParams): per sample the gated output gradient
// is padded once, and that copy is both the input gradient's operand and the
// weight gradient's, instead of each kernel reading the gradient and its ReLU
// mask again.
#include "gemm.h"
#include "window.h"

namespace cae {
namespace cpu {
namespace CAE_CPU_LEVEL {
namespace {

// Sizes of one op's tensors: g the output gradient, x the input.
struct BackwardSizes {
  int64_t N, C_in, H, W, C_out, H_out, W_out;
  explicit BackwardSizes(const ConvBackwardParams& p)
      : N(p.input.size(0)),
        C_in(p.input.size(1)),
        H(p.input.size(2)),
        W(p.input.size(3)),
        C_out(p.grad_output.size(1)),
        H_out(p.grad_output.size(2)),
        W_out(p.grad_output.size(3)) {}
};

// Transposed convolution: g is the large side, and the weight gradient reads
// it through the very windows the input gradient's correlation does, so one
// padded copy of gate(g) serves both (and the bias sum).
template <typename T, bool Gated>
void transposed_backward(const ConvBackwardParams& p) {
  const BackwardSizes s(p);
  const T *g = p.grad_output.data_ptr<T>(), *gate = data_or_null<T>(p.relu_output),
          *x = p.input.data_ptr<T>();
  T* grad_input = p.grad_input.data_ptr<T>();
  const Windows win(s.C_out, s.H_out, s.W_out, p.stride, s.H, s.W, p.nhwc);
  const CorrelatePlan<T> input_grad(win, p.weight.data_ptr<T>(),
                                    s.C_in);  // weight [C_in, C_out]: as correlate reads it
  WeightGradSums<T> sums(win, s.N, s.C_in, /*grad_output_is_large=*/true);
  struct Buffers {
    Scratch<T> g_copy, result, x_by_position;
  };
  sums.for_each_sample(
      s.N,
      [&] {
        return Buffers{Scratch<T>(win.buffer_size()), Scratch<T>(input_grad.result_size()),
                       Scratch<T>(sums.P * s.C_in + kReadPast)};
      },
      [&](Buffers& b, int64_t chunk, int64_t n) {
        const int64_t g_offset = n * s.C_out * s.H_out * s.W_out, x_offset = n * s.C_in * s.H * s.W;
        pad_sample<T, Gated>(g + g_offset, gate ? gate + g_offset : nullptr, win, b.g_copy.data());
        input_grad.run(b.g_copy.data(), b.result.data(), grad_input + x_offset, nullptr, false);
        positions_by_channel<T, false>(x + x_offset, nullptr, s.C_in, win, b.x_by_position.data());
        sums.add(chunk, b.x_by_position.data(), b.g_copy.data());
      });
  sums.write(p.grad_weight.data_ptr<T>(), p.grad_bias.data_ptr<T>());
}

// Convolution, NHWC: g is the small side. Its copy padded at stride 1 (row
// a + 1, column b + 1 holding g[a][b]) is the input gradient's operand; read
// from one row and one column further on, it is g as [position][channel] over
// a grid as wide, which is the weight gradient's other operand once its
// windows are widened to that grid (min_Wq): the scratch columns then read
// the copy's zero padding.
template <typename T, bool Gated, class InputGradPlan>
void conv_nhwc_backward(const ConvBackwardParams& p, const InputGradPlan& input_grad) {
  const BackwardSizes s(p);
  const T *g = p.grad_output.data_ptr<T>(), *gate = data_or_null<T>(p.relu_output),
          *x = p.input.data_ptr<T>();
  T* grad_input = p.grad_input.data_ptr<T>();
  const Windows& g_win = input_grad.win;
  WeightGradSums<T> sums(Windows(s.C_in, s.H, s.W, p.stride, s.H_out, s.W_out, true, g_win.Wq), s.N, s.C_out,
                         /*grad_output_is_large=*/false);
  TORCH_INTERNAL_ASSERT(sums.win.Wq == g_win.Wq && g_win.stride == 1 && g_win.nhwc);
  const int64_t g_by_position = (g_win.Wq + 1) * s.C_out;
  struct Buffers {
    Scratch<T> g_copy, result, x_copy;
  };
  sums.for_each_sample(
      s.N,
      [&] {
        return Buffers{Scratch<T>(g_win.buffer_size()), Scratch<T>(input_grad.result_size()),
                       Scratch<T>(sums.win.buffer_size())};
      },
      [&](Buffers& b, int64_t chunk, int64_t n) {
        const int64_t g_offset = n * s.C_out * s.H_out * s.W_out, x_offset = n * s.C_in * s.H * s.W;
        pad_sample<T, Gated>(g + g_offset, gate ? gate + g_offset : nullptr, g_win, b.g_copy.data());
        input_grad.run(b.g_copy.data(), b.result.data(), grad_input + x_offset, nullptr, false);
        pad_sample<T, false>(x + x_offset, nullptr, sums.win, b.x_copy.data());
        sums.add(chunk, b.g_copy.data() + g_by_position, b.x_copy.data());
      });
  sums.write(p.grad_weight.data_ptr<T>(), p.grad_bias.data_ptr<T>());
}

}  // namespace

void Kernels::conv_backward(const ConvBackwardParams& p) {
  if (!p.transposed && !p.nhwc) {
    // NCHW: the input gradient pads g channel by channel, the weight gradient
    // wants it position by position; nothing to share, so the two kernels.
    correlate_transpose(p.input_grad());
    weight_grad(p.weight_and_bias_grad());
    return;
  }
  AT_DISPATCH_FLOATING_TYPES(p.input.scalar_type(), "cae_conv_backward_cpu", [&] {
    with_gate(p.relu_output, [&](auto gated) {
      constexpr bool Gated = decltype(gated)::value;
      if (p.transposed) return transposed_backward<scalar_t, Gated>(p);
      const BackwardSizes s(p);
      if (p.stride == 1) {
        // The input gradient at stride 1, as correlate_transpose computes it.
        const Tensor flipped = flipped_kernel(p.weight);
        const CorrelatePlan<scalar_t> plan(Windows(s.C_out, s.H_out, s.W_out, 1, s.H, s.W, true),
                                           flipped.data_ptr<scalar_t>(), s.C_in);
        return conv_nhwc_backward<scalar_t, Gated>(p, plan);
      }
      const TransposePlan<scalar_t> plan(p.weight.data_ptr<scalar_t>(), true, s.C_out, s.H_out, s.W_out,
                                         s.C_in, s.H, s.W);
      conv_nhwc_backward<scalar_t, Gated>(p, plan);
    });
  });
}

}  // namespace CAE_CPU_LEVEL
}  // namespace cpu
}  // namespace cae
