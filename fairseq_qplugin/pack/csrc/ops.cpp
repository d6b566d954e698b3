// Torch binding of the packed-weight kernels: ISA dispatch at run time, threading over output rows,
// and the many-rows path (dequantize a tile of weight rows into a small fp32 buffer, then BLAS).
//
//   bcq_linear(x, planes, alpha, cols, isa, small_max, layout) -> y      x fp32 [n, cols], y fp32 [n, rows]
//   bcq_lut_layout(planes) -> layout   the planes as the AVX-512 direct kernel reads them (qkernels.h);
//                                       made per call when bcq_linear gets none (callers cache it)
//   kmeans_linear(x, indices, codebook, mask, bits, cols, isa, small_max) -> y
//   isas() -> the kernel sets this CPU can run, best first ("avx512", "avx2", "scalar")
//
// isa "" = the best this CPU runs; small_max < 0 = the measured default crossover (see below).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <cstdlib>
#include <string>
#include <vector>

#include "qkernels.h"

namespace qk {
int64_t kTileElems = 1 << 18;
int64_t kTileCols = 512;
namespace {

// Activation rows up to which the direct kernels beat dequantize-tile + BLAS (measured with
// benchmarks/bench_layers.py --crossover, one thread, on the 2-core Sapphire Rapids class dev Xeon;
// see docs/packed.md): BCQ 3-bit and k-means 4-bit both break even at 24-32 rows.
constexpr int kBcqSmallMaxAvx512 = 24;
constexpr int kBcqSmallMaxLut = 2;
constexpr int kKmSmallMaxAvx512 = 24;
constexpr int kKmSmallMaxGeneric = 1;
// Weights per dequantized tile of the BLAS path: 512 x 512 fp32 = 1 MiB, cache resident.
constexpr int kLutChunks = 256;  // 8-column chunks per LUT block: 256 KiB of tables per activation row

std::vector<const Kernels*> supported() {
  std::vector<const Kernels*> out;
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("bmi2"))
    out.push_back(&avx512_kernels);
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) out.push_back(&avx2_kernels);
#endif
  out.push_back(&scalar_kernels);
  return out;
}

const Kernels* pick(const std::string& isa) {
  static const std::vector<const Kernels*> ok = supported();
  if (isa.empty()) return ok.front();
  for (const Kernels* k : ok)
    if (isa == k->name) return k;
  TORCH_CHECK(false, "qkernels: ISA '", isa, "' is not available on this CPU (available: ", ok.front()->name,
              " and below)");
  return nullptr;
}

// The portable kernels this CPU runs best (AVX2 or scalar): they take any alpha grouping.
const Kernels* generic(const Kernels* k) {
#if defined(__x86_64__) || defined(_M_X64)
  if (k == &avx512_kernels) return &avx2_kernels;
#endif
  return k;
}

int64_t round16(int64_t c) { return (c + 15) / 16 * 16; }

// x [n, cols] -> contiguous fp32 [n, round16(cols)] with zero padding.
torch::Tensor padded(const torch::Tensor& x, int64_t cols) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == cols, "qkernels: x must be [n, ", cols, "], got ", x.sizes());
  auto xf = x.to(torch::kFloat);
  const int64_t xs = round16(cols);
  if (xs == cols) return xf.contiguous();
  auto out = torch::zeros({x.size(0), xs}, xf.options());
  out.narrow(1, 0, cols).copy_(xf);
  return out;
}

// The many-rows path: y = x @ W^T computed as y^T[r0:r1] += deq(W[r0:r1, c0:c1]) @ x^T[c0:c1], one tile
// of kTileRows x kTileCols weights at a time (a 1 MiB fp32 buffer: no full weight matrix is built,
// and BLAS gets tiles big enough to run near its peak). Writing y^T keeps the BLAS output contiguous.
template <typename Deq>
torch::Tensor tiled_blas(const torch::Tensor& xp, int64_t rows, Deq deq) {
  const int64_t n = xp.size(0), xs = xp.size(1);
  const int64_t tc = std::min<int64_t>(xs, kTileCols);
  const int64_t tr = std::min<int64_t>(rows, std::max<int64_t>(16, kTileElems / tc / 16 * 16));
  // The tile buffer is kept per calling thread: a fresh 1 MiB allocation per call costs page faults.
  static thread_local torch::Tensor buf;
  if (!buf.defined() || buf.numel() < tr * tc) buf = torch::empty({std::max(kTileElems, tr * tc)}, xp.options());
  float* b = buf.data_ptr<float>();
  auto yt = torch::empty({rows, n}, xp.options());
  for (int64_t r0 = 0; r0 < rows; r0 += tr) {
    const int64_t rb = std::min(tr, rows - r0);
    auto out = yt.narrow(0, r0, rb);
    for (int64_t c0 = 0; c0 < xs; c0 += tc) {
      const int64_t cb = std::min(tc, xs - c0);
      at::parallel_for(0, rb, 8, [&](int64_t lo, int64_t hi) {
        deq((int)(r0 + lo), (int)(r0 + hi), (int)c0, (int)(c0 + cb), b + lo * tc, (int)tc);
      });
      auto tile = buf.narrow(0, 0, rb * tc).view({rb, tc}).narrow(1, 0, cb);
      auto xt = xp.narrow(1, c0, cb).t();
      if (c0 == 0) at::mm_out(out, tile, xt);
      else out.addmm_(tile, xt);
    }
  }
  return yt.t();
}

torch::Tensor bcq_lut_layout(torch::Tensor planes) {
  TORCH_CHECK(planes.dim() == 3 && planes.scalar_type() == torch::kUInt8, "qkernels: planes must be uint8 [q, rows, nbytes]");
  planes = planes.contiguous();
  const int64_t q = planes.size(0), rows = planes.size(1), nbytes = planes.size(2);
  const int64_t nrb = (rows + 15) / 16, chunks = (nbytes + 3) / 4;
  // The kernel loads whole 64-byte blocks with aligned loads: torch's CPU allocator aligns to 64 bytes.
  auto out = torch::zeros({q * nrb * chunks * 16}, planes.options().dtype(torch::kInt32));
  const uint8_t* p = planes.data_ptr<uint8_t>();
  uint8_t* o = reinterpret_cast<uint8_t*>(out.data_ptr<int32_t>());
  TORCH_CHECK(reinterpret_cast<uintptr_t>(o) % 64 == 0, "qkernels: unaligned allocation");
  at::parallel_for(0, q * rows, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t kr = lo; kr < hi; ++kr) {
      const int64_t k = kr / rows, r = kr % rows;
      const uint8_t* src = p + kr * nbytes;
      for (int64_t c = 0; c < chunks; ++c)  // little-endian dword: bit j = column 32 c + j
        std::memcpy(o + ((((k * nrb + r / 16) * chunks + c) * 16) + r % 16) * 4, src + 4 * c,
                    std::min<int64_t>(4, nbytes - 4 * c));
    }
  });
  return out;
}

torch::Tensor bcq_linear(torch::Tensor x, torch::Tensor planes, torch::Tensor alpha, int64_t cols, std::string isa,
                         int64_t small_max, c10::optional<torch::Tensor> layout) {
  TORCH_CHECK(planes.dim() == 3 && planes.scalar_type() == torch::kUInt8 && planes.size(2) == (cols + 7) / 8,
              "qkernels: planes must be uint8 [q, rows, ceil(cols/8)]");
  planes = planes.contiguous();
  alpha = alpha.to(torch::kFloat).contiguous();
  const int64_t q = planes.size(0), rows = planes.size(1);
  TORCH_CHECK(alpha.dim() == 3 && alpha.size(0) == q && (alpha.size(1) == rows || alpha.size(1) == 1) &&
                  cols % alpha.size(2) == 0,
              "qkernels: alpha ", alpha.sizes(), " does not fit planes ", planes.sizes());
  const Kernels* K = pick(isa);
  const bool aligned = alpha.size(2) == 1 || (cols / alpha.size(2)) % K->bcq_group_align == 0;
  if (!aligned) K = generic(K);  // AVX-512 needs groups of whole 32-column chunks
  BCQ w{planes.data_ptr<uint8_t>(), alpha.data_ptr<float>(), (int)q, (int)rows, (int)cols, (int)planes.size(2),
        (int)alpha.size(2), alpha.size(1) == 1 && rows != 1, nullptr, (int)((cols + 31) / 32)};
  auto xp = padded(x, cols);
  const int64_t n = xp.size(0), xs = xp.size(1);
  const bool lut_ok = w.groups == 1 || (cols / w.groups) % K->bcq_group_align == 0;
  if (small_max < 0) small_max = K->bcq_gemv ? kBcqSmallMaxAvx512 : kBcqSmallMaxLut;
  if (n == 0 || rows == 0) return torch::zeros({n, rows}, xp.options());
  if (n > small_max || !lut_ok) {
    return tiled_blas(xp, rows, [&](int r0, int r1, int c0, int c1, float* o, int ws) { K->bcq_deq(w, r0, r1, c0, c1, o, ws); });
  }
  const float* xd = xp.data_ptr<float>();
  auto y = torch::zeros({n, rows}, xp.options());
  float* yd = y.data_ptr<float>();
  if (K->bcq_gemv) {
    const int64_t nrb = (rows + 15) / 16;
    torch::Tensor lt = layout.has_value() ? *layout : bcq_lut_layout(planes);
    TORCH_CHECK(lt.scalar_type() == torch::kInt32 && lt.is_contiguous() && lt.numel() == q * nrb * w.chunks * 16 &&
                    reinterpret_cast<uintptr_t>(lt.data_ptr<int32_t>()) % 64 == 0,
                "qkernels: layout is not bcq_lut_layout(planes)");
    w.lut = reinterpret_cast<const uint32_t*>(lt.data_ptr<int32_t>());
    at::parallel_for(0, nrb, 4, [&](int64_t rb0, int64_t rb1) {
      K->bcq_gemv(w, xd, (int)n, (int)xs, yd, (int)rows, (int)rb0, (int)rb1);
    });
    return y;
  }
  const int nchunks = w.nbytes;
  auto lut = torch::empty({n, std::min(nchunks, kLutChunks), 256}, xp.options());
  float* ld = lut.data_ptr<float>();
  for (int c0 = 0; c0 < nchunks; c0 += kLutChunks) {
    const int c1 = std::min(nchunks, c0 + kLutChunks);
    K->lut_build(xd, (int)n, (int)xs, c0, c1, ld);
    at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
      K->bcq_lut(w, ld, (int)n, c0, c1, yd, (int)rows, (int)r0, (int)r1);
    });
  }
  return y;
}

torch::Tensor kmeans_linear(torch::Tensor x, torch::Tensor indices, torch::Tensor codebook,
                            c10::optional<torch::Tensor> mask, int64_t bits, int64_t cols, std::string isa,
                            int64_t small_max) {
  TORCH_CHECK(bits >= 1 && bits <= 8, "qkernels: k-means bits must be 1..8");
  TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == torch::kUInt8 &&
                  indices.size(1) == (cols * bits + 7) / 8,
              "qkernels: indices must be uint8 [rows, ceil(cols*bits/8)]");
  indices = indices.contiguous();
  codebook = codebook.to(torch::kFloat).contiguous();
  const int64_t rows = indices.size(0), k = int64_t(1) << bits;
  TORCH_CHECK((codebook.dim() == 1 && codebook.size(0) == k) ||
                  (codebook.dim() == 2 && codebook.size(0) == rows && codebook.size(1) == k),
              "qkernels: codebook ", codebook.sizes(), " does not fit ", bits, " bits and ", rows, " rows");
  torch::Tensor m;
  if (mask.has_value()) {
    m = mask->contiguous();
    TORCH_CHECK(m.scalar_type() == torch::kUInt8 && m.dim() == 2 && m.size(0) == rows && m.size(1) == (cols + 7) / 8,
                "qkernels: mask must be uint8 [rows, ceil(cols/8)]");
  }
  const Kernels* K = pick(isa);
  if (bits > K->km_max_bits) K = &scalar_kernels;
  KMeans w{indices.data_ptr<uint8_t>(), codebook.data_ptr<float>(), m.defined() ? m.data_ptr<uint8_t>() : nullptr,
           (int)bits, (int)rows, (int)cols, (int)indices.size(1), (int)((cols + 7) / 8), codebook.dim() == 2};
  auto xp = padded(x, cols);
  const int64_t n = xp.size(0), xs = xp.size(1);
  if (small_max < 0) small_max = K == &scalar_kernels || K->km_max_bits == 8 ? kKmSmallMaxGeneric : kKmSmallMaxAvx512;
  if (n == 0 || rows == 0) return torch::zeros({n, rows}, xp.options());
  if (n > small_max) {
    return tiled_blas(xp, rows, [&](int r0, int r1, int c0, int c1, float* o, int ws) { K->km_deq(w, r0, r1, c0, c1, o, ws); });
  }
  auto y = torch::empty({n, rows}, xp.options());
  const float* xd = xp.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, rows, 64, [&](int64_t r0, int64_t r1) {
    K->km_gemv(w, xd, (int)n, (int)xs, yd, (int)rows, (int)r0, (int)r1);
  });
  return y;
}

std::vector<std::string> isas() {
  std::vector<std::string> out;
  for (const Kernels* k : supported()) out.push_back(k->name);
  return out;
}

}  // namespace
}  // namespace qk

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fairseq-qplugin CPU kernels over packed BCQ and k-means weights (see pack/kernels.py)";
  m.def("bcq_linear", &qk::bcq_linear, "x @ W^T for a packed BCQ weight", py::arg("x"), py::arg("planes"),
        py::arg("alpha"), py::arg("cols"), py::arg("isa") = "", py::arg("small_max") = -1, py::arg("layout") = py::none());
  m.def("bcq_lut_layout", &qk::bcq_lut_layout, "BCQ planes as the AVX-512 direct kernel reads them", py::arg("planes"));
  m.def("kmeans_linear", &qk::kmeans_linear, "x @ W^T for a packed k-means weight", py::arg("x"), py::arg("indices"),
        py::arg("codebook"), py::arg("mask") = py::none(), py::arg("bits"), py::arg("cols"), py::arg("isa") = "",
        py::arg("small_max") = -1);
  m.def("_set_tile", [](int64_t e, int64_t c) { qk::kTileElems = e; qk::kTileCols = c; });
  m.def("isas", &qk::isas, "kernel ISAs this CPU runs, best first");
}
