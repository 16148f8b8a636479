// A decoder block (ops.h decoder_block) in one kernel: layers 0 .. L-2 are
// stride-2 transposed correlations with bias and activation, layer L-1 a linear
// stride-1 one, whose output is center-cropped to H_out x W_out; the
// __global__ kernel and its torch-free launcher.
//
// Layout of the work: a block owns `samples` whole images (the decoder's
// images are small: 4x4 -> 8x8 -> 16x16 -> 32x32 in the autoencoder), so no
// halo is ever recomputed or exchanged. The block's input and every hidden
// layer's output live in shared memory as planes with a zero border of one
// pixel (the correlations' padding); the weights pass through one buffer,
// staged layer by layer. Phases separated by barriers:
//   0. the input into plane 0 (with its border), the hidden planes zeroed;
//   1. per hidden layer i: plane i -> plane i + 1, a thread per output pixel
//      of one parity class (stride 2: the class fixes the taps; threads of
//      one class are consecutive, so a warp runs one tap pattern where an
//      image has 32 pixels per class or more) and kBlockGroup channels;
//   2. the last layer at the crop's positions only, stored to global memory;
//      with a target (DecoderLoss), each block also sums the loss of the
//      logits it stores, and the grid's sums become the loss (grid_sums.cuh):
//      the autoencoder's loss costs no launch of its own.
// Each sum runs in correlate_transpose_kernel's order (input channel, ky, kx)
// and every hidden output is rounded to T as the per-op kernel stores it, so
// float32 and float64 results equal the composed per-op path bitwise.
#pragma once

#include <algorithm>

#include "encoder_block_kernels.cuh"
#include "grid_sums.cuh"
#include "loss_kernels.cuh"

namespace cae {
namespace cuda {

// Layers a fused decoder block takes (the autoencoder's has 4).
constexpr int kDecoderMaxLayers = 4;

template <typename T>
struct DecoderBlockArgs {
  T* out;                         // [N, C[L], H_out, W_out]: the crop
  const T* x;                     // [N, C[0], H, W]
  const T* w[kDecoderMaxLayers];  // layer i: [C[i], C[i + 1], 3, 3]
  const T* b[kDecoderMaxLayers];  // layer i: [C[i + 1]]
  int C[kDecoderMaxLayers + 1];   // the input's channels, then each layer's
  int layers, N, H, W;            // H, W: the input's
  int H_out, W_out, top, left;    // the crop and its corner in the last layer's output
  bool relu;
  // Products on tf32 tensor cores where a layer suits them (mma_pass_fits):
  // the hidden layers (decoder_hidden_rows, in the forward and in the
  // backward's recompute alike), the weight gradients of the layers with
  // more than one output channel (decoder_weight_grad_row) and the input
  // gradients where the output gradient has more than one channel
  // (decoder_input_grad); float16, bfloat16, and float32 where TF32 is
  // allowed, sm_80 and newer (EncoderBlockArgs::tensor_cores). The last layer
  // and the bias gradients stay exact.
  bool tensor_cores;
};

// The loss of the block's output where the op asks for it (ops.h
// decoder_block_loss): the mean binary cross-entropy of the logits against
// `target` and the RMSE of their sigmoid, as sigmoid_cross_entropy_kernel
// computes them from the stored (T-rounded) logits. target == nullptr: none.
template <typename Acc>
struct DecoderLoss {
  const Acc* target;   // the output's shape and layout, in Acc (float32 under autocast)
  Acc* loss;           // 0-d
  Acc* rmse;           // 0-d
  GridSums<Acc> sums;  // kLossSums per block
};

// An image's plane in shared memory: [channels][rows][cols] with a zero
// border column on either side (cols = width + 2) and, for a whole plane, a
// border row above and below; the planes of a block's images sample_stride
// apart, at `offset` elements of Acc from the start of shared memory.
struct DecoderPlane {
  int offset, rows, cols, channel_stride, sample_stride;
  // The planes in `smem` as the passes that take SharedPlanes read them
  // (mma_pass, weight_grad_pass_mma): from row `row` on, border included ...
  CAE_DEVICE SharedPlanes<const float> rows_from(const float* smem, int row = 0) const {
    return {smem + offset + row * cols, channel_stride, sample_stride, rows - row, cols, cols};
  }
  // ... or the image's own pixels, inside the border (a whole plane).
  CAE_DEVICE SharedPlanes<const float> interior(const float* smem) const {
    return {smem + offset + cols + 1, channel_stride, sample_stride, rows - 2, cols - 2, cols};
  }
};

// Shared memory: the hidden layers' weight buffer (staged layer by layer;
// vector aligned), the last layer's weights, then the planes. Plane i < L - 1
// holds layer i's input whole (the block's input, then hidden outputs); plane
// L - 1 the last layer's input: with one layer the block's input whole, else
// a strip of `strip_rows` + 2 rows (the last layer's window over strip_rows
// output rows), recomputed strip by strip from plane L - 2.
// The backward's planes are all whole, plane L - 1 too, and plane L holds the
// last layer's output gradient (uncropped, zeros outside the crop); one
// weight buffer, staged per phase. A plane's channel stride is odd, or
// mma_channel_stride where the tensor cores may read it: mma_pass's A
// fragments (8 positions of 4 channels) and weight_grad_pass_mma's (of 8)
// then fall on distinct banks (the model: the backward's shared-memory
// wavefronts 8% fewer, its time ~39 -> ~36 us).
struct DecoderBlockTiling {
  int samples;
  int strip_rows;    // output rows of the last layer per strip (forward)
  int last_weights;  // offset of the last layer's weights (forward)
  // The backward with the loss: offset of the target's elements of the
  // block's images and grad_loss after them (plan_loss_target), or 0.
  int loss_target;
  DecoderPlane plane[kDecoderMaxLayers + 1];
  bool vec_in, vec_out;  // NHWC vector loads / stores allowed
};

struct DecoderBlockPlan {
  DecoderBlockTiling t;
  index_t blocks;
  size_t smem;
  bool ok;  // false: more layers than kDecoderMaxLayers, or one image does not fit
};

// Output channels per thread of the last layer: one where it has one channel
// (the autoencoder's image), else kBlockGroup.
CAE_HOST_DEVICE int decoder_last_group(int channels) { return channels == 1 ? 1 : kBlockGroup; }

// Elements of a layer's weights staged for its forward, [groups][C_in * 9][G]
// with the output channels padded to the group size G.
inline size_t decoder_weight_elements(int c_in, int c_out, int group) {
  return static_cast<size_t>(ceil_div(c_out, group)) * group * c_in * 9;
}

// Fills t's offsets and planes for t.samples images and t.strip_rows (the
// forward) or for the backward; returns the elements of Acc in all.
template <typename T>
inline size_t size_decoder_planes(DecoderBlockTiling& t, const DecoderBlockArgs<T>& a, bool backward) {
  const int L = a.layers;
  size_t offset = 0;
  for (int i = 0; i + 1 < L; ++i)
    offset = std::max(offset, decoder_weight_elements(a.C[i], a.C[i + 1], kBlockGroup));
  if (backward) {  // the input gradients' weights, [group of C_in][C_out * 9][8]
    for (int i = 0; i < L; ++i)
      offset = std::max(offset, decoder_weight_elements(a.C[i + 1], a.C[i], kBlockGroup));
  }
  t.last_weights = static_cast<int>(offset);
  if (!backward) offset += decoder_weight_elements(a.C[L - 1], a.C[L], decoder_last_group(a.C[L]));
  const int planes = backward ? L + 1 : L;
  for (int i = 0; i < planes; ++i) {
    DecoderPlane& p = t.plane[i];
    const bool strip = !backward && L > 1 && i == L - 1;
    const int scale = i < L ? i : L - 1;
    p.offset = static_cast<int>(offset);
    p.rows = strip ? t.strip_rows + 2 : (a.H << scale) + 2, p.cols = (a.W << scale) + 2;
    p.channel_stride = a.tensor_cores ? mma_channel_stride(p.rows * p.cols) : odd_stride(p.rows * p.cols);
    p.sample_stride = a.C[i] * p.channel_stride;
    offset += static_cast<size_t>(t.samples) * p.sample_stride;
  }
  return offset;
}

// `budget`: the shared memory a block may take (the forward: kSmemBudget, by
// strips; the backward: the device's opt-in limit, whole planes).
template <typename T, typename Acc>
inline DecoderBlockPlan plan_decoder_block(const DecoderBlockArgs<T>& a, bool nhwc, bool backward,
                                           size_t budget) {
  DecoderBlockPlan p{};
  DecoderBlockTiling& t = p.t;
  if (a.layers < 1 || a.layers > kDecoderMaxLayers || a.N < 1 || a.H_out < 1 || a.W_out < 1) return p;
  // Far larger images fail the budget anyway; this keeps the planes' int
  // offsets from overflowing before the check.
  if ((static_cast<int64_t>(a.H) << (a.layers - 1)) > (1 << 14) ||
      (static_cast<int64_t>(a.W) << (a.layers - 1)) > (1 << 14))
    return p;
  const auto fits = [&](int samples, int strip_rows) {
    t.samples = samples, t.strip_rows = strip_rows;
    return size_decoder_planes(t, a, backward) * sizeof(Acc) <= budget;
  };
  // The fewest strips that fit (one: the crop's rows at once), then images
  // packed while the grid keeps kBlockFill blocks.
  int rows = a.H_out;
  while (!fits(1, rows) && rows > 1 && a.layers > 1 && !backward) rows = ceil_div(rows, 2);
  if (!fits(1, rows)) return p;
  int samples = 1;
  while (ceil_div(a.N, samples * 2) >= kBlockFill && fits(samples * 2, rows)) samples *= 2;
  t.samples = samples, t.strip_rows = rows;
  const size_t elements = size_decoder_planes(t, a, backward);
  constexpr int V = vec_width<T>();
  t.vec_in = nhwc && vector_ok<V>(a.x, a.C[0], a.C[0]);
  const int C_out = a.C[a.layers], VO = vec_width<T, kBlockGroup>();
  t.vec_out = nhwc && decoder_last_group(C_out) == kBlockGroup && C_out % VO == 0 &&
              reinterpret_cast<uintptr_t>(a.out) % (sizeof(T) * VO) == 0;
  p.blocks = ceil_div(static_cast<index_t>(a.N), static_cast<index_t>(samples));
  p.smem = elements * sizeof(Acc);
  p.ok = true;
  return p;
}

// The backward with the loss where T is the accumulation type and no
// grad_output is added: the target of the block's images (as global memory
// holds them: one run in either layout) and grad_loss copied in after the
// planes with the input, so that the loss's gradient waits for no load of
// its own (stage_loss_grad); where they fit the budget too.
template <typename T, typename Acc>
inline void plan_loss_target(DecoderBlockPlan& p, const DecoderBlockArgs<T>& a, size_t budget) {
  if (!std::is_same<T, Acc>::value || !p.ok) return;
  const size_t extra =
      (static_cast<size_t>(p.t.samples) * a.C[a.layers] * a.H_out * a.W_out + 1) * sizeof(Acc);
  if (p.smem + extra > budget) return;
  p.t.loss_target = static_cast<int>(p.smem / sizeof(Acc));
  p.smem += extra;
}

// arr[i] for a run-time i, as a chain of selects: indexing the kernel's
// parameter arrays at run time would copy them to local memory.
template <typename V, int N>
CAE_DEVICE V pick(const V (&arr)[N], int i) {
  V r = arr[0];
  CAE_UNROLL
  for (int k = 1; k < N; ++k)
    if (k == i) r = arr[k];
  return r;
}

// A transposed weight [C_a][C_b][3][3] in shared memory for sums over a: as
// [group of C_b][C_a * 9][G]; zeros past C_b. Without a conversion by
// copy_async, for the caller's staged_barrier.
template <int G, typename Acc, typename T>
CAE_DEVICE void stage_transposed_weight(Acc* w_s, const T* __restrict__ w, int C_a, int C_b, int tid) {
  const int groups = ceil_div(C_b, G), taps = C_a * 9;
  for (int i = tid; i < groups * taps * G; i += kThreads) {
    const int j = i % G, e = (i / G) % taps, cb = (i / (G * taps)) * G + j;
    const int ca = e / 9, k = e - ca * 9;
    const index_t at = (static_cast<index_t>(ca) * C_b + cb) * 9 + k;
    stage_element(w_s + i, cb < C_b ? w + at : w, cb < C_b);
  }
}

// acc[p][j] += the taps of a stride-2 transposed correlation that reach output
// pixel (y, x + 2 p), p < `valid` <= P (the others stay zero), over `count`
// channels of src (pixel (gy, gx) at src[(gy + 1) * cols + gx + 1]) times
// w[(c * 9 + tap) * G + j], in correlate_transpose_kernel's order of
// summation: the taps with y = 2 gy + ky - 1 (ky = 1 for even y, 0 and 2 for
// odd), likewise x. The P pixels share a column parity, so their taps, and
// each tap's weights are loaded once for them; their inputs are consecutive.
template <int P, int G, typename Acc>
CAE_DEVICE void accumulate_transposed(Acc (&acc)[P][G], const Acc* src, int channel_stride, int cols,
                                      const Acc* w, int count, int y, int x, int valid) {
  for (int c = 0; c < count; ++c, src += channel_stride, w += 9 * G) {
    CAE_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      if ((y + 1 - ky) & 1) continue;
      const int r = ((y + 1 - ky) >> 1) + 1;
      CAE_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        if ((x + 1 - kx) & 1) continue;
        const Acc* sp = src + r * cols + ((x + 1 - kx) >> 1) + 1;
        Acc v[P];
        CAE_UNROLL
        for (int p = 0; p < P; ++p) v[p] = p < valid ? sp[p] : Acc(0);
        add_tap(acc, v, w + (ky * 3 + kx) * G);
      }
    }
  }
}

// Output pixels a thread of the last layer takes, consecutive in a column
// (a warp's lanes on consecutive columns: no bank conflicts): with one output
// channel (the autoencoder's image) 4, so that each weight serves 4 pixels
// and a window of 6 x 3 loads 4 (18 loads a pixel and channel at 1); with a
// group of 8 channels one (the group's accumulators are its registers).
template <int G>
constexpr int decoder_last_pixels() {
  return G == 1 ? 4 : 1;
}

// acc[p][j] += the stride-1 transposed correlation at output pixels (y + p,
// x), p < P (src as accumulate_transposed's), in correlate_transpose_kernel's
// order of summation per pixel. Window rows past `last_row` (the output rows
// end at last_row - 2: pixels that are not stored) read last_row instead.
template <int P, int G, typename Acc>
CAE_DEVICE void accumulate_last_layer(Acc (&acc)[P][G], const Acc* src, int channel_stride, int cols,
                                      const Acc* w, int count, int y, int x, int last_row) {
  int row[P + 2];  // the window's rows: output row y + p reads rows y + p + 2 - ky
  CAE_UNROLL
  for (int r = 0; r < P + 2; ++r) row[r] = (y + r < last_row ? y + r : last_row) * cols + x;
  for (int c = 0; c < count; ++c, src += channel_stride, w += 9 * G) {
    Acc v[P + 2][3];
    CAE_UNROLL
    for (int r = 0; r < P + 2; ++r) {
      CAE_UNROLL
      for (int k = 0; k < 3; ++k) v[r][k] = src[row[r] + k];
    }
    CAE_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      CAE_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        Acc tap[P];
        CAE_UNROLL
        for (int p = 0; p < P; ++p) tap[p] = v[p + 2 - ky][2 - kx];
        add_tap(acc, tap, w + (ky * 3 + kx) * G);
      }
    }
  }
}

// The images n0.. of src ([N, C, H, W] in the layout) into plane p, whose
// first row and column are src's (y0, x0); zeros outside src.
template <bool NHWC, typename T, typename Acc>
CAE_DEVICE void stage_decoder_plane(Acc* smem, const DecoderPlane& p, const T* __restrict__ src, int N, int C,
                                    int H, int W, int n0, int y0, int x0, int samples, bool vec, int tid) {
  const Window win{n0, y0, x0, 0, C, p.rows, p.cols, samples, p.channel_stride, p.sample_stride};
  if (NHWC) {
    stage_nhwc<vec_width<T>()>(smem + p.offset, src, static_cast<const T*>(nullptr), N, C, H, W, win, vec,
                               tid);
  } else {
    stage_nchw(smem + p.offset, src, static_cast<const T*>(nullptr), N, C, H, W, win, tid);
  }
}

// mma_pass's taps for the output positions of row parity PY and column
// parity PX of a stride-2 transposed correlation (accumulate_transposed's,
// in its order): ky = 1 for even rows, 0 and 2 for odd, likewise kx; the
// window of output row y starts at input row y >> 1 of a plane with a border
// row, tap ky reads ((PY + 1 - ky) >> 1) + 1 rows below it.
template <int PY, int PX>
struct TransposedTaps {
  static constexpr int stride = 1, rows = PY ? 2 : 1, cols = PX ? 2 : 1, count = rows * cols;
  static constexpr int ky(int i) { return PY ? 2 * (i / cols) : 1; }
  static constexpr int kx(int i) { return PX ? 2 * (i % cols) : 1; }
  static constexpr int tap(int i) { return ky(i) * 3 + kx(i); }
  static constexpr int dy(int i) { return ((PY + 1 - ky(i)) >> 1) + 1; }
  static constexpr int dx(int i) { return ((PX + 1 - kx(i)) >> 1) + 1; }
};

// decoder_hidden_rows' output rows [y_lo, y_hi) (inside the image) of row
// parity PY and column parity PX through mma_pass: a grid over the input's
// rows and columns, position (row, col) the output pixel (y0 + 2 row, 2 col +
// PX). The weights are at smem[0] as stage_transposed_weight puts them.
template <int PY, int PX, typename T>
CAE_DEVICE void decoder_parity_mma(float* smem, const DecoderBlockArgs<T>& a, const DecoderBlockTiling& t,
                                   int i, const DecoderPlane& dst, int dst_row0, int y_first, int y_lo,
                                   int y_hi, int tid) {
  const DecoderPlane src = pick(t.plane, i);
  const int C_a = pick(a.C, i), C_b = pick(a.C, i + 1);
  const int y0 = y_lo + ((y_lo ^ PY) & 1);  // the parity's first row
  if (y0 >= y_hi) return;
  float* out = smem + dst.offset + (y0 - y_first + dst_row0) * dst.cols + PX + 1;
  mma_pass<kBlockGroup, TransposedTaps<PY, PX>>(
      (y_hi - y0 + 1) >> 1, src.cols - 2, src.rows_from(smem, y0 >> 1), smem, C_a, t.samples,
      ceil_div(C_b, kBlockGroup), tid, kThreads, [&](int s, int row, int col, int co0, float (&v)[2]) {
        finish_activation<T>(v, pick(a.b, i), co0, C_b, a.relu, true);
        float* d = out + s * dst.sample_stride + co0 * dst.channel_stride + 2 * row * dst.cols + 2 * col;
        CAE_UNROLL
        for (int j = 0; j < 2; ++j)
          if (co0 + j < C_b) d[j * dst.channel_stride] = v[j];
      });
}

// decoder_hidden_rows on tensor cores: each parity class through
// decoder_parity_mma, the rows outside the image zeroed.
template <typename T>
CAE_DEVICE void decoder_hidden_rows_mma(float* smem, const DecoderBlockArgs<T>& a,
                                        const DecoderBlockTiling& t, int i, const DecoderPlane& dst,
                                        int dst_row0, int y_first, int rows, int tid) {
  const int h = a.H << (i + 1), width = (pick(t.plane, i).cols - 2) * 2, C_b = pick(a.C, i + 1);
  const int y_lo = y_first > 0 ? y_first : 0, y_hi = y_first + rows < h ? y_first + rows : h;
  for (int y = y_first; y < y_first + rows; ++y) {
    if (y >= y_lo && y < y_hi) continue;
    for (StridedDigits at(tid, width, C_b, t.samples); at.digit[3] < 1; at.advance())
      smem[dst.offset + at.digit[2] * dst.sample_stride + at.digit[1] * dst.channel_stride +
           (y - y_first + dst_row0) * dst.cols + at.digit[0] + 1] = 0.0f;
  }
  decoder_parity_mma<0, 0>(smem, a, t, i, dst, dst_row0, y_first, y_lo, y_hi, tid);
  decoder_parity_mma<0, 1>(smem, a, t, i, dst, dst_row0, y_first, y_lo, y_hi, tid);
  decoder_parity_mma<1, 0>(smem, a, t, i, dst, dst_row0, y_first, y_lo, y_hi, tid);
  decoder_parity_mma<1, 1>(smem, a, t, i, dst, dst_row0, y_first, y_lo, y_hi, tid);
}

// Rows [y_first, y_first + rows) of hidden layer i's output from plane i
// (whole) into `dst`, row y at dst row y - y_first + dst_row0; rows outside
// the image are zeros (the next layer's padding). Bias, activation and T
// rounding as correlate_transpose_kernel stores them. A thread takes P output
// pixels of a row and column parity (columns x, x + 2, ...) and kBlockGroup
// channels; consecutive threads take the next P of the parity (one tap
// pattern), then the other parity, then the next row of the same parity. The
// forward and the backward's recompute take P = 2 (each tap's weights loaded
// once for two pixels), with the same sums as P = 1. On tensor cores where
// mma_pass_fits (decoder_hidden_rows_mma), the same in both.
template <int P, typename T, typename Acc>
CAE_DEVICE void decoder_hidden_rows(Acc* smem, const DecoderBlockArgs<T>& a, const DecoderBlockTiling& t,
                                    int i, const DecoderPlane& dst, int dst_row0, int y_first, int rows,
                                    int tid) {
  constexpr int G = kBlockGroup;
  const DecoderPlane src = pick(t.plane, i);
  const int C_a = pick(a.C, i), C_b = pick(a.C, i + 1), groups = ceil_div(C_b, G), h = a.H << (i + 1);
  if constexpr (std::is_same_v<Acc, float>) {
    if (mma_pass_fits<Acc>(a.tensor_cores, groups))
      return decoder_hidden_rows_mma(smem, a, t, i, dst, dst_row0, y_first, rows, tid);
  }
  const int per_parity = src.cols - 2, half = (rows + 1) >> 1;  // an output row's pixels of one column parity
  // (P pixels of a column parity, the parity, row, sample + samples * group)
  StridedDigits at(tid, ceil_div(per_parity, P), 2, rows);
  for (; at.digit[3] < t.samples * groups; at.advance()) {
    const int s = at.digit[3] % t.samples, g = at.digit[3] / t.samples;
    // The even rows first, then the odd: a warp over several rows runs one row
    // parity's taps (1 or 2 rows of them, not 3).
    const int r = at.digit[2], local = r < half ? 2 * r : 2 * (r - half) + 1;
    const int y = y_first + local, x = 2 * P * at.digit[0] + at.digit[1];
    const int left = per_parity - P * at.digit[0], valid = left < P ? left : P;
    Acc acc[P][G];
    CAE_UNROLL
    for (int p = 0; p < P; ++p) {
      CAE_UNROLL
      for (int j = 0; j < G; ++j) acc[p][j] = Acc(0);
    }
    const bool inside = y >= 0 && y < h;
    if (inside)
      accumulate_transposed(acc, smem + src.offset + s * src.sample_stride, src.channel_stride, src.cols,
                            smem + g * C_a * 9 * G, C_a, y, x, valid);
    Acc* d = smem + dst.offset + s * dst.sample_stride + g * G * dst.channel_stride +
             (local + dst_row0) * dst.cols + x + 1;
    CAE_UNROLL
    for (int p = 0; p < P; ++p) {
      if (p >= valid) break;
      finish_activation<T>(acc[p], pick(a.b, i), g * G, C_b, a.relu, inside);
      CAE_UNROLL
      for (int j = 0; j < G; ++j)
        if (g * G + j < C_b) d[j * dst.channel_stride + 2 * p] = acc[p][j];
    }
  }
}

// The last layer (stride 1, linear) at the crop's output rows [oy0, oy1),
// stored: `src` is the last plane's row of input row top + oy0 - 1. A thread
// takes decoder_last_pixels pixels of a column and G channels.
// With a target, adds each stored logit's cross-entropy and squared error to
// `loss_sums`.
template <int G, bool NHWC, typename T, typename Acc>
CAE_DEVICE void decoder_last_rows(const Acc* smem, const Acc* src, const DecoderBlockArgs<T>& a,
                                  const DecoderBlockTiling& t, const Acc* __restrict__ target,
                                  Acc (&loss_sums)[kLossSums], int n0, int oy0, int oy1, int tid) {
  const int L = a.layers, C_a = pick(a.C, L - 1), C_b = pick(a.C, L), groups = ceil_div(C_b, G);
  const DecoderPlane p = pick(t.plane, L - 1);
  constexpr int P = decoder_last_pixels<G>();
  const int rows = oy1 - oy0;
  StridedDigits at(tid, a.W_out, ceil_div(rows, P), t.samples);  // (column, P rows, sample, group)
  for (; at.digit[3] < groups; at.advance()) {
    const int ox = at.digit[0], y0 = at.digit[1] * P, s = at.digit[2], co0 = at.digit[3] * G;
    Acc acc[P][G];
    CAE_UNROLL
    for (int q = 0; q < P; ++q) {
      CAE_UNROLL
      for (int j = 0; j < G; ++j) acc[q][j] = Acc(0);
    }
    accumulate_last_layer(acc, src + s * p.sample_stride, p.channel_stride, p.cols,
                          smem + t.last_weights + co0 * C_a * 9, C_a, y0, a.left + ox, rows + 1);
    if (n0 + s >= a.N) continue;
    CAE_UNROLL
    for (int q = 0; q < P; ++q) {
      const int oy = oy0 + y0 + q;
      if (oy >= oy1) break;
      store_pixel<G, NHWC>(a.out, acc[q], pick(a.b, L - 1), false, n0 + s, co0, C_b, a.H_out, a.W_out, oy, ox,
                           t.vec_out);
      if (target == nullptr) continue;
      CAE_UNROLL
      for (int j = 0; j < G; ++j) {
        if (co0 + j >= C_b) continue;
        // The logit as stored (store_pixel: bias added, rounded to T).
        const Acc z =
            static_cast<Acc>(static_cast<T>(acc[q][j] + static_cast<Acc>(pick(a.b, L - 1)[co0 + j])));
        const Acc y = target[pixel_offset<NHWC>(n0 + s, co0 + j, oy, ox, C_b, a.H_out, a.W_out)];
        const Acc d = sigmoid(z) - y;
        loss_sums[0] += cross_entropy(z, y);
        loss_sums[1] += d * d;
      }
    }
  }
}

// The whole block for one group of images, G the last layer's channel group.
template <int G, bool NHWC, typename T, typename Acc>
CAE_DEVICE void run_decoder_block(Acc* smem, const DecoderBlockArgs<T>& a, const DecoderBlockTiling& t,
                                  const Acc* __restrict__ target, Acc (&loss_sums)[kLossSums], int n0,
                                  int tid) {
  const int L = a.layers;
  // 0. The input with its border into plane 0, the other planes zeroed (their
  // borders: the layers write the interiors), the last layer's weights.
  const DecoderPlane p0 = t.plane[0];
  stage_decoder_plane<NHWC>(smem, p0, a.x, a.N, a.C[0], a.H, a.W, n0, -1, -1, t.samples, t.vec_in, tid);
  const DecoderPlane last = pick(t.plane, L - 1);
  for (int i = p0.offset + t.samples * p0.sample_stride + tid;
       i < last.offset + t.samples * last.sample_stride; i += kThreads)
    smem[i] = Acc(0);
  stage_transposed_weight<G>(smem + t.last_weights, pick(a.w, L - 1), pick(a.C, L - 1), pick(a.C, L), tid);
  if (L == 1) {
    staged_barrier();
    decoder_last_rows<G, NHWC>(smem, smem + p0.offset + a.top * p0.cols, a, t, target, loss_sums, n0, 0,
                               a.H_out, tid);
    return;
  }
  // 1. The hidden layers but the last, whole planes.
  for (int i = 0; i + 1 < L; ++i) {
    if (i > 0) __syncthreads();  // the previous layer done with the weights, its plane complete
    // The first layer's weights with the input and the last layer's: one wait.
    stage_transposed_weight<kBlockGroup>(smem, pick(a.w, i), pick(a.C, i), pick(a.C, i + 1), tid);
    staged_barrier();
    if (i + 2 < L) decoder_hidden_rows<2>(smem, a, t, i, pick(t.plane, i + 1), 1, 0, a.H << (i + 1), tid);
  }
  // 2. Strip by strip: the last hidden layer's rows under the strip's window,
  // then the last layer's output rows.
  for (int oy0 = 0; oy0 < a.H_out; oy0 += t.strip_rows) {
    const int oy1 = oy0 + t.strip_rows < a.H_out ? oy0 + t.strip_rows : a.H_out;
    if (oy0 > 0) __syncthreads();  // the previous strip done reading
    decoder_hidden_rows<2>(smem, a, t, L - 2, last, 0, a.top + oy0 - 1, oy1 - oy0 + 2, tid);
    __syncthreads();
    decoder_last_rows<G, NHWC>(smem, smem + last.offset, a, t, target, loss_sums, n0, oy0, oy1, tid);
  }
}

template <typename T, typename Acc, bool NHWC>
__global__ void __launch_bounds__(kThreads, block_min_blocks<Acc>())
    decoder_block_kernel(DecoderBlockArgs<T> a, DecoderBlockTiling t, DecoderLoss<Acc> loss) {
  CAE_DYNAMIC_SHARED(Acc, smem);
  __shared__ Acc scratch[kWarps];
  __shared__ int flag;
  const int tid = threadIdx.x, n0 = static_cast<int>(blockIdx.x) * t.samples;
  Acc sums[kLossSums] = {Acc(0), Acc(0)};  // this thread's cross-entropy and squared error
  if (decoder_last_group(pick(a.C, a.layers)) == 1) {
    run_decoder_block<1, NHWC>(smem, a, t, loss.target, sums, n0, tid);
  } else {
    run_decoder_block<kBlockGroup, NHWC>(smem, a, t, loss.target, sums, n0, tid);
  }
  if (loss.target == nullptr) return;
  // 3. The loss: the block's sums in a fixed order, the grid's in the last block.
  Acc* row = loss.sums.partials + static_cast<index_t>(blockIdx.x) * kLossSums;
  for (int k = 0; k < kLossSums; ++k) {
    const Acc v = block_sum(sums[k], scratch);
    if (tid == 0) row[k] = v;
  }
  const Acc* totals = finish_grid_sums(loss.sums, &flag);
  if (totals != nullptr && tid == 0) {
    const Acc count = static_cast<Acc>(static_cast<index_t>(a.N) * pick(a.C, a.layers) * a.H_out * a.W_out);
    *loss.loss = totals[0] / count;
    *loss.rmse = sqrt(totals[1] / count);
  }
}

template <typename T, typename Acc>
inline void launch_decoder_block(const DecoderBlockArgs<T>& a, const DecoderBlockPlan& p,
                                 const DecoderLoss<Acc>& loss, bool nhwc, cudaStream_t stream) {
  with_bool(nhwc, [&](auto layout) {
    const auto kernel = decoder_block_kernel<T, Acc, decltype(layout)::value>;
    CAE_LAUNCH(kernel, static_cast<unsigned>(p.blocks), kThreads, p.smem, stream, a, p.t, loss);
  });
}

// ---------------------------------------------------------------------------
// The backward: the hidden layers recomputed into whole planes (phase 1 of the
// forward), the output gradient staged into the last layer's full extent
// (zeros outside the crop), then layer by layer from the last: its weight
// and bias gradients (each block's partial row, summed over the grid by
// finish_grid_sums), and its input's gradient, which overwrites the input's
// plane (gated by its own ReLU) or goes to grad_input. With the loss
// (DecoderLossGrad), the output gradient is the loss's, staged from the saved
// logits and the target, plus grad_output where given.
// ---------------------------------------------------------------------------

// The loss's gradient in the output's place: (sigmoid(logits) - target) *
// grad_loss / count, as sigmoid_cross_entropy_grad_kernel computes it.
// target == nullptr: none (grad_output is the output's gradient).
template <typename T, typename Acc>
struct DecoderLossGrad {
  const T* logits;       // the forward's output
  const Acc* target;     // in the logits' layout
  const Acc* grad_loss;  // 0-d, on the device: read there (no host sync)
};

template <typename T, typename Acc>
struct DecoderBlockBackwardArgs {
  DecoderBlockArgs<T> f;  // f.out unused
  const T* grad_output;   // [N, C[L], H_out, W_out]; nullptr with a loss: none
  DecoderLossGrad<T, Acc> loss;
  T* grad_input;  // [N, C[0], H, W], or nullptr: not asked for
  T* dw[kDecoderMaxLayers];
  T* db[kDecoderMaxLayers];
  GridSums<Acc> sums;  // a block's row: dw[0] | db[0] | dw[1] | db[1] | ...
  bool vec_grad_output, vec_grad_input;
};

// Elements of layer i's weight and bias gradients, and where they start in a
// partial row.
CAE_HOST_DEVICE int decoder_grad_elements(int c_in, int c_out) { return c_in * c_out * 9 + c_out; }

// Input channels per work item of decoder_weight_grad_row: each position's
// input values are loaded once for kWeightGradChannels x 9 sums, its output
// gradient's window once for all of them.
constexpr int kWeightGradChannels = 4;

// Layer i's weight gradient, then its bias's, over the block's images into
// `row`: dw[ca, cb, ky, kx] = sum of in[ca, gy, gx] * g[cb, S gy + ky - 1,
// S gx + kx - 1], db[cb] = sum of g[cb]. A warp per work item: kWeight-
// GradChannels input channels and one output channel (9 taps each), or one
// bias; its lanes split the positions (image, row, column: consecutive lanes,
// consecutive columns), and the lanes' sums meet in fixed trees
// (warp_reduce_scatter, warp_sum): the same bits every run. On tensor cores
// where mma_pass_fits C_a and C_b > 1: the biases so, then dw by
// weight_grad_pass_mma (the GEMM's rows the input's channels, its columns
// (cb, tap); with one output channel, 7 of a tile's 16 columns would idle and
// each A fragment serve 9 sums: slower than the warps' sums).
template <int S, typename Acc>
CAE_DEVICE void decoder_weight_grad_row(Acc* row, const Acc* smem, const DecoderPlane& in,
                                        const DecoderPlane& g, int C_a, int C_b, int samples,
                                        bool tensor_cores, int tid) {
  constexpr int A = kWeightGradChannels;
  const int h = in.rows - 2, w = in.cols - 2, gh = g.rows - 2, gw = g.cols - 2, lane = tid % 32;
  const bool mma = C_b > 1 && mma_pass_fits<Acc>(tensor_cores, ceil_div(C_a, kBlockGroup));
  const int groups = ceil_div(C_a, A), weight_items = mma ? 0 : groups * C_b, items = weight_items + C_b;
  for (int item = tid / 32; item < items; item += kWarps) {
    if (item >= weight_items) {  // the bias: every position of the output gradient
      const int cb = item - weight_items;
      Acc sum = Acc(0);
      for (StridedDigits at(lane, gw, gh, samples, 32); at.digit[3] < 1; at.advance()) {
        sum += smem[g.offset + at.digit[2] * g.sample_stride + cb * g.channel_stride +
                    (at.digit[1] + 1) * g.cols + at.digit[0] + 1];
      }
      sum = warp_sum(sum);
      if (lane == 0) row[C_a * C_b * 9 + cb] = sum;
      continue;
    }
    const int cb = item % C_b, ca0 = (item / C_b) * A;
    // Channels past C_a read the last one (in bounds) and are not stored.
    int x_off[A];
    CAE_UNROLL
    for (int a = 0; a < A; ++a)
      x_off[a] = in.offset + (ca0 + a < C_a ? ca0 + a : C_a - 1) * in.channel_stride;
    Acc acc[A][9];
    CAE_UNROLL
    for (int a = 0; a < A; ++a) {
      CAE_UNROLL
      for (int k = 0; k < 9; ++k) acc[a][k] = Acc(0);
    }
    for (StridedDigits at(lane, w, h, samples, 32); at.digit[3] < 1; at.advance()) {
      const int x = at.digit[0], y = at.digit[1], s = at.digit[2];
      const int xi = s * in.sample_stride + (y + 1) * in.cols + x + 1;
      const Acc* gs = smem + g.offset + s * g.sample_stride + cb * g.channel_stride + S * y * g.cols + S * x;
      Acc xv[A];
      CAE_UNROLL
      for (int a = 0; a < A; ++a) xv[a] = smem[x_off[a] + xi];
      CAE_UNROLL
      for (int ky = 0; ky < 3; ++ky) {
        CAE_UNROLL
        for (int kx = 0; kx < 3; ++kx) {
          const Acc gv = gs[ky * g.cols + kx];
          CAE_UNROLL
          for (int a = 0; a < A; ++a) acc[a][ky * 3 + kx] += xv[a] * gv;
        }
      }
    }
    // The item's 36 sums over the lanes. Float: the first 32 scattered over the
    // lanes (lane j: sum j), the rest by warp_sum into lane 0; double: warp_sum
    // each (the reduce-scatter's 32 values would spill there).
    constexpr int scattered = sizeof(Acc) == 4 ? 32 : 0;
    static_assert(A * 9 >= 32, "warp_reduce_scatter takes 32 sums");
    if constexpr (scattered > 0) {
      Acc first[32];
      CAE_UNROLL
      for (int f = 0; f < 32; ++f) first[f] = acc[f / 9][f % 9];
      const Acc mine = warp_reduce_scatter(first);
      if (ca0 + lane / 9 < C_a) row[((ca0 + lane / 9) * C_b + cb) * 9 + lane % 9] = mine;
    }
    CAE_UNROLL
    for (int f = scattered; f < A * 9; ++f) {
      const Acc v = warp_sum(acc[f / 9][f % 9]);
      if (lane == 0 && ca0 + f / 9 < C_a) row[((ca0 + f / 9) * C_b + cb) * 9 + f % 9] = v;
    }
  }
  if constexpr (std::is_same<Acc, float>::value) {
    if (mma) {
      weight_grad_pass_mma<S>(row, in.interior(smem), g.rows_from(smem), C_a, C_b, samples, tid);
    }
  }
}

// The gradient of layer i's input: grad[ca, gy, gx] = sum of g[cb, S gy + ky
// - 1, S gx + kx - 1] * w[ca, cb, ky, kx] (w staged as [group of C_a][C_b *
// 9][8]), a thread per input pixel and 8 channels, or on tensor cores where
// mma_pass_fits and C_b > 1 (with one channel of g, 7 of a k-step's 8 would
// be zeros). Into plane `in` in place, gated by its own values where `gate`
// (each element read and written by its own thread), or, with grad_input,
// stored.
template <int S, bool NHWC, typename T, typename Acc>
CAE_DEVICE void decoder_input_grad(Acc* smem, const DecoderBlockArgs<T>& a, const DecoderPlane& in,
                                   const DecoderPlane& g, int C_a, int C_b, int samples, bool gate,
                                   T* grad_input, int n0, bool vec, int tid) {
  constexpr int G = kBlockGroup;
  const int h = in.rows - 2, w = in.cols - 2, groups = ceil_div(C_a, G);
  // Channels ca0.. of image s at (gy, gx), as many as v holds.
  const auto put = [&](int s, int gy, int gx, int ca0, auto& v, bool vec_ok) {
    constexpr int N = std::extent_v<std::remove_reference_t<decltype(v)>>;
    if (grad_input != nullptr) {
      if (n0 + s < a.N)
        store_pixel<N, NHWC>(grad_input, v, static_cast<const T*>(nullptr), false, n0 + s, ca0, C_a, h, w, gy,
                             gx, vec_ok);
      return;
    }
    Acc* d = smem + in.offset + s * in.sample_stride + ca0 * in.channel_stride + (gy + 1) * in.cols + gx + 1;
    CAE_UNROLL
    for (int j = 0; j < N; ++j) {
      if (ca0 + j < C_a) d[j * in.channel_stride] = gate ? gated(v[j], d[j * in.channel_stride]) : v[j];
    }
  };
  if constexpr (std::is_same_v<Acc, float>) {
    if (C_b > 1 && mma_pass_fits<Acc>(a.tensor_cores, groups)) {
      mma_pass<G, AllTaps<S>>(
          h, w, g.rows_from(smem), smem, C_b, samples, groups, tid, kThreads,
          [&](int s, int gy, int gx, int ca0, float (&v)[2]) { put(s, gy, gx, ca0, v, false); });
      return;
    }
  }
  StridedDigits at(tid, w, h, samples);  // (column, row, sample, group)
  for (; at.digit[3] < groups; at.advance()) {
    const int gx = at.digit[0], gy = at.digit[1], s = at.digit[2], ca0 = at.digit[3] * G;
    Acc acc[1][G];
    CAE_UNROLL
    for (int j = 0; j < G; ++j) acc[0][j] = Acc(0);
    accumulate_windows(acc, smem + g.offset + s * g.sample_stride + S * gy * g.cols + S * gx,
                       g.channel_stride, g.cols, smem + at.digit[3] * C_b * 9 * G, C_b);
    put(s, gy, gx, ca0, acc[0], vec);
  }
}

// Plane L's element at digits d (column, row, channel, sample) of the
// block's walk over it: its offset in smem and, where the crop has it, the
// logits' and target's index (else -1). C: plane L's channels.
struct LossElement {
  int at;
  index_t index;
};
template <bool NHWC, typename T>
CAE_DEVICE LossElement loss_element(const DecoderBlockArgs<T>& a, const DecoderPlane& pg, int C, int n0,
                                    const StridedDigits& d) {
  const int x = d.digit[0] - 1 - a.left, y = d.digit[1] - 1 - a.top, c = d.digit[2], n = n0 + d.digit[3];
  const bool inside = n < a.N && y >= 0 && y < a.H_out && x >= 0 && x < a.W_out;
  return {
      pg.offset + d.digit[3] * pg.sample_stride + c * pg.channel_stride + d.digit[1] * pg.cols + d.digit[0],
      inside ? pixel_offset<NHWC>(n, c, y, x, C, a.H_out, a.W_out) : index_t(-1)};
}

// f(at, index) for each of plane L's elements (loss_element), a thread's in
// the plane's order.
template <bool NHWC, typename T, typename Acc, typename F>
CAE_DEVICE void each_loss_element(const DecoderBlockBackwardArgs<T, Acc>& b, const DecoderBlockTiling& t,
                                  int n0, int tid, F&& f) {
  const int C = pick(b.f.C, b.f.layers);
  const DecoderPlane pg = pick(t.plane, b.f.layers);
  for (StridedDigits at(tid, pg.cols, pg.rows, C); at.digit[3] < t.samples; at.advance()) {
    const LossElement e = loss_element<NHWC>(b.f, pg, C, n0, at);
    f(e.at, e.index);
  }
}

// The loss's gradient where plan_loss_target made room and stage_loss_grad
// copied the logits into plane L: (sigmoid(logit) - target) * scale in place,
// after the barrier that ends the copies (before plane L's next barrier).
template <bool NHWC, typename T, typename Acc>
CAE_DEVICE void finish_loss_grad(Acc* smem, const DecoderBlockBackwardArgs<T, Acc>& b,
                                 const DecoderBlockTiling& t, int n0, int tid) {
  const DecoderBlockArgs<T>& a = b.f;
  const index_t per_image = static_cast<index_t>(pick(a.C, a.layers)) * a.H_out * a.W_out,
                first = n0 * per_image;
  const Acc* target = smem + t.loss_target;  // the block's images' run, from global index `first`
  const Acc scale = target[t.samples * per_image] / static_cast<Acc>(a.N * per_image);
  each_loss_element<NHWC>(b, t, n0, tid, [&](int at, index_t i) {
    if (i >= 0) smem[at] = (sigmoid(smem[at]) - target[i - first]) * scale;
  });
}

// The output gradient's plane (plane L, the last layer's full extent, zeros
// outside the crop) from the loss: a thread per element, in the plane's
// order; the logits and the target read where the crop has them. Where
// t.loss_target has room (and no grad_output is added), the logits go into
// plane L and the target and grad_loss after the planes by copies, for
// finish_loss_grad; returns whether they did.
template <bool NHWC, typename T, typename Acc>
CAE_DEVICE bool stage_loss_grad(Acc* smem, const DecoderBlockBackwardArgs<T, Acc>& b,
                                const DecoderBlockTiling& t, int n0, int tid) {
  const DecoderBlockArgs<T>& a = b.f;
  const int L = a.layers, C = pick(a.C, L);
  const DecoderPlane pg = pick(t.plane, L);
  if constexpr (std::is_same<T, Acc>::value) {
    if (t.loss_target > 0 && b.grad_output == nullptr) {
      const index_t per_image = static_cast<index_t>(C) * a.H_out * a.W_out, first = n0 * per_image;
      each_loss_element<NHWC>(b, t, n0, tid, [&](int at, index_t i) {
        copy_async(smem + at, i >= 0 ? b.loss.logits + i : b.loss.logits, i >= 0);
        if (i >= 0) copy_async(smem + t.loss_target + (i - first), b.loss.target + i, true);
      });
      if (tid == 0) copy_async(smem + t.loss_target + t.samples * per_image, b.loss.grad_loss, true);
      return true;
    }
  }
  const Acc scale = static_cast<Acc>(*b.loss.grad_loss) /
                    static_cast<Acc>(static_cast<index_t>(a.N) * C * a.H_out * a.W_out);
  struct Item {
    int at;
    bool inside;
    T logit, grad;
    Acc target;
  };
  StridedDigits at(tid, pg.cols, pg.rows, C);  // (column, row, channel, sample)
  batched_walk<stage_batch<sizeof(T)>()>(
      at, t.samples,
      [&](const StridedDigits& d) {
        const LossElement e = loss_element<NHWC>(a, pg, C, n0, d);
        Item item{e.at, e.index >= 0, T(0.0f), T(0.0f), Acc(0)};
        if (item.inside) {
          item.logit = b.loss.logits[e.index];
          item.target = b.loss.target[e.index];
          if (b.grad_output != nullptr) item.grad = b.grad_output[e.index];
        }
        return item;
      },
      [&](const Item& item) {
        Acc v = Acc(0);
        if (item.inside) {
          v = (sigmoid(static_cast<Acc>(item.logit)) - item.target) * scale;
          if (b.grad_output != nullptr) v += static_cast<Acc>(item.grad);
        }
        smem[item.at] = v;
      });
  return false;
}

template <typename T, typename Acc, bool NHWC>
__global__ void __launch_bounds__(kThreads, block_min_blocks<Acc>())
    decoder_block_backward_kernel(DecoderBlockBackwardArgs<T, Acc> b, DecoderBlockTiling t) {
  constexpr int G = kBlockGroup;
  CAE_DYNAMIC_SHARED(Acc, smem);
  __shared__ int flag;
  const DecoderBlockArgs<T>& a = b.f;
  const int tid = threadIdx.x, n0 = static_cast<int>(blockIdx.x) * t.samples, L = a.layers;
  // 0. The input, the output gradient in the last layer's full extent, the
  // hidden planes zeroed.
  const DecoderPlane p0 = t.plane[0], pg = pick(t.plane, L);
  stage_decoder_plane<NHWC>(smem, p0, a.x, a.N, a.C[0], a.H, a.W, n0, -1, -1, t.samples, t.vec_in, tid);
  bool loss_copied = false;  // the loss's gradient still to finish (finish_loss_grad)
  if (b.loss.target == nullptr) {
    stage_decoder_plane<NHWC>(smem, pg, b.grad_output, a.N, pick(a.C, L), a.H_out, a.W_out, n0, -1 - a.top,
                              -1 - a.left, t.samples, b.vec_grad_output, tid);
  } else {
    loss_copied = stage_loss_grad<NHWC>(smem, b, t, n0, tid);
  }
  for (int i = p0.offset + t.samples * p0.sample_stride + tid; i < pg.offset; i += kThreads) smem[i] = Acc(0);
  // 1. The hidden layers, whole planes.
  for (int i = 0; i + 1 < L; ++i) {
    if (i > 0) __syncthreads();  // the previous layer done with the weights, its plane complete
    // The first layer's weights with the staged planes: one wait.
    stage_transposed_weight<G>(smem, pick(a.w, i), pick(a.C, i), pick(a.C, i + 1), tid);
    staged_barrier();
    if (i == 0 && loss_copied) finish_loss_grad<NHWC>(smem, b, t, n0, tid);
    decoder_hidden_rows<2>(smem, a, t, i, pick(t.plane, i + 1), 1, 0, a.H << (i + 1), tid);
  }
  if (L == 1 && loss_copied) {
    staged_barrier();
    finish_loss_grad<NHWC>(smem, b, t, n0, tid);
  }
  // 2. Layer by layer from the last.
  Acc* row = b.sums.partials + static_cast<index_t>(blockIdx.x) * b.sums.size;
  int offset = b.sums.size;
  for (int i = L - 1; i >= 0; --i) {
    const int C_a = pick(a.C, i), C_b = pick(a.C, i + 1);
    const DecoderPlane in = pick(t.plane, i), g = pick(t.plane, i + 1);
    offset -= decoder_grad_elements(C_a, C_b);
    staged_barrier();  // layer i's output gradient complete, the weights free
    // The input gradient's weights, staged first: their copies land while the
    // weight gradient (which reads only the planes) runs.
    const bool input_grad = i > 0 || b.grad_input != nullptr;
    const T* w = pick(a.w, i);
    for (int k = 0; input_grad && k < ceil_div(C_a, G); ++k) {
      stage_weight_rows<G>(smem + k * C_b * 9 * G, w, static_cast<index_t>(k) * G * C_b * 9, C_b * 9,
                           C_a - k * G, C_b * 9, tid);
    }
    if (i + 1 < L) {
      decoder_weight_grad_row<2>(row + offset, smem, in, g, C_a, C_b, t.samples, a.tensor_cores, tid);
    } else {
      decoder_weight_grad_row<1>(row + offset, smem, in, g, C_a, C_b, t.samples, a.tensor_cores, tid);
    }
    if (!input_grad) break;
    staged_barrier();  // the weight gradient done reading plane i
    T* out = i == 0 ? b.grad_input : nullptr;
    if (i + 1 < L) {
      decoder_input_grad<2, NHWC>(smem, a, in, g, C_a, C_b, t.samples, a.relu, out, n0, b.vec_grad_input,
                                  tid);
    } else {
      decoder_input_grad<1, NHWC>(smem, a, in, g, C_a, C_b, t.samples, a.relu && i > 0, out, n0,
                                  b.vec_grad_input, tid);
    }
  }
  // 3. The grid's sums: the last block converts them into dw and db.
  __threadfence();  // this thread's part of the row, before the block's ticket
  const Acc* totals = finish_grid_sums(b.sums, &flag);
  if (totals == nullptr) return;
  offset = 0;
  for (int i = 0; i < L; ++i) {
    const int C_b = pick(a.C, i + 1), size = pick(a.C, i) * C_b * 9;
    T *dw = pick(b.dw, i), *db = pick(b.db, i);
    for (int e = tid; e < size + C_b; e += kThreads) {
      const T v = static_cast<T>(totals[offset + e]);
      if (e < size) {
        dw[e] = v;
      } else {
        db[e - size] = v;
      }
    }
    offset += size + C_b;
  }
}

template <typename T, typename Acc, class Allow>
inline void launch_decoder_block_backward(const DecoderBlockBackwardArgs<T, Acc>& b,
                                          const DecoderBlockPlan& p, bool nhwc, Allow allow,
                                          cudaStream_t stream) {
  with_bool(nhwc, [&](auto layout) {
    const auto kernel = decoder_block_backward_kernel<T, Acc, decltype(layout)::value>;
    allow(kernel);
    CAE_LAUNCH(kernel, static_cast<unsigned>(p.blocks), kThreads, p.smem, stream, b, p.t);
  });
}

}  // namespace cuda
}  // namespace cae
