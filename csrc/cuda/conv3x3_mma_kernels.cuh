// The 3x3 correlation and the weight gradient on tensor cores (sm_80 and
// newer); the weight gradient's layout is with its kernel, below.
//
// The correlation: an implicit GEMM per
// block, out[pixel][co] = sum_k A[pixel][k] B[k][co] with k = (tap, input
// channel), through warp-level products (mma.cuh) with fp32 accumulation:
// m16n8k16 for float16 and bfloat16, m16n8k8 on tf32 for float32 where
// PyTorch allows TF32 in cuDNN's convolutions. The plain kernel
// (conv3x3_kernels.cuh) serves every other case: sm_75, float64, float32
// without TF32, one input channel, fewer than 5 output channels. At stride 1
// the transposed correlation is this one with the kernel flipped
// (MmaTaps::Flipped): correlate_transpose takes it too. At stride 2 it is
// four correlations, one per parity class of the output pixels (oy % 2,
// ox % 2), each over a stride-1 window of the small input with 1, 2, 2 or 4 of
// the 9 taps (MmaTaps::ParityClasses): a block stages the small side's window
// of its output tile once and computes all four classes from it, two warps a
// class (as correlate_transpose_kernel groups its threads), each warp's k
// running over its class's taps only (mma_tap): staged elements per output
// are the plain kernel's.
//
// Layout of the work: the block's output tile is correlate_kernel's
// (plan_output_tile: 256 pixels of one or more images) and its output
// channels a group of COB (8 or 16: one or two n = 8 tiles). Warp w owns the
// tile's pixels [32 w, 32 w + 32) (ParityClasses: class-major), two m = 16 tiles. Input channels pass
// through shared memory in chunks of CP (a multiple of 8, zero-padded), stored
// as the fragments read them: 32-bit words of two 16-bit channels or one tf32
// one, a pixel's channels contiguous, so each A register is one 32-bit load.
// k runs over groups of 8 channels of one tap (j = tap * CP / 8 + g): two
// groups per k = 16 product (the odd group left over at the end gets a
// product of its own with zeros in the other half), one per k = 8 product. After the last chunk the
// accumulators go through shared memory to one pixel per thread, stored by store_pixel (bias, ReLU, both
// layouts) as correlate_kernel stores them.
#pragma once

#include "conv3x3_kernels.cuh"
#include "mma.cuh"

namespace cae {
namespace cuda {

// The taps a block takes, and how its weight is laid out.
enum class MmaTaps {
  Correlate,      // w [C_out, C_in, 3, 3], the 9 taps
  Flipped,        // w [C_in, C_out, 3, 3], tap k read as 8 - k (correlate_transpose, stride 1)
  ParityClasses,  // w [C_in, C_out, 3, 3], correlate_transpose at stride 2: each parity class its taps
};

struct MmaConvTiling {
  int rows, cols, samples, tiles_y, tiles_x;  // ParityClasses: a class's pixels (i, j) of the tile
  int tile_blocks;       // blocks per output-channel group (blockIdx.x = group * tile_blocks + tile)
  int stride;            // between the windows of neighbouring pixels (ParityClasses: 1, within a class)
  int in_rows, in_cols;  // the input window of a tile (with halo)
  int chunk;             // input channels per pass: a multiple of 8
  int pixel_words;       // shared-memory words per pixel: the chunk's words, padded against bank conflicts
  bool vec_out;          // NHWC vector stores allowed
  MmaTaps taps;
};

struct MmaConvPlan {
  bool ok;  // the tensor-core kernel takes this shape
  MmaConvTiling t;
  index_t blocks;
  size_t smem;
};

constexpr int kMmaPixelsPerWarp = kThreads / kWarps;  // 32: two m = 16 tiles

// Channels per shared-memory word: two of 16 bits, or one tf32.
template <typename T>
constexpr int mma_channels_per_word() {
  return static_cast<int>(4 / sizeof(T));
}

// A pixel's words for `chunk` channels; at stride 1 (pixels pixel_words words
// apart) an odd number of 4-word runs puts a fragment's 8 pixels x 4 words on
// 32 distinct banks.
inline int mma_pixel_words(int chunk, int per_word, int stride) {
  const int words = chunk / per_word;
  return words + (stride == 1 && (words / 4) % 2 == 0 ? 4 : 0);
}

// Shared memory of a pass over `chunk` channels: the window, the weights
// [groups][COB][8 channels' words], the groups' offsets; the epilogue reuses
// it for the [256][COB + 1] accumulators.
inline size_t mma_conv_smem(const MmaConvTiling& t, int cob, int per_word) {
  const size_t groups = static_cast<size_t>(9) * (t.chunk / 8);
  const size_t pass = (static_cast<size_t>(t.samples) * t.in_rows * t.in_cols * t.pixel_words +
                       groups * cob * (8 / per_word) + groups) *
                      4;
  const size_t epilogue = static_cast<size_t>(kThreads) * (cob + 1) * sizeof(float);
  return pass > epilogue ? pass : epilogue;
}

// ParityClasses: a's output [H_out, W_out] is the large side, its input
// [H, W] the small one, stride 2.
template <typename T>
inline MmaConvPlan plan_correlate_mma(const CorrelateArgs<T>& a, int stride, bool nhwc, MmaTaps taps) {
  MmaConvPlan p{};
  const int cob = channel_block(a.C_out);
  if (a.C_in < 2 || cob < 8) return p;  // p.ok false: the plain kernel
  MmaConvTiling& t = p.t;
  t.taps = taps;
  // ParityClasses: the tile of 256 output pixels (rows and columns even) is
  // four classes of rows / 2 x cols / 2 pixels; a class's pixel (i, j), output
  // (2 i + py, 2 j + px), reads the small input's (i, j) .. (i + 1, j + 1)
  // (mma_tap): a stride-1 window with a 1-pixel halo, shared by the classes.
  const bool classes = taps == MmaTaps::ParityClasses;
  const OutputTile tile = plan_output_tile(a.N, a.H_out, a.W_out);
  const int split = classes ? 2 : 1;
  t.rows = tile.rows / split, t.cols = tile.cols / split, t.samples = tile.samples;
  t.tiles_y = tile.tiles_y, t.tiles_x = tile.tiles_x;
  t.stride = classes ? 1 : stride;
  t.in_rows = (t.rows - 1) * t.stride + (classes ? 2 : 3);
  t.in_cols = (t.cols - 1) * t.stride + (classes ? 2 : 3);
  t.tile_blocks =
      static_cast<int>(tile.blocks() < (index_t{1} << 31) ? tile.blocks() : (index_t{1} << 31) - 1);
  // The widest chunk that fits, then balanced over the passes it takes.
  constexpr int E = mma_channels_per_word<T>();
  const int padded = ceil_div(a.C_in, 8) * 8;
  int chunk = padded;
  for (; chunk >= 8; chunk -= 8) {
    t.chunk = chunk;
    t.pixel_words = mma_pixel_words(chunk, E, t.stride);
    if (mma_conv_smem(t, cob, E) <= kSmemBudget) break;
  }
  if (chunk < 8) return p;
  const int passes = ceil_div(padded, chunk);
  t.chunk = ceil_div(ceil_div(a.C_in, passes), 8) * 8;
  t.pixel_words = mma_pixel_words(t.chunk, E, t.stride);
  const int vo = vec_width<T, 8>();
  t.vec_out = nhwc && reinterpret_cast<uintptr_t>(a.out) % (sizeof(T) * vo) == 0 && a.C_out % vo == 0;
  p.ok = true;
  p.blocks = tile.blocks() * ceil_div(a.C_out, cob);
  p.smem = mma_conv_smem(t, cob, E);
  return p;
}

// The operand word of channels (lo, hi) (16-bit types), or of lo alone (tf32).
template <class Kind, typename T>
CAE_DEVICE uint32_t mma_word(T lo, T hi) {
  if constexpr (std::is_same<Kind, MmaTF32>::value) {
    (void)hi;
    return to_tf32(static_cast<float>(lo));
  } else {
    return pack2(lo, hi);
  }
}

// Tap i of a block's list: where its input lies in the pixel's window
// (dy, dx), and the weight's tap ky * 3 + kx that multiplies it.
struct MmaTap {
  int dy, dx, k;
};

// ParityClasses: the list is the classes' taps one class after the other,
// class cls (py = cls >> 1, px = cls & 1) holding (1 + py) (1 + px) of them
// from mma_first_tap(cls): 1, 2, 2, 4, starting at 0, 1, 3, 5.
CAE_HOST_DEVICE int mma_first_tap(int cls) { return 2 * cls - (cls > 0); }
CAE_HOST_DEVICE int mma_class_taps(int cls) { return (1 + (cls >> 1)) * (1 + (cls & 1)); }

// An output row oy = 2 i + py takes g rows (oy + 1 - ky) / 2 with that
// division exact, so py = 0 takes ky = 1 (row i), py = 1 ky = 0 (row i + 1)
// and ky = 2 (row i); likewise columns with px.
CAE_DEVICE MmaTap mma_tap(MmaTaps taps, int i) {
  if (taps != MmaTaps::ParityClasses) return {i / 3, i % 3, taps == MmaTaps::Flipped ? 8 - i : i};
  const int cls = i == 0 ? 0 : i < 3 ? 1 : i < 5 ? 2 : 3, l = i - mma_first_tap(cls);
  const int px = cls & 1;
  const int ky = cls >> 1 ? 2 * (l >> px) : 1, kx = px ? 2 * (l & 1) : 1;
  return {(2 - ky) >> 1, (2 - kx) >> 1, ky * 3 + kx};
}

// Stages gate(x) over the window, channels [c0, c0 + count) padded with zeros
// to t.chunk, as operand words: dst[pixel * pixel_words + word]. NCHW:
// consecutive threads read consecutive columns; NHWC: consecutive channels.
// The elements are walked without a division per element (StridedDigits).
template <class Kind, bool NHWC, typename T>
CAE_DEVICE void stage_words(uint32_t* dst, const CorrelateArgs<T>& a, const MmaConvTiling& t, int n0, int y0,
                            int x0, int c0, int count, int tid) {
  constexpr int E = mma_channels_per_word<T>();
  const int words = t.chunk / E;  // words per pixel
  // NHWC (word, col, r, s); NCHW (col, r, word, s): word fastest, or col.
  StridedDigits at = NHWC ? StridedDigits(tid, words, t.in_cols, t.in_rows)
                          : StridedDigits(tid, t.in_cols, t.in_rows, words);
  struct Item {
    int at;
    RawGated<T, 1> e[2];
  };
  batched_walk<stage_batch<E * sizeof(T)>()>(
      at, t.samples,
      [&](const StridedDigits& d) {
        const int word = d.digit[NHWC ? 0 : 2], col = d.digit[NHWC ? 1 : 0], r = d.digit[1 + NHWC],
                  s = d.digit[3];
        const int n = n0 + s, y = y0 + r, xx = x0 + col;
        const bool inside = n < a.N && y >= 0 && y < a.H && xx >= 0 && xx < a.W;
        Item item{((s * t.in_rows + r) * t.in_cols + col) * t.pixel_words + word, {}};
        CAE_UNROLL
        for (int e = 0; e < E; ++e) {
          const int c = c0 + E * word + e;
          const index_t i = pixel_offset<NHWC>(n, c, y, xx, a.C_in, a.H, a.W);
          item.e[e] = load_raw<1>(a.x, a.x_gate, i, inside && c < c0 + count);
        }
        return item;
      },
      [&](const Item& item) {
        T v[2] = {static_cast<T>(0.0f), static_cast<T>(0.0f)};
        CAE_UNROLL
        for (int e = 0; e < E; ++e) {
          v[e] = static_cast<T>(
              item.e[e].template value<float>(0, a.x_gate != nullptr));  // exact: T is 16-bit or float
        }
        dst[item.at] = mma_word<Kind>(v[0], v[1]);
      });
}

// Launch bounds of 2 blocks per SM (at most 128 registers): without them
// ptxas keeps the tf32 NCHW kernel at 64 registers and spills.
template <typename T, class Kind, int COB, bool NHWC>
__global__ void __launch_bounds__(kThreads, 2)
    correlate_mma_kernel(CorrelateArgs<T> a, MmaConvTiling t, SumsJob<T, float> sums) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int NT = COB / 8;  // n = 8 tiles
  constexpr bool TF32 = std::is_same<Kind, MmaTF32>::value;
  constexpr int E = mma_channels_per_word<T>();
  constexpr int W = 8 / E;  // words of a group of 8 channels
  // A product's second half of k: the next group (k = 16), or channels 4..7
  // of the same group (tf32, k = 8); its offset from the first in B's words.
  constexpr int J = TF32 ? 1 : 2;
  constexpr int b_half = TF32 ? 4 : COB * W;
  const int G = t.chunk / 8;  // channel groups per tap
  const int groups = 9 * G;
  const bool classes = t.taps == MmaTaps::ParityClasses;
  CAE_DYNAMIC_SHARED(uint32_t, smem);
  const int own_blocks = static_cast<int>(gridDim.x) - sums.blocks;  // then the sums' (SumsJob)
  if (static_cast<int>(blockIdx.x) >= own_blocks)
    return reduce_partials_block(sums, blockIdx.x - own_blocks, reinterpret_cast<float*>(smem));
  uint32_t* w_s = smem;                                          // [groups][COB][W]: B's words
  int* goff_s = reinterpret_cast<int*>(w_s + groups * COB * W);  // [groups]: A's word offset per group
  uint32_t* in_s = w_s + groups * COB * W + groups;              // [samples][in_rows][in_cols][pixel_words]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;  // the fragments' groupID and thread in group
  const TileOrigin o =
      tile_origin(blockIdx.x % t.tile_blocks, t.tiles_x, t.tiles_y, t.rows, t.cols, t.samples);
  const int co0 = static_cast<int>(blockIdx.x / t.tile_blocks) * COB;
  // The block's pixels: `per_class` of each class (ParityClasses: 4 classes,
  // class-major), else 256 of one. The warp's class, and its groups [j0, j1).
  const int per_class = t.rows * t.cols * t.samples;
  const int wcls = warp * kMmaPixelsPerWarp / per_class;
  const int j0 = classes ? mma_first_tap(wcls) * G : 0;
  const int j1 = classes ? j0 + mma_class_taps(wcls) * G : groups;

  // Where the windows of this lane's A rows start: rows g and g + 8 of the
  // warp's two m tiles (its class's pixels q = 32 warp + 16 m + row, mod
  // per_class).
  int base[2][2];
  CAE_UNROLL
  for (int m = 0; m < 2; ++m) {
    CAE_UNROLL
    for (int h = 0; h < 2; ++h) {
      const int q = (warp * kMmaPixelsPerWarp) % per_class + 16 * m + 8 * h + g;
      const int px = q % t.cols, py = (q / t.cols) % t.rows, ps = q / (t.cols * t.rows);
      base[m][h] = ((ps * t.in_rows + py * t.stride) * t.in_cols + px * t.stride) * t.pixel_words + tq;
    }
  }
  for (int j = tid; j < groups; j += kThreads) {
    const MmaTap tap = mma_tap(t.taps, j / G);
    goff_s[j] = (tap.dy * t.in_cols + tap.dx) * t.pixel_words + (j % G) * W;
  }

  float acc[2][NT][4];
  CAE_UNROLL
  for (int m = 0; m < 2; ++m) {
    CAE_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      CAE_UNROLL
      for (int e = 0; e < 4; ++e) acc[m][nt][e] = 0.0f;
    }
  }

  for (int c0 = 0; c0 < a.C_in; c0 += t.chunk) {
    const int count = a.C_in - c0 < t.chunk ? a.C_in - c0 : t.chunk;
    __syncthreads();  // the previous pass is done reading
    // B[k][co]: word (j, n, word) holds channel(s) c0 + 8 (j % G) + E word (+ 1) of tap j / G.
    for (int i = tid; i < groups * COB * W; i += kThreads) {
      const int word = i % W, nn = (i / W) % COB, j = i / (W * COB);
      const int co = co0 + nn, c = (j % G) * 8 + E * word, k = mma_tap(t.taps, j / G).k;
      const T zero = static_cast<T>(0.0f);
      T v[2] = {zero, zero};
      CAE_UNROLL
      for (int e = 0; e < E; ++e) {
        if (co < a.C_out && c + e < count) {
          v[e] = t.taps == MmaTaps::Correlate
                     ? a.w[(static_cast<index_t>(co) * a.C_in + c0 + c + e) * 9 + k]
                     : a.w[(static_cast<index_t>(c0 + c + e) * a.C_out + co) * 9 + k];
        }
      }
      w_s[i] = mma_word<Kind>(v[0], v[1]);
    }
    // The window: from the tile's first pixel's top-left tap (halo -1), or
    // for class pixels from (i0, j0) g's pixel (i0, j0).
    stage_words<Kind, NHWC>(in_s, a, t, o.n0, classes ? o.y0 : o.y0 * t.stride - 1,
                            classes ? o.x0 : o.x0 * t.stride - 1, c0, count, tid);
    __syncthreads();
    // k = 16: products over pairs of groups (j, j + 1), an odd last group
    // (of the warp's) alone; k = 8: one group per product. Unrolled less than nvcc would
    // (4 times and more: registers, and spills in the tf32 kernels).
#if !defined(CAE_SIM)
#pragma unroll(TF32 ? 1 : 2)
#endif
    for (int j = j0; j < j1; j += J) {
      const bool pair_ok = TF32 || j + 1 < j1;
      const int lo = goff_s[j], hi = TF32 ? lo + 4 : pair_ok ? goff_s[j + 1] : 0;
      uint32_t b[NT][2];
      CAE_UNROLL
      for (int nt = 0; nt < NT; ++nt) {
        const int at = (j * COB + nt * 8 + g) * W + tq;
        b[nt][0] = w_s[at];
        b[nt][1] = pair_ok ? w_s[at + b_half] : 0u;
      }
      CAE_UNROLL
      for (int m = 0; m < 2; ++m) {
        const uint32_t af[4] = {in_s[base[m][0] + lo], in_s[base[m][1] + lo],
                                pair_ok ? in_s[base[m][0] + hi] : 0u, pair_ok ? in_s[base[m][1] + hi] : 0u};
        CAE_UNROLL
        for (int nt = 0; nt < NT; ++nt) mma<Kind>(acc[m][nt], af, b[nt], acc[m][nt]);
      }
    }
  }

  // Epilogue: D fragments -> [pixel][COB + 1] floats -> one pixel per thread.
  __syncthreads();  // the last pass is done reading
  float* out_s = reinterpret_cast<float*>(smem);
  CAE_UNROLL
  for (int m = 0; m < 2; ++m) {
    CAE_UNROLL
    for (int nt = 0; nt < NT; ++nt) {
      CAE_UNROLL
      for (int e = 0; e < 4; ++e) {
        const int q = warp * kMmaPixelsPerWarp + 16 * m + 8 * (e / 2) + g;
        out_s[q * (COB + 1) + nt * 8 + 2 * tq + e % 2] = acc[m][nt][e];
      }
    }
  }
  __syncthreads();
  const int cls = tid / per_class, q = tid % per_class;
  const int px = q % t.cols, py = (q / t.cols) % t.rows, ps = q / (t.cols * t.rows);
  const int n = o.n0 + ps;
  const int oy = classes ? 2 * (o.y0 + py) + (cls >> 1) : o.y0 + py;
  const int ox = classes ? 2 * (o.x0 + px) + (cls & 1) : o.x0 + px;
  if (n < a.N && oy < a.H_out && ox < a.W_out) {
    float v[COB];
    CAE_UNROLL
    for (int j = 0; j < COB; ++j) v[j] = out_s[tid * (COB + 1) + j];
    store_pixel<COB, NHWC>(a.out, v, a.bias, a.relu, n, co0, a.C_out, a.H_out, a.W_out, oy, ox, t.vec_out);
  }
#else
  (void)a, (void)t;
  __trap();  // never launched below sm_80
#endif
}

// Kind: MmaF16, MmaBF16 or MmaTF32, as T is c10::Half, c10::BFloat16 or float
// (the caller's choice: this header stays torch-free).
template <typename T, class Kind>
inline void launch_correlate_mma(const CorrelateArgs<T>& a, const MmaConvPlan& p, bool nhwc,
                                 const SumsJob<T, float>& sums, cudaStream_t stream) {
  const auto launch = [&](auto cob) {
    with_bool(nhwc, [&](auto layout) {
      const auto kernel = correlate_mma_kernel<T, Kind, decltype(cob)::value, decltype(layout)::value>;
      CAE_LAUNCH(kernel, static_cast<unsigned>(p.blocks + sums.blocks), kThreads,
                 smem_with_sums<float>(p.smem, sums.blocks), stream, a, p.t, sums);
    });
  };
  if (channel_block(a.C_out) == 8) {
    launch(std::integral_constant<int, 8>{});
  } else {
    launch(std::integral_constant<int, 16>{});
  }
}

// ---------------------------------------------------------------------------
// The weight gradient on tensor cores: weight_grad_kernel's GEMM (see there)
//   out[ca][(cb, tap)] = sum_p gate(a)[ca][p] * gate(b)[cb][p shifted by tap]
// with M = C_a (at most 16, rows past it zero), N = 9 C_b (column n = cb * 9 +
// tap: a row of the weight gradient, so D's columns are the partial row's
// columns), K = the region's positions, in products of 16 positions (f16,
// bf16) or 8 (tf32). The regions, their staging (gates, both layouts, every
// channel at once: the shapes this kernel takes), the partial rows and the
// bias's exact fp32 sums are weight_grad_kernel's. A unit is
// kWeightGradMmaTiles n = 8 tiles of the columns; warps take units as
// weight_grad_kernel's warps do (`items` units at once, each split over the
// positions by `splits` warps); the D fragments are added across the splits
// through shared memory in split order, then into the block's partial row
// (first region stores, later ones add; with one split each lane adds its own
// D there, no shared memory): bitwise deterministic.
//
// The staged values are float (the staging and the bias sums are the plain
// kernel's), and each operand register is built from two float loads: B's k
// is a position, whose window a table lookup places (offset_s) and, at stride
// 2 or across a row of the region, not next to the previous position's, so
// B's two consecutive-k values are never one 32-bit word; A's are, but a
// 16-bit copy of a would cost a staging of its own.
// ---------------------------------------------------------------------------

constexpr int kMmaRows = 16;            // M: a's channels, zero-padded
constexpr int kWeightGradMmaTiles = 3;  // n = 8 tiles a warp's unit owns
constexpr int kWeightGradMmaColumns = 8 * kWeightGradMmaTiles;

struct MmaWeightGradPlan {
  bool ok;  // the tensor-core kernel takes this shape
  WeightGradTiling t;
  int blocks;  // rows of the partial sums
  size_t smem;
};

// Floats of the warps' D tiles [kWarps][16][unit columns] where units are split
// over the positions (none with one split: 12 KiB less, which lets the
// stride-2 16 x 16 channel layers' 64-position regions fit).
CAE_HOST_DEVICE int weight_grad_mma_tiles_floats(const WeightGradTiling& t) {
  return t.splits > 1 ? kWarps * kMmaRows * kWeightGradMmaColumns : 0;
}

// Shared memory: the D tiles, a [C_a][a_stride], b [C_b][b_channel_stride],
// the windows' offsets [positions].
inline size_t weight_grad_mma_smem(const WeightGradTiling& t, int C_a, int C_b) {
  return (static_cast<size_t>(weight_grad_mma_tiles_floats(t)) + static_cast<size_t>(C_a) * t.a_stride +
          static_cast<size_t>(C_b) * t.b_channel_stride + t.positions) *
         4;
}

// Tensor cores for 5 to 16 channels of a (the autoencoder's 8- and 16-channel
// products; fewer waste most of M), any channels of b, where a region of at
// least kMinRegionPositions holds every channel of both; else plan.ok false.
template <typename T>
inline MmaWeightGradPlan plan_weight_grad_mma(const WeightGradArgs<T>& a, int stride, bool nhwc) {
  MmaWeightGradPlan p{};
  if (a.C_a < 5 || a.C_a > kMmaRows) return p;
  WeightGradTiling& t = p.t;
  t.units = ceil_div(ceil_div(9 * a.C_b, 8), kWeightGradMmaTiles);
  t.items = t.units < kWarps ? t.units : kWarps;
  t.splits = kWarps / t.items;
  for (int target = region_target(a);; target /= 2) {
    plan_region(t, a.N, a.H_a, a.W_a, stride, target);
    if (weight_grad_mma_smem(t, a.C_a, a.C_b) <= kSmemBudget) break;
    if (target <= kMinRegionPositions) return p;
  }
  t.ca_stage = a.C_a, t.cb_stage = a.C_b;
  const index_t regions = finish_weight_grad_tiling(t, a, nhwc);
  if (regions >= (index_t{1} << 31)) return p;
  p.ok = true;
  p.blocks = partial_blocks(regions);
  p.smem = weight_grad_mma_smem(t, a.C_a, a.C_b);
  return p;
}

// Launch bounds of 2 blocks per SM (at most 128 registers), as correlate_mma_kernel.
template <typename T, class Kind, bool NHWC>
__global__ void __launch_bounds__(kThreads, 2)
    weight_grad_mma_kernel(WeightGradArgs<T> a, WeightGradTiling t, int S, float* __restrict__ partial) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr bool TF32 = std::is_same<Kind, MmaTF32>::value;
  constexpr int E = mma_channels_per_word<T>();  // positions per operand register: 2, or 1 (tf32)
  constexpr int KS = 8 * E;                      // positions per product
  constexpr int P = 2 * E;                       // positions of a lane in a product
  constexpr int NTW = kWeightGradMmaTiles, RC = kWeightGradMmaColumns;
  CAE_DYNAMIC_SHARED(float, smem);
  float* red_s = smem;                                                       // [kWarps][16][RC] or none
  float* a_s = red_s + weight_grad_mma_tiles_floats(t);                      // [C_a][a_stride]
  float* b_s = a_s + a.C_a * t.a_stride;                                     // [C_b][b_channel_stride]
  int* offset_s = reinterpret_cast<int*>(b_s + a.C_b * t.b_channel_stride);  // [positions]
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane / 4, tq = lane % 4;  // the fragments' groupID and thread in group
  const int b_image = t.b_rows * t.b_cols;
  const int columns = 9 * a.C_b;  // N, and a row of the weight gradient
  const int weight_outputs = a.C_a * columns;
  const bool bias_of_large = a.grad_output_is_large;
  const int bias_channels = bias_of_large ? a.C_b : a.C_a;
  const index_t partial_row = static_cast<index_t>(blockIdx.x) * (weight_outputs + bias_channels);
  stage_window_offsets(offset_s, t, S, tid);

  const bool busy = warp < t.items * t.splits;
  const int item = warp % t.items, split = warp / t.items;
  // This lane's A rows g and g + 8 (channels of a; zero past C_a).
  const bool row_ok[2] = {g < a.C_a, g + 8 < a.C_a};

  for (int region = blockIdx.x; region < t.regions; region += gridDim.x) {
    const bool first_region = region == static_cast<int>(blockIdx.x);
    const TileOrigin o = tile_origin(region, t.tiles_x, t.tiles_y, t.rows, t.cols, t.samples);
    __syncthreads();  // the previous region is done reading
    stage_positions<vec_width<T>(), NHWC, kWeightGradStageBatch>(
        a_s, a.a, a.a_gate, a.N, a.C_a, a.H_a, a.W_a, o.n0, o.y0, o.x0, 0, a.C_a, a.C_a, t, t.vec_a, tid);
    const Window win{o.n0,     o.y0 * S - 1, o.x0 * S - 1,       0,      a.C_b, t.b_rows,
                     t.b_cols, t.samples,    t.b_channel_stride, b_image};
    if (NHWC) {
      stage_nhwc<vec_width<T>(), kWeightGradStageBatch>(b_s, a.b, a.b_gate, a.N, a.C_b, a.H, a.W, win,
                                                        t.vec_b, tid);
    } else {
      stage_nchw<kWeightGradStageBatch>(b_s, a.b, a.b_gate, a.N, a.C_b, a.H, a.W, win, tid);
    }
    staged_barrier();

    // The bias's gradient in exact fp32 (never tf32): a warp per channel, lanes
    // over the positions, a fixed tree; the sums of a (or of b's pixels under
    // a position's own S x S taps) that weight_grad_kernel adds.
    for (int c = warp; c < bias_channels; c += kWarps) {
      float s = 0.0f;
      for (int p = lane; p < t.positions; p += 32) {
        if (bias_of_large) {
          const float* win3 = b_s + c * t.b_channel_stride + offset_s[p];
          for (int ky = 1; ky <= S; ++ky) {
            for (int kx = 1; kx <= S; ++kx) s += win3[ky * t.b_cols + kx];
          }
        } else {
          s += a_s[c * t.a_stride + p];
        }
      }
      s = warp_sum(s);
      if (lane == 0) {
        float& sum = partial[partial_row + weight_outputs + c];  // this lane's in every region
        sum = first_region ? s : sum + s;
      }
    }

    for (int unit0 = 0; unit0 < t.units; unit0 += t.items) {
      const int unit = unit0 + item;
      float acc[NTW][4];
      CAE_UNROLL
      for (int j = 0; j < NTW; ++j) {
        CAE_UNROLL
        for (int e = 0; e < 4; ++e) acc[j][e] = 0.0f;
      }
      if (busy && unit < t.units) {
        // Where this lane's B column g of each tile starts: channel cb, tap (ky, kx).
        int boff[NTW];
        CAE_UNROLL
        for (int j = 0; j < NTW; ++j) {
          const int n = (unit * NTW + j) * 8 + g, cb = n / 9, tap = n - 9 * cb;  // once a unit
          boff[j] = n < columns ? cb * t.b_channel_stride + (tap / 3) * t.b_cols + tap % 3 : 0;
        }
        for (int k0 = split * KS; k0 < t.positions; k0 += KS * t.splits) {
          // The lane's positions: k = 2 tq, 2 tq + 1, 2 tq + 8, 2 tq + 9 (k = 16),
          // or tq, tq + 4 (tf32); zeros past the region's positions.
          int q[P], off[P];
          bool valid[P];
          CAE_UNROLL
          for (int i = 0; i < P; ++i) {
            q[i] = k0 + (TF32 ? tq + 4 * i : 2 * tq + (i & 1) + 8 * (i >> 1));
            valid[i] = q[i] < t.positions;
            off[i] = valid[i] ? offset_s[q[i]] : 0;
          }
          float va[2][P];
          CAE_UNROLL
          for (int r = 0; r < 2; ++r) {
            CAE_UNROLL
            for (int i = 0; i < P; ++i)
              va[r][i] = valid[i] && row_ok[r] ? a_s[(g + 8 * r) * t.a_stride + q[i]] : 0.0f;
          }
          // a[2h + r]: row g + 8 r, positions E h .. E h + E - 1 of the lane's.
          uint32_t af[4];
          CAE_UNROLL
          for (int h = 0; h < 2; ++h) {
            CAE_UNROLL
            for (int r = 0; r < 2; ++r)
              af[2 * h + r] =
                  mma_word<Kind>(static_cast<T>(va[r][E * h]), static_cast<T>(va[r][E * h + E - 1]));
          }
          CAE_UNROLL
          for (int j = 0; j < NTW; ++j) {
            float vb[P];
            CAE_UNROLL
            for (int i = 0; i < P; ++i) vb[i] = valid[i] ? b_s[boff[j] + off[i]] : 0.0f;
            const uint32_t bf[2] = {mma_word<Kind>(static_cast<T>(vb[0]), static_cast<T>(vb[E - 1])),
                                    mma_word<Kind>(static_cast<T>(vb[E]), static_cast<T>(vb[2 * E - 1]))};
            mma<Kind>(acc[j], af, bf, acc[j]);
          }
        }
      }
      // D: [g][2 tq], [g][2 tq + 1], [g + 8][2 tq], [g + 8][2 tq + 1] of each tile.
      if (t.splits == 1) {  // the lane's own into the partial row (the same lane in every region)
        CAE_UNROLL
        for (int j = 0; j < NTW; ++j) {
          CAE_UNROLL
          for (int e = 0; e < 4; ++e) {
            const int row = g + 8 * (e / 2), n = (unit * NTW + j) * 8 + 2 * tq + e % 2;
            if (busy && unit < t.units && row < a.C_a && n < columns) {
              float& sum = partial[partial_row + row * columns + n];
              sum = first_region ? acc[j][e] : sum + acc[j][e];
            }
          }
        }
        continue;  // t.splits is the block's: every thread skips the barriers below
      }
      if (busy) {
        CAE_UNROLL
        for (int j = 0; j < NTW; ++j) {
          CAE_UNROLL
          for (int e = 0; e < 4; ++e)
            red_s[(warp * kMmaRows + g + 8 * (e / 2)) * RC + j * 8 + 2 * tq + e % 2] = acc[j][e];
        }
      }
      __syncthreads();
      // The splits in order, into the partial row (the same thread in every region).
      for (int i = tid; i < t.items * kMmaRows * RC; i += kThreads) {
        const int col = i % RC, row = (i / RC) % kMmaRows, it = i / (RC * kMmaRows);
        const int n = (unit0 + it) * RC + col;
        if (unit0 + it < t.units && row < a.C_a && n < columns) {
          float s = red_s[(it * kMmaRows + row) * RC + col];
          for (int sp = 1; sp < t.splits; ++sp) s += red_s[((sp * t.items + it) * kMmaRows + row) * RC + col];
          float& sum = partial[partial_row + row * columns + n];
          sum = first_region ? s : sum + s;
        }
      }
      __syncthreads();  // red_s is read before the next pass writes it
    }
  }
#else
  (void)a, (void)t, (void)S, (void)partial;
  __trap();  // never launched below sm_80
#endif
}

// Kind as for launch_correlate_mma; partial: [p.blocks][C_a C_b 9 + bias channels].
template <typename T, class Kind>
inline void launch_weight_grad_mma(const WeightGradArgs<T>& a, const MmaWeightGradPlan& p, int stride,
                                   bool nhwc, float* partial, cudaStream_t stream) {
  with_bool(nhwc, [&](auto layout) {
    const auto kernel = weight_grad_mma_kernel<T, Kind, decltype(layout)::value>;
    CAE_LAUNCH(kernel, static_cast<unsigned>(p.blocks), kThreads, p.smem, stream, a, p.t, stride, partial);
  });
}

}  // namespace cuda
}  // namespace cae
