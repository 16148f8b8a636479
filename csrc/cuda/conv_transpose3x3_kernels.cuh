// 3x3 transposed correlation: the transposed convolution's forward and the
// convolution's input gradient. out is the large side [N, C_b, H, W], g the
// small (strided) side [N, C_a, H_a, W_a], w [C_a, C_b, 3, 3]:
//
//   out[n, cb, y, x] = act(bias[cb] + sum over (ca, ky, kx) with
//       y = S*gy + ky - 1, x = S*gx + kx - 1 of gate(g)[n, ca, gy, gx] * w[ca, cb, ky, kx])
//
// Written as a gather (each output pixel sums the taps that land on it), so
// no two threads write one element and no atomics are needed. The block
// layout is the forward correlation's (conv3x3_kernels.cuh): an output tile
// per block, a pixel and COB output channels per thread, the g window and the
// weights staged in shared memory per input-channel chunk.
//
// Stride 2: the taps that reach a pixel depend on its parity, (y even: ky = 1;
// y odd: ky = 0 and 2; likewise x). Threads are grouped by parity class, each
// class two whole warps, so every warp runs one tap pattern without
// divergence: 1, 2, 2 or 4 taps per input channel instead of 9.
#pragma once

#include "conv3x3_kernels.cuh"

namespace cae {
namespace cuda {

template <typename T>
struct CorrelateTransposeArgs {
  T* out;           // [N, C_b, H, W]
  const T* g;       // [N, C_a, H_a, W_a]
  const T* g_gate;  // like g, or nullptr
  const T* w;       // [C_a, C_b, 3, 3]
  const T* bias;    // [C_b] or nullptr
  int N, C_a, H_a, W_a, C_b, H, W;
  bool relu;
};

template <typename T, typename Acc>
inline ConvPlan plan_correlate_transpose(const CorrelateTransposeArgs<T>& a, int stride, bool nhwc) {
  const OutputTile tile = plan_output_tile(a.N, a.H, a.W);
  ConvTiling t{};
  t.rows = tile.rows, t.cols = tile.cols, t.samples = tile.samples;
  t.tiles_y = tile.tiles_y, t.tiles_x = tile.tiles_x;
  // The g window of an output tile starting at y0: rows (y0 - 1) .. (y0 + rows)
  // at stride 1; y0 / 2 .. y0 / 2 + rows / 2 at stride 2 (rows, y0 even).
  t.in_rows = stride == 1 ? tile.rows + 2 : tile.rows / 2 + 1;
  t.in_cols = stride == 1 ? tile.cols + 2 : tile.cols / 2 + 1;
  constexpr int V = vec_width<T>();
  const int cob = channel_block(a.C_b);
  ConvPlan p = finish_conv_plan<Acc>(t, tile, a.C_a, cob, ceil_div(a.C_b, cob), nhwc ? V : 1);
  p.t.vec_in = nhwc && p.t.chunk % V == 0 && vector_ok<V>(a.g, a.C_a, a.C_a) &&
               (a.g_gate == nullptr || vector_ok<V>(a.g_gate, a.C_a, a.C_a));
  const int vo = cob < V ? cob : V;
  p.t.vec_out =
      nhwc && vo > 1 && reinterpret_cast<uintptr_t>(a.out) % (sizeof(T) * vo) == 0 && a.C_b % vo == 0;
  return p;
}

// __launch_bounds__'s blocks per SM (see conv_min_blocks): the gather's tap
// patterns take more registers than correlate_kernel's. 3 (80 registers) for
// one accumulator per thread and for 4 in NCHW, 2 (128) for 4 in NHWC and for
// 8 or 16, 1 for 16 doubles.
template <typename Acc, int COB, bool NHWC>
constexpr int transpose_min_blocks() {
  return COB == 1 || (COB == 4 && !NHWC) ? 3 : COB >= 16 && sizeof(Acc) > 4 ? 1 : 2;
}

// Loads in flight while it stages (stage_batch): 4 spill under those caps.
constexpr int kTransposeStageBatch = 2;

template <typename T, typename Acc, int S, int COB, bool NHWC>
__global__ void __launch_bounds__(kThreads, transpose_min_blocks<Acc, COB, NHWC>())
    correlate_transpose_kernel(CorrelateTransposeArgs<T> a, ConvTiling t, SumsJob<T, Acc> sums) {
  static_assert(S == 1 || S == 2, "stride 1 or 2");
  CAE_DYNAMIC_SHARED(Acc, smem);
  const int own_blocks = static_cast<int>(gridDim.x) - sums.blocks;  // then the sums' (SumsJob)
  if (static_cast<int>(blockIdx.x) >= own_blocks)
    return reduce_partials_block(sums, blockIdx.x - own_blocks, smem);
  Acc* w_s = smem;                       // [chunk][9][COB]
  Acc* in_s = smem + t.chunk * 9 * COB;  // [samples][chunk][in_rows][in_cols]
  const int tid = threadIdx.x;
  const TileOrigin o =
      tile_origin(blockIdx.x % t.tile_blocks, t.tiles_x, t.tiles_y, t.rows, t.cols, t.samples);
  const int cb0 = static_cast<int>(blockIdx.x / t.tile_blocks) * COB;

  // This thread's output pixel (py, px) in the tile, of sample ps.
  int px, py, ps;
  if (S == 1) {
    px = tid % t.cols, py = (tid / t.cols) % t.rows, ps = tid / (t.cols * t.rows);
  } else {
    const int quads = kThreads / 4;  // threads per parity class: 2 warps
    const int parity = tid / quads, q = tid % quads;
    const int half_cols = t.cols / 2, half_rows = t.rows / 2;
    px = 2 * (q % half_cols) + (parity & 1);
    py = 2 * ((q / half_cols) % half_rows) + (parity >> 1);
    ps = q / (half_cols * half_rows);
  }
  const int n = o.n0 + ps, y = o.y0 + py, x = o.x0 + px;

  Acc acc[COB];
  CAE_UNROLL
  for (int j = 0; j < COB; ++j) acc[j] = Acc(0);

  for (int c0 = 0; c0 < a.C_a; c0 += t.chunk) {
    const int count = a.C_a - c0 < t.chunk ? a.C_a - c0 : t.chunk;
    __syncthreads();  // the previous pass is done reading
    // w [C_a][C_b][3][3] holds an input channel's 9 * COB weights of the
    // block's output channels contiguously: consecutive threads read
    // consecutive elements (coalesced), then transpose (j, k) -> (k, j)
    // into [chunk][9][COB]; the divisors are compile-time (multiply-shift).
    for (int i = tid; i < count * 9 * COB; i += kThreads) {
      const int c = i / (9 * COB), m = i - c * (9 * COB);
      const int j = m / 9, k = m - j * 9;
      w_s[(c * 9 + k) * COB + j] =
          cb0 + j < a.C_b ? static_cast<Acc>(a.w[(static_cast<index_t>(c0 + c) * a.C_b + cb0) * 9 + m])
                          : Acc(0);
    }
    const Window win{o.n0,
                     S == 1 ? o.y0 - 1 : o.y0 / 2,
                     S == 1 ? o.x0 - 1 : o.x0 / 2,
                     c0,
                     count,
                     t.in_rows,
                     t.in_cols,
                     t.samples,
                     t.channel_stride,
                     t.sample_stride};
    if (NHWC) {
      stage_nhwc<vec_width<T>(), kTransposeStageBatch>(in_s, a.g, a.g_gate, a.N, a.C_a, a.H_a, a.W_a, win,
                                                       t.vec_in, tid);
    } else {
      stage_nchw<kTransposeStageBatch>(in_s, a.g, a.g_gate, a.N, a.C_a, a.H_a, a.W_a, win, tid);
    }
    staged_barrier();
    const Acc* src = in_s + ps * t.sample_stride;
    for (int c = 0; c < count; ++c, src += t.channel_stride) {
      const Acc* wc = w_s + c * 9 * COB;
      CAE_UNROLL
      for (int ky = 0; ky < 3; ++ky) {
        // g row of tap ky: (y + 1 - ky) / S, relative to the window
        if (S == 2 && ((py + 1 - ky) & 1)) continue;  // uniform per warp
        const int r = S == 1 ? py + 2 - ky : (py + 1 - ky) / 2;
        CAE_UNROLL
        for (int kx = 0; kx < 3; ++kx) {
          if (S == 2 && ((px + 1 - kx) & 1)) continue;
          const int col = S == 1 ? px + 2 - kx : (px + 1 - kx) / 2;
          const Acc v = src[r * t.in_cols + col];
          const Acc* wk = wc + (ky * 3 + kx) * COB;
          CAE_UNROLL
          for (int j = 0; j < COB; ++j) acc[j] += v * wk[j];
        }
      }
    }
  }
  if (n < a.N && y < a.H && x < a.W) {
    store_pixel<COB, NHWC>(a.out, acc, a.bias, a.relu, n, cb0, a.C_b, a.H, a.W, y, x, t.vec_out);
  }
}

template <typename T, typename Acc>
inline void launch_correlate_transpose(const CorrelateTransposeArgs<T>& a, const ConvPlan& p, int stride,
                                       bool nhwc, const SumsJob<T, Acc>& sums, cudaStream_t stream) {
  with_stride(stride, [&](auto s) {
    with_channel_block(a.C_b, [&](auto cob) {
      with_bool(nhwc, [&](auto layout) {
        const auto kernel = correlate_transpose_kernel<T, Acc, decltype(s)::value, decltype(cob)::value,
                                                       decltype(layout)::value>;
        CAE_LAUNCH(kernel, static_cast<unsigned>(p.blocks + sums.blocks), kThreads,
                   smem_with_sums<Acc>(p.smem, sums.blocks), stream, a, p.t, sums);
      });
    });
  });
}

}  // namespace cuda
}  // namespace cae
