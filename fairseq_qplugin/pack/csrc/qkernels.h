// Kernel interface shared by the ISA-specific translation units (scalar.cpp, avx2.cpp, avx512.cpp)
// and the torch binding (ops.cpp). Plain C types only: the ISA units must not instantiate any
// template from torch or the standard library (their code is compiled for a wider ISA).
//
// Packed layouts (pack/formats.py, pack/bitpack.py), rows x cols = [out, in]:
//   BCQ:    planes uint8 [q, rows, nbytes = ceil(cols/8)], bit j of byte c = sign of column 8c+j
//           (1 = +1); alpha fp32 [q, rows or 1, groups], groups split cols evenly.
//           The AVX-512 direct kernel reads the planes re-laid out (ops.cpp bcq_lut_layout) as
//           lut uint32 [q, ceil(rows/16), chunks = ceil(cols/32), 16], 64-byte aligned: dword i of
//           block (k, rb, c) = bits 32c..32c+31 of plane k's row 16 rb + i (zero past rows/cols).
//   k-means: indices uint8 [rows, rowbytes = ceil(cols*bits/8)], little-endian bit stream;
//           codebook fp32 [2^bits] or [rows, 2^bits]; optional mask uint8 [rows, ceil(cols/8)].
// Activations x are fp32 [n, xs] with xs = cols rounded up to 16 and zero padding, so kernels may
// read whole 16-column blocks. Outputs y are fp32 [n, ys].
#pragma once
#include <cstdint>

namespace qk {

struct BCQ {
  const uint8_t* planes;
  const float* alpha;
  int q, rows, cols, nbytes, groups;
  bool alpha_shared;  // alpha is [q, 1, groups]
  const uint32_t* lut;  // the planes as laid out for bcq_gemv, or null
  int chunks;           // ceil(cols / 32)
  const float* a(int k, int r, int g) const {
    return alpha + ((int64_t)k * (alpha_shared ? 1 : rows) + (alpha_shared ? 0 : r)) * groups + g;
  }
};

struct KMeans {
  const uint8_t* indices;
  const float* codebook;
  const uint8_t* mask;  // may be null
  int bits, rows, cols, rowbytes, maskbytes;
  bool per_row;  // codebook is [rows, 2^bits]
  const float* cb(int r) const { return codebook + (per_row ? (int64_t)r << bits : 0); }
};

// y[i][r] = sum_c W[r][c] x[i][c] for rows r in [r0, r1) and all n activation rows.
// bcq_gemv (needs BCQ::lut) works on blocks of 16 rows [rb0, rb1) and adds to y (zeroed by the caller).
typedef void (*bcq_gemv_fn)(const BCQ&, const float* x, int n, int xs, float* y, int ys, int rb0, int rb1);
typedef void (*km_gemv_fn)(const KMeans&, const float* x, int n, int xs, float* y, int ys, int r0, int r1);
// w[r - r0][c - c0] = dequantized W[r][c] for r in [r0, r1), c in [c0, c1) (c0, c1 multiples of 16,
// c1 <= cols rounded up to 16); columns >= cols are finite (zero x pads them). Row stride ws.
typedef void (*bcq_deq_fn)(const BCQ&, int r0, int r1, int c0, int c1, float* w, int ws);
typedef void (*km_deq_fn)(const KMeans&, int r0, int r1, int c0, int c1, float* w, int ws);
// LUT-GEMM over one block of 8-column chunks [c0, c1): lut [n][c1 - c0][256] holds the signed sums of
// each chunk; y[i][r] += the block's contribution. Used by the scalar and AVX2 paths.
typedef void (*bcq_lut_fn)(const BCQ&, const float* lut, int n, int c0, int c1, float* y, int ys, int r0, int r1);
typedef void (*lut_build_fn)(const float* x, int n, int xs, int c0, int c1, float* lut);

struct Kernels {
  const char* name;
  bcq_gemv_fn bcq_gemv;  // direct kernel (AVX-512), or null: use bcq_lut
  bcq_lut_fn bcq_lut;
  lut_build_fn lut_build;
  bcq_deq_fn bcq_deq;
  km_gemv_fn km_gemv;
  km_deq_fn km_deq;
  int bcq_group_align;  // bcq_gemv / bcq_lut need (cols / groups) % this == 0 when groups > 1
  int km_max_bits;      // km_gemv / km_deq handle bits <= this; others use the scalar kernels
};

// for_row_blocks<MAX>(n, f) calls f(Rows<K>(), i) for the activation rows [i, i + K) of n: blocks of MAX
// rows, then one block of the n % MAX left (kernels templated on their row count K). Internal linkage:
// each ISA unit instantiates its own (no shared template code across ISAs, see above).
template <int K>
struct Rows {
  static constexpr int value = K;
};
template <int K, typename F>
static inline void rows_left(int left, int i, F& f) {
  if constexpr (K > 0) {
    if (left == K) f(Rows<K>(), i);
    else rows_left<K - 1>(left, i, f);
  }
}
template <int MAX, typename F>
static inline void for_row_blocks(int n, F&& f) {
  int i = 0;
  for (; i + MAX <= n; i += MAX) f(Rows<MAX>(), i);
  rows_left<MAX - 1>(n - i, i, f);
}

extern const Kernels scalar_kernels;
#if defined(__x86_64__) || defined(_M_X64)
extern const Kernels avx2_kernels;
extern const Kernels avx512_kernels;
#endif

}  // namespace qk
