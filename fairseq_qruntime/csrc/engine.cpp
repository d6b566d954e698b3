// fairseq-qruntime: a torch-free translation engine for exported packed fairseq transformers.
//
// Plain C++ (no Python or torch headers), built as a shared library and called through the C ABI at
// the end of this file (fairseq_qruntime/engine.py binds it with ctypes, which releases the GIL).
// The packed-weight kernels are the project's own (fairseq_qplugin/pack/csrc: scalar.cpp, avx2.cpp,
// avx512.cpp, linked into this library); the set is chosen at run time from the CPU. Products over many
// activation rows (dequantized tiles of packed weights, dense fp32 weights) run a packed-panel GEMM with
// register-tiled AVX-512 / AVX2 / portable micro-kernels of the same ISA; with Model::lut_int16 (the default
// where AVX-512 VBMI + VNNI run) BCQ products run in int16 instead (lookup tables for few rows, an int16
// GEMM for many; docs/runtime.md states their error bound); other fp32 loops are compiled for AVX-512 /
// AVX2 / baseline and chosen at run time (GCC target_clones); no BLAS.
//
// Semantics are fairseq's transformer (TransformerEncoder/Decoder, MultiheadAttention) and its
// SequenceGenerator + BeamSearch, step by step (see docs/runtime.md):
//   - embeddings: embed_scale * E[token] + positions[padding_idx + 1 + j] (sinusoidal or learned),
//     optional layernorm_embedding; post-norm (default) or pre-norm layers, final layer norm with
//     pre-norm; q = (x Wq^T + bq) * head_dim^-0.5 / temperature; fp32 softmax;
//   - decoding: incremental, self-attention keys/values in a cache that grows by 16-step chunks and is
//     never copied: beam reordering only rewrites each hypothesis' ancestry (a row index per step);
//     cross-attention keys/values computed once per sentence (not per beam);
//   - search: fairseq's candidate selection (2 * beam candidates, EOS candidates among the first
//     beam finalize, cands_to_ignore), length penalty, min length, max length a * src_len + b capped
//     at max_target_positions - 1, nbest, sentence pruning. Beam 1 is greedy decoding.
// All state of one call lives in its own workspace: one model may serve several threads at once.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include <chrono>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif
#include <atomic>
#include <ctime>

#include "qkernels.h"

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define QR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define QR_CLONES
#endif

namespace qr {

using qk::BCQ;
using qk::Kernels;
using qk::KMeans;

struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename... A>
[[noreturn]] void fail(A... parts) {
  std::ostringstream s;
  (s << ... << parts);
  throw Error(s.str());
}

static inline int64_t round16(int64_t c) { return (c + 15) / 16 * 16; }
// The mask of 16-lane vector lanes [0, left) (all when left >= 16, none when left <= 0).
static inline uint16_t mask16(int left) { return left >= 16 ? 0xFFFF : left <= 0 ? 0 : (uint16_t)((1u << left) - 1); }

// ---------------------------------------------------------------------------------------------
// Profile: with QRUNTIME_PROFILE=1 each call of qr_translate prints to stderr the CPU time of the calling
// thread spent in each part (summed over the calls made so far; other threads of a product are not
// counted: profile with threads=1). CPU time, not wall time, so that a busy machine does not skew it.
enum Prof { P_EMBED, P_GEMV, P_GEMM, P_DEQ, P_DENSE, P_SELF_ATTN, P_CROSS_ATTN, P_NORM_ACT, P_SOFTMAX, P_SEARCH, P_ENCODE, P_N };
static const char* kProfNames[P_N] = {"embed", "packed small-rows", "packed many-rows", "(of which dequantize)", "dense fp32", "self-attention",
                                      "cross-attention", "norm/act/residual", "log-softmax", "search", "encoder (all)"};
static std::atomic<int64_t> g_prof[P_N];
static std::atomic<int64_t> g_gemm_flop;  // floating-point operations of the many-rows packed products
static const bool g_prof_on = [] {
  const char* v = std::getenv("QRUNTIME_PROFILE");
  return v && *v && std::string(v) != "0";
}();
static int64_t thread_ns() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}
struct Timer {
  int what;
  int64_t t0 = 0;
  explicit Timer(int w) : what(w) {
    if (g_prof_on) t0 = thread_ns();
  }
  void stop() {
    if (g_prof_on && what >= 0) g_prof[what] += thread_ns() - t0;
    what = -1;
  }
  ~Timer() { stop(); }
};
static void prof_report() {
  if (!g_prof_on) return;
  std::fprintf(stderr, "qruntime profile (s):");
  for (int i = 0; i < P_N; ++i) std::fprintf(stderr, " %s %.3f;", kProfNames[i], g_prof[i].load() * 1e-9);
  std::fprintf(stderr, " packed many-rows GFLOP %.2f\n", g_gemm_flop.load() * 1e-9);
}

// ---------------------------------------------------------------------------------------------
// Kernel choice (the same rule as the torch binding pack/csrc/ops.cpp): best ISA the CPU runs,
// or $QRUNTIME_ISA (avx512 / avx2 / scalar).
static const Kernels* pick_kernels() {
  std::vector<const Kernels*> ok;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2"))
    ok.push_back(&qk::avx512_kernels);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) ok.push_back(&qk::avx2_kernels);
#endif
  ok.push_back(&qk::scalar_kernels);
  const char* want = std::getenv("QRUNTIME_ISA");
  if (want && *want) {
    for (const Kernels* k : ok)
      if (std::string(want) == k->name) return k;
    fail("QRUNTIME_ISA=", want, " is not available on this CPU (best: ", ok.front()->name, ")");
  }
  return ok.front();
}

static const Kernels* generic_of(const Kernels* k) {
#if defined(__x86_64__) || defined(_M_X64)
  if (k == &qk::avx512_kernels) return &qk::avx2_kernels;
#endif
  return k;
}

// Activation rows up to which the direct kernels beat dequantize-tile + GEMM (ops.cpp's values; with the
// packed-panel GEMM below, 16 and 40 were measured slower / no faster than 24 for BCQ 3-bit at beam 5), and
// those up to which the int16 tables beat the int16 GEMM (BCQ 3-bit, 512x512 / 2048x512 / 512x2048: equal
// at about 96 rows).
constexpr int kBcqSmallMaxLut16 = 96;
constexpr int kBcqSmallMaxDirect = 24, kBcqSmallMaxLut = 2, kKmSmallMaxAvx512 = 24, kKmSmallMaxGeneric = 1;
constexpr int kLutChunks = 256;

// ---------------------------------------------------------------------------------------------
// Dense fp32 loops (compiled per ISA, chosen at run time).
// y[i][r] (+)= sum_c x[i][c] w[r][c] for r in [r0, r1), i < n.
QR_CLONES static void gemm_nt(const float* x, int n, int xs, const float* w, int ws, int cols, float* y, int ys,
                              int r0, int r1, bool acc) {
  int r = r0;
  for (; r + 4 <= r1; r += 4) {
    const float *w0 = w + (int64_t)r * ws, *w1 = w0 + ws, *w2 = w1 + ws, *w3 = w2 + ws;
    for (int i = 0; i < n; ++i) {
      const float* xi = x + (int64_t)i * xs;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
      for (int c = 0; c < cols; ++c) {
        s0 += xi[c] * w0[c];
        s1 += xi[c] * w1[c];
        s2 += xi[c] * w2[c];
        s3 += xi[c] * w3[c];
      }
      float* yi = y + (int64_t)i * ys + r;
      if (acc) {
        yi[0] += s0; yi[1] += s1; yi[2] += s2; yi[3] += s3;
      } else {
        yi[0] = s0; yi[1] = s1; yi[2] = s2; yi[3] = s3;
      }
    }
  }
  for (; r < r1; ++r) {
    const float* wr = w + (int64_t)r * ws;
    for (int i = 0; i < n; ++i) {
      const float* xi = x + (int64_t)i * xs;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int c = 0; c < cols; ++c) s += xi[c] * wr[c];
      float* yi = y + (int64_t)i * ys + r;
      *yi = acc ? *yi + s : s;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Blocked fp32 GEMM for many activation rows: y [n, r0 + j] (+)= sum_k x[i][k] P[k][j] with a tile of
// weight rows packed as panels P [kc][NR] (transposed, zero past the tile). Register-tiled micro-kernels
// (AVX-512: 8 rows x 32 outputs, AVX2+FMA: 6 x 16, portable: 4 x 16) keep the outputs in registers
// over the whole k loop. The ISA is the packed kernels' (Model::K), so QRUNTIME_ISA forces both.
enum GemmIsa { G_PORTABLE = 0, G_AVX2 = 1, G_AVX512 = 2 };
static inline int gemm_nr(int isa) { return isa == G_AVX512 ? 32 : 16; }

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
template <int MR>
__attribute__((target("avx512f"))) static inline void mk512(const float* x, int64_t xs, const float* P, int kc, float* y,
                                                            int64_t ys, __mmask16 m0, __mmask16 m1, bool acc) {
  __m512 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm512_setzero_ps();
  for (int k = 0; k < kc; ++k) {
    const __m512 b0 = _mm512_loadu_ps(P + (int64_t)k * 32), b1 = _mm512_loadu_ps(P + (int64_t)k * 32 + 16);
    for (int i = 0; i < MR; ++i) {
      const __m512 a = _mm512_set1_ps(x[i * xs + k]);
      c0[i] = _mm512_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm512_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* yi = y + i * ys;
    if (acc) {
      c0[i] = _mm512_add_ps(c0[i], _mm512_maskz_loadu_ps(m0, yi));
      c1[i] = _mm512_add_ps(c1[i], _mm512_maskz_loadu_ps(m1, yi + 16));
    }
    _mm512_mask_storeu_ps(yi, m0, c0[i]);
    _mm512_mask_storeu_ps(yi + 16, m1, c1[i]);
  }
}

__attribute__((target("avx512f"))) static void panel_avx512(const float* x, int n, int64_t xs, const float* P, int kc,
                                                            float* y, int64_t ys, int nr, bool acc) {
  const __mmask16 m0 = mask16(nr), m1 = mask16(nr - 16);
  int i = 0;
  for (; i + 8 <= n; i += 8) mk512<8>(x + i * xs, xs, P, kc, y + i * ys, ys, m0, m1, acc);
  for (; i + 4 <= n; i += 4) mk512<4>(x + i * xs, xs, P, kc, y + i * ys, ys, m0, m1, acc);
  for (; i < n; ++i) mk512<1>(x + i * xs, xs, P, kc, y + i * ys, ys, m0, m1, acc);
}

template <int MR>
__attribute__((target("avx2,fma"))) static inline void mk256(const float* x, int64_t xs, const float* P, int kc, float* y,
                                                             int64_t ys, int nr, bool acc) {
  __m256 c0[MR], c1[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = _mm256_setzero_ps();
  for (int k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_loadu_ps(P + (int64_t)k * 16), b1 = _mm256_loadu_ps(P + (int64_t)k * 16 + 8);
    for (int i = 0; i < MR; ++i) {
      const __m256 a = _mm256_broadcast_ss(x + i * xs + k);
      c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
      c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* yi = y + i * ys;
    alignas(32) float t[16];
    _mm256_store_ps(t, c0[i]);
    _mm256_store_ps(t + 8, c1[i]);
    for (int j = 0; j < nr; ++j) yi[j] = acc ? yi[j] + t[j] : t[j];
  }
}

__attribute__((target("avx2,fma"))) static void panel_avx2(const float* x, int n, int64_t xs, const float* P, int kc,
                                                          float* y, int64_t ys, int nr, bool acc) {
  int i = 0;
  for (; i + 6 <= n; i += 6) mk256<6>(x + i * xs, xs, P, kc, y + i * ys, ys, nr, acc);
  for (; i + 3 <= n; i += 3) mk256<3>(x + i * xs, xs, P, kc, y + i * ys, ys, nr, acc);
  for (; i < n; ++i) mk256<1>(x + i * xs, xs, P, kc, y + i * ys, ys, nr, acc);
}

// alpha_p of the 16 rows of row block rb in group g (zero past the weight's rows).
__attribute__((target("avx512f"))) static inline __m512 alpha16(const BCQ& w, int p, int rb, int g) {
  alignas(64) float t[16];
  for (int i = 0; i < 16; ++i) t[i] = rb * 16 + i < w.rows ? *w.a(p, rb * 16 + i, g) : 0.f;
  return _mm512_load_ps(t);
}

// The GEMM panel P [kc][32] of BCQ weight rows [r, r + 32) (r a multiple of 16), columns [c0, c0 + kc),
// dequantized straight from the direct kernel's layout (w.lut: 16 rows' 32-column words side by side): each
// column of 16 rows is the sum over planes of +-alpha in plane order, the values bcq_deq writes. Zero past
// the weight's rows.
__attribute__((target("avx512f"))) static void bcq_panel_avx512(const BCQ& w, int r, int c0, int kc, float* P) {
  const int gs = w.cols / w.groups, nrb = (w.rows + 15) / 16, q = w.q;
  for (int h = 0; h < 2; ++h) {
    const int rb = r / 16 + h;
    float* Ph = P + 16 * h;
    if (rb >= nrb) {
      for (int k = 0; k < kc; ++k) _mm512_storeu_ps(Ph + (int64_t)k * 32, _mm512_setzero_ps());
      continue;
    }
    __m512 a[8], na[8];
    for (int k = 0, g = -1; k < kc;) {
      const int ch = (c0 + k) / 32, kend = std::min(kc, (ch + 1) * 32 - c0);
      __m512i wd[8];
      for (int p = 0; p < q; ++p)
        wd[p] = _mm512_load_si512(w.lut + (((int64_t)p * nrb + rb) * w.chunks + ch) * 16);
      for (; k < kend; ++k) {
        const int c = c0 + k, gc = std::min(c / gs, w.groups - 1);
        if (gc != g) {
          g = gc;
          for (int p = 0; p < q; ++p) {
            a[p] = alpha16(w, p, rb, g);
            na[p] = _mm512_sub_ps(_mm512_setzero_ps(), a[p]);
          }
        }
        const __m512i bit = _mm512_set1_epi32((int)(1u << (c & 31)));
        __m512 v = _mm512_mask_blend_ps(_mm512_test_epi32_mask(wd[0], bit), na[0], a[0]);
        for (int p = 1; p < q; ++p) v = _mm512_add_ps(v, _mm512_mask_blend_ps(_mm512_test_epi32_mask(wd[p], bit), na[p], a[p]));
        _mm512_storeu_ps(Ph + (int64_t)k * 32, v);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// BCQ, few activation rows, with int16 lookup tables (the T-MAC approach: "T-MAC: CPU Renaissance via Table
// Lookup for Low-Bit LLM Deployment on Edge", 2024; Model::lut_int16, the default where the CPU has the
// instructions; the exact fp32 tables of the kernel set (qkernels.h) elsewhere). Per 4 columns one 16-entry
// table of signed sums T[m] = sum_i (bit i of m ? +x_i : -x_i) (the +-1 weights of a bit plane: T[15 - m] =
// -T[m], so no bias term), rounded to int16 with one scale per activation row and block of kL16Chunks
// 32-column chunks: s = the block's largest sum_i |x_i| over a table / kL16Max. Two tables share a 64-byte
// register, those of columns 4t..4t+3 and 16+4t..16+4t+3 of a chunk: a chunk of 16 rows x 32 columns of a
// plane is one 64-byte word of the direct kernel's layout (w.lut, row i in dword i), whose low / high 16-bit
// halves are the two columns halves of row i; per t one vpmultishiftqb moves nibble t of each half to the
// bits 0-3 of its 16-bit lane (t > 0), a vpternlogd sets bit 4 to the half (0 low, 1 high), and one vpermw looks up
// 32 lookups (128 weights). The 4 lookups of a chunk are added in int16 (|sum| <= 4 * kL16Max < 2^15) and
// vpdpwssd adds the two halves of each row into its int32 sum (exact); per block and plane that sum goes to
// fp32 times alpha * s. Needs AVX-512 BW, VBMI (vpmultishiftqb) and VNNI (vpdpwssd).
constexpr int kL16Chunks = 8, kL16Max = 8191;
#define QR_LUT16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni")))

template <int N>
QR_LUT16 static inline void lut16_tables(const float* x, int xs, int c0, int c1, int16_t* tab, float* scale) {
  const int nc = c1 - c0, nsb = (nc + kL16Chunks - 1) / kL16Chunks;
  const __m512 s0 = _mm512_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1);
  const __m512 s1 = _mm512_setr_ps(-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1);
  const __m512 s2 = _mm512_setr_ps(-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1);
  const __m512 s3 = _mm512_setr_ps(-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1);
  for (int j = 0; j < N; ++j) {
    const float* xj = x + (int64_t)j * xs;
    for (int sb = 0; sb < nsb; ++sb) {  // scale blocks of kL16Chunks chunks from c0
      const int b0 = c0 + sb * kL16Chunks, b1 = std::min(c1, b0 + kL16Chunks);
      const int cend = std::min(32 * b1, xs);  // x is zero past xs (a multiple of 16): those tables are zero
      float mx = 0.f;
      for (int col = 32 * b0; col < cend; col += 4)
        mx = std::max(mx, std::fabs(xj[col]) + std::fabs(xj[col + 1]) + std::fabs(xj[col + 2]) + std::fabs(xj[col + 3]));
      scale[j * nsb + sb] = mx / kL16Max;
      const __m512 inv = _mm512_set1_ps(mx > 0.f ? kL16Max / mx : 0.f);
      for (int c = b0 - c0; c < b1 - c0; ++c)
        for (int h = 0; h < 2; ++h)
          for (int t = 0; t < 4; ++t) {
            const int col = 32 * (c0 + c) + 16 * h + 4 * t;
            __m256i q = _mm256_setzero_si256();
            if (col < xs) {
              __m512 v = _mm512_mul_ps(_mm512_set1_ps(xj[col]), s0);
              v = _mm512_fmadd_ps(_mm512_set1_ps(xj[col + 1]), s1, v);
              v = _mm512_fmadd_ps(_mm512_set1_ps(xj[col + 2]), s2, v);
              v = _mm512_fmadd_ps(_mm512_set1_ps(xj[col + 3]), s3, v);
              q = _mm512_cvtepi32_epi16(_mm512_cvtps_epi32(_mm512_mul_ps(v, inv)));  // |q| <= kL16Max
            }
            _mm256_store_si256((__m256i*)(tab + (((int64_t)j * nc + c) * 4 + t) * 32 + 16 * h), q);
          }
    }
  }
}

// The tables of a span of TB chunks (16 KiB for all N rows: all 2048 columns at one row) stay in L1 while
// each row block's bit planes are read in one sequential pass over the span (plus a software prefetch).
template <int N>
QR_LUT16 static void bcq_lut16_rows(const BCQ& w, const float* x, int xs, float* y, int ys, int rb0, int rb1) {
  constexpr int TB = std::max(kL16Chunks, 64 / N / kL16Chunks * kL16Chunks), NSB = TB / kL16Chunks;
  alignas(64) int16_t tab[N * TB * 128];
  float scale[N * NSB];
  const int nrb = (w.rows + 15) / 16;
  const int cpg = w.groups == 1 ? w.chunks : (w.cols / w.groups) / 32;  // chunks per alpha group
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  // vpmultishiftqb offsets of nibble t in the 4 16-bit halves of a qword (2 rows): 4t, 16 + 4t, 32 + 4t, 48 + 4t
  const __m512i sh1 = _mm512_set1_epi64(0x0034002400140004LL), sh2 = _mm512_set1_epi64(0x0038002800180008LL),
                sh3 = _mm512_set1_epi64(0x003C002C001C000CLL);
  const __m512i bit4 = _mm512_set1_epi32(0x00100010), high = _mm512_set1_epi32(0x00100000);
  const __m512i ones = _mm512_set1_epi16(1);
  for (int g = 0; g < w.groups; ++g) {
    const int gend = g + 1 == w.groups ? w.chunks : (g + 1) * cpg;
    for (int c0 = g * cpg; c0 < gend; c0 += TB) {
      const int c1 = std::min(gend, c0 + TB), nc = c1 - c0, nsb = (nc + kL16Chunks - 1) / kL16Chunks;
      lut16_tables<N>(x, xs, c0, c1, tab, scale);
      for (int rb = rb0; rb < rb1; ++rb) {
        const int r = 16 * rb;
        const __mmask16 live = mask16(w.rows - r);
        __m512 out[N];
        for (int j = 0; j < N; ++j) out[j] = _mm512_setzero_ps();
        for (int k = 0; k < w.q; ++k) {
          const __m512 al = w.alpha_shared ? _mm512_set1_ps(*w.a(k, 0, g))
                                           : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), live,
                                                                      _mm512_mullo_epi32(lane, _mm512_set1_epi32(w.groups)),
                                                                      w.a(k, r, g), 4);
          const uint32_t* p = w.lut + (((int64_t)k * nrb + rb) * w.chunks + c0) * 16;
          for (int sb = 0; sb < nsb; ++sb) {
            __m512i acc[N];  // int32: row i in lane i
            for (int j = 0; j < N; ++j) acc[j] = _mm512_setzero_si512();
            for (int c = sb * kL16Chunks; c < std::min(nc, (sb + 1) * kL16Chunks); ++c) {
              _mm_prefetch((const char*)(p + 16 * (c + 16)), _MM_HINT_T0);  // this plane's stream, 1 KiB ahead
              const __m512i v = _mm512_load_si512(p + 16 * c);  // (bits & ~bit4) | high: vpermw reads bits 0-4
              const __m512i i0 = _mm512_ternarylogic_epi32(v, bit4, high, 0xBA);
              const __m512i i1 = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(sh1, v), bit4, high, 0xBA);
              const __m512i i2 = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(sh2, v), bit4, high, 0xBA);
              const __m512i i3 = _mm512_ternarylogic_epi32(_mm512_multishift_epi64_epi8(sh3, v), bit4, high, 0xBA);
#pragma GCC unroll 8
              for (int j = 0; j < N; ++j) {
                const int16_t* tj = tab + ((int64_t)j * nc + c) * 128;
                const __m512i a = _mm512_add_epi16(_mm512_permutexvar_epi16(i0, _mm512_load_si512(tj)),
                                                   _mm512_permutexvar_epi16(i1, _mm512_load_si512(tj + 32)));
                const __m512i b = _mm512_add_epi16(_mm512_permutexvar_epi16(i2, _mm512_load_si512(tj + 64)),
                                                   _mm512_permutexvar_epi16(i3, _mm512_load_si512(tj + 96)));
                acc[j] = _mm512_dpwssd_epi32(acc[j], _mm512_add_epi16(a, b), ones);
              }
            }
            for (int j = 0; j < N; ++j)
              out[j] = _mm512_fmadd_ps(_mm512_mul_ps(al, _mm512_set1_ps(scale[j * nsb + sb])), _mm512_cvtepi32_ps(acc[j]),
                                       out[j]);
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

// y [n, ys] += x @ W^T for row blocks [rb0, rb1) with int16 tables: up to 8 activation rows per pass.
QR_LUT16 static void bcq_gemv_lut16(const BCQ& w, const float* x, int n, int xs, float* y, int ys, int rb0, int rb1) {
  qk::for_row_blocks<8>(n, [&](auto R, int i) {
    bcq_lut16_rows<decltype(R)::value>(w, x + (int64_t)i * xs, xs, y + (int64_t)i * ys, ys, rb0, rb1);
  });
}

// BCQ, many activation rows, in int16 (Model::lut_int16, as the tables above): a packed-panel GEMM with
// vpdpwssd, two int16 products per int32 lane (twice the multiply-adds of an fp32 FMA per instruction). Per
// block of kG16Cols columns, each 64-row weight panel is written in int16 (bcq_panel16: each weight the
// rounded fp32 sum of +-alpha, one scale per weight row: its largest sum of |alpha| / kG16W, >= max |w| /
// kG16W), and each activation row with one scale s = max(max |x| / 32767, sum |x| / kG16L): the int32 sum of a
// block is exact, |sum| <= sum |x / s| * kG16W < 2^31 (the rounding adds at most kG16Cols / 2 to
// sum |x / s|), and goes to fp32 times both scales.
constexpr int kG16Cols = 256, kG16W = 4095, kG16L = ((1u << 31) - 1) / kG16W - kG16Cols;

// xq [i][16 h + j]: the int16 pair (x[i][32 h + j], x[i][32 h + 16 + j]) (j < 16; columns j and 16 + j of
// 32-column chunk h, the pairing of the bit planes' 16-bit halves) rounded with sx [i][32 h / kG16Cols];
// rows of xqs pairs (16 * ceil(cols / 32)), zero past cols.
QR_LUT16 static void quant16_rows(const float* x, int n, int64_t xs, int cols, uint32_t* xq, int64_t xqs, float* sx) {
  const int nb = (cols + kG16Cols - 1) / kG16Cols;
  const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512i lo = _mm512_set1_epi32(0xFFFF), qmax = _mm512_set1_epi32(32767), qmin = _mm512_set1_epi32(-32767);
  for (int i = 0; i < n; ++i) {
    const float* xi = x + (int64_t)i * xs;
    for (int b = 0; b < nb; ++b) {
      const int c0 = b * kG16Cols, c1 = std::min<int64_t>(c0 + kG16Cols, 2 * xqs);
      __m512 mx = _mm512_setzero_ps(), sum = _mm512_setzero_ps();
      for (int c = c0; c < c1; c += 16) {
        const __m512 a = _mm512_and_ps(_mm512_maskz_loadu_ps(mask16(cols - c), xi + c), absm);
        mx = _mm512_max_ps(mx, a);
        sum = _mm512_add_ps(sum, a);
      }
      // 1.0001: room for the rounding of the float sum
      const float s = std::max(_mm512_reduce_max_ps(mx) / 32767.f, _mm512_reduce_add_ps(sum) * (1.0001f / kG16L));
      sx[(int64_t)i * nb + b] = s;
      const __m512 inv = _mm512_set1_ps(s > 0.f ? 1.f / s : 0.f);
      for (int c = c0; c < c1; c += 32) {
        __m512i q[2];
        for (int e = 0; e < 2; ++e) {
          const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask16(cols - c - 16 * e), xi + c + 16 * e), inv));
          q[e] = _mm512_max_epi32(_mm512_min_epi32(v, qmax), qmin);
        }
        const __m512i pair = _mm512_or_si512(_mm512_and_si512(q[0], lo), _mm512_slli_epi32(q[1], 16));
        _mm512_storeu_si512(xq + (int64_t)i * xqs + c / 2, pair);
      }
    }
  }
}

// The int16 panel P16 [16 * ceil(kc / 32)][16] (row stride ld) of BCQ weight rows [r, r + 16) over columns
// [c0, c0 + kc) (c0 a multiple of 32): P16 [16 h + t][j] holds the pair (w[r + j][c], w[r + j][c + 16]), c =
// c0 + 32 h + t (the pairing of quant16_rows), each round(sum over planes of +-alpha / sw [j]), sw [j] = the
// row's largest sum_p |alpha_p| over the groups of the columns / kG16W. Per row and alpha group, the 2^Q
// values (one per code m: bit p = plane p's bit) are rounded once into int16 tables; per pair of columns
// the codes of the 16 rows index them with vpermt2w (64 entries: 64 / 2^Q rows per table pair). A plane's
// 32-column word of row j, read as two 16-bit lanes, holds exactly the bits of columns t and t + 16 of
// that row at bit t: shifting it right once per step gives each step's codes. Q: bit planes (1-4).
template <int Q>
QR_LUT16 static void bcq_panel16(const BCQ& w, int r, int c0, int kc, uint32_t* P16, int ld, float* sw) {
  constexpr int E = 1 << Q, R = std::min(16, 64 / E), NP = 16 / R;  // codes per row, rows per table pair, pairs
  const int gs = w.cols / w.groups, nrb = (w.rows + 15) / 16, rb = r / 16, nch = (kc + 31) / 32;
  const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF)), zero = _mm512_setzero_ps();
  if (rb >= nrb) {
    for (int k = 0; k < 16 * nch; ++k) _mm512_store_si512(P16 + k * ld, _mm512_setzero_si512());
    _mm512_storeu_ps(sw, zero);
    return;
  }
  const int g0 = std::min(c0 / gs, w.groups - 1), g1 = std::min((c0 + kc - 1) / gs, w.groups - 1);
  __m512 mx = zero;
  for (int g = g0; g <= g1; ++g) {
    __m512 t = zero;
    for (int p = 0; p < Q; ++p) t = _mm512_add_ps(t, _mm512_and_ps(alpha16(w, p, rb, g), absm));
    mx = _mm512_max_ps(mx, t);
  }
  _mm512_storeu_ps(sw, _mm512_div_ps(mx, _mm512_set1_ps((float)kG16W)));
  const __m512 inv = _mm512_maskz_div_ps(_mm512_cmp_ps_mask(mx, zero, _CMP_GT_OQ), _mm512_set1_ps((float)kG16W), mx);
  alignas(64) int16_t tab[NP * 64] = {};
  alignas(64) int16_t basev[32];  // lane 2j and 2j + 1: row j's first entry in its table pair
  for (int l = 0; l < 32; ++l) basev[l] = (int16_t)((l / 2 % R) * E);
  const __m512i base = _mm512_load_si512(basev);
  __mmask32 lanes[NP];  // the lanes of the rows of table pair t
  for (int t = 0; t < NP; ++t) lanes[t] = (__mmask32)((((uint64_t)1 << 2 * R) - 1) << 2 * R * t);
  __m512i T[NP][2];
  for (int h = 0, g = -1; h < nch; ++h) {  // one 32-column chunk of the planes
    const int gc = std::min((c0 + 32 * h) / gs, w.groups - 1);
    if (gc != g) {  // the tables of group gc
      g = gc;
      __m512 a[Q];
      for (int p = 0; p < Q; ++p) a[p] = _mm512_mul_ps(alpha16(w, p, rb, g), inv);
      for (int m = 0; m < E; ++m) {
        __m512 v = zero;
        for (int p = 0; p < Q; ++p) v = _mm512_add_ps(v, m >> p & 1 ? a[p] : _mm512_sub_ps(zero, a[p]));
        alignas(64) int32_t q[16];
        _mm512_store_si512(q, _mm512_cvtps_epi32(v));
        for (int j = 0; j < 16; ++j) tab[j / R * 64 + j % R * E + m] = (int16_t)q[j];
      }
      for (int t = 0; t < NP; ++t) {
        T[t][0] = _mm512_load_si512(tab + 64 * t);
        T[t][1] = _mm512_load_si512(tab + 64 * t + 32);
      }
    }
    __m512i s[Q];  // plane p's words, shifted right once per step: bit 0 of each 16-bit lane is column t's
    for (int p = 0; p < Q; ++p) s[p] = _mm512_load_si512(w.lut + (((int64_t)p * nrb + rb) * w.chunks + (c0 + 32 * h) / 32) * 16);
    for (int t = 0; t < 16; ++t) {
      __m512i idx = s[0];  // bit p: plane p's bit (bit-select: low bits from idx, the rest from plane p << p)
      for (int p = 1; p < Q; ++p)
        idx = _mm512_ternarylogic_epi32(_mm512_set1_epi16((1 << p) - 1), idx, _mm512_slli_epi16(s[p], p), 0xCA);
      idx = _mm512_ternarylogic_epi32(_mm512_set1_epi16(E - 1), idx, base, 0xCA);  // code | row offset
      __m512i v = _mm512_permutex2var_epi16(T[0][0], idx, T[0][1]);
      for (int u = 1; u < NP; ++u)
        v = _mm512_mask_blend_epi16(lanes[u], v, _mm512_permutex2var_epi16(T[u][0], idx, T[u][1]));
      _mm512_store_si512(P16 + (16 * h + t) * ld, v);
      for (int p = 0; p < Q; ++p) s[p] = _mm512_srli_epi16(s[p], 1);
    }
  }
}

// y [i][j] (+)= sx_i sw_j sum_k xq[i][k] . P16[k][j] for MR <= 4 rows and the panel's 64 outputs (masks m):
// 16 int32 accumulators, which GCC keeps in registers (tiles of 24, 6 x 64 or 12 x 32, it spilled).
template <int MR>
QR_LUT16 static inline void mk16(const uint32_t* xq, int64_t xqs, const float* sx, int64_t sxs, const uint32_t* P16, int kp,
                                 const float* sw, float* y, int64_t ys, const __mmask16* m, bool acc) {
  __m512i c0[MR], c1[MR], c2[MR], c3[MR];
  for (int i = 0; i < MR; ++i) c0[i] = c1[i] = c2[i] = c3[i] = _mm512_setzero_si512();
  for (int k = 0; k < kp; ++k) {
    const __m512i b0 = _mm512_load_si512(P16 + k * 64), b1 = _mm512_load_si512(P16 + k * 64 + 16);
    const __m512i b2 = _mm512_load_si512(P16 + k * 64 + 32), b3 = _mm512_load_si512(P16 + k * 64 + 48);
    for (int i = 0; i < MR; ++i) {
      const __m512i a = _mm512_set1_epi32((int)xq[i * xqs + k]);
      c0[i] = _mm512_dpwssd_epi32(c0[i], a, b0);
      c1[i] = _mm512_dpwssd_epi32(c1[i], a, b1);
      c2[i] = _mm512_dpwssd_epi32(c2[i], a, b2);
      c3[i] = _mm512_dpwssd_epi32(c3[i], a, b3);
    }
  }
  for (int i = 0; i < MR; ++i) {
    const __m512 s = _mm512_set1_ps(sx[i * sxs]);
    float* yi = y + i * ys;
    const __m512i ci[4] = {c0[i], c1[i], c2[i], c3[i]};
    for (int t = 0; t < 4; ++t) {
      __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(ci[t]), _mm512_mul_ps(s, _mm512_loadu_ps(sw + 16 * t)));
      if (acc) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(m[t], yi + 16 * t));
      _mm512_mask_storeu_ps(yi + 16 * t, m[t], f);
    }
  }
}

// y [n, rows] = x W^T for the weight rows of 64-row blocks [b0, b1): per block of kG16Cols columns, the int16
// panel of the 64 rows is written once and used for all n rows (xq, sx: from quant16_rows).
QR_LUT16 static void bcq_gemm16(const BCQ& w, const uint32_t* xq, int64_t xqs, const float* sx, int n, float* y, int64_t ys,
                                int b0, int b1) {
  constexpr int NB = 4, MRMAX = 4;
  alignas(64) uint32_t P16[kG16Cols / 2 * 16 * NB];
  float sw[16 * NB];
  const int nb = (w.cols + kG16Cols - 1) / kG16Cols;
  for (int r = b0 * 16 * NB; r < std::min(w.rows, b1 * 16 * NB); r += 16 * NB) {
    __mmask16 m[NB];
    for (int t = 0; t < NB; ++t) m[t] = mask16(w.rows - r - 16 * t);
    for (int b = 0; b < nb; ++b) {
      const int c0 = b * kG16Cols, kc = std::min(kG16Cols, w.cols - c0), kp = 16 * ((kc + 31) / 32);
      {
        Timer td(P_DEQ);
        for (int t = 0; t < NB; ++t) {
          uint32_t* Pt = P16 + 16 * t;
          switch (w.q) {
            case 1: bcq_panel16<1>(w, r + 16 * t, c0, kc, Pt, 16 * NB, sw + 16 * t); break;
            case 2: bcq_panel16<2>(w, r + 16 * t, c0, kc, Pt, 16 * NB, sw + 16 * t); break;
            case 3: bcq_panel16<3>(w, r + 16 * t, c0, kc, Pt, 16 * NB, sw + 16 * t); break;
            default: bcq_panel16<4>(w, r + 16 * t, c0, kc, Pt, 16 * NB, sw + 16 * t); break;
          }
        }
      }
      const uint32_t* xb = xq + c0 / 2;
      float* yr = y + r;
      qk::for_row_blocks<MRMAX>(n, [&](auto R, int i) {
        constexpr int MR = decltype(R)::value;
        mk16<MR>(xb + i * xqs, xqs, sx + (int64_t)i * nb + b, nb, P16, kp, sw, yr + i * ys, ys, m, b > 0);
      });
    }
  }
}
#endif

static void panel_portable(const float* x, int n, int64_t xs, const float* P, int kc, float* y, int64_t ys, int nr,
                           bool acc) {
  for (int i0 = 0; i0 < n; i0 += 4) {
    const int mr = std::min(4, n - i0);
    float c[4][16] = {};
    for (int k = 0; k < kc; ++k) {
      const float* b = P + (int64_t)k * 16;
      for (int i = 0; i < mr; ++i) {
        const float a = x[(i0 + i) * xs + k];
        for (int j = 0; j < 16; ++j) c[i][j] += a * b[j];
      }
    }
    for (int i = 0; i < mr; ++i) {
      float* yi = y + (i0 + i) * ys;
      for (int j = 0; j < nr; ++j) yi[j] = acc ? yi[j] + c[i][j] : c[i][j];
    }
  }
}

// Panel P [kc][NR] = rows [p0, p0 + nr) of src (row stride ss) transposed, zero past nr.
static void pack_rows(const float* src, int64_t ss, int p0, int nr, int NR, int kc, float* P) {
  for (int j = 0; j < nr; ++j) {
    const float* wr = src + (int64_t)(p0 + j) * ss;
    for (int k = 0; k < kc; ++k) P[(int64_t)k * NR + j] = wr[k];
  }
  for (int j = nr; j < NR; ++j)
    for (int k = 0; k < kc; ++k) P[(int64_t)k * NR + j] = 0.f;
}

// y[i][j] (+)= sum_k x[i][k] w[j][k] for a tile of nrows weight rows over kc columns: pack(p0, nr, P) writes
// the panel of tile rows [p0, p0 + nr) (P: scratch for one panel, NR x kc floats), the micro-kernels use it.
template <typename Pack>
static void gemm_tile(int isa, const float* x, int n, int64_t xs, int nrows, int kc, float* P, float* y, int64_t ys,
                      bool acc, Pack pack) {
  const int NR = gemm_nr(isa);
  for (int p0 = 0; p0 < nrows; p0 += NR) {
    const int nr = std::min(NR, nrows - p0);
    pack(p0, nr, P);
    float* yp = y + p0;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    if (isa == G_AVX512) {
      panel_avx512(x, n, xs, P, kc, yp, ys, nr, acc);
      continue;
    }
    if (isa == G_AVX2) {
      panel_avx2(x, n, xs, P, kc, yp, ys, nr, acc);
      continue;
    }
#endif
    panel_portable(x, n, xs, P, kc, yp, ys, nr, acc);
  }
}

// One attention head of one query: out [hd] = sum_j softmax_j(q . k_j) v_j over n keys k_j = kp[j] + off,
// v_j = vp[j] + off (fp32 softmax as torch's); sc: scratch [n].
QR_CLONES static void attend(const float* q, const float* const* kp, const float* const* vp, int64_t off, int n, int hd,
                             float* sc, float* out) {
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) {
    const float* kj = kp[j] + off;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int c = 0; c < hd; ++c) s += q[c] * kj[c];
    sc[j] = s;
    mx = std::max(mx, s);
  }
  float sum = 0.f;
  for (int j = 0; j < n; ++j) {
    sc[j] = std::exp(sc[j] - mx);
    sum += sc[j];
  }
  const float inv = 1.f / sum;
  for (int c = 0; c < hd; ++c) out[c] = 0.f;
  for (int j = 0; j < n; ++j) {
    const float a = sc[j] * inv;
    const float* vj = vp[j] + off;
#pragma omp simd
    for (int c = 0; c < hd; ++c) out[c] += a * vj[c];
  }
}

// ---------------------------------------------------------------------------------------------
// Tensors handed over by the caller (kept alive by it), and weights.

struct Tensor {
  int dtype = 0;  // 0 fp32, 1 uint8
  std::vector<int64_t> shape;
  const void* data = nullptr;
  int64_t numel() const {
    int64_t n = 1;
    for (auto s : shape) n *= s;
    return n;
  }
  const float* f() const { return static_cast<const float*>(data); }
  const uint8_t* u() const { return static_cast<const uint8_t*>(data); }
};

struct AlignedU32 {  // 64-byte aligned uint32 buffer (the AVX-512 BCQ layout is read with aligned loads)
  uint32_t* p = nullptr;
  AlignedU32() = default;
  explicit AlignedU32(size_t n) {
    size_t bytes = (n * 4 + 63) / 64 * 64;
    p = static_cast<uint32_t*>(std::aligned_alloc(64, bytes ? bytes : 64));
    std::memset(p, 0, bytes);
  }
  AlignedU32(const AlignedU32&) = delete;
  AlignedU32& operator=(const AlignedU32&) = delete;
  ~AlignedU32() { std::free(p); }
};

// The planes as the AVX-512 direct kernel reads them (qkernels.h): lut uint32 [q, ceil(rows/16), chunks, 16].
static std::shared_ptr<AlignedU32> bcq_layout(const uint8_t* p, int q, int rows, int nbytes) {
  const int64_t nrb = (rows + 15) / 16, chunks = (nbytes + 3) / 4;
  auto out = std::make_shared<AlignedU32>((size_t)(q * nrb * chunks * 16));
  uint8_t* o = reinterpret_cast<uint8_t*>(out->p);
  for (int64_t kr = 0; kr < (int64_t)q * rows; ++kr) {
    const int64_t k = kr / rows, r = kr % rows;
    const uint8_t* src = p + kr * nbytes;
    for (int64_t c = 0; c < chunks; ++c)
      std::memcpy(o + ((((k * nrb + r / 16) * chunks + c) * 16) + r % 16) * 4, src + 4 * c,
                  std::min<int64_t>(4, nbytes - 4 * c));
  }
  return out;
}

enum Method { DENSE = 0, BCQW = 1, BCQMIX = 2, KMW = 3 };

struct BcqPart {  // one BCQ matrix (a whole weight, or one bit group of a mixed one)
  BCQ w{};
  std::shared_ptr<AlignedU32> lut;
  std::vector<int> rows;  // mixed: the weight rows this group holds
};

struct Act {  // fake-quantized activations on a fixed range: q = clamp(round(x / s) + z, 0, 2^b - 1)
  bool on = false;
  float scale = 1.f, zp = 0.f, levels = 255.f;
};

struct Weight {  // one [rows, cols] matrix in any format; shared by tied modules
  int method = DENSE, rows = 0, cols = 0;
  const float* dense = nullptr;
  std::vector<BcqPart> bcq;       // BCQW: one part; BCQMIX: one per bit count present
  std::vector<int> mix_group, mix_pos;  // BCQMIX: each row's part and index inside it
  KMeans km{};
  std::vector<float> int_codebook;  // int weights run as k-means with table (code - zp) * scale
};

struct Linear {
  std::shared_ptr<Weight> w;
  const float* bias = nullptr;
  Act act_in, act_out;
  int rows() const { return w->rows; }
  int cols() const { return w->cols; }
};

struct Norm {
  const float* g = nullptr;
  const float* b = nullptr;
  bool on() const { return g != nullptr; }
};

struct Attn {
  Linear q, k, v, o;
};

struct Layer {
  Attn self, cross;
  Norm self_ln, cross_ln, ffn_ln;
  Linear fc1, fc2;
};

struct Side {  // encoder or decoder
  int layers = 0, dim = 0, ffn = 0, heads = 0, max_pos = 0, vocab = 0;
  bool prenorm = false, learned_pos = false, positions = true;
  float embed_scale = 1.f, scaling = 1.f;
  std::shared_ptr<Weight> embed;
  const float* pos_table = nullptr;  // learned: [max_pos + pad + 1, dim]
  std::vector<float> sin_table;      // sinusoidal, fairseq's get_embedding
  Norm emb_ln, final_ln;
  std::vector<Layer> L;
  const float* pos(int idx) const {
    return learned_pos ? pos_table + (int64_t)idx * dim : sin_table.data() + (int64_t)idx * dim;
  }
};

enum ActFn { RELU = 0, GELU = 1, GELU_ACCURATE = 2, TANH = 3, LINEAR = 4 };

struct Model {
  std::map<std::string, Tensor> tensors;
  std::map<std::string, std::shared_ptr<Weight>> weights;  // by module name
  std::map<std::string, Act> acts_in, acts_out;
  std::map<std::string, double> spec;
  Side enc, dec;
  Linear out_proj;
  int pad = 1, eos = 2, unk = 3, bos = 0, activation = RELU, threads = 1;
  const Kernels* K = nullptr;
  bool ready = false;
  // With activation quantization, a value within float rounding of a rounding boundary lands one step
  // away under another fp32 summation order, and the step shows in the scores (1.5e-4 on the tests' 1-bit
  // model with the packed-panel GEMM). Such models keep the dot-product order of the parity-checked engine
  // (gemm_nt over each row, column chunks of 512) for many rows, and its attention (libm exp) and log-softmax
  // sums: their speed is that engine's.
  bool exact_order = false;
  bool weights_only = false;  // qr_model_finalize_weights: only qr_linear may use it
  bool lut_int16 = false;  // BCQ products in int16: tables for few rows, GEMM for many (spec lut_int16=1, where
                          // the CPU has them, not with activation quantization: exact_order)

  double get(const std::string& k) const {
    auto it = spec.find(k);
    if (it == spec.end()) fail("model spec has no '", k, "'");
    return it->second;
  }
  const Tensor& tensor(const std::string& name, int dtype, std::vector<int64_t> shape) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) fail("tensor ", name, " is missing");
    const Tensor& t = it->second;
    if (t.dtype != dtype) fail("tensor ", name, " has dtype ", t.dtype ? "uint8" : "fp32", ", expected ", dtype ? "uint8" : "fp32");
    if (!shape.empty() && t.shape != shape) {
      std::ostringstream a, b;
      for (auto s : t.shape) a << s << ",";
      for (auto s : shape) b << s << ",";
      fail("tensor ", name, " has shape [", a.str(), "], expected [", b.str(), "]");
    }
    return t;
  }
  const float* opt_f32(const std::string& name, int64_t n) const {
    auto it = tensors.find(name);
    if (it == tensors.end()) return nullptr;
    if (it->second.dtype != 0 || it->second.numel() != n) fail("tensor ", name, " is not fp32 of ", n, " values");
    return it->second.f();
  }
};

// ---------------------------------------------------------------------------------------------
// Building weights from tensors.

static void fill_bcq(BcqPart& part, const uint8_t* planes, const float* alpha, int q, int rows, int cols, int arows,
                     int groups) {
  const int nbytes = (cols + 7) / 8;
  part.w = BCQ{planes, alpha, q, rows, cols, nbytes, groups, arows == 1 && rows != 1, nullptr, (cols + 31) / 32};
  part.lut = bcq_layout(planes, q, rows, nbytes);
  part.w.lut = part.lut->p;
}

static std::shared_ptr<Weight> build_weight(const Model& m, const std::string& owner, const std::string& method, int bits,
                                            int rows, int cols) {
  auto w = std::make_shared<Weight>();
  w->rows = rows;
  w->cols = cols;
  const std::string p = owner + ".wq.";
  if (method == "dense") {
    w->method = DENSE;
    w->dense = m.tensor(owner + ".weight", 0, {rows, cols}).f();
  } else if (method == "bcq") {
    w->method = BCQW;
    const Tensor& pl = m.tensor(p + "planes", 1, {});
    if (pl.shape.size() != 3 || pl.shape[1] != rows || pl.shape[2] != (cols + 7) / 8)
      fail("tensor ", p, "planes does not hold a [q, ", rows, ", ", (cols + 7) / 8, "] BCQ weight");
    const int q = (int)pl.shape[0];
    const Tensor& al = m.tensor(p + "alpha", 0, {});
    if (al.shape.size() != 3 || al.shape[0] != q || (al.shape[1] != rows && al.shape[1] != 1) || cols % al.shape[2])
      fail("tensor ", p, "alpha does not fit the planes of ", owner);
    w->bcq.resize(1);
    fill_bcq(w->bcq[0], pl.u(), al.f(), q, rows, cols, (int)al.shape[1], (int)al.shape[2]);
  } else if (method == "bcq_mixed") {
    w->method = BCQMIX;
    const Tensor& rb = m.tensor(p + "row_bits", 1, {rows});
    int64_t used = 0;
    for (int r = 0; r < rows; ++r) {
      if (rb.u()[r] < 1 || rb.u()[r] > 8) fail("tensor ", p, "row_bits has a value outside 1..8");
      used += rb.u()[r];
    }
    const int nbytes = (cols + 7) / 8;
    const Tensor& pl = m.tensor(p + "planes", 1, {used, nbytes});
    const Tensor& al = m.tensor(p + "alpha", 0, {});
    if (al.shape.size() != 2 || al.shape[0] != used || cols % al.shape[1]) fail("tensor ", p, "alpha does not fit ", owner);
    const int groups = (int)al.shape[1];
    w->mix_group.assign(rows, -1);
    w->mix_pos.assign(rows, -1);
    int64_t start = 0;
    for (int k = 1; k <= 8; ++k) {
      std::vector<int> sel;
      for (int r = 0; r < rows; ++r)
        if (rb.u()[r] == k) sel.push_back(r);
      if (sel.empty()) continue;
      BcqPart part;
      fill_bcq(part, pl.u() + start * nbytes, al.f() + start * groups, k, (int)sel.size(), cols, (int)sel.size(), groups);
      for (size_t i = 0; i < sel.size(); ++i) {
        w->mix_group[sel[i]] = (int)w->bcq.size();
        w->mix_pos[sel[i]] = (int)i;
      }
      part.rows = std::move(sel);
      start += (int64_t)k * part.rows.size();
      w->bcq.push_back(std::move(part));
    }
  } else if (method == "kmeans" || method == "int") {
    w->method = KMW;
    if (bits < 1 || bits > 8) fail(owner, ": ", bits, " bits is outside 1..8");
    const int rowbytes = (cols * bits + 7) / 8;
    const uint8_t* codes;
    const float* cb;
    bool per_row;
    const uint8_t* mask = nullptr;
    if (method == "int") {
      codes = m.tensor(p + "codes", 1, {rows, rowbytes}).u();
      const Tensor& sc = m.tensor(p + "scale", 0, {});
      const Tensor& zp = m.tensor(p + "zero_point", 1, sc.shape);
      if (sc.shape.size() != 2 || sc.shape[1] != 1 || (sc.shape[0] != rows && sc.shape[0] != 1))
        fail("tensor ", p, "scale must be [", rows, " or 1, 1]");
      const int tr = (int)sc.shape[0], k = 1 << bits;
      w->int_codebook.resize((size_t)tr * k);
      for (int r = 0; r < tr; ++r)  // (code - zero_point) * scale in fp32, as IntWeight.dequantize()
        for (int c = 0; c < k; ++c) w->int_codebook[(size_t)r * k + c] = ((float)c - (float)zp.u()[r]) * sc.f()[r];
      cb = w->int_codebook.data();
      per_row = tr != 1;
    } else {
      codes = m.tensor(p + "indices", 1, {rows, rowbytes}).u();
      const Tensor& c = m.tensor(p + "codebook", 0, {});
      const int64_t k = int64_t(1) << bits;
      if (!(c.shape == std::vector<int64_t>{k} || c.shape == std::vector<int64_t>{rows, k}))
        fail("tensor ", p, "codebook does not fit ", bits, " bits and ", rows, " rows");
      cb = c.f();
      per_row = c.shape.size() == 2;
      if (m.tensors.count(p + "mask")) mask = m.tensor(p + "mask", 1, {rows, (cols + 7) / 8}).u();
    }
    w->km = KMeans{codes, cb, mask, bits, rows, cols, rowbytes, (cols + 7) / 8, per_row};
  } else {
    fail(owner, ": unknown weight format '", method, "'");
  }
  return w;
}

// ---------------------------------------------------------------------------------------------
// Products.

static inline void quantize_act(const Act& a, float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float c = std::nearbyint(x[i] / a.scale) + a.zp;  // torch.round: half to even
    c = std::min(std::max(c, 0.f), a.levels);
    x[i] = (c - a.zp) * a.scale;
  }
}

// Activation rows from which dense fp32 products use the packed-panel GEMM instead of gemm_nt.
constexpr int kGemmMinRows = 8;

static int gemm_isa(const Model& m) {
#if defined(__x86_64__) || defined(_M_X64)
  if (m.K == &qk::avx512_kernels) return G_AVX512;
  if (m.K == &qk::avx2_kernels) return G_AVX2;
#endif
  return G_PORTABLE;
}

// The threads of one call: the caller plus threads - 1 workers of the call's own pool (not OpenMP's:
// its workers spin between parallel regions, dozens per decoder step, and on a machine whose cores are
// busy the spinning holds a core the caller needs; and its caller waits at the end of each region for
// every worker, also one the system has not run yet). Here a job is cut into chunks that the threads
// claim one at a time, the caller included: the caller waits only for chunks a worker has claimed, so
// a worker that is not running leaves its share to the caller. A worker spins for kSpinUs after a job
// (the next is usually microseconds away within a decoder step), yielding its core now and then, and
// then sleeps until woken. Jobs whose estimated work is below kParMinWork multiply-adds run on the
// caller alone (waking a thread costs more than they do). Chunks write disjoint outputs: the results
// do not depend on which thread ran which chunk.
class Pool {
 public:
  explicit Pool(int workers) {
    for (int i = 0; i < workers; ++i) th_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
      state_.fetch_add(kGenOne);
    }
    wake_.notify_all();
    for (auto& t : th_) t.join();
  }
  // f(c) for every chunk c in [0, nchunks), on the calling thread and the workers.
  void run(int nchunks, const std::function<void(int)>& f) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      job_ = &f;
      nchunks_ = nchunks;
      done_.store(0, std::memory_order_relaxed);
      const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 40) + 1;
      state_.store(gen << 40 | (uint64_t)nchunks << 20, std::memory_order_release);  // next chunk 0
    }
    wake_.notify_all();
    work(state_.load(std::memory_order_acquire) >> 40);
    if (!spin([&] { return done_.load(std::memory_order_acquire) == nchunks; })) {
      std::unique_lock<std::mutex> lk(mu_);
      fin_.wait(lk, [&] { return done_.load(std::memory_order_acquire) == nchunks; });
    }
  }

 private:
  static constexpr int kSpinUs = 100;
  static constexpr uint64_t kGenOne = (uint64_t)1 << 40, kMask = (1 << 20) - 1;
  template <typename C>
  static bool spin(C ready) {  // true once ready() holds, false after about kSpinUs
    const auto end = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinUs);
    for (int i = 1;; ++i) {
      if (ready()) return true;
#if defined(__x86_64__) || defined(_M_X64)
      _mm_pause();
#endif
      if (i % 256 == 0) {
        if (std::chrono::steady_clock::now() > end) return false;
        std::this_thread::yield();
      }
    }
  }
  // Claims and runs chunks of job `gen` while it has some left. state_ = gen (24 bits) | chunks (20) |
  // next chunk (20): a claim succeeds only while the job is still `gen` (its f then stays alive until
  // the claimed chunk is done), so a late worker never touches a finished job.
  void work(uint64_t gen) {
    for (;;) {
      uint64_t s = state_.load(std::memory_order_acquire);
      if (s >> 40 != gen || (s & kMask) >= ((s >> 20) & kMask)) return;
      if (!state_.compare_exchange_weak(s, s + 1, std::memory_order_acq_rel)) continue;
      (*job_)((int)(s & kMask));
      if (done_.fetch_add(1, std::memory_order_acq_rel) + 1 == nchunks_) {
        std::lock_guard<std::mutex> lk(mu_);
        fin_.notify_one();
      }
    }
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      auto fresh = [&] { return state_.load(std::memory_order_acquire) >> 40 != seen; };
      if (!spin(fresh)) {
        std::unique_lock<std::mutex> lk(mu_);
        wake_.wait(lk, fresh);
      }
      seen = state_.load(std::memory_order_acquire) >> 40;
      if (stop_.load(std::memory_order_acquire)) return;
      work(seen);
    }
  }
  std::vector<std::thread> th_;
  std::mutex mu_;
  std::condition_variable wake_, fin_;
  std::atomic<uint64_t> state_{0};
  std::atomic<int> done_{0};
  const std::function<void(int)>* job_ = nullptr;
  int nchunks_ = 0;
  std::atomic<bool> stop_{false};
};

constexpr int64_t kParMinWork = 1 << 16;

struct Exec {
  int threads;
  std::unique_ptr<Pool> pool;
  explicit Exec(int threads_) : threads(std::max(1, threads_)) {
    if (threads > 1) pool = std::make_unique<Pool>(threads - 1);
  }
  // f(lo, hi) over [0, n) in chunks (per_thread per thread); work: the job's multiply-adds (about), -1 for
  // unknown (split).
  template <typename F>
  void par(int64_t n, F f, int64_t work = -1, int per_thread = 4) const {
    if (!pool || n <= 1 || (work >= 0 && work < kParMinWork)) {
      f((int64_t)0, n);
      return;
    }
    const int nc = (int)std::min<int64_t>(n, per_thread * threads);  // a late worker leaves little behind
    pool->run(nc, [&](int c) {
      const int64_t lo = n * c / nc, hi = n * (c + 1) / nc;
      if (lo < hi) f(lo, hi);
    });
  }
};

// y [n, rows] = x [n, xs] W^T over tiles of 64 weight rows x 256 columns (the many-rows path): deq(r0, r1,
// c0, c1, buf, ws) returns the tile's rows (dequantized into buf with stride ws, or the dense weight itself)
// as {pointer to w[r0][c0], row stride}; each tile is packed once and used for all n rows. A `panel`
// (r, c0, kc, P) instead writes the GEMM panel of weight rows [r, r + NR) itself (zero past the weight).
template <typename Deq, typename Panel = std::nullptr_t>
static void tiled(const Model& m, const Exec& ex, const float* x, int n, int xs, int cols, int rows, float* y, int ys,
                  Deq deq, Panel panel = nullptr) {
  constexpr int TR = 64, TC = 256;
  const int isa = gemm_isa(m);
  const int nblocks = (rows + TR - 1) / TR;
  if (m.exact_order) {  // each output a gemm_nt dot over column chunks of 512 (see Model::exact_order)
    const int tc = std::min(cols, 512);
    ex.par(nblocks, [&](int64_t b0, int64_t b1) {
      std::vector<float> buf((size_t)TR * tc);
      for (int64_t b = b0; b < b1; ++b) {
        const int r0 = (int)b * TR, r1 = std::min(rows, r0 + TR);
        for (int c0 = 0; c0 < cols; c0 += tc) {
          const int cb = std::min(tc, cols - c0);
          const std::pair<const float*, int64_t> src = deq(r0, r1, c0, c0 + cb, buf.data(), tc);
          gemm_nt(x + c0, n, xs, src.first - (int64_t)r0 * src.second, (int)src.second, cb, y, ys, r0, r1, c0 > 0);
        }
      }
    });
    return;
  }
  ex.par(nblocks, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf((size_t)TR * TC), P((size_t)TR * TC);
    for (int64_t b = b0; b < b1; ++b) {
      const int r0 = (int)b * TR, r1 = std::min(rows, r0 + TR);
      for (int c0 = 0; c0 < cols; c0 += TC) {
        const int cb = std::min(TC, cols - c0);
        if constexpr (!std::is_same_v<Panel, std::nullptr_t>) {
          gemm_tile(isa, x + c0, n, xs, r1 - r0, cb, P.data(), y + r0, ys, c0 > 0, [&](int p0, int, float* Pp) {
            Timer td(P_DEQ);
            panel(r0 + p0, c0, cb, Pp);
          });
          continue;
        }
        Timer td(P_DEQ);
        const std::pair<const float*, int64_t> src = deq(r0, r1, c0, c0 + cb, buf.data(), TC);
        td.stop();
        gemm_tile(isa, x + c0, n, xs, r1 - r0, cb, P.data(), y + r0, ys, c0 > 0, [&](int p0, int nr, float* Pp) {
          pack_rows(src.first, src.second, p0, nr, gemm_nr(isa), cb, Pp);
        });
      }
    }
  });
}

// The many-rows path of a packed weight: tiles dequantized by deq(w, r0, r1, c0, c1, out, ws) (a kernel set's
// bcq_deq / km_deq, or a panel writer, see tiled) and multiplied by the GEMM.
template <typename W, typename DeqFn, typename Panel = std::nullptr_t>
static void deq_gemm(const Model& m, const Exec& ex, const W& w, DeqFn deq, const float* x, int n, int xs, float* y,
                     int ys, Panel panel = nullptr) {
  Timer tm(P_GEMM);
  if (g_prof_on) g_gemm_flop += 2 * (int64_t)n * w.rows * w.cols;
  tiled(m, ex, x, n, xs, xs, w.rows, y, ys, [&](int r0, int r1, int c0, int c1, float* o, int ws) {
    deq(w, r0, r1, c0, c1, o, ws);
    return std::pair<const float*, int64_t>(o, ws);
  }, panel);
}

static void bcq_product(const Model& m, const Exec& ex, const BcqPart& part, const float* x, int n, int xs, float* y,
                        int ys) {
  const BCQ& w = part.w;
  const Kernels* K = m.K;
  const bool aligned = w.groups == 1 || (w.cols / w.groups) % K->bcq_group_align == 0;
  if (!aligned) K = generic_of(K);
  const bool lut_ok = w.groups == 1 || (w.cols / w.groups) % K->bcq_group_align == 0;
  const bool int16 = m.lut_int16 && w.lut && K == m.K;  // int16 tables / GEMM (AVX-512 only)
  const int small_max = int16 ? kBcqSmallMaxLut16 : K->bcq_gemv ? kBcqSmallMaxDirect : kBcqSmallMaxLut;
  if (n > small_max || !lut_ok) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    if (int16 && w.q <= 4) {  // bcq_panel16's code tables: up to 4 bit planes
      Timer tm(P_GEMM);
      if (g_prof_on) g_gemm_flop += 2 * (int64_t)n * w.rows * w.cols;
      const int64_t xqs = 16 * (int64_t)w.chunks;
      std::vector<uint32_t> xq((size_t)n * xqs);
      std::vector<float> sx((size_t)n * ((w.cols + kG16Cols - 1) / kG16Cols));
      quant16_rows(x, n, xs, w.cols, xq.data(), xqs, sx.data());
      ex.par((w.rows + 63) / 64, [&](int64_t a, int64_t b) {
        bcq_gemm16(w, xq.data(), xqs, sx.data(), n, y, ys, (int)a, (int)b);
      }, (int64_t)n * w.rows * w.cols);
      return;
    }
    if (gemm_isa(m) == G_AVX512 && w.lut) {
      deq_gemm(m, ex, w, K->bcq_deq, x, n, xs, y, ys,
               [&](int r, int c0, int kc, float* P) { bcq_panel_avx512(w, r, c0, kc, P); });
      return;
    }
#endif
    deq_gemm(m, ex, w, K->bcq_deq, x, n, xs, y, ys);
    return;
  }
  Timer tm(P_GEMV);
  const int64_t work = (int64_t)n * w.rows * w.cols * w.q / 4;  // one table lookup per 4 weights of a plane
  for (int i = 0; i < n; ++i) std::memset(y + (int64_t)i * ys, 0, sizeof(float) * w.rows);
  if (K->bcq_gemv) {
    const int nrb = (w.rows + 15) / 16;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    if (int16) {
      ex.par(nrb, [&](int64_t a, int64_t b) { bcq_gemv_lut16(w, x, n, xs, y, ys, (int)a, (int)b); }, work / 2, 2);
      return;
    }
#endif
    ex.par(nrb, [&](int64_t a, int64_t b) { K->bcq_gemv(w, x, n, xs, y, ys, (int)a, (int)b); }, work, 2);
    return;
  }
  const int nchunks = w.nbytes;
  std::vector<float> lut((size_t)n * std::min(nchunks, kLutChunks) * 256);
  for (int c0 = 0; c0 < nchunks; c0 += kLutChunks) {
    const int c1 = std::min(nchunks, c0 + kLutChunks);
    K->lut_build(x, n, xs, c0, c1, lut.data());
    ex.par(w.rows, [&](int64_t a, int64_t b) { K->bcq_lut(w, lut.data(), n, c0, c1, y, ys, (int)a, (int)b); }, work);
  }
}

static void km_product(const Model& m, const Exec& ex, const KMeans& w, const float* x, int n, int xs, float* y, int ys) {
  const Kernels* K = m.K;
  if (w.bits > K->km_max_bits) K = &qk::scalar_kernels;
  const int small_max = K == &qk::scalar_kernels || K->km_max_bits == 8 ? kKmSmallMaxGeneric : kKmSmallMaxAvx512;
  if (n > small_max) {
    deq_gemm(m, ex, w, K->km_deq, x, n, xs, y, ys);
    return;
  }
  Timer tm(P_GEMV);
  ex.par(w.rows, [&](int64_t a, int64_t b) { K->km_gemv(w, x, n, xs, y, ys, (int)a, (int)b); }, (int64_t)n * w.rows * w.cols);
}

static void activate(int fn, float* x, int64_t n);

// y [i] = relu(y [i] + b) (relu: whether to apply it); b may be null.
QR_CLONES static void bias_relu(float* y, const float* b, int rows, bool relu) {
  if (b) {
#pragma omp simd
    for (int r = 0; r < rows; ++r) y[r] += b[r];
  }
  if (relu) {
#pragma omp simd
    for (int r = 0; r < rows; ++r) y[r] = y[r] > 0.f ? y[r] : 0.f;
  }
}

// y [n, rows] = fn(act_out(act_in(x) [n, cols] W^T + bias)) (fn: an ActFn, LINEAR for none); x and y contiguous.
// Bias and relu run in one pass over each output row.
static void linear(const Model& m, const Exec& ex, const Linear& L, const float* x, int n, float* y, int fn = LINEAR) {
  const Weight& w = *L.w;
  const int cols = w.cols, rows = w.rows;
  if (n == 0) return;
  std::vector<float> xp;
  const float* xin = x;
  int xs = cols;
  if (w.method != DENSE && cols % 16 != 0) xs = (int)round16(cols);
  if (xs != cols || L.act_in.on) {
    xp.assign((size_t)n * xs, 0.f);
    for (int i = 0; i < n; ++i) std::memcpy(xp.data() + (int64_t)i * xs, x + (int64_t)i * cols, sizeof(float) * cols);
    if (L.act_in.on)
      for (int i = 0; i < n; ++i) quantize_act(L.act_in, xp.data() + (int64_t)i * xs, cols);
    xin = xp.data();
  }
  switch (w.method) {
    case DENSE: {
      Timer tm(P_DENSE);
      if (n >= kGemmMinRows && !m.exact_order) {
        tiled(m, ex, xin, n, xs, cols, rows, y, rows, [&](int r0, int, int c0, int, float*, int) {
          return std::pair<const float*, int64_t>(w.dense + (int64_t)r0 * cols + c0, cols);
        });
        break;
      }
      ex.par((rows + 3) / 4, [&](int64_t a, int64_t b) {
        gemm_nt(xin, n, xs, w.dense, cols, cols, y, rows, (int)a * 4, (int)std::min<int64_t>(rows, b * 4), false);
      }, (int64_t)n * rows * cols);
      break;
    }
    case BCQW:
      bcq_product(m, ex, w.bcq[0], xin, n, xs, y, rows);
      break;
    case BCQMIX: {
      for (const BcqPart& part : w.bcq) {
        const int nk = (int)part.rows.size();
        std::vector<float> t((size_t)n * nk);
        bcq_product(m, ex, part, xin, n, xs, t.data(), nk);
        for (int i = 0; i < n; ++i)
          for (int j = 0; j < nk; ++j) y[(int64_t)i * rows + part.rows[j]] = t[(int64_t)i * nk + j];
      }
      break;
    }
    case KMW:
      km_product(m, ex, w.km, xin, n, xs, y, rows);
      break;
  }
  const bool fused = fn == RELU && !L.act_out.on;
  if (L.bias || fused) {
    Timer tm(P_NORM_ACT);
    for (int i = 0; i < n; ++i) bias_relu(y + (int64_t)i * rows, L.bias, rows, fused);
  }
  if (L.act_out.on) quantize_act(L.act_out, y, (int64_t)n * rows);
  if (!fused && fn != LINEAR) activate(fn, y, (int64_t)n * rows);
}

// Row r of a weight (an embedding lookup): out [cols].
static void weight_row(const Model& m, const Weight& w, int r, float* out) {
  const int cols = w.cols, c1 = (int)round16(cols);
  if (w.method == DENSE) {
    std::memcpy(out, w.dense + (int64_t)r * cols, sizeof(float) * cols);
    return;
  }
  std::vector<float> buf(c1);
  if (w.method == KMW) {
    const Kernels* K = w.km.bits > m.K->km_max_bits ? &qk::scalar_kernels : m.K;
    K->km_deq(w.km, r, r + 1, 0, c1, buf.data(), c1);
  } else {
    const BcqPart& part = w.method == BCQW ? w.bcq[0] : w.bcq[w.mix_group[r]];
    const int rr = w.method == BCQW ? r : w.mix_pos[r];
    qk::scalar_kernels.bcq_deq(part.w, rr, rr + 1, 0, c1, buf.data(), c1);
  }
  std::memcpy(out, buf.data(), sizeof(float) * cols);
}

// Layer norm of one row (mean and variance in double, as the parity-checked engine). Baseline ISA on purpose:
// with FMA, (x - mu) * rstd * g + b rounds once less and moves values across activation-quantization steps.
static void norm_row(const float* g, const float* b, float* x, int dim) {
  double mean = 0, var = 0;
#pragma omp simd reduction(+ : mean)
  for (int c = 0; c < dim; ++c) mean += x[c];
  mean /= dim;
#pragma omp simd reduction(+ : var)
  for (int c = 0; c < dim; ++c) var += (x[c] - mean) * (x[c] - mean);
  var /= dim;
  const float rstd = (float)(1.0 / std::sqrt(var + 1e-5)), mu = (float)mean;
#pragma omp simd
  for (int c = 0; c < dim; ++c) x[c] = (x[c] - mu) * rstd * g[c] + b[c];
}

static void layer_norm(const Norm& n, float* x, int rows, int dim) {
  Timer tm(P_NORM_ACT);
  for (int i = 0; i < rows; ++i) norm_row(n.g, n.b, x + (int64_t)i * dim, dim);
}

QR_CLONES static void add_row(float* x, const float* o, int dim) {
#pragma omp simd
  for (int c = 0; c < dim; ++c) x[c] += o[c];
}

// x += o, then (post-norm: norm given) the layer norm, one row at a time.
static void residual(const Norm* norm, float* x, const float* o, int rows, int dim) {
  Timer tm(P_NORM_ACT);
  for (int i = 0; i < rows; ++i) {
    add_row(x + (int64_t)i * dim, o + (int64_t)i * dim, dim);
    if (norm) norm_row(norm->g, norm->b, x + (int64_t)i * dim, dim);
  }
}

static void activate(int fn, float* x, int64_t n) {
  Timer tm(P_NORM_ACT);
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    switch (fn) {
      case RELU: x[i] = v > 0.f ? v : 0.f; break;
      case GELU: x[i] = (float)(0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0)))); break;
      case GELU_ACCURATE:
        x[i] = (float)(0.5 * v * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (v + 0.044715 * (double)v * v * v))));
        break;
      case TANH: x[i] = std::tanh(v); break;
      default: break;
    }
  }
}

// exp(x) for x <= 0 in fp32 (Cephes' expf: x = n ln2 + r, |r| <= ln2 / 2, degree-5 polynomial; within 2 ulp),
// written so that the row loops below vectorize; below -87.3 it returns 2^-126 (negligible in a softmax sum
// that holds exp(0) = 1).
static inline float exp_neg(float x) {
  x = std::max(x, -87.3f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

// The max of a row and the log of the sum of exp(x - max) (fp32 lanes): log_softmax(x) = (x - max) - that.
QR_CLONES static void row_lse(const float* r, int V, float& mx_out, float& ls_out) {
  float mx = -INFINITY;
#pragma omp simd reduction(max : mx)
  for (int j = 0; j < V; ++j) mx = std::max(mx, r[j]);
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < V; ++j) sum += exp_neg(r[j] - mx);
  mx_out = mx;
  ls_out = std::log(sum);
}

#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
// row_lse with AVX-512: 16 lanes of exp_neg.
__attribute__((target("avx512f"))) static inline __m512 exp_neg16(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

__attribute__((target("avx512f"))) static void row_lse_avx512(const float* r, int V, float& mx_out, float& ls_out) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  int j = 0;
  for (; j + 16 <= V; j += 16) mv = _mm512_max_ps(mv, _mm512_loadu_ps(r + j));
  const __mmask16 tail = (__mmask16)((1u << (V - j)) - 1);
  mv = _mm512_max_ps(mv, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), tail, r + j));
  const float mx = _mm512_reduce_max_ps(mv);
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sv = _mm512_setzero_ps();
  for (j = 0; j + 16 <= V; j += 16) sv = _mm512_add_ps(sv, exp_neg16(_mm512_sub_ps(_mm512_loadu_ps(r + j), m)));
  sv = _mm512_add_ps(sv, _mm512_maskz_mov_ps(tail, exp_neg16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, r + j), m))));
  mx_out = mx;
  ls_out = std::log(_mm512_reduce_add_ps(sv));
}
// attend with AVX-512 for heads of HB x 16 dims: scores reduced per key in registers, exponentials 16 at a
// time (exp_neg16), the weighted sum of values in HB accumulators.
template <int HB>
__attribute__((target("avx512f"))) static void attend_avx512(const float* q, const float* const* kp, const float* const* vp,
                                                             int64_t off, int n, float* sc, float* out) {
  __m512 qv[HB], acc[HB];
  for (int b = 0; b < HB; ++b) qv[b] = _mm512_loadu_ps(q + 16 * b), acc[b] = _mm512_setzero_ps();
  float mx = -INFINITY;
  for (int j = 0; j < n; ++j) {
    const float* kj = kp[j] + off;
    __m512 s = _mm512_mul_ps(qv[0], _mm512_loadu_ps(kj));
    for (int b = 1; b < HB; ++b) s = _mm512_fmadd_ps(qv[b], _mm512_loadu_ps(kj + 16 * b), s);
    sc[j] = _mm512_reduce_add_ps(s);
    mx = std::max(mx, sc[j]);
  }
  const __m512 m = _mm512_set1_ps(mx);
  __m512 sum = _mm512_setzero_ps();
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = mask16(n - j);
    const __m512 e = _mm512_maskz_mov_ps(k, exp_neg16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, sc + j), m)));
    _mm512_mask_storeu_ps(sc + j, k, e);
    sum = _mm512_add_ps(sum, e);
  }
  const float inv = 1.f / _mm512_reduce_add_ps(sum);
  for (int j = 0; j < n; ++j) {
    const __m512 a = _mm512_set1_ps(sc[j] * inv);
    const float* vj = vp[j] + off;
    for (int b = 0; b < HB; ++b) acc[b] = _mm512_fmadd_ps(a, _mm512_loadu_ps(vj + 16 * b), acc[b]);
  }
  for (int b = 0; b < HB; ++b) _mm512_storeu_ps(out + 16 * b, acc[b]);
}
#endif

// attend on the model's ISA.
static void attention(bool avx512, const float* q, const float* const* kp, const float* const* vp, int64_t off, int n,
                      int hd, float* sc, float* out) {
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  if (avx512) switch (hd) {
      case 16: return attend_avx512<1>(q, kp, vp, off, n, sc, out);
      case 32: return attend_avx512<2>(q, kp, vp, off, n, sc, out);
      case 64: return attend_avx512<4>(q, kp, vp, off, n, sc, out);
      case 128: return attend_avx512<8>(q, kp, vp, off, n, sc, out);
      default: break;
    }
#endif
  attend(q, kp, vp, off, n, hd, sc, out);
}

// Embeddings of n tokens at positions pos_idx (absolute indices into the position table).
static void embed(const Model& m, const Side& s, const int32_t* tok, const int32_t* pos_idx, int n, float* x) {
  Timer tm(P_EMBED);
  for (int i = 0; i < n; ++i) {
    float* xi = x + (int64_t)i * s.dim;
    weight_row(m, *s.embed, tok[i], xi);
    for (int c = 0; c < s.dim; ++c) xi[c] *= s.embed_scale;
    if (s.positions) {
      const float* p = s.pos(pos_idx[i]);
      for (int c = 0; c < s.dim; ++c) xi[c] += p[c];
    }
  }
  if (s.emb_ln.on()) layer_norm(s.emb_ln, x, n, s.dim);
}

// Feed-forward block with its residual and norm, in place on x [n, dim].
static void ffn_block(const Model& m, const Exec& ex, const Side& s, const Layer& l, float* x, int n) {
  const int d = s.dim;
  std::vector<float> h(x, x + (int64_t)n * d), f((size_t)n * s.ffn), o((size_t)n * d);
  if (s.prenorm) layer_norm(l.ffn_ln, h.data(), n, d);
  linear(m, ex, l.fc1, h.data(), n, f.data(), m.activation);
  linear(m, ex, l.fc2, f.data(), n, o.data());
  residual(s.prenorm ? nullptr : &l.ffn_ln, x, o.data(), n, d);
}

// ---------------------------------------------------------------------------------------------
// Encoder: sentences without padding, one after another (rows = sum of lengths).

struct Encoded {
  int bsz = 0;
  std::vector<int> off, len;               // rows of sentence b: [off[b], off[b] + len[b])
  std::vector<std::vector<float>> ck, cv;  // per decoder layer: cross-attention keys / values [rows, dim]
};

static void encode(const Model& m, const Exec& ex, const int32_t* tokens, const int32_t* lens, int bsz, Encoded& e) {
  Timer tm(P_ENCODE);
  const Side& s = m.enc;
  const int d = s.dim, H = s.heads, hd = d / H;
  const bool avx512 = gemm_isa(m) == G_AVX512 && !m.exact_order;
  e.bsz = bsz;
  e.off.resize(bsz);
  e.len.assign(lens, lens + bsz);
  int T = 0;
  for (int b = 0; b < bsz; ++b) {
    e.off[b] = T;
    T += lens[b];
  }
  std::vector<int32_t> pos(T);
  for (int b = 0; b < bsz; ++b)
    for (int j = 0; j < lens[b]; ++j) pos[e.off[b] + j] = m.pad + 1 + j;
  std::vector<float> x((size_t)T * d), h, q((size_t)T * d), k((size_t)T * d), v((size_t)T * d), a((size_t)T * d),
      o((size_t)T * d);
  embed(m, s, tokens, pos.data(), T, x.data());
  for (const Layer& l : s.L) {
    h = x;
    if (s.prenorm) layer_norm(l.self_ln, h.data(), T, d);
    linear(m, ex, l.self.q, h.data(), T, q.data());
    linear(m, ex, l.self.k, h.data(), T, k.data());
    linear(m, ex, l.self.v, h.data(), T, v.data());
    for (auto& t : q) t *= s.scaling;
    ex.par((int64_t)T * H, [&](int64_t lo, int64_t hi) {
      std::vector<float> sc;
      std::vector<const float*> kp, vp;
      for (int64_t th = lo; th < hi; ++th) {
        const int t = (int)(th / H), hh = (int)(th % H);
        if (th == lo || hh == 0) {  // the keys / values of token t's sentence
          const int b = (int)(std::upper_bound(e.off.begin(), e.off.end(), t) - e.off.begin()) - 1;
          const int o0 = e.off[b], n = e.len[b];
          sc.resize(n), kp.resize(n), vp.resize(n);
          for (int j = 0; j < n; ++j) kp[j] = k.data() + (int64_t)(o0 + j) * d, vp[j] = v.data() + (int64_t)(o0 + j) * d;
        }
        attention(avx512, q.data() + (int64_t)t * d + hh * hd, kp.data(), vp.data(), hh * hd, (int)kp.size(), hd,
                  sc.data(), a.data() + (int64_t)t * d + hh * hd);
      }
    }, 2 * (int64_t)T * d * (T / bsz + 1));
    linear(m, ex, l.self.o, a.data(), T, o.data());
    residual(s.prenorm ? nullptr : &l.self_ln, x.data(), o.data(), T, d);
    ffn_block(m, ex, s, l, x.data(), T);
  }
  if (s.final_ln.on()) layer_norm(s.final_ln, x.data(), T, d);
  const int dd = m.dec.dim;
  e.ck.resize(m.dec.layers);
  e.cv.resize(m.dec.layers);
  for (int li = 0; li < m.dec.layers; ++li) {
    e.ck[li].resize((size_t)T * dd);
    e.cv[li].resize((size_t)T * dd);
    linear(m, ex, m.dec.L[li].cross.k, x.data(), T, e.ck[li].data());
    linear(m, ex, m.dec.L[li].cross.v, x.data(), T, e.cv[li].data());
  }
}

// ---------------------------------------------------------------------------------------------
// Incremental decoder. Hypothesis rows write their step-t keys/values at physical row prow[i] of
// step t's block; anc[i][s] is the physical row holding step s of row i's history.

struct DecState {
  int nphys = 0, dim = 0, layers = 0;
  static constexpr int CHUNK = 16;  // steps per allocation
  std::vector<std::vector<std::unique_ptr<float[]>>> K, V;  // [layer][chunk] -> [CHUNK][nphys][dim]
  void init(int layers_, int nphys_, int dim_) {
    layers = layers_, nphys = nphys_, dim = dim_;
    K.clear();
    V.clear();
    K.resize(layers);
    V.resize(layers);
  }
  float* slot(std::vector<std::unique_ptr<float[]>>& c, int step, int row) {
    while ((int)c.size() <= step / CHUNK) c.emplace_back(new float[(size_t)CHUNK * nphys * dim]);
    return c[step / CHUNK].get() + ((int64_t)(step % CHUNK) * nphys + row) * dim;
  }
};

// One step for n rows: tokens tok [n] at step t; row i belongs to sentence sent[i]. Writes logits [n, V].
static void decode_step(const Model& m, const Exec& ex, const Encoded& e, DecState& st, int t, int n, const int32_t* tok,
                        const int* sent, const int* prow, const std::vector<std::vector<int>>& anc, float* logits) {
  const Side& s = m.dec;
  const int d = s.dim, H = s.heads, hd = d / H;
  const bool avx512 = gemm_isa(m) == G_AVX512 && !m.exact_order;
  std::vector<int32_t> pos(n, m.pad + 1 + t);
  std::vector<float> x((size_t)n * d), h, q((size_t)n * d), k((size_t)n * d), v((size_t)n * d), a((size_t)n * d),
      o((size_t)n * d);
  embed(m, s, tok, pos.data(), n, x.data());
  for (int li = 0; li < s.layers; ++li) {
    const Layer& l = s.L[li];
    h = x;
    if (s.prenorm) layer_norm(l.self_ln, h.data(), n, d);
    linear(m, ex, l.self.q, h.data(), n, q.data());
    linear(m, ex, l.self.k, h.data(), n, k.data());
    linear(m, ex, l.self.v, h.data(), n, v.data());
    for (auto& z : q) z *= s.scaling;
    for (int i = 0; i < n; ++i) {
      std::memcpy(st.slot(st.K[li], t, prow[i]), k.data() + (int64_t)i * d, sizeof(float) * d);
      std::memcpy(st.slot(st.V[li], t, prow[i]), v.data() + (int64_t)i * d, sizeof(float) * d);
    }
    Timer tsa(P_SELF_ATTN);
    ex.par((int64_t)n * H, [&](int64_t lo, int64_t hi) {
      std::vector<float> sc(t + 1);
      std::vector<const float*> kp(t + 1), vp(t + 1);
      for (int64_t ih = lo; ih < hi; ++ih) {
        const int i = (int)(ih / H), hh = (int)(ih % H);
        if (ih == lo || hh == 0)  // row i's history: step j at physical row anc[i][j]
          for (int j = 0; j <= t; ++j) {
            const int64_t at = ((int64_t)(j % DecState::CHUNK) * st.nphys + anc[i][j]) * d;
            kp[j] = st.K[li][j / DecState::CHUNK].get() + at;
            vp[j] = st.V[li][j / DecState::CHUNK].get() + at;
          }
        attention(avx512, q.data() + (int64_t)i * d + hh * hd, kp.data(), vp.data(), hh * hd, t + 1, hd, sc.data(),
                  a.data() + (int64_t)i * d + hh * hd);
      }
    }, 2 * (int64_t)n * d * (t + 1));
    tsa.stop();
    linear(m, ex, l.self.o, a.data(), n, o.data());
    residual(s.prenorm ? nullptr : &l.self_ln, x.data(), o.data(), n, d);
    // cross-attention over the sentence's encoder states
    h = x;
    if (s.prenorm) layer_norm(l.cross_ln, h.data(), n, d);
    linear(m, ex, l.cross.q, h.data(), n, q.data());
    for (auto& z : q) z *= s.scaling;
    const float *CK = e.ck[li].data(), *CV = e.cv[li].data();
    Timer tca(P_CROSS_ATTN);
    ex.par((int64_t)n * H, [&](int64_t lo, int64_t hi) {
      std::vector<float> sc;
      std::vector<const float*> kp, vp;
      for (int64_t ih = lo; ih < hi; ++ih) {
        const int i = (int)(ih / H), hh = (int)(ih % H);
        if (ih == lo || hh == 0) {  // the encoder states of row i's sentence
          const int o0 = e.off[sent[i]], len = e.len[sent[i]];
          sc.resize(len), kp.resize(len), vp.resize(len);
          for (int j = 0; j < len; ++j) kp[j] = CK + (int64_t)(o0 + j) * d, vp[j] = CV + (int64_t)(o0 + j) * d;
        }
        attention(avx512, q.data() + (int64_t)i * d + hh * hd, kp.data(), vp.data(), hh * hd, (int)kp.size(), hd,
                  sc.data(), a.data() + (int64_t)i * d + hh * hd);
      }
    }, 2 * (int64_t)n * d * e.len[sent[0]]);
    tca.stop();
    linear(m, ex, l.cross.o, a.data(), n, o.data());
    residual(s.prenorm ? nullptr : &l.cross_ln, x.data(), o.data(), n, d);
    ffn_block(m, ex, s, l, x.data(), n);
  }
  if (s.final_ln.on()) layer_norm(s.final_ln, x.data(), n, d);
  linear(m, ex, m.out_proj, x.data(), n, logits);
}

// One beam row's candidates: lprob_j = (x_j - max) - lse with fairseq's masks (NaN, pad -> -inf, unk penalty,
// only EOS from max_len on, no EOS before min_len), v_j = lprob_j + base. `all` from `first` keeps the best kr
// (v, tag + j) in descending order; rows are scanned in index order, so a later equal v never displaces one.
struct RowScan {
  int pad, unk, eos;
  float unk_penalty;
  bool only_eos, no_eos;
  bool avx512;
  float value(const float* r, int j, float mx, float ls, float base) const {
    float v = (r[j] - mx) - ls;
    if (v != v || j == pad) v = -INFINITY;
    if (j == unk) v -= unk_penalty;
    if ((only_eos && j != eos) || (no_eos && j == eos)) v = -INFINITY;
    return v + base;
  }
  static void push(std::vector<std::pair<float, int>>& all, size_t first, int kr, float v, int tag) {
    const int have = (int)(all.size() - first);
    if (have == kr && !(v > all.back().first)) return;
    if (have < kr) all.emplace_back();
    size_t p = all.size() - 1;
    for (; p > first && v > all[p - 1].first; --p) all[p] = all[p - 1];
    all[p] = {v, tag};
  }
  void scan(const float* r, int V, float mx, float ls, float base, int kr, int tag,
            std::vector<std::pair<float, int>>& all) const {
    const size_t first = all.size();
    int j = 0;
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
    if (avx512 && !only_eos) {
      for (; j < V && (int)(all.size() - first) < kr; ++j) push(all, first, kr, value(r, j, mx, ls, base), tag + j);
      j = scan_avx512(r, V, j, mx, ls, base, kr, tag, all, first);
    }
#endif
    for (; j < V; ++j) push(all, first, kr, value(r, j, mx, ls, base), tag + j);
  }
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  // Blocks of 16 from j: only values above the current k-th best (and the blocks holding pad / unk / eos)
  // take the scalar path. Returns where the scalar scan goes on.
  __attribute__((target("avx512f"))) int scan_avx512(const float* r, int V, int j, float mx, float ls, float base, int kr,
                                                     int tag, std::vector<std::pair<float, int>>& all, size_t first) const {
    const __m512 m = _mm512_set1_ps(mx), l = _mm512_set1_ps(ls), b = _mm512_set1_ps(base);
    for (; j + 16 <= V; j += 16) {
      const bool special = (pad >= j && pad < j + 16) || (unk >= j && unk < j + 16) || (eos >= j && eos < j + 16);
      const __m512 v = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(_mm512_loadu_ps(r + j), m), l), b);
      unsigned hit = _mm512_cmp_ps_mask(v, _mm512_set1_ps(all.back().first), _CMP_GT_OQ);
      if (special) hit = 0xFFFF;
      for (; hit; hit &= hit - 1) {
        const int jj = j + __builtin_ctz(hit);
        push(all, first, kr, value(r, jj, mx, ls, base), tag + jj);
      }
    }
    return j;
  }
#endif
};

// ---------------------------------------------------------------------------------------------
// Search (fairseq's SequenceGenerator with BeamSearch).

struct Params {
  int beam = 5, nbest = 1, min_len = 1;
  float lenpen = 1.f, unk_penalty = 0.f;
  double max_len_a = 0.0;  // Python float, as fairseq's int(a * src_len + b)
  int max_len_b = 200;
};

struct Hypo {
  std::vector<int32_t> tokens;  // without the final EOS
  float score;
};

struct Result {
  std::vector<std::vector<Hypo>> sents;  // [bsz][<= nbest]
};

static Result search(const Model& m, const Exec& ex, const int32_t* tokens, const int32_t* lens, int bsz, const Params& P) {
  Encoded e;
  encode(m, ex, tokens, lens, bsz, e);
  const int beam = P.beam, V = m.dec.vocab, cand = 2 * beam;
  int src_len = 0;  // fairseq uses the padded width of the source batch
  for (int b = 0; b < bsz; ++b) src_len = std::max(src_len, lens[b]);
  const int max_len = std::min((int)(P.max_len_a * src_len + P.max_len_b), m.dec.max_pos - 1);
  const int N0 = bsz * beam;
  DecState st;
  st.init(m.dec.layers, N0, m.dec.dim);

  std::vector<int> active(bsz);  // original sentence index of each active sentence
  for (int b = 0; b < bsz; ++b) active[b] = b;
  std::vector<std::vector<int32_t>> toks(N0, std::vector<int32_t>{m.eos});  // tokens[0] = bos (= eos)
  std::vector<std::vector<float>> scores(N0);
  std::vector<std::vector<int>> anc(N0);
  std::vector<int> prow(N0), rsent(N0);
  for (int i = 0; i < N0; ++i) prow[i] = i;
  std::vector<std::vector<char>> ignore(bsz, std::vector<char>(beam, 0));
  std::vector<std::vector<Hypo>> fin(bsz);
  std::vector<float> lp;
  std::vector<int32_t> last(N0);

  for (int step = 0; step <= max_len; ++step) {
    const int nb = (int)active.size(), n = nb * beam;
    for (int i = 0; i < n; ++i) {
      rsent[i] = active[i / beam];
      anc[i].resize(step + 1);
      anc[i][step] = prow[i];
      last[i] = toks[i].back();
    }
    lp.resize((size_t)n * V);
    decode_step(m, ex, e, st, step, n, last.data(), rsent.data(), prow.data(), anc, lp.data());
    // candidates per sentence: top 2 * beam of (beam x vocab) cumulative scores (ties: lower index first)
    std::vector<std::vector<float>> cs(nb);
    std::vector<std::vector<int>> ci(nb), cb(nb);
    // The top k of the union is the top k of each beam row's top k (same order), so each row keeps its
    // best k in a sorted list while its log-probabilities are computed and scanned (in index order).
    const RowScan scan{m.pad, m.unk, m.eos, P.unk_penalty, step >= max_len, step < P.min_len, gemm_isa(m) == G_AVX512};
    ex.par(nb, [&](int64_t lo, int64_t hi) {
      std::vector<std::pair<float, int>> all;
      for (int64_t s = lo; s < hi; ++s) {
        const int nbeams = step == 0 ? 1 : beam;
        const int size = nbeams * V, k = std::min(cand, size - 1);
        all.clear();
        for (int bi = 0; bi < nbeams; ++bi) {
          const int row = (int)s * beam + bi;
          const float* r = lp.data() + (int64_t)row * V;
          float mx, ls;
          Timer tsm(P_SOFTMAX);
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
          if (scan.avx512 && !m.exact_order)
            row_lse_avx512(r, V, mx, ls);
          else
#endif
            row_lse(r, V, mx, ls);
          tsm.stop();
          Timer tsel(P_SEARCH);
          scan.scan(r, V, mx, ls, step == 0 ? 0.f : scores[row][step - 1], std::min(k, V), bi * V, all);
        }
        auto better = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        };
        std::partial_sort(all.begin(), all.begin() + k, all.end(), better);
        cs[s].resize(k);
        ci[s].resize(k);
        cb[s].resize(k);
        for (int j = 0; j < k; ++j) {
          cs[s][j] = all[j].first;
          ci[s][j] = all[j].second % V;
          cb[s][j] = all[j].second / V;
        }
      }
    }, 4 * (int64_t)nb * beam * V);
    // finalize EOS candidates among the first `beam`
    std::vector<char> eos_mask_any(nb, 0);
    std::vector<std::vector<char>> eosm(nb);
    for (int s = 0; s < nb; ++s) {
      const int k = (int)cs[s].size();
      eosm[s].assign(k, 0);
      for (int j = 0; j < k; ++j) eosm[s][j] = ci[s][j] == m.eos && cs[s][j] != -INFINITY;
      for (int j = 0; j < std::min(beam, k); ++j)
        if (ignore[s][j]) eosm[s][j] = 0;
      for (int j = 0; j < std::min(beam, k); ++j) {
        if (!eosm[s][j]) continue;
        eos_mask_any[s] = 1;
        std::vector<Hypo>& f = fin[active[s]];
        if ((int)f.size() < beam) {
          const int row = s * beam + cb[s][j];
          Hypo hy;
          hy.tokens.assign(toks[row].begin() + 1, toks[row].end());
          hy.score = cs[s][j] / (float)std::pow((double)(step + 1), (double)P.lenpen);
          f.push_back(std::move(hy));
        }
      }
    }
    std::vector<char> done(nb, 0);
    int remaining = 0;
    for (int s = 0; s < nb; ++s) {
      if (eos_mask_any[s] && ((int)fin[active[s]].size() == beam || step == max_len)) done[s] = 1;
      remaining += !done[s];
    }
    if (remaining == 0) break;
    // next hypotheses of the sentences still open
    std::vector<int> nactive;
    std::vector<std::vector<int32_t>> ntoks;
    std::vector<std::vector<float>> nscores;
    std::vector<std::vector<int>> nanc;
    std::vector<int> nprow;
    std::vector<std::vector<char>> nignore;
    for (int s = 0; s < nb; ++s) {
      if (done[s]) continue;
      const int k = (int)cs[s].size();
      std::vector<std::pair<int, int>> am(k);  // active_mask value, candidate
      for (int j = 0; j < k; ++j) {
        const bool em = j < beam ? (ignore[s][j] || eosm[s][j]) : eosm[s][j];
        am[j] = {(em ? cand : 0) + j, j};
      }
      std::partial_sort(am.begin(), am.begin() + beam, am.end());
      std::vector<char> ig(beam);
      for (int i = 0; i < beam; ++i) {
        const int j = am[i].second, parent = s * beam + cb[s][j];
        ig[i] = am[i].first >= cand;
        std::vector<int32_t> t = toks[parent];
        t.push_back(ci[s][j]);
        ntoks.push_back(std::move(t));
        std::vector<float> sc(scores[parent].begin(), scores[parent].begin() + step);
        sc.push_back(cs[s][j]);
        nscores.push_back(std::move(sc));
        nanc.push_back(anc[parent]);
        nprow.push_back(active[s] * beam + i);
      }
      nactive.push_back(active[s]);
      nignore.push_back(std::move(ig));
    }
    active.swap(nactive);
    toks.swap(ntoks);
    scores.swap(nscores);
    anc.swap(nanc);
    prow.swap(nprow);
    ignore.swap(nignore);
  }
  Result res;
  res.sents.resize(bsz);
  for (int b = 0; b < bsz; ++b) {
    std::vector<Hypo>& f = fin[b];
    std::stable_sort(f.begin(), f.end(), [](const Hypo& a, const Hypo& c) { return a.score > c.score; });
    if ((int)f.size() > P.nbest) f.resize(P.nbest);
    res.sents[b] = std::move(f);
  }
  return res;
}

// ---------------------------------------------------------------------------------------------
// Model assembly.

static std::shared_ptr<Weight> weight_of(const Model& m, const std::string& module) {
  auto it = m.weights.find(module);
  if (it == m.weights.end()) fail("module ", module, " has no weight in the model description");
  return it->second;
}

static Linear make_linear(const Model& m, const std::string& module, int rows, int cols, bool bias) {
  Linear l;
  l.w = weight_of(m, module);
  if (l.w->rows != rows || l.w->cols != cols)
    fail("module ", module, " is [", l.w->rows, ", ", l.w->cols, "], the architecture needs [", rows, ", ", cols, "]");
  if (bias) l.bias = m.tensor(module + ".bias", 0, {rows}).f();
  if (m.acts_in.count(module)) l.act_in = m.acts_in.at(module);
  if (m.acts_out.count(module)) l.act_out = m.acts_out.at(module);
  return l;
}

static Norm make_norm(const Model& m, const std::string& name, int dim, bool required) {
  Norm n;
  if (!required && !m.tensors.count(name + ".weight")) return n;
  n.g = m.tensor(name + ".weight", 0, {dim}).f();
  n.b = m.tensor(name + ".bias", 0, {dim}).f();
  return n;
}

static void build_side(Model& m, Side& s, const std::string& p, bool decoder) {
  s.layers = (int)m.get(p + ".layers");
  s.dim = (int)m.get(p + ".dim");
  s.ffn = (int)m.get(p + ".ffn");
  s.heads = (int)m.get(p + ".heads");
  s.max_pos = (int)m.get(p + ".max_positions");
  s.vocab = (int)m.get(p + ".vocab");
  s.prenorm = m.get(p + ".normalize_before") != 0;
  s.positions = m.get(p + ".positions") != 0;
  s.learned_pos = m.get(p + ".learned_pos") != 0;
  s.embed_scale = (float)m.get(p + ".embed_scale");
  s.scaling = (float)m.get(p + ".attn_scaling");
  if (s.dim % s.heads) fail(p, ": embedding dim ", s.dim, " is not a multiple of ", s.heads, " heads");
  s.embed = weight_of(m, p + ".embed_tokens");
  if (s.embed->rows != s.vocab || s.embed->cols != s.dim)
    fail(p, ".embed_tokens is [", s.embed->rows, ", ", s.embed->cols, "], expected [", s.vocab, ", ", s.dim, "]");
  const int npos = s.max_pos + m.pad + 1;
  if (s.positions && s.learned_pos) {
    s.pos_table = m.tensor(p + ".embed_positions.weight", 0, {npos, s.dim}).f();
  } else if (s.positions) {  // SinusoidalPositionalEmbedding.get_embedding, in fp32
    const int half = s.dim / 2;
    const float f = (float)(-(std::log(10000.0) / (half - 1)));
    std::vector<float> freq(half);
    for (int j = 0; j < half; ++j) freq[j] = std::exp((float)j * f);
    s.sin_table.assign((size_t)npos * s.dim, 0.f);
    for (int i = 0; i < npos; ++i) {
      if (i == m.pad) continue;
      float* r = s.sin_table.data() + (int64_t)i * s.dim;
      for (int j = 0; j < half; ++j) {
        const float a = (float)i * freq[j];
        r[j] = std::sin(a);
        r[half + j] = std::cos(a);
      }
    }
  }
  s.emb_ln = make_norm(m, p + ".layernorm_embedding", s.dim, false);
  s.final_ln = make_norm(m, p + ".layer_norm", s.dim, false);
  if (s.prenorm != s.final_ln.on()) fail(p, ": normalize_before=", s.prenorm, " but the final layer norm is ", s.final_ln.on() ? "present" : "absent");
  s.L.resize(s.layers);
  const int d = s.dim;
  for (int i = 0; i < s.layers; ++i) {
    const std::string lp = p + ".layers." + std::to_string(i) + ".";
    Layer& l = s.L[i];
    const std::string sa = lp + "self_attn.";
    l.self = {make_linear(m, sa + "q_proj", d, d, true), make_linear(m, sa + "k_proj", d, d, true),
              make_linear(m, sa + "v_proj", d, d, true), make_linear(m, sa + "out_proj", d, d, true)};
    l.self_ln = make_norm(m, lp + "self_attn_layer_norm", d, true);
    if (decoder) {
      const std::string ca = lp + "encoder_attn.";
      const int ed = (int)m.get("encoder.dim");
      l.cross = {make_linear(m, ca + "q_proj", d, d, true), make_linear(m, ca + "k_proj", d, ed, true),
                 make_linear(m, ca + "v_proj", d, ed, true), make_linear(m, ca + "out_proj", d, d, true)};
      l.cross_ln = make_norm(m, lp + "encoder_attn_layer_norm", d, true);
    }
    l.fc1 = make_linear(m, lp + "fc1", s.ffn, d, true);
    l.fc2 = make_linear(m, lp + "fc2", d, s.ffn, true);
    l.ffn_ln = make_norm(m, lp + "final_layer_norm", d, true);
  }
}

static void finalize(Model& m, bool weights_only = false) {
  m.K = pick_kernels();
  m.exact_order = !m.acts_in.empty() || !m.acts_out.empty();
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__)
  m.lut_int16 = m.spec.count("lut_int16") && m.spec.at("lut_int16") != 0 && m.K == &qk::avx512_kernels &&
                !m.exact_order && __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("avx512vnni");
#endif
  if (weights_only) {
    m.weights_only = m.ready = true;
    return;
  }
  m.pad = (int)m.get("pad");
  m.eos = (int)m.get("eos");
  m.unk = (int)m.get("unk");
  m.bos = (int)m.get("bos");
  m.activation = (int)m.get("activation");
  build_side(m, m.enc, "encoder", false);
  build_side(m, m.dec, "decoder", true);
  if (m.enc.dim != m.dec.dim) fail("encoder dim ", m.enc.dim, " != decoder dim ", m.dec.dim, " is not supported");
  m.out_proj = make_linear(m, "decoder.output_projection", m.dec.vocab, m.dec.dim, false);
  m.ready = true;
}

}  // namespace qr

// ---------------------------------------------------------------------------------------------
// C ABI. Every call returns 0 on success; on failure a nonzero code and the message in err.

using namespace qr;

struct qr_result {
  Result r;
};

template <typename F>
static int guarded(char* err, int errlen, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    if (err && errlen > 0) std::snprintf(err, errlen, "%s", e.what());
    return 1;
  }
}

extern "C" {

Model* qr_model_new() { return new Model(); }
void qr_model_free(Model* m) { delete m; }

// spec: "key=value" pairs separated by whitespace (numbers).
int qr_model_spec(Model* m, const char* spec, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    std::istringstream in(spec);
    std::string kv;
    while (in >> kv) {
      auto eq = kv.find('=');
      if (eq == std::string::npos) fail("bad spec entry '", kv, "'");
      m->spec[kv.substr(0, eq)] = std::stod(kv.substr(eq + 1));
    }
  });
}

// A tensor (kept alive by the caller): dtype 0 = fp32, 1 = uint8.
int qr_model_tensor(Model* m, const char* name, int dtype, int ndim, const int64_t* shape, const void* data, char* err,
                    int errlen) {
  return guarded(err, errlen, [&] {
    Tensor t;
    t.dtype = dtype;
    t.shape.assign(shape, shape + ndim);
    t.data = data;
    m->tensors[name] = t;
  });
}

// Module `module` uses the weight stored under `owner` (itself unless tied) in format `method`.
int qr_model_weight(Model* m, const char* module, const char* owner, const char* method, int bits, int rows, int cols,
                    char* err, int errlen) {
  return guarded(err, errlen, [&] {
    std::string o(owner);
    for (auto& kv : m->weights)  // a tied module shares its owner's weight object
      if (kv.first == o) {
        if (kv.second->rows != rows || kv.second->cols != cols) fail(module, ": tied to ", owner, " of another shape");
        m->weights[module] = kv.second;
        return;
      }
    auto w = build_weight(*m, o, method, bits, rows, cols);
    m->weights[o] = w;
    m->weights[module] = w;
  });
}

// Activation quantization of a linear module's input (where = 1) or output (where = 2).
int qr_model_act(Model* m, const char* module, int where, float scale, float zero_point, int bits, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    Act a;
    a.on = true;
    a.scale = scale;
    a.zp = zero_point;
    a.levels = (float)((1 << bits) - 1);
    (where == 1 ? m->acts_in : m->acts_out)[module] = a;
  });
}

int qr_model_finalize(Model* m, char* err, int errlen) { return guarded(err, errlen, [&] { finalize(*m); }); }
// A model of weights only (no encoder or decoder; for qr_linear in tests and benchmarks of single layers).
int qr_model_finalize_weights(Model* m, char* err, int errlen) {
  return guarded(err, errlen, [&] { finalize(*m, true); });
}

const char* qr_model_isa(Model* m) { return m->K ? m->K->name : ""; }
// The lookup tables of the few-row BCQ products: "int16" or "fp32".
const char* qr_model_lut(Model* m) { return m->lut_int16 ? "int16" : "fp32"; }

// One product as translation runs it, bias left out: y [n, rows] = x [n, cols] W^T of module `module` (for
// tests and benchmarks of single layers).
int qr_linear(Model* m, const char* module, const float* x, int n, float* y, int threads, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    if (!m->ready) fail("model is not finalized");
    const std::shared_ptr<Weight> w = weight_of(*m, module);
    const Linear L = make_linear(*m, module, w->rows, w->cols, false);
    Exec ex(threads);
    linear(*m, ex, L, x, n, y);
  });
}

// Teacher forcing: logits [bsz, tgt_len, vocab] of the decoder fed prev [bsz, tgt_len] (no padding).
int qr_score(Model* m, const int32_t* src, const int32_t* src_lens, int bsz, const int32_t* prev, int tgt_len, int threads,
             float* logits, char* err, int errlen) {
  return guarded(err, errlen, [&] {
    if (!m->ready || m->weights_only) fail("model is not finalized (or holds weights only)");
    Exec ex(threads);
    Encoded e;
    encode(*m, ex, src, src_lens, bsz, e);
    DecState st;
    st.init(m->dec.layers, bsz, m->dec.dim);
    std::vector<int> sent(bsz), prow(bsz);
    std::vector<std::vector<int>> anc(bsz);
    const int V = m->dec.vocab;
    std::vector<int32_t> tok(bsz);
    std::vector<float> out((size_t)bsz * V);
    for (int t = 0; t < tgt_len; ++t) {
      for (int b = 0; b < bsz; ++b) {
        sent[b] = prow[b] = b;
        anc[b].push_back(b);
        tok[b] = prev[(int64_t)b * tgt_len + t];
      }
      decode_step(*m, ex, e, st, t, bsz, tok.data(), sent.data(), prow.data(), anc, out.data());
      for (int b = 0; b < bsz; ++b)
        std::memcpy(logits + ((int64_t)b * tgt_len + t) * V, out.data() + (int64_t)b * V, sizeof(float) * V);
    }
  });
}

// Beam search over bsz sentences given one after another in src (lengths src_lens, each ending with EOS).
int qr_translate(Model* m, const int32_t* src, const int32_t* src_lens, int bsz, int beam, int nbest, float lenpen,
                 double max_len_a, int max_len_b, int min_len, float unk_penalty, int threads, qr_result** out, char* err,
                 int errlen) {
  return guarded(err, errlen, [&] {
    if (!m->ready || m->weights_only) fail("model is not finalized (or holds weights only)");
    if (beam < 1 || nbest < 1 || nbest > beam) fail("need 1 <= nbest <= beam, got beam ", beam, " nbest ", nbest);
    Params P;
    P.beam = beam;
    P.nbest = nbest;
    P.lenpen = lenpen;
    P.max_len_a = max_len_a;
    P.max_len_b = max_len_b;
    P.min_len = min_len;
    P.unk_penalty = unk_penalty;
    for (int b = 0; b < bsz; ++b) {
      if (src_lens[b] < 1) fail("sentence ", b, " is empty (it needs at least its EOS)");
      if (src_lens[b] > m->enc.max_pos) fail("sentence ", b, " has ", src_lens[b], " tokens, more than the model's ", m->enc.max_pos, " positions");
    }
    int64_t total = 0;
    for (int b = 0; b < bsz; ++b) total += src_lens[b];
    for (int64_t i = 0; i < total; ++i)
      if (src[i] < 0 || src[i] >= m->enc.vocab) fail("token id ", src[i], " is outside the source vocabulary");
    auto r = std::make_unique<qr_result>();
    r->r = search(*m, Exec(threads), src, src_lens, bsz, P);
    *out = r.release();
    prof_report();
  });
}

// counts [bsz * nbest]: tokens per hypothesis (-1 where a sentence has fewer hypotheses).
void qr_result_counts(qr_result* r, int nbest, int32_t* counts) {
  for (size_t b = 0; b < r->r.sents.size(); ++b)
    for (int j = 0; j < nbest; ++j)
      counts[b * nbest + j] = j < (int)r->r.sents[b].size() ? (int32_t)r->r.sents[b][j].tokens.size() : -1;
}

// tokens: all hypotheses' tokens one after another (sizes from qr_result_counts); scores [bsz * nbest].
void qr_result_copy(qr_result* r, int nbest, int32_t* tokens, float* scores) {
  int64_t k = 0;
  for (size_t b = 0; b < r->r.sents.size(); ++b)
    for (int j = 0; j < nbest; ++j) {
      if (j >= (int)r->r.sents[b].size()) {
        scores[b * nbest + j] = NAN;
        continue;
      }
      const Hypo& h = r->r.sents[b][j];
      std::memcpy(tokens + k, h.tokens.data(), sizeof(int32_t) * h.tokens.size());
      k += h.tokens.size();
      scores[b * nbest + j] = h.score;
    }
}

void qr_result_free(qr_result* r) { delete r; }

}  // extern "C"
