"""BCQ in the quantization core: greedy vs alternating, exactness, groups, per-row bits, frequency allocation."""
import pytest
import torch

from fairseq_qplugin.errors import QuantConfigError
from fairseq_qplugin.quant import (BCQWeight, MixedBCQWeight, QuantSpec, frequency_row_bits, group_sizes, quantize,
                                   quantize_bcq_rows)
from fairseq_qplugin.modules import WeightQuantizer, quantize_once_per_forward
from fairseq_qplugin.quant.bcq import levels_recoverable, round_significand


def rel_error(w, spec):
    return ((quantize(w, spec).dequantize() - w).pow(2).sum() / w.pow(2).sum()).item()


def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "gaussian": torch.randn(64, 256, generator=g) * 0.05,
        "off-centre": torch.randn(32, 300, generator=g) * 0.05 + 0.03,
        "heavy-tailed": torch.distributions.StudentT(2.0).sample((48, 128)) * 0.02,
        "uniform": torch.rand(16, 512, generator=g) - 0.5,
        "narrow rows": torch.randn(128, 8, generator=g),
    }


def binary_code_matrix(bits, rows=16, cols=512, seed=0):
    """sum_k diag(alpha_k) B_k with random codes and random (16-significant-bit) alphas."""
    g = torch.Generator().manual_seed(seed)
    planes = torch.rand(bits, rows, cols, generator=g) > 0.5
    decay = torch.tensor([1.0, 0.6, 0.35, 0.2])[:bits, None, None]
    alpha = round_significand((torch.rand(bits, rows, 1, generator=g) * decay + 0.01).double()).float()
    return BCQWeight(planes=planes, alpha=alpha).dequantize()


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(tensors()))
@pytest.mark.parametrize("extra", [{}, {"group_size": 4}, {"granularity": "tensor"}])
def test_alternating_error_at_most_greedy(name, bits, extra):
    w = tensors()[name]
    greedy = rel_error(w, QuantSpec("bcq", bits, search="greedy", **extra))
    alternating = rel_error(w, QuantSpec("bcq", bits, **extra))
    assert alternating <= greedy
    if bits > 1 and name == "gaussian":
        assert alternating < 0.95 * greedy


@pytest.mark.parametrize("search", ["greedy", "alternating"])
def test_error_strictly_decreases_from_1_to_4_bits(search):
    for name, w in tensors().items():
        errors = [rel_error(w, QuantSpec("bcq", b, search=search)) for b in range(1, 5)]
        assert all(b < a for a, b in zip(errors, errors[1:])), (name, errors)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("search", ["greedy", "alternating"])
def test_a_sum_of_q_binary_codes_is_reconstructed_exactly(bits, search):
    w = binary_code_matrix(bits, seed=bits)
    assert torch.equal(quantize(w, QuantSpec("bcq", bits, search=search)).dequantize(), w)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("group_size", [0, 256])
def test_requantizing_a_quantized_weight_changes_nothing(bits, group_size):
    """What makes a saved checkpoint (dequantized weights) reload to bit-identical outputs (rows of
    256+ weights hold every level of their code, or its negative)."""
    w = torch.randn(64, 512, generator=torch.Generator().manual_seed(bits)) * 0.05
    spec = QuantSpec("bcq", bits, group_size=group_size)
    w_hat = quantize(w, spec).dequantize()
    assert torch.equal(quantize(w_hat, spec).dequantize(), w_hat)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [0, 64])
def test_warm_start_never_moves_a_code_farther_than_it_was_moved(bits, group_size):
    """pNR: a sync quantizes the code of the last sync plus a few updates. Started from the last
    code, the result is no farther from the weights than that code is; a fresh search is (the
    levels of an alternating code are not ordered as greedy assumes), which made every pNR sync
    cost about as much as quantizing from scratch."""
    g = torch.Generator().manual_seed(bits)
    spec = QuantSpec("bcq", bits, group_size=group_size)
    code = quantize(torch.randn(64, 256, generator=g) * 0.05, spec)
    w = code.dequantize() + 1e-3 * torch.randn(64, 256, generator=g)
    moved = (w - code.dequantize()).norm(dim=1)
    warm = (quantize(w, spec, code.alpha).dequantize() - w).norm(dim=1)
    assert (warm <= moved * (1 + 1e-4)).all()
    if bits > 2:
        assert ((quantize(w, spec).dequantize() - w).norm(dim=1) > 2 * moved).float().mean() > 0.5
    row_bits = torch.tensor([bits, 1, 2] * 21 + [bits], dtype=torch.int8)
    code = quantize_bcq_rows(code.dequantize(), row_bits, spec)
    w = code.dequantize() + 1e-3 * torch.randn(64, 256, generator=g)
    warm = quantize_bcq_rows(w, row_bits, spec, code.alpha).dequantize()
    assert ((warm - w).norm(dim=1) <= (w - code.dequantize()).norm(dim=1) * (1 + 1e-4)).all()
    with pytest.raises(QuantConfigError, match="does not fit"):
        quantize(w[:32], spec, quantize(w, spec).alpha)
    with pytest.raises(QuantConfigError, match="only bcq"):
        quantize(w, QuantSpec("int", 8), quantize(w, spec).alpha)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("row_bits", [False, True])
def test_straight_through_searches_carry_their_scales_from_update_to_update(bits, row_bits):
    """Each training forward's 2-round search starts from the last one's code alone: after a few updates the
    code is as close as a 100-round search (gaussian rows: 3 bits 0.189 vs 0.209 fresh, 4 bits 0.106 vs 0.137);
    outside a model's training forward (quantize_once_per_forward) the start does not move."""
    g = torch.Generator().manual_seed(bits)
    w = torch.nn.Parameter(torch.randn(64, 256, generator=g) * 0.05)
    rows = torch.tensor([bits, bits - 1] * 32, dtype=torch.int8) if row_bits else None
    wq = WeightQuantizer(QuantSpec("bcq", bits, rounds=2), rows)
    for _ in range(6):
        with quantize_once_per_forward(wq):
            wq(w)
        with torch.no_grad():
            w.add_(1e-4 * torch.randn(64, 256, generator=g))
    start = wq._warm.clone()
    wq(w)  # a training forward of the module alone
    assert torch.equal(wq._warm, start)

    def error(rounds):
        code = quantize(w, QuantSpec("bcq", bits, rounds=rounds)) if rows is None else \
            quantize_bcq_rows(w.detach(), rows, QuantSpec("bcq", bits, rounds=rounds))
        return (code.dequantize() - w).norm().item()

    carried = (wq.quantized(w).dequantize() - w).norm().item()
    assert carried < 0.98 * error(2) and carried < 1.01 * error(100)


def test_two_bit_searches_ignore_a_carried_start():
    """At 1-2 bits a straight-through search is fresh even when handed the last code's scales (carrying them
    lost 0.7 BLEU at 2 bits in two seeds, docs/bcq.md); pNR's warm start (fresh=True) still uses them."""
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g) * 0.05
    spec = QuantSpec("bcq", 2, rounds=2)
    start = quantize(torch.randn(64, 256, generator=g) * 0.08, spec).alpha
    carried, fresh = quantize(w, spec, start, fresh=False), quantize(w, spec)
    assert torch.equal(carried.planes, fresh.planes) and torch.equal(carried.alpha, fresh.alpha)
    assert not torch.equal(quantize(w, spec, start).alpha, fresh.alpha)


def test_a_warm_code_that_leaves_levels_unused_is_searched_fresh():
    """decode_levels recovers a code from its values only where the code's levels and their negatives are all
    2^q levels; a warm start that leaves some unused (a row of few distinct values) gives way to a fresh search,
    so the saved values re-quantize to the same code as before."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 256, generator=g) * 0.05
    w[1] = torch.tensor([-0.02, 0.01, 0.02, 0.01])[torch.randint(0, 4, (256,), generator=g)]
    spec = QuantSpec("bcq", 3, rounds=2)
    warm = quantize(w, spec, torch.tensor([0.03, 0.02, 0.01])[:, None, None].expand(3, 4, 1), fresh=False)
    recoverable = levels_recoverable(warm.planes)
    assert recoverable.tolist() == [True, False, True, True]
    fresh = quantize(w, spec)
    assert torch.equal(warm.planes[:, 1], fresh.planes[:, 1]) and torch.equal(warm.alpha[:, 1], fresh.alpha[:, 1])
    requantized = quantize(warm.dequantize(), spec)
    assert torch.equal(requantized.planes[:, recoverable], warm.planes[:, recoverable])


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_at_most_2_pow_q_levels_per_row_or_group(bits):
    w = tensors()["gaussian"]
    assert max(r.unique().numel() for r in quantize(w, QuantSpec("bcq", bits)).dequantize()) <= 2**bits
    grouped = quantize(w, QuantSpec("bcq", bits, group_size=64)).dequantize().reshape(-1, 64)
    assert max(r.unique().numel() for r in grouped) <= 2**bits


def test_groups_give_one_alpha_per_row_bit_and_group():
    w = tensors()["gaussian"]
    qw = quantize(w, QuantSpec("bcq", 3, group_size=64))
    assert qw.planes.shape == (3, 64, 256) and qw.alpha.shape == (3, 64, 4) and qw.group_size == 64
    assert qw.storage_bits() == 3 * 64 * 256 + 3 * 64 * 4 * 16
    assert rel_error(w, QuantSpec("bcq", 3, group_size=64)) < rel_error(w, QuantSpec("bcq", 3))
    with pytest.raises(QuantConfigError, match="group size 96 does not divide the 256 input columns"):
        quantize(w, QuantSpec("bcq", 3, group_size=96))


def test_1_bit_is_sign_times_mean_abs_per_row():
    w = tensors()["off-centre"]
    qw = quantize(w, QuantSpec("bcq", 1))
    expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(qw.dequantize(), expected, rtol=1e-6, atol=0)
    assert torch.equal(qw.dequantize(), quantize(w, QuantSpec("int", 1)).dequantize())


def test_zero_and_constant_rows_stay_finite_and_exact():
    w = torch.cat([torch.zeros(2, 64), torch.full((2, 64), -0.37), tensors()["gaussian"][:2, :64]])
    for bits in range(1, 5):
        out = quantize(w, QuantSpec("bcq", bits)).dequantize()
        assert torch.isfinite(out).all()
        assert torch.equal(out[:2], torch.zeros(2, 64))
        torch.testing.assert_close(out[2:4], w[2:4], rtol=1e-4, atol=0)


@pytest.mark.parametrize("spec", [QuantSpec("bcq", 3), QuantSpec("bcq", 2, group_size=32)])
def test_bcq_dict_round_trip(spec):
    qw = quantize(tensors()["gaussian"], spec)
    again = BCQWeight.from_dict({k: v.clone() for k, v in qw.as_dict().items()})
    assert torch.equal(again.dequantize(), qw.dequantize())
    with pytest.raises(QuantConfigError, match="does not fit"):
        BCQWeight.from_dict({**qw.as_dict(), "alpha": qw.alpha[:, :3]})


def test_per_row_bits():
    w = tensors()["gaussian"]
    row_bits = torch.tensor([4, 1, 2, 3] * 16, dtype=torch.int8)
    qw = quantize_bcq_rows(w, row_bits, QuantSpec("bcq", 4))
    assert isinstance(qw, MixedBCQWeight) and qw.planes.shape == (4, 64, 256)
    out = qw.dequantize()
    for b in range(1, 5):
        rows = (row_bits == b).nonzero().squeeze(1)
        assert torch.equal(out[rows], quantize(w[rows], QuantSpec("bcq", b)).dequantize())
        assert max(r.unique().numel() for r in out[rows]) <= 2**b
    assert not qw.planes[1:, 1].any() and not qw.alpha[1:, 1].any()  # a 1-bit row uses one plane
    assert qw.storage_bits() == 160 * 256 + 160 * 16 + 64 * 8
    again = MixedBCQWeight.from_dict(qw.as_dict())
    assert torch.equal(again.dequantize(), out)
    with pytest.raises(QuantConfigError, match="past a row's bit count"):
        MixedBCQWeight.from_dict({**qw.as_dict(), "row_bits": torch.ones(64, dtype=torch.int8).index_fill(0, torch.tensor([0]), 4)})


@pytest.mark.parametrize("ratio,average", [(1, 2.5), (2, 1.73), (4, 1.3), (8, 1.1)])
def test_frequency_allocation_reproduces_the_paper_for_32000_words(ratio, average):
    counts = torch.randint(0, 10**6, (32000,), generator=torch.Generator().manual_seed(0))
    bits = frequency_row_bits(counts, max_bits=4, ratio=ratio)
    exact = sum((4 - i) * ratio**i for i in range(4)) / sum(ratio**i for i in range(4))
    assert bits.float().mean().item() == pytest.approx(exact, abs=1e-4)
    assert round(bits.float().mean().item(), 2 if ratio == 2 else 1) == average
    sizes = group_sizes(32000, 4, ratio)
    assert sum(sizes) == 32000 and sizes == sorted(sizes)  # the most frequent group is the smallest


def test_frequency_allocation_follows_the_counts_with_specials_on_top():
    g = torch.Generator().manual_seed(1)
    counts = torch.randint(0, 1000, (203,), generator=g)
    counts[:4] = 1  # what a loaded fairseq dictionary keeps for bos, pad, eos, unk
    bits = frequency_row_bits(counts, max_bits=3, ratio=2.0, first=range(4))
    assert (bits[:4] == 3).all()
    order = torch.argsort(counts[4:], descending=True, stable=True) + 4
    assert (bits[order][1:] <= bits[order][:-1]).all()  # never more bits for a rarer word
    assert torch.bincount(bits.long(), minlength=4)[1:].flip(0).tolist() == group_sizes(203, 3, 2.0) == [29, 58, 116]


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="bcq", bits=0), "1 to 4 bits"),
    (dict(method="bcq", bits=5), "1 to 4 bits"),
    (dict(method="int", bits=4, group_size=64), "groups along the input dimension need method 'bcq'"),
    (dict(method="bcq", bits=2, group_size=-1), "group size -1"),
    (dict(method="bcq", bits=2, search="exhaustive"), "unknown bcq search"),
    (dict(method="bcq", bits=2, rounds=0), "at least 1 round"),
])
def test_bad_bcq_specs(kwargs, match):
    with pytest.raises(QuantConfigError, match=match):
        QuantSpec(**kwargs)


def test_bad_frequency_ratio():
    with pytest.raises(QuantConfigError, match="ratio r must be > 0"):
        group_sizes(100, 4, 0.0)


@pytest.mark.parametrize("spec", [QuantSpec("bcq", 3), QuantSpec("bcq", 2, group_size=32),
                                  QuantSpec("bcq", 4, granularity="tensor")])
def test_storage_bits_from_the_shape_match_the_quantized_weight(spec):
    from fairseq_qplugin.quant.bcq import bcq_storage_bits

    w = tensors()["gaussian"]
    assert bcq_storage_bits(tuple(w.shape), spec) == quantize(w, spec).storage_bits()
    if spec.granularity == "channel":
        row_bits = torch.tensor([1, 2, 3, 4] * 16, dtype=torch.int8)
        qw = quantize_bcq_rows(w, row_bits, QuantSpec("bcq", 4, group_size=spec.group_size))
        groups = 256 // spec.group_size if spec.group_size else 1
        assert bcq_storage_bits((64, 256), spec, row_bits) == qw.storage_bits() == 160 * (256 + groups * 16) + 64 * 8
