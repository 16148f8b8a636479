// The one small matrix product every CPU convolution kernel runs on:
//
//   C[m * ldc + n] (+)= sum_k A(m, k) * B(k, n)
//   A(m, k) = a.data[a.row[m] + a.col[k]],   B(k, n) = b.data[b.row[k] + n]
//
// The offset tables let the product read a 3x3 window straight out of a padded
// copy of the input (window.h): A's or B's "rows" are shifted views of one
// buffer, so no im2col matrix is ever written. Registers hold an MR x NV tile
// of C as GCC/Clang vector types, one register each at this level's vector
// width (kVectorBytes, see csrc/cpu/capability.h); each A element is
// broadcast once against NV vectors of B.
//
// Compiled once per instruction-set level, in namespace cae::cpu::<level>
// (csrc/cpu/level_*.cpp): the level sets kVectorBytes and kVectorRegisters.
#pragma once

#include "../kernels.h"

namespace cae {
namespace cpu {
namespace CAE_CPU_LEVEL {

// Scratch memory on 64-byte boundaries: a vector load of a 64-byte row that
// straddles two cache lines costs two loads (measured: the weight gradient's
// product ran at half speed from a plain std::vector).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  static constexpr std::align_val_t alignment{64};
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) { return static_cast<T*>(::operator new(n * sizeof(T), alignment)); }
  void deallocate(T* p, std::size_t) { ::operator delete(p, alignment); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
};

template <typename T>
using Scratch = std::vector<T, CacheLineAllocator<T>>;

// Elements past its last row that a B operand must be readable for: a tile
// at C's last columns reads whole vectors (their extra lanes are dropped).
constexpr int64_t kReadPast = 64;

template <typename T>
struct Operand {
  const T* data;
  const int64_t* row;
  const int64_t* col;  // unused for B, whose rows are contiguous in n
};

template <typename T, int Bytes>
struct Vec {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int lanes = Bytes / sizeof(T);
};

// x in every lane: one broadcast (V{} + x would be an add, which also turns
// -0.0 into +0.0; a loop over the lanes became a chain of inserts).
template <typename V, typename T, size_t... I>
inline V splat(T x, std::index_sequence<I...>) {
  return V{((void)I, x)...};
}

template <typename V, typename T>
inline V splat(T x) {
  return splat<V>(x, std::make_index_sequence<sizeof(V) / sizeof(T)>{});
}

template <typename V>
inline V load(const void* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));  // an unaligned vector load
  return v;
}

template <typename V>
inline void store(void* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// The MR rows of A that a tile reads. From the offset table in general; when
// the rows are a constant RowStep apart (the positions of an NHWC sample) from
// one pointer, so the compiler addresses them all off one register instead of
// keeping MR pointers, which spilled and cost a quarter of the FMA rate.
template <typename T, int MR, int RowStep>
struct RowPointers {
  const T* rows[RowStep ? 1 : MR];
  // Rows past last_row (a short block) repeat it, so they are safe to read.
  RowPointers(const Operand<T>& a, int64_t m0, int last_row = MR - 1) {
    for (int m = 0; m < (RowStep ? 1 : MR); ++m) rows[m] = a.data + a.row[m0 + std::min(m, last_row)];
  }
  const T* operator[](int m) const { return RowStep ? rows[0] + m * RowStep : rows[m]; }
};

// One MR x (NV vectors) tile of C, every column valid: the loop over k has
// no branch, so the tile stays in registers.
template <typename T, int Bytes, int MR, int NV, int RowStep>
inline void gemm_tile(int64_t K, const Operand<T>& a, int64_t m0, const T* __restrict__ b_data,
                      const int64_t* __restrict__ b_row, T* __restrict__ C, int64_t ldc, bool accumulate) {
  using V = typename Vec<T, Bytes>::type;
  constexpr int L = Vec<T, Bytes>::lanes;
  const RowPointers<T, MR, RowStep> a_rows(a, m0);
  V acc[MR][NV];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NV; ++j) acc[m][j] = V{};
  if constexpr (RowStep > 0) {
    // k in runs of RowStep (a tap's channels, see row_step): the tables are
    // read once a run, and every A element sits at a constant offset from
    // the run's first (measured 1.3x faster than a lookup per k).
    const int64_t ldb = b_row[1] - b_row[0];
    for (int64_t k0 = 0; k0 < K; k0 += RowStep) {
      const T* b_k = b_data + b_row[k0];
      const int64_t a_k = a.col[k0];
      for (int i = 0; i < RowStep; ++i) {
        V b[NV];
        for (int j = 0; j < NV; ++j) b[j] = load<V>(b_k + i * ldb + j * L);
        for (int m = 0; m < MR; ++m) {
          const T a_mk = a_rows[m][a_k + i];
          for (int j = 0; j < NV; ++j) acc[m][j] += a_mk * b[j];
        }
      }
    }
  } else {
    for (int64_t k = 0; k < K; ++k) {
      const T* b_k = b_data + b_row[k];
      V b[NV];
      for (int j = 0; j < NV; ++j) b[j] = load<V>(b_k + j * L);
      const int64_t a_k = a.col[k];
      for (int m = 0; m < MR; ++m) {
        const T a_mk = a_rows[m][a_k];
        for (int j = 0; j < NV; ++j) acc[m][j] += a_mk * b[j];
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    for (int j = 0; j < NV; ++j) {
      T* c = C + m * ldc + j * L;
      store(c, accumulate ? load<V>(c) + acc[m][j] : acc[m][j]);
    }
  }
}

// Rows left over below a multiple of MR, one instantiation per count.
template <typename T, int Bytes, int MR, int NV, int RowStep>
inline void gemm_rows(int rows, int64_t K, const Operand<T>& a, int64_t m0, const T* b_data,
                      const int64_t* b_row, T* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      gemm_tile<T, Bytes, MR, NV, RowStep>(K, a, m0, b_data, b_row, C, ldc, accumulate);
    } else {
      gemm_rows<T, Bytes, MR - 1, NV, RowStep>(rows, K, a, m0, b_data, b_row, C, ldc, accumulate);
    }
  }
}

template <typename T, int Bytes, int MR, int NV, int RowStep>
void gemm_blocked(int64_t M, int64_t N, int64_t K, const Operand<T>& a, const Operand<T>& b, T* C,
                  int64_t ldc, bool accumulate) {
  constexpr int64_t width = NV * Vec<T, Bytes>::lanes;
  const int64_t n_full = N / width * width;
  for (int64_t n0 = 0; n0 < n_full; n0 += width) {
    for (int64_t m0 = 0; m0 < M; m0 += MR) {
      gemm_rows<T, Bytes, MR, NV, RowStep>(static_cast<int>(std::min<int64_t>(MR, M - m0)), K, a, m0,
                                           b.data + n0, b.row, C + m0 * ldc + n0, ldc, accumulate);
    }
  }
  if (n_full == N) return;
  // The last columns: the tile reads B in place past column N (every B
  // operand carries kReadPast elements of slack) and writes a tile on the
  // stack, of which the valid columns are kept. (Copying B into a padded
  // buffer instead cost more than the product on the 7x7 layers.)
  const int64_t n_valid = N - n_full;
  alignas(64) T c_tile[MR * width];
  for (int64_t m0 = 0; m0 < M; m0 += MR) {
    const int rows = static_cast<int>(std::min<int64_t>(MR, M - m0));
    if (accumulate) {
      for (int m = 0; m < rows; ++m) std::copy_n(C + (m0 + m) * ldc + n_full, n_valid, c_tile + m * width);
    }
    gemm_rows<T, Bytes, MR, NV, RowStep>(rows, K, a, m0, b.data + n_full, b.row, c_tile, width, accumulate);
    for (int m = 0; m < rows; ++m) std::copy_n(c_tile + m * width, n_valid, C + (m0 + m) * ldc + n_full);
  }
}

// Sums of L vectors of L lanes, as one vector: log2(L) rounds, each adding
// the halves of pairs of vectors (two shuffles and an add per pair), instead
// of L horizontal sums. Lane j of the result holds the sum of vector
// transpose_sum_order<L>()[j].
template <int L, int H, typename V, size_t... J>
inline V add_halves(const V& a, const V& b, std::index_sequence<J...>) {
  return __builtin_shufflevector(a, b, (J / H % 2 * L + J / H / 2 * 2 * H + J % H)...) +
         __builtin_shufflevector(a, b, (J / H % 2 * L + J / H / 2 * 2 * H + J % H + H)...);
}

template <int L, int H = L / 2, typename V>
inline V transpose_sum(V* v) {
  for (int i = 0; i < H; ++i) v[i] = add_halves<L, H>(v[2 * i], v[2 * i + 1], std::make_index_sequence<L>{});
  if constexpr (H > 1) {
    return transpose_sum<L, H / 2>(v);
  } else {
    return v[0];
  }
}

template <int L>
constexpr std::array<int, L> transpose_sum_order() {
  std::array<std::array<int, L>, L> source{};  // which vector each lane's sum came from
  for (int i = 0; i < L; ++i) source[i].fill(i);
  for (int h = L / 2, n = L; h >= 1; h /= 2, n /= 2)
    for (int i = 0; i < n / 2; ++i) {
      std::array<int, L> merged{};
      for (int j = 0; j < L; ++j) merged[j] = source[2 * i + j / h % 2][j / h / 2 * 2 * h + j % h];
      source[i] = merged;
    }
  return source[0];
}

// One column of C: vectorized along k instead, over the runs of k in which
// both A's and B's elements are consecutive (a channel run of one tap), L
// rows at a time so that their sums end in one transpose_sum.
template <typename T, int RowStep>
void gemv(int64_t M, int64_t K, const Operand<T>& a, const Operand<T>& b, T* C, int64_t ldc,
          bool accumulate) {
  using V = typename Vec<T, kVectorBytes>::type;
  constexpr int L = Vec<T, kVectorBytes>::lanes;
  constexpr auto order = transpose_sum_order<L>();
  std::vector<int64_t> run_start{0};
  for (int64_t k = 1; k < K; ++k)
    if (a.col[k] != a.col[k - 1] + 1 || b.row[k] != b.row[k - 1] + 1) run_start.push_back(k);
  run_start.push_back(K);
  for (int64_t m0 = 0; m0 < M; m0 += L) {
    const int rows = static_cast<int>(std::min<int64_t>(L, M - m0));
    if (rows < L && RowStep) {  // a short block: the general row table, no rows past M
      gemv<T, 0>(rows, K, {a.data, a.row + m0, a.col}, b, C + m0 * ldc, ldc, accumulate);
      break;
    }
    const RowPointers<T, L, RowStep> a_rows(a, m0, rows - 1);
    V acc[L] = {};
    T tail[L] = {};
    for (size_t run = 0; run + 1 < run_start.size(); ++run) {
      const int64_t col = a.col[run_start[run]], len = run_start[run + 1] - run_start[run];
      const T* w = b.data + b.row[run_start[run]];
      int64_t i = 0;
      for (; i + L <= len; i += L) {
        const V w_i = load<V>(w + i);
        for (int r = 0; r < L; ++r) acc[r] += load<V>(a_rows[r] + col + i) * w_i;
      }
      for (; i < len; ++i)
        for (int r = 0; r < L; ++r) tail[r] += a_rows[r][col + i] * w[i];
    }
    const V sums = transpose_sum<L>(acc);
    for (int j = 0; j < L; ++j) {
      const int r = order[j];
      if (r >= rows) continue;
      T* c = C + (m0 + r) * ldc;
      *c = (accumulate ? *c : T(0)) + (sums[j] + tail[r]);
    }
  }
}

// C as wide as half an AVX-512 float vector (8 channels): two consecutive k
// share each vector, so no lane idles (narrower levels hold 8 channels in
// one whole vector). A's pair (k, k + 1) is broadcast as one 64-bit
// element, B is repacked to match, and lanes 2j and 2j + 1 of a tile row hold
// column j's sums over even and odd k, added when the tile is stored.
// Needs K even and A's elements of each pair adjacent (two channels of one
// tap), which gemm checks.
template <int MR, int RowStep>
inline void gemm_pair_tile(int64_t K, const Operand<float>& a, int64_t m0, const float* __restrict__ b_pairs,
                           float* __restrict__ C, int64_t ldc, bool accumulate) {
  using V = Vec<float, 64>::type;
  using Pairs = Vec<double, 64>::type;  // 8 lanes of two floats, moved as bits, never computed on
  using Half = Vec<float, 32>::type;
  const RowPointers<float, MR, RowStep> a_rows(a, m0);
  V acc[MR];
  for (int m = 0; m < MR; ++m) acc[m] = V{};
  constexpr int Run = RowStep >= 2 ? RowStep : 2;  // k per lookup of a.col (see gemm_tile)
  for (int64_t k0 = 0; k0 < K; k0 += Run) {
    const int64_t a_k = a.col[k0];
    for (int i = 0; i < Run; i += 2) {
      const V b = load<V>(b_pairs + 8 * (k0 + i));
      for (int m = 0; m < MR; ++m) {
        double p;
        std::memcpy(&p, a_rows[m] + a_k + i, sizeof(p));
        acc[m] += reinterpret_cast<V>(Pairs{p, p, p, p, p, p, p, p}) * b;
      }
    }
  }
  for (int m = 0; m < MR; ++m) {
    const V sums = acc[m] + __builtin_shufflevector(acc[m], acc[m], 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13,
                                                    12, 15, 14);
    Half row = __builtin_shufflevector(sums, sums, 0, 2, 4, 6, 8, 10, 12, 14);
    float* c = C + (m0 + m) * ldc;
    if (accumulate) row += load<Half>(c);
    store(c, row);
  }
}

template <int MR, int RowStep>
inline void gemm_pair_rows(int rows, int64_t K, const Operand<float>& a, int64_t m0, const float* b_pairs,
                           float* C, int64_t ldc, bool accumulate) {
  if constexpr (MR > 0) {
    if (rows == MR) {
      gemm_pair_tile<MR, RowStep>(K, a, m0, b_pairs, C, ldc, accumulate);
    } else {
      gemm_pair_rows<MR - 1, RowStep>(rows, K, a, m0, b_pairs, C, ldc, accumulate);
    }
  }
}

inline bool k_pairs_adjacent(int64_t K, const int64_t* a_col) {
  if (K % 2 != 0) return false;
  for (int64_t k = 0; k < K; k += 2)
    if (a_col[k + 1] != a_col[k] + 1) return false;
  return true;
}

template <int RowStep>
void gemm_paired(int64_t M, int64_t K, const Operand<float>& a, const Operand<float>& b, float* C,
                 int64_t ldc, bool accumulate) {
  constexpr int MR = RowStep ? 16 : 12;
  alignas(64) float b_stack[16 * 144];  // the autoencoder's largest K fits on the stack
  Scratch<float> b_heap;
  float* b_pairs = K <= 144 ? b_stack : (b_heap.resize(8 * K), b_heap.data());
  for (int64_t k = 0; k < K; ++k)
    for (int64_t j = 0; j < 8; ++j) b_pairs[8 * (k - k % 2) + 2 * j + k % 2] = b.data[b.row[k] + j];
  for (int64_t m0 = 0; m0 < M; m0 += MR)
    gemm_pair_rows<MR, RowStep>(static_cast<int>(std::min<int64_t>(MR, M - m0)), K, a, m0, b_pairs, C, ldc,
                                accumulate);
}

// The shape of an NHWC product, for which the tiles are compiled with the
// channel count as RowStep (1, 8 or 16): A's rows (positions) RowStep apart, and
// k in runs of RowStep (the channels of one tap) along which A's columns
// step by 1 and B's rows by one constant. Else 0.
inline int row_step(int64_t M, int64_t K, const int64_t* a_row, const int64_t* a_col, const int64_t* b_row) {
  const int64_t step = M > 1 ? a_row[1] - a_row[0] : 0;
  if ((step != 1 && step != 8 && step != 16) || K % step != 0 || K < 2) return 0;
  for (int64_t m = 1; m < M; ++m)
    if (a_row[m] - a_row[m - 1] != step) return 0;
  const int64_t ldb = b_row[1] - b_row[0];
  for (int64_t k = 0; k < K; ++k) {
    if (k % step == 0) continue;
    if (a_col[k] != a_col[k - 1] + 1 || b_row[k] != b_row[k - 1] + ldb) return 0;
  }
  return static_cast<int>(step);
}

// Rows of a tile NV vectors wide: its MR x NV accumulators, NV vectors of B
// and a broadcast of A must fit this level's registers (with AVX2's 16, tiles
// sized for AVX-512's 32 spilled: 5-16x slower). One-vector tiles take at
// most 16 rows where one register addresses them all (measured best of 12 to
// 24 on AVX-512), else 12; wider tiles at most 8.
constexpr int tile_rows(int nv, bool rows_in_one_register) {
  const int fit = (kVectorRegisters - nv - 1) / nv;
  const int cap = nv > 1 ? 8 : rows_in_one_register ? 16 : 12;
  return fit < cap ? fit : cap;
}

// Picks the tile for the width of C: narrow rows (a few channels) get one
// vector per tile row and many rows, wide ones several vectors.
template <typename T, int RowStep>
void gemm_with_rows(int64_t M, int64_t N, int64_t K, const Operand<T>& a, const Operand<T>& b, T* C,
                    int64_t ldc, bool accumulate, bool k_pairs) {
  constexpr int Bytes = kVectorBytes;
  constexpr int64_t L = Vec<T, Bytes>::lanes;
  if constexpr (std::is_same_v<T, float> && Bytes == 64) {
    if (N == L / 2 && k_pairs) return gemm_paired<RowStep>(M, K, a, b, C, ldc, accumulate);
  }
  if (N == 1) {
    gemv<T, RowStep>(M, K, a, b, C, ldc, accumulate);
  } else if (N <= L / 2 && Bytes > 16) {
    gemm_blocked<T, Bytes / 2, tile_rows(1, RowStep), 1, RowStep>(M, N, K, a, b, C, ldc, accumulate);
  } else if (N <= L) {
    gemm_blocked<T, Bytes, tile_rows(1, RowStep), 1, RowStep>(M, N, K, a, b, C, ldc, accumulate);
  } else if (N <= 2 * L) {
    gemm_blocked<T, Bytes, tile_rows(2, RowStep), 2, RowStep>(M, N, K, a, b, C, ldc, accumulate);
  } else if (kVectorRegisters < 32 && N <= 3 * L) {  // 16 or 24 channels in 4- or 8-lane vectors:
    gemm_blocked<T, Bytes, tile_rows(3, RowStep), 3, RowStep>(M, N, K, a, b, C, ldc, accumulate);
  } else if (kVectorRegisters < 32 && N <= 4 * L) {  // whole vectors, no tail through the stack
    gemm_blocked<T, Bytes, tile_rows(4, RowStep), 4, RowStep>(M, N, K, a, b, C, ldc, accumulate);
  } else if (M % tile_rows(3, false) == 0) {  // NCHW with 8 or 16 output channels: no short tile
    gemm_blocked<T, Bytes, tile_rows(3, false), 3, 0>(M, N, K, a, b, C, ldc, accumulate);
  } else {
    constexpr int NV = kVectorRegisters >= 32 ? 4 : 2;
    gemm_blocked<T, Bytes, tile_rows(NV, false), NV, 0>(M, N, K, a, b, C, ldc, accumulate);
  }
}

// What gemm's choice of tile reads off the operands' offset tables (not
// their data): worked out once per op by a caller that runs the same product
// on every sample (on the small layers, checking per call cost 10%).
struct ProductShape {
  int row_step;
  bool k_pairs;
};

template <typename T>
ProductShape product_shape(int64_t M, int64_t K, const Operand<T>& a, const Operand<T>& b) {
  return {M > 0 && K > 0 ? row_step(M, K, a.row, a.col, b.row) : 0, k_pairs_adjacent(K, a.col)};
}

template <typename T>
void gemm(int64_t M, int64_t N, int64_t K, const Operand<T>& a, const Operand<T>& b, T* C, int64_t ldc,
          bool accumulate, const ProductShape& shape) {
  if (M <= 0 || N <= 0) return;
  switch (shape.row_step) {
    case 1:
      return gemm_with_rows<T, 1>(M, N, K, a, b, C, ldc, accumulate, shape.k_pairs);
    case 8:
      return gemm_with_rows<T, 8>(M, N, K, a, b, C, ldc, accumulate, shape.k_pairs);
    case 16:
      return gemm_with_rows<T, 16>(M, N, K, a, b, C, ldc, accumulate, shape.k_pairs);
    default:
      return gemm_with_rows<T, 0>(M, N, K, a, b, C, ldc, accumulate, shape.k_pairs);
  }
}

// sum_i gate(x)[i] in vector lanes, then the lanes in order: reproducible,
// and vectorized (a plain float sum loop would not be, without fast-math).
template <typename T, bool Gated>
T gated_sum(const T* __restrict__ x, const T* __restrict__ x_gate, int64_t n) {
  using V = typename Vec<T, kVectorBytes>::type;
  constexpr int L = Vec<T, kVectorBytes>::lanes;
  V acc = V{};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    V v = load<V>(x + i);
    if constexpr (Gated) v = load<V>(x_gate + i) > T(0) ? v : V{};
    acc += v;
  }
  T sum = 0;
  for (int l = 0; l < L; ++l) sum += acc[l];
  for (; i < n; ++i) sum += Gated ? (x_gate[i] > T(0) ? x[i] : T(0)) : x[i];
  return sum;
}

// Offsets start, start + step, ... (the table of a plain strided dimension).
inline std::vector<int64_t> arange(int64_t count, int64_t step, int64_t start = 0) {
  std::vector<int64_t> v(count);
  for (int64_t i = 0; i < count; ++i) v[i] = start + i * step;
  return v;
}

}  // namespace CAE_CPU_LEVEL
}  // namespace cpu
}  // namespace cae
