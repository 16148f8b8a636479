// An encoder block's backward in one kernel (ops.h encoder_block_backward):
// the gradients of w1, b1, w2, b2 (and w_down, b_down), and where asked the
// input's, from the block's input, its output gradient and (strided, relu)
// its output as the last ReLU's mask; the __global__ kernel and its
// torch-free launcher.
//
// Layout of the work: a block owns `samples` whole images (no halos), every
// plane in shared memory zero-padded to (H + 2) x (W + 2) (one row more when
// H is odd: layer passes take rows in pairs), so 3x3 windows need no bounds
// checks; 256 threads, or 512 where the block fills an SM on its own
// (backward_max_threads). Phases, separated by barriers:
//   0. stage x, the weights, (strided) gate(grad_out) or (pool, where it fits)
//      grad_out and the forward's winner codes as they are; zero a1's, a2's
//      padding;
//   1. a1 = act(b1 + correlate(x, w1)), as the forward kernel computes it;
//   2. a2 = act(b2 + correlate(a1, w2)), unless the forward's pool winners
//      are given (nothing else needs a2); w1 restaged transposed and flipped;
//   3. w2 restaged likewise; grad_z2 = gate(a2) * grad_a2, over a2 in place:
//      pool: one thread per window gives its winner (the forward's code, or
//      PyTorch's rule over a2, as max_pool_nchw_kernel) the output gradient,
//      zeros elsewhere;
//      strided: dw_down, db_down from gate(grad_out) and a2, then grad_a2 =
//      the stride-2 transposed correlation of gate(grad_out) with w_down;
//   4. dw2, db2 from grad_z2 and a1;
//   5. grad_z1 = gate(a1) * correlate^T(grad_z2, w2), over a1 in place (a
//      thread reads only its own a1 elements for the gate);
//   6. dw1, db1 from grad_z1 and x; grad_input = correlate^T(grad_z1, w1).
// Weight and bias gradients: each block sums its images in a fixed order into
// its row of partial sums (dw1 | db1 | dw2 | db2 | dw_down | db_down, each in
// its tensor's element order); finish_grid_sums gives the last block the
// totals over blocks in block order (bitwise reproducible), which it writes.
#pragma once

#include "encoder_block_kernels.cuh"
#include "grid_sums.cuh"

namespace cae {
namespace cuda {

template <typename T>
struct EncoderBlockBackwardArgs {
  EncoderBlockArgs<T> block;  // the input, parameters and sizes (no outputs)
  T* grad_input;              // [N, C0, H, W] or nullptr (not wanted)
  T* dw1;                     // [C1, C0, 3, 3]
  T* db1;                     // [C1]
  T* dw2;                     // [C1, C1, 3, 3]
  T* db2;                     // [C1]
  T* dw_down;                 // [C1, C1, 3, 3] (strided) or nullptr
  T* db_down;                 // [C1] (strided) or nullptr
  const T* grad_out;          // [N, C1, H_out, W_out]
  const T* out_gate;          // the strided block's output (relu), else nullptr
  // The pool's winner codes from the forward (EncoderBlockArgs::winners,
  // grad_out's layout), or nullptr: a2 recomputed for them.
  const unsigned char* winners;
};

// Per-thread sums of one weight-gradient item: 9 taps and the bias.
constexpr int kGradSums = 10;

// Shared memory of a block (elements of Acc): the weights first (multiples
// of kBlockGroup: vector aligned), the slices' scratch, then the planes.
struct EncoderBackwardTiling {
  // A block's: kThreads, or backward_max_threads where one block fills an SM;
  // the slices' scratch takes kGradSums a thread.
  int threads;
  int samples;
  int pitch, plane;          // a padded plane's row pitch (W + 2, or backward_pitch) and channel stride
  int out_pitch, out_plane;  // staged grad_out (strided): (H_out + 1) x (W_out + 1)
  // The pool's grad_out copied in at phase 0, as global memory holds a
  // sample's (C1 x H_out x W_out elements), and the forward's winner codes
  // (their bytes in winner_slots elements of Acc a sample); 0: read from
  // global memory in phase 3.
  int pool_go, winner_slots;
  int groups1, groups0;  // ceil(C1 / kBlockGroup), ceil(C0 / kBlockGroup)
  int w1_size, w2_size, wd_size;
  int sums;                   // partial sums per block
  bool vec_x, vec_g, vec_gi;  // NHWC vector loads of x, grad_out; stores of grad_input
};

struct EncoderBackwardPlan {
  EncoderBackwardTiling t;
  index_t blocks;
  size_t smem;
  bool ok;  // false: one image does not fit shared memory
};

// Threads a block may have: 512 (16 warps, 128 registers each, as two blocks
// of 256) for float32 accumulation, taken where one block's images fill more
// than half an SM's shared memory (the pool model's first block: one 28 x 28
// image, ~150 KB), which would otherwise run 8 warps an SM; 256 for double
// (255 registers a thread).
template <typename Acc>
constexpr int backward_max_threads() {
  return sizeof(Acc) > 4 ? kThreads : 2 * kThreads;
}

// The partial-sum row's segments: dw1, db1, dw2, db2, dw_down, db_down.
constexpr int kGradSegments = 6;
CAE_HOST_DEVICE void grad_segment_sizes(int (&size)[kGradSegments], int C0, int C1, bool strided) {
  size[0] = C1 * C0 * 9, size[1] = C1, size[2] = C1 * C1 * 9, size[3] = C1;
  size[4] = strided ? C1 * C1 * 9 : 0, size[5] = strided ? C1 : 0;
}

// The padded planes' row pitch where the tensor cores read them: the least
// at least W + 2 that is 6 to 13 mod 32. weight_grad_pass_mma's B fragment
// (8 columns (channel, tap) at 4 consecutive positions) reads, per row of
// taps, 3 taps x 4 positions: 6 consecutive words; its three rows then fall
// on distinct banks (at 0, pitch and 2 pitch mod 32). At W + 2 = 30 (28 x 28
// images) they overlapped: 2 to 3 wavefronts a load where 1 does.
inline int backward_pitch(int W) {
  const int pitch = W + 2, r = pitch % 32;
  return r >= 6 && r <= 13 ? pitch : pitch + (38 - r) % 32;
}

// `budget`: the dynamic shared memory a block may take on this device.
template <typename T, typename Acc>
inline EncoderBackwardPlan plan_encoder_block_backward(const EncoderBlockBackwardArgs<T>& args, bool nhwc,
                                                       size_t budget) {
  const EncoderBlockArgs<T>& a = args.block;
  EncoderBackwardPlan p{};
  EncoderBackwardTiling& t = p.t;
  if (a.C0 < 1 || a.C1 < 1 || a.N < 1 || a.H < 1 || a.W < 1) return p;
  const bool strided = a.w_down != nullptr;
  constexpr int G = kBlockGroup;
  t.groups1 = ceil_div(a.C1, G), t.groups0 = ceil_div(a.C0, G);
  t.out_pitch = a.W_out + 1;
  t.out_plane = strided ? odd_stride((a.H_out + 1) * t.out_pitch) : 0;
  // w1 forward ([group][C0 * 9][G]), later transposed ([C0 group][C1 * 9][G]).
  const int w1_fwd = t.groups1 * G * a.C0 * 9, w1_t = t.groups0 * G * a.C1 * 9;
  t.w1_size = w1_fwd > w1_t ? w1_fwd : w1_t;
  t.w2_size = t.groups1 * G * a.C1 * 9;
  t.wd_size = strided ? t.w2_size : 0;
  int seg[kGradSegments];
  grad_segment_sizes(seg, a.C0, a.C1, strided);
  t.sums = 0;
  for (int s : seg) t.sums += s;
  const size_t weights = static_cast<size_t>(t.w1_size) + t.w2_size + t.wd_size;
  // The planes' pitch and channel stride: W + 2 and odd, or where the tensor
  // cores may read them, backward_pitch and mma_channel_stride (W + 2 where
  // that is all that fits). The pool's output gradient and winner codes are
  // staged by copies with the input (no wait of phase 3's own) where T is
  // the accumulation type and they fit too; the winners' bytes take one slot
  // more a sample (their first word's offset).
  size_t per_image = 0;
  const int pool_go = a.C1 * a.H_out * a.W_out;
  const auto set_planes = [&](int pitch, bool stage_pool_go) {
    t.pitch = pitch;
    const int plane = (a.H + (a.H & 1) + 2) * pitch;
    t.plane = a.tensor_cores ? mma_channel_stride(plane) : odd_stride(plane);
    t.pool_go = stage_pool_go ? pool_go : 0;
    t.winner_slots =
        stage_pool_go && args.winners != nullptr ? ceil_div(pool_go, static_cast<int>(sizeof(Acc))) + 1 : 0;
    per_image = static_cast<size_t>(a.C0 + 2 * a.C1) * t.plane + static_cast<size_t>(a.C1) * t.out_plane +
                t.pool_go + t.winner_slots;
  };
  // The slices' scratch: kGradSums a thread.
  const auto bytes = [&](int samples, int threads) {
    return (weights + static_cast<size_t>(threads) * kGradSums + samples * per_image) * sizeof(Acc);
  };
  t.threads = kThreads;
  const int pitch = a.tensor_cores ? backward_pitch(a.W) : a.W + 2;
  set_planes(pitch, !strided && std::is_same<T, Acc>::value);
  if (bytes(1, t.threads) > budget) set_planes(pitch, false);
  if (bytes(1, t.threads) > budget) set_planes(a.W + 2, false);
  if (bytes(1, t.threads) > budget) return p;
  // Images packed while they fit and the grid keeps kBlockFill blocks.
  t.samples = 1;
  while (bytes(2 * t.samples, t.threads) <= budget &&
         ceil_div(static_cast<index_t>(a.N), static_cast<index_t>(2 * t.samples)) >= kBlockFill)
    t.samples *= 2;
  // No second block fits an SM: more threads for this one.
  constexpr int most = backward_max_threads<Acc>();
  if (most > t.threads && 2 * bytes(t.samples, t.threads) > budget && bytes(t.samples, most) <= budget)
    t.threads = most;
  constexpr int V = vec_width<T>();
  t.vec_x = nhwc && vector_ok<V>(a.x, a.C0, a.C0);
  t.vec_g = nhwc && vector_ok<V>(args.grad_out, a.C1, a.C1) &&
            (args.out_gate == nullptr || vector_ok<V>(args.out_gate, a.C1, a.C1));
  constexpr int VO = vec_width<T, G>();
  t.vec_gi = nhwc && args.grad_input != nullptr && vector_ok<VO>(args.grad_input, a.C0, a.C0);
  p.blocks = ceil_div(static_cast<index_t>(a.N), static_cast<index_t>(t.samples));
  p.smem = bytes(t.samples, t.threads);
  p.ok = true;
  return p;
}

// A weight's transposed copy for the input gradient's correlation:
// w_s[group][c * 9 + tap][j] = w[c][group * G + j][flip ? 8 - tap : tap], w
// being [C_out][C_in][3][3] and the groups running over C_in (zero past it).
// Flipped: the stride-1 transposed correlation as a correlation. Without a
// conversion by copy_async, for the caller's staged_barrier.
template <int G, typename Acc, typename T>
CAE_DEVICE void stage_weight_transposed(Acc* w_s, const T* __restrict__ w, int C_out, int C_in, int groups,
                                        bool flip, int tid, int threads) {
  const int taps = C_out * 9;
  for (int e = tid; e < groups * taps; e += threads) {
    const int g = e / taps, r = e - g * taps;
    const int c = r / 9, tap = r - c * 9;
    const index_t first = static_cast<index_t>(c) * C_in * 9 + (flip ? 8 - tap : tap);
    CAE_UNROLL
    for (int j = 0; j < G; ++j) {
      const int ci = g * G + j;
      stage_element(w_s + e * G + j, ci < C_in ? w + first + ci * 9 : w, ci < C_in);
    }
  }
}

// Output-gradient channels per weight-gradient item: a window's 9 values of
// src serve KC channels' products (9 + KC shared loads for 9 KC FFMA).
constexpr int kGradChannels = 4;

// One weight's gradient and its bias's into `row` (dw [C_g][C_src][3][3],
// then db [C_g] at row + C_g * C_src * 9): dw[c][ci][tap] = the sum over
// images and positions (oy, ox) of g[c] at (oy, ox) times src[ci] at the
// window S * (oy, ox) + tap (src padded: the window starts there), db[c] =
// the sum of g[c]. An item is kGradChannels channels c, one ci and a slice of
// the rows; where items are fewer than threads, slices split the rows and
// their sums meet in `scratch` in slice order, a channel at a time. Items
// run slice-major: a warp's lanes read one row of different planes (an odd
// plane stride apart: distinct banks), where row slices (a pitch apart) fell
// on a few banks (8-way at 14 x 14). Fixed order throughout: deterministic.
template <int S, typename Acc>
CAE_DEVICE void weight_grad_pass(Acc* row, Acc* scratch, const SharedPlanes<const Acc>& g,
                                 const SharedPlanes<const Acc>& src, int C_g, int C_src, int samples, int tid,
                                 int threads) {
  constexpr int KC = kGradChannels;
  const int pairs = ceil_div(C_g, KC) * C_src;  // (channel block, ci)
  // Slices past the rows would sum nothing, and lengthen the slice sums below
  // (a few threads' serial loop): the first block's dw1 (4 items) has 28 rows.
  const int spare = pairs >= threads ? 1 : threads / pairs;
  const int slices = spare < g.rows ? spare : g.rows;
  Acc* db = row + C_g * C_src * 9;
  // Uniform trip count: the slices' barriers below are reached by every thread.
  for (int first = 0; first < pairs * slices; first += threads) {
    const int item = first + tid;
    const bool active = item < pairs * slices;
    const int slice = active ? item / pairs : 0, pair = active ? item - slice * pairs : 0;
    const int cb = pair / C_src, ci = pair - cb * C_src, c0 = cb * KC;
    Acc acc[KC][kGradSums];
    CAE_UNROLL
    for (int k = 0; k < KC; ++k) {
      CAE_UNROLL
      for (int e = 0; e < kGradSums; ++e) acc[k][e] = Acc(0);
    }
    // Channels past C_g read the last one's plane (in bounds) and are dropped.
    int gc[KC];
    CAE_UNROLL
    for (int k = 0; k < KC; ++k) gc[k] = c0 + k < C_g ? c0 + k : C_g - 1;
    for (int s = 0; active && s < samples; ++s) {
      for (int oy = slice; oy < g.rows; oy += slices) {
        const Acc* gr = g.at(s, 0, oy, 0);
        const Acc* sr = src.at(s, ci, S * oy, 0);
        for (int ox = 0; ox < g.cols; ++ox, sr += S) {
          Acc w[9];
          CAE_UNROLL
          for (int t = 0; t < 9; ++t) w[t] = sr[(t / 3) * src.pitch + t % 3];
          CAE_UNROLL
          for (int k = 0; k < KC; ++k) {
            const Acc v = gr[gc[k] * g.channel_stride + ox];
            CAE_UNROLL
            for (int t = 0; t < 9; ++t) acc[k][t] += v * w[t];
            acc[k][9] += v;
          }
        }
      }
    }
    CAE_UNROLL
    for (int k = 0; k < KC; ++k) {
      const int c = c0 + k;
      if (slices == 1) {
        if (active && c < C_g) {
          CAE_UNROLL
          for (int t = 0; t < 9; ++t) row[(c * C_src + ci) * 9 + t] = acc[k][t];
          if (ci == 0) db[c] = acc[k][9];
        }
        continue;
      }
      if (active) {
        CAE_UNROLL
        for (int e = 0; e < kGradSums; ++e) scratch[item * kGradSums + e] = acc[k][e];
      }
      __syncthreads();
      for (int p = tid; p < pairs; p += threads) {
        const int cp = p / C_src * KC + k, cip = p - p / C_src * C_src;
        if (cp >= C_g) continue;
        Acc sum[kGradSums];
        CAE_UNROLL
        for (int e = 0; e < kGradSums; ++e) sum[e] = scratch[p * kGradSums + e];
        for (int sl = 1; sl < slices; ++sl) {
          CAE_UNROLL
          for (int e = 0; e < kGradSums; ++e) sum[e] += scratch[(sl * pairs + p) * kGradSums + e];
        }
        CAE_UNROLL
        for (int t = 0; t < 9; ++t) row[(cp * C_src + cip) * 9 + t] = sum[t];
        if (cip == 0) db[cp] = sum[9];
      }
      __syncthreads();  // the scratch is read before the next channel's sums
    }
  }
}

// db[c] = the sum of g's channel c over the block's positions, in exact
// float32 beside weight_grad_pass_mma: `parts` threads a channel, each over
// every parts-th position, the parts added in order in `scratch`.
CAE_DEVICE void bias_grad_pass(float* db, float* scratch, const SharedPlanes<const float>& g, int C_g,
                               int samples, int tid, int threads) {
  const int positions = samples * g.rows * g.cols;
  const int parts = threads / C_g < positions ? threads / C_g : positions;
  if (tid < C_g * parts) {
    const int c = tid / parts, part = tid - c * parts;
    const int d_rows = parts / g.cols, d_cols = parts % g.cols;
    float sum = 0.0f;
    PlaneWalk q(part, g.rows, g.cols);
    for (int p = part; p < positions; p += parts, q.advance(d_rows, d_cols, g.rows, g.cols))
      sum += g.at(q.s, c, q.r, q.c)[0];
    scratch[tid] = sum;
  }
  __syncthreads();
  if (tid < C_g) {
    float sum = scratch[tid * parts];
    for (int part = 1; part < parts; ++part) sum += scratch[tid * parts + part];
    db[tid] = sum;
  }
  __syncthreads();  // the scratch is read before anything reuses it
}

// Where a transposed_pass's result goes.
template <typename T>
struct TransposedPass {
  T* out;  // nullptr: the result, gated by dst's own values where `relu`, replaces dst
  int n0, C, H;
  bool relu, vec;     // vec: NHWC vector stores to out
  bool tensor_cores;  // on tensor cores where mma_pass_fits
};

// K channels [co0, co0 + K) of a transposed_pass result at (s, row, col).
template <int K, bool NHWC, typename T, typename Acc>
CAE_DEVICE void finish_transposed(const SharedPlanes<Acc>& dst, const TransposedPass<T>& p, int s, int row,
                                  int col, int co0, Acc (&v)[K], bool vec) {
  const bool inside = row < p.H;
  if (p.out != nullptr) {
    if (inside)
      store_pixel<K, NHWC>(p.out, v, static_cast<const T*>(nullptr), false, p.n0 + s, co0, p.C, p.H, dst.cols,
                           row, col, vec);
    return;
  }
  Acc* d = dst.at(s, co0, row, col);
  CAE_UNROLL
  for (int j = 0; j < K; ++j) {
    if (co0 + j < p.C) {
      Acc& e = d[j * dst.channel_stride];
      e = !inside ? Acc(0) : p.relu ? gated(v[j], e) : v[j];
    }
  }
}

// The stride-1 transposed correlation of src (padded planes) with w_s as
// stage_weight_transposed lays it out (flipped), over dst's positions (dst a
// view of the interior: two rows of one column and G channels per item, as
// layer_pass; or mma_pass's tiles), finished by finish_transposed (zero on the
// padding row of an odd H). Each result element is read and written by the
// thread that computes it.
template <int G, bool NHWC, typename T, typename Acc>
CAE_DEVICE void transposed_pass(const SharedPlanes<Acc>& dst, const SharedPlanes<const Acc>& src,
                                const Acc* w, int count, int samples, int groups, const TransposedPass<T>& p,
                                int tid, int threads) {
  if constexpr (std::is_same<Acc, float>::value) {
    if (mma_pass_fits<Acc>(p.tensor_cores, groups)) {
      mma_pass<G>(dst.rows, dst.cols, src, w, count, samples, groups, tid, threads,
                  [&](int s, int row, int col, int co0, float (&v)[2]) {
                    finish_transposed<2, NHWC>(dst, p, s, row, col, co0, v, false);
                  });
      return;
    }
  }
  StridedDigits at(tid, dst.cols, dst.rows / 2, samples, threads);  // (col, row pair, sample, group)
  for (; at.digit[3] < groups; at.advance()) {
    const int col = at.digit[0], row = 2 * at.digit[1], s = at.digit[2], co0 = at.digit[3] * G;
    Acc acc[2][G];
    CAE_UNROLL
    for (int i = 0; i < 2; ++i) {
      CAE_UNROLL
      for (int j = 0; j < G; ++j) acc[i][j] = Acc(0);
    }
    accumulate_windows(acc, src.at(s, 0, row, col), src.channel_stride, src.pitch, w + co0 * count * 9,
                       count);
    CAE_UNROLL
    for (int i = 0; i < 2; ++i) finish_transposed<G, NHWC>(dst, p, s, row + i, col, co0, acc[i], p.vec);
  }
}

// Registers: 128 a thread for float32 accumulation, as the forward (two
// blocks of 256 an SM, or one of 512); 255 for double.
template <typename T, typename Acc, bool NHWC>
__global__ void __launch_bounds__(backward_max_threads<Acc>(), 1)
    encoder_block_backward_kernel(EncoderBlockBackwardArgs<T> args, EncoderBackwardTiling t,
                                  GridSums<Acc> sums) {
  const EncoderBlockArgs<T>& a = args.block;
  constexpr int G = kBlockGroup;
  CAE_DYNAMIC_SHARED(Acc, smem);
  __shared__ int last_flag;
  Acc* w1_s = smem;                               // w1, then its transposed copy
  Acc* w2_s = w1_s + t.w1_size;                   // w2, then its transposed copy
  Acc* wd_s = w2_s + t.w2_size;                   // w_down transposed (strided)
  Acc* scratch = wd_s + t.wd_size;                // [t.threads][kGradSums]
  Acc* x_s = scratch + t.threads * kGradSums;     // [samples][C0][plane]
  Acc* a1_s = x_s + t.samples * a.C0 * t.plane;   // [samples][C1][plane]: a1, then grad_z1
  Acc* a2_s = a1_s + t.samples * a.C1 * t.plane;  // [samples][C1][plane]: a2, then grad_z2
  Acc* go_s = a2_s + t.samples * a.C1 * t.plane;  // [samples][C1][out_plane] (strided), [samples][pool_go]
  auto* winners_s = reinterpret_cast<uint32_t*>(go_s + t.samples * t.pool_go);  // the pool's winner codes
  const int tid = threadIdx.x, threads = t.threads;
  const bool strided = a.w_down != nullptr;
  const int n0 = static_cast<int>(blockIdx.x) * t.samples;
  const int samples = a.N - n0 < t.samples ? a.N - n0 : t.samples;  // the last block's may be fewer
  const int rows = a.H + (a.H & 1);                                 // interior rows, paired
  Acc* row_sums = sums.partials + static_cast<index_t>(blockIdx.x) * sums.size;
  int seg[kGradSegments];
  grad_segment_sizes(seg, a.C0, a.C1, strided);
  Acc* dw1_row = row_sums;
  Acc* dw2_row = dw1_row + seg[0] + seg[1];
  Acc* dwd_row = dw2_row + seg[2] + seg[3];

  // The planes: padded (x, a1, a2 and grad_out's zero margins); interior views.
  const auto padded = [&](Acc* p, int channels) {
    return SharedPlanes<const Acc>{p, t.plane, channels * t.plane, rows + 2, a.W + 2, t.pitch};
  };
  const auto interior = [&](Acc* p, int channels) {
    return SharedPlanes<Acc>{p + t.pitch + 1, t.plane, channels * t.plane, rows, a.W, t.pitch};
  };
  const SharedPlanes<Acc> a1v = interior(a1_s, a.C1), a2v = interior(a2_s, a.C1);
  // A weight's gradient (C1 gradient channels) and its bias's into `row`: on
  // tensor cores where the kernel's arguments allow them (mma_pass_fits).
  const auto weight_grads = [&](auto stride, Acc* row, const SharedPlanes<const Acc>& g,
                                const SharedPlanes<const Acc>& src, int C_src) {
    constexpr int S = decltype(stride)::value;
    if constexpr (std::is_same<Acc, float>::value) {
      if (mma_pass_fits<Acc>(a.tensor_cores, t.groups1)) {
        weight_grad_pass_mma<S>(row, g, src, a.C1, C_src, samples, tid, threads);
        return bias_grad_pass(row + a.C1 * C_src * 9, scratch, g, a.C1, samples, tid, threads);
      }
    }
    weight_grad_pass<S>(row, scratch, g, src, a.C1, C_src, samples, tid, threads);
  };

  // 0. Staging.
  for (int g = 0; g < t.groups1; ++g) {
    const int taps1 = a.C0 * 9, taps2 = a.C1 * 9;
    stage_weight_rows<G>(w1_s + g * taps1 * G, a.w1, static_cast<index_t>(g) * G * taps1, taps1, a.C1 - g * G,
                         taps1, tid, threads);
    stage_weight_rows<G>(w2_s + g * taps2 * G, a.w2, static_cast<index_t>(g) * G * taps2, taps2, a.C1 - g * G,
                         taps2, tid, threads);
  }
  if (strided) stage_weight_transposed<G>(wd_s, a.w_down, a.C1, a.C1, t.groups1, false, tid, threads);
  for (int i = tid; i < 2 * t.samples * a.C1 * t.plane; i += threads) a1_s[i] = Acc(0);
  const Window xw{n0, -1, -1, 0, a.C0, rows + 2, a.W + 2, samples, t.plane, a.C0 * t.plane, t.pitch};
  if (NHWC) {
    stage_nhwc<vec_width<T>()>(x_s, a.x, static_cast<const T*>(nullptr), a.N, a.C0, a.H, a.W, xw, t.vec_x,
                               tid, threads);
  } else {
    stage_nchw(x_s, a.x, static_cast<const T*>(nullptr), a.N, a.C0, a.H, a.W, xw, tid, threads);
  }
  if (strided) {
    // gate(grad_out), with a zero row and column past its end (the stride-2
    // transposed correlation's taps past the image read zeros).
    const Window gw{n0, 0, 0, 0, a.C1, a.H_out + 1, a.W_out + 1, samples, t.out_plane, a.C1 * t.out_plane};
    if (NHWC) {
      stage_nhwc<vec_width<T>()>(go_s, args.grad_out, args.out_gate, a.N, a.C1, a.H_out, a.W_out, gw, t.vec_g,
                                 tid, threads);
    } else {
      stage_nchw(go_s, args.grad_out, args.out_gate, a.N, a.C1, a.H_out, a.W_out, gw, tid, threads);
    }
  }
  // The pool's grad_out and winner codes where planned (t.pool_go): a block's
  // samples are one run of global memory in either layout, copied as it is.
  const index_t go_first = static_cast<index_t>(n0) * t.pool_go;
  const unsigned char* winners_staged = nullptr;
  if constexpr (std::is_same<T, Acc>::value) {
    for (int i = tid; i < samples * t.pool_go; i += threads)
      copy_async(go_s + i, args.grad_out + go_first + i, true);
  }
  if (t.winner_slots > 0)
    winners_staged = stage_bytes(winners_s, args.winners + go_first, samples * t.pool_go, tid, threads);
  staged_barrier();

  // 1. a1 (the forward kernel's sums, rounded to T).
  LayerPass<T> layer{a.b1, nullptr, 0, 0, 0, 0, a.H, a.W, n0, a.N, a.C1, a.H, a.W, a.relu, false};
  layer.tensor_cores = a1_on_tensor_cores<Acc>(a);  // as the forward: its gates
  whole_layer_pass<G, NHWC>(a1v, padded(x_s, a.C0), w1_s, a.C0, samples, t.groups1, layer, tid, threads);
  __syncthreads();

  // 2. a2 (for the pool's winners where the forward's are not given, the
  // strided block's dw_down); w1 no longer needed as it is: its transposed
  // copy for phase 6 (copies, waited for before phase 5: they land while
  // phases 2 to 4 run).
  stage_weight_transposed<G>(w1_s, a.w1, a.C1, a.C0, t.groups0, true, tid, threads);
  if (args.winners == nullptr) {
    layer.bias = a.b2;
    layer.tensor_cores = a.tensor_cores;  // as the forward: its gates and winners
    whole_layer_pass<G, NHWC>(a2v, padded(a1_s, a.C1), w2_s, a.C1, samples, t.groups1, layer, tid, threads);
  }
  __syncthreads();

  // 3. grad_z2 over a2; w2's transposed copy for phase 5 (as w1's).
  stage_weight_transposed<G>(w2_s, a.w2, a.C1, a.C1, t.groups1, true, tid, threads);
  if (strided) {
    const SharedPlanes<const Acc> gv{go_s, t.out_plane, a.C1 * t.out_plane, a.H_out, a.W_out, t.out_pitch};
    weight_grads(std::integral_constant<int, 2>{}, dwd_row, gv, padded(a2_s, a.C1), a.C1);
    __syncthreads();  // a2 read by dw_down before grad_z2 replaces it
    // grad_a2 at (y, x): the taps with (y + 1 - ky) even, from g row (y + 1 - ky) / 2.
    StridedDigits at(tid, a.W, a.H, samples, threads);  // (x, y, sample, group)
    for (; at.digit[3] < t.groups1; at.advance()) {
      const int x = at.digit[0], y = at.digit[1], s = at.digit[2], co0 = at.digit[3] * G;
      Acc acc[G];
      CAE_UNROLL
      for (int j = 0; j < G; ++j) acc[j] = Acc(0);
      const int ky0 = (y & 1) ? 0 : 1, kx0 = (x & 1) ? 0 : 1;  // then every second tap
      const Acc* gp = go_s + s * a.C1 * t.out_plane;
      const Acc* wp = wd_s + at.digit[3] * a.C1 * 9 * G;
      for (int c = 0; c < a.C1; ++c, gp += t.out_plane, wp += 9 * G) {
        for (int ky = ky0; ky < 3; ky += 2) {
          for (int kx = kx0; kx < 3; kx += 2) {
            const Acc v = gp[((y + 1 - ky) >> 1) * t.out_pitch + ((x + 1 - kx) >> 1)];
            const Acc* wk = wp + (ky * 3 + kx) * G;
            CAE_UNROLL
            for (int j = 0; j < G; ++j) acc[j] += v * wk[j];
          }
        }
      }
      Acc* d = a2v.at(s, co0, y, x);
      CAE_UNROLL
      for (int j = 0; j < G; ++j) {
        if (co0 + j < a.C1) {
          Acc& e = d[j * t.plane];
          e = a.relu ? gated(acc[j], e) : acc[j];
        }
      }
    }
  } else {
    // One thread per pool window and channel: the winner (the forward's code,
    // else from a2: row-major, the first maximum, a NaN over everything) takes
    // the output gradient, staged, or loaded a batch of windows at a time
    // (batched_walk).
    struct Window2x2 {
      int c, ox, oy, s;
      T go;
      int code;  // the forward's winner code, or -1: from a2
    };
    StridedDigits at = NHWC ? StridedDigits(tid, a.C1, a.W_out, a.H_out, threads)
                            : StridedDigits(tid, a.W_out, a.H_out, a.C1, threads);
    batched_walk<stage_batch<sizeof(T)>()>(
        at, samples,
        [&](const StridedDigits& d) {
          const int c = NHWC ? d.digit[0] : d.digit[2], ox = d.digit[NHWC ? 1 : 0],
                    oy = d.digit[NHWC ? 2 : 1], s = d.digit[3], n = n0 + s;
          const index_t at_out = pixel_offset<NHWC>(n, c, oy, ox, a.C1, a.H_out, a.W_out);
          const index_t staged = at_out - go_first;  // where t.pool_go
          const int code = args.winners == nullptr ? -1
                           : t.winner_slots > 0    ? static_cast<int>(winners_staged[staged])
                                                   : static_cast<int>(args.winners[at_out]);
          return Window2x2{
              c, ox, oy, s, t.pool_go > 0 ? static_cast<T>(go_s[staged]) : args.grad_out[at_out], code};
        },
        [&](const Window2x2& e) {
          Acc* win = a2v.at(e.s, e.c, 2 * e.oy, 2 * e.ox);
          const bool two_rows = 2 * e.oy + 1 < a.H, two_cols = 2 * e.ox + 1 < a.W;
          const Acc go = static_cast<Acc>(e.go);
          // kPoolNoWinner (the ReLU closed at the winner) matches no element.
          int arg = e.code;
          Acc winner = go;
          if (e.code < 0) {
            Acc best;
            arg = pool_window_winner(win, t.pitch, two_rows, two_cols, best);
            if (a.relu) winner = gated(go, best);
          }
          CAE_UNROLL
          for (int k = 0; k < 4; ++k) {
            const bool valid = (k < 2 || two_rows) && ((k & 1) == 0 || two_cols);
            if (valid) win[(k >> 1) * t.pitch + (k & 1)] = k == arg ? winner : Acc(0);
          }
        });
  }
  __syncthreads();

  // 4. dw2, db2.
  const SharedPlanes<const Acc> gz2{a2v.p, t.plane, a.C1 * t.plane, a.H, a.W, t.pitch};
  weight_grads(std::integral_constant<int, 1>{}, dw2_row, gz2, padded(a1_s, a.C1), a.C1);
  staged_barrier();  // and the transposed weights in place

  // 5. grad_z1 over a1.
  transposed_pass<G, NHWC>(a1v, padded(a2_s, a.C1), w2_s, a.C1, samples, t.groups1,
                           TransposedPass<T>{.out = nullptr,
                                             .n0 = n0,
                                             .C = a.C1,
                                             .H = a.H,
                                             .relu = a.relu,
                                             .vec = false,
                                             .tensor_cores = a.tensor_cores},
                           tid, threads);
  __syncthreads();

  // 6. dw1, db1, and the input gradient.
  const SharedPlanes<const Acc> gz1{a1v.p, t.plane, a.C1 * t.plane, a.H, a.W, t.pitch};
  weight_grads(std::integral_constant<int, 1>{}, dw1_row, gz1, padded(x_s, a.C0), a.C0);
  if (args.grad_input != nullptr) {
    const SharedPlanes<Acc> xv = interior(x_s, a.C0);  // its positions, not its values
    transposed_pass<G, NHWC>(xv, padded(a1_s, a.C1), w1_s, a.C1, samples, t.groups0,
                             TransposedPass<T>{.out = args.grad_input,
                                               .n0 = n0,
                                               .C = a.C0,
                                               .H = a.H,
                                               .relu = false,
                                               .vec = t.vec_gi,
                                               .tensor_cores = a.tensor_cores},
                             tid, threads);
  }

  // The totals, in the last block to finish.
  const Acc* totals = finish_grid_sums(sums, &last_flag);
  if (totals != nullptr) {
    T* const outs[kGradSegments] = {args.dw1, args.db1, args.dw2, args.db2, args.dw_down, args.db_down};
    for (int k = 0, off = 0; k < kGradSegments; off += seg[k], ++k) {
      for (int i = tid; i < seg[k]; i += threads) outs[k][i] = static_cast<T>(totals[off + i]);
    }
  }
}

}  // namespace cuda
}  // namespace cae
