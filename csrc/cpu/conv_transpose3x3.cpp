// 3x3 transposed correlation: the transposed convolution's forward and the
// convolution's input gradient. out is the large side [N, C_b, H, W], g the
// small (strided) side [N, C_a, H_a, W_a], w [C_a, C_b, 3, 3].
#include "kernels.h"

namespace cae {
namespace cpu {
namespace {

template <typename T, bool Gated>
void correlate_transpose_nchw(T* out, const T* g, const T* g_gate, const T* w,
                              const T* bias, int64_t stride, bool apply_relu,
                              int64_t N, int64_t C_a, int64_t H_a, int64_t W_a,
                              int64_t C_b, int64_t H, int64_t W) {
  const int64_t plane = H * W, plane_a = H_a * W_a;
  // Each task owns one output plane and scatters into it: no write races.
  at::parallel_for(0, N * C_b, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C_b, cb = nc % C_b;
      T* o = out + nc * plane;
      std::fill(o, o + plane, bias ? bias[cb] : T(0));
      for (int64_t ca = 0; ca < C_a; ++ca) {
        const int64_t g_offset = (n * C_a + ca) * plane_a;
        const T* wk = w + (ca * C_b + cb) * 9;
        for (int64_t ky = 0; ky < 3; ++ky) {
          const auto [oy_lo, oy_hi] = tap_range(ky, stride, H, H_a);
          for (int64_t kx = 0; kx < 3; ++kx) {
            const auto [ox_lo, ox_hi] = tap_range(kx, stride, W, W_a);
            const T wv = wk[ky * 3 + kx];
            for (int64_t oy = oy_lo; oy < oy_hi; ++oy) {
              const int64_t grow = g_offset + oy * W_a;
              T* orow = o + (stride * oy + ky - 1) * W + kx - 1;
              for (int64_t ox = ox_lo; ox < ox_hi; ++ox) {
                orow[stride * ox] += wv * gate<Gated>(g[grow + ox], g_gate, grow + ox);
              }
            }
          }
        }
      }
      if (apply_relu) {
        for (int64_t i = 0; i < plane; ++i) o[i] = relu(o[i]);
      }
    }
  });
}

template <typename T, bool Gated>
void correlate_transpose_nhwc(T* out, const T* g, const T* g_gate, const T* w,
                              const T* bias, int64_t stride, bool apply_relu,
                              int64_t N, int64_t C_a, int64_t H_a, int64_t W_a,
                              int64_t C_b, int64_t H, int64_t W) {
  // w as [C_a][C_b][k] already has C_b innermost per (k, ca) after a
  // transpose to [k][ca][cb].
  std::vector<T> wt(9 * C_a * C_b);
  for (int64_t ca = 0; ca < C_a; ++ca)
    for (int64_t cb = 0; cb < C_b; ++cb)
      for (int64_t k = 0; k < 9; ++k)
        wt[(k * C_a + ca) * C_b + cb] = w[(ca * C_b + cb) * 9 + k];
  // Each task gathers the taps that land on its own output row.
  at::parallel_for(0, N * H, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H, iy = row % H;
      for (int64_t ix = 0; ix < W; ++ix) {
        T* o = out + (row * W + ix) * C_b;
        for (int64_t cb = 0; cb < C_b; ++cb) o[cb] = bias ? bias[cb] : T(0);
        for (int64_t ky = 0; ky < 3; ++ky) {
          const int64_t sy = iy + 1 - ky;  // = stride * oy
          if (sy < 0 || sy % stride != 0 || sy / stride >= H_a) continue;
          const int64_t oy = sy / stride;
          for (int64_t kx = 0; kx < 3; ++kx) {
            const int64_t sx = ix + 1 - kx;
            if (sx < 0 || sx % stride != 0 || sx / stride >= W_a) continue;
            const int64_t pixel = ((n * H_a + oy) * W_a + sx / stride) * C_a;
            const T* wk = wt.data() + (ky * 3 + kx) * C_a * C_b;
            for (int64_t ca = 0; ca < C_a; ++ca) {
              const T v = gate<Gated>(g[pixel + ca], g_gate, pixel + ca);
              const T* wrow = wk + ca * C_b;
              for (int64_t cb = 0; cb < C_b; ++cb) o[cb] += v * wrow[cb];
            }
          }
        }
        if (apply_relu) {
          for (int64_t cb = 0; cb < C_b; ++cb) o[cb] = relu(o[cb]);
        }
      }
    }
  });
}

}  // namespace
}  // namespace cpu

void CpuKernels::correlate_transpose(const Tensor& out, const Tensor& g,
                                     const OptTensor& g_gate, const Tensor& w,
                                     const OptTensor& bias, int64_t stride,
                                     bool relu, bool nhwc) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cae_correlate_transpose_cpu", [&] {
    cpu::with_gate(g_gate, [&](auto gated) {
      auto kernel = nhwc ? cpu::correlate_transpose_nhwc<scalar_t, decltype(gated)::value>
                         : cpu::correlate_transpose_nchw<scalar_t, decltype(gated)::value>;
      kernel(out.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
             cpu::data_or_null<scalar_t>(g_gate), w.data_ptr<scalar_t>(),
             cpu::data_or_null<scalar_t>(bias), stride, relu, g.size(0),
             g.size(1), g.size(2), g.size(3), out.size(1), out.size(2),
             out.size(3));
    });
  });
}

}  // namespace cae
