// 2x2 max-pool with ceil_mode, and its input gradient. The gradient goes to
// the window's winner, recomputed from the input by the forward's own rule.
// Windows do not overlap and cover the input, so the backward writes every
// input element exactly once (the winner's gradient, zeros elsewhere).
#include <cmath>

#include "kernels.h"

namespace cae {
namespace cpu {
namespace {

// PyTorch's rule, scanning a window row by row: a later element wins if it
// is greater, or NaN (so the first maximum wins, and NaN propagates).
template <typename T>
inline bool beats(T v, T best) {
  return v > best || std::isnan(v);
}

// One window: in[i] for its `count` elements (row-major), their gradient
// slots grad[i]; channel_step is the distance between neighbouring channels'
// windows (out_step between their outputs).
template <typename T, bool Backward>
inline void pool_window(const T* const* in, T* const* grad, int count, int64_t channels,
                        int64_t channel_step, T* out, const T* grad_out, int64_t out_step) {
  if (count == 4) {  // the common case: a branch-free loop over channels
    const T *a = in[0], *b = in[1], *c = in[2], *d = in[3];
    for (int64_t ch = 0; ch < channels; ++ch) {
      const int64_t i = ch * channel_step;
      T best = a[i];
      int winner = 0;
      if (beats(b[i], best)) best = b[i], winner = 1;
      if (beats(c[i], best)) best = c[i], winner = 2;
      if (beats(d[i], best)) best = d[i], winner = 3;
      if constexpr (Backward) {
        const T g = grad_out[ch * out_step];
        grad[0][i] = winner == 0 ? g : T(0);
        grad[1][i] = winner == 1 ? g : T(0);
        grad[2][i] = winner == 2 ? g : T(0);
        grad[3][i] = winner == 3 ? g : T(0);
      } else {
        out[ch * out_step] = best;
      }
    }
    return;
  }
  for (int64_t ch = 0; ch < channels; ++ch) {
    const int64_t i = ch * channel_step;
    T best = in[0][i];
    int winner = 0;
    for (int e = 1; e < count; ++e) {
      if (beats(in[e][i], best)) best = in[e][i], winner = e;
    }
    if constexpr (Backward) {
      for (int e = 0; e < count; ++e) grad[e][i] = e == winner ? grad_out[ch * out_step] : T(0);
    } else {
      out[ch * out_step] = best;
    }
  }
}

// Forward (out) or backward (grad_in from grad_out) over all windows. NHWC:
// one task per output row, channels innermost; NCHW: one per plane.
template <typename T, bool Backward>
void pool(const T* x, T* out, T* grad_in, const T* grad_out, int64_t N, int64_t C, int64_t H,
          int64_t W, bool nhwc) {
  const int64_t H_out = pool_output_size(H), W_out = pool_output_size(W);
  const int64_t sc = nhwc ? 1 : H * W, sh = nhwc ? W * C : W, sw = nhwc ? C : 1;
  const int64_t osc = nhwc ? 1 : H_out * W_out, osh = nhwc ? W_out * C : W_out, osw = nhwc ? C : 1;
  auto window = [&](int64_t n, int64_t c0, int64_t channels, int64_t oy, int64_t ox) {
    const T* in[4];
    T* grad[4];
    int count = 0;
    for (int64_t iy = 2 * oy; iy < std::min(2 * oy + 2, H); ++iy) {
      for (int64_t ix = 2 * ox; ix < std::min(2 * ox + 2, W); ++ix) {
        const int64_t offset = n * C * H * W + c0 * sc + iy * sh + ix * sw;
        in[count] = x + offset;
        grad[count++] = Backward ? grad_in + offset : nullptr;
      }
    }
    const int64_t o = n * C * H_out * W_out + c0 * osc + oy * osh + ox * osw;
    pool_window<T, Backward>(in, grad, count, channels, sc, Backward ? nullptr : out + o,
                             Backward ? grad_out + o : nullptr, osc);
  };
  if (nhwc) {
    at::parallel_for(0, N * H_out, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row)
        for (int64_t ox = 0; ox < W_out; ++ox) window(row / H_out, 0, C, row % H_out, ox);
    });
  } else {
    // A row of windows of one plane is vectorized like NHWC's channels: the
    // "channel" step is then the window width, 2.
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const T* x_plane = x + plane * H * W;
        for (int64_t oy = 0; oy < H_out; ++oy) {
          const T* in[4];
          T* grad[4];
          int count = 0;
          for (int64_t iy = 2 * oy; iy < std::min(2 * oy + 2, H); ++iy) {
            for (int64_t dx = 0; dx < 2; ++dx) {
              in[count] = x_plane + iy * W + dx;
              grad[count++] = Backward ? grad_in + plane * H * W + iy * W + dx : nullptr;
            }
          }
          const int64_t o = plane * H_out * W_out + oy * W_out;
          pool_window<T, Backward>(in, grad, count, W / 2, 2, Backward ? nullptr : out + o,
                                   Backward ? grad_out + o : nullptr, 1);
          if (W % 2) window(plane / C, plane % C, 1, oy, W_out - 1);
        }
      }
    });
  }
}

}  // namespace
}  // namespace cpu

void CpuKernels::max_pool(const Tensor& out, const Tensor& x, bool nhwc) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_max_pool_cpu", [&] {
    cpu::pool<scalar_t, false>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), nullptr, nullptr,
                               x.size(0), x.size(1), x.size(2), x.size(3), nhwc);
  });
}

void CpuKernels::max_pool_grad(const Tensor& grad_input, const Tensor& grad_output,
                               const Tensor& x, bool nhwc) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_max_pool_grad_cpu", [&] {
    cpu::pool<scalar_t, true>(x.data_ptr<scalar_t>(), nullptr, grad_input.data_ptr<scalar_t>(),
                              grad_output.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2),
                              x.size(3), nhwc);
  });
}

}  // namespace cae
