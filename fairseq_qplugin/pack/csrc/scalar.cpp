// Baseline-ISA kernels (any CPU, any architecture): LUT-GEMM for BCQ, dequantize + dot for k-means.
#include "qkernels.h"

namespace qk {
namespace scalar {
#include "generic_impl.h"
}  // namespace scalar

const Kernels scalar_kernels = {"scalar", nullptr, scalar::bcq_lut, scalar::lut_build, scalar::bcq_deq,
                                scalar::km_gemv, scalar::km_deq, 8, 8};
}  // namespace qk
