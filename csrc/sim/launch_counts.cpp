// The emulator's launch counter, for Python (cae_kernels.sim.launch_counts):
// the emulated build only (cae_kernels.sim compiles it; nvcc never sees it).
//
//   torch.ops.cae_sim._sim_launch_counts() -> (names, counts)
//   torch.ops.cae_sim._sim_reset_launch_counts()
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../cuda/common.cuh"

namespace {

std::tuple<std::vector<std::string>, std::vector<int64_t>> launch_counts() {
  std::tuple<std::vector<std::string>, std::vector<int64_t>> result;
  for (const auto& [name, count] : cae_sim::launch_counts()) {
    std::get<0>(result).push_back(name);
    std::get<1>(result).push_back(static_cast<int64_t>(count));
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(CAE_NAMESPACE, m) {
  m.def("_sim_launch_counts() -> (str[], int[])", &launch_counts);
  m.def("_sim_reset_launch_counts() -> ()", &cae_sim::reset_launch_counts);
}
