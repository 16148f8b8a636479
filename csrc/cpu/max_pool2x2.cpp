// 2x2 max-pool with ceil_mode, and its input gradient. The gradient goes to
// the window's winner, recomputed from the input by the forward's own rule.
// Windows do not overlap and cover the input, so the backward writes every
// input element exactly once (the winner's gradient, zeros elsewhere).
#include <cmath>

#include "gemm.h"
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

// The rule on whole vectors: masks instead of branches (GCC does not
// vectorize the scalar form of the backward).
template <typename V>
inline auto beats_lanes(V v, V best) {
  return (v > best) | (v != v);
}

// `count` full windows side by side: candidates a, b, c, d (row-major) of
// window j at index j * Step (Step 1: NHWC channels; 2: an NCHW row), its
// output at j.
template <typename T, bool Backward, int Step>
inline void full_windows(const T* const* in, T* const* grad, int64_t count, T* __restrict__ out,
                         const T* __restrict__ grad_out) {
  const T* __restrict__ a = in[0];
  const T* __restrict__ b = in[1];
  const T* __restrict__ c = in[2];
  const T* __restrict__ d = in[3];
  int64_t j = 0;
  if constexpr (Backward && Step == 1) {
    using V = typename Vec<T, 32>::type;
    constexpr int L = Vec<T, 32>::lanes;
    for (; j + L <= count; j += L) {
      const V va = load<V>(a + j), vb = load<V>(b + j), vc = load<V>(c + j), vd = load<V>(d + j);
      const auto tb = beats_lanes(vb, va);
      const V m_b = tb ? vb : va;
      const auto tc = beats_lanes(vc, m_b);
      const V m_c = tc ? vc : m_b;
      const auto td = beats_lanes(vd, m_c);
      const V g = load<V>(grad_out + j), zero = V{};
      store(grad[3] + j, td ? g : zero);
      store(grad[2] + j, (tc & ~td) ? g : zero);
      store(grad[1] + j, (tb & ~tc & ~td) ? g : zero);
      store(grad[0] + j, (tb | tc | td) ? zero : g);
    }
  }
  for (; j < count; ++j) {
    const int64_t i = j * Step;
    T best = a[i];
    int winner = 0;
    if (beats(b[i], best)) best = b[i], winner = 1;
    if (beats(c[i], best)) best = c[i], winner = 2;
    if (beats(d[i], best)) best = d[i], winner = 3;
    if constexpr (Backward) {
      const T g = grad_out[j];
      for (int e = 0; e < 4; ++e) grad[e][i] = e == winner ? g : T(0);
    } else {
      out[j] = best;
    }
  }
}

// Any window (a partial one at an odd edge too): in[e] for its `count`
// elements, grad[e] their gradient slots; `channels` channels channel_step
// apart, their outputs out_step apart.
template <typename T, bool Backward>
void any_window(const T* const* in, T* const* grad, int count, int64_t channels,
                int64_t channel_step, T* out, const T* grad_out, int64_t out_step) {
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
    any_window<T, Backward>(in, grad, count, channels, sc, Backward ? nullptr : out + o,
                            Backward ? grad_out + o : nullptr, osc);
  };
  if (nhwc) {
    at::parallel_for(0, N * H_out, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / H_out, oy = row % H_out;
        if (2 * oy + 1 >= H) {  // the last row of an odd height: partial windows
          for (int64_t ox = 0; ox < W_out; ++ox) window(n, 0, C, oy, ox);
          continue;
        }
        const int64_t top = (n * H + 2 * oy) * W * C, o = row * W_out * C;
        for (int64_t ox = 0; ox < W / 2; ++ox) {
          const int64_t i = top + 2 * ox * C;
          const T* in[4] = {x + i, x + i + C, x + i + W * C, x + i + W * C + C};
          T* grad[4] = {};
          if (Backward) {
            for (int e = 0; e < 4; ++e) grad[e] = grad_in + (in[e] - x);
          }
          full_windows<T, Backward, 1>(in, grad, C, Backward ? nullptr : out + o + ox * C,
                                       Backward ? grad_out + o + ox * C : nullptr);
        }
        if (W % 2) window(n, 0, C, oy, W_out - 1);
      }
    });
  } else {
    // A row of windows of one plane is vectorized like NHWC's channels: the
    // "channel" step is then the window width, 2.
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      std::vector<T> split;
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
          if (count == 4 && Backward) {
            // Split the two rows into even and odd columns and run the
            // vectorized channel-style loop on those runs.
            const int64_t half = W / 2;
            split.resize(8 * half);
            const T* split_in[4];
            T* split_grad[4];
            for (int e = 0; e < 4; ++e) {
              T* run = split.data() + e * half;
              for (int64_t j = 0; j < half; ++j) run[j] = in[e][2 * j];
              split_in[e] = run;
              split_grad[e] = split.data() + (4 + e) * half;
            }
            full_windows<T, Backward, 1>(split_in, split_grad, half, nullptr, grad_out + o);
            for (int e = 0; e < 4; ++e)
              for (int64_t j = 0; j < half; ++j) grad[e][2 * j] = split_grad[e][j];
          } else if (count == 4) {
            full_windows<T, Backward, 2>(in, grad, W / 2, Backward ? nullptr : out + o,
                                         Backward ? grad_out + o : nullptr);
          } else {
            any_window<T, Backward>(in, grad, count, W / 2, 2, Backward ? nullptr : out + o,
                                    Backward ? grad_out + o : nullptr, 1);
          }
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
