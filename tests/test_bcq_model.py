"""transformer_bcq built in-process: bits by block / sub-layer / word frequency, the pNR optimizer, bad flags."""
import logging

import pytest
import torch
from fairseq import optim, options, tasks
from fairseq.data import Dictionary
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models.transformer import TransformerModel

import fairseq_qplugin  # noqa: F401  (registers the architectures and optimizers)
from fairseq_qplugin.errors import QuantConfigError
from fairseq_qplugin.models.transformer_bcq import average_bits
from fairseq_qplugin.modules import QuantEmbedding, QuantLinear, RowBitsQuantizer, WeightQuantizer

from .conftest import PLUGIN

# rows of 128 weights: each holds every level of its code (or the level's negative), so re-quantizing
# a quantized weight is exact (see quant/bcq.py)
MODEL = ["--encoder-layers", 1, "--decoder-layers", 1, "--encoder-embed-dim", 128, "--decoder-embed-dim", 128,
         "--encoder-ffn-embed-dim", 256, "--decoder-ffn-embed-dim", 256,
         "--encoder-attention-heads", 2, "--decoder-attention-heads", 2]


def write_dict(path, counts):
    d = Dictionary()
    for i, n in enumerate(counts):
        d.add_symbol(f"w{i}", n=int(n))
    d.save(str(path))


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    """Source and target dictionaries of 60 words with different, known counts."""
    d = tmp_path_factory.mktemp("bcq_dicts")
    write_dict(d / "dict.en.txt", [1000 - 10 * i for i in range(60)])
    write_dict(d / "dict.de.txt", [5 + (i * 37) % 60 for i in range(60)])
    return d


def parse(dict_dir, *flags, arch="transformer_bcq"):
    argv = [str(dict_dir), "--user-dir", str(PLUGIN), "--arch", arch, "--source-lang", "en", "--target-lang", "de",
            *map(str, MODEL), *map(str, flags)]
    return options.parse_args_and_arch(options.get_training_parser(), argv)


def build(dict_dir, *flags, arch="transformer_bcq"):
    cfg = convert_namespace_to_omegaconf(parse(dict_dir, *flags, arch=arch))
    task = tasks.setup_task(cfg.task)
    return task.build_model(cfg.model), task, cfg


def bits_of(module):
    return module.wq.spec.bits


def batch(seed=0, bsz=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, 60, (bsz, 7), generator=g), torch.full((bsz,), 7), torch.randint(4, 60, (bsz, 5), generator=g)


def max_levels(weight):
    return max(row.unique().numel() for row in weight.detach())


def test_paper_preset_sets_bits_per_sub_layer_and_reports_average_bits(dict_dir, caplog):
    with caplog.at_level(logging.INFO):
        model, _, _ = build(dict_dir, "--share-all-embeddings", arch="transformer_bcq_paper")
    enc, dec = model.encoder.layers[0], model.decoder.layers[0]
    assert bits_of(enc.self_attn.q_proj) == bits_of(enc.self_attn.out_proj) == 3 and bits_of(enc.fc1) == 4
    assert bits_of(dec.self_attn.k_proj) == 2 and bits_of(dec.encoder_attn.v_proj) == 3 and bits_of(dec.fc2) == 1
    wq = model.decoder.embed_tokens.wq
    assert isinstance(wq, RowBitsQuantizer) and wq.spec.bits == 4 and wq.average_bits() == 2.5
    bits = average_bits(model)
    # encoder: 4 d^2 at 3 bits + 2 * 2 d^2 at 4 bits; decoder: 4 d^2 at 2, 4 d^2 at 3, 4 d^2 at 1
    assert bits["embedding"] == 2.5 and bits["encoder"] == 3.5 and bits["decoder"] == 2.0
    assert "embedding 2.50, encoder 3.50, decoder 2.00, all" in caplog.text


def test_block_and_sub_layer_bits_take_precedence_in_order(dict_dir):
    model, _, _ = build(dict_dir, "--bcq-bits", 2, "--bcq-decoder-bits", 3, "--bcq-embed-bits", 4,
                        "--bcq-layer-bits", "decoder_ffn:1,decoder.layers.0.fc2:4,output_projection:2")
    dec = model.decoder.layers[0]
    assert bits_of(model.encoder.layers[0].fc1) == 2 and bits_of(dec.self_attn.q_proj) == 3
    assert bits_of(dec.fc1) == 1 and bits_of(dec.fc2) == 4
    assert bits_of(model.encoder.embed_tokens) == 4 and bits_of(model.decoder.output_projection) == 2


def test_staged_include_quantizes_only_the_stage(dict_dir):
    model, _, _ = build(dict_dir, "--quant-include", "embeddings,output_projection,decoder_layers")
    assert isinstance(model.decoder.output_projection, QuantLinear)
    assert isinstance(model.decoder.layers[0].fc1, QuantLinear)
    assert not isinstance(model.encoder.layers[0].fc1, QuantLinear)
    assert average_bits(model)["encoder"] == 32.0


@pytest.mark.parametrize("flag", ["--share-all-embeddings", "--share-decoder-input-output-embed"])
def test_frequency_embedding_follows_dictionary_counts_and_stays_tied(dict_dir, flag):
    if flag == "--share-all-embeddings":
        (dict_dir / "joined").mkdir(exist_ok=True)
        for lang in ("en", "de"):
            (dict_dir / "joined" / f"dict.{lang}.txt").write_text((dict_dir / "dict.en.txt").read_text())
        dict_dir = dict_dir / "joined"
    model, task, _ = build(dict_dir, flag, "--bcq-embed-bits", 3, "--bcq-embed-freq-ratio", 2)
    dec = model.decoder
    assert dec.output_projection.weight is dec.embed_tokens.weight and dec.output_projection.wq is dec.embed_tokens.wq
    counts = torch.tensor(task.target_dictionary.count)
    row_bits = dec.embed_tokens.wq.row_bits
    assert (row_bits[:4] == 3).all()  # bos, pad, eos, unk
    order = torch.argsort(counts[4:], descending=True, stable=True) + 4
    assert (row_bits[order][1:] <= row_bits[order][:-1]).all()
    if flag == "--share-decoder-input-output-embed":  # the encoder has its own words and counts
        src_bits = model.encoder.embed_tokens.wq.row_bits
        assert (src_bits[4:64] == src_bits[4:64].sort(descending=True).values).all()  # en counts fall with the id
        assert not torch.equal(src_bits, row_bits)
    # after pNR syncs, one quantized matrix serves the lookup and the output projection
    opt = build_pnr(model, period=1)
    train_steps(model, opt, 2)
    assert dec.output_projection.weight is dec.embed_tokens.weight
    for row, bits in zip(dec.embed_tokens.weight.detach(), row_bits.tolist()):
        assert row.unique().numel() <= 2**bits


def test_explicit_embed_groups_give_each_frequency_group_its_bits(dict_dir, caplog):
    with caplog.at_level(logging.INFO):
        model, task, _ = build(dict_dir, "--share-decoder-input-output-embed", "--bcq-bits", 2,
                               "--bcq-embed-groups", "10:3,20:1,34:4")
    dec = model.decoder
    assert dec.output_projection.wq is dec.embed_tokens.wq and dec.embed_tokens.wq.spec.bits == 4
    counts = torch.tensor(task.target_dictionary.count, dtype=torch.float64)
    counts[:4] = float("inf")  # bos, pad, eos, unk rank first
    order = torch.argsort(counts, descending=True, stable=True)
    expected = torch.tensor([3] * 10 + [1] * 20 + [4] * 34, dtype=torch.int8)
    assert torch.equal(dec.embed_tokens.wq.row_bits[order], expected)
    assert average_bits(model)["embedding"] == pytest.approx((10 * 3 + 20 + 34 * 4) / 64)
    assert "groups of 10/20/34 words at 3/1/4 bits" in caplog.text
    src = model.encoder.embed_tokens.wq.row_bits  # the source dictionary's own ranking
    assert (src[4:] == torch.tensor([3] * 6 + [1] * 20 + [4] * 34, dtype=torch.int8)).all()
    assert isinstance(model.decoder.layers[0].fc1.wq, WeightQuantizer) and bits_of(model.decoder.layers[0].fc1) == 2


def build_pnr(model, period=3, inner="adam"):
    args = parse_optimizer_args(inner, period)
    return optim.build_optimizer(args, [p for p in model.parameters() if p.requires_grad])


def parse_optimizer_args(inner, period):
    from argparse import Namespace

    return Namespace(optimizer=f"pnr_{inner}", pnr_period=period, lr=[0.01], adam_betas="(0.9, 0.98)", adam_eps=1e-8,
                     weight_decay=0.0, momentum=0.0, use_old_adam=False, fp16_adam_stats=False, tpu=False)


def train_steps(model, opt, n, seed=0):
    model.train()
    for i in range(n):
        opt.zero_grad()
        src, lengths, prev = batch(seed + i)
        model(src, lengths, prev)[0].logsumexp(-1).mean().backward()
        opt.step()


@pytest.mark.parametrize("inner", ["adam", "sgd"])
def test_pnr_syncs_every_period_and_weights_move_freely_between(dict_dir, inner):
    model, _, _ = build(dict_dir, "--bcq-bits", 2)
    fc1 = model.encoder.layers[0].fc1
    opt = build_pnr(model, period=3, inner=inner)
    assert type(opt).__name__ == f"PNR_{inner}" and fc1.wq.pnr
    levels = []
    for _ in range(6):
        train_steps(model, opt, 1)
        levels.append(max_levels(fc1.weight))
    assert levels[2] <= 4 and levels[5] <= 4  # right after the syncs at updates 3 and 6
    assert levels[0] > 4 and levels[3] > 4  # full precision in between
    # the training forward uses the full-precision weight itself
    model.train()
    x = torch.randn(2, 128)
    assert torch.equal(fc1(x), torch.nn.functional.linear(x, fc1.weight, fc1.bias))


def test_pnr_eval_and_state_dict_are_the_quantized_model(dict_dir):
    model, _, _ = build(dict_dir, "--bcq-bits", 3, "--share-all-embeddings")
    opt = build_pnr(model, period=100)
    train_steps(model, opt, 2)
    fc1 = model.decoder.layers[0].fc1
    assert max_levels(fc1.weight) > 8
    state = model.state_dict()  # quantized even between syncs
    assert max_levels(state["decoder.layers.0.fc1.weight"]) <= 8
    assert max_levels(state["encoder.embed_tokens.weight"]) <= 8
    model.eval()  # validation: sync, then evaluate the quantized weights
    assert max_levels(fc1.weight) <= 8
    assert torch.equal(fc1.weight, state["decoder.layers.0.fc1.weight"])


@pytest.mark.parametrize("arch,flags", [("transformer_bcq", ["--bcq-bits", 3]),
                                        ("transformer_bcq_paper", ["--share-all-embeddings"])])
def test_a_pnr_sync_moves_weights_no_farther_than_training_moved_them(dict_dir, arch, flags):
    """Each sync warm-starts from the last one's code: it never undoes more than the updates since."""
    model, _, _ = build(dict_dir, *flags, arch=arch)
    opt = build_pnr(model, period=3)
    train_steps(model, opt, 3)  # synced at update 3
    synced = [p.detach().clone() for p in opt.quantized]
    train_steps(model, opt, 2, seed=3)
    before = [p.detach().clone() for p in opt.quantized]
    opt.sync("test")
    for p, s, b in zip(opt.quantized, synced, before):
        assert (p - b).norm() <= (b - s).norm() * (1 + 1e-4)
        assert not torch.equal(b, s)


def test_pnr_optimizer_state_round_trip_keeps_the_schedule(dict_dir):
    model, _, _ = build(dict_dir, "--bcq-bits", 2)
    opt = build_pnr(model, period=4)
    train_steps(model, opt, 3)
    state = opt.state_dict()
    assert state["pnr_num_updates"] == 3
    other = build_pnr(model, period=4)
    other.load_state_dict(state)
    train_steps(model, other, 1)  # update 4: a sync
    assert max_levels(model.encoder.layers[0].fc1.weight) <= 4


@pytest.mark.parametrize("flags", [
    ("--bcq-bits", 2),
    ("--arch", "transformer_bcq_paper", "--share-all-embeddings"),
    ("--bcq-bits", 2, "--bcq-group-size", 64, "--bcq-search", "greedy"),
])
def test_state_dict_round_trip_gives_identical_outputs(dict_dir, flags):
    flags = list(flags)
    arch = "transformer_bcq"
    if flags[0] == "--arch":
        arch, flags = flags[1], flags[2:]
    model, _, _ = build(dict_dir, *flags, arch=arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.eval()
    src, lengths, prev = batch(1)
    with torch.no_grad():
        expected = model(src, lengths, prev)[0]
    other, _, _ = build(dict_dir, *flags, arch=arch)
    other.load_state_dict(model.state_dict())
    other.eval()
    with torch.no_grad():
        assert torch.equal(other(src, lengths, prev)[0], expected)


def test_straight_through_training_without_pnr(dict_dir):
    model, _, _ = build(dict_dir, "--bcq-bits", 2)
    fc1 = model.encoder.layers[0].fc1
    model.train()
    x = torch.randn(2, 128)
    y = fc1(x)
    assert torch.equal(y.detach(), torch.nn.functional.linear(x, fc1.wq.quantized(fc1.weight).dequantize(), fc1.bias))
    y.sum().backward()
    assert fc1.weight.grad is not None and fc1.weight.grad.abs().sum() > 0


def test_training_forward_quantizes_a_tied_weight_once(dict_dir):
    model, _, _ = build(dict_dir, "--share-decoder-input-output-embed", "--bcq-embed-bits", 3, "--bcq-bits", 2)
    model.train()
    wq, calls = model.decoder.embed_tokens.wq, []
    quantized = wq.quantized
    wq.quantized = lambda w: calls.append(w) or quantized(w)
    src, lengths, prev = batch()

    def loss_and_grads(forward):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        loss = forward(src, lengths, prev)[0].logsumexp(-1).sum()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters()]

    start = {m: m._warm for m in model.modules() if isinstance(m, WeightQuantizer)}
    once = loss_and_grads(model)
    assert len(calls) == 1  # the lookup and the output projection share the value
    for m, warm in start.items():  # the same searches (a model's training forward moves the next search's start)
        m._warm = warm
    every_use = loss_and_grads(lambda *batch: TransformerModel.forward(model, *batch))
    assert len(calls) == 3
    assert all(torch.equal(a, b) for a, b in zip(once, every_use))
    assert wq._per_forward is None  # nothing is kept past the forward pass


@pytest.mark.parametrize("flags,match", [
    (("--bcq-bits", 5), "--bcq-bits 5: BCQ takes 1 to 4 bits"),
    (("--bcq-bits", 0), "--bcq-bits 0: BCQ takes 1 to 4 bits"),
    (("--bcq-decoder-bits", 8), "--bcq-decoder-bits 8"),
    (("--bcq-layer-bits", "decoder_ffn:5"), "--bcq-layer-bits 'decoder_ffn:5'"),
    (("--bcq-layer-bits", "decoder_ffn"), "--bcq-layer-bits 'decoder_ffn': write PART:BITS"),
    (("--bcq-layer-bits", "decoder_attn:2"), "--bcq-layer-bits 'decoder_attn' matches no quantizable module"),
    (("--bcq-embed-freq-ratio", 0), "--bcq-embed-freq-ratio must be > 0"),
    (("--bcq-embed-freq-ratio", -2), "--bcq-embed-freq-ratio must be > 0"),
    (("--bcq-embed-groups", "10:3,20:1"), "--bcq-embed-groups sizes sum to 30 words but the dictionary of "
                                          "encoder.embed_tokens has 64; make them sum to 64"),
    (("--bcq-embed-groups", "64:5"), "--bcq-embed-groups '64:5': BCQ takes 1 to 4 bits"),
    (("--bcq-embed-groups", "0:2,64:2"), "--bcq-embed-groups '0:2': write SIZE:BITS with SIZE >= 1 words"),
    (("--bcq-embed-groups", "64"), "--bcq-embed-groups '64': write SIZE:BITS"),
    (("--bcq-embed-groups", "64:2", "--bcq-embed-freq-ratio", 1),
     "--bcq-embed-groups and --bcq-embed-freq-ratio both size the word groups: give one"),
    (("--bcq-group-size", 96), "--bcq-group-size 96 does not divide the 128 input columns of"),
    (("--bcq-rounds", 0), "--bcq-rounds must be >= 1"),
    (("--quant-include", "encoder_attn"), "--quant-include 'encoder_attn' matches no quantizable module"),
    (("--bcq-search", "greedy", "--bcq-rounds", 3), "--bcq-rounds 3 applies to --bcq-search alternating only; "
                                                    "leave --bcq-rounds out"),
    (("--quant-act-bits", 4), "--quant-act-bits 4 applies with --quant-act input or output only; "
                                "leave --quant-act-bits out"),
])
def test_bad_flags_name_the_flag(dict_dir, flags, match):
    with pytest.raises(QuantConfigError, match=match):
        build(dict_dir, *flags)


def test_checkpoints_of_older_releases_keep_their_include_flags():
    """transformer_bcq had --bcq-include / --bcq-exclude: the configs of checkpoints made with them still apply."""
    from argparse import Namespace

    from fairseq.models import ARCH_CONFIG_REGISTRY

    args = Namespace(bcq_include="decoder_layers", bcq_exclude="decoder.layers.0.fc1")
    ARCH_CONFIG_REGISTRY["transformer_bcq"](args)
    assert (args.quant_include, args.quant_exclude) == ("decoder_layers", "decoder.layers.0.fc1")


def test_bad_pnr_flags_name_the_flag(dict_dir):
    model, _, _ = build(dict_dir)
    with pytest.raises(QuantConfigError, match="--pnr-period must be >= 1"):
        build_pnr(model, period=0)
    plain, _, _ = build(dict_dir, arch="transformer")
    with pytest.raises(QuantConfigError, match="none of the parameters is a quantized weight"):
        build_pnr(plain)


def test_pnr_wraps_every_fairseq_optimizer():
    for name in ("adam", "sgd", "nag", "adagrad", "adafactor"):
        assert f"pnr_{name}" in optim.OPTIMIZER_REGISTRY


def test_quantized_modules_are_tagged_with_their_quantizer(dict_dir):
    from fairseq_qplugin.modules import quantizer_of

    model, _, _ = build(dict_dir, "--share-all-embeddings")
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)):
            assert quantizer_of(module.weight) is module.wq
