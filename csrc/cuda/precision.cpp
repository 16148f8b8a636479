// PyTorch's float32 precision setting for the CUDA kernels (kernels.h).
//
// Compiled by the host compiler, not nvcc: ATen/Context.h is large, and nvcc
// would parse it once for every GPU architecture.
#define CAE_HOST_ONLY
#include <ATen/Context.h>

#include "kernels.h"

namespace cae {
namespace cuda {

// The setting cuDNN's convolutions follow (torch.backends.cudnn.allow_tf32,
// or torch.backends.cudnn.conv.fp32_precision).
bool conv_allows_tf32() { return at::globalContext().allowTF32CuDNN(at::Float32Op::CONV); }

}  // namespace cuda
}  // namespace cae
