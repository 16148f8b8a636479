// 3x3 correlation (the convolution's forward, the transposed convolution's
// input gradient), the weight gradient of both, and the bias gradient.
#include "kernels.h"

namespace cae {
namespace cpu {
namespace {

template <typename T, bool Gated>
void correlate_nchw(T* out, const T* x, const T* x_gate, const T* w,
                    const T* bias, int64_t stride, bool apply_relu, int64_t N,
                    int64_t C_in, int64_t H, int64_t W, int64_t C_out,
                    int64_t H_out, int64_t W_out) {
  const int64_t plane_out = H_out * W_out, plane_in = H * W;
  at::parallel_for(0, N * C_out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nc = begin; nc < end; ++nc) {
      const int64_t n = nc / C_out, co = nc % C_out;
      T* o = out + nc * plane_out;
      std::fill(o, o + plane_out, bias ? bias[co] : T(0));
      for (int64_t ci = 0; ci < C_in; ++ci) {
        const int64_t in_offset = (n * C_in + ci) * plane_in;
        const T* wk = w + (co * C_in + ci) * 9;
        for (int64_t ky = 0; ky < 3; ++ky) {
          const auto [oy_lo, oy_hi] = tap_range(ky, stride, H, H_out);
          for (int64_t kx = 0; kx < 3; ++kx) {
            const auto [ox_lo, ox_hi] = tap_range(kx, stride, W, W_out);
            const T wv = wk[ky * 3 + kx];
            for (int64_t oy = oy_lo; oy < oy_hi; ++oy) {
              const int64_t row = in_offset + (stride * oy + ky - 1) * W + kx - 1;
              T* orow = o + oy * W_out;
              for (int64_t ox = ox_lo; ox < ox_hi; ++ox) {
                const int64_t i = row + stride * ox;
                orow[ox] += wv * gate<Gated>(x[i], x_gate, i);
              }
            }
          }
        }
      }
      if (apply_relu) {
        for (int64_t i = 0; i < plane_out; ++i) o[i] = relu(o[i]);
      }
    }
  });
}

template <typename T, bool Gated>
void correlate_nhwc(T* out, const T* x, const T* x_gate, const T* w,
                    const T* bias, int64_t stride, bool apply_relu, int64_t N,
                    int64_t C_in, int64_t H, int64_t W, int64_t C_out,
                    int64_t H_out, int64_t W_out) {
  // [ky][kx][ci][co]: the innermost loop runs over output channels.
  std::vector<T> wt(9 * C_in * C_out);
  for (int64_t co = 0; co < C_out; ++co)
    for (int64_t ci = 0; ci < C_in; ++ci)
      for (int64_t k = 0; k < 9; ++k)
        wt[(k * C_in + ci) * C_out + co] = w[(co * C_in + ci) * 9 + k];
  at::parallel_for(0, N * H_out, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / H_out, oy = row % H_out;
      for (int64_t ox = 0; ox < W_out; ++ox) {
        T* o = out + (row * W_out + ox) * C_out;
        for (int64_t co = 0; co < C_out; ++co) o[co] = bias ? bias[co] : T(0);
        for (int64_t ky = 0; ky < 3; ++ky) {
          const int64_t iy = stride * oy + ky - 1;
          if (iy < 0 || iy >= H) continue;
          for (int64_t kx = 0; kx < 3; ++kx) {
            const int64_t ix = stride * ox + kx - 1;
            if (ix < 0 || ix >= W) continue;
            const int64_t pixel = ((n * H + iy) * W + ix) * C_in;
            const T* wk = wt.data() + (ky * 3 + kx) * C_in * C_out;
            for (int64_t ci = 0; ci < C_in; ++ci) {
              const T v = gate<Gated>(x[pixel + ci], x_gate, pixel + ci);
              const T* wrow = wk + ci * C_out;
              for (int64_t co = 0; co < C_out; ++co) o[co] += v * wrow[co];
            }
          }
        }
        if (apply_relu) {
          for (int64_t co = 0; co < C_out; ++co) o[co] = relu(o[co]);
        }
      }
    }
  });
}

// Partial sums over fixed batch chunks, then one ordered reduction.
template <typename T, bool GatedA, bool GatedB>
void weight_grad_nchw(T* out, const T* a, const T* a_gate, const T* b,
                      const T* b_gate, int64_t stride, int64_t N, int64_t C_a,
                      int64_t H_a, int64_t W_a, int64_t C_b, int64_t H,
                      int64_t W) {
  using acc_t = at::opmath_type<T>;
  const int64_t chunks = std::min(N, kBatchChunks);
  const int64_t size = C_a * C_b * 9;
  std::vector<acc_t> partial(chunks * size, acc_t(0));
  at::parallel_for(0, chunks * C_a, 1, [&](int64_t begin, int64_t end) {
    for (int64_t job = begin; job < end; ++job) {
      const int64_t chunk = job / C_a, ca = job % C_a;
      acc_t* acc = partial.data() + chunk * size + ca * C_b * 9;
      for (int64_t n = chunk * N / chunks; n < (chunk + 1) * N / chunks; ++n) {
        const int64_t a_plane = (n * C_a + ca) * H_a * W_a;
        for (int64_t cb = 0; cb < C_b; ++cb) {
          const int64_t b_plane = (n * C_b + cb) * H * W;
          for (int64_t ky = 0; ky < 3; ++ky) {
            const auto [oy_lo, oy_hi] = tap_range(ky, stride, H, H_a);
            for (int64_t kx = 0; kx < 3; ++kx) {
              const auto [ox_lo, ox_hi] = tap_range(kx, stride, W, W_a);
              acc_t sum = 0;
              for (int64_t oy = oy_lo; oy < oy_hi; ++oy) {
                const int64_t arow = a_plane + oy * W_a;
                const int64_t brow = b_plane + (stride * oy + ky - 1) * W + kx - 1;
                for (int64_t ox = ox_lo; ox < ox_hi; ++ox) {
                  const int64_t ia = arow + ox, ib = brow + stride * ox;
                  sum += acc_t(gate<GatedA>(a[ia], a_gate, ia)) *
                         acc_t(gate<GatedB>(b[ib], b_gate, ib));
                }
              }
              acc[cb * 9 + ky * 3 + kx] += sum;
            }
          }
        }
      }
    }
  });
  at::parallel_for(0, size, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      acc_t sum = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * size + i];
      out[i] = T(sum);
    }
  });
}

template <typename T, bool GatedA, bool GatedB>
void weight_grad_nhwc(T* out, const T* a, const T* a_gate, const T* b,
                      const T* b_gate, int64_t stride, int64_t N, int64_t C_a,
                      int64_t H_a, int64_t W_a, int64_t C_b, int64_t H,
                      int64_t W) {
  using acc_t = at::opmath_type<T>;
  const int64_t chunks = std::min(N, kBatchChunks);
  const int64_t size = C_a * C_b * 9;  // [ky][kx][ca][cb] per chunk
  std::vector<acc_t> partial(chunks * size, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> a_pixel(C_a);
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* acc = partial.data() + chunk * size;
      for (int64_t n = chunk * N / chunks; n < (chunk + 1) * N / chunks; ++n) {
        for (int64_t oy = 0; oy < H_a; ++oy) {
          for (int64_t ox = 0; ox < W_a; ++ox) {
            const int64_t ia = ((n * H_a + oy) * W_a + ox) * C_a;
            for (int64_t ca = 0; ca < C_a; ++ca)
              a_pixel[ca] = gate<GatedA>(a[ia + ca], a_gate, ia + ca);
            for (int64_t ky = 0; ky < 3; ++ky) {
              const int64_t iy = stride * oy + ky - 1;
              if (iy < 0 || iy >= H) continue;
              for (int64_t kx = 0; kx < 3; ++kx) {
                const int64_t ix = stride * ox + kx - 1;
                if (ix < 0 || ix >= W) continue;
                const int64_t ib = ((n * H + iy) * W + ix) * C_b;
                acc_t* tap = acc + (ky * 3 + kx) * C_a * C_b;
                for (int64_t ca = 0; ca < C_a; ++ca) {
                  const acc_t av = a_pixel[ca];
                  acc_t* row = tap + ca * C_b;
                  for (int64_t cb = 0; cb < C_b; ++cb)
                    row[cb] += av * acc_t(gate<GatedB>(b[ib + cb], b_gate, ib + cb));
                }
              }
            }
          }
        }
      }
    }
  });
  at::parallel_for(0, size, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {  // i indexes out: [ca][cb][k]
      const int64_t k = i % 9, cb = (i / 9) % C_b, ca = i / (9 * C_b);
      const int64_t j = (k * C_a + ca) * C_b + cb;
      acc_t sum = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * size + j];
      out[i] = T(sum);
    }
  });
}

template <typename T, bool Gated>
void bias_grad_impl(T* out, const T* g, const T* g_gate, int64_t N, int64_t C,
                    int64_t HW, bool nhwc) {
  using acc_t = at::opmath_type<T>;
  const int64_t chunks = std::min(N, kBatchChunks);
  std::vector<acc_t> partial(chunks * C, acc_t(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      acc_t* acc = partial.data() + chunk * C;
      for (int64_t n = chunk * N / chunks; n < (chunk + 1) * N / chunks; ++n) {
        if (nhwc) {
          for (int64_t p = 0; p < HW; ++p) {
            const int64_t base = (n * HW + p) * C;
            for (int64_t c = 0; c < C; ++c)
              acc[c] += acc_t(gate<Gated>(g[base + c], g_gate, base + c));
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const int64_t base = (n * C + c) * HW;
            acc_t sum = 0;
            for (int64_t p = 0; p < HW; ++p)
              sum += acc_t(gate<Gated>(g[base + p], g_gate, base + p));
            acc[c] += sum;
          }
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    acc_t sum = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * C + c];
    out[c] = T(sum);
  }
}

}  // namespace
}  // namespace cpu

void CpuKernels::correlate(const Tensor& out, const Tensor& x, const OptTensor& x_gate,
                           const Tensor& w, const OptTensor& bias, int64_t stride,
                           bool relu, bool nhwc) {
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_correlate_cpu", [&] {
    cpu::with_gate(x_gate, [&](auto gated) {
      auto kernel = nhwc ? cpu::correlate_nhwc<scalar_t, decltype(gated)::value>
                         : cpu::correlate_nchw<scalar_t, decltype(gated)::value>;
      kernel(out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
             cpu::data_or_null<scalar_t>(x_gate), w.data_ptr<scalar_t>(),
             cpu::data_or_null<scalar_t>(bias), stride, relu, x.size(0),
             x.size(1), x.size(2), x.size(3), out.size(1), out.size(2),
             out.size(3));
    });
  });
}

void CpuKernels::weight_grad(const Tensor& out, const Tensor& a, const OptTensor& a_gate,
                             const Tensor& b, const OptTensor& b_gate,
                             int64_t stride, bool nhwc) {
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cae_weight_grad_cpu", [&] {
    cpu::with_gate(a_gate, [&](auto gated_a) {
      cpu::with_gate(b_gate, [&](auto gated_b) {
        auto kernel = nhwc ? cpu::weight_grad_nhwc<scalar_t, decltype(gated_a)::value, decltype(gated_b)::value>
                           : cpu::weight_grad_nchw<scalar_t, decltype(gated_a)::value, decltype(gated_b)::value>;
        kernel(out.data_ptr<scalar_t>(), a.data_ptr<scalar_t>(),
               cpu::data_or_null<scalar_t>(a_gate), b.data_ptr<scalar_t>(),
               cpu::data_or_null<scalar_t>(b_gate), stride, a.size(0),
               a.size(1), a.size(2), a.size(3), b.size(1), b.size(2),
               b.size(3));
      });
    });
  });
}

void CpuKernels::bias_grad(const Tensor& out, const Tensor& g, const OptTensor& g_gate,
                           bool nhwc) {
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cae_bias_grad_cpu", [&] {
    cpu::with_gate(g_gate, [&](auto gated) {
      cpu::bias_grad_impl<scalar_t, decltype(gated)::value>(
          out.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(),
          cpu::data_or_null<scalar_t>(g_gate), g.size(0), g.size(1),
          g.size(2) * g.size(3), nhwc);
    });
  });
}

}  // namespace cae
