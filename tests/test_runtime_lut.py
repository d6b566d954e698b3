"""The runtime's few-row BCQ products: exact fp32 tables against the dequantized weight, and the int16
tables' accuracy contract (docs/runtime.md): relative error (Frobenius, over all outputs of a product)
at most INT16_BOUND against the fp32 tables, on every shape and row count the few-row path serves."""
import os

import numpy as np
import pytest
import torch

from fairseq_qplugin.quant import QuantSpec, quantize
from fairseq_qplugin.quant.packed import pack_weight

INT16_BOUND = 5e-4  # the contract of docs/runtime.md ("Lookup tables"); measured up to 3.0e-4


@pytest.fixture(scope="module")
def rt():
    from fairseq_qruntime.model import BcqLayer, NativeUnavailable

    try:
        from fairseq_qruntime.model import load_library
        load_library()
    except NativeUnavailable as e:
        pytest.skip(f"runtime engine not built: {e}")
    return BcqLayer


def layers(BcqLayer, rows, cols, group_size=0):
    torch.manual_seed(rows * 7 + cols)
    w = torch.randn(rows, cols) * 0.05
    pw = pack_weight(quantize(w, QuantSpec("bcq", 3, group_size=group_size)))
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
    for n in (1, 3, 5, 8, 13, 24):
        x = rng.standard_normal((n, cols)).astype(np.float32)
        x[:, 3] *= 20.0  # one outlier column, as after layer norms: it sets the int16 tables' scale
        y = exact.linear(x)
        assert rel(y, x @ deq.T) < 1e-5, (n, "fp32 tables")
        if fast.lut != "int16":
            continue  # the CPU lacks AVX-512 VBMI / VNNI: fp32 tables (checked by test_lut_int16_fallback)
        err = rel(fast.linear(x), y)
        assert 2e-5 < err < INT16_BOUND, (n, err)  # int16 tables ran (not exact) and kept the contract
        assert np.array_equal(fast.linear(x, threads=2), fast.linear(x))  # threads split rows only
    if fast.lut == "int16":  # many rows: the dequantize + GEMM path, the same with either table type
        x = rng.standard_normal((64, cols)).astype(np.float32)
        assert np.array_equal(fast.linear(x), exact.linear(x))


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
