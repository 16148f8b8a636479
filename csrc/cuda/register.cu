// The CUDA kernels serve every op of the cae namespace on the CUDA key (under
// the emulator: the cae_sim namespace on the CPU key, see common.cuh).
#include "../ops.h"
#include "kernels.h"

TORCH_LIBRARY_IMPL(CAE_NAMESPACE, CAE_DISPATCH_KEY, m) { cae::Ops<cae::CudaKernels>::register_all(m); }
