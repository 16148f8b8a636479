// 2x2 max-pool with ceil_mode, and its input gradient. The gradient goes to
// the window's winner, recomputed from the input by the forward's own rule.
// Windows do not overlap and cover the input, so the backward writes every
// input element exactly once (the winner's gradient, zeros elsewhere).
#include <cmath>
#include <limits>

#include "gemm.h"

namespace cae {
namespace cpu {
namespace CAE_CPU_LEVEL {
namespace {

// Vectors of the pool: 32 bytes (8 float windows in the NCHW pass) where
// the level has them, else the level's own (4 with SSE2 or NEON).
constexpr int kPoolBytes = kVectorBytes < 32 ? kVectorBytes : 32;
constexpr int kPoolWindows = kVectorBytes < 32 ? 4 : 8;

// PyTorch's rule, scanning a window row by row: a later element wins if it
// is greater, or NaN (so the first maximum wins, and NaN propagates).
template <typename T>
inline bool beats(T v, T best) {
  return v > best || std::isnan(v);
}

// The rule on vectors of windows, candidates a, b, c, d: each lane's maximum
// and which candidate won, as masks instead of branches (GCC does not
// vectorize the scalar form), and so the gradient each candidate receives.
template <typename V>
struct Contest {
  using Mask = decltype(V{} > V{});
  V best;
  Mask won_b, won_c, won_d;

  Contest(V a, V b, V c, V d) {
    const auto beats = [](V v, V m) { return (v > m) | (v != v); };
    const Mask tb = beats(b, a);
    const V m_b = tb ? b : a;
    const Mask tc = beats(c, m_b);
    const V m_c = tc ? c : m_b;
    won_d = beats(d, m_c);
    best = won_d ? d : m_c;
    won_c = tc & ~won_d;
    won_b = tb & ~tc & ~won_d;
  }
  V to_a(V g) const { return (won_b | won_c | won_d) ? V{} : g; }
  V to_b(V g) const { return won_b ? g : V{}; }
  V to_c(V g) const { return won_c ? g : V{}; }
  V to_d(V g) const { return won_d ? g : V{}; }
};

// The channels of one NHWC window side by side: candidates a, b, c, d
// (row-major) of channel j at index j, its output at j.
template <typename T, bool Backward>
inline void full_windows(const T* const* in, T* const* grad, int64_t count, T* __restrict__ out,
                         const T* __restrict__ grad_out) {
  const T* __restrict__ a = in[0];
  const T* __restrict__ b = in[1];
  const T* __restrict__ c = in[2];
  const T* __restrict__ d = in[3];
  int64_t j = 0;
  using V = typename Vec<T, kPoolBytes>::type;
  constexpr int L = Vec<T, kPoolBytes>::lanes;
  for (; j + L <= count; j += L) {
    const Contest<V> won(load<V>(a + j), load<V>(b + j), load<V>(c + j), load<V>(d + j));
    if constexpr (Backward) {
      const V g = load<V>(grad_out + j);
      store(grad[0] + j, won.to_a(g));
      store(grad[1] + j, won.to_b(g));
      store(grad[2] + j, won.to_c(g));
      store(grad[3] + j, won.to_d(g));
    } else {
      store(out + j, won.best);
    }
  }
  for (; j < count; ++j) {
    T best = a[j];
    int winner = 0;
    if (beats(b[j], best)) best = b[j], winner = 1;
    if (beats(c[j], best)) best = c[j], winner = 2;
    if (beats(d[j], best)) best = d[j], winner = 3;
    if constexpr (Backward) {
      const T g = grad_out[j];
      for (int e = 0; e < 4; ++e) grad[e][j] = e == winner ? g : T(0);
    } else {
      out[j] = best;
    }
  }
}

// Candidates of kPoolWindows windows side by side: (lane i of) a, b, c and d
// from one row's 2 * kPoolWindows candidates, and the gradients interleaved
// back.
template <typename V2, size_t... I>
inline auto even_lanes(const V2& t, std::index_sequence<I...>) {
  return __builtin_shufflevector(t, t, (2 * I)...);
}

template <typename V2, size_t... I>
inline auto odd_lanes(const V2& t, std::index_sequence<I...>) {
  return __builtin_shufflevector(t, t, (2 * I + 1)...);
}

template <typename V, size_t... I>
inline auto interleave(const V& x, const V& y, std::index_sequence<I...>) {
  return __builtin_shufflevector(x, y, (I % 2 * sizeof...(I) / 2 + I / 2)...);
}

// One NCHW plane. Its even rows and odd rows are staged side by side, each
// padded with -inf to an even width and to whole vectors of windows (an odd
// edge's missing candidates then never win, NaN included), so that window k
// of the plane is (top[2k], top[2k + 1], bottom[2k], bottom[2k + 1]) for every
// k: one vectorized loop over the whole plane, the pairs split by shuffles.
template <typename T, bool Backward>
void pool_plane(const T* __restrict__ x, T* __restrict__ out, T* __restrict__ grad_in,
                const T* __restrict__ grad_out, int64_t H, int64_t W, T* __restrict__ scratch) {
  constexpr int64_t K = kPoolWindows;
  using V = typename Vec<T, K * sizeof(T)>::type;       // K windows
  using V2 = typename Vec<T, 2 * K * sizeof(T)>::type;  // their 2K candidates of one row
  const auto windows_of = std::make_index_sequence<K>{};
  const auto candidates_of = std::make_index_sequence<2 * K>{};
  const int64_t H_out = pool_output_size(H), W_out = pool_output_size(W);
  const int64_t windows = H_out * W_out, padded = (windows + K - 1) / K * K;
  T* top = scratch;
  T* bottom = scratch + 2 * padded;
  T* result = scratch + 4 * padded;  // forward: the maxima; backward: the gradients' copy
  std::fill(scratch, scratch + 4 * padded, -std::numeric_limits<T>::infinity());
  for (int64_t iy = 0; iy < H; ++iy)
    std::copy(x + iy * W, x + (iy + 1) * W, (iy % 2 ? bottom : top) + iy / 2 * 2 * W_out);
  if constexpr (Backward) std::copy(grad_out, grad_out + windows, result);
  for (int64_t k = 0; k < padded; k += K) {
    const V2 t = load<V2>(top + 2 * k), u = load<V2>(bottom + 2 * k);
    const Contest<V> won(even_lanes(t, windows_of), odd_lanes(t, windows_of), even_lanes(u, windows_of),
                         odd_lanes(u, windows_of));
    if constexpr (Backward) {  // interleaved back into the staged rows
      const V g = load<V>(result + k);
      const V ga = won.to_a(g), gb = won.to_b(g), gc = won.to_c(g), gd = won.to_d(g);
      store(top + 2 * k, V2(interleave(ga, gb, candidates_of)));
      store(bottom + 2 * k, V2(interleave(gc, gd, candidates_of)));
    } else {
      store(result + k, won.best);
    }
  }
  if constexpr (Backward) {
    for (int64_t iy = 0; iy < H; ++iy) {
      const T* row = (iy % 2 ? bottom : top) + iy / 2 * 2 * W_out;
      std::copy(row, row + W, grad_in + iy * W);
    }
  } else {
    std::copy(result, result + windows, out);
  }
}

// Forward (out) or backward (grad_in from grad_out) over all windows. NHWC:
// one task per output row, channels innermost, a partial window at an odd
// edge reading -inf (and writing a discarded gradient) for its missing
// candidates, so every window takes the same vectorized path; NCHW: one task
// per plane.
template <typename T, bool Backward>
void pool(const T* x, T* out, T* grad_in, const T* grad_out, int64_t N, int64_t C, int64_t H, int64_t W,
          bool nhwc) {
  const int64_t H_out = pool_output_size(H), W_out = pool_output_size(W);
  if (nhwc) {
    at::parallel_for(0, N * H_out, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> missing(C, -std::numeric_limits<T>::infinity()), discarded(C);
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / H_out, oy = row % H_out;
        for (int64_t ox = 0; ox < W_out; ++ox) {
          const T* in[4];
          T* grad[4];
          for (int e = 0; e < 4; ++e) {
            const int64_t iy = 2 * oy + e / 2, ix = 2 * ox + e % 2;
            const int64_t offset = ((n * H + iy) * W + ix) * C;
            const bool inside = iy < H && ix < W;
            in[e] = inside ? x + offset : missing.data();
            grad[e] = !Backward ? nullptr : inside ? grad_in + offset : discarded.data();
          }
          const int64_t o = (row * W_out + ox) * C;
          full_windows<T, Backward>(in, grad, C, Backward ? nullptr : out + o,
                                    Backward ? grad_out + o : nullptr);
        }
      }
    });
  } else {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      Scratch<T> scratch(5 * ((H_out * W_out + kPoolWindows - 1) / kPoolWindows * kPoolWindows));
      for (int64_t plane = begin; plane < end; ++plane) {
        pool_plane<T, Backward>(x + plane * H * W, Backward ? nullptr : out + plane * H_out * W_out,
                                Backward ? grad_in + plane * H * W : nullptr,
                                Backward ? grad_out + plane * H_out * W_out : nullptr, H, W, scratch.data());
      }
    });
  }
}

}  // namespace

void Kernels::max_pool(const MaxPoolParams& p) {
  const Tensor& x = p.input;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_max_pool_cpu", [&] {
    pool<scalar_t, false>(x.data_ptr<scalar_t>(), p.out.data_ptr<scalar_t>(), nullptr, nullptr, x.size(0),
                          x.size(1), x.size(2), x.size(3), p.nhwc);
  });
}

void Kernels::max_pool_grad(const MaxPoolGradParams& p) {
  const Tensor& x = p.input;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_max_pool_grad_cpu", [&] {
    pool<scalar_t, true>(x.data_ptr<scalar_t>(), nullptr, p.grad_input.data_ptr<scalar_t>(),
                         p.grad_output.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2), x.size(3),
                         p.nhwc);
  });
}

}  // namespace CAE_CPU_LEVEL
}  // namespace cpu
}  // namespace cae
