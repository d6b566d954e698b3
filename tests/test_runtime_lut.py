"""The runtime's BCQ products: the exact fp32 paths (lookup tables for few rows, dequantize + GEMM for
many) against the dequantized weight, and the int16 paths' accuracy contract (docs/runtime.md): relative
error (Frobenius, over all outputs of a product) at most INT16_BOUND against the fp32 paths, on every
shape and on row counts of both the few-row (int16 tables) and the many-row (int16 GEMM) path."""
import os

import numpy as np
import pytest
import torch

from fairseq_qplugin.quant import QuantSpec, quantize
from fairseq_qplugin.quant.packed import pack_weight

INT16_BOUND = 5e-4  # the contract of docs/runtime.md ("int16 products"); measured up to 3.0e-4


@pytest.fixture(scope="module")
def rt():
    from fairseq_qruntime.model import BcqLayer, NativeUnavailable

    try:
        from fairseq_qruntime.model import load_library
        load_library()
    except NativeUnavailable as e:
        pytest.skip(f"runtime engine not built: {e}")
    return BcqLayer


def layers(BcqLayer, rows, cols, group_size=0, bits=3):
    torch.manual_seed(rows * 7 + cols)
    w = torch.randn(rows, cols) * 0.05
    pw = pack_weight(quantize(w, QuantSpec("bcq", bits, group_size=group_size)))
    planes, alpha = pw.planes.numpy(), pw.alpha.float().numpy()
    deq = pw.dequantize_rows(slice(None)).float().numpy()
    return BcqLayer(planes, alpha, cols, "fp32"), BcqLayer(planes, alpha, cols, "int16"), deq


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# (rows, cols, BCQ group size): square, wide, tall, a partial 32-column chunk and row block, alpha groups
SHAPES = [(512, 512, 0), (512, 2048, 0), (2048, 512, 0), (100, 200, 0), (256, 1024, 128)]


@pytest.mark.parametrize("rows,cols,gs", SHAPES)
def test_lut_tables_fp32_exact_int16_within_bound(rt, rows, cols, gs):
    exact, fast, deq = layers(rt, rows, cols, gs)
    assert exact.lut == "fp32"
    rng = np.random.default_rng(0)
    for n in (1, 3, 5, 8, 13, 24, 25, 64, 161):  # int16: tables up to 96 rows, then GEMM (fp32: 24)
        x = rng.standard_normal((n, cols)).astype(np.float32)
        x[:, 3] *= 20.0  # one outlier column, as after layer norms: it sets the int16 scales
        y = exact.linear(x)
        assert rel(y, x @ deq.T) < 1e-5, (n, "fp32 products")
        if fast.lut != "int16":
            continue  # the CPU lacks AVX-512 VBMI / VNNI: fp32 products (checked by test_lut_int16_fallback)
        err = rel(fast.linear(x), y)
        assert 2e-5 < err < INT16_BOUND, (n, err)  # int16 products ran (not exact) and kept the contract
        assert np.array_equal(fast.linear(x, threads=2), fast.linear(x))  # threads split weight rows only


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_int16_gemm_other_bit_widths(rt, bits):
    """The int16 GEMM's weight tables (2^bits codes per row, 64 / 2^bits rows per vpermt2w table pair) for
    1, 2 and 4 bit planes, with alpha groups; 3 bits: the test above."""
    exact, fast, deq = layers(rt, 100, 512, 64, bits)
    x = np.random.default_rng(1).standard_normal((161, 512)).astype(np.float32)
    y = exact.linear(x)
    assert rel(y, x @ deq.T) < 1e-5
    if fast.lut == "int16":
        assert 2e-5 < rel(fast.linear(x), y) < INT16_BOUND


def test_int16_gemm_leaves_more_planes_to_fp32(rt):
    """More than 4 bit planes (not made by fairseq-qpack, but a model directory may hold them): the int16
    GEMM's code tables stop at 4, so such a weight takes the exact fp32 GEMM, not a wrong int16 one."""
    rng = np.random.default_rng(2)
    planes = rng.integers(0, 256, (5, 64, 64), dtype=np.uint8)
    alpha = rng.random((5, 64, 1), dtype=np.float32)
    exact, fast = rt(planes, alpha, 512, "fp32"), rt(planes, alpha, 512, "int16")
    x = rng.standard_normal((161, 512)).astype(np.float32)
    assert np.array_equal(fast.linear(x), exact.linear(x))


def test_int16_products_worst_case_sums(rt):
    """The int16 GEMM's int32 sums stay exact where every product is at its largest: all weights +sum(alpha)
    (every bit set), activations all equal and positive (the scale from sum |x|, not max |x|); an overflow
    would flip signs. The tables' sums likewise."""
    rows, cols = 64, 2048
    planes = np.full((3, rows, cols // 8), 0xFF, np.uint8)
    alpha = np.array([0.5, 0.25, 0.125], np.float32).reshape(3, 1, 1).repeat(rows, axis=1)
    exact, fast = rt(planes, alpha, cols, "fp32"), rt(planes, alpha, cols, "int16")
    for n in (1, 64):
        x = np.full((n, cols), 1000.0, np.float32)
        y = exact.linear(x)
        assert np.allclose(y, 0.875 * 1000.0 * cols, rtol=1e-6)
        assert rel(fast.linear(x), y) < INT16_BOUND, n


def test_lut_int16_fallback(rt):
    exact, fast, _ = layers(rt, 64, 64)
    with open("/proc/cpuinfo") as f:
        flags = f.read().replace("\n", " ")
    has = " avx512vbmi " in flags and " avx512_vnni " in flags
    avx512 = os.environ.get("QRUNTIME_ISA", "avx512") == "avx512"
    assert fast.lut == ("int16" if has and avx512 else "fp32")
    assert rt(*fast._arrays.values(), 64).lut == fast.lut  # "auto" (the default): int16 where the CPU has them
    with pytest.raises(ValueError, match="lut must be one of"):
        rt(np.zeros((3, 64, 8), np.uint8), np.ones((3, 64, 1), np.float32), 64, "int4")
