// 3x3 correlation (the convolution's forward, the transposed convolution's
// input gradient), the weight gradient of both, and the bias gradient: the
// __global__ kernels and torch-free launchers (raw pointers, a stream). The
// launchers compute grid, block and shared memory, so the nvcc build and the
// emulated build (csrc/sim) run identical configurations.
//
// Layout of the work (see plan_output_tile): a block computes a tile of output
// pixels of one or more images, one pixel per thread, and all output
// channels of the block's channel group per thread in registers (COB of
// them: 1, 4, 8 or 16). Input channels pass through shared memory in chunks:
// the input tile with its 1-pixel halo (stride 2: 2 * tile + 1) and the
// chunk's weights, both converted to the accumulation type once.
#pragma once

#include "common.cuh"
#include "grid_sums.cuh"

namespace cae {
namespace cuda {

// ---------------------------------------------------------------------------
// Staging an input tile in shared memory
// ---------------------------------------------------------------------------

// The input window of a block: `samples` images x rows x cols pixels starting
// at (n0, y0, x0) (y0, x0 may be -1: the halo), channels [c0, c0 + count).
struct Window {
  int n0, y0, x0;
  int c0, count;
  int rows, cols;
  int samples;
  int channel_stride;  // shared-memory elements between channels (odd)
  int sample_stride;   // shared-memory elements between samples
  int pitch = 0;       // shared-memory elements between rows, where more than cols
  CAE_HOST_DEVICE int row_pitch() const { return pitch > cols ? pitch : cols; }
};

// The digits of a thread's elements in a row-major index space of four
// dimensions (digit[0] fastest; radices of the first three given, the last
// unbounded), element `first` and every `stride`-th after it (kThreads: a
// block's threads; 32: a warp's lanes). The first digits and the stride's
// own cost a division per dimension once; advance() then adds the stride's
// digits with carries, at most one per digit (a digit and a step digit are
// both below the radix): no division per element. The walk ends when the
// last digit reaches that dimension's size.
struct StridedDigits {
  int digit[4], step[4], radix[3];

  CAE_DEVICE StridedDigits(int first, int r0, int r1, int r2, int stride = kThreads) : radix{r0, r1, r2} {
    unsigned f = first, k = stride;  // unsigned: the shorter division
    CAE_UNROLL
    for (int d = 0; d < 3; ++d) {
      const unsigned r = radix[d];
      digit[d] = static_cast<int>(f % r), step[d] = static_cast<int>(k % r);
      f /= r, k /= r;
    }
    digit[3] = static_cast<int>(f), step[3] = static_cast<int>(k);
  }

  CAE_DEVICE void advance() {
    int carry = 0;
    CAE_UNROLL
    for (int d = 0; d < 3; ++d) {
      digit[d] += step[d] + carry;
      carry = digit[d] >= radix[d];
      if (carry) digit[d] -= radix[d];
    }
    digit[3] += step[3] + carry;
  }
};

// Staging runs at global memory's latency, not its bandwidth, when a thread
// waits for each load before it issues the next (a loop of load, store to
// shared memory, advance: one load in flight per thread, ~0.6 us an
// iteration from HBM, and a block stages 10-40 elements per thread). The
// staging loops therefore walk their elements B at a time: every load of a
// batch first (`fetch`: the element's raw value and where it goes), then its
// stores (`put`), so a thread keeps B loads in flight: stage_batch, up to 4
// loads of 4 bytes, 2 of 8, one 16-byte vector; fewer in the kernels whose
// register cap leaves no room (a load holds its registers until its store).
constexpr int kStageBatch = 4;

template <int B, class Fetch, class Put>
CAE_DEVICE void batched_walk(StridedDigits& at, int end, Fetch fetch, Put put) {
  using Item = decltype(fetch(at));
  while (at.digit[3] < end) {
    Item items[B];
    bool live[B];
    CAE_UNROLL
    for (int k = 0; k < B; ++k) {
      live[k] = at.digit[3] < end;
      if (live[k]) {
        items[k] = fetch(at);
        at.advance();
      }
    }
    CAE_UNROLL
    for (int k = 0; k < B; ++k) {
      if (live[k]) put(items[k]);
    }
  }
}

// Loads in flight per thread for loads of `bytes` each, at most `most`.
template <size_t bytes, int most = kStageBatch>
constexpr int stage_batch() {
  const int fit = bytes >= 16 ? 1 : bytes >= 8 ? 2 : 4;
  return fit < most ? fit : most;
}

// V elements of a staging, as loaded, and where they go in shared memory.
template <typename T, int V = 1>
struct Staged {
  int at;
  RawGated<T, V> r;
};

// Where one load of a staging goes: x[src], ..., x[src + U - 1] (zeros unless
// `inside`) to dst[at + j * stride].
struct StagedPlace {
  int at;
  index_t src;
  bool inside;
};

// A staging's walk over this thread's loads (`place`: where each goes).
// Without a gate or a conversion (T the accumulation type) as copy_async
// copies: all in flight at once, and the caller's staged_barrier waits for
// them; else B loads in flight at a time (batched_walk), gated and converted
// in registers.
template <int U, int B, typename Acc, typename T, class Place>
CAE_DEVICE void stage_walk(StridedDigits& at, int end, Acc* dst, int stride, const T* __restrict__ x,
                           const T* __restrict__ gate, Place place) {
  if constexpr (std::is_same<T, Acc>::value) {
    if (gate == nullptr) {
      for (; at.digit[3] < end; at.advance()) {
        const StagedPlace p = place(at);
        CAE_UNROLL
        for (int j = 0; j < U; ++j)
          copy_async(dst + p.at + j * stride, p.inside ? x + p.src + j : x, p.inside);
      }
      return;
    }
  }
  batched_walk<B>(
      at, end,
      [&](const StridedDigits& d) {
        const StagedPlace p = place(d);
        return Staged<T, U>{p.at, load_raw<U>(x, gate, p.src, p.inside)};
      },
      [&](const Staged<T, U>& e) {
        CAE_UNROLL
        for (int j = 0; j < U; ++j) dst[e.at + j * stride] = e.r.template value<Acc>(j, gate != nullptr);
      });
}

// Copies gate(x) over the window into dst[s * sample_stride + c *
// channel_stride + r * row_pitch() + col], zero outside the image or batch.
// NCHW: consecutive threads read consecutive columns of one row.
template <int MaxBatch = kStageBatch, typename Acc, typename T>
CAE_DEVICE void stage_nchw(Acc* dst, const T* __restrict__ x, const T* __restrict__ gate, int N, int C, int H,
                           int W, const Window& win, int tid, int threads = kThreads) {
  StridedDigits at(tid, win.cols, win.rows, win.count, threads);  // (col, r, c, s)
  stage_walk<1, stage_batch<sizeof(T), MaxBatch>()>(
      at, win.samples, dst, 0, x, gate, [&](const StridedDigits& d) {
        const int col = d.digit[0], r = d.digit[1], c = d.digit[2], s = d.digit[3];
        const int n = win.n0 + s, y = win.y0 + r, xx = win.x0 + col;
        return StagedPlace{s * win.sample_stride + c * win.channel_stride + r * win.row_pitch() + col,
                           ((static_cast<index_t>(n) * C + win.c0 + c) * H + y) * W + xx,
                           n < N && y >= 0 && y < H && xx >= 0 && xx < W};
      });
}

// NHWC: consecutive threads read consecutive channels of one pixel, V of them
// per thread as one vector load when `vec` (channel counts and pointers
// aligned, see vector_ok), so a warp reads whole rows of pixels.
template <int V, int MaxBatch = kStageBatch, typename Acc, typename T>
CAE_DEVICE void stage_nhwc(Acc* dst, const T* __restrict__ x, const T* __restrict__ gate, int N, int C, int H,
                           int W, const Window& win, bool vec, int tid, int threads = kThreads) {
  auto walk = [&](auto width) {
    constexpr int U = decltype(width)::value;                           // elements per load: V, or 1
    StridedDigits at(tid, win.count / U, win.cols, win.rows, threads);  // (lane, col, r, s)
    stage_walk<U, stage_batch<U * sizeof(T), MaxBatch>()>(
        at, win.samples, dst, win.channel_stride, x, gate, [&](const StridedDigits& d) {
          const int c = d.digit[0] * U, col = d.digit[1], r = d.digit[2], s = d.digit[3];
          const int n = win.n0 + s, y = win.y0 + r, xx = win.x0 + col;
          return StagedPlace{s * win.sample_stride + c * win.channel_stride + r * win.row_pitch() + col,
                             ((static_cast<index_t>(n) * H + y) * W + xx) * C + win.c0 + c,
                             n < N && y >= 0 && y < H && xx >= 0 && xx < W};
        });
  };
  if (vec) {
    walk(std::integral_constant<int, V>{});
  } else {
    walk(std::integral_constant<int, 1>{});
  }
}

// A pass's weights in shared memory as [taps][COB] (taps = input channels x
// 9, what the products read as broadcasts) from COB rows of `taps`
// consecutive elements, `row_stride` apart in w, starting at w + first: a
// convolution weight [C_out][C_in][3][3] read for output channels co0.. and
// input channels c0... Consecutive threads read consecutive elements of each
// row (coalesced); a thread takes one tap of W rows at a time and stores them
// as one shared-memory vector, or (no conversion) copies each by copy_async,
// for the caller's staged_barrier. Rows from `rows` on (channels past C_out)
// are zeros.
template <int COB, typename Acc, typename T>
CAE_DEVICE void stage_weight_rows(Acc* w_s, const T* __restrict__ w, index_t first, index_t row_stride,
                                  int rows, int taps, int tid, int threads = kThreads) {
  constexpr int W = vec_width<Acc, COB>();  // divides COB (1, 4, 8, 16)
  for (int e = tid; e < taps; e += threads) {
    if constexpr (std::is_same<T, Acc>::value) {  // copies, waited for with the input's (staged_barrier)
      CAE_UNROLL
      for (int j = 0; j < COB; ++j)
        copy_async(w_s + e * COB + j, j < rows ? w + first + j * row_stride + e : w, j < rows);
      continue;
    }
    CAE_UNROLL
    for (int j = 0; j < COB; j += W) {
      Vec<Acc, W> v;
      CAE_UNROLL
      for (int k = 0; k < W; ++k)
        v.v[k] = j + k < rows ? static_cast<Acc>(w[first + (j + k) * row_stride + e]) : Acc(0);
      *reinterpret_cast<Vec<Acc, W>*>(w_s + e * COB + j) = v;
    }
  }
}

// Stores the COB channels [co0, co0 + COB) of one output pixel (bias, ReLU
// applied), skipping channels >= C. NHWC writes them as vectors when `vec`.
template <int COB, bool NHWC, typename T, typename Acc>
CAE_DEVICE void store_pixel(T* __restrict__ out, const Acc (&acc)[COB], const T* __restrict__ bias,
                            bool relu_out, int n, int co0, int C, int H, int W, int y, int xx, bool vec) {
  Acc v[COB];
  CAE_UNROLL
  for (int j = 0; j < COB; ++j) {
    const int co = co0 + j;
    Acc r = acc[j];
    if (bias != nullptr && co < C) r += static_cast<Acc>(bias[co]);
    v[j] = relu_out ? relu(r) : r;
  }
  if (NHWC) {
    T* dst = out + ((static_cast<index_t>(n) * H + y) * W + xx) * C + co0;
    constexpr int V = vec_width<T, COB>();
    if (V > 1 && vec) {  // C % V == 0: a vector is wholly inside or outside
      CAE_UNROLL
      for (int j = 0; j < COB; j += V) {
        if (co0 + j < C) {
          Vec<T, V> o;
          CAE_UNROLL
          for (int k = 0; k < V; ++k) o.v[k] = static_cast<T>(v[j + k]);
          *reinterpret_cast<Vec<T, V>*>(dst + j) = o;
        }
      }
    } else {
      CAE_UNROLL
      for (int j = 0; j < COB; ++j)
        if (co0 + j < C) dst[j] = static_cast<T>(v[j]);
    }
  } else {
    const index_t plane = static_cast<index_t>(H) * W;
    T* dst = out + (static_cast<index_t>(n) * C + co0) * plane + static_cast<index_t>(y) * W + xx;
    CAE_UNROLL
    for (int j = 0; j < COB; ++j)
      if (co0 + j < C) dst[j * plane] = static_cast<T>(v[j]);
  }
}

// ---------------------------------------------------------------------------
// Deterministic sums: per-block partial sums into a scratch buffer
// [rows][cols], then blocks of reduce_partials add the rows in a fixed order.
// No float atomics anywhere, so gradients are bitwise reproducible run to run.
// ---------------------------------------------------------------------------

// Where reduce_partials writes column c: out[c] below `split`, then
// out_rest[c - split] (the weight gradient's columns, then the bias's).
template <typename T>
struct SumsOut {
  T* out;
  int split;
  T* out_rest;
  CAE_DEVICE T& at(int c) const { return c < split ? out[c] : out_rest[c - split]; }
};

// Partial sums to add: `blocks` blocks of 32 columns each (0: nothing to add).
// A launch of their own (reduce_partials_kernel), or extra blocks at the end of
// a correlation's grid: a layer's backward launches its weight gradient, then
// its input gradient, whose extra blocks add the weight gradient's partials
// (one launch fewer per layer, and the sums overlap the correlation).
template <typename T, typename Acc>
struct SumsJob {
  using value_type = T;
  using acc_type = Acc;
  const Acc* partial;
  int rows, cols;
  SumsOut<T> out;
  int blocks;
};

// One block of the sums: out[c] = sum_r partial[r][c] for its 32 columns
// (coalesced), 8 thread rows each summing every 8th partial row in order,
// then the 8 in order. `scratch` holds kWarps * 32 accumulators.
template <typename T, typename Acc>
CAE_DEVICE void reduce_partials_block(const SumsJob<T, Acc>& job, int block, Acc* scratch) {
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int c = block * 32 + lane;
  Acc s = Acc(0);
  if (c < job.cols) {
    for (int r = slice; r < job.rows; r += kWarps) s += job.partial[static_cast<index_t>(r) * job.cols + c];
  }
  scratch[slice * 32 + lane] = s;
  __syncthreads();
  if (slice == 0 && c < job.cols) {
    Acc total = scratch[lane];
    for (int k = 1; k < kWarps; ++k) total += scratch[k * 32 + lane];
    job.out.at(c) = static_cast<T>(total);
  }
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) reduce_partials_kernel(SumsJob<T, Acc> job) {
  __shared__ Acc scratch[kWarps * 32];
  reduce_partials_block(job, blockIdx.x, scratch);
}

template <typename T, typename Acc>
inline void launch_reduce_partials(const SumsJob<T, Acc>& job, cudaStream_t stream) {
  const auto kernel = reduce_partials_kernel<T, Acc>;
  CAE_LAUNCH(kernel, dim3(static_cast<unsigned>(job.blocks)), kThreads, 0, stream, job);
}

// The blocks past a correlation's own `blocks` run `sums`; their dynamic
// shared memory must hold the sums' scratch too.
template <typename Acc>
inline size_t smem_with_sums(size_t smem, int sums_blocks) {
  const size_t scratch = sums_blocks > 0 ? kWarps * 32 * sizeof(Acc) : 0;
  return smem > scratch ? smem : scratch;
}

// ---------------------------------------------------------------------------
// correlate: out[n, co, oy, ox] = act(bias[co] + sum_{ci, ky, kx}
//   gate(x)[n, ci, S*oy + ky - 1, S*ox + kx - 1] * w[co, ci, ky, kx])
// ---------------------------------------------------------------------------

template <typename T>
struct CorrelateArgs {
  T* out;           // [N, C_out, H_out, W_out]
  const T* x;       // [N, C_in, H, W]
  const T* x_gate;  // like x, or nullptr
  const T* w;       // [C_out, C_in, 3, 3]
  const T* bias;    // [C_out] or nullptr
  int N, C_in, H, W, C_out, H_out, W_out;
  bool relu;
};

// Tiling of an output of rows x cols pixels per image, and the shared memory
// of a pass over `chunk` input channels: weights [chunk][9][COB] first, then
// the input window [samples][chunk][in_rows][in_cols].
struct ConvTiling {
  int rows, cols, samples, tiles_y, tiles_x;
  int tile_blocks;       // blocks per output-channel group (blockIdx.x = group * tile_blocks + tile)
  int in_rows, in_cols;  // the input window of a tile (with halo)
  int chunk;             // input channels per pass
  int channel_stride, sample_stride;
  bool vec_in, vec_out;  // NHWC vector loads / stores allowed
};

struct ConvPlan {
  ConvTiling t;
  index_t blocks;  // the caller checks that it fits a grid (< 2^31)
  size_t smem;
};

template <typename Acc>
inline ConvPlan finish_conv_plan(ConvTiling t, const OutputTile& tile, int C_in, int co_block, int co_groups,
                                 int in_align) {
  const size_t window = static_cast<size_t>(t.in_rows) * t.in_cols;
  // per channel: its window in every sample (+1 for the odd stride) and 9*COB weights
  const size_t per_channel = (t.samples * (window + 1) + 9 * co_block) * sizeof(Acc);
  t.chunk = plan_channel_chunk(C_in, per_channel, 0, kSmemBudget, in_align);
  t.channel_stride = odd_stride(static_cast<int>(window));
  t.sample_stride = t.chunk * t.channel_stride;
  t.tile_blocks =
      static_cast<int>(tile.blocks() < (index_t{1} << 31) ? tile.blocks() : (index_t{1} << 31) - 1);
  ConvPlan p;
  p.t = t;
  p.blocks = tile.blocks() * co_groups;
  p.smem = (static_cast<size_t>(t.chunk) * 9 * co_block + static_cast<size_t>(t.samples) * t.sample_stride) *
           sizeof(Acc);
  return p;
}

template <typename T, typename Acc>
inline ConvPlan plan_correlate(const CorrelateArgs<T>& a, int stride, bool nhwc) {
  const OutputTile tile = plan_output_tile(a.N, a.H_out, a.W_out);
  ConvTiling t{};
  t.rows = tile.rows, t.cols = tile.cols, t.samples = tile.samples;
  t.tiles_y = tile.tiles_y, t.tiles_x = tile.tiles_x;
  t.in_rows = (tile.rows - 1) * stride + 3;
  t.in_cols = (tile.cols - 1) * stride + 3;
  constexpr int V = vec_width<T>();
  const int cob = channel_block(a.C_out);
  ConvPlan p = finish_conv_plan<Acc>(t, tile, a.C_in, cob, ceil_div(a.C_out, cob), nhwc ? V : 1);
  p.t.vec_in = nhwc && p.t.chunk % V == 0 && vector_ok<V>(a.x, a.C_in, a.C_in) &&
               (a.x_gate == nullptr || vector_ok<V>(a.x_gate, a.C_in, a.C_in));
  const int vo = cob < V ? cob : V;
  p.t.vec_out =
      nhwc && vo > 1 && reinterpret_cast<uintptr_t>(a.out) % (sizeof(T) * vo) == 0 && a.C_out % vo == 0;
  return p;
}

// __launch_bounds__'s blocks per SM for correlate_kernel: the register cap
// (64K / (kThreads * blocks): 4 -> 64, 3 -> 80, 2 -> 128 per thread) that its
// variants meet without spilling on sm_90; without one ptxas picks a cap of
// its own, and spilled in some (benchmarks/results/sass-sm90.md). 4 up to 4
// accumulators per thread (3 in NHWC, whose vector staging needs more), 3 for
// 8, 2 for 16. Shared memory (up to kSmemBudget) allows 4. Under a cap of 64
// or 80 the staging keeps one load in flight (stage_batch): more spill.
template <typename T, typename Acc, int COB, bool NHWC>
constexpr int conv_min_blocks() {
  return COB <= 4 ? (NHWC ? 3 : 4) : COB <= 8 ? 3 : 2;
}

template <typename T, typename Acc, int S, int COB, bool NHWC>
__global__ void __launch_bounds__(kThreads, conv_min_blocks<T, Acc, COB, NHWC>())
    correlate_kernel(CorrelateArgs<T> a, ConvTiling t, SumsJob<T, Acc> sums) {
  CAE_DYNAMIC_SHARED(Acc, smem);
  const int own_blocks = static_cast<int>(gridDim.x) - sums.blocks;
  if (static_cast<int>(blockIdx.x) >= own_blocks)
    return reduce_partials_block(sums, blockIdx.x - own_blocks, smem);
  Acc* w_s = smem;                       // [chunk][9][COB]
  Acc* in_s = smem + t.chunk * 9 * COB;  // [samples][chunk][in_rows][in_cols]
  const int tid = threadIdx.x;
  const TileOrigin o =
      tile_origin(blockIdx.x % t.tile_blocks, t.tiles_x, t.tiles_y, t.rows, t.cols, t.samples);
  const int co0 = static_cast<int>(blockIdx.x / t.tile_blocks) * COB;
  // This thread's output pixel (its tile may overhang the image: then it
  // stages and computes like the others but stores nothing).
  const int px = tid % t.cols, py = (tid / t.cols) % t.rows, ps = tid / (t.cols * t.rows);
  const int n = o.n0 + ps, oy = o.y0 + py, ox = o.x0 + px;

  Acc acc[COB];
  CAE_UNROLL
  for (int j = 0; j < COB; ++j) acc[j] = Acc(0);

  for (int c0 = 0; c0 < a.C_in; c0 += t.chunk) {
    const int count = a.C_in - c0 < t.chunk ? a.C_in - c0 : t.chunk;
    __syncthreads();  // the previous pass is done reading
    stage_weight_rows<COB>(w_s, a.w, (static_cast<index_t>(co0) * a.C_in + c0) * 9,
                           static_cast<index_t>(a.C_in) * 9, a.C_out - co0, count * 9, tid);
    const Window win{o.n0,      o.y0 * S - 1,     o.x0 * S - 1,   c0, count, t.in_rows, t.in_cols,
                     t.samples, t.channel_stride, t.sample_stride};
    constexpr int batch = conv_min_blocks<T, Acc, COB, NHWC>() > 2 ? 1 : kStageBatch;
    if (NHWC) {
      stage_nhwc<vec_width<T>(), batch>(in_s, a.x, a.x_gate, a.N, a.C_in, a.H, a.W, win, t.vec_in, tid);
    } else {
      stage_nchw<batch>(in_s, a.x, a.x_gate, a.N, a.C_in, a.H, a.W, win, tid);
    }
    staged_barrier();
    const Acc* src = in_s + ps * t.sample_stride + py * S * t.in_cols + px * S;
    for (int c = 0; c < count; ++c, src += t.channel_stride) {
      const Acc* wc = w_s + c * 9 * COB;
      CAE_UNROLL
      for (int ky = 0; ky < 3; ++ky) {
        CAE_UNROLL
        for (int kx = 0; kx < 3; ++kx) {
          const Acc v = src[ky * t.in_cols + kx];
          const Acc* wk = wc + (ky * 3 + kx) * COB;  // same address in every thread: a broadcast
          CAE_UNROLL
          for (int j = 0; j < COB; ++j) acc[j] += v * wk[j];
        }
      }
    }
  }
  if (n < a.N && oy < a.H_out && ox < a.W_out) {
    store_pixel<COB, NHWC>(a.out, acc, a.bias, a.relu, n, co0, a.C_out, a.H_out, a.W_out, oy, ox, t.vec_out);
  }
}

template <typename T, typename Acc>
inline void launch_correlate(const CorrelateArgs<T>& a, const ConvPlan& p, int stride, bool nhwc,
                             const SumsJob<T, Acc>& sums, cudaStream_t stream) {
  with_stride(stride, [&](auto s) {
    with_channel_block(a.C_out, [&](auto cob) {
      with_bool(nhwc, [&](auto layout) {
        const auto kernel =
            correlate_kernel<T, Acc, decltype(s)::value, decltype(cob)::value, decltype(layout)::value>;
        CAE_LAUNCH(kernel, static_cast<unsigned>(p.blocks + sums.blocks), kThreads,
                   smem_with_sums<Acc>(p.smem, sums.blocks), stream, a, p.t, sums);
      });
    });
  });
}

// 32 warp sums at once, in fixed trees: lane l ends with the sum of v[l] over
// the warp in v[0]. Each step halves the values a lane carries (it keeps one
// half, sends the other to its partner): 31 shuffles instead of 32 x 5. The
// step is a template parameter so that every index is a constant (registers,
// not local memory).
template <int Half = 16, typename Acc>
CAE_DEVICE void warp_sums_transposed(Acc (&v)[32], int lane) {
  const bool upper = (lane & Half) != 0;
  CAE_UNROLL
  for (int i = 0; i < Half; ++i) {
    const Acc send = upper ? v[i] : v[i + Half];
    const Acc keep = upper ? v[i + Half] : v[i];
    v[i] = keep + __shfl_xor_sync(0xffffffffu, send, Half);
  }
  if constexpr (Half > 1) warp_sums_transposed<Half / 2>(v, lane);
}

// ---------------------------------------------------------------------------
// weight_grad: out[ca, cb, ky, kx] = sum_{n, oy, ox} gate(a)[n, ca, oy, ox] *
//   gate(b)[n, cb, S*oy + ky - 1, S*ox + kx - 1]
// a is the small (strided) side [N, C_a, H_a, W_a], b the large side.
//
// A GEMM [C_a] x [C_b * 9] with a reduction over N * H_a * W_a positions.
// Each block owns regions of positions (`samples` images x a tile of up to
// 32 x 32) and stages a region's a and b, every channel of both where they
// fit (the regions are sized so that they do for the autoencoder's layers:
// the inputs are read from global memory once), else chunks of channels.
// Then passes over the staged "units", one per warp: CA_R channels of a x one
// channel of b x 9 taps = 9 * CA_R accumulators, over a share of the region's
// positions (lanes take consecutive positions); warp shuffles, shared memory
// across the warps that split one unit's positions, and the block's partial
// sums, stored by the block's first region and added to by its later ones
// (the same thread, in region order); reduce_partials adds the blocks in
// order. The bias's gradient is summed from the values the product loads,
// into the same partial rows (no pass or launch of its own).
// weight_grad_mma_kernel (conv3x3_mma_kernels.cuh) is the same work on tensor
// cores for 5 to 16 channels of a, with the same regions and partial rows.
// ---------------------------------------------------------------------------

template <typename T>
struct WeightGradArgs {
  T* out;           // [C_a, C_b, 3, 3]
  const T* a;       // [N, C_a, H_a, W_a]
  const T* a_gate;  // like a, or nullptr
  const T* b;       // [N, C_b, H, W]
  const T* b_gate;  // like b, or nullptr
  int N, C_a, H_a, W_a, C_b, H, W;
  // The bias's gradient, summed from the same staged tiles: the sum of gate(b)
  // (H = stride * H_a) when the output gradient is the large side (a
  // transposed convolution's), else of gate(a).
  bool grad_output_is_large;
};

constexpr int kMaxPartialBlocks = 512;  // a fixed cap: the grid never depends on the device
// Positions per region: kRegionPositions, halved down to kMinRegionPositions
// while the batch gives fewer than kFillRegions regions, so the small late
// layers still spread over a large GPU (two blocks on each of an H100's or
// H200's 132 SMs; at batch 256, 14 x 14 layers get 256 blocks instead of 86,
// 7 x 7 ones 128 instead of 24). Fixed numbers: the grid never depends on the
// device.
constexpr int kRegionPositions = 512;
constexpr int kMinRegionPositions = 64;
constexpr index_t kFillRegions = 264;

struct WeightGradTiling {
  int rows, cols, samples, tiles_y, tiles_x;
  int regions;
  int b_rows, b_cols;       // the b window of a region (with halo)
  int positions, a_stride;  // positions per region; a's channel stride in shared memory (odd)
  int b_channel_stride;     // b's channel stride in shared memory (odd)
  int ca_stage, cb_stage;   // channels staged at once: a (a multiple of CA_R), b
  int units;                // (ca_stage / CA_R) x cb_stage units per staging
  int items, splits;        // a pass: `items` units x `splits` warps each (<= kWarps)
  bool vec_a, vec_b;        // NHWC vector loads allowed
};

struct WeightGradPlan {
  WeightGradTiling t;
  index_t regions;  // the caller checks that it fits an int
  int blocks;       // min(regions, kMaxPartialBlocks): rows of the partial sums
  size_t smem;
};

inline int weight_grad_ca_block(int C_a) { return C_a >= 4 ? 4 : 1; }

// The region of about `target` positions: whole images up to 32 x 32 (several
// small ones together), the tile halved (the longer side first) while larger.
inline void plan_region(WeightGradTiling& t, int N, int H_a, int W_a, int stride, int target) {
  t.rows = H_a < 32 ? H_a : 32;
  t.cols = W_a < 32 ? W_a : 32;
  while (t.rows * t.cols > target) {
    if (t.rows >= t.cols) {
      t.rows = ceil_div(t.rows, 2);
    } else {
      t.cols = ceil_div(t.cols, 2);
    }
  }
  const int per_image = t.rows * t.cols;
  t.samples = per_image >= target ? 1 : ceil_div(target, per_image);
  if (t.samples > N) t.samples = N;
  t.b_rows = (t.rows - 1) * stride + 3;
  t.b_cols = (t.cols - 1) * stride + 3;
  t.positions = t.samples * per_image;
  t.a_stride = odd_stride(t.positions);
  t.b_channel_stride = odd_stride(t.samples * t.b_rows * t.b_cols);
}

// The first region size to try: kRegionPositions, halved while the batch
// gives fewer than kFillRegions regions.
template <typename T>
inline int region_target(const WeightGradArgs<T>& a) {
  const index_t positions = static_cast<index_t>(a.N) * a.H_a * a.W_a;
  int target = kRegionPositions;
  while (target > kMinRegionPositions && positions / target < kFillRegions) target /= 2;
  return target;
}

// The tiling's regions and NHWC vector loads, once the region and the staged
// channels are chosen; the number of regions.
template <typename T>
inline index_t finish_weight_grad_tiling(WeightGradTiling& t, const WeightGradArgs<T>& a, bool nhwc) {
  t.tiles_y = ceil_div(a.H_a, t.rows);
  t.tiles_x = ceil_div(a.W_a, t.cols);
  const index_t regions = static_cast<index_t>(ceil_div(a.N, t.samples)) * t.tiles_y * t.tiles_x;
  t.regions = static_cast<int>(regions < (index_t{1} << 31) ? regions : (index_t{1} << 31) - 1);
  constexpr int V = vec_width<T>();
  t.vec_a = nhwc && t.ca_stage % V == 0 && vector_ok<V>(a.a, a.C_a, a.C_a) &&
            (a.a_gate == nullptr || vector_ok<V>(a.a_gate, a.C_a, a.C_a));
  t.vec_b = nhwc && t.cb_stage % V == 0 && vector_ok<V>(a.b, a.C_b, a.C_b) &&
            (a.b_gate == nullptr || vector_ok<V>(a.b_gate, a.C_b, a.C_b));
  return regions;
}

// Rows of the partial sums: a block per region, at most kMaxPartialBlocks.
inline int partial_blocks(index_t regions) {
  return static_cast<int>(regions < kMaxPartialBlocks ? regions : kMaxPartialBlocks);
}

template <typename T, typename Acc>
inline WeightGradPlan plan_weight_grad(const WeightGradArgs<T>& a, int stride, bool nhwc) {
  WeightGradTiling t{};
  const int car = weight_grad_ca_block(a.C_a);
  const int ca_all = car * ceil_div(a.C_a, car);
  int target = region_target(a);
  auto bytes = [&](int ca, int cb) {
    return static_cast<size_t>(t.positions) * sizeof(int) +
           (kWarps * 10 * car + static_cast<size_t>(ca) * t.a_stride +
            static_cast<size_t>(cb) * t.b_channel_stride) *
               sizeof(Acc);
  };
  // Every channel staged at once: regions halved down to kMinRegionPositions
  // until they fit. Else chunks of channels, as few stagings as fit (halving
  // on while not even one a-group and one b-channel fit).
  for (;; target /= 2) {
    plan_region(t, a.N, a.H_a, a.W_a, stride, target);
    if (bytes(ca_all, a.C_b) <= kSmemBudget) {
      t.ca_stage = ca_all, t.cb_stage = a.C_b;
      break;
    }
    if (target > kMinRegionPositions) continue;
    if (bytes(car, 1) <= kSmemBudget || target <= 1) {
      int best = 0;
      for (int cb = a.C_b; cb >= 1; --cb) {
        int ca = ca_all;
        while (ca > car && bytes(ca, cb) > kSmemBudget) ca -= car;
        if (bytes(ca, cb) > kSmemBudget && !(ca == car && cb == 1)) continue;
        const int stagings = ceil_div(a.C_a, ca) * ceil_div(a.C_b, cb);
        if (best == 0 || stagings < best) best = stagings, t.ca_stage = ca, t.cb_stage = cb;
      }
      break;
    }
  }
  const index_t regions = finish_weight_grad_tiling(t, a, nhwc);
  t.units = t.ca_stage / car * t.cb_stage;
  t.items = t.units < kWarps ? t.units : kWarps;
  t.splits = kWarps / t.items;
  WeightGradPlan p;
  p.t = t;
  p.regions = regions;
  p.blocks = partial_blocks(regions);
  p.smem = bytes(t.ca_stage, t.cb_stage);
  return p;
}

// Stages gate(a) over a region: dst[c * a_stride + p], p = (s, y, x) row-major.
// Channels from `count` to `padded_count` (a short last chunk) are zeros.
template <int V, bool NHWC, int MaxBatch = kStageBatch, typename Acc, typename T>
CAE_DEVICE void stage_positions(Acc* dst, const T* __restrict__ x, const T* __restrict__ gate, int N, int C,
                                int H, int W, int n0, int y0, int x0, int c0, int count, int padded_count,
                                const WeightGradTiling& t, bool vec, int tid) {
  const int per_image = t.rows * t.cols;
  auto walk = [&](auto width) {
    constexpr int U = decltype(width)::value;  // elements per load: V (NHWC vectors), or 1
    // NHWC (lane, x, y, s), NCHW (x, y, s, c).
    StridedDigits at = NHWC ? StridedDigits(tid, padded_count / U, t.cols, t.rows)
                            : StridedDigits(tid, t.cols, t.rows, t.samples);
    stage_walk<U, stage_batch<U * sizeof(T), MaxBatch>()>(
        at, NHWC ? t.samples : padded_count, dst, t.a_stride, x, gate, [&](const StridedDigits& d) {
          const int c = NHWC ? d.digit[0] * U : d.digit[3], px = d.digit[NHWC ? 1 : 0],
                    py = d.digit[NHWC ? 2 : 1], s = d.digit[NHWC ? 3 : 2];
          const int n = n0 + s, y = y0 + py, xx = x0 + px;
          return StagedPlace{c * t.a_stride + s * per_image + py * t.cols + px,
                             pixel_offset<NHWC>(n, c0 + c, y, xx, C, H, W),
                             n < N && y < H && xx < W && c < count};
        });
  };
  if (NHWC && vec) {
    walk(std::integral_constant<int, V>{});
  } else {
    walk(std::integral_constant<int, 1>{});
  }
}

// Where position p's 3x3 window starts in the staged b: offset_s[p].
CAE_DEVICE void stage_window_offsets(int* offset_s, const WeightGradTiling& t, int stride, int tid) {
  const int b_image = t.b_rows * t.b_cols;
  StridedDigits at(tid, t.cols, t.rows, t.samples);  // (x, y, s, 0)
  for (int p = tid; p < t.positions; p += kThreads, at.advance()) {
    offset_s[p] = at.digit[2] * b_image + at.digit[1] * stride * t.b_cols + at.digit[0] * stride;
  }
}

// Loads in flight while the weight-gradient kernels stage (stage_batch): 4
// spill under their register caps.
constexpr int kWeightGradStageBatch = 2;

// __launch_bounds__'s blocks per SM for weight_grad_kernel (see
// conv_min_blocks): a unit's 9 * CA_R sums and CA_R bias sums per thread
// besides two staging walks. CA_R = 1: 3 (80 registers), 2 in double or when
// NHWC staging converts 8 half-width values at a time; CA_R = 4: 2 (128), 1 in
// double (its 40 double sums alone take 80 registers).
template <typename T, typename Acc, int CA_R, bool NHWC>
constexpr int weight_grad_min_blocks() {
  return CA_R == 1 ? (sizeof(Acc) > 4 || (NHWC && sizeof(T) < 4) ? 2 : 3) : sizeof(Acc) > 4 ? 1 : 2;
}

template <typename T, typename Acc, int S, int CA_R, bool NHWC>
__global__ void __launch_bounds__(kThreads, weight_grad_min_blocks<T, Acc, CA_R, NHWC>())
    weight_grad_kernel(WeightGradArgs<T> a, WeightGradTiling t, Acc* __restrict__ partial) {
  constexpr int R = CA_R * 9;   // the weight's accumulators of a unit
  constexpr int RB = R + CA_R;  // and its bias sums
  CAE_DYNAMIC_SHARED(Acc, smem);
  Acc* red_s = smem;                         // [kWarps][RB]
  Acc* a_s = red_s + kWarps * RB;            // [ca_stage][a_stride]
  Acc* b_s = a_s + t.ca_stage * t.a_stride;  // [cb_stage][b_channel_stride]
  int* offset_s = reinterpret_cast<int*>(b_s + t.cb_stage * t.b_channel_stride);  // [positions]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int b_image = t.b_rows * t.b_cols;
  // A block's partial sums: the weight's [C_a][C_b][9], then the bias's.
  const int weight_outputs = a.C_a * a.C_b * 9;
  const index_t partial_row =
      static_cast<index_t>(blockIdx.x) * (weight_outputs + (a.grad_output_is_large ? a.C_b : a.C_a));

  stage_window_offsets(offset_s, t, S, tid);

  // This warp's share of a pass: unit `item` of the pass, position split `split`.
  const bool busy = warp < t.items * t.splits;
  const int item = warp % t.items, split = warp / t.items;
  // The bias's gradient comes from values the product loads anyway: a's CA_R
  // channels in the units of the first b-channel, or (the output gradient on
  // the large side) b's pixels under a position's own S x S taps (rows and
  // columns 1..S of its window: each pixel of b belongs to one position) in
  // the units of the first a-channel group.
  const bool bias_of_large = a.grad_output_is_large;

  for (int ca0 = 0; ca0 < a.C_a; ca0 += t.ca_stage) {
    const int ca_count = a.C_a - ca0 < t.ca_stage ? a.C_a - ca0 : t.ca_stage;
    for (int cb0 = 0; cb0 < a.C_b; cb0 += t.cb_stage) {
      const int cb_count = a.C_b - cb0 < t.cb_stage ? a.C_b - cb0 : t.cb_stage;
      // Each bias channel once: in the first staging of the other side's channels.
      const bool bias_staging = bias_of_large ? ca0 == 0 : cb0 == 0;
      for (int region = blockIdx.x; region < t.regions; region += gridDim.x) {
        const bool first_region = region == static_cast<int>(blockIdx.x);
        const TileOrigin o = tile_origin(region, t.tiles_x, t.tiles_y, t.rows, t.cols, t.samples);
        __syncthreads();  // the previous region (or staging) is done reading
        stage_positions<vec_width<T>(), NHWC, kWeightGradStageBatch>(a_s, a.a, a.a_gate, a.N, a.C_a, a.H_a,
                                                                     a.W_a, o.n0, o.y0, o.x0, ca0, ca_count,
                                                                     t.ca_stage, t, t.vec_a, tid);
        const Window win{o.n0,     o.y0 * S - 1, o.x0 * S - 1,       cb0,    cb_count, t.b_rows,
                         t.b_cols, t.samples,    t.b_channel_stride, b_image};
        if (NHWC) {
          stage_nhwc<vec_width<T>(), kWeightGradStageBatch>(b_s, a.b, a.b_gate, a.N, a.C_b, a.H, a.W, win,
                                                            t.vec_b && cb_count % vec_width<T>() == 0, tid);
        } else {
          stage_nchw<kWeightGradStageBatch>(b_s, a.b, a.b_gate, a.N, a.C_b, a.H, a.W, win, tid);
        }
        staged_barrier();
        for (int unit0 = 0; unit0 < t.units; unit0 += t.items) {
          const int unit = unit0 + item;
          const int group = unit / t.cb_stage, cbl = unit % t.cb_stage;  // once a pass
          const bool mine = busy && unit < t.units && group * CA_R < ca_count && cbl < cb_count;
          const bool sums_bias = mine && bias_staging && (bias_of_large ? group == 0 : cbl == 0);
          Acc acc[CA_R][9], bias_acc[CA_R];
          CAE_UNROLL
          for (int r = 0; r < CA_R; ++r) {
            bias_acc[r] = Acc(0);
            CAE_UNROLL
            for (int k = 0; k < 9; ++k) acc[r][k] = Acc(0);
          }
          if (mine) {
            const Acc* av = a_s + group * CA_R * t.a_stride;
            const Acc* bv = b_s + cbl * t.b_channel_stride;
            for (int p = split * 32 + lane; p < t.positions; p += 32 * t.splits) {
              Acc x[CA_R];
              CAE_UNROLL
              for (int r = 0; r < CA_R; ++r) x[r] = av[r * t.a_stride + p];
              if (sums_bias && !bias_of_large) {
                CAE_UNROLL
                for (int r = 0; r < CA_R; ++r) bias_acc[r] += x[r];
              }
              const Acc* win3 = bv + offset_s[p];
              CAE_UNROLL
              for (int ky = 0; ky < 3; ++ky) {
                CAE_UNROLL
                for (int kx = 0; kx < 3; ++kx) {
                  const Acc y = win3[ky * t.b_cols + kx];
                  CAE_UNROLL
                  for (int r = 0; r < CA_R; ++r) acc[r][ky * 3 + kx] += x[r] * y;
                  if (ky >= 1 && ky <= S && kx >= 1 && kx <= S && sums_bias && bias_of_large)
                    bias_acc[0] += y;
                }
              }
            }
          }
          // Reduce: lanes (shuffles), then the warps that split the positions
          // (shared memory, in split order), into the block's partial row.
          if (busy) {  // whole warps: the full mask is exact
            // The unit's sums, weight then bias (red_s's order): the first 32
            // at once where there are as many, the rest one tree each.
            Acc sums[RB];
            CAE_UNROLL
            for (int r = 0; r < CA_R; ++r) {
              CAE_UNROLL
              for (int k = 0; k < 9; ++k) sums[r * 9 + k] = acc[r][k];
              sums[R + r] = bias_acc[r];
            }
            constexpr int kTransposed = RB >= 32 ? 32 : 0;
            if constexpr (kTransposed > 0) {
              Acc first[32];
              CAE_UNROLL
              for (int e = 0; e < 32; ++e) first[e] = sums[e];
              warp_sums_transposed(first, lane);
              red_s[warp * RB + lane] = first[0];
            }
            CAE_UNROLL
            for (int e = kTransposed; e < RB; ++e) {
              const Acc s = warp_sum(sums[e]);
              if (lane == 0) red_s[warp * RB + e] = s;
            }
          }
          __syncthreads();
          for (int i = tid; i < t.items * RB; i += kThreads) {
            const int it = i / RB, e = i % RB;
            const int u = unit0 + it;
            const int g = u / t.cb_stage, cb = cb0 + u % t.cb_stage;
            const int ca = ca0 + g * CA_R + (e < R ? e / 9 : e - R);
            int column = -1;  // in the block's partial row
            if (u >= t.units) {
              // past the last unit of the staging
            } else if (e < R) {
              if (ca < ca0 + ca_count && cb < cb0 + cb_count) column = (ca * a.C_b + cb) * 9 + e % 9;
            } else if (bias_staging && (bias_of_large ? g == 0 && e == R : cb == cb0)) {
              const int c = bias_of_large ? cb : ca;
              if (c < (bias_of_large ? cb0 + cb_count : ca0 + ca_count)) column = weight_outputs + c;
            }
            if (column >= 0) {
              Acc s = red_s[it * RB + e];
              for (int sp = 1; sp < t.splits; ++sp) s += red_s[(sp * t.items + it) * RB + e];
              Acc& sum = partial[partial_row + column];  // this thread's in every region of the block
              sum = first_region ? s : sum + s;
            }
          }
          __syncthreads();  // red_s is read before the next pass writes it
        }
      }
    }
  }
}

template <typename T, typename Acc>
inline void launch_weight_grad(const WeightGradArgs<T>& a, const WeightGradPlan& p, int stride, bool nhwc,
                               Acc* partial, cudaStream_t stream) {
  with_stride(stride, [&](auto s) {
    with_bool(nhwc, [&](auto layout) {
      if (weight_grad_ca_block(a.C_a) == 4) {
        const auto kernel = weight_grad_kernel<T, Acc, decltype(s)::value, 4, decltype(layout)::value>;
        CAE_LAUNCH(kernel, p.blocks, kThreads, p.smem, stream, a, p.t, partial);
      } else {
        const auto kernel = weight_grad_kernel<T, Acc, decltype(s)::value, 1, decltype(layout)::value>;
        CAE_LAUNCH(kernel, p.blocks, kThreads, p.smem, stream, a, p.t, partial);
      }
    });
  });
}

// ---------------------------------------------------------------------------
// bias_grad: out[c] = sum_{n, y, x} gate(g)[n, c, y, x]
// The elements of each channel are split into `chunks` fixed ranges; a block
// sums one range into partial[chunk][c], reduce_partials adds the chunks.
// ---------------------------------------------------------------------------

template <typename T>
struct BiasGradArgs {
  T* out;           // [C]
  const T* g;       // [N, C, H, W]
  const T* g_gate;  // like g, or nullptr
  int N, C;
  index_t HW;
};

constexpr index_t kBiasChunkElements = 16384;  // per channel and block, at least
constexpr int kMaxBiasChunks = 256;

inline int plan_bias_chunks(index_t per_channel) {
  const index_t chunks = ceil_div(per_channel, kBiasChunkElements);
  return static_cast<int>(chunks < 1 ? 1 : chunks > kMaxBiasChunks ? kMaxBiasChunks : chunks);
}

// NCHW: block (chunk, c) walks the chunk's range of the flattened (n, y, x)
// of channel c: consecutive threads, consecutive elements of one plane.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    bias_grad_nchw_kernel(BiasGradArgs<T> a, Acc* __restrict__ partial) {
  __shared__ Acc scratch[kWarps];
  const int c = blockIdx.y;
  const index_t total = static_cast<index_t>(a.N) * a.HW;
  const index_t begin = total * blockIdx.x / gridDim.x, end = total * (blockIdx.x + 1) / gridDim.x;
  Acc s = Acc(0);
  for (index_t e = begin + threadIdx.x; e < end; e += kThreads) {
    const index_t n = e / a.HW, p = e % a.HW;
    s += load_gated<Acc>(a.g, a.g_gate, (n * a.C + c) * a.HW + p);
  }
  s = block_sum(s, scratch);
  if (threadIdx.x == 0) partial[static_cast<index_t>(blockIdx.x) * a.C + c] = s;
}

// NHWC: the tensor is a [N*H*W, C] matrix; block `chunk` sums a range of its
// rows. Threads cover `lanes` consecutive channels x kThreads / lanes rows,
// so a warp reads contiguous memory; then the rows are added in order.
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads)
    bias_grad_nhwc_kernel(BiasGradArgs<T> a, Acc* __restrict__ partial) {
  __shared__ Acc sums[kThreads];
  const index_t rows = static_cast<index_t>(a.N) * a.HW;
  const index_t begin = rows * blockIdx.x / gridDim.x, end = rows * (blockIdx.x + 1) / gridDim.x;
  const int tid = threadIdx.x;
  for (int c0 = 0; c0 < a.C; c0 += kThreads) {
    const int lanes = a.C - c0 < kThreads ? a.C - c0 : kThreads;
    const int row_step = kThreads / lanes;
    const int col = tid % lanes, r = tid / lanes;
    Acc s = Acc(0);
    if (r < row_step) {
      for (index_t row = begin + r; row < end; row += row_step) {
        s += load_gated<Acc>(a.g, a.g_gate, row * a.C + c0 + col);
      }
    }
    __syncthreads();  // the previous channel chunk is done reading sums
    sums[tid] = s;
    __syncthreads();
    if (tid < lanes) {
      Acc total = sums[tid];
      for (int k = 1; k < row_step; ++k) total += sums[k * lanes + tid];
      partial[static_cast<index_t>(blockIdx.x) * a.C + c0 + tid] = total;
    }
  }
}

template <typename T, typename Acc>
inline void launch_bias_grad(const BiasGradArgs<T>& a, int chunks, bool nhwc, Acc* partial,
                             cudaStream_t stream) {
  if (nhwc) {
    const auto kernel = bias_grad_nhwc_kernel<T, Acc>;
    CAE_LAUNCH(kernel, dim3(static_cast<unsigned>(chunks)), kThreads, 0, stream, a, partial);
  } else {
    const auto kernel = bias_grad_nchw_kernel<T, Acc>;
    CAE_LAUNCH(kernel, dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(a.C)), kThreads, 0, stream,
               a, partial);
  }
}

}  // namespace cuda
}  // namespace cae
