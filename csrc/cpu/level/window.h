// Moving one sample between an activation tensor (either layout) and the
// padded buffers that the matrix product of gemm.h reads and writes.
//
// The large side [C, H, W] is what a 3x3 window with padding 1 scans with a
// stride; the small side is the grid of window positions, [Ho, Wo]. A padded
// copy splits the large side by the stride's phases, so that every tap of
// every window position is one fixed offset away from the position:
//
//   buffer(phase (py, px), c, a, b) = x[c, stride * a + py - 1, stride * b + px - 1]
//   x[c, stride * oy + ky - 1, stride * ox + kx - 1]
//       = buffer(phase (ky % stride, kx % stride), c, oy + ky / stride, ox + kx / stride)
//
// Positions are numbered q = oy * Wq + ox over a grid Wq wide (a little wider
// than Wo): the columns ox >= Wo are scratch that the copy back drops.
#pragma once

#include "gemm.h"

namespace cae {
namespace cpu {
namespace CAE_CPU_LEVEL {

struct Windows {
  int64_t C, H, W, stride, Ho, Wo;
  bool nhwc;
  int64_t Hq, Wq;  // one phase plane, with the rows that scratch columns read past

  // min_Wq widens the grid (more scratch columns), so that two copies of
  // different geometry can share their position numbering (conv_backward.cpp).
  Windows(int64_t C_, int64_t H_, int64_t W_, int64_t stride_, int64_t Ho_, int64_t Wo_, bool nhwc_,
          int64_t min_Wq = 0)
      : C(C_),
        H(H_),
        W(W_),
        stride(stride_),
        Ho(Ho_),
        Wo(Wo_),
        nhwc(nhwc_),
        Hq(std::max(Ho_ + 2, (H_ + 2 + stride_ - 1) / stride_) + 1),
        Wq(std::max({Wo_ + 2 / stride_, (W_ + 2 + stride_ - 1) / stride_, min_Wq})) {}

  int64_t positions() const { return Ho * Wq; }
  // Elements per position along q: channels are innermost in NHWC.
  int64_t position_step() const { return nhwc ? C : 1; }
  int64_t buffer_size() const { return stride * stride * C * Hq * Wq + 2 * Wq * C + kReadPast; }

  int64_t offset(int64_t phase, int64_t c, int64_t a, int64_t b) const {
    return nhwc ? ((phase * Hq + a) * Wq + b) * C + c : ((phase * C + c) * Hq + a) * Wq + b;
  }
  // Offset of input channel c under tap (ky, kx), relative to position q's own.
  int64_t tap_offset(int64_t c, int64_t ky, int64_t kx) const {
    return offset((ky % stride) * stride + kx % stride, c, ky / stride, kx / stride);
  }
};

// dst[i] = gate(x)[src + i] for i < n: one contiguous run, vectorized
// (the gate on the bits; a plain copy is a memcpy).
template <typename T, bool Gated>
inline void copy_run(T* __restrict__ dst, const T* __restrict__ x, const T* __restrict__ x_gate, int64_t src,
                     int64_t n) {
  using V = typename Vec<T, kVectorBytes>::type;
  constexpr int64_t L = Vec<T, kVectorBytes>::lanes;
  if (n % L == 0 && n <= 4 * L) {
    // A pixel's channels (NHWC, stride 2): whole vectors inline, not a call
    // to memcpy (or a loop of unknown length) per pixel.
    for (int64_t i = 0; i < n; i += L) {
      const V v = load<V>(x + src + i);
      if constexpr (Gated) {
        store(dst + i, load<V>(x_gate + src + i) > T(0) ? v : V{});  // selects, as gate() does
      } else {
        store(dst + i, v);
      }
    }
  } else if constexpr (Gated) {
    for (int64_t i = 0; i < n; ++i) dst[i] = gate<true>(x[src + i], x_gate, src + i);
  } else {
    std::memcpy(dst, x + src, n * sizeof(T));
  }
}

// The padded, phase-split copy of one sample of the large side, with the
// ReLU gate applied on the way. Copied in runs contiguous on both sides:
// whole rows at stride 1, a pixel's channels at stride 2 (NHWC); NCHW at
// stride 2 splits each source row into its two column phases.
template <typename T, bool Gated>
void pad_sample(const T* __restrict__ x, const T* __restrict__ x_gate, const Windows& w,
                T* __restrict__ buffer) {
  const int64_t s = w.stride;
  const int64_t sc = w.nhwc ? 1 : w.H * w.W, sh = w.nhwc ? w.W * w.C : w.W, sw = w.nhwc ? w.C : 1;
  const int64_t run = w.nhwc ? w.C : 1;  // elements per pixel, contiguous on both sides
  const int64_t row = w.Wq * run;        // one row of a phase plane (of one channel, NCHW)
  // The zeros around the copied pixels: NHWC writes them row by row (fewer
  // stores than filling the whole buffer first); NCHW's rows are a few dozen
  // elements, where one fill beats thousands of small ones (measured).
  const bool zero_rows = w.nhwc;
  if (!zero_rows) std::fill(buffer, buffer + w.buffer_size(), T(0));
  if (s == 2 && !w.nhwc) {
    // One pass over each source row fills both column phases: even columns
    // land in phase px = 1 at b = ix / 2, odd ones in px = 0 at b = (ix + 1) / 2
    // (per phase and row, the rows of 14 elements cost more in loop overhead
    // than in copying).
    for (int64_t c = 0; c < w.C; ++c) {
      for (int64_t iy = 0; iy < w.H; ++iy) {
        const int64_t py = (iy + 1) % 2, a = (iy + 1) / 2, src = c * sc + iy * w.W;
        T* __restrict__ even = buffer + w.offset(py * 2 + 1, c, a, 0);
        T* __restrict__ odd = buffer + w.offset(py * 2, c, a, 1);
        for (int64_t b = 0; b < w.W / 2; ++b) {
          even[b] = gate<Gated>(x[src + 2 * b], x_gate, src + 2 * b);
          odd[b] = gate<Gated>(x[src + 2 * b + 1], x_gate, src + 2 * b + 1);
        }
        if (w.W % 2) even[w.W / 2] = gate<Gated>(x[src + w.W - 1], x_gate, src + w.W - 1);
      }
    }
    return;
  }
  for (int64_t py = 0; py < s; ++py) {
    for (int64_t px = 0; px < s; ++px) {
      const int64_t phase = py * s + px;
      // a, b such that 0 <= s * a + p - 1 < size
      const int64_t a_lo = py == 0 ? 1 : 0, a_hi = std::min((w.H - py) / s + 1, w.Hq);
      const int64_t b_lo = px == 0 ? 1 : 0, b_hi = std::max(b_lo, std::min((w.W - px) / s + 1, w.Wq));
      for (int64_t c = 0; c < (w.nhwc ? 1 : w.C); ++c) {
        T* plane = buffer + w.offset(phase, c, 0, 0);
        for (int64_t a = 0; a < w.Hq; ++a) {
          T* dst = plane + a * row;
          if (a < a_lo || a >= a_hi) {
            if (zero_rows) std::fill(dst, dst + row, T(0));
            continue;
          }
          if (zero_rows) {
            std::fill(dst, dst + b_lo * run, T(0));
            std::fill(dst + b_hi * run, dst + row, T(0));
          }
          dst += b_lo * run;
          const int64_t src = c * sc + (s * a + py - 1) * sh + (s * b_lo + px - 1) * sw;
          if (s == 1) {
            copy_run<T, Gated>(dst, x, x_gate, src, (b_hi - b_lo) * run);
          } else {  // NHWC at stride 2 (NCHW's took the path above)
            for (int64_t b = 0; b < b_hi - b_lo; ++b)
              copy_run<T, Gated>(dst + b * run, x, x_gate, src + s * b * sw, run);
          }
        }
      }
    }
  }
  if (zero_rows) {  // the slack past the planes, which scratch columns read
    std::fill(buffer + s * s * w.C * w.Hq * w.Wq, buffer + w.buffer_size(), T(0));
  }
}

// Lanes Half * L / 2 .. (Half + 1) * L / 2 - 1 of a and b, interleaved.
template <int Half, int L, typename V, size_t... J>
inline V zip(const V& a, const V& b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, static_cast<int>(J % 2 * L + Half * L / 2 + J / 2)...);
}

// An L x L block transposed in registers: log2(L) rounds of zipping row k
// with row k + L / 2.
template <int L, typename V>
inline void transpose(V (&rows)[L]) {
  for (int round = 1; round < L; round *= 2) {
    V zipped[L];
    for (int k = 0; k < L / 2; ++k) {
      zipped[2 * k] = zip<0, L>(rows[k], rows[k + L / 2], std::make_index_sequence<L>{});
      zipped[2 * k + 1] = zip<1, L>(rows[k], rows[k + L / 2], std::make_index_sequence<L>{});
    }
    for (int i = 0; i < L; ++i) rows[i] = zipped[i];
  }
}

// One sample of the small side as a [position][channel] matrix over the
// padded grid (scratch columns zero), gate applied. NCHW with whole vectors
// of channels: L channels x L positions a block, transposed in registers,
// not a store per element with a stride of C (AVX2, batch 256, one thread:
// the weight gradients of conv 1->16 and 16->16 at 28 x 28 took 0.81 and
// 0.93 of the time).
template <typename T, bool Gated>
void positions_by_channel(const T* __restrict__ a, const T* __restrict__ a_gate, int64_t C, const Windows& w,
                          T* __restrict__ out) {
  using V = typename Vec<T, kVectorBytes>::type;
  constexpr int64_t L = Vec<T, kVectorBytes>::lanes;
  const int64_t blocked = C % L == 0 ? w.Wo / L * L : 0;  // positions taken in blocks
  for (int64_t oy = 0; oy < w.Ho; ++oy) {
    std::fill(out + (oy * w.Wq + w.Wo) * C, out + (oy + 1) * w.Wq * C, T(0));
    if (w.nhwc) {
      copy_run<T, Gated>(out + oy * w.Wq * C, a, a_gate, oy * w.Wo * C, w.Wo * C);
      continue;
    }
    for (int64_t c0 = 0; c0 < C; c0 += L) {
      for (int64_t ox0 = 0; ox0 < blocked; ox0 += L) {
        V block[L];
        for (int64_t i = 0; i < L; ++i) {
          const int64_t src = ((c0 + i) * w.Ho + oy) * w.Wo + ox0;
          block[i] = load<V>(a + src);
          if constexpr (Gated) block[i] = load<V>(a_gate + src) > T(0) ? block[i] : V{};  // as gate() does
        }
        transpose<L>(block);
        for (int64_t j = 0; j < L; ++j) store(out + (oy * w.Wq + ox0 + j) * C + c0, block[j]);
      }
    }
    for (int64_t c = 0; c < C; ++c) {  // read rows, write with a stride of C
      const int64_t src = (c * w.Ho + oy) * w.Wo;
      T* dst = out + oy * w.Wq * C + c;
      for (int64_t ox = blocked; ox < w.Wo; ++ox) dst[ox * C] = gate<Gated>(a[src + ox], a_gate, src + ox);
    }
  }
}

// A product's result and where store_result puts it: the result holds
// [channel][q] (NCHW) or [q][channel] (NHWC) over a grid rows x Wq, of which
// cols columns are real; its (r, col) lands on pixel (step * r + ry, step *
// col + rx) of the output sample [C, H, W] (or [H, W, C]), so the transposed
// correlation can write each of its phases.
template <typename T>
struct ResultPlacement {
  const T* result;
  int64_t rows, cols, Wq, C;
  bool nhwc;
  T* out;
  int64_t H, W;
  int64_t step = 1, ry = 0, rx = 0;
  const T* bias;  // or nullptr
  bool relu;
};

// Copies a product's result back into one output sample, dropping the
// scratch columns, with the fused bias and ReLU.
template <typename T>
void store_result(const ResultPlacement<T>& p) {
  const T* __restrict__ result = p.result;
  T* __restrict__ out = p.out;
  const int64_t Wq = p.Wq, C = p.C, H = p.H, W = p.W, step = p.step, ry = p.ry, rx = p.rx;
  const bool nhwc = p.nhwc, apply_relu = p.relu;
  const T* bias = p.bias;
  int64_t rows = p.rows, cols = p.cols;
  T shift[64];  // the bias (or nothing) per channel, for branch-free inner loops
  std::vector<T> shift_heap;
  T* __restrict__ add = C <= 64 ? shift : (shift_heap.resize(C), shift_heap.data());
  for (int64_t c = 0; c < C; ++c) add[c] = bias ? bias[c] : T(0);
  const int64_t plane = rows * Wq;  // the NCHW result's channel stride
  rows = std::min(rows, (H - ry + step - 1) / step);
  cols = std::min(cols, (W - rx + step - 1) / step);
  if (nhwc) {
    // At step 1 a row is one run of cols * C elements on both sides; at step
    // 2 a pixel's C. The bias is repeated along the run so the loop is flat.
    const int64_t run = step == 1 ? cols * C : C;
    std::vector<T> add_run(run);
    for (int64_t i = 0; i < run; ++i) add_run[i] = add[i % C];
    const T* __restrict__ shift_run = add_run.data();
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t col = 0; col < cols; col += run / C) {
        const T* src = result + (r * Wq + col) * C;
        T* dst = out + ((step * r + ry) * W + step * col + rx) * C;
        if (apply_relu) {
          for (int64_t i = 0; i < run; ++i) dst[i] = relu(src[i] + shift_run[i]);
        } else {
          for (int64_t i = 0; i < run; ++i) dst[i] = src[i] + shift_run[i];
        }
      }
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t r = 0; r < rows; ++r) {
      const T* src = result + c * plane + r * Wq;
      T* dst = out + (c * H + step * r + ry) * W + rx;
      const T b = add[c];
      if (step == 1 && apply_relu) {
        for (int64_t col = 0; col < cols; ++col) dst[col] = relu(src[col] + b);
      } else if (step == 1) {
        for (int64_t col = 0; col < cols; ++col) dst[col] = src[col] + b;
      } else {
        for (int64_t col = 0; col < cols; ++col) {
          const T v = src[col] + b;
          dst[step * col] = apply_relu ? relu(v) : v;
        }
      }
    }
  }
}

}  // namespace CAE_CPU_LEVEL
}  // namespace cpu
}  // namespace cae
