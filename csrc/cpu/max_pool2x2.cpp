// 2x2 max-pool with ceil_mode, and its input gradient. The gradient goes to
// the window's argmax, recomputed from the input by the forward's own rule.
#include <cmath>
#include <limits>

#include "kernels.h"

namespace cae {
namespace cpu {
namespace {

// PyTorch's rule: the first maximum wins, and a NaN (the last one) wins over
// everything, so NaN propagates. Returns the offset of the winner.
template <typename T>
inline int64_t window_argmax(const T* x, int64_t iy0, int64_t ix0, int64_t H,
                             int64_t W, int64_t row_step, int64_t col_step) {
  T best = -std::numeric_limits<T>::infinity();
  int64_t best_offset = iy0 * row_step + ix0 * col_step;
  for (int64_t iy = iy0; iy < std::min(iy0 + 2, H); ++iy) {
    for (int64_t ix = ix0; ix < std::min(ix0 + 2, W); ++ix) {
      const int64_t offset = iy * row_step + ix * col_step;
      const T v = x[offset];
      if (v > best || std::isnan(v)) {
        best = v;
        best_offset = offset;
      }
    }
  }
  return best_offset;
}

// Calls visit(input_offset, output_offset) for every output element, with
// the argmax of its window. NCHW: one task per plane; NHWC: one per row.
template <typename T, class Visit>
void for_each_window(const T* x, int64_t N, int64_t C, int64_t H, int64_t W,
                     bool nhwc, const Visit& visit) {
  const int64_t H_out = pool_output_size(H), W_out = pool_output_size(W);
  if (nhwc) {
    at::parallel_for(0, N * H_out, 1, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const int64_t n = row / H_out, oy = row % H_out;
        for (int64_t ox = 0; ox < W_out; ++ox) {
          const int64_t in_base = n * H * W * C, out_base = (row * W_out + ox) * C;
          for (int64_t c = 0; c < C; ++c) {
            visit(in_base + c + window_argmax(x + in_base + c, 2 * oy, 2 * ox, H, W, W * C, C),
                  out_base + c);
          }
        }
      }
    });
  } else {
    at::parallel_for(0, N * C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) {
        const int64_t in_base = plane * H * W;
        for (int64_t oy = 0; oy < H_out; ++oy) {
          for (int64_t ox = 0; ox < W_out; ++ox) {
            visit(in_base + window_argmax(x + in_base, 2 * oy, 2 * ox, H, W, W, 1),
                  (plane * H_out + oy) * W_out + ox);
          }
        }
      }
    });
  }
}

}  // namespace
}  // namespace cpu

void CpuKernels::max_pool(const Tensor& out, const Tensor& x, bool nhwc) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_max_pool_cpu", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* o = out.data_ptr<scalar_t>();
    cpu::for_each_window(in, x.size(0), x.size(1), x.size(2), x.size(3), nhwc,
                         [&](int64_t i, int64_t j) { o[j] = in[i]; });
  });
}

void CpuKernels::max_pool_grad(const Tensor& grad_input, const Tensor& grad_output,
                               const Tensor& x, bool nhwc) {
  grad_input.zero_();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_max_pool_grad_cpu", [&] {
    const scalar_t* go = grad_output.data_ptr<scalar_t>();
    scalar_t* gi = grad_input.data_ptr<scalar_t>();
    // Windows do not overlap, so each input element has at most one writer.
    cpu::for_each_window(x.data_ptr<scalar_t>(), x.size(0), x.size(1), x.size(2),
                         x.size(3), nhwc,
                         [&](int64_t i, int64_t j) { gi[i] = go[j]; });
  });
}

}  // namespace cae
