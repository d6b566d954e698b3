"""Learned quantization parameters: BCQ scales (--bcq-learn-scales) and LSQ steps (--quant-learn-scale)."""
import math

import pytest
import torch

from fairseq_qplugin.modules import LearnedBCQQuantizer, LSQQuantizer
from fairseq_qplugin.quant import QuantSpec
from fairseq_qplugin.quant.bcq import bcq_decode, nearest_codes

from .conftest import run, train_args
from .test_cli import generate
from .test_pack_cli import EXACT, _assert_clear_error, qat, qpack, same_translations


def weight(rows=12, cols=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.Parameter(torch.randn(rows, cols, generator=g) * 0.1)


@pytest.mark.parametrize("group_size", [0, 8])
def test_bcq_scale_gradient_is_the_binary_code(group_size):
    """dW_q / d alpha_k = B_k (summed over a scale's columns); the latent weight gets the identity."""
    w = weight()
    wq = LearnedBCQQuantizer(QuantSpec("bcq", 3, group_size=group_size), w.shape).train()
    out = wq(w)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    signs = wq.planes.float() * 2 - 1  # [q, rows, cols]
    groups = 16 // group_size if group_size else 1
    expected = (signs * g).reshape(3, 12, groups, -1).sum(-1)  # d loss / d alpha
    assert torch.allclose(wq.alpha_delta.grad, expected, rtol=1e-6, atol=1e-6)  # d alpha / d delta = 1 at the start
    assert torch.equal(w.grad, g)
    assert torch.equal(out.detach(), bcq_decode(wq.planes, wq.scales().detach(), 16))


def test_bcq_mixed_rows_train_only_their_scales():
    w = weight(rows=4)
    wq = LearnedBCQQuantizer(QuantSpec("bcq", 3), w.shape, row_bits=torch.tensor([1, 2, 3, 3])).train()
    (wq(w) * torch.linspace(1, 2, 16)).sum().backward()
    grad = wq.alpha_delta.grad[..., 0]  # [bits, rows]
    assert (grad[1:, 0] == 0).all() and (grad[2:, 1] == 0).all() and (grad[:, 2:] != 0).all()
    assert not wq.planes[1:, 0].any() and not wq.planes[2:, 1].any()


def test_lsq_gradients_are_lsq():
    """Esser et al. 2020: d w_hat / d s = round(w/s) - w/s inside the range, +-Q outside, times 1/sqrt(N Q);
    the latent weight's gradient passes inside the range only."""
    w = weight()
    with torch.no_grad():
        w[0, 0], w[1, 1] = 5.0, -5.0  # outside every row's range once the step is fixed
    wq = LSQQuantizer(QuantSpec("int", 4), w.shape).train()
    wq.initialize(w.detach())
    with torch.no_grad():
        wq.step_init.mul_(0.5)  # clip the largest weights
    out = wq(w)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * g).sum().backward()
    s, q = wq.step().detach(), 7
    v = w.detach() / s
    inside = v.abs() <= q
    dq_ds = torch.where(inside, torch.round(v) - v, torch.sign(v) * q)
    expected = (dq_ds * g).sum(1, keepdim=True) / math.sqrt(16 * q)  # d loss / d s, LSQ's gradient scale
    assert torch.allclose(wq.step_delta.grad, expected, rtol=1e-5, atol=1e-7)  # d s / d delta = 1 at the start
    assert torch.allclose(w.grad, torch.where(inside, g, torch.zeros_like(g)), rtol=1e-6, atol=0)
    assert not inside[0, 0] and not inside[1, 1]
    assert torch.equal(out.detach(), torch.clamp(torch.round(v), -q, q) * s)
    assert torch.equal(out.detach(), wq.quantized(w).dequantize())


def test_codes_are_researched_exactly_every_k_updates():
    w = weight()
    wq = LearnedBCQQuantizer(QuantSpec("bcq", 2), w.shape, research_every=3).train()
    for n in range(10):
        wq.set_num_updates(n)
        for _ in range(2):  # a tied weight: two uses in one forward
            wq(w)
        if n == 4:  # the code stays between re-searches; a re-search takes the nearest level sums
            with torch.no_grad():
                w.add_(0.05)
            codes = wq.planes.clone()
        if n == 5:
            assert torch.equal(wq.planes, codes)
        if n == 6:
            alpha = wq.scales().detach().double().reshape(2, -1)
            assert torch.equal(wq.planes, nearest_codes(w.detach().double(), alpha))
    assert wq.researches == 4  # updates 0, 3, 6, 9


LR = 3e-4


def real_layer(fp32_checkpoint):
    """fc1 of the trained tiny model and real inputs: the model's own (scaled) token embeddings."""
    model = torch.load(fp32_checkpoint, weights_only=False)["model"]
    w = model["encoder.layers.0.fc1.weight"].float()
    x = model["encoder.embed_tokens.weight"].float() * w.shape[1] ** 0.5
    return w, x


@pytest.mark.parametrize("make", [lambda s: LearnedBCQQuantizer(QuantSpec("bcq", 2), s),
                                  lambda s: LearnedBCQQuantizer(QuantSpec("bcq", 3), s),
                                  lambda s: LSQQuantizer(QuantSpec("int", 4), s)], ids=["bcq2", "bcq3", "int4"])
def test_learned_scales_lower_the_output_error(fp32_checkpoint, make):
    """Trained on a layer's real inputs, the learned scales move and give a lower output error than the
    searched ones held fixed (the codes re-searched every update in both)."""
    w0, x = real_layer(fp32_checkpoint)
    target = x @ w0.T

    def train(learn):
        w = w0.clone()
        wq = make(w.shape).train()
        opt = torch.optim.Adam(wq.parameters(), lr=LR if learn else 0.0)
        for n in range(100):
            wq.set_num_updates(n)
            loss = (x @ wq(w).T - target).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            return (x @ wq(w).T - target).square().mean().item(), next(wq.parameters()).abs().max().item()

    frozen, moved_frozen = train(False)
    learned, moved = train(True)
    assert moved_frozen == 0 and moved > 1e-3
    assert learned < 0.99 * frozen, (learned, frozen)


@pytest.fixture(scope="module")
def learned_groups_ckpt(tiny_data, fp32_checkpoint):
    """BCQ with learned scales, word-frequency groups and a sub-layer mix."""
    return qat(tiny_data, fp32_checkpoint, "pack_learned", "transformer_bcq", "--bcq-bits", 3,
               "--bcq-embed-groups", "8:4,100:2,300:3", "--bcq-layer-bits", "decoder_ffn:2", "--bcq-rounds", 2,
               "--bcq-learn-scales", "--bcq-research-every", 4)


@pytest.fixture(scope="module")
def lsq_ckpt(tiny_data, fp32_checkpoint):
    return qat(tiny_data, fp32_checkpoint, "pack_lsq", "transformer_int8", "--quant-bits", 4, "--quant-learn-scale",
               "--quant-layer-bits", "decoder_ffn:3")


@pytest.mark.parametrize("which", ["learned_groups_ckpt", "lsq_ckpt"])
def test_packed_learned_scales_reproduce_the_model(request, tiny_data, tmp_path, which):
    """fairseq-qpack stores the trained scales as they are (no search): the packed weights are the QAT
    model's bit for bit and the packed file translates as the checkpoint does."""
    ckpt = request.getfixturevalue(which)
    state = torch.load(ckpt, weights_only=False)["model"]
    deltas = [v for k, v in state.items() if k.endswith(("wq.alpha_delta", "wq.step_delta"))]
    assert deltas and all(d.abs().max() > 0 for d in deltas), "the scales trained"
    assert not any(k.endswith("wq.planes") for k in state), "the codes are saved once, in wq.code.*"
    packed = tmp_path / "packed.pt"
    qpack(ckpt, packed, *EXACT)
    layout = torch.load(packed, weights_only=True)
    methods = {e["method"] for e in layout["qpack"]["layout"].values()}
    assert methods == ({"bcq", "bcq_mixed"} if which == "learned_groups_ckpt" else {"int"}), methods
    from fairseq_qplugin.quant import packed_from_dict
    checked = 0
    for key, entry in layout["qpack"]["layout"].items():
        prefix = key[: -len("weight")] if key.endswith("weight") else key + "."
        fields = {k[len(prefix) + 3:]: v for k, v in layout["model"].items() if k.startswith(prefix + "wq.")}
        if not fields:
            continue
        got = packed_from_dict(entry["method"], fields).dequantize()
        assert torch.equal(got, state[prefix + "weight"]), key
        checked += 1
    assert checked
    expected, _ = generate(tiny_data / "bin", ckpt)
    got, log = generate(tiny_data / "bin", packed)
    assert len(got) == 40, log[-2000:]
    assert same_translations(got, expected)


@pytest.mark.parametrize("flags, message", [
    (["transformer_bcq", "--bcq-learn-scales", "--optimizer", "pnr_adam"], "--bcq-learn-scales trains the scales"),
    (["transformer_bcq", "--bcq-research-every", 5], "--bcq-research-every 5 applies with --bcq-learn-scales only"),
    (["transformer_bcq", "--bcq-learn-scales", "--bcq-research-every", 0], "--bcq-research-every must be >= 1"),
    (["transformer_int8", "--quant-bits", 4, "--quant-learn-scale", "--quant-scheme", "asym"],
     "--quant-learn-scale learns a symmetric step"),
    (["transformer_int8", "--quant-bits", 1, "--quant-learn-scale"], "--quant-learn-scale learns the step of 2-8"),
    (["transformer_int8", "--quant-learn-scale", "--optimizer", "pnr_adam"], "--quant-learn-scale trains the steps"),
])
def test_bad_flag_combination_gives_one_clear_error(tiny_data, tmp_path, flags, message):
    arch, *rest = flags
    args = train_args(tiny_data / "bin", tmp_path, arch, 1, *rest)
    if "--optimizer" in rest:  # train_args names adam: the later flag wins
        i = args.index("--optimizer")
        del args[i:i + 2]
    _assert_clear_error(run(args, check=False), message)
