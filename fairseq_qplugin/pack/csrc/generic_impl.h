// Portable kernels, written as plain loops for the compiler to vectorize. Included twice: by
// scalar.cpp (baseline ISA, any architecture) and by avx2.cpp (under `#pragma GCC target("avx2,fma")`),
// each time inside its own namespace. No templates from torch or std here (see qkernels.h).
//
// BCQ with few activation rows is the LUT-GEMM of BiQGEMM / LUT-GEMM (METHODS.md §3): per 8-column
// chunk a 256-entry table of the signed sums +-x_1 ... +-x_8, indexed by the packed bytes.

static inline int imin(int a, int b) { return a < b ? a : b; }

// Code j of a packed little-endian bit stream of `bits`-bit codes (bits <= 8: spans <= 2 bytes).
static inline unsigned code_at(const uint8_t* p, int nbytes, int j, int bits) {
  const int bit = j * bits, byte = bit >> 3;
  unsigned v = p[byte];
  if (byte + 1 < nbytes) v |= (unsigned)p[byte + 1] << 8;
  return (v >> (bit & 7)) & ((1u << bits) - 1);
}

static void lut_build(const float* x, int n, int xs, int c0, int c1, float* lut) {
  // lut[i][c - c0][b] = sum_j (bit j of b ? +x : -x)[i][8c + j]; entry b adds 2 x_j to entry b - 2^j.
  const int nc = c1 - c0;
  for (int i = 0; i < n; ++i) {
    for (int c = c0; c < c1; ++c) {
      const float* xc = x + (int64_t)i * xs + 8 * c;
      float* t = lut + ((int64_t)i * nc + (c - c0)) * 256;
      float s = 0.f;
      for (int j = 0; j < 8; ++j) s -= xc[j];
      t[0] = s;
      for (int j = 0; j < 8; ++j) {
        const float d = 2.f * xc[j];
        const int h = 1 << j;
        for (int b = 0; b < h; ++b) t[h + b] = t[b] + d;
      }
    }
  }
}

static void bcq_lut(const BCQ& w, const float* lut, int n, int c0, int c1, float* y, int ys, int r0, int r1) {
  const int nc = c1 - c0;
  const int cpg = w.groups == 1 ? w.nbytes : (w.cols / w.groups) / 8;  // chunks per alpha group
  for (int r = r0; r < r1; ++r) {
    for (int i = 0; i < n; ++i) {
      const float* t = lut + (int64_t)i * nc * 256;
      float acc = 0.f;
      for (int k = 0; k < w.q; ++k) {
        const uint8_t* p = w.planes + ((int64_t)k * w.rows + r) * w.nbytes;
        for (int g0 = c0; g0 < c1;) {  // a run of chunks inside one alpha group
          const int g = g0 / cpg, g1 = imin(c1, (g + 1) * cpg);
          float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
          int c = g0;
          for (; c + 4 <= g1; c += 4) {
            const float* tc = t + (int64_t)(c - c0) * 256;
            s0 += tc[p[c]];
            s1 += tc[256 + p[c + 1]];
            s2 += tc[512 + p[c + 2]];
            s3 += tc[768 + p[c + 3]];
          }
          for (; c < g1; ++c) s0 += t[(int64_t)(c - c0) * 256 + p[c]];
          acc += *w.a(k, r, g) * ((s0 + s1) + (s2 + s3));
          g0 = g1;
        }
      }
      y[(int64_t)i * ys + r] += acc;
    }
  }
}

static void bcq_deq(const BCQ& w, int r0, int r1, int c0, int c1, float* out, int ws) {
  const int gs = w.cols / w.groups, ce = imin(c1, w.cols);
  for (int r = r0; r < r1; ++r) {
    float* o = out + (int64_t)(r - r0) * ws - c0;
    for (int c = c0; c < c1; ++c) o[c] = 0.f;
    for (int k = 0; k < w.q; ++k) {
      const uint8_t* p = w.planes + ((int64_t)k * w.rows + r) * w.nbytes;
      for (int g = c0 / gs; g < w.groups && g * gs < ce; ++g) {
        const float a = *w.a(k, r, g);
        const int e = imin(ce, (g + 1) * gs);
        int c = g * gs > c0 ? g * gs : c0;
        if ((c & 7) == 0) {  // whole bytes: 8 columns at a time, branch-free (vectorizes with AVX2)
          const float a2 = 2.f * a;
          for (; c + 8 <= e; c += 8) {
            const unsigned v = p[c >> 3];
            float* oc = o + c;
            for (int j = 0; j < 8; ++j) oc[j] += (float)((v >> j) & 1u) * a2 - a;
          }
        }
        const float pm[2] = {-a, a};  // indexed by the bit: no data-dependent branch
        for (; c < e; ++c) o[c] += pm[(p[c >> 3] >> (c & 7)) & 1];
      }
    }
  }
}

static void km_deq(const KMeans& w, int r0, int r1, int c0, int c1, float* out, int ws) {
  const int ce = imin(c1, w.cols);
  for (int r = r0; r < r1; ++r) {
    float* o = out + (int64_t)(r - r0) * ws - c0;
    const uint8_t* p = w.indices + (int64_t)r * w.rowbytes;
    const float* cb = w.cb(r);
    if (w.bits == 8) {
      for (int c = c0; c < ce; ++c) o[c] = cb[p[c]];
    } else if (8 % w.bits == 0) {  // whole codes per byte: 2^lp codes of 2^(3 - lp) bits
      const int lp = w.bits == 1 ? 3 : w.bits == 2 ? 2 : 1, per = 1 << lp;
      const unsigned m = (1u << w.bits) - 1;
      for (int c = c0; c < ce; ++c) o[c] = cb[(p[c >> lp] >> ((c & (per - 1)) * w.bits)) & m];
    } else {
      for (int c = c0; c < ce; ++c) o[c] = cb[code_at(p, w.rowbytes, c, w.bits)];
    }
    if (w.mask) {
      const uint8_t* mk = w.mask + (int64_t)r * w.maskbytes;
      for (int c = c0; c < ce; ++c) o[c] *= (float)((mk[c >> 3] >> (c & 7)) & 1);  // codebook values are finite
    }
    for (int c = ce; c < c1; ++c) o[c] = 0.f;
  }
}

static void km_gemv(const KMeans& w, const float* x, int n, int xs, float* y, int ys, int r0, int r1) {
  float* buf = new float[xs];
  for (int r = r0; r < r1; ++r) {
    km_deq(w, r, r + 1, 0, xs, buf, xs);
    for (int i = 0; i < n; ++i) {
      const float* xi = x + (int64_t)i * xs;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int c = 0; c < xs; ++c) s += buf[c] * xi[c];
      y[(int64_t)i * ys + r] = s;
    }
  }
  delete[] buf;
}
