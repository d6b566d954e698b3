"""The int8 GEMM for packed 8-bit weights (pack/int8.py) against the dequantized reference and torch.ao."""
import logging

import pytest
import torch
import torch.nn.functional as F

from fairseq_qplugin.pack import int8
from fairseq_qplugin.quant.packed import pack_weight
from fairseq_qplugin.pack.modules import PackedLinear, PackedParams
from fairseq_qplugin.quant import QuantSpec, quantize

needs_engine = pytest.mark.skipif(int8.prepack(pack_weight(quantize(torch.randn(2, 4), QuantSpec("int", 8))), None)
                                  is None, reason="torch has no usable quantized engine")


def weight(shape, scheme, granularity, dtype=torch.float16):
    w = torch.randn(shape) * 0.05 + (0.02 if scheme == "asym" else 0)  # asym: zero points away from 128
    return pack_weight(quantize(w, QuantSpec("int", 8, scheme, granularity)), dtype)


def activation_step(x):
    """The step of fbgemm's dynamic activation quantization: 7 bits over [min(x, 0), max(x, 0)]."""
    return float(x.max().clamp(min=0) - x.min().clamp(max=0)) / 127


@needs_engine
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
@pytest.mark.parametrize("shape,n", [((1, 8), 1), ((7, 13), 3), ((64, 96), 5), ((300, 64), 40)])
def test_int8_gemm_is_within_the_activation_quantization_bound(scheme, granularity, shape, n):
    pw = weight(shape, scheme, granularity)
    if scheme == "asym":
        assert (pw.zero_point != 128).any()
    bias = torch.randn(shape[0])
    x = torch.randn(n, shape[1])
    w = pw.dequantize().double()
    ref = x.double() @ w.T + bias.double()
    y = int8.int8_linear(x, int8.prepack(pw, bias))
    bound = activation_step(x) * w.abs().sum(1) + 1e-5 * ref.abs() + 1e-6
    assert ((y.double() - ref).abs() <= bound).all()
    assert float((y.double() - ref).norm() / ref.norm()) <= 2e-2


@needs_engine
@pytest.mark.parametrize("granularity", ["channel", "tensor"])
def test_int8_gemm_equals_torch_ao_dynamic_linear(granularity):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    pw = weight((48, 40), "asym", granularity)
    bias = torch.randn(48)
    ao = DynamicLinear(40, 48)
    ao.set_weight_bias(int8.qint8_weight(pw), bias)
    assert torch.equal(ao.weight().dequantize(), pw.dequantize())  # same quantized weight
    x = torch.randn(2, 7, 40)
    assert torch.equal(int8.int8_linear(x, int8.prepack(pw, bias)), ao(x))


@needs_engine
def test_packed_linear_uses_int8_gemm_only_for_8_bit_int():
    x = torch.randn(6, 32)
    for bits, kernel in [(8, "fbgemm"), (8, "dequant"), (4, "fbgemm")]:
        pw = pack_weight(quantize(torch.randn(16, 32), QuantSpec("int", bits)), torch.float32)
        wq = PackedParams("int", pw.shape)
        wq.set_packed(pw)
        bias = torch.nn.Parameter(torch.randn(16))
        lin = PackedLinear(32, 16, wq, bias, int8_kernel=kernel)
        y = lin(x)
        # fp32 kernels agree with the reference to summation order; FBGEMM quantizes the activations
        close = torch.allclose(y, F.linear(x, pw.dequantize(), bias), rtol=1e-5, atol=1e-5)
        assert close == (kernel == "dequant" or bits != 8), (bits, kernel)
        assert (lin._int8 is not None) == (kernel == "fbgemm" and bits == 8)
        if lin._int8 is not None:  # the bias is folded into the prepacked weight: an update re-packs
            with torch.no_grad():
                bias.add_(1)
            assert torch.allclose(lin(x), y + 1, atol=1e-5)


def test_unavailable_engine_falls_back_with_one_log_line(monkeypatch, caplog):
    def refuse(*args):
        raise RuntimeError("quantized::linear_prepack: no engine\nmore detail")

    monkeypatch.setattr(torch.ops.quantized, "linear_prepack", refuse)
    monkeypatch.setattr(int8, "_warned", set())
    pw = weight((16, 32), "sym", "channel", torch.float32)
    wq = PackedParams("int", pw.shape)
    wq.set_packed(pw)
    lin = PackedLinear(32, 16, wq, None)
    x = torch.randn(3, 32)
    with caplog.at_level(logging.WARNING, logger="fairseq_qplugin.pack.int8"):
        assert torch.equal(lin(x), F.linear(x, pw.dequantize()))
        lin(x)
    assert [r.getMessage() for r in caplog.records] == [
        f"int8 GEMM unavailable (engine {torch.backends.quantized.engine!r}: quantized::linear_prepack: no engine): "
        "using the dequantize + BLAS kernel"]
