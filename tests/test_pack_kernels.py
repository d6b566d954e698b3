"""C++ kernels (pack/csrc, ``_qkernels``) against the dequantized reference, each ISA path, and the fallback."""
import logging
import platform
import shutil

import pytest
import torch

from fairseq_qplugin.pack import kernels
from fairseq_qplugin.quant.packed import PackedBCQ, PackedKMeans, pack_weight
from fairseq_qplugin.pack.kernels import extension_isas, packed_linear, resolve_backend
from fairseq_qplugin.quant import QuantSpec, kmeans_weight, magnitude_mask, quantize

ISAS = extension_isas()
needs_ext = pytest.mark.skipif(not ISAS, reason=f"C++ kernels not built ({kernels._IMPORT_ERROR})")
SHAPES = [(1, 8), (7, 13), (33, 64), (16, 100), (300, 24), (40, 257), (50, 256), (20, 1100)]
ROWS = [1, 2, 3, 5, 8, 20, 64]
TOL = 1e-4


def test_extension_is_built_where_a_compiler_exists():
    """scripts/setup_env.sh builds the kernels into the working tree; a broken build must not pass
    silently as 'kernel tests skipped' on a machine (like CI) that can compile them."""
    if not (shutil.which("c++") or shutil.which("g++")) or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no C++ compiler or not x86-64: the pure-torch kernels are the expected path")
    assert ISAS, f"C++ kernels not importable: {kernels._IMPORT_ERROR}"
    assert ISAS[-1] == "scalar"


def _rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-30))


def bcq_weights(w):
    """BCQ 1..4 bits, per-row and per-tensor alphas, and (where cols allow) 2 and 4 input groups."""
    out = []
    for bits in range(1, 5):
        pw = pack_weight(quantize(w, QuantSpec("bcq", bits, granularity="channel" if bits % 2 else "tensor")))
        out.append(pw)
        for groups in (2, 4):
            if w.shape[1] % groups == 0:
                alpha = torch.rand(bits, pw.alpha.shape[1], groups, dtype=torch.float16) + 0.1
                out.append(PackedBCQ(pw.planes, alpha, pw.cols))
    return out


def kmeans_weights(w):
    """k-means 1..4 bits (and 6), per-tensor and per-row codebooks, with and without a pruning mask."""
    mask = magnitude_mask(w, 0.5)
    return [pack_weight(kmeans_weight(w, bits, gran, iters=2, mask=m))
            for bits in (1, 2, 3, 4, 6) for gran in ("tensor", "channel") for m in (None, mask)]


def int_weights(w):
    """int 1..7 bits (8 runs on FBGEMM), per-row and per-tensor scales: run as k-means tables."""
    return [pack_weight(quantize(w, QuantSpec("int", bits, granularity=gran)))
            for bits in (1, 2, 3, 4, 5, 7) for gran in ("tensor", "channel")]


def all_weights(w):
    return bcq_weights(w) + kmeans_weights(w) + int_weights(w)


def _check(pw, x, isa, small_max=-1):
    ref = x.double() @ pw.dequantize().double().T
    y = packed_linear(x, pw, backend=isa, small_max=small_max)
    assert y.shape == ref.shape and y.dtype == x.dtype
    err = _rel_err(y, ref)
    assert err <= TOL, (type(pw).__name__, pw.bits, list(pw.shape), x.shape[0], isa, small_max, err)


@needs_ext
@pytest.mark.parametrize("shape", SHAPES)
def test_cpp_kernels_match_dequantized_matmul(shape):
    """Best ISA, direct kernel (small_max=64) and dequantize-tile + BLAS (small_max=0), 1..64 rows."""
    torch.manual_seed(0)
    w = torch.randn(shape)
    pws = all_weights(w)
    for n in ROWS:
        x = torch.randn(n, shape[1])
        for pw in pws:
            for small_max in (-1, 0, 64):
                _check(pw, x, ISAS[0], small_max)


@needs_ext
@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_path_matches_the_reference(isa):
    torch.manual_seed(1)
    for shape in [(7, 13), (33, 64), (40, 257)]:
        w = torch.randn(shape)
        for n in (1, 3, 9):
            x = torch.randn(n, shape[1])
            for pw in all_weights(w):
                for small_max in (0, 64):
                    _check(pw, x, isa, small_max)


@needs_ext
def test_isa_paths_agree():
    """AVX-512, AVX2 and scalar give the same result (up to fp32 summation order)."""
    torch.manual_seed(2)
    w, x = torch.randn(70, 200), torch.randn(4, 200)
    for pw in all_weights(w):
        ys = [packed_linear(x, pw, backend=isa, small_max=64) for isa in ISAS]
        for y in ys[1:]:
            assert torch.allclose(y, ys[0], rtol=1e-5, atol=1e-5 * float(ys[0].abs().max()))


@needs_ext
def test_cpp_kernels_large_layers_and_bias():
    """Transformer-sized layers, leading dims, bias, and the row tiling of the BLAS path (> 512 rows)."""
    torch.manual_seed(3)
    w = torch.randn(1100, 520) * 0.05
    bias = torch.randn(1100)
    x = torch.randn(2, 3, 520)
    for pw in (pack_weight(quantize(w, QuantSpec("bcq", 3))), pack_weight(kmeans_weight(w, 4, iters=2))):
        ref = x.double() @ pw.dequantize().double().T + bias.double()
        for small_max in (-1, 0, 64):
            assert _rel_err(packed_linear(x, pw, bias, small_max=small_max), ref) <= TOL


def test_fallback_matches_reference():
    """The pure-torch kernels (always available) on the same weights."""
    torch.manual_seed(4)
    for shape in [(7, 13), (33, 64)]:
        w = torch.randn(shape)
        for n in (1, 5, 20):
            x = torch.randn(n, shape[1])
            for pw in all_weights(w):
                _check(pw, x, "torch")


@needs_ext
def test_fallback_equals_kernel():
    torch.manual_seed(5)
    w = torch.randn(45, 96)
    for n in (1, 7, 30):
        x = torch.randn(n, 96)
        for pw in all_weights(w):
            a, b = packed_linear(x, pw, backend="torch"), packed_linear(x, pw)
            assert _rel_err(b, a.double()) <= TOL


def test_backend_env_var_and_errors(monkeypatch):
    monkeypatch.setenv("QPLUGIN_KERNELS", "torch")
    assert resolve_backend() == "torch"
    monkeypatch.setenv("QPLUGIN_KERNELS", "auto")
    assert resolve_backend() == (ISAS[0] if ISAS else "torch")
    with pytest.raises(ValueError, match="must be one of"):
        resolve_backend("cuda")
    if ISAS and "avx512" not in ISAS:
        with pytest.raises(RuntimeError, match="not available on this CPU"):
            resolve_backend("avx512")


def test_backend_choice_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(kernels, "_logged", set())
    with caplog.at_level(logging.INFO, logger="fairseq_qplugin.pack.kernels"):
        resolve_backend("torch")
        resolve_backend("torch")
    assert sum("pure torch" in r.message for r in caplog.records) == 1


@needs_ext
def test_int_weights_and_half_inputs_still_work():
    """int weights keep the torch kernels; fp16 activations come back as fp16."""
    torch.manual_seed(6)
    w = torch.randn(20, 40)
    pi = pack_weight(quantize(w, QuantSpec("int", 8)))
    x = torch.randn(3, 40)
    assert _rel_err(packed_linear(x, pi), x.double() @ pi.dequantize().double().T) <= TOL
    pk = pack_weight(kmeans_weight(w, 4, iters=2))
    assert isinstance(pk, PackedKMeans)
    assert packed_linear(x.half(), pk).dtype == torch.float16


def test_missing_extension_falls_back(monkeypatch, caplog):
    """As after a failed build: auto -> pure torch, with a warning; asking for an ISA is an error."""
    monkeypatch.setattr(kernels, "_qkernels", None)
    monkeypatch.setattr(kernels, "_logged", set())
    torch.manual_seed(7)
    pw = pack_weight(quantize(torch.randn(9, 24), QuantSpec("bcq", 2)))
    x = torch.randn(2, 24)
    with caplog.at_level(logging.WARNING, logger="fairseq_qplugin.pack.kernels"):
        y = packed_linear(x, pw)
    assert any("not built" in r.message for r in caplog.records)
    assert _rel_err(y, x.double() @ pw.dequantize().double().T) <= TOL
    with pytest.raises(RuntimeError, match="not built"):
        resolve_backend("scalar")
