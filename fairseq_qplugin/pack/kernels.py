"""Kernels that compute with packed weights without building the fp32 weight matrix.

``packed_linear`` is the entry point (modules.py). BCQ, k-means and 1-7 bit int weights (an int
weight runs as a k-means one whose table per row is ``(code - zero_point) * scale``) go to the C++
extension ``_qkernels`` (csrc/, built by ``pip install``; AVX-512 / AVX2 / scalar chosen at run
time) when it is importable; otherwise, and for 8-bit int weights that FBGEMM does not run
(modules.py, int8.py), to the pure-torch kernels below. ``QPLUGIN_KERNELS`` selects: ``auto``
(default), ``torch`` (force the fallback), or an ISA for the extension (``avx512``, ``avx2``,
``scalar``; an ISA the CPU lacks is an error). The ``backend`` argument of ``packed_linear`` does
the same per call. Which one runs is logged once.

Pure-torch kernels:
- ``bcq_lut_gemm``: the BiQGEMM / LUT-GEMM product (METHODS.md §3). Input rows are split into
  chunks of 8 values; each chunk's 256 signed sums ``+-x_1 +- ... +-x_8`` form a table, and every
  packed byte of a bit-plane row indexes it: ``y_k[r] = sum_c table[c, planes[k, r, c]]``,
  ``y = sum_k alpha_k * y_k``. Weights are read as packed bits; the work per row of x is
  ``q * rows * cols / 8`` table look-ups, so it suits few activation rows (greedy decoding).
- ``blocked_linear``: for many activation rows (beam search, the encoder), dequantizes a block of
  ``block_rows`` weight rows at a time into fp32 and multiplies it with BLAS: one weight read
  serves all activation rows and at most one block is ever materialized. Its block values equal
  ``QuantizedWeight.dequantize()`` bit for bit (both apply the format's one dequantize rule,
  quant/packed.py), so outputs match the fake-quant model.
- ``packed_embedding``: dequantizes only the looked-up rows.
- Frequency-mixed BCQ (``PackedMixedBCQ``, a bit count per row): both entry points run the BCQ
  kernels once per bit group (``by_bits``), so work follows ``sum(row_bits)``.

Shapes: x float [n, cols] -> y float [n, rows]; tokens long [...] -> float [..., cols].
"""
import glob
import logging
import os

import torch
import torch.nn.functional as F

from ..quant.linear import int_decode
from ..quant.packed import PackedBCQ, PackedInt, PackedKMeans, PackedMixedBCQ, PackedWeight

logger = logging.getLogger(__name__)

try:
    from . import _qkernels
    _IMPORT_ERROR = None
    _ISAS = list(_qkernels.isas())
except (ImportError, OSError) as e:  # not built (no compiler, failed build, checkout without build_ext)
    built = glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "_qkernels*.so"))
    _qkernels, _ISAS = None, []
    _IMPORT_ERROR = f"{built[0]}: {e}" if built else (
        "the install did not build them: an isolated `pip install` cannot see torch; "
        "`pip install --no-build-isolation .` next to torch builds them")

BACKENDS = ("auto", "torch", "avx512", "avx2", "scalar")
_logged = set()

BLOCK_ROWS = 1024
LUT_MAX_ROWS = 8  # activation rows up to which the BCQ product uses the lookup table
_LUT_ELEMENTS = 1 << 22  # gathered values per block of the lookup kernel (16 MiB of fp32)


SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).float() * 2 - 1  # [b, j]: bit j of byte b, +-1


def blocked_linear(x: torch.Tensor, pw: PackedWeight, bias=None, block_rows: int = BLOCK_ROWS) -> torch.Tensor:
    """``F.linear(x, pw.dequantize(), bias)`` dequantizing ``block_rows`` weight rows at a time."""
    rows, out = pw.shape[0], []
    for r0 in range(0, rows, block_rows):
        r = torch.arange(r0, min(r0 + block_rows, rows))
        out.append(F.linear(x, pw.dequantize_rows(r), None if bias is None else bias[r]))
    return torch.cat(out, -1)


def lut_supported(pw: PackedWeight) -> bool:
    """Whether ``bcq_lut_gemm`` runs ``pw``: BCQ whose scale groups are whole bytes of the planes."""
    return isinstance(pw, PackedBCQ) and (pw.alpha.shape[-1] == 1 or (pw.cols // pw.alpha.shape[-1]) % 8 == 0)


def bcq_lut_gemm(x: torch.Tensor, pw: PackedBCQ) -> torch.Tensor:
    """LUT-GEMM: x float [n, cols] times the BCQ weight's transpose -> float [n, rows] (no bias)."""
    q, rows, nbytes = pw.planes.shape
    n = x.shape[0]
    x = F.pad(x.float(), (0, nbytes * 8 - pw.cols))
    table = (x.reshape(n, nbytes, 8) @ SIGNS.T).reshape(n, nbytes * 256)  # [n, chunk * 256 + byte]
    offsets = torch.arange(nbytes) * 256
    groups = pw.alpha.shape[-1]
    alpha = pw.alpha.float()
    block = max(1, _LUT_ELEMENTS // max(1, n * q * nbytes))
    out = x.new_empty(n, rows)
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        idx = pw.planes[:, r0:r1].long() + offsets  # [q, rb, chunks]
        sums = table[:, idx]  # [n, q, rb, chunks]
        sums = sums.reshape(n, q, r1 - r0, groups, nbytes // groups).sum(-1)  # [n, q, rb, groups]
        a = alpha if alpha.shape[1] == 1 else alpha[:, r0:r1]
        out[:, r0:r1] = (sums * a).sum((1, 3))
    return out


def extension_isas() -> list:
    """ISAs the C++ kernels run on this CPU, best first; [] if the extension is not built."""
    return list(_ISAS) if _qkernels is not None else []


def resolve_backend(backend=None) -> str:
    """``torch`` or the ISA the C++ kernels use, from ``backend`` or $QPLUGIN_KERNELS (default auto)."""
    want = (backend or os.environ.get("QPLUGIN_KERNELS") or "auto").lower()
    if want not in BACKENDS:
        raise ValueError(f"QPLUGIN_KERNELS / backend must be one of {BACKENDS}, got {want!r}")
    isas = extension_isas()
    if want not in ("auto", "torch", *isas):
        why = f"is not available on this CPU (available: {isas})" if isas else \
            f"asked for, but the C++ extension is not built ({_IMPORT_ERROR})"
        raise RuntimeError(f"kernel backend {want!r} {why}")
    got = want if want != "auto" else isas[0] if isas else "torch"
    if got not in _logged:
        _logged.add(got)
        if got == "torch" and _qkernels is None:
            logger.warning("fairseq-qplugin: C++ kernels not built (%s); using the pure-torch kernels "
                           "(5-20x slower)", _IMPORT_ERROR)
        else:
            logger.info("fairseq-qplugin: packed-weight kernels: %s", "pure torch" if got == "torch" else f"C++ {got}")
    return got


def _derived(pw: PackedWeight, name: str, make):
    """A tensor the C++ kernels read instead of (or beside) the packed fields, made on first use and
    kept with the weight (the packed weight objects live as long as their module, modules.py)."""
    if name not in pw.__dict__:
        pw.__dict__[name] = make()
    return pw.__dict__[name]


def _int_codebook(pw: PackedInt) -> torch.Tensor:
    """An int weight as a k-means one: ``(code - zero_point) * scale`` is entry ``code`` of a table of
    2^bits values per row (or one shared table), computed in fp32 exactly as ``dequantize()`` does,
    so the k-means kernels run int weights."""
    cb = int_decode(torch.arange(1 << pw.bits), pw.scale, pw.zero_point)
    return cb[0].contiguous() if cb.shape[0] == 1 else cb  # [2^bits] or [rows, 2^bits]


def _cpp_linear(x2: torch.Tensor, pw: PackedWeight, isa: str, small_max: int) -> torch.Tensor:
    if isinstance(pw, PackedBCQ):  # AVX-512's direct kernel reads the planes re-laid out (csrc/qkernels.h)
        lut = _derived(pw, "_lut_layout", lambda: _qkernels.bcq_lut_layout(pw.planes)) if isa == "avx512" else None
        return _qkernels.bcq_linear(x2, pw.planes, pw.alpha, pw.cols, isa, small_max, lut)
    if isinstance(pw, PackedInt):
        codebook = _derived(pw, "_codebook", lambda: _int_codebook(pw))
        return _qkernels.kmeans_linear(x2, pw.codes, codebook, None, pw.bits, pw.cols, isa, small_max)
    return _qkernels.kmeans_linear(x2, pw.indices, pw.codebook, pw.mask, pw.bits, pw.cols, isa, small_max)


def packed_linear(x: torch.Tensor, pw: PackedWeight, bias=None, lut_max_rows: int = LUT_MAX_ROWS,
                  block_rows: int = BLOCK_ROWS, backend=None, small_max: int = -1) -> torch.Tensor:
    """y [..., rows] = x [..., cols] @ W^T + bias, choosing the kernel by the number of activation rows.

    With the C++ kernels (BCQ, k-means on CPU), ``small_max`` is the activation-row count up to which
    the direct kernel runs instead of dequantize-tile + BLAS (-1: the measured default).
    ``lut_max_rows`` / ``block_rows`` steer the pure-torch kernels.
    """
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    # 8-bit int weights stay on the pure-torch path (FBGEMM normally runs them first, modules.py):
    # a table of 256 floats per row would be larger than the codes.
    cpp = x.is_cpu and (isinstance(pw, (PackedBCQ, PackedKMeans)) or (isinstance(pw, PackedInt) and pw.bits < 8))
    if isinstance(pw, PackedMixedBCQ):
        # One BCQ product per bit group, its outputs scattered into the group's rows: work and weight
        # reads follow sum(row_bits), not rows * max(row_bits).
        y = x2.new_empty(x2.shape[0], pw.shape[0])
        for rows, group in pw.by_bits:
            y[:, rows] = packed_linear(x2, group, None, lut_max_rows, block_rows, backend, small_max).to(y.dtype)
    elif cpp and (isa := resolve_backend(backend)) != "torch":
        y = _cpp_linear(x2, pw, isa, small_max).to(x.dtype)
    elif x2.shape[0] <= lut_max_rows and lut_supported(pw):
        y = bcq_lut_gemm(x2, pw).to(x.dtype)
    else:
        return blocked_linear(x2, pw, bias, block_rows).reshape(*lead, -1)
    if bias is not None:
        y.add_(bias)  # y is a fresh tensor
    return y.reshape(*lead, -1)


def packed_embedding(tokens: torch.Tensor, pw: PackedWeight) -> torch.Tensor:
    """Rows of the packed embedding table for ``tokens`` (long [...]) -> float [..., cols]."""
    uniq, inverse = tokens.reshape(-1).unique(return_inverse=True)
    return pw.dequantize_rows(uniq)[inverse].reshape(*tokens.shape, pw.cols)
