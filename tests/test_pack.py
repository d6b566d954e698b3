"""Packed formats and kernels: exact round trips, kernels against the dequantized reference."""
import io

import pytest
import torch

from fairseq_qplugin.errors import QuantConfigError
from fairseq_qplugin.quant.bitpack import pack_bits, packed_size, unpack_bits
from fairseq_qplugin.quant.packed import PackedBCQ, pack_weight, packed_formats, packed_from_dict
from fairseq_qplugin.pack.kernels import bcq_lut_gemm, blocked_linear, packed_embedding, packed_linear
from fairseq_qplugin.quant import BCQWeight, QuantSpec, kmeans_weight, magnitude_mask, quantize

SHAPES = [(1, 1), (3, 7), (5, 13), (17, 64), (9, 100)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 13), (4, 64), (0, 3), (3, 0)])
def test_bitpack_round_trip_is_exact(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_size(shape[-1], bits)
    assert torch.equal(unpack_bits(packed, bits, shape[-1]), codes)


def test_bitpack_layout_is_little_endian_stream():
    assert pack_bits(torch.tensor([1, 0, 0, 0, 0, 0, 0, 1, 1]), 1).tolist() == [0b10000001, 1]
    assert pack_bits(torch.tensor([1, 2]), 4).tolist() == [0x21]
    assert pack_bits(torch.tensor([7, 1, 2]), 3).tolist() == [0b10001111, 0]  # 111 100 010 -> stream


def test_bitpack_rejects_bad_input():
    with pytest.raises(QuantConfigError, match="do not fit in 2 bits"):
        pack_bits(torch.tensor([4]), 2)
    with pytest.raises(QuantConfigError, match="1 to 8 bits"):
        pack_bits(torch.tensor([0]), 9)
    with pytest.raises(QuantConfigError, match="expected uint8"):
        unpack_bits(torch.zeros(3, dtype=torch.uint8), 4, 7)


def weights(shape):
    """One quantized weight of every packable kind (and bit width) at ``shape``."""
    w = torch.randn(shape)
    out = []
    for bits in range(1, 9):
        out.append(quantize(w, QuantSpec("int", bits, "asym" if bits % 2 else "sym",
                                         "channel" if bits % 3 else "tensor")))
        out.append(kmeans_weight(w, bits, "channel" if bits % 2 else "tensor", iters=3))
    for bits in range(1, 5):
        out.append(quantize(w, QuantSpec("bcq", bits, granularity="channel" if bits % 2 else "tensor")))
    out.append(kmeans_weight(w, 3, mask=magnitude_mask(w, 0.5), iters=3))
    return out


def _reloaded(pw):
    buf = io.BytesIO()
    torch.save(pw.as_dict(), buf)
    buf.seek(0)
    return packed_from_dict(pw.method, torch.load(buf, weights_only=True))


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_formats_round_trip_exactly(shape):
    for qw in weights(shape):
        pw = pack_weight(qw, torch.float32)
        back = _reloaded(pw).unpack()
        assert torch.equal(back.dequantize(), qw.dequantize()), (type(qw).__name__, qw.bits)
        for name, t in back.as_dict().items():
            assert torch.equal(t.to(qw.as_dict()[name].dtype), qw.as_dict()[name]), name
        half = pack_weight(qw, torch.float16).dequantize()  # fp16 parameters: close, not exact
        assert torch.allclose(half, qw.dequantize(), rtol=1e-3, atol=1e-3 * qw.dequantize().abs().max())


def test_packed_size_is_the_bits():
    qw = quantize(torch.randn(64, 80), QuantSpec("bcq", 3))
    pw = pack_weight(qw)
    assert pw.planes.numel() == 3 * 64 * 10 and pw.alpha.dtype == torch.float16
    assert pw.nbytes() == 3 * 64 * 10 + 3 * 64 * 2


def test_corrupted_packed_dict_is_rejected():
    pw = pack_weight(quantize(torch.randn(4, 9), QuantSpec("int", 4)))
    d = pw.as_dict()
    with pytest.raises(QuantConfigError, match="needs exactly the keys"):
        packed_from_dict("int", {k: v for k, v in d.items() if k != "scale"})
    with pytest.raises(QuantConfigError, match="do not hold 9 columns"):
        packed_from_dict("int", {**d, "codes": d["codes"][:, :-1]})
    with pytest.raises(QuantConfigError, match="unknown packed method"):
        packed_from_dict("pq", d)
    assert set(packed_formats()) == {"int", "bcq", "bcq_mixed", "kmeans"}


def _rel_err(y, ref):
    return float((y.double() - ref).norm() / ref.norm().clamp(min=1e-30))


@pytest.mark.parametrize("shape", [(1, 8), (7, 13), (33, 64), (16, 100), (300, 24)])
@pytest.mark.parametrize("n", [1, 2, 5, 20, 64])
def test_kernels_match_dequantized_matmul(shape, n):
    x = torch.randn(n, shape[1])
    bias = torch.randn(shape[0])
    for qw in weights(shape):
        if qw.bits > 4:
            continue
        pw = pack_weight(qw)
        ref = x.double() @ pw.dequantize().double().T + bias.double()
        for y in (packed_linear(x, pw, bias), blocked_linear(x, pw, bias, block_rows=5)):
            assert _rel_err(y, ref) <= 1e-4
        if isinstance(pw, PackedBCQ):
            assert _rel_err(bcq_lut_gemm(x, pw) + bias, ref) <= 1e-4


def test_bcq_lut_with_input_groups():
    q, rows, cols, groups = 3, 6, 32, 2
    planes = torch.rand(q, rows, cols) > 0.5
    qw = BCQWeight(planes=planes, alpha=torch.rand(q, rows, 1))
    pw = pack_weight(qw, torch.float32)
    pw = PackedBCQ(pw.planes, torch.rand(q, rows, groups), cols)
    x = torch.randn(3, cols)
    ref = x.double() @ pw.dequantize().double().T
    assert _rel_err(bcq_lut_gemm(x, pw), ref) <= 1e-6
    assert _rel_err(blocked_linear(x, pw), ref) <= 1e-6


def test_blocked_kernel_and_embedding_are_bit_exact():
    for qw in weights((37, 24)):
        pw = pack_weight(qw, torch.float32)
        w = qw.dequantize()
        tokens = torch.randint(0, 37, (4, 5))
        assert torch.equal(packed_embedding(tokens, pw), w[tokens])
        x = torch.randn(10, 24)
        assert torch.equal(blocked_linear(x, pw), torch.nn.functional.linear(x, w))
