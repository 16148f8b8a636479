// The emulator's launch counter and recorder, for Python
// (cae_kernels.sim.launch_counts, record_launches): the emulated build only
// (cae_kernels.sim compiles it; nvcc never sees it).
//
//   torch.ops.cae_sim._sim_launch_counts() -> (names, counts)
//   torch.ops.cae_sim._sim_reset_launch_counts()
//   torch.ops.cae_sim._sim_set_launch_recording(on)
//   torch.ops.cae_sim._sim_take_launch_records() -> (names, configs)
//       configs: 7 numbers per launch, grid x y z, block x y z, dynamic shared bytes
//   torch.ops.cae_sim._sim_set_dry_run(on)
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

// Flat, as a schema can return it: names, and 7 numbers per record.
std::tuple<std::vector<std::string>, std::vector<int64_t>> take_launch_records() {
  std::tuple<std::vector<std::string>, std::vector<int64_t>> result;
  for (const auto& r : cae_sim::take_launch_records()) {
    std::get<0>(result).push_back(r.kernel);
    for (const unsigned v : {r.grid.x, r.grid.y, r.grid.z, r.block.x, r.block.y, r.block.z})
      std::get<1>(result).push_back(static_cast<int64_t>(v));
    std::get<1>(result).push_back(static_cast<int64_t>(r.smem_bytes));
  }
  return result;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(CAE_NAMESPACE, m) {
  m.def("_sim_launch_counts() -> (str[], int[])", &launch_counts);
  m.def("_sim_reset_launch_counts() -> ()", &cae_sim::reset_launch_counts);
  m.def("_sim_set_launch_recording(bool on) -> ()", &cae_sim::set_launch_recording);
  m.def("_sim_take_launch_records() -> (str[], int[])", &take_launch_records);
  m.def("_sim_set_dry_run(bool on) -> ()", &cae_sim::set_dry_run);
}
