// 3x3 correlation (the convolution's forward, the transposed convolution's
// input gradient), the weight gradient of both, and the bias gradient.
#include "gemm.h"
#include "window.h"

namespace cae {
namespace cpu {
namespace CAE_CPU_LEVEL {
namespace {

// y = act(bias + correlate(gate(x), w)), one sample at a time: a padded copy,
// one matrix product over (position, channel x tap), the epilogue on the way
// back. NCHW: [C_out, 9 C_in] x [9 C_in, positions]; NHWC: [positions,
// 9 C_in] x [9 C_in, C_out]. The plan is the part shared by every sample.
template <typename T>
struct CorrelatePlan {
  Windows win;
  const T* w;
  int64_t C_out, H_out, W_out, K, P;
  std::vector<int64_t> taps;  // k = ci * 9 + tap in NCHW, tap * C_in + ci in NHWC
  std::vector<int64_t> rows, cols;
  Scratch<T> w_nhwc;  // [tap][ci][co]
  ProductShape shape;

  CorrelatePlan(const Windows& windows, const T* weight, int64_t C_out_)
      : win(windows),
        w(weight),
        C_out(C_out_),
        H_out(windows.Ho),
        W_out(windows.Wo),
        K(9 * windows.C),
        P(windows.positions()),
        taps(K),
        rows(win.nhwc ? arange(P, win.C) : arange(C_out, K)),
        cols(win.nhwc ? arange(K, C_out) : arange(K, 1)) {
    const int64_t C_in = win.C;
    for (int64_t ci = 0; ci < C_in; ++ci)
      for (int64_t t = 0; t < 9; ++t)
        taps[win.nhwc ? t * C_in + ci : ci * 9 + t] = win.tap_offset(ci, t / 3, t % 3);
    if (win.nhwc) {
      w_nhwc.resize(K * C_out + kReadPast);
      for (int64_t co = 0; co < C_out; ++co)
        for (int64_t ci = 0; ci < C_in; ++ci)
          for (int64_t t = 0; t < 9; ++t) w_nhwc[(t * C_in + ci) * C_out + co] = w[(co * C_in + ci) * 9 + t];
    }
    shape = win.nhwc
                ? product_shape<T>(P, K, {nullptr, rows.data(), taps.data()}, {nullptr, cols.data(), nullptr})
                : product_shape<T>(C_out, K, {w, rows.data(), cols.data()}, {nullptr, taps.data(), nullptr});
  }

  size_t result_size() const { return P * C_out; }

  // One output sample from the padded copy of its input; result is scratch
  // of result_size().
  void run(const T* buffer, T* result, T* out, const T* bias, bool relu) const {
    if (win.nhwc) {
      gemm<T>(P, C_out, K, {buffer, rows.data(), taps.data()}, {w_nhwc.data(), cols.data(), nullptr}, result,
              C_out, false, shape);
    } else {
      gemm<T>(C_out, P, K, {w, rows.data(), cols.data()}, {buffer, taps.data(), nullptr}, result, P, false,
              shape);
    }
    store_result<T>({.result = result,
                     .rows = H_out,
                     .cols = W_out,
                     .Wq = win.Wq,
                     .C = C_out,
                     .nhwc = win.nhwc,
                     .out = out,
                     .H = H_out,
                     .W = W_out,
                     .bias = bias,
                     .relu = relu});
  }
};

template <typename T, bool Gated>
void correlate_impl(T* out, const T* x, const T* x_gate, const T* w, const T* bias, int64_t stride,
                    bool apply_relu, bool nhwc, int64_t N, int64_t C_in, int64_t H, int64_t W, int64_t C_out,
                    int64_t H_out, int64_t W_out) {
  const CorrelatePlan<T> plan(Windows(C_in, H, W, stride, H_out, W_out, nhwc), w, C_out);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch<T> buffer(plan.win.buffer_size()), result(plan.result_size());
    for (int64_t n = begin; n < end; ++n) {
      const int64_t offset = n * C_in * H * W;
      pad_sample<T, Gated>(x + offset, x_gate ? x_gate + offset : nullptr, plan.win, buffer.data());
      plan.run(buffer.data(), result.data(), out + n * C_out * H_out * W_out, bias, apply_relu);
    }
  });
}

// The NHWC weight gradient when b's channels fill whole vectors: CA
// channels of a and Taps taps at once, so one broadcast of a serves Taps
// FMAs and one load of b serves CA (the plain product of gemm.h broadcasts
// once per FMA: this ran 1.1x to 2x faster on the autoencoder's shapes).
//   out[(ca * 9 + t) * C_b + cb] += sum_q a[q * C_a + ca] * b[q * C_b + tap[t] + cb]
// for t in [t0, t0 + Taps).
template <typename T, int Bytes, int CA, int Taps>
void tap_blocked_tile(int64_t P, int64_t C_a, int64_t C_b, const T* __restrict__ a, const T* __restrict__ b,
                      const int64_t* tap_offsets, T* __restrict__ out, int64_t ca0, int64_t cb0, int t0) {
  using V = typename Vec<T, Bytes>::type;
  int64_t tap[Taps];
  for (int t = 0; t < Taps; ++t) tap[t] = tap_offsets[t0 + t] + cb0;
  V acc[CA][Taps];
  for (int c = 0; c < CA; ++c)
    for (int t = 0; t < Taps; ++t) acc[c][t] = V{};
  const T* a_q = a + ca0;
  const T* b_q = b;
  for (int64_t q = 0; q < P; ++q, a_q += C_a, b_q += C_b) {
    V a_c[CA];
    for (int c = 0; c < CA; ++c) a_c[c] = splat<V>(a_q[c]);
    for (int t = 0; t < Taps; ++t) {
      V b_t = load<V>(b_q + tap[t]);
      if constexpr (CA > 1) {
        // Held in a register: otherwise GCC folds the load into each of the
        // CA FMAs, and the loop becomes bound by loads. (A vector of these
        // is never wider than one of the level's registers.)
        asm("" : "+v"(b_t));
      }
      for (int c = 0; c < CA; ++c) acc[c][t] += a_c[c] * b_t;
    }
  }
  for (int c = 0; c < CA; ++c) {
    for (int t = 0; t < Taps; ++t) {
      T* o = out + ((ca0 + c) * 9 + t0 + t) * C_b + cb0;
      store(o, load<V>(o) + acc[c][t]);
    }
  }
}

// Channels of a from ca0 on, CA at a time, then the rest with fewer.
template <typename T, int Bytes, int CA, int Taps>
void tap_blocked_rows(int64_t ca0, int64_t P, int64_t C_a, int64_t C_b, const T* a, const T* b,
                      const int64_t* tap_offsets, T* out, int64_t cb0, int t0) {
  for (; ca0 + CA <= C_a; ca0 += CA)
    tap_blocked_tile<T, Bytes, CA, Taps>(P, C_a, C_b, a, b, tap_offsets, out, ca0, cb0, t0);
  if constexpr (CA > 1) {
    if (ca0 < C_a)
      tap_blocked_rows<T, Bytes, CA - 1, Taps>(ca0, P, C_a, C_b, a, b, tap_offsets, out, cb0, t0);
  }
}

// Tiles of CA x Taps accumulators, CA broadcasts and a vector of b: with 32
// registers 3 channels x all 9 taps (31), with 16 3 channels x one row of 3
// taps (13; 1 x 9 kept the loop bound by its 10 loads per 9 FMAs). Positions
// are taken in blocks whose rows of a and b stay in the L1 cache while every
// tile passes over them (a tile reads a cache line of a per position).
template <typename T, int Bytes>
void tap_blocked(int64_t P, int64_t C_a, int64_t C_b, const T* a, const T* b, const int64_t* tap_offsets,
                 T* out) {
  constexpr int Taps = kVectorRegisters >= 32 ? 9 : 3;
  constexpr int CA = (kVectorRegisters - 1) / (Taps + 1);
  constexpr int64_t kBlock = 128;
  for (int64_t q0 = 0; q0 < P; q0 += kBlock) {
    const int64_t count = std::min(kBlock, P - q0);
    for (int t0 = 0; t0 < 9; t0 += Taps)
      for (int64_t cb0 = 0; cb0 < C_b; cb0 += Vec<T, Bytes>::lanes)
        tap_blocked_rows<T, Bytes, CA, Taps>(0, count, C_a, C_b, a + q0 * C_a, b + q0 * C_b, tap_offsets, out,
                                             cb0, t0);
  }
}

// sum[j] += rows[i * width + j] for i < count.
template <typename T>
void add_rows(T* __restrict__ sum, const T* __restrict__ rows, int64_t count, int64_t width) {
  for (int64_t i = 0; i < count; ++i)
    for (int64_t j = 0; j < width; ++j) sum[j] += rows[i * width + j];
}

// The weight and bias gradients' sums over the samples. a is the small side
// (the window positions) and b the large side (read through the windows) of
// WeightGradParams, C_a and C_b their channels.
// out[ca, cb, tap] = sum over samples and positions of gate(a)[ca, p] times
// gate(b) under that tap: per sample one product [9 C_b, positions] x
// [positions, C_a], accumulated per fixed batch chunk, the chunks then summed
// in order. The bias's gradient comes from the same pass: the sum of gate(a)
// (the convolution's output gradient) from its [position][channel] copy, or
// of gate(b) (the transposed convolution's) from its padded copy, zeros
// around.
template <typename T>
struct WeightGradSums {
  Windows win;
  int64_t C_a, C_b, M, P, size, chunks, chunk_size;
  bool grad_output_is_large;
  int vector_bytes;  // the tap-blocked product's vector (NHWC, b's channels in whole vectors), or 0: gemm's
  std::vector<int64_t> taps, positions, a_rows;  // m = cb * 9 + tap
  ProductShape shape;
  Scratch<T> partial;  // per chunk: tap-blocked [ca][tap][cb], otherwise gemm's [cb][tap][ca]
  int64_t C_bias, bias_chunk_size;
  Scratch<T> bias_partial;

  WeightGradSums(const Windows& windows, int64_t N, int64_t C_a_, bool grad_output_is_large_)
      : win(windows),
        C_a(C_a_),
        C_b(windows.C),
        M(9 * C_b),
        P(windows.positions()),
        size(M * C_a),
        chunks(std::min(N, kBatchChunks)),
        chunk_size((size + 15) / 16 * 16),  // each chunk's partial sums on a cache line
        grad_output_is_large(grad_output_is_large_),
        vector_bytes(tap_blocked_bytes(windows.nhwc, C_b)),
        taps(M),
        positions(arange(P, win.position_step())),
        a_rows(arange(P, C_a)),
        partial(chunks * chunk_size, T(0)),
        C_bias(grad_output_is_large ? C_b : C_a),
        bias_chunk_size((C_bias + 15) / 16 * 16),
        bias_partial(chunks * bias_chunk_size, T(0)) {
    for (int64_t cb = 0; cb < C_b; ++cb)
      for (int64_t t = 0; t < 9; ++t) taps[cb * 9 + t] = win.tap_offset(cb, t / 3, t % 3);
    shape =
        product_shape<T>(M, P, {nullptr, taps.data(), positions.data()}, {nullptr, a_rows.data(), nullptr});
  }

  static int tap_blocked_bytes(bool nhwc, int64_t C_b) {
    constexpr int64_t lanes = Vec<T, kVectorBytes>::lanes;
    if (!nhwc) return 0;
    if (C_b % lanes == 0) return kVectorBytes;
    if (kVectorBytes > 16 && C_b % (lanes / 2) == 0) return kVectorBytes / 2;
    return 0;
  }

  // Calls sample(buffers, chunk, n) for each of the N samples, the chunks in
  // parallel, each thread with its own buffers = make_buffers().
  template <class MakeBuffers, class Sample>
  void for_each_sample(int64_t N, const MakeBuffers& make_buffers, const Sample& sample) const {
    at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
      auto buffers = make_buffers();
      for (int64_t chunk = begin; chunk < end; ++chunk)
        for (int64_t n = chunk * N / chunks; n < (chunk + 1) * N / chunks; ++n) sample(buffers, chunk, n);
    });
  }

  // Adds one sample to its chunk's sums: a_by_position is gate(a) as
  // [position][channel] (positions_by_channel), b_buffer the padded copy of
  // gate(b) (pad_sample), both over win's grid.
  void add(int64_t chunk, const T* a_by_position, const T* b_buffer) {
    T* sums = partial.data() + chunk * chunk_size;
    T* bias_sums = bias_partial.data() + chunk * bias_chunk_size;
    if (vector_bytes == kVectorBytes) {
      tap_blocked<T, kVectorBytes>(P, C_a, C_b, a_by_position, b_buffer, taps.data(), sums);
    } else if constexpr (kVectorBytes > 16) {
      if (vector_bytes == kVectorBytes / 2) {
        tap_blocked<T, kVectorBytes / 2>(P, C_a, C_b, a_by_position, b_buffer, taps.data(), sums);
      }
    }
    if (vector_bytes == 0) {
      gemm<T>(M, C_a, P, {b_buffer, taps.data(), positions.data()}, {a_by_position, a_rows.data(), nullptr},
              sums, C_a, true, shape);
    }
    if (!grad_output_is_large) {
      add_rows(bias_sums, a_by_position, P, C_a);
    } else if (win.nhwc) {
      add_rows(bias_sums, b_buffer, win.stride * win.stride * win.Hq * win.Wq, C_b);
    } else {
      for (int64_t phase = 0; phase < win.stride * win.stride; ++phase)
        for (int64_t cb = 0; cb < C_b; ++cb)
          bias_sums[cb] +=
              gated_sum<T, false>(b_buffer + win.offset(phase, cb, 0, 0), nullptr, win.Hq * win.Wq);
    }
  }

  // The chunks' sums, added in order: out [C_a][C_b][3][3], bias_out [C_bias].
  void write(T* out, T* bias_out) const {
    for (int64_t c = 0; c < C_bias; ++c) {
      T sum = 0;
      for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += bias_partial[chunk * bias_chunk_size + c];
      bias_out[c] = sum;
    }
    at::parallel_for(0, size, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {  // i indexes out: [ca][cb][tap]
        const int64_t ca = i / M, cb = i % M / 9, t = i % 9;
        const int64_t j = vector_bytes ? (ca * 9 + t) * C_b + cb : (cb * 9 + t) * C_a + ca;
        T sum = 0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * chunk_size + j];
        out[i] = sum;
      }
    });
  }
};

template <typename T, bool GatedA, bool GatedB>
void weight_grad_impl(T* out, T* bias_out, bool grad_output_is_large, const T* a, const T* a_gate, const T* b,
                      const T* b_gate, int64_t stride, bool nhwc, int64_t N, int64_t C_a, int64_t H_a,
                      int64_t W_a, int64_t C_b, int64_t H, int64_t W) {
  WeightGradSums<T> sums(Windows(C_b, H, W, stride, H_a, W_a, nhwc), N, C_a, grad_output_is_large);
  const Windows& win = sums.win;
  struct Buffers {
    Scratch<T> b_copy, a_by_position;
  };
  sums.for_each_sample(
      N, [&] { return Buffers{Scratch<T>(win.buffer_size()), Scratch<T>(sums.P * C_a + kReadPast)}; },
      [&](Buffers& buf, int64_t chunk, int64_t n) {
        const int64_t b_offset = n * C_b * H * W, a_offset = n * C_a * H_a * W_a;
        pad_sample<T, GatedB>(b + b_offset, b_gate ? b_gate + b_offset : nullptr, win, buf.b_copy.data());
        positions_by_channel<T, GatedA>(a + a_offset, a_gate ? a_gate + a_offset : nullptr, C_a, win,
                                        buf.a_by_position.data());
        sums.add(chunk, buf.a_by_position.data(), buf.b_copy.data());
      });
  sums.write(out, bias_out);
}

template <typename T, bool Gated>
void bias_grad_impl(T* out, const T* g, const T* g_gate, int64_t N, int64_t C, int64_t HW, bool nhwc) {
  const int64_t chunks = std::min(N, kBatchChunks);
  std::vector<T> partial(chunks * C, T(0));
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      T* acc = partial.data() + chunk * C;
      for (int64_t n = chunk * N / chunks; n < (chunk + 1) * N / chunks; ++n) {
        const int64_t base = n * C * HW;
        if (nhwc && C > 1) {  // (one channel: the same memory as NCHW, which vectorizes)
          for (int64_t p = 0; p < HW; ++p)
            for (int64_t c = 0; c < C; ++c)
              acc[c] += gate<Gated>(g[base + p * C + c], g_gate, base + p * C + c);
        } else {
          for (int64_t c = 0; c < C; ++c)
            acc[c] += gated_sum<T, Gated>(g + base + c * HW, g_gate ? g_gate + base + c * HW : nullptr, HW);
        }
      }
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    T sum = 0;
    for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * C + c];
    out[c] = sum;
  }
}

}  // namespace

void Kernels::correlate(const CorrelateParams& p) {
  const Tensor &x = p.input, &out = p.out;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "cae_correlate_cpu", [&] {
    with_gate(p.input_gate, [&](auto gated) {
      correlate_impl<scalar_t, decltype(gated)::value>(
          out.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), data_or_null<scalar_t>(p.input_gate),
          p.weight.data_ptr<scalar_t>(), data_or_null<scalar_t>(p.bias), p.stride, p.relu, p.nhwc, x.size(0),
          x.size(1), x.size(2), x.size(3), out.size(1), out.size(2), out.size(3));
    });
  });
}

void Kernels::weight_grad(const WeightGradParams& p) {
  const Tensor &a = p.small, &b = p.large;
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "cae_weight_grad_cpu", [&] {
    with_gate(p.small_gate, [&](auto gated_a) {
      with_gate(p.large_gate, [&](auto gated_b) {
        weight_grad_impl<scalar_t, decltype(gated_a)::value, decltype(gated_b)::value>(
            p.grad_weight.data_ptr<scalar_t>(), p.grad_bias.data_ptr<scalar_t>(), p.grad_output_is_large,
            a.data_ptr<scalar_t>(), data_or_null<scalar_t>(p.small_gate), b.data_ptr<scalar_t>(),
            data_or_null<scalar_t>(p.large_gate), p.stride, p.nhwc, a.size(0), a.size(1), a.size(2),
            a.size(3), b.size(1), b.size(2), b.size(3));
      });
    });
  });
}

void Kernels::bias_grad(const BiasGradParams& p) {
  const Tensor& g = p.grad_output;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "cae_bias_grad_cpu", [&] {
    with_gate(p.gate, [&](auto gated) {
      bias_grad_impl<scalar_t, decltype(gated)::value>(p.grad_bias.data_ptr<scalar_t>(),
                                                       g.data_ptr<scalar_t>(), data_or_null<scalar_t>(p.gate),
                                                       g.size(0), g.size(1), g.size(2) * g.size(3), p.nhwc);
    });
  });
}

}  // namespace CAE_CPU_LEVEL
}  // namespace cpu
}  // namespace cae
