#include "kernels.h"

TORCH_LIBRARY_IMPL(CAE_NAMESPACE, CPU, m) { cae::Ops<cae::CpuKernels>::register_all(m); }
