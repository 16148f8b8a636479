// The CUDA kernels serve every op of the cae namespace on the CUDA key (under
// the emulator: the cae_sim namespace on the CPU key, see common.cuh).
//
// Compiled by the host compiler, not nvcc: there are no kernels here, and nvcc
// would parse torch/library.h once for every GPU architecture.
#define CAE_HOST_ONLY
#include "../ops.h"
#include "kernels.h"

TORCH_LIBRARY_IMPL(CAE_NAMESPACE, CAE_DISPATCH_KEY, m) { cae::Ops<cae::CudaKernels>::register_all(m); }
