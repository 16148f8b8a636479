// mma.cuh -- warp-level tensor-core products (mma.sync, sm_80 and newer):
// m16n8k16 on f16 or bf16, m16n8k8 on tf32, both with fp32 accumulation.
//
// One m16n8k16 product of the warp, D = A B + C, bf16 or f16 inputs and fp32
// accumulation (A row-major 16 x 16, B column-major 16 x 8, C and D 16 x 8).
// Every lane of a whole warp calls it, each with its fragments laid out as the
// PTX ISA specifies ("Matrix Fragments for mma.m16n8k16"); with groupID
// g = lane / 4 and t = lane % 4:
//   a[0]: A[g][2t, 2t+1]      a[1]: A[g+8][2t, 2t+1]
//   a[2]: A[g][2t+8, 2t+9]    a[3]: A[g+8][2t+8, 2t+9]
//   b[0]: B[2t, 2t+1][g]      b[1]: B[2t+8, 2t+9][g]
//   c, d: [g][2t], [g][2t+1], [g+8][2t], [g+8][2t+1]
// two 16-bit elements per 32-bit register, the lower index in the low half.
//
// nvcc: inline PTX for sm_80 and newer; older architectures compile a trap
// (the host launches these kernels only on sm_80+, see tensor_cores()). The
// emulator (CAE_SIM) gathers the warp's fragments by the same layout
// (cae_sim::mma_sync, csrc/sim/cuda_sim.h).
#pragma once

#include "common.cuh"

namespace cae {
namespace cuda {

// The element type of a product's inputs (tags: this header stays torch-free;
// the host, which knows c10::Half and c10::BFloat16, picks one).
struct MmaF16 {};
struct MmaBF16 {};

template <class Kind>
CAE_DEVICE void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                             const float (&c)[4]) {
  static_assert(std::is_same<Kind, MmaF16>::value || std::is_same<Kind, MmaBF16>::value,
                "mma_m16n8k16: MmaF16 or MmaBF16");
#if defined(CAE_SIM)
  ::cae_sim::mma_sync(std::is_same<Kind, MmaF16>::value ? ::cae_sim::MmaType::F16 : ::cae_sim::MmaType::BF16,
                      d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// The two input types differ only in the instruction's name (string literals
// concatenate inside asm).
#define CAE_MMA_M16N8K16(AB)                                                                             \
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB                                        \
               ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"              \
               : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), \
                 "f"(c[2]), "f"(c[3]))
  if constexpr (std::is_same<Kind, MmaF16>::value) {
    CAE_MMA_M16N8K16("f16");
  } else {
    CAE_MMA_M16N8K16("bf16");
  }
#undef CAE_MMA_M16N8K16
#else
  (void)d, (void)a, (void)b, (void)c;
  __trap();  // never launched below sm_80
#endif
}

// One m16n8k8 product, tf32 inputs (each a float's register holding a tf32
// value, see to_tf32) and fp32 accumulation (A 16 x 8, B 8 x 8):
//   a[0]: A[g][t]  a[1]: A[g+8][t]  a[2]: A[g][t+4]  a[3]: A[g+8][t+4]
//   b[0]: B[t][g]  b[1]: B[t+4][g]  c, d: as above
struct MmaTF32 {};

CAE_DEVICE void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                 const float (&c)[4]) {
#if defined(CAE_SIM)
  ::cae_sim::mma_sync(::cae_sim::MmaType::TF32, d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  (void)d, (void)a, (void)b, (void)c;
  __trap();  // never launched below sm_80
#endif
}

// A float rounded to tf32 (10 mantissa bits, to nearest, ties away from zero:
// cvt.rna.tf32.f32), in a 32-bit register.
CAE_DEVICE uint32_t to_tf32(float v) {
#if defined(CAE_SIM)
  uint32_t bits;
  memcpy(&bits, &v, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & ~0x1fffu;  // inf and NaN stay
  return bits;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
#else
  return __float_as_uint(v);
#endif
}

// The product of a Kind: k = 16 (f16, bf16) or 8 (tf32).
template <class Kind>
CAE_DEVICE void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4]) {
  if constexpr (std::is_same<Kind, MmaTF32>::value) {
    mma_m16n8k8_tf32(d, a, b, c);
  } else {
    mma_m16n8k16<Kind>(d, a, b, c);
  }
}

// The 16 bits of a bf16 or f16 value (c10::Half / c10::BFloat16 or CUDA's
// own: any 2-byte type), and two of them packed as one operand register.
template <typename T>
CAE_DEVICE uint32_t bits16(T v) {
  static_assert(sizeof(T) == 2, "bits16: a 16-bit type");
  uint16_t b;
  memcpy(&b, &v, 2);
  return b;
}

template <typename T>
CAE_DEVICE uint32_t pack2(T lo, T hi) {
  return bits16(lo) | bits16(hi) << 16;
}

}  // namespace cuda
}  // namespace cae
