// The CPU kernels for AVX-512 (Intel Skylake-SP and newer, AMD Zen 4):
// 64-byte vectors, 32 vector registers (capability.h).
#include "kernels.h"

#ifdef CAE_CPU_X86
CAE_CPU_TARGET_BEGIN("avx2,fma,avx512f,avx512bw,avx512dq,avx512vl")

namespace cae {
namespace cpu {
namespace avx512 {
constexpr int kVectorBytes = 64;
constexpr int kVectorRegisters = 32;
}  // namespace avx512
}  // namespace cpu
}  // namespace cae

#define CAE_CPU_LEVEL avx512
#include "level/conv3x3.cpp"
#include "level/conv_transpose3x3.cpp"
#include "level/conv_backward.cpp"
#include "level/max_pool2x2.cpp"

CAE_CPU_TARGET_END
#endif
