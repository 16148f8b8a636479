// Test hooks of the emulated build only (cae_kernels.sim compiles them; nvcc
// never sees them), for the pieces the whole-image kernels build on:
//
//   torch.ops.cae_sim._sim_grid_sums(partials [blocks, size] float32/64)
//     -> (totals [size], tickets after the launch, finishers: blocks that got the totals)
//   finish_grid_sums (csrc/cuda/grid_sums.cuh) over a grid of one block per
//   row of `partials`, each block writing its row as a kernel writes its
//   partial sums;
//
//   torch.ops.cae_sim._sim_smem_launch(int bytes, bool opt_in) -> int
//   a launch with `bytes` of dynamic shared memory, after allow_smem
//   (csrc/cuda/kernels.h) where opt_in; returns smem_opt_in_limit().
#include <ATen/Functions.h>
#include <torch/library.h>

#include "../cuda/grid_sums.cuh"
#include "../cuda/kernels.h"

namespace {

template <typename Acc>
__global__ void grid_sums_check_kernel(cae::cuda::GridSums<Acc> g, const Acc* rows, Acc* totals,
                                       int* finishers) {
  __shared__ int flag;
  Acc* row = g.partials + static_cast<cae::cuda::index_t>(blockIdx.x) * g.size;
  for (int i = threadIdx.x; i < g.size; i += blockDim.x)
    row[i] = rows[static_cast<cae::cuda::index_t>(blockIdx.x) * g.size + i];
  const Acc* sums = cae::cuda::finish_grid_sums(g, &flag);
  if (sums == nullptr) return;
  if (threadIdx.x == 0) atomicAdd(finishers, 1);
  for (int i = threadIdx.x; i < g.size; i += blockDim.x) totals[i] = sums[i];
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> grid_sums_check(const at::Tensor& partials) {
  TORCH_CHECK(partials.dim() == 2 && partials.size(0) >= 1 && partials.size(1) >= 1,
              "_sim_grid_sums: partials must be [blocks >= 1, size >= 1], got ", partials.sizes());
  TORCH_CHECK(partials.scalar_type() == at::kFloat || partials.scalar_type() == at::kDouble,
              "_sim_grid_sums: float32 or float64, got ", partials.scalar_type());
  const int blocks = static_cast<int>(partials.size(0)), size = static_cast<int>(partials.size(1));
  const at::Tensor rows = partials.contiguous();
  at::Tensor totals = at::full({size}, NAN, partials.options());
  at::Tensor finishers = at::zeros({1}, partials.options().dtype(at::kInt));
  at::Tensor tickets;
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "_sim_grid_sums", [&] {
    using Acc = scalar_t;
    // Poisoned, as a fresh allocation may be: only the tickets are cleared.
    at::Tensor workspace = at::full({static_cast<int64_t>(cae::cuda::grid_sums_bytes<Acc>(size, blocks))},
                                    0xFF, partials.options().dtype(at::kByte));
    const auto g = cae::cuda::grid_sums_at<Acc>(workspace.data_ptr(), size, blocks);
    cudaMemsetAsync(g.tickets, 0, cae::cuda::grid_sums_ticket_bytes<Acc>(blocks));
    CAE_LAUNCH(grid_sums_check_kernel<Acc>, blocks, 64, 0, nullptr, g, rows.const_data_ptr<Acc>(),
               totals.mutable_data_ptr<Acc>(), finishers.mutable_data_ptr<int>());
    const int64_t ticket_count = cae::cuda::grid_sums_groups(blocks) + 1;
    tickets = at::from_blob(g.tickets, {ticket_count}, partials.options().dtype(at::kInt)).clone();
  });
  return {totals, tickets, finishers};
}

// Every thread writes and reads back its word at the end of the buffer.
__global__ void smem_launch_kernel(int words, int* out) {
  CAE_DYNAMIC_SHARED(int, s);
  s[words - 1 - threadIdx.x] = threadIdx.x;
  __syncthreads();
  out[threadIdx.x] = s[words - 1 - threadIdx.x];
}

int64_t smem_launch_check(int64_t bytes, bool opt_in) {
  TORCH_CHECK(bytes >= 32 * 4, "_sim_smem_launch: at least 128 bytes, got ", bytes);
  const auto kernel = smem_launch_kernel;
  if (opt_in) cae::cuda::allow_smem(kernel, static_cast<size_t>(bytes));
  at::Tensor out = at::empty({32}, at::TensorOptions().dtype(at::kInt));
  CAE_LAUNCH(kernel, 1, 32, static_cast<size_t>(bytes), nullptr, static_cast<int>(bytes / 4),
             out.mutable_data_ptr<int>());
  for (int i = 0; i < 32; ++i)
    TORCH_CHECK(out.const_data_ptr<int>()[i] == i, "_sim_smem_launch: shared memory lost thread ", i,
                "'s write");
  return static_cast<int64_t>(cae::cuda::smem_opt_in_limit());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(CAE_NAMESPACE, m) {
  m.def("_sim_grid_sums(Tensor partials) -> (Tensor, Tensor, Tensor)", &grid_sums_check);
  m.def("_sim_smem_launch(int bytes, bool opt_in) -> int", &smem_launch_check);
}
