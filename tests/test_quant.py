"""The quantization core: levels, error, idempotence, degenerate tensors, straight-through gradients."""
import pytest
import torch

from fairseq_qplugin.errors import QuantConfigError
from fairseq_qplugin.quant import BCQWeight, IntWeight, QuantSpec, fake_quantize, fake_quantize_range, quantize

SCHEMES = [(s, g) for s in ("sym", "asym") for g in ("channel", "tensor")]


def snr_db(w, w_hat):
    return (10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum())).item()


def gaussian(rows=512, cols=512, seed=0):
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 0.05


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("scheme,granularity", SCHEMES)
def test_at_most_2_pow_n_levels(bits, scheme, granularity):
    w = gaussian(64, 96) + 0.02  # off-centre, so asym and sym ranges differ
    w_hat = quantize(w, QuantSpec(bits=bits, scheme=scheme, granularity=granularity)).dequantize()
    groups = w_hat if granularity == "channel" else w_hat.reshape(1, -1)
    assert max(row.unique().numel() for row in groups) <= 2**bits
    assert w_hat.shape == w.shape and torch.isfinite(w_hat).all()


def test_8bit_snr_above_40db_and_error_falls_with_bits():
    w = gaussian()
    snrs = [snr_db(w, quantize(w, QuantSpec(bits=b)).dequantize()) for b in range(2, 9)]
    assert snrs[-1] > 40
    assert all(b > a for a, b in zip(snrs, snrs[1:])), snrs


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_asym_codes_follow_eq4(scheme):
    w = gaussian(8, 300)
    qw = quantize(w, QuantSpec(bits=4, scheme=scheme))
    assert isinstance(qw, IntWeight) and qw.codes.dtype == torch.uint8
    # every weight lands on its nearest level: error at most half a step (plus 2^-16 range clipping)
    assert ((w - qw.dequantize()).abs() <= qw.scale * (0.5 + 1e-3)).all()


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("scheme,granularity", SCHEMES)
def test_quantization_is_idempotent(bits, scheme, granularity):
    """A saved (quantized) weight re-quantizes to exactly itself, so reloaded models are bit-identical."""
    w = gaussian(128, 200, seed=bits)
    spec = QuantSpec(bits=bits, scheme=scheme, granularity=granularity)
    w_hat = quantize(w, spec).dequantize()
    assert torch.equal(quantize(w_hat, spec).dequantize(), w_hat)


def test_binarize_levels_are_sign_times_mean_abs():
    w = gaussian(16, 40)
    qw = quantize(w, QuantSpec(bits=1))
    assert isinstance(qw, BCQWeight) and qw.bits == 1
    expected = torch.where(w >= 0, 1.0, -1.0) * w.abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(qw.dequantize(), expected, rtol=1e-6, atol=0)
    per_tensor = quantize(w, QuantSpec(bits=1, granularity="tensor")).dequantize()
    assert per_tensor.abs().unique().numel() == 1


@pytest.mark.parametrize("bits", [1, 4, 8])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_constant_and_zero_tensors(bits, scheme):
    for granularity in ("channel", "tensor"):
        spec = QuantSpec(bits=bits, scheme=scheme, granularity=granularity)
        zeros = quantize(torch.zeros(4, 6), spec).dequantize()
        assert torch.equal(zeros, torch.zeros(4, 6))
        const = torch.full((4, 6), -0.37)
        torch.testing.assert_close(quantize(const, spec).dequantize(), const, rtol=1e-4, atol=0)
        mixed = torch.cat([torch.zeros(2, 6), torch.full((1, 6), 2.5), gaussian(3, 6)])
        out = quantize(mixed, spec).dequantize()
        assert torch.isfinite(out).all()
        if granularity == "channel":
            assert torch.equal(out[:2], torch.zeros(2, 6))


def test_identity_straight_through_gradient():
    w = gaussian(8, 8).requires_grad_()
    out = fake_quantize(w, QuantSpec(bits=4))
    assert torch.equal(out.detach(), quantize(w, QuantSpec(bits=4)).dequantize())
    g = torch.randn(8, 8)
    out.backward(g)
    assert torch.equal(w.grad, g)


def test_clipped_straight_through_gradient_for_binarize():
    w = torch.tensor([[-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5]], requires_grad=True)
    fake_quantize(w, QuantSpec(bits=1)).sum().backward()
    assert torch.equal(w.grad, torch.tensor([[0.0, 1, 1, 1, 1, 1, 0]]))


def test_activation_quantization():
    x = torch.linspace(-3, 5, 1000).reshape(10, 100).requires_grad_()
    lo, hi = torch.tensor(-2.0), torch.tensor(4.0)
    out = fake_quantize_range(x, lo, hi, bits=4)
    assert out.unique().numel() <= 16
    assert out.min() >= -2.0 - 1e-6 and out.max() <= 4.0 + 1e-6  # clamped to the range
    inside = (x.detach() >= -2) & (x.detach() <= 4)
    step = 6.0 / 15
    assert ((out - x).abs()[inside] <= step / 2 + 1e-5).all()
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


def test_quantized_weight_dict_round_trip():
    w = gaussian(12, 20)
    for spec in (QuantSpec(bits=3, scheme="asym"), QuantSpec(bits=1)):
        qw = quantize(w, spec)
        again = type(qw).from_dict({k: v.clone() for k, v in qw.as_dict().items()})
        assert torch.equal(again.dequantize(), qw.dequantize())
        with pytest.raises(QuantConfigError, match="keys"):
            type(qw).from_dict({**qw.as_dict(), "extra": torch.zeros(1)})
    d = quantize(w, QuantSpec(bits=3)).as_dict()
    with pytest.raises(QuantConfigError, match="codes exceed 3 bits"):
        IntWeight.from_dict({**d, "codes": d["codes"] | 8})
    with pytest.raises(QuantConfigError, match="do not fit codes"):
        IntWeight.from_dict({**d, "scale": d["scale"][:2]})


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=0), "1 to 8 bits"),
    (dict(bits=9), "1 to 8 bits"),
    (dict(method="nope"), "unknown quantization method"),
    (dict(granularity="row"), "unknown granularity"),
    (dict(scheme="log"), "unknown int scheme"),
])
def test_bad_specs(kwargs, match):
    with pytest.raises(QuantConfigError, match=match):
        QuantSpec(**kwargs)
