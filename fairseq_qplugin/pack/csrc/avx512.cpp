// AVX-512 kernels (x86-64 only; chosen at run time on CPUs with AVX-512 F/BW/DQ/VL, see ops.cpp).
//
// BCQ, few activation rows: a lookup-table GEMM whose tables fit a register (bcq_lut_rows below).
// k-means: 16 codes (bits <= 4) are spread to 16 lanes with shifts and looked up in the codebook
// held in one register (vpermps); the optional pruning mask is a mask register.
#include <cstring>
#include <immintrin.h>

#include "qkernels.h"

#if defined(__x86_64__) || defined(_M_X64)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi,bmi2")
namespace qk {
namespace avx512 {

static inline int imin(int a, int b) { return a < b ? a : b; }

// 16 bits of a packed bit row from column 16 b (a row of nbytes bytes; the last block may have 1).
// kmovw from memory is a load-port uop; from a general register it would compete with the FMAs.
static inline __mmask16 bits16(const uint8_t* p, int b, int nbytes) {
  if (2 * b + 2 <= nbytes) return _load_mask16((__mmask16*)(p + 2 * b));
  return (__mmask16)p[2 * b];
}

// Lookup tables of activation rows j < N over the 32-column chunks [c0, c1) (x zero-padded to xs
// columns, xs a multiple of 16): tab[((j * (c1 - c0) + c - c0) * 8 + t) * 16 + m] = the sum of x_j
// over the columns 32 c + 4 t + i whose bit i of m is set. bsum[j] = the sum of x_j over the chunks.
template <int N>
static inline void lut_tables(const float* x, int xs, int c0, int c1, float* tab, float* bsum) {
  // Entry m of a 4-column table = x0 [m & 1] + x1 [m & 2] + x2 [m & 4] + x3 [m & 8].
  const __mmask16 m0 = 0xAAAA, m1 = 0xCCCC, m2 = 0xF0F0, m3 = 0xFF00;
  for (int j = 0; j < N; ++j) {
    const float* xj = x + (int64_t)j * xs;
    __m512 s = _mm512_setzero_ps();
    for (int c = c0; c < c1; ++c) {
      for (int t = 0; t < 8; ++t) {
        const int col = 32 * c + 4 * t;  // xs is a multiple of 16: a 4-column group is all in or all out
        __m512 v = _mm512_setzero_ps();
        if (col < xs) {
          v = _mm512_mask_add_ps(v, m0, v, _mm512_set1_ps(xj[col]));
          v = _mm512_mask_add_ps(v, m1, v, _mm512_set1_ps(xj[col + 1]));
          v = _mm512_mask_add_ps(v, m2, v, _mm512_set1_ps(xj[col + 2]));
          v = _mm512_mask_add_ps(v, m3, v, _mm512_set1_ps(xj[col + 3]));
        }
        s = _mm512_add_ps(s, v);
        _mm512_store_ps(tab + (((int64_t)j * (c1 - c0) + c - c0) * 8 + t) * 16, v);
      }
    }
    bsum[j] = _mm512_reduce_add_ps(s) / 8.f;  // each column is in 8 of a table's 16 entries
  }
}

// BCQ, few activation rows, on the re-laid-out planes (qkernels.h, BCQ::lut): one 16-entry table
// per 4 columns (the signed-sum tables of LUT-GEMM, small enough for one register), and 16 weight
// rows' 4-bit indices into it side by side in one vector, so one vpermps looks up 16 rows x 4
// columns of a bit-plane (64 weights). The dword of each row holds 8 such indices (32 columns):
// shift, look up, add. Exact fp32 sums (no quantized tables); tables are built per block of
// columns small enough to stay in L1 (32 KiB for all N activation rows).
// y[j][r] += sum_k alpha_k[r] * (2 * sum_{bit set} x_j - sum x_j), for row blocks [rb0, rb1).
template <int N>
static void bcq_lut_rows(const BCQ& w, const float* x, int xs, float* y, int ys, int rb0, int rb1) {
  constexpr int ACC = N == 1 ? 4 : 2;  // independent sums per activation row (add latency)
  constexpr int CB = 64 / N;           // chunks per table block: N * CB * 8 tables of 64 B = 32 KiB
  alignas(64) float tab[N * CB * 128];
  float bsum[N];
  const int nrb = (w.rows + 15) / 16;
  const int cpg = w.groups == 1 ? w.chunks : (w.cols / w.groups) / 32;  // chunks per alpha group
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (int g = 0; g < w.groups; ++g) {
    const int gend = g + 1 == w.groups ? w.chunks : (g + 1) * cpg;
    for (int c0 = g * cpg; c0 < gend; c0 += CB) {
      const int c1 = imin(gend, c0 + CB), nc = c1 - c0;
      lut_tables<N>(x, xs, c0, c1, tab, bsum);
      for (int rb = rb0; rb < rb1; ++rb) {
        const int r = 16 * rb;
        const __mmask16 live = (__mmask16)(r + 16 <= w.rows ? 0xFFFF : (1u << (w.rows - r)) - 1);
        __m512 out[N];
        for (int j = 0; j < N; ++j) out[j] = _mm512_setzero_ps();
        for (int k = 0; k < w.q; ++k) {
          __m512 acc[N][ACC];
          for (int j = 0; j < N; ++j)
            for (int a = 0; a < ACC; ++a) acc[j][a] = _mm512_setzero_ps();
          const uint32_t* p = w.lut + (((int64_t)k * nrb + rb) * w.chunks + c0) * 16;
          for (int c = 0; c < nc; ++c) {
            const __m512i v = _mm512_load_si512(p + 16 * c);
            const float* tc = tab + (int64_t)c * 128;
#pragma GCC unroll 8
            for (int t = 0; t < 8; ++t) {
              const __m512i idx = t ? _mm512_srli_epi32(v, 4 * t) : v;  // vpermps reads bits 0-3
#pragma GCC unroll 4
              for (int j = 0; j < N; ++j)
                acc[j][t % ACC] = _mm512_add_ps(
                    acc[j][t % ACC], _mm512_permutexvar_ps(idx, _mm512_load_ps(tc + (int64_t)j * nc * 128 + 16 * t)));
            }
          }
          const __m512 a = w.alpha_shared ? _mm512_set1_ps(*w.a(k, 0, g))
                                          : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                                                     _mm512_mullo_epi32(lane, _mm512_set1_epi32(w.groups)),
                                                                     w.a(k, r, g), 4);
          for (int j = 0; j < N; ++j) {
            __m512 s = acc[j][0];
            for (int b = 1; b < ACC; ++b) s = _mm512_add_ps(s, acc[j][b]);
            out[j] = _mm512_fmadd_ps(a, _mm512_sub_ps(_mm512_add_ps(s, s), _mm512_set1_ps(bsum[j])), out[j]);
          }
        }
        for (int j = 0; j < N; ++j) {
          float* yj = y + (int64_t)j * ys + r;
          _mm512_mask_storeu_ps(yj, live, _mm512_add_ps(_mm512_maskz_loadu_ps(live, yj), out[j]));
        }
      }
    }
  }
}

// y [n, ys] += x @ W^T for the weight rows of row blocks [rb0, rb1) (16 rows each).
static void bcq_gemv(const BCQ& w, const float* x, int n, int xs, float* y, int ys, int rb0, int rb1) {
  for_row_blocks<4>(n, [&](auto R, int i) {
    bcq_lut_rows<decltype(R)::value>(w, x + (int64_t)i * xs, xs, y + (int64_t)i * ys, ys, rb0, rb1);
  });
}

// Dequantize blocks [b0, b1) of row r, alpha group g: Q planes known at compile time (0 = w.q).
template <int Q>
static inline void bcq_deq_blocks(const BCQ& w, const uint8_t* const* p, int r, int g, int b0, int b1, float* o) {
  const int q = Q ? Q : w.q;
  __m512 a[8], na[8];
  for (int k = 0; k < q; ++k) {
    a[k] = _mm512_set1_ps(*w.a(k, r, g));
    na[k] = _mm512_sub_ps(_mm512_setzero_ps(), a[k]);
  }
  const int bfull = imin(b1, w.nbytes / 2);
  int b = b0;
  for (; b < bfull; ++b) {
    __m512 v = _mm512_mask_blend_ps(_load_mask16((__mmask16*)(p[0] + 2 * b)), na[0], a[0]);
#pragma GCC unroll 8
    for (int k = 1; k < q; ++k)
      v = _mm512_add_ps(v, _mm512_mask_blend_ps(_load_mask16((__mmask16*)(p[k] + 2 * b)), na[k], a[k]));
    _mm512_storeu_ps(o + 16 * b, v);
  }
  for (; b < b1; ++b) {
    __m512 v = _mm512_mask_blend_ps(bits16(p[0], b, w.nbytes), na[0], a[0]);
    for (int k = 1; k < q; ++k) v = _mm512_add_ps(v, _mm512_mask_blend_ps(bits16(p[k], b, w.nbytes), na[k], a[k]));
    _mm512_storeu_ps(o + 16 * b, v);
  }
}

template <int Q>
static void bcq_deq_q(const BCQ& w, int r0, int r1, int c0, int c1, float* out, int ws) {
  const int nblk = (w.cols + 15) / 16, bb0 = c0 / 16, bb1 = c1 / 16;
  const int bpg = w.groups == 1 ? nblk : (w.cols / w.groups) / 16;
  for (int r = r0; r < r1; ++r) {
    float* o = out + (int64_t)(r - r0) * ws - c0;
    const uint8_t* p[8];
    for (int k = 0; k < w.q; ++k) p[k] = w.planes + ((int64_t)k * w.rows + r) * w.nbytes;
    for (int g = bb0 / bpg; g < w.groups && g * bpg < bb1; ++g) {
      const int b1 = imin(bb1, g + 1 == w.groups ? nblk : (g + 1) * bpg);
      bcq_deq_blocks<Q>(w, p, r, g, g * bpg > bb0 ? g * bpg : bb0, b1, o);
    }
  }
}

static void bcq_deq(const BCQ& w, int r0, int r1, int c0, int c1, float* out, int ws) {
  switch (w.q) {
    case 1: bcq_deq_q<1>(w, r0, r1, c0, c1, out, ws); break;
    case 2: bcq_deq_q<2>(w, r0, r1, c0, c1, out, ws); break;
    case 3: bcq_deq_q<3>(w, r0, r1, c0, c1, out, ws); break;
    case 4: bcq_deq_q<4>(w, r0, r1, c0, c1, out, ws); break;
    default: bcq_deq_q<0>(w, r0, r1, c0, c1, out, ws); break;
  }
}

// The 16 codes of BITS <= 4 bits for columns [16 b, 16 b + 16) of a packed row (2 BITS bytes from
// byte 2 BITS b), as int32 lanes; `tail`: the row ends inside those bytes.
template <int BITS>
static inline __m512i codes16(const uint8_t* p, int b, bool tail, int rowbytes) {
  const int o = 2 * BITS * b;
  uint64_t u = 0;
  std::memcpy(&u, p + o, tail ? rowbytes - o : 2 * BITS);
  if (BITS == 4) {  // 8 bytes -> 16 nibbles: interleave each byte with itself shifted right by 4
    const __m128i v = _mm_cvtsi64_si128((long long)u);
    return _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(v, _mm_srli_epi16(v, 4)));  // vpermps reads bits 0-3
  }
  if (BITS <= 2) {  // 16 codes in 32 bits: variable shifts of one broadcast dword
    const __m512i sh = _mm512_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS,
                                         8 * BITS, 9 * BITS, 10 * BITS, 11 * BITS, 12 * BITS, 13 * BITS,
                                         14 * BITS, 15 * BITS);
    return _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32((int)u), sh), _mm512_set1_epi32((1 << BITS) - 1));
  }
  const __m512i v = _mm512_set1_epi64((long long)u);  // 3 bits: 48 bits, two halves of 8 qword lanes
  const __m256i lo = _mm512_cvtepi64_epi32(_mm512_srlv_epi64(v, _mm512_setr_epi64(0, 3, 6, 9, 12, 15, 18, 21)));
  const __m256i hi = _mm512_cvtepi64_epi32(_mm512_srlv_epi64(v, _mm512_setr_epi64(24, 27, 30, 33, 36, 39, 42, 45)));
  return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi32(7));
}

static inline __m512 km_codebook(const KMeans& w, int r) {
  return _mm512_maskz_loadu_ps((__mmask16)((1u << (1 << w.bits)) - 1), w.cb(r));
}

// The 16 weights of block b of a row: codebook lookup, then the pruning mask.
template <int BITS>
static inline __m512 km_weights(const KMeans& w, const uint8_t* p, const uint8_t* mk, int b, bool tail, __m512 cb) {
  __m512 v = _mm512_permutexvar_ps(codes16<BITS>(p, b, tail, w.rowbytes), cb);
  if (mk) v = _mm512_maskz_mov_ps(bits16(mk, b, w.maskbytes), v);
  return v;
}

template <int BITS, int R, int N>
static void km_tile(const KMeans& w, const float* x, int xs, float* y, int ys, int r) {
  __m512 acc[R][N], cb[R];
  const uint8_t* p[R];
  const uint8_t* mk[R];
  for (int i = 0; i < R; ++i) {
    cb[i] = km_codebook(w, r + i);
    p[i] = w.indices + (int64_t)(r + i) * w.rowbytes;
    mk[i] = w.mask ? w.mask + (int64_t)(r + i) * w.maskbytes : nullptr;
    for (int j = 0; j < N; ++j) acc[i][j] = _mm512_setzero_ps();
  }
  const int nblk = xs / 16, bfull = imin(nblk, w.rowbytes / (2 * BITS));
  for (int b = 0; b < nblk; ++b) {
    const bool tail = b >= bfull;
    __m512 xv[N];
#pragma GCC unroll 4
    for (int j = 0; j < N; ++j) xv[j] = _mm512_loadu_ps(x + (int64_t)j * xs + 16 * b);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) {
      const __m512 v = km_weights<BITS>(w, p[i], mk[i], b, tail, cb[i]);
#pragma GCC unroll 4
      for (int j = 0; j < N; ++j) acc[i][j] = _mm512_fmadd_ps(v, xv[j], acc[i][j]);
    }
  }
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < N; ++j) y[(int64_t)j * ys + r + i] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int BITS, int N>
static void km_rows(const KMeans& w, const float* x, int xs, float* y, int ys, int r0, int r1) {
  int r = r0;
  for (; r + 4 <= r1; r += 4) km_tile<BITS, 4, N>(w, x, xs, y, ys, r);
  for (; r < r1; ++r) km_tile<BITS, 1, N>(w, x, xs, y, ys, r);
}

template <int BITS>
static void km_gemv_bits(const KMeans& w, const float* x, int n, int xs, float* y, int ys, int r0, int r1) {
  for_row_blocks<4>(n, [&](auto R, int i) {
    km_rows<BITS, decltype(R)::value>(w, x + (int64_t)i * xs, xs, y + (int64_t)i * ys, ys, r0, r1);
  });
}

static void km_gemv(const KMeans& w, const float* x, int n, int xs, float* y, int ys, int r0, int r1) {
  switch (w.bits) {
    case 1: km_gemv_bits<1>(w, x, n, xs, y, ys, r0, r1); break;
    case 2: km_gemv_bits<2>(w, x, n, xs, y, ys, r0, r1); break;
    case 3: km_gemv_bits<3>(w, x, n, xs, y, ys, r0, r1); break;
    default: km_gemv_bits<4>(w, x, n, xs, y, ys, r0, r1); break;
  }
}

template <int BITS>
static void km_deq_bits(const KMeans& w, int r0, int r1, int c0, int c1, float* out, int ws) {
  const int nblk = c1 / 16, bfull = imin(nblk, w.rowbytes / (2 * BITS));
  for (int r = r0; r < r1; ++r) {
    const __m512 cb = km_codebook(w, r);
    const uint8_t* p = w.indices + (int64_t)r * w.rowbytes;
    const uint8_t* mk = w.mask ? w.mask + (int64_t)r * w.maskbytes : nullptr;
    float* o = out + (int64_t)(r - r0) * ws - c0;
    for (int b = c0 / 16; b < nblk; ++b) _mm512_storeu_ps(o + 16 * b, km_weights<BITS>(w, p, mk, b, b >= bfull, cb));
  }
}

static void km_deq(const KMeans& w, int r0, int r1, int c0, int c1, float* out, int ws) {
  switch (w.bits) {
    case 1: km_deq_bits<1>(w, r0, r1, c0, c1, out, ws); break;
    case 2: km_deq_bits<2>(w, r0, r1, c0, c1, out, ws); break;
    case 3: km_deq_bits<3>(w, r0, r1, c0, c1, out, ws); break;
    default: km_deq_bits<4>(w, r0, r1, c0, c1, out, ws); break;
  }
}

}  // namespace avx512

const Kernels avx512_kernels = {"avx512", avx512::bcq_gemv, nullptr, nullptr, avx512::bcq_deq,
                                avx512::km_gemv, avx512::km_deq, 32, 4};
}  // namespace qk
#pragma GCC pop_options
#endif
