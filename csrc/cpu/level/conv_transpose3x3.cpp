// 3x3 transposed correlation: the transposed convolution's forward and the
// convolution's input gradient. out is the large side [N, C_b, H, W], g the
// small (strided) side [N, C_a, H_a, W_a], w [C_a, C_b, 3, 3].
#include "gemm.h"
#include "window.h"

namespace cae {
namespace cpu {
namespace CAE_CPU_LEVEL {
namespace {

// Stride 2, one sample at a time: each of the four output phases (row and
// column parity) is a correlation of the padded input with the taps that
// land on it (1, 2 or 4 of the 9), one matrix product per phase. The plan is
// the part shared by every sample; its padded copy is g's at stride 1, buffer
// row a + 1 holding g[a].
template <typename T>
struct TransposePlan {
  struct Phase {
    int64_t ry, rx, K;
    std::vector<int64_t> a_rows, a_cols, b_rows;
    ProductShape shape;
  };
  Windows win;
  const T* w;
  int64_t C_b, H, W, P;
  std::vector<Phase> phases;
  Scratch<T> w_nhwc;  // [tap][ca][cb]

  // g [C_a, H_a, W_a] -> out [C_b, H, W], w [C_a, C_b, 3, 3].
  TransposePlan(const T* weight, bool nhwc, int64_t C_a, int64_t H_a, int64_t W_a, int64_t C_b_, int64_t H_,
                int64_t W_)
      : win(C_a, H_a, W_a, 1, H_a, W_a, nhwc), w(weight), C_b(C_b_), H(H_), W(W_), P(win.positions()) {
    if (nhwc) {
      w_nhwc.resize(9 * C_a * C_b + kReadPast);
      for (int64_t ca = 0; ca < C_a; ++ca)
        for (int64_t cb = 0; cb < C_b; ++cb)
          for (int64_t t = 0; t < 9; ++t) w_nhwc[(t * C_a + ca) * C_b + cb] = w[(ca * C_b + cb) * 9 + t];
    }
    for (int64_t ry = 0; ry < 2; ++ry) {
      for (int64_t rx = 0; rx < 2; ++rx) {
        Phase phase{ry, rx, 0, {}, {}, {}, {}};
        // Output row 2a + ry takes tap ky from input row a + (ry + 1 - ky) / 2.
        for (int64_t ky = 0; ky < 3; ++ky) {
          if ((ry + 1 - ky) % 2 != 0) continue;
          for (int64_t kx = 0; kx < 3; ++kx) {
            if ((rx + 1 - kx) % 2 != 0) continue;
            const int64_t dy = 1 + (ry + 1 - ky) / 2, dx = 1 + (rx + 1 - kx) / 2, t = ky * 3 + kx;
            for (int64_t ca = 0; ca < C_a; ++ca) {
              if (nhwc) {
                phase.a_cols.push_back(win.tap_offset(ca, dy, dx));
                phase.b_rows.push_back((t * C_a + ca) * C_b);
              } else {
                phase.a_cols.push_back(ca * C_b * 9 + t);
                phase.b_rows.push_back(win.tap_offset(ca, dy, dx));
              }
            }
          }
        }
        phase.K = static_cast<int64_t>(phase.a_cols.size());
        phase.a_rows = nhwc ? arange(P, C_a) : arange(C_b, 9);
        phase.shape = product_shape<T>(nhwc ? P : C_b, phase.K, {w, phase.a_rows.data(), phase.a_cols.data()},
                                       {nullptr, phase.b_rows.data(), nullptr});
        phases.push_back(std::move(phase));
      }
    }
  }

  size_t result_size() const { return P * C_b; }

  // One output sample from the padded copy of its input; result is scratch
  // of result_size().
  void run(const T* buffer, T* result, T* out, const T* bias, bool relu) const {
    for (const Phase& ph : phases) {
      if (win.nhwc) {
        gemm<T>(P, C_b, ph.K, {buffer, ph.a_rows.data(), ph.a_cols.data()},
                {w_nhwc.data(), ph.b_rows.data(), nullptr}, result, C_b, false, ph.shape);
      } else {
        gemm<T>(C_b, P, ph.K, {w, ph.a_rows.data(), ph.a_cols.data()}, {buffer, ph.b_rows.data(), nullptr},
                result, P, false, ph.shape);
      }
      store_result<T>({.result = result,
                       .rows = win.H,
                       .cols = win.W,
                       .Wq = win.Wq,
                       .C = C_b,
                       .nhwc = win.nhwc,
                       .out = out,
                       .H = H,
                       .W = W,
                       .step = 2,
                       .ry = ph.ry,
                       .rx = ph.rx,
                       .bias = bias,
                       .relu = relu});
    }
  }
};

template <typename T, bool Gated>
void correlate_transpose_impl(T* out, const T* g, const T* g_gate, const T* w, const T* bias, bool apply_relu,
                              bool nhwc, int64_t N, int64_t C_a, int64_t H_a, int64_t W_a, int64_t C_b,
                              int64_t H, int64_t W) {
  const TransposePlan<T> plan(w, nhwc, C_a, H_a, W_a, C_b, H, W);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> buffer(plan.win.buffer_size()), result(plan.result_size());
    for (int64_t n = begin; n < end; ++n) {
      const int64_t offset = n * C_a * H_a * W_a;
      pad_sample<T, Gated>(g + offset, g_gate ? g_gate + offset : nullptr, plan.win, buffer.data());
      plan.run(buffer.data(), result.data(), out + n * C_b * H * W, bias, apply_relu);
    }
  });
}

// With stride 1 the transposed correlation is a correlation with the kernel
// flipped and its channel roles swapped: that kernel, [C_b, C_a, 3, 3].
Tensor flipped_kernel(const Tensor& weight) { return weight.flip({2, 3}).transpose(0, 1).contiguous(); }

}  // namespace

void Kernels::correlate_transpose(const CorrelateParams& p) {
  if (p.stride == 1) {
    CorrelateParams flipped = p;
    flipped.weight = flipped_kernel(p.weight);
    correlate(flipped);
    return;
  }
  const Tensor &g = p.input, &out = p.out;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cae_correlate_transpose_cpu", [&] {
    with_gate(p.input_gate, [&](auto gated) {
      correlate_transpose_impl<scalar_t, decltype(gated)::value>(
          out.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), data_or_null<scalar_t>(p.input_gate),
          p.weight.data_ptr<scalar_t>(), data_or_null<scalar_t>(p.bias), p.relu, p.nhwc, g.size(0), g.size(1),
          g.size(2), g.size(3), out.size(1), out.size(2), out.size(3));
    });
  });
}

}  // namespace CAE_CPU_LEVEL
}  // namespace cpu
}  // namespace cae
