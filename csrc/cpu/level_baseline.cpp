// The CPU kernels for the compiler's default target, which every CPU of the
// architecture runs: SSE2 on x86-64, NEON on aarch64 (capability.h).
#include "kernels.h"

namespace cae {
namespace cpu {
namespace baseline {
constexpr int kVectorBytes = 16;
#if defined(__aarch64__)
constexpr int kVectorRegisters = 32;
#else
constexpr int kVectorRegisters = 16;
#endif
}  // namespace baseline
}  // namespace cpu
}  // namespace cae

#define CAE_CPU_LEVEL baseline
#include "level/conv3x3.cpp"
#include "level/conv_transpose3x3.cpp"
#include "level/conv_backward.cpp"
#include "level/max_pool2x2.cpp"
