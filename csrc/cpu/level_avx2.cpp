// The CPU kernels for AVX2 + FMA (Intel since Haswell, AMD since Zen):
// 32-byte vectors, 16 vector registers (capability.h).
#include "kernels.h"

#ifdef CAE_CPU_X86
CAE_CPU_TARGET_BEGIN("avx2,fma")

namespace cae {
namespace cpu {
namespace avx2 {
constexpr int kVectorBytes = 32;
constexpr int kVectorRegisters = 16;
}  // namespace avx2
}  // namespace cpu
}  // namespace cae

#define CAE_CPU_LEVEL avx2
#include "level/conv3x3.cpp"
#include "level/conv_transpose3x3.cpp"
#include "level/conv_backward.cpp"
#include "level/max_pool2x2.cpp"

CAE_CPU_TARGET_END
#endif
