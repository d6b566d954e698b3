"""transformer_kmeans built in-process: scope, tied embeddings, fine-tuning from fp32, state dicts, bad flags."""
import pytest
import torch

from fairseq_qplugin.errors import QuantConfigError
from fairseq_qplugin.modules import BSFlexQuantizer, KMeansQuantizer, PruneQuantizer, QuantEmbedding, QuantLinear

from .test_model import batch, build, dict_dir, outputs  # noqa: F401  (dict_dir is a fixture)

ARCH = "transformer_kmeans"


def quantized_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}


def train_steps(model, updates, start=0, lr=0.01):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for update in range(start, start + updates):
        model.set_num_updates(update)
        src, lengths, prev = batch(seed=update)
        model(src, lengths, prev)[0].logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad()


def test_default_is_4bit_kmeans_everywhere_with_frozen_latent_weights(dict_dir):
    model = build(dict_dir, "--share-all-embeddings", arch=ARCH)
    found = quantized_modules(model)
    assert "decoder.output_projection" in found and "encoder.layers.0.fc1" in found
    for m in found.values():
        assert isinstance(m.wq, KMeansQuantizer) and m.wq.spec.bits == 4 and m.wq.centroids.shape == (16,)
        assert not m.weight.requires_grad
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(m.wq.centroid_delta) in trainable for m in found.values())


def test_layer_bits_give_each_codebook_its_size(dict_dir):
    model = build(dict_dir, "--quant-bits", "3", "--quant-layer-bits", "encoder_ffn:2", arch=ARCH)
    assert model.encoder.layers[0].fc1.wq.centroids.shape == (4,)
    assert model.decoder.layers[0].fc1.wq.centroids.shape == (8,)


def test_self_attention_only_bsflex(dict_dir):
    model = build(dict_dir, "--quant-method", "bsflex", "--quant-include", "self_attn", arch=ARCH)
    found = quantized_modules(model)
    assert found and all(".self_attn." in n for n in found)
    assert len(found) == 4 * 2  # q, k, v, out in the encoder and the decoder self-attention
    assert all(isinstance(m.wq, BSFlexQuantizer) and m.weight.requires_grad for m in found.values())


def test_tied_embeddings_share_one_codebook(dict_dir):
    model = build(dict_dir, "--share-all-embeddings", arch=ARCH)
    dec = model.decoder
    assert dec.output_projection.wq is dec.embed_tokens.wq is model.encoder.embed_tokens.wq
    train_steps(model, 2)
    assert dec.output_projection.weight is dec.embed_tokens.weight
    model.eval()
    assert torch.equal(dec.output_projection.quantized_weight(), dec.embed_tokens.quantized_weight())


FLAG_SETS = [
    ("--quant-bits", "4"),
    ("--quant-bits", "2", "--quant-granularity", "channel"),
    ("--quant-method", "bsflex", "--quant-include", "self_attn"),
    ("--quant-method", "bsflex_fixed", "--quant-granularity", "channel"),
    ("--quant-method", "none", "--prune-schedule", "0.5"),
    ("--quant-bits", "3", "--prune-schedule", "0:0.3,2:0.5"),
    ("--quant-bits", "2", "--kmeans-recluster-interval", "2"),
]


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_finetune_from_plain_then_state_dict_round_trip(dict_dir, flags):
    plain = build(dict_dir, "--share-all-embeddings", arch="transformer")
    model = build(dict_dir, "--share-all-embeddings", *flags, arch=ARCH)
    model.load_state_dict(plain.state_dict())  # no codebooks, indices or masks in it
    fp32 = outputs(plain)
    start = outputs(model)
    assert not torch.equal(start, fp32)
    train_steps(model, 4)
    expected = outputs(model)
    state = model.state_dict()
    for name, m in quantized_modules(model).items():
        w = state[name + ".weight"]
        assert torch.equal(w, m.quantized_weight())
        if m.wq.mask is not None:
            assert (w == 0).sum() >= round(0.5 * w.numel()) and (w[~m.wq.mask] == 0).all()
        if not isinstance(m.wq, PruneQuantizer):
            groups = w if m.wq.spec.granularity == "channel" else w.reshape(1, -1)
            limit = 2**m.wq.spec.bits + (m.wq.mask is not None)  # pruned zeros are one more value
            assert max(row.unique().numel() for row in groups) <= limit, name
    other = build(dict_dir, "--share-all-embeddings", *flags, arch=ARCH)
    other.load_state_dict(state)
    assert torch.equal(outputs(other), expected)
    train_steps(other, 1, start=4)  # training resumes from the loaded state


def test_pruned_model_then_kmeans_keeps_the_mask(dict_dir):
    """Deep compression in two runs: prune, then share the remaining weights."""
    pruned = build(dict_dir, "--quant-method", "none", "--prune-schedule", "0.5", arch=ARCH)
    train_steps(pruned, 2)
    model = build(dict_dir, "--quant-bits", "2", "--prune-schedule", "0.5", arch=ARCH)
    model.load_state_dict(pruned.state_dict())
    train_steps(model, 1, start=2)
    for name, m in quantized_modules(model).items():
        assert torch.equal(m.wq.mask, quantized_modules(pruned)[name].wq.mask)
    plain_kmeans = build(dict_dir, "--quant-bits", "2", arch=ARCH)  # no pruning: the masks are ignored
    plain_kmeans.load_state_dict(pruned.state_dict())


@pytest.mark.parametrize("method", [("--quant-method", "none"), ("--quant-bits", "3")])
def test_global_ranking_prunes_every_weight_against_one_threshold(dict_dir, method):
    model = build(dict_dir, "--share-all-embeddings", *method, "--prune-schedule", "0:0.3,2:0.5",
                  "--prune-ranking", "global", arch=ARCH)
    weights = list(model.pruned_weights())
    assert len(weights) == len({id(w) for _, w, _ in weights}) == len(quantized_modules(model)) - 1  # tied: once
    total = sum(w.numel() for _, w, _ in weights)
    for update, sparsity in [(0, 0.3), (1, 0.3), (2, 0.5)]:
        model.train()
        model.set_num_updates(update)
        before = [(wq.pruning_scores(w.detach()).abs(), wq.mask.clone()) for _, w, wq in weights]
        model(*batch())  # a training forward prunes, before anything moves
        assert sum(wq.pruned for _, _, wq in weights) == round(sparsity * total)
        assert all(not (wq.mask & ~old).any() for (_, old), (_, _, wq) in zip(before, weights))
        new = torch.cat([s[old & ~wq.mask] for (s, old), (_, _, wq) in zip(before, weights)])
        kept = torch.cat([s[wq.mask] for (s, _), (_, _, wq) in zip(before, weights)])
        assert (new.numel() > 0) == (update != 1) and (new.numel() == 0 or new.max() <= kept.min())
        train_steps(model, 1, start=update)
    assert len({round(wq.sparsity, 3) for _, _, wq in weights}) > 3  # one threshold, unequal tensor sparsities
    restored = build(dict_dir, "--share-all-embeddings", *method, "--prune-schedule", "0:0.3,2:0.5",
                     "--prune-ranking", "global", arch=ARCH)
    restored.load_state_dict(model.state_dict())
    restored.train()
    restored.set_num_updates(3)
    restored(*batch())  # the loaded masks already hold the scheduled sparsity: nothing more is pruned
    for (name, _, wq), (_, _, again) in zip(weights, restored.pruned_weights()):
        assert torch.equal(wq.mask, again.mask), name


def test_checkpoint_of_another_bit_width_is_reclustered(dict_dir):
    four = build(dict_dir, "--quant-bits", "4", arch=ARCH)
    train_steps(four, 1)
    two = build(dict_dir, "--quant-bits", "2", arch=ARCH)
    two.load_state_dict(four.state_dict())
    two.eval()
    assert all(m.quantized_weight().unique().numel() <= 4 for m in quantized_modules(two).values())


@pytest.mark.parametrize("flags,match", [
    (("--quant-bits", "0"), "--quant-bits 0"),
    (("--quant-bits", "9"), "--quant-bits 9"),
    (("--quant-method", "bsflex", "--quant-bits", "2"), "--quant-bits 2"),
    (("--prune-schedule", "1.0"), r"--prune-schedule '1.0': sparsity 1.0 is outside \[0, 1\)"),
    (("--prune-schedule", "0:-0.2"), "--prune-schedule"),
    (("--quant-include", "self_attention"), "--quant-include 'self_attention' matches no quantizable module"),
    (("--quant-method", "none"), "--prune-schedule"),
    (("--quant-method", "bsflex", "--kmeans-recluster-interval", "5"), "--kmeans-recluster-interval"),
    (("--quant-method", "bsflex", "--quant-layer-bits", "encoder_ffn:2"),
     "--quant-layer-bits 'encoder_ffn:2': bsflex quantization takes 1 to 1 bits"),
    (("--prune-ranking", "global"), "--prune-ranking global applies to pruning: give a --prune-schedule"),
    (("--quant-method", "bsflex", "--kmeans-iters", "20"), "--kmeans-iters 20 applies to --quant-method kmeans only; "
                                                           "leave --kmeans-iters out"),
    (("--quant-method", "none", "--prune-schedule", "0.5", "--quant-bits", "4"),
     r"--quant-bits 4 applies to weight sharing \(--quant-method kmeans or bsflex\); leave --quant-bits out"),
    (("--quant-method", "none", "--prune-schedule", "0.5", "--quant-granularity", "channel"),
     "--quant-granularity channel applies to weight sharing"),
    (("--quant-act-bits", "4"), "--quant-act-bits 4 applies with --quant-act input or output only; "
                                "leave --quant-act-bits out"),
])
def test_bad_flags_name_the_flag(dict_dir, flags, match):
    with pytest.raises(QuantConfigError, match=match):
        build(dict_dir, *flags, arch=ARCH)


def test_results_table_names_the_kmeans_configuration():
    from argparse import Namespace

    from fairseq_qplugin.results import describe

    cfg = Namespace(arch="transformer_kmeans", quant_method="kmeans", quant_bits=4, quant_granularity="tensor",
                    kmeans_recluster_interval=50)
    assert describe(cfg) == ("k-means", "4-bit per-tensor, re-clustered every 50 updates")
    cfg = Namespace(arch="transformer_kmeans", quant_method="bsflex", quant_granularity="channel",
                    quant_include="self_attn")
    assert describe(cfg) == ("BS-Flex", "1-bit, per-row centroids, only self_attn")
    cfg = Namespace(arch="transformer_kmeans", quant_method="none", prune_schedule="0:0.3,240:0.5",
                    prune_ranking="global")
    assert describe(cfg) == ("pruning", "magnitude 0:0.3,240:0.5, one threshold over all weights")
