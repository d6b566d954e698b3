"""Packed frequency-mixed BCQ (PackedMixedBCQ): exact round trip, kernels, bytes = the rows' own bits."""
import io

import pytest
import torch
import torch.nn.functional as F

from fairseq_qplugin.errors import QuantConfigError
from fairseq_qplugin.quant.packed import PackedMixedBCQ, pack_weight, packed_from_dict
from fairseq_qplugin.pack.kernels import packed_embedding, packed_linear
from fairseq_qplugin.pack.modules import PackedEmbedding, PackedLinear, PackedParams
from fairseq_qplugin.quant import BCQWeight, MixedBCQWeight, QuantSpec, frequency_row_bits, quantize_bcq_rows


def mixed(rows, cols, max_bits=4, ratio=1.0, group_size=0):
    row_bits = frequency_row_bits(torch.rand(rows), max_bits, ratio)
    spec = QuantSpec("bcq", max_bits, group_size=group_size, rounds=3)
    return quantize_bcq_rows(torch.randn(rows, cols), row_bits, spec)


def reloaded(pw):
    buf = io.BytesIO()
    torch.save(pw.as_dict(), buf)
    buf.seek(0)
    return packed_from_dict(pw.method, torch.load(buf, weights_only=True))


@pytest.mark.parametrize("rows,cols,max_bits,group_size", [(1, 1, 1, 0), (5, 13, 2, 0), (37, 24, 4, 0),
                                                           (40, 64, 4, 16), (9, 100, 3, 0)])
def test_mixed_round_trip_is_exact(rows, cols, max_bits, group_size):
    qw = mixed(rows, cols, max_bits, group_size=group_size)
    pw = pack_weight(qw, torch.float32)
    assert isinstance(pw, PackedMixedBCQ) and pw.bits == int(qw.row_bits.max())
    back = reloaded(pw).unpack()
    assert isinstance(back, MixedBCQWeight) and back.group_size == qw.group_size
    back.validate()
    for name, t in qw.as_dict().items():
        assert torch.equal(back.as_dict()[name], t), name
    assert torch.equal(pw.dequantize(), qw.dequantize())
    half = pack_weight(qw).dequantize()  # fp16 alphas
    assert torch.allclose(half, qw.dequantize(), rtol=1e-3, atol=1e-3 * qw.dequantize().abs().max())


def test_mixed_bytes_are_the_rows_own_bits():
    rows, cols = 1000, 64
    qw = mixed(rows, cols, 4, ratio=1.0)  # 250 rows at each of 4, 3, 2, 1 bits: 2.5 bits on average
    pw = pack_weight(qw)
    used = int(qw.row_bits.long().sum())
    assert used == 2500
    assert pw.nbytes() == used * cols // 8 + used * 2 + rows  # planes + fp16 alphas + row_bits
    assert pw.nbytes() == pw.storage_bits() // 8
    full = pack_weight(BCQWeight(planes=qw.planes, alpha=qw.alpha))  # the old layout: 4 planes for every row
    assert pw.nbytes() - rows == full.nbytes() * 2.5 / 4


@pytest.mark.parametrize("n", [1, 3, 20])
def test_mixed_kernels_match_dequantized_reference(n):
    qw = mixed(300, 48, 4, ratio=2.0)
    pw = pack_weight(qw, torch.float32)
    w = qw.dequantize()
    x, bias = torch.randn(2, n, 48), torch.randn(300)
    ref = x.double() @ w.double().T + bias.double()
    y = packed_linear(x, pw, bias)
    assert y.shape == (2, n, 300)
    assert float((y.double() - ref).norm() / ref.norm()) <= 1e-5
    tokens = torch.randint(0, 300, (4, 7))
    assert torch.equal(packed_embedding(tokens, pw), w[tokens])


def test_tied_mixed_embedding_and_output_projection_modules():
    qw = mixed(50, 16, 3)
    pw = pack_weight(qw, torch.float32)
    wq = PackedParams("bcq_mixed", pw.shape)
    wq.load_state_dict({k: v for k, v in pw.as_dict().items()})
    emb, proj = PackedEmbedding(50, 16, 1, wq), PackedLinear(16, 50, wq, None)
    tokens = torch.randint(0, 50, (3, 5))
    assert torch.equal(emb(tokens), qw.dequantize()[tokens])
    feats = torch.randn(3, 5, 16)
    assert torch.allclose(proj(feats), F.linear(feats, qw.dequantize()), atol=1e-5)


def test_corrupted_mixed_dict_is_rejected():
    d = pack_weight(mixed(10, 16, 3)).as_dict()
    with pytest.raises(QuantConfigError, match="do not hold"):
        packed_from_dict("bcq_mixed", {**d, "planes": d["planes"][:-1]})
    with pytest.raises(QuantConfigError, match="in 1..8"):
        packed_from_dict("bcq_mixed", {**d, "row_bits": torch.zeros_like(d["row_bits"])})
