// 2x2 max-pool, stride 2, ceil mode, and its input gradient: the __global__
// kernels and torch-free launchers.
//
// One thread per output element (NCHW) or per output pixel and vector of
// channels (NHWC), grid-stride. The argmax is PyTorch's: the window in row-
// major order, the first maximum wins and a NaN (the last one) wins over
// everything. The backward recomputes it from the input and writes every
// element of the window (the gradient at the argmax, zero elsewhere): the
// windows tile the input, so each element has exactly one writer and no
// separate zero fill or atomics are needed.
#pragma once

#include <limits>

#include "common.cuh"

namespace cae {
namespace cuda {

template <typename T>
struct MaxPoolArgs {
  T* out;             // forward: output [N, C, H_out, W_out]; backward: grad_input [N, C, H, W]
  const T* x;         // input [N, C, H, W]
  const T* grad_out;  // backward: [N, C, H_out, W_out]; forward: nullptr
  int N, C, H, W, H_out, W_out;
};

// Window position k (0..3, row-major) beats the best so far?
template <typename Acc>
CAE_DEVICE bool takes_max(Acc v, Acc best) {
  return v > best || v != v;  // v != v: NaN
}

// NCHW: thread per output element. PAIRS: the two columns of a window row are
// one aligned vector (W even, input aligned).
template <typename T, typename Acc, bool BACKWARD, bool PAIRS>
__global__ void __launch_bounds__(kThreads) max_pool_nchw_kernel(MaxPoolArgs<T> a) {
  const index_t total = static_cast<index_t>(a.N) * a.C * a.H_out * a.W_out;
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * kThreads) {
    const int ox = static_cast<int>(i % a.W_out);
    const int oy = static_cast<int>(i / a.W_out % a.H_out);
    const index_t plane = i / (static_cast<index_t>(a.W_out) * a.H_out);
    const int iy = 2 * oy, ix = 2 * ox;
    const bool two_rows = iy + 1 < a.H, two_cols = ix + 1 < a.W;
    const index_t row0 = (plane * a.H + iy) * a.W + ix;
    const index_t row1 = row0 + a.W;
    T v[4];
    if (PAIRS) {
      const Vec<T, 2> r0 = *reinterpret_cast<const Vec<T, 2>*>(a.x + row0);
      v[0] = r0.v[0], v[1] = r0.v[1];
      if (two_rows) {
        const Vec<T, 2> r1 = *reinterpret_cast<const Vec<T, 2>*>(a.x + row1);
        v[2] = r1.v[0], v[3] = r1.v[1];
      }
    } else {
      v[0] = a.x[row0];
      if (two_cols) v[1] = a.x[row0 + 1];
      if (two_rows) {
        v[2] = a.x[row1];
        if (two_cols) v[3] = a.x[row1 + 1];
      }
    }
    // The winner kept as it is found: v[arg] would index the array at run
    // time, which puts it in local memory.
    int arg = 0;
    T winner = v[0];
    Acc best = -std::numeric_limits<Acc>::infinity();
    CAE_UNROLL
    for (int k = 0; k < 4; ++k) {
      const bool valid = (k < 2 || two_rows) && ((k & 1) == 0 || two_cols);
      if (valid && takes_max(static_cast<Acc>(v[k]), best)) {
        best = static_cast<Acc>(v[k]);
        arg = k;
        winner = v[k];
      }
    }
    if (!BACKWARD) {
      a.out[i] = winner;
    } else {
      const T go = a.grad_out[i];
      T g[4];
      CAE_UNROLL
      for (int k = 0; k < 4; ++k) g[k] = k == arg ? go : T(0);
      if (PAIRS) {
        *reinterpret_cast<Vec<T, 2>*>(a.out + row0) = Vec<T, 2>{{g[0], g[1]}};
        if (two_rows) *reinterpret_cast<Vec<T, 2>*>(a.out + row1) = Vec<T, 2>{{g[2], g[3]}};
      } else {
        a.out[row0] = g[0];
        if (two_cols) a.out[row0 + 1] = g[1];
        if (two_rows) {
          a.out[row1] = g[2];
          if (two_cols) a.out[row1 + 1] = g[3];
        }
      }
    }
  }
}

// NHWC: thread per output pixel and V consecutive channels, vector loads and
// stores (V > 1 needs C % V == 0 and aligned pointers).
template <typename T, typename Acc, bool BACKWARD, int V>
__global__ void __launch_bounds__(kThreads) max_pool_nhwc_kernel(MaxPoolArgs<T> a) {
  using VecT = Vec<T, V>;
  const int lanes = a.C / V;
  const index_t total = static_cast<index_t>(a.N) * a.H_out * a.W_out * lanes;
  for (index_t i = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x; i < total;
       i += static_cast<index_t>(gridDim.x) * kThreads) {
    const int c = static_cast<int>(i % lanes) * V;
    const index_t pixel = i / lanes;
    const int ox = static_cast<int>(pixel % a.W_out);
    const int oy = static_cast<int>(pixel / a.W_out % a.H_out);
    const index_t n = pixel / (static_cast<index_t>(a.W_out) * a.H_out);
    const int iy = 2 * oy, ix = 2 * ox;
    const bool two_rows = iy + 1 < a.H, two_cols = ix + 1 < a.W;
    index_t at[4];
    at[0] = ((n * a.H + iy) * a.W + ix) * a.C + c;
    at[1] = at[0] + a.C;
    at[2] = at[0] + static_cast<index_t>(a.W) * a.C;
    at[3] = at[2] + a.C;
    VecT v[4];
    bool valid[4];
    CAE_UNROLL
    for (int k = 0; k < 4; ++k) {
      valid[k] = (k < 2 || two_rows) && ((k & 1) == 0 || two_cols);
      if (valid[k]) v[k] = *reinterpret_cast<const VecT*>(a.x + at[k]);
    }
    int arg[V];
    VecT winner;  // kept as found: indexing v by arg would put v in local memory
    CAE_UNROLL
    for (int j = 0; j < V; ++j) {
      arg[j] = 0;
      winner.v[j] = v[0].v[j];
      Acc best = -std::numeric_limits<Acc>::infinity();
      CAE_UNROLL
      for (int k = 0; k < 4; ++k) {
        if (valid[k] && takes_max(static_cast<Acc>(v[k].v[j]), best)) {
          best = static_cast<Acc>(v[k].v[j]);
          arg[j] = k;
          winner.v[j] = v[k].v[j];
        }
      }
    }
    if (!BACKWARD) {
      *reinterpret_cast<VecT*>(a.out + pixel * a.C + c) = winner;
    } else {
      const VecT go = *reinterpret_cast<const VecT*>(a.grad_out + pixel * a.C + c);
      CAE_UNROLL
      for (int k = 0; k < 4; ++k) {
        if (!valid[k]) continue;
        VecT g;
        CAE_UNROLL
        for (int j = 0; j < V; ++j) g.v[j] = arg[j] == k ? go.v[j] : T(0);
        *reinterpret_cast<VecT*>(a.out + at[k]) = g;
      }
    }
  }
}

template <typename T, typename Acc, bool BACKWARD>
inline void launch_max_pool(const MaxPoolArgs<T>& a, bool nhwc, cudaStream_t stream) {
  if (nhwc) {
    constexpr int V = vec_width<T>();
    const bool vec = a.C % V == 0 && vector_ok<V>(a.x, a.C, a.C) && vector_ok<V>(a.out, a.C, a.C) &&
                     (a.grad_out == nullptr || vector_ok<V>(a.grad_out, a.C, a.C));
    const index_t items = static_cast<index_t>(a.N) * a.H_out * a.W_out * (vec ? a.C / V : a.C);
    if (vec) {
      const auto kernel = max_pool_nhwc_kernel<T, Acc, BACKWARD, V>;
      CAE_LAUNCH(kernel, flat_blocks(items), kThreads, 0, stream, a);
    } else {
      const auto kernel = max_pool_nhwc_kernel<T, Acc, BACKWARD, 1>;
      CAE_LAUNCH(kernel, flat_blocks(items), kThreads, 0, stream, a);
    }
  } else {
    // Pairs: rows start at even offsets (W even), so aligned inputs stay aligned.
    const bool pairs = a.W % 2 == 0 && vector_ok<2>(a.x, 2, 2) && (!BACKWARD || vector_ok<2>(a.out, 2, 2));
    const index_t items = static_cast<index_t>(a.N) * a.C * a.H_out * a.W_out;
    if (pairs) {
      const auto kernel = max_pool_nchw_kernel<T, Acc, BACKWARD, true>;
      CAE_LAUNCH(kernel, flat_blocks(items), kThreads, 0, stream, a);
    } else {
      const auto kernel = max_pool_nchw_kernel<T, Acc, BACKWARD, false>;
      CAE_LAUNCH(kernel, flat_blocks(items), kThreads, 0, stream, a);
    }
  }
}

}  // namespace cuda
}  // namespace cae
