// Sums in a fixed order, so that results are the same bits on every run: over
// a warp, a block (warp_sum, block_sum), and over a grid's blocks, finished
// inside the kernel that computes them (finish_grid_sums): each block writes
// its row of partial sums (a weight gradient over its own positions), and the
// last block to finish adds the rows, always in block order, with no second
// launch.
//
// Two levels keep the last block's work small: the blocks come in groups of
// kGridSumsGroup; the last block of a group to finish adds the group's rows
// into a group row, and the last group to finish adds the group rows. A
// block's turn comes from an atomic ticket per group (then one for the
// groups), taken after a __threadfence() that publishes its row; the tickets
// start at zero (the launcher clears them with cudaMemsetAsync) and the
// finishing blocks leave them at zero again. No block waits for another, so
// the emulator, which runs blocks one after another, runs it as the GPU does.
#pragma once

#include "common.cuh"

namespace cae {
namespace cuda {

// Warp sum in a fixed tree (lane 0 holds the result).
template <typename Acc>
CAE_DEVICE Acc warp_sum(Acc v) {
  CAE_UNROLL
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// The sums over a warp of 32 values per lane, lane j ending with the sum of
// the lanes' v[j] (a reduce-scatter in a fixed tree: each step a lane keeps
// half its values, adds its partner's other half; 31 shuffles where 32
// warp_sums take 160). v is overwritten. The steps are instantiated one by
// one (Half a template argument): every index a constant, v stays in
// registers however much code the kernel around it has.
template <int Half = 16, typename Acc>
CAE_DEVICE Acc warp_reduce_scatter(Acc (&v)[32]) {
  const bool upper = (threadIdx.x & Half) != 0;
  CAE_UNROLL
  for (int i = 0; i < Half; ++i) {
    const Acc send = upper ? v[i] : v[i + Half];
    v[i] = (upper ? v[i + Half] : v[i]) + __shfl_xor_sync(0xffffffffu, send, Half);
  }
  if constexpr (Half > 1) {
    return warp_reduce_scatter<Half / 2>(v);
  } else {
    return v[0];
  }
}

// Block sum in a fixed order: warp trees, then the warps' sums in order.
// Every thread must call it; the result is valid in thread 0.
template <typename Acc>
CAE_DEVICE Acc block_sum(Acc v, Acc* scratch /* kWarps */) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  v = warp_sum(v);
  __syncthreads();  // scratch may still be read from a previous call
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  Acc total = Acc(0);
  if (threadIdx.x == 0) {
    total = scratch[0];
    for (int k = 1; k < kWarps; ++k) total += scratch[k];
  }
  return total;
}

constexpr int kGridSumsGroup = 32;

template <typename Acc>
struct GridSums {
  Acc* partials;      // [blocks + groups + 1][size]: the blocks' rows, the groups' rows, the totals
  unsigned* tickets;  // [groups + 1], zero before the launch, left zero
  int size;           // sums per block
  int blocks;         // the grid's blocks
};

CAE_HOST_DEVICE int grid_sums_groups(int blocks) { return ceil_div(blocks, kGridSumsGroup); }

// The workspace: the rows, then the tickets (Acc-aligned rows first).
template <typename Acc>
inline size_t grid_sums_ticket_bytes(int blocks) {
  return static_cast<size_t>(grid_sums_groups(blocks) + 1) * sizeof(unsigned);
}

template <typename Acc>
inline size_t grid_sums_bytes(int size, int blocks) {
  const size_t rows = static_cast<size_t>(blocks) + grid_sums_groups(blocks) + 1;
  return rows * size * sizeof(Acc) + grid_sums_ticket_bytes<Acc>(blocks);
}

template <typename Acc>
inline GridSums<Acc> grid_sums_at(void* workspace, int size, int blocks) {
  Acc* partials = static_cast<Acc*>(workspace);
  const size_t rows = static_cast<size_t>(blocks) + grid_sums_groups(blocks) + 1;
  return {partials, reinterpret_cast<unsigned*>(partials + rows * size), size, blocks};
}

// dst[i] = the sum of rows [first, first + count) of src, in row order, for
// i in [0, size): a thread per column (coalesced). __ldcg: the rows were
// written by other blocks (L2, not this SM's L1).
template <typename Acc>
CAE_DEVICE void add_rows(Acc* dst, const Acc* src, int first, int count, int size) {
  for (int i = threadIdx.x; i < size; i += blockDim.x) {
    const Acc* column = src + static_cast<index_t>(first) * size + i;
    Acc s = __ldcg(column);
    for (int r = 1; r < count; ++r) s += __ldcg(column + static_cast<index_t>(r) * size);
    dst[i] = s;
  }
}

// Called by every thread of every block once the block's row
// (g.partials + blockIdx.x * g.size, every value) is written: the totals in
// the one block that finishes last (readable by all its threads), nullptr in
// the others. `flag`: a __shared__ int of the caller.
template <typename Acc>
CAE_DEVICE const Acc* finish_grid_sums(const GridSums<Acc>& g, int* flag) {
  const int groups = grid_sums_groups(g.blocks);
  const int group = static_cast<int>(blockIdx.x) / kGridSumsGroup;
  const int first = group * kGridSumsGroup;
  const int members = g.blocks - first < kGridSumsGroup ? g.blocks - first : kGridSumsGroup;
  Acc* group_rows = g.partials + static_cast<index_t>(g.blocks) * g.size;
  Acc* totals = group_rows + static_cast<index_t>(groups) * g.size;
  __syncthreads();  // the block's row is written
  if (threadIdx.x == 0) {
    __threadfence();  // published before the ticket is taken
    const unsigned ticket = atomicAdd(&g.tickets[group], 1u);
    *flag = ticket + 1 == static_cast<unsigned>(members);
  }
  __syncthreads();
  if (!*flag) return nullptr;  // uniform over the block
  __threadfence();
  add_rows(group_rows + static_cast<index_t>(group) * g.size, g.partials, first, members, g.size);
  __syncthreads();
  if (threadIdx.x == 0) {
    g.tickets[group] = 0u;
    __threadfence();
    const unsigned ticket = atomicAdd(&g.tickets[groups], 1u);
    *flag = ticket + 1 == static_cast<unsigned>(groups);
  }
  __syncthreads();
  if (!*flag) return nullptr;
  __threadfence();
  add_rows(totals, group_rows, 0, groups, g.size);
  if (threadIdx.x == 0) g.tickets[groups] = 0u;
  __syncthreads();
  return totals;
}

}  // namespace cuda
}  // namespace cae
