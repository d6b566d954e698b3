// The portable kernels compiled for AVX2 + FMA (x86-64 only). Only chosen at run time on a CPU that
// has AVX2 and FMA (ops.cpp); everything above the pragma keeps the baseline ISA.
#include "qkernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace qk {
namespace avx2 {
#include "generic_impl.h"
}  // namespace avx2

const Kernels avx2_kernels = {"avx2", nullptr, avx2::bcq_lut, avx2::lut_build, avx2::bcq_deq,
                              avx2::km_gemv, avx2::km_deq, 8, 8};
}  // namespace qk
#pragma GCC pop_options
#endif
