// An encoder block's forward in one kernel: a1 = act(b1 + correlate(x, w1)),
// a2 = act(b2 + correlate(a1, w2)), out = max_pool2x2(a2) (ceil mode) or, with
// w_down, act(b_down + correlate_stride2(a2, w_down)); the __global__ kernel and
// its torch-free launcher.
//
// Layout of the work: a block owns a tile of `rows` x `cols` output pixels of
// `samples` images. Backwards from the tile, the a2 region it needs is 2 rows
// x 2 cols (pool) or 2 x tile + 1 (the stride-2 window's halo; one more row
// keeps the row count even), a1 is that plus
// a 1-pixel halo and the input that plus another: the halos are recomputed by
// the neighbouring blocks, never exchanged. Everything lives in shared memory:
// the weights (w1 per input-channel chunk, w2 and w_down whole, as [group][taps]
// [8]), a1 and a2 over their regions, and the input window, in chunks of input
// channels (a1's sums wait in shared memory between chunks). Three phases
// separated by barriers; in each, a thread takes work items (two rows of one
// column of the phase's region, or in phase 3 an output pixel, and a group of
// 8 channels: its accumulators) by StridedDigits:
//   1. a1 over its region (zero outside the image: a2's padding);
//   2. a2 over its region (zero outside the image: the strided conv's padding);
//   3. the pool (a thread per output element) or the stride-2 correlation
//      (a thread per output pixel and group), stored like correlate_kernel's.
// Where asked, phases 1 and 2 also store a1 and a2 at the block's own
// positions (rows and columns [2 y0, 2 (y0 + rows)), not the halo), which tile
// the image. a1 and a2 are rounded to T as the per-op kernels store them, so
// the fused block computes what the composed one does.
#pragma once

#include <algorithm>

#include "conv3x3_kernels.cuh"
#include "max_pool2x2_kernels.cuh"
#include "mma.cuh"

namespace cae {
namespace cuda {

// The pool's winner code of a window whose ReLU at the winner is closed (no
// element takes the gradient); 0 to 3 name the winner, row-major.
constexpr int kPoolNoWinner = 4;

template <typename T>
struct EncoderBlockArgs {
  T* out;                  // [N, C1, H_out, W_out], H_out = ceil(H / 2)
  unsigned char* winners;  // the pool's winner codes, out's layout, or nullptr
  T* a1;                   // [N, C1, H, W] or nullptr
  T* a2;                   // [N, C1, H, W] or nullptr
  const T* x;              // [N, C0, H, W]
  const T* w1;             // [C1, C0, 3, 3]
  const T* b1;             // [C1]
  const T* w2;             // [C1, C1, 3, 3]
  const T* b2;             // [C1]
  const T* w_down;         // [C1, C1, 3, 3], or nullptr: the pool
  const T* b_down;         // [C1] with w_down
  int N, C0, C1, H, W, H_out, W_out;
  bool relu;
  // Products on tf32 tensor cores where a pass suits them (mma_pass_fits: at
  // most 16 output channels): float16, bfloat16 (exact in tf32) and float32
  // where TF32 is allowed, sm_80 and newer. a2 = correlate(a1, w2) takes them
  // in the forward and in the backward's recompute alike (the same sums, so
  // the same ReLU gates and pool winners).
  bool tensor_cores;
};

// Output channels per work item: a thread's accumulators.
constexpr int kBlockGroup = 8;
// Groups of output channels a tensor-core pass takes at most (mma_pass).
constexpr int kMmaGroups = 2;
// Input channels from which a1 = correlate(x, w1) takes the tensor cores too:
// with fewer, the FP32 loop issues less than k-steps padded to 8 channels.
constexpr int kMmaA1Channels = 4;

// Whether a1 runs on tensor cores (layer_pass_mma): where a2 may and x has
// kMmaA1Channels or more. The forward and the backward's recompute decide
// alike, so they find the same sums and ReLU gates.
template <typename Acc, typename T>
CAE_HOST_DEVICE bool a1_on_tensor_cores(const EncoderBlockArgs<T>& a) {
  return std::is_same<Acc, float>::value && a.tensor_cores && a.C0 >= kMmaA1Channels &&
         ceil_div(a.C1, kBlockGroup) <= kMmaGroups;
}

// A block's tile and its shared memory (elements of Acc): weights first (each
// a multiple of kBlockGroup elements: vector aligned), then a1, a2, the input.
struct EncoderBlockTiling {
  int rows, cols, samples;  // output pixels per image, images
  int tiles_y, tiles_x;
  int r2, c2, r1, c1, r0, c0;  // the a2, a1 and input regions
  int chunk;                   // input channels per pass
  int groups;                  // ceil(C1 / kBlockGroup)
  int stride2, sample2;        // a2: elements between channels (odd), images
  int stride1, sample1;        // a1
  int stride0, sample0;        // input window
  int w1_size, w2_size, wd_size;
  bool vec_in, vec_act, vec_out;  // NHWC vector loads / stores allowed
};

struct EncoderBlockPlan {
  EncoderBlockTiling t;
  index_t blocks;
  size_t smem;
  bool ok;  // false: no tile fits the shared-memory budget (too many channels)
};

// A plane's channel stride for layer_pass_mma's A loads (lane (g, t) reads
// position g of channel t): 24 mod 32, channels t at banks 0, 24, 16, 8 with
// the 8 positions in between. (8 mod 32 would do as well here; 24 also keeps
// weight_grad_pass_mma's B tiles that span two channels off each other's
// banks, with the backward's row pitch: backward_pitch.)
inline int mma_channel_stride(int n) { return n + ((24 - n) % 32 + 32) % 32; }

// The regions and the shared memory of `t.rows` x `t.cols` x `t.samples` with
// a chunk of one input channel (fixed: everything but the input's chunk);
// `mma`: a2 on tensor cores (mma_channel_stride for a1), `mma_a1`: a1 too
// (mma_channel_stride for the input window).
inline void size_encoder_regions(EncoderBlockTiling& t, int C1, bool strided, bool mma, bool mma_a1,
                                 size_t& fixed, size_t& per_channel) {
  // Strided: the window's halo column, and two more rows (one for the halo,
  // one so that the count stays even: threads take rows in pairs).
  t.r2 = 2 * t.rows + (strided ? 2 : 0), t.c2 = 2 * t.cols + (strided ? 1 : 0);
  t.r1 = t.r2 + 2, t.c1 = t.c2 + 2;
  t.r0 = t.r1 + 2, t.c0 = t.c1 + 2;
  t.stride2 = odd_stride(t.r2 * t.c2), t.sample2 = C1 * t.stride2;
  t.stride1 = mma ? mma_channel_stride(t.r1 * t.c1) : odd_stride(t.r1 * t.c1), t.sample1 = C1 * t.stride1;
  t.stride0 = mma_a1 ? mma_channel_stride(t.r0 * t.c0) : odd_stride(t.r0 * t.c0);
  const size_t c1p = static_cast<size_t>(t.groups) * kBlockGroup;
  t.w2_size = static_cast<int>(c1p * C1 * 9), t.wd_size = strided ? t.w2_size : 0;
  fixed =
      static_cast<size_t>(t.w2_size) + t.wd_size + static_cast<size_t>(t.samples) * (t.sample1 + t.sample2);
  per_channel = static_cast<size_t>(t.samples) * t.stride0 + c1p * 9;
}

template <typename T, typename Acc>
inline EncoderBlockPlan plan_encoder_block(const EncoderBlockArgs<T>& a, bool nhwc) {
  const bool strided = a.w_down != nullptr;
  EncoderBlockPlan p{};
  EncoderBlockTiling& t = p.t;
  if (a.C0 < 1) return p;  // no input channels: nothing to chunk (the composed block serves)
  t.groups = ceil_div(a.C1, kBlockGroup);
  // Up to 8 x 8 output pixels, balanced (a pooled 28 x 28 is 4 tiles of 7 x 7:
  // no a2 computed past the image), images packed while a2's positions fill
  // the block's threads and the grid keeps kBlockFill blocks.
  t.rows = balanced_tile(a.H_out, 8), t.cols = balanced_tile(a.W_out, 8);
  const index_t tiles = static_cast<index_t>(ceil_div(a.H_out, t.rows)) * ceil_div(a.W_out, t.cols);
  const int a2_positions = (2 * t.rows) * (2 * t.cols);
  t.samples = 1;
  while (t.samples * 2 * a2_positions <= kThreads && tiles * ceil_div(a.N, t.samples * 2) >= kBlockFill)
    t.samples *= 2;
  // Smaller tiles until a1, a2, the weights and one input channel fit (a1 on
  // tensor cores: 8 channels, a k-step, or all of them).
  const bool mma_a1 = a1_on_tensor_cores<Acc>(a);
  const int least_chunk = mma_a1 ? std::min(a.C0, 8) : 1;
  size_t fixed = 0, per_channel = 0;
  for (;;) {
    size_encoder_regions(t, a.C1, strided, a.tensor_cores && t.groups <= kMmaGroups, mma_a1, fixed,
                         per_channel);
    if ((fixed + per_channel * least_chunk) * sizeof(Acc) <= kSmemBudget) break;
    if (t.samples > 1) {
      t.samples /= 2;
    } else if (t.rows >= t.cols && t.rows > 1) {
      t.rows = balanced_tile(a.H_out, t.rows - 1);
    } else if (t.cols > 1) {
      t.cols = balanced_tile(a.W_out, t.cols - 1);
    } else {
      return p;  // not even one output pixel: C1 too large
    }
  }
  constexpr int V = vec_width<T>();
  t.chunk =
      plan_channel_chunk(a.C0, per_channel * sizeof(Acc), fixed * sizeof(Acc), kSmemBudget, nhwc ? V : 1);
  if (mma_a1 && t.chunk < a.C0) {
    // Whole k-steps a chunk: the chunks' sums then run in the one-pass order
    // of the backward's recompute, bit for bit.
    const size_t fit = (kSmemBudget / sizeof(Acc) - fixed) / per_channel;
    t.chunk = static_cast<int>(fit / 8 * 8);
  }
  t.w1_size = t.groups * kBlockGroup * t.chunk * 9;
  t.sample0 = t.chunk * t.stride0;
  t.tiles_y = ceil_div(a.H_out, t.rows), t.tiles_x = ceil_div(a.W_out, t.cols);
  t.vec_in = nhwc && t.chunk % V == 0 && vector_ok<V>(a.x, a.C0, a.C0);
  constexpr int VO = vec_width<T, kBlockGroup>();
  const auto aligned = [&](const T* q) {
    return q == nullptr || reinterpret_cast<uintptr_t>(q) % (sizeof(T) * VO) == 0;
  };
  t.vec_act = nhwc && a.C1 % VO == 0 && aligned(a.a1) && aligned(a.a2);
  t.vec_out = nhwc && a.C1 % VO == 0 && aligned(a.out);
  p.blocks = static_cast<index_t>(t.tiles_y) * t.tiles_x * ceil_div(a.N, t.samples);
  p.smem =
      (static_cast<size_t>(t.w1_size) + fixed + static_cast<size_t>(t.samples) * t.sample0) * sizeof(Acc);
  p.ok = true;
  return p;
}

// One layer's result at a position: act(acc + bias), rounded to T as a stored
// activation is, zero outside the image (the next correlation's padding).
template <typename T, int G, typename Acc>
CAE_DEVICE void finish_activation(Acc (&v)[G], const T* __restrict__ bias, int co0, int C, bool relu_out,
                                  bool inside) {
  CAE_UNROLL
  for (int j = 0; j < G; ++j) {
    const int co = co0 + j;
    Acc r = v[j];
    if (co < C) r += static_cast<Acc>(bias[co]);
    r = relu_out ? relu(r) : r;
    v[j] = inside ? static_cast<Acc>(static_cast<T>(r)) : Acc(0);
  }
}

// acc[p][j] += v[p] * wk[j] for P pixels and G channels: one tap, its weights
// loaded once (vectors of WV) for the P pixels.
template <int P, int G, typename Acc>
CAE_DEVICE void add_tap(Acc (&acc)[P][G], const Acc (&v)[P], const Acc* wk) {
  constexpr int WV = vec_width<Acc, G>();
  CAE_UNROLL
  for (int j = 0; j < G; j += WV) {
    const Vec<Acc, WV> wv = *reinterpret_cast<const Vec<Acc, WV>*>(wk + j);
    CAE_UNROLL
    for (int p = 0; p < P; ++p) {
      CAE_UNROLL
      for (int k = 0; k < WV; ++k) acc[p][j + k] += v[p] * wv.v[k];
    }
  }
}

// acc[p][j] += the 3x3 window of pixel p of P in one column (rows p .. p + 2
// from src; channel c at src[c * channel_stride], rows row_stride apart) times
// w[(c * 9 + tap) * G + j], over `count` channels, in correlate_kernel's order
// of summation. A tap's weights are one shared-memory vector per WV channels,
// the same address in every thread of a group (a broadcast), loaded once for
// the P pixels, and so are the (P + 2) x 3 input values (the unrolled loads of
// row ky + 1 for pixel 0 are row ky's for pixel 1): with P = 2, 12 input and 18
// weight loads per channel for 144 FFMA, against 18 and 36 one pixel at a time.
template <int P, int G, typename Acc>
CAE_DEVICE void accumulate_windows(Acc (&acc)[P][G], const Acc* src, int channel_stride, int row_stride,
                                   const Acc* w, int count) {
  for (int c = 0; c < count; ++c, src += channel_stride, w += 9 * G) {
    CAE_UNROLL
    for (int ky = 0; ky < 3; ++ky) {
      CAE_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        Acc v[P];
        CAE_UNROLL
        for (int p = 0; p < P; ++p) v[p] = src[(ky + p) * row_stride + kx];
        add_tap(acc, v, w + (ky * 3 + kx) * G);
      }
    }
  }
}

// One layer (a1 or a2) over its region in shared memory, from the region of
// its input (one row and column before it, in shared memory too). A work item
// is two rows of one column and a group of G channels.
template <typename Acc>
struct SharedPlanes {
  Acc* p;  // [samples][channels][rows][cols], rows `pitch` elements apart
  int channel_stride, sample_stride, rows, cols, pitch;
  CAE_DEVICE Acc* at(int s, int c, int row, int col) const {
    return p + s * sample_stride + c * channel_stride + row * pitch + col;
  }
};

template <typename T>
struct LayerPass {
  const T* bias;
  T* interior;       // where the layer's own positions are stored, or nullptr
  int y0, x0;        // the region's first row and column in the image
  int own_y, own_x;  // the block's own positions: [own_y, own_y + own_size_y) x ...
  int own_size_y, own_size_x;
  int n0, N, C, H, W;
  bool relu, vec;
  bool tensor_cores = false;  // whole_layer_pass: on tensor cores (layer_pass_mma)
};

// Input channels [0, count) of src through w ([group][count * 9][G]) into dst;
// `first`: dst holds no sums yet, `last`: the channels are complete (bias,
// activation, T rounding, zero outside the image; interior stores).
template <int G, bool NHWC, typename T, typename Acc>
CAE_DEVICE void layer_pass(const SharedPlanes<Acc>& dst, const SharedPlanes<const Acc>& src, const Acc* w,
                           int count, int samples, int groups, bool first, bool last, const LayerPass<T>& l,
                           int tid, int threads = kThreads) {
  StridedDigits at(tid, dst.cols, dst.rows / 2, samples, threads);  // (col, row pair, sample, group)
  for (; at.digit[3] < groups; at.advance()) {
    const int col = at.digit[0], row = 2 * at.digit[1], s = at.digit[2], co0 = at.digit[3] * G;
    Acc* d = dst.at(s, co0, row, col);
    Acc acc[2][G];
    CAE_UNROLL
    for (int i = 0; i < 2; ++i) {
      CAE_UNROLL
      for (int j = 0; j < G; ++j)
        acc[i][j] = first || co0 + j >= l.C ? Acc(0) : d[j * dst.channel_stride + i * dst.pitch];
    }
    accumulate_windows(acc, src.at(s, 0, row, col), src.channel_stride, src.pitch, w + co0 * count * 9,
                       count);
    CAE_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int n = l.n0 + s, y = l.y0 + row + i, xx = l.x0 + col;
      const bool inside = y >= 0 && y < l.H && xx >= 0 && xx < l.W;
      if (last) finish_activation<T>(acc[i], l.bias, co0, l.C, l.relu, inside);
      CAE_UNROLL
      for (int j = 0; j < G; ++j)
        if (co0 + j < l.C) d[j * dst.channel_stride + i * dst.pitch] = acc[i][j];
      const bool own =
          y >= l.own_y && y < l.own_y + l.own_size_y && xx >= l.own_x && xx < l.own_x + l.own_size_x;
      if (last && l.interior != nullptr && inside && n < l.N && own)
        store_pixel<G, NHWC>(l.interior, acc[i], static_cast<const T*>(nullptr), false, n, co0, l.C, l.H, l.W,
                             y, xx, l.vec);
    }
  }
}

// A pass of layer_pass's shape (3x3 windows of src, planes one row and column
// before dst's positions, through w as [group][count * 9][G]) on tensor cores:
// an implicit GEMM [positions] x [9 taps x input channels] x [output
// channels] through m16n8k8 tf32 products (mma.cuh), float accumulation, at
// most kMmaGroups groups of output channels. A warp takes kMmaPassTiles
// tiles of 16 positions of dst (mma_pass_strips: 8 columns of 2 rows, the
// tiles stacked down the strip; mma_pass_positions: 16 consecutive
// positions, row-major, samples one after the other) and every group: each
// B fragment (a tap's weights) loaded once serves the tiles. k runs over the
// input channels in 8s (zeros past `count`), each over the taps, always in
// one order: the forward and the backward's recompute get the same sums.
// Operands are rounded to tf32 (cvt.rna, as the per-op kernels stage them):
// float16 and bfloat16 values are tf32 already, but the backward's
// gradients in shared memory are floats whatever T is. `finish(s, row, col,
// co0, v)` takes the sums of channels co0 and co0 + 1 at a position of dst.
// `Taps` names the taps summed, in order,
// and their windows' rows and columns (AllTaps: the correlation's 9;
// TransposedTaps: one parity class of a stride-2 transposed correlation) and
// the windows' stride: position (row, col) of dst reads src's window at
// (stride x row, stride x col).
constexpr int kMmaPassTiles = 2;

template <int S = 1>
struct AllTaps {
  static constexpr int stride = S, count = 9;
  static constexpr int tap(int i) { return i; }  // ky * 3 + kx
  static constexpr int dy(int i) { return i / 3; }
  static constexpr int dx(int i) { return i % 3; }
};

// `init(s, row, col, co0, v)`, where given, gives the sums to start from (an
// earlier chunk's input channels), else they start at zero.
struct NoInit {
  CAE_DEVICE void operator()(int, int, int, int, float (&)[2]) const {}
};

// A lane's operands of the k-step from input channel c0: A's channels c_lo =
// c0 + t4 and c_hi = c_lo + 4 of src (zero past `count`), their rows of w.
struct MmaKStep {
  bool lo_in, hi_in;
  const float *a_lo, *a_hi, *w_lo, *w_hi;
  CAE_DEVICE MmaKStep(const SharedPlanes<const float>& src, const float* w, int count, int c0, int g, int t4)
      : lo_in(c0 + t4 < count),
        hi_in(c0 + t4 + 4 < count),
        a_lo(src.p + (c0 + t4) * src.channel_stride),
        a_hi(src.p + (c0 + t4 + 4) * src.channel_stride),
        w_lo(w + ((c0 + t4) * 9) * kBlockGroup + g),
        w_hi(w + ((c0 + t4 + 4) * 9) * kBlockGroup + g) {}

  // The B fragments of tap `tap`: each group's weights, zero past the groups
  // and the channels.
  CAE_DEVICE void load_b(uint32_t (&b)[kMmaGroups][2], int tap, int groups, int group_stride) const {
    CAE_UNROLL
    for (int nt = 0; nt < kMmaGroups; ++nt) {
      const int at = nt * group_stride + tap * kBlockGroup;
      const bool in = nt < groups;
      b[nt][0] = to_tf32(in && lo_in ? w_lo[at] : 0.0f);
      b[nt][1] = to_tf32(in && hi_in ? w_hi[at] : 0.0f);
    }
  }
};

// f(s, row, col, co0, v) on the sums of A's row r of an item's M tiles (row
// 8 r + g of the 16 M), each group's: channels co0 = nt * 8 + 2 t4 and co0 + 1
// in acc[r / 2][nt][2 (r % 2) + (0, 1)], written back.
template <int M, typename F>
CAE_DEVICE void each_group_pair(float (&acc)[M][kMmaGroups][4], int r, int groups, int t4, int s, int row,
                                int col, F&& f) {
  CAE_UNROLL
  for (int nt = 0; nt < kMmaGroups; ++nt) {
    if (nt >= groups) break;
    float* pair = acc[r / 2][nt] + 2 * (r % 2);
    float v[2] = {pair[0], pair[1]};
    f(s, row, col, nt * kBlockGroup + 2 * t4, v);
    pair[0] = v[0], pair[1] = v[1];
  }
}

// mma_pass for the 3x3 stride-1 correlation (AllTaps<1>), the tiles stacked
// down a strip of 8 columns: a warp item is column x0 + g of output rows y0
// .. y0 + 2 M - 1 of one sample, tile m rows y0 + 2 m (A's rows g) and
// y0 + 2 m + 1 (rows g + 8). Tap (ky, kx) of tile m reads window rows 2 m +
// ky and 2 m + ky + 1, so the strip's 2 M + 2 window rows, each loaded once
// per column offset kx and k-step, serve all of its taps: 3 (2 M + 2) A
// loads of a channel where M tiles of 16 positions in a row take 9 x 2 M
// (18 against 36), and 8 positions of one row never wrap (no bank conflict
// over mma_channel_stride's planes). Lanes past the columns, and rows past the
// end, compute on the last ones (the loads' addresses clamped) and are not
// finished; a tile wholly past the rows is skipped. Per k-step the taps go
// kx-major (kx, then ky): one order for every position, so the forward and
// the backward's recompute still agree.
template <int G, typename Finish, typename Init>
CAE_DEVICE void mma_pass_strips(int rows, int cols, const SharedPlanes<const float>& src, const float* w,
                                int count, int samples, int groups, int tid, int threads, Finish&& finish,
                                Init&& init) {
  constexpr int M = kMmaPassTiles, R = 2 * M;  // a strip's output rows
  if (rows < 1 || cols < 1) return;            // no items (StridedDigits takes no zero radix)
  const int lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int group_stride = count * 9 * G;
  // A warp's items: (strip, band of R rows, sample).
  StridedDigits at(tid / 32, ceil_div(cols, 8), ceil_div(rows, R), samples, threads / 32);
  for (; at.digit[3] < 1; at.advance()) {
    const int col = at.digit[0] * 8 + g, y0 = at.digit[1] * R, s = at.digit[2];
    // The window rows y0 .. y0 + R + 1; a finished position reads none past row rows + 1.
    int window[R + 2];
    CAE_UNROLL
    for (int j = 0; j < R + 2; ++j) {
      const int row = y0 + j < rows + 1 ? y0 + j : rows + 1;
      window[j] = static_cast<int>(src.at(s, 0, row, col < cols ? col : cols - 1) - src.p);
    }
    float acc[M][kMmaGroups][4] = {};
    // f(s, row, col, co0, v) for each of the lane's sums: rows y0 + 2 m and
    // y0 + 2 m + 1 x channels nt * 8 + 2 t4 + (0, 1) are acc[m][nt].
    const auto each_sum_pair = [&](auto&& f) {
      if (col >= cols) return;
      CAE_UNROLL
      for (int r = 0; r < R; ++r) {
        if (y0 + r >= rows) break;
        each_group_pair(acc, r, groups, t4, s, y0 + r, col, f);
      }
    };
    if constexpr (!std::is_same<std::decay_t<Init>, NoInit>::value) each_sum_pair(init);
    for (int c0 = 0; c0 < count; c0 += 8) {
      const MmaKStep k(src, w, count, c0, g, t4);
      CAE_UNROLL
      for (int kx = 0; kx < 3; ++kx) {
        uint32_t lo[R + 2], hi[R + 2];
        CAE_UNROLL
        for (int j = 0; j < R + 2; ++j) {
          lo[j] = to_tf32(k.lo_in ? k.a_lo[window[j] + kx] : 0.0f);
          hi[j] = to_tf32(k.hi_in ? k.a_hi[window[j] + kx] : 0.0f);
        }
        CAE_UNROLL
        for (int ky = 0; ky < 3; ++ky) {
          uint32_t b[kMmaGroups][2];
          k.load_b(b, ky * 3 + kx, groups, group_stride);
          CAE_UNROLL
          for (int m = 0; m < M; ++m) {
            if (y0 + 2 * m >= rows) break;  // the strip's last tiles past the rows (one item: the warp's)
            const uint32_t a[4] = {lo[2 * m + ky], lo[2 * m + ky + 1], hi[2 * m + ky], hi[2 * m + ky + 1]};
            CAE_UNROLL
            for (int nt = 0; nt < kMmaGroups; ++nt) {
              if (nt >= groups) break;
              mma_m16n8k8_tf32(acc[m][nt], a, b[nt], acc[m][nt]);
            }
          }
        }
      }
    }
    each_sum_pair(finish);
  }
}

// mma_pass for the other taps (a stride-2 correlation, a transposed
// correlation's parity class): a warp item is kMmaPassTiles tiles of 16
// consecutive positions of dst.
template <int G, typename Taps, typename Finish, typename Init>
CAE_DEVICE void mma_pass_positions(int rows, int cols, const SharedPlanes<const float>& src, const float* w,
                                   int count, int samples, int groups, int tid, int threads, Finish&& finish,
                                   Init&& init) {
  constexpr int M = kMmaPassTiles;
  const int lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int per_sample = rows * cols, positions = samples * per_sample;
  const int group_stride = count * 9 * G;
  // The lane's rows of A: positions m0 + 8 r + g (r < 2 M; past the end: the
  // last one, computed and not finished).
  const auto position = [&](int m0, int r) {
    const int p = m0 + 8 * r + g;
    return p < positions ? p : positions - 1;
  };
  for (int m0 = tid / 32 * 16 * M; m0 < positions; m0 += threads / 32 * 16 * M) {
    int base[2 * M];  // the rows' windows in src, from src.p
    CAE_UNROLL
    for (int r = 0; r < 2 * M; ++r) {
      const int p = position(m0, r), s = p / per_sample;
      base[r] = static_cast<int>(
          src.at(s, 0, Taps::stride * (p % per_sample / cols), Taps::stride * (p % cols)) - src.p);
    }
    float acc[M][kMmaGroups][4] = {};
    // f(s, row, col, co0, v) for each of the lane's sums: positions (g, g + 8)
    // of tile m x channels nt * 8 + 2 t4 + (0, 1) are acc[m][nt].
    const auto each_sum_pair = [&](auto&& f) {
      CAE_UNROLL
      for (int r = 0; r < 2 * M; ++r) {
        const int p = m0 + 8 * r + g;
        if (p >= positions) continue;
        each_group_pair(acc, r, groups, t4, p / per_sample, p % per_sample / cols, p % cols, f);
      }
    };
    if constexpr (!std::is_same<std::decay_t<Init>, NoInit>::value) each_sum_pair(init);
    for (int c0 = 0; c0 < count; c0 += 8) {
      const MmaKStep k(src, w, count, c0, g, t4);
      CAE_UNROLL
      for (int i = 0; i < Taps::count; ++i) {
        const int off = Taps::dy(i) * src.pitch + Taps::dx(i);
        uint32_t b[kMmaGroups][2];
        k.load_b(b, Taps::tap(i), groups, group_stride);
        CAE_UNROLL
        for (int m = 0; m < M; ++m) {
          const int r0 = base[2 * m] + off, r1 = base[2 * m + 1] + off;
          const uint32_t a[4] = {to_tf32(k.lo_in ? k.a_lo[r0] : 0.0f), to_tf32(k.lo_in ? k.a_lo[r1] : 0.0f),
                                 to_tf32(k.hi_in ? k.a_hi[r0] : 0.0f), to_tf32(k.hi_in ? k.a_hi[r1] : 0.0f)};
          CAE_UNROLL
          for (int nt = 0; nt < kMmaGroups; ++nt) {
            if (nt >= groups) break;
            mma_m16n8k8_tf32(acc[m][nt], a, b[nt], acc[m][nt]);
          }
        }
      }
    }
    each_sum_pair(finish);
  }
}

template <int G, typename Taps = AllTaps<>, typename Finish, typename Init = NoInit>
CAE_DEVICE void mma_pass(int rows, int cols, const SharedPlanes<const float>& src, const float* w, int count,
                         int samples, int groups, int tid, int threads, Finish&& finish, Init&& init = {}) {
  static_assert(G == 8, "mma_pass: a group is one n = 8 tile");
  if constexpr (Taps::stride == 1 && Taps::count == 9)
    mma_pass_strips<G>(rows, cols, src, w, count, samples, groups, tid, threads, finish, init);
  else
    mma_pass_positions<G, Taps>(rows, cols, src, w, count, samples, groups, tid, threads, finish, init);
}

// layer_pass's work through mma_pass, finished as layer_pass finishes it:
// `first`, dst holds no sums yet; `last`, the channels are complete. Chunks
// of whole k-steps (8 channels) sum in the one-pass order.
template <int G, bool NHWC, typename T>
CAE_DEVICE void layer_pass_mma(const SharedPlanes<float>& dst, const SharedPlanes<const float>& src,
                               const float* w, int count, int samples, int groups, bool first, bool last,
                               const LayerPass<T>& l, int tid, int threads) {
  const auto finish = [&](int s, int row, int col, int co0, float (&v)[2]) {
    const int n = l.n0 + s, y = l.y0 + row, xx = l.x0 + col;
    const bool inside = y >= 0 && y < l.H && xx >= 0 && xx < l.W;
    if (last) finish_activation<T>(v, l.bias, co0, l.C, l.relu, inside);
    float* d = dst.at(s, co0, row, col);
    CAE_UNROLL
    for (int j = 0; j < 2; ++j)
      if (co0 + j < l.C) d[j * dst.channel_stride] = v[j];
    const bool own =
        y >= l.own_y && y < l.own_y + l.own_size_y && xx >= l.own_x && xx < l.own_x + l.own_size_x;
    if (last && l.interior != nullptr && inside && n < l.N && own)
      store_pixel<2, NHWC>(l.interior, v, static_cast<const T*>(nullptr), false, n, co0, l.C, l.H, l.W, y, xx,
                           false);
  };
  if (first) return mma_pass<G>(dst.rows, dst.cols, src, w, count, samples, groups, tid, threads, finish);
  mma_pass<G>(dst.rows, dst.cols, src, w, count, samples, groups, tid, threads, finish,
              [&](int s, int row, int col, int co0, float (&v)[2]) {
                const float* d = dst.at(s, co0, row, col);
                CAE_UNROLL
                for (int j = 0; j < 2; ++j) v[j] = co0 + j < l.C ? d[j * dst.channel_stride] : 0.0f;
              });
}

// Whether a pass of `groups` output groups runs on tensor cores: where the
// kernel's arguments allow them (dtype, device) and the groups fit mma_pass.
template <typename Acc>
CAE_DEVICE bool mma_pass_fits(bool tensor_cores, int groups) {
  return std::is_same<Acc, float>::value && tensor_cores && groups <= kMmaGroups;
}

// A 3x3 weight gradient on tensor cores, for C_g <= 16: the GEMM dw[c][(ci,
// tap)] = sum_p g[c][p] src[ci][S p + tap] (src padded: tap (ky, kx) at ky
// rows and kx columns from the window's start) as m16n8k8 tf32 products into
// row[c * C_src * 9 + ci * 9 + tap]; M the channels of g (zero past C_g), N
// the C_src x 9 columns (n = ci * 9 + tap, zero past them), k 8 positions of
// g (samples x rows x cols, row-major). A warp item is kMmaGradTiles n-tiles
// and one of `slices` interleaved shares of the k-steps; the slices add into
// `row` one after the other, between barriers (fixed order: deterministic).
// The encoder's backward (dw1, dw2, dw_down) and the decoder's take it.
constexpr int kMmaGradTiles = 6;

// A position (sample, row, column) of rows x cols planes that advances by a
// fixed number of positions, d_rows rows and d_cols < cols columns, with no
// division.
struct PlaneWalk {
  int s, r, c;
  CAE_DEVICE PlaneWalk(int p, int rows, int cols)
      : s(p / (rows * cols)), r(p % (rows * cols) / cols), c(p % cols) {}
  CAE_DEVICE void advance(int d_rows, int d_cols, int rows, int cols) {
    c += d_cols, r += d_rows;
    if (c >= cols) c -= cols, ++r;
    while (r >= rows) r -= rows, ++s;
  }
};

// One warp item of weight_grad_pass_mma: n-tiles [tile0, tile0 + kMmaGradTiles)
// over slice `slice` of `slices` of the k-steps (`busy` false: the warp only
// keeps the barriers), added into `row` slice after slice.
template <int S>
CAE_DEVICE void weight_grad_tiles_mma(float* row, const SharedPlanes<const float>& g,
                                      const SharedPlanes<const float>& src, int C_g, int C_src, int samples,
                                      int tile0, bool busy, int slice, int slices, int lane) {
  const int gl = lane / 4, t4 = lane % 4;
  const int columns = C_src * 9, tiles = ceil_div(columns, 8);
  const int steps = ceil_div(samples * g.rows * g.cols, 8);
  // The lane's B columns: where tap `tap` of channel ci lies from a window's start.
  int b_offset[kMmaGradTiles];
  CAE_UNROLL
  for (int j = 0; j < kMmaGradTiles; ++j) {
    const int n = (tile0 + j) * 8 + gl, ci = n / 9, tap = n - ci * 9;
    b_offset[j] = n < columns ? ci * src.channel_stride + tap / 3 * src.pitch + tap % 3 : -1;
  }
  // The lane's two positions of a step (k = t4 and t4 + 4), `slices` steps on
  // at a time.
  PlaneWalk at[2] = {{slice * 8 + t4, g.rows, g.cols}, {slice * 8 + t4 + 4, g.rows, g.cols}};
  const int delta = slices * 8, d_rows = delta / g.cols, d_cols = delta % g.cols;
  float acc[kMmaGradTiles][4] = {};
  for (int step = slice; busy && step < steps; step += slices) {
    uint32_t a[4], b[kMmaGradTiles][2];
    CAE_UNROLL
    for (int i = 0; i < 2; ++i) {
      const bool inside = at[i].s < samples;
      const float* gp = g.at(inside ? at[i].s : 0, 0, at[i].r, at[i].c);
      a[2 * i] = to_tf32(inside && gl < C_g ? gp[gl * g.channel_stride] : 0.0f);
      a[2 * i + 1] = to_tf32(inside && gl + 8 < C_g ? gp[(gl + 8) * g.channel_stride] : 0.0f);
      const float* sp = src.at(inside ? at[i].s : 0, 0, S * at[i].r, S * at[i].c);
      CAE_UNROLL
      for (int j = 0; j < kMmaGradTiles; ++j)
        b[j][i] = to_tf32(inside && b_offset[j] >= 0 ? sp[b_offset[j]] : 0.0f);
      at[i].advance(d_rows, d_cols, g.rows, g.cols);
    }
    // a: (channel gl, k t4), (gl + 8, t4), (gl, t4 + 4), (gl + 8, t4 + 4); b[j]: k t4 and t4 + 4.
    CAE_UNROLL
    for (int j = 0; j < kMmaGradTiles; ++j) {
      if (tile0 + j >= tiles) break;
      mma_m16n8k8_tf32(acc[j], a, b[j], acc[j]);
    }
  }
  // The slices into the row, in slice order; acc[j]: channels (gl, gl + 8) x
  // columns (tile0 + j) * 8 + 2 t4 + (0, 1).
  for (int sl = 0; sl < slices; ++sl) {
    if (busy && slice == sl) {
      CAE_UNROLL
      for (int j = 0; j < kMmaGradTiles; ++j) {
        CAE_UNROLL
        for (int e = 0; e < 4; ++e) {
          const int c = gl + 8 * (e / 2), n = (tile0 + j) * 8 + 2 * t4 + e % 2;
          if (c < C_g && n < columns) {
            float& out = row[c * columns + n];
            out = sl == 0 ? acc[j][e] : out + acc[j][e];
          }
        }
      }
    }
    __syncthreads();
  }
}

template <int S>
CAE_DEVICE void weight_grad_pass_mma(float* row, const SharedPlanes<const float>& g,
                                     const SharedPlanes<const float>& src, int C_g, int C_src, int samples,
                                     int tid, int threads = kThreads) {
  const int warp = tid / 32, warps = threads / 32;
  const int tile_groups = ceil_div(ceil_div(C_src * 9, 8), kMmaGradTiles);
  const int slices = warps / tile_groups > 0 ? warps / tile_groups : 1;
  // More tile groups than warps (C_src above 42 at 8 warps): one slice, the
  // warps taking the groups round after round.
  for (int round = 0; round < ceil_div(tile_groups, warps); ++round) {
    const int group = warp % tile_groups + round * warps;
    weight_grad_tiles_mma<S>(row, g, src, C_g, C_src, samples, group * kMmaGradTiles,
                             warp < tile_groups * slices && group < tile_groups, warp / tile_groups, slices,
                             tid % 32);
  }
}

// A layer's input channels [0, count) (`first`, `last` as layer_pass's): on
// tensor cores where l.tensor_cores and mma_pass_fits, else layer_pass.
template <int G, bool NHWC, typename T, typename Acc>
CAE_DEVICE void any_layer_pass(const SharedPlanes<Acc>& dst, const SharedPlanes<const Acc>& src, const Acc* w,
                               int count, int samples, int groups, bool first, bool last,
                               const LayerPass<T>& l, int tid, int threads = kThreads) {
  if constexpr (std::is_same<Acc, float>::value) {
    if (mma_pass_fits<Acc>(l.tensor_cores, groups))
      return layer_pass_mma<G, NHWC>(dst, src, w, count, samples, groups, first, last, l, tid, threads);
  }
  layer_pass<G, NHWC>(dst, src, w, count, samples, groups, first, last, l, tid, threads);
}

// A 2x2 pool window of a plane `pitch` apart (the bottom row and the right
// column absent at the ceil mode's edge): PyTorch's winner (as
// max_pool_nchw_kernel: row-major, the first maximum, a NaN over
// everything), 0 to 3 row-major, and its value in `best`. The forward's pool
// and the backward's recompute of its winners both take it.
template <typename Acc>
CAE_DEVICE int pool_window_winner(const Acc* win, int pitch, bool two_rows, bool two_cols, Acc& best) {
  best = win[0];
  int arg = 0;
  CAE_UNROLL
  for (int k = 1; k < 4; ++k) {
    const bool valid = (k < 2 || two_rows) && ((k & 1) == 0 || two_cols);
    const Acc v = win[(k >> 1) * pitch + (k & 1)];
    if (valid && takes_max(v, best)) best = v, arg = k;
  }
  return arg;
}

// A layer summed in one pass (any_layer_pass's first and last).
template <int G, bool NHWC, typename T, typename Acc>
CAE_DEVICE void whole_layer_pass(const SharedPlanes<Acc>& dst, const SharedPlanes<const Acc>& src,
                                 const Acc* w, int count, int samples, int groups, const LayerPass<T>& l,
                                 int tid, int threads = kThreads) {
  any_layer_pass<G, NHWC>(dst, src, w, count, samples, groups, true, true, l, tid, threads);
}

// __launch_bounds__'s blocks per SM of the fused block kernels (see
// conv_min_blocks): 2 (128 registers a thread) for float32 accumulation, 1
// for double (two rows of 8 double sums, and the staging's vectors); one more
// block per SM spilled a few bytes on sm_90.
template <typename Acc>
constexpr int block_min_blocks() {
  return sizeof(Acc) > 4 ? 1 : 2;
}

template <typename T, typename Acc, bool NHWC>
__global__ void __launch_bounds__(kThreads, block_min_blocks<Acc>())
    encoder_block_kernel(EncoderBlockArgs<T> a, EncoderBlockTiling t) {
  constexpr int G = kBlockGroup;
  CAE_DYNAMIC_SHARED(Acc, smem);
  Acc* w1_s = smem;                          // [groups][chunk * 9][G]
  Acc* w2_s = w1_s + t.w1_size;              // [groups][C1 * 9][G]
  Acc* wd_s = w2_s + t.w2_size;              // [groups][C1 * 9][G] (strided)
  Acc* a1_s = wd_s + t.wd_size;              // [samples][C1][r1][c1]
  Acc* a2_s = a1_s + t.samples * t.sample1;  // [samples][C1][r2][c2]
  Acc* in_s = a2_s + t.samples * t.sample2;  // [samples][chunk][r0][c0]
  const int tid = threadIdx.x;
  const bool strided = a.w_down != nullptr;
  const TileOrigin o = tile_origin(blockIdx.x, t.tiles_x, t.tiles_y, t.rows, t.cols, t.samples);
  // The regions' first row and column in the image; the block's own a1 and a2
  // positions (stored where asked) are [own_y, own_y + 2 rows) x [own_x, ...).
  const int own_y = 2 * o.y0, own_x = 2 * o.x0;
  const int y2 = own_y - (strided ? 1 : 0), x2 = own_x - (strided ? 1 : 0);
  const int y1 = y2 - 1, x1 = x2 - 1;
  const int taps2 = a.C1 * 9;
  for (int g = 0; g < t.groups; ++g) {
    const index_t first = static_cast<index_t>(g) * G * taps2;
    stage_weight_rows<G>(w2_s + g * taps2 * G, a.w2, first, taps2, a.C1 - g * G, taps2, tid);
    if (strided) stage_weight_rows<G>(wd_s + g * taps2 * G, a.w_down, first, taps2, a.C1 - g * G, taps2, tid);
  }
  const SharedPlanes<Acc> a1p{a1_s, t.stride1, t.sample1, t.r1, t.c1, t.c1},
      a2p{a2_s, t.stride2, t.sample2, t.r2, t.c2, t.c2};
  LayerPass<T> layer{a.b1, a.a1, y1,   x1,  own_y, own_x,  2 * t.rows, 2 * t.cols,
                     o.n0, a.N,  a.C1, a.H, a.W,   a.relu, t.vec_act};
  layer.tensor_cores = a1_on_tensor_cores<Acc>(a);

  // 1. a1 over its region, input channels in chunks (sums kept in a1_s).
  for (int c0 = 0; c0 < a.C0; c0 += t.chunk) {
    const int count = a.C0 - c0 < t.chunk ? a.C0 - c0 : t.chunk;
    __syncthreads();  // the previous chunk is done reading
    for (int g = 0; g < t.groups; ++g) {
      stage_weight_rows<G>(w1_s + g * count * 9 * G, a.w1, (static_cast<index_t>(g) * G * a.C0 + c0) * 9,
                           static_cast<index_t>(a.C0) * 9, a.C1 - g * G, count * 9, tid);
    }
    const Window win{o.n0, y1 - 1, x1 - 1, c0, count, t.r0, t.c0, t.samples, t.stride0, t.sample0};
    if (NHWC) {
      stage_nhwc<vec_width<T>()>(in_s, a.x, static_cast<const T*>(nullptr), a.N, a.C0, a.H, a.W, win,
                                 t.vec_in, tid);
    } else {
      stage_nchw(in_s, a.x, static_cast<const T*>(nullptr), a.N, a.C0, a.H, a.W, win, tid);
    }
    staged_barrier();
    any_layer_pass<G, NHWC>(a1p, SharedPlanes<const Acc>{in_s, t.stride0, t.sample0, t.r0, t.c0, t.c0}, w1_s,
                            count, t.samples, t.groups, c0 == 0, c0 + count >= a.C0, layer, tid);
  }
  __syncthreads();

  // 2. a2 over its region.
  layer.bias = a.b2, layer.interior = a.a2, layer.y0 = y2, layer.x0 = x2;
  layer.tensor_cores = a.tensor_cores;
  whole_layer_pass<G, NHWC>(a2p, SharedPlanes<const Acc>{a1_s, t.stride1, t.sample1, t.r1, t.c1, t.c1}, w2_s,
                            a.C1, t.samples, t.groups, layer, tid);
  __syncthreads();

  // 3. The block's output tile.
  if (strided) {
    StridedDigits at(tid, t.cols, t.rows, t.samples);  // (col, row, sample, group)
    for (; at.digit[3] < t.groups; at.advance()) {
      const int px = at.digit[0], py = at.digit[1], s = at.digit[2], co0 = at.digit[3] * G;
      Acc acc[1][G];
      CAE_UNROLL
      for (int j = 0; j < G; ++j) acc[0][j] = Acc(0);
      accumulate_windows(acc, a2_s + s * t.sample2 + 2 * py * t.c2 + 2 * px, t.stride2, t.c2,
                         wd_s + at.digit[3] * taps2 * G, a.C1);
      const int n = o.n0 + s, oy = o.y0 + py, ox = o.x0 + px;
      if (n < a.N && oy < a.H_out && ox < a.W_out)
        store_pixel<G, NHWC>(a.out, acc[0], a.b_down, a.relu, n, co0, a.C1, a.H_out, a.W_out, oy, ox,
                             t.vec_out);
    }
  } else {
    // One thread per output element: consecutive threads, consecutive addresses.
    StridedDigits at =
        NHWC ? StridedDigits(tid, a.C1, t.cols, t.rows) : StridedDigits(tid, t.cols, t.rows, a.C1);
    for (; at.digit[3] < t.samples; at.advance()) {
      const int c = NHWC ? at.digit[0] : at.digit[2], px = at.digit[NHWC ? 1 : 0],
                py = at.digit[NHWC ? 2 : 1];
      const int s = at.digit[3];
      const int n = o.n0 + s, oy = o.y0 + py, ox = o.x0 + px;
      if (n >= a.N || oy >= a.H_out || ox >= a.W_out) continue;
      const Acc* win = a2_s + s * t.sample2 + c * t.stride2 + 2 * py * t.c2 + 2 * px;
      const bool two_rows = 2 * oy + 1 < a.H, two_cols = 2 * ox + 1 < a.W;
      Acc best;
      const int arg = pool_window_winner(win, t.c2, two_rows, two_cols, best);
      const index_t at_out = pixel_offset<NHWC>(n, c, oy, ox, a.C1, a.H_out, a.W_out);
      a.out[at_out] = static_cast<T>(best);
      // The backward's gate at the winner: gated(go, best).
      if (a.winners != nullptr)
        a.winners[at_out] = static_cast<unsigned char>(!a.relu || best > Acc(0) ? arg : kPoolNoWinner);
    }
  }
}

template <typename T, typename Acc>
inline void launch_encoder_block(const EncoderBlockArgs<T>& a, const EncoderBlockPlan& p, bool nhwc,
                                 cudaStream_t stream) {
  with_bool(nhwc, [&](auto layout) {
    const auto kernel = encoder_block_kernel<T, Acc, decltype(layout)::value>;
    CAE_LAUNCH(kernel, static_cast<unsigned>(p.blocks), kThreads, p.smem, stream, a, p.t);
  });
}

}  // namespace cuda
}  // namespace cae
