"""transformer_int8 built in-process: module replacement, tied embeddings, state dicts, bad flags."""
import pytest
import torch
from fairseq import options, tasks
from fairseq.data import Dictionary
from torch import nn

import fairseq_qplugin  # noqa: F401  (registers the architectures)
from fairseq_qplugin.errors import QuantConfigError
from fairseq_qplugin.modules import ActQuantizer, QuantEmbedding, QuantLinear

from .conftest import PLUGIN, TINY_MODEL


@pytest.fixture(scope="module")
def dict_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("dicts")
    vocab = Dictionary()
    for i in range(60):
        vocab.add_symbol(f"w{i}", n=100 - i)
    for lang in ("en", "de"):
        vocab.save(str(d / f"dict.{lang}.txt"))
    return d


def build(dict_dir, *flags, arch="transformer_int8"):
    parser = options.get_training_parser()
    argv = [str(dict_dir), "--user-dir", str(PLUGIN), "--arch", arch, "--source-lang", "en",
            "--target-lang", "de", *map(str, TINY_MODEL), *flags]
    args = options.parse_args_and_arch(parser, argv)
    task = tasks.setup_task(args)
    return task.build_model(args)


def batch(seed=0, bsz=3, src_len=7, tgt_len=5):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(4, 60, (bsz, src_len), generator=g)
    prev = torch.randint(4, 60, (bsz, tgt_len), generator=g)
    return src, torch.full((bsz,), src_len), prev


def outputs(model):
    model.eval()
    src, lengths, prev = batch()
    with torch.no_grad():
        return model(src, lengths, prev)[0]


def kinds(model):
    return {name: type(m) for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Embedding, QuantLinear, QuantEmbedding))}


def test_default_replaces_every_linear_and_token_embedding(dict_dir):
    model = build(dict_dir, "--share-all-embeddings")
    found = kinds(model)
    assert not [n for n, t in found.items() if t in (nn.Linear, nn.Embedding)]
    assert "decoder.output_projection" in found and "encoder.embed_tokens" in found
    assert all(isinstance(m.wq.spec.bits, int) and m.wq.spec.bits == 8
               for m in model.modules() if isinstance(m, (QuantLinear, QuantEmbedding)))


@pytest.mark.parametrize("include,exclude,expected", [
    ("self_attn", "", lambda n: ".self_attn." in n),
    ("cross_attn", "", lambda n: ".encoder_attn." in n),
    ("ffn", "", lambda n: n.endswith((".fc1", ".fc2"))),
    ("encoder.layers.*.self_attn.*", "", lambda n: n.startswith("encoder.") and ".self_attn." in n),
    ("decoder", "embeddings,output_projection", lambda n: n.startswith("decoder.layers.")),
    ("all", "decoder", lambda n: n.startswith("encoder.")),
])
def test_replacement_covers_requested_layers_and_nothing_else(dict_dir, include, exclude, expected):
    model = build(dict_dir, "--quant-include", include, "--quant-exclude", exclude)
    found = kinds(model)
    quantized = {n for n, t in found.items() if t in (QuantLinear, QuantEmbedding)}
    assert quantized == {n for n in found if expected(n)}
    assert quantized, "the pattern must select something"


@pytest.mark.parametrize("flag", ["--share-all-embeddings", "--share-decoder-input-output-embed"])
def test_tied_embeddings_stay_one_tensor(dict_dir, flag):
    model = build(dict_dir, flag, "--quant-bits", "4")
    dec = model.decoder
    assert isinstance(dec.embed_tokens, QuantEmbedding) and isinstance(dec.output_projection, QuantLinear)
    assert dec.output_projection.weight is dec.embed_tokens.weight
    assert dec.output_projection.wq is dec.embed_tokens.wq
    if flag == "--share-all-embeddings":
        assert model.encoder.embed_tokens is dec.embed_tokens
    # one optimizer parameter, and the tie holds after an update
    params = list(model.parameters())
    assert sum(p is dec.embed_tokens.weight for p in params) == 1
    model.train()
    src, lengths, prev = batch()
    model(src, lengths, prev)[0].sum().backward()
    torch.optim.SGD(params, lr=0.1).step()
    assert dec.output_projection.weight is dec.embed_tokens.weight


def test_tie_is_followed_when_only_one_side_is_requested(dict_dir):
    model = build(dict_dir, "--share-decoder-input-output-embed", "--quant-include", "output_projection")
    assert isinstance(model.decoder.embed_tokens, QuantEmbedding)
    assert not isinstance(model.encoder.embed_tokens, QuantEmbedding)


@pytest.mark.parametrize("flags", [
    ("--quant-bits", "8"),
    ("--quant-bits", "4", "--quant-scheme", "asym", "--quant-granularity", "tensor"),
    ("--quant-bits", "1", "--attn-temperature", "2"),
    ("--quant-bits", "4", "--quant-act", "output", "--quant-act-bits", "6"),
])
def test_state_dict_round_trip_gives_identical_outputs(dict_dir, flags):
    model = build(dict_dir, "--share-all-embeddings", *flags)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.train()
    src, lengths, prev = batch(seed=1)
    model(src, lengths, prev)  # sets the activation ranges, if any
    expected = outputs(model)
    state = model.state_dict()
    bits = int(flags[1])
    for name, value in state.items():
        if name.endswith(".weight") and value.dim() == 2 and "layer_norm" not in name:
            assert max(row.unique().numel() for row in value) <= 2**bits, name
    other = build(dict_dir, "--share-all-embeddings", *flags)
    other.load_state_dict(state)
    assert torch.equal(outputs(other), expected)


def test_finetune_state_dict_from_plain_transformer(dict_dir):
    plain = build(dict_dir, "--share-all-embeddings", arch="transformer")
    model = build(dict_dir, "--share-all-embeddings", "--quant-act", "input")
    model.load_state_dict(plain.state_dict())  # activation ranges may be absent
    acts = [m for m in model.modules() if isinstance(m, ActQuantizer)]
    assert acts and not any(bool(a.initialized) for a in acts)
    fp32 = outputs(plain)
    q8 = outputs(model)
    assert not torch.equal(fp32, q8)
    assert (q8 - fp32).abs().max() < 0.1 * fp32.abs().max()


def test_incompatible_checkpoint_names_the_tensors(dict_dir):
    model = build(dict_dir, "--share-all-embeddings")
    bigger = build(dict_dir, "--share-all-embeddings", "--encoder-ffn-embed-dim", "128", arch="transformer")
    with pytest.raises(QuantConfigError, match=r"encoder\.layers\.0\.fc1\.weight: checkpoint \[128, 32\] vs model \[64, 32\]"):
        model.load_state_dict(bigger.state_dict())


@pytest.mark.parametrize("arch", ["transformer_int8", "transformer_bcq", "transformer_kmeans"])
def test_every_architecture_quantizes_activations_and_sets_the_temperature(dict_dir, arch):
    """The flags of the shared config base act the same in every architecture (not read by one only)."""
    model = build(dict_dir, "--quant-act", "input", "--quant-act-bits", "6", "--attn-temperature", "200",
                  "--quant-exclude", "decoder.layers.0.fc2", arch=arch)
    layer = model.decoder.layers[0]
    assert isinstance(layer.fc1.act_in, ActQuantizer) and layer.fc1.act_in.bits == 6 and layer.fc1.act_out is None
    assert type(layer.fc2) is nn.Linear
    attn = model.encoder.layers[0].self_attn
    assert attn.scaling == pytest.approx(attn.head_dim**-0.5 / 200)


@pytest.mark.parametrize("arch,flags", [("transformer_int8", ["--bcq-bits", "2"]),
                                        ("transformer_bcq", ["--quant-bits", "4"]),
                                        ("transformer_bcq", ["--bcq-include", "decoder"]),
                                        ("transformer_kmeans", ["--quant-scheme", "asym"])])
def test_another_architectures_flag_is_refused(dict_dir, arch, flags, capsys):
    with pytest.raises(SystemExit):
        build(dict_dir, *flags, arch=arch)
    assert f"unrecognized arguments: {' '.join(flags)}" in capsys.readouterr().err


def test_attention_temperature(dict_dir):
    model = build(dict_dir, "--attn-temperature", "200")
    attn = model.encoder.layers[0].self_attn
    assert attn.scaling == pytest.approx(attn.head_dim**-0.5 / 200)
    assert attn.skip_embed_dim_check  # the fused path would bypass the quantized projections


def test_layer_bits_override_quant_bits_later_entries_winning(dict_dir):
    model = build(dict_dir, "--quant-bits", "4", "--quant-layer-bits", "decoder_ffn:2,decoder.layers.0.fc2:8,embeddings:6")
    dec = model.decoder.layers[0]
    assert dec.fc1.wq.spec.bits == 2 and dec.fc2.wq.spec.bits == 8 and dec.self_attn.q_proj.wq.spec.bits == 4
    assert model.encoder.embed_tokens.wq.spec.bits == 6 and model.encoder.layers[0].fc1.wq.spec.bits == 4


@pytest.mark.parametrize("flags,match", [
    (("--quant-bits", "0"), "--quant-bits 0"),
    (("--quant-bits", "9"), "--quant-bits 9"),
    (("--quant-include", "self_attention"), "--quant-include 'self_attention' matches no quantizable module"),
    (("--quant-exclude", "decoder.layers.9.*"), "--quant-exclude"),
    (("--quant-act", "output", "--quant-act-bits", "1"), "--quant-act-bits"),
    (("--attn-temperature", "0"), "--attn-temperature"),
    (("--quant-layer-bits", "decoder_ffn:9"), "--quant-layer-bits 'decoder_ffn:9': int quantization takes 1 to 8 bits"),
    (("--quant-layer-bits", "decoder_fn:2"), "--quant-layer-bits 'decoder_fn' matches no quantizable module"),
    (("--quant-layer-bits", "decoder_ffn"), "--quant-layer-bits 'decoder_ffn': write PART:BITS"),
    (("--quant-act-bits", "4"), "--quant-act-bits 4 applies with --quant-act input or output only; "
                                "leave --quant-act-bits out"),
    (("--quant-bits", "1", "--quant-scheme", "asym"), "--quant-scheme asym applies to 2-8 bits "
                                                       r"\(1 bit is sign x mean\|W\|, no range\); leave --quant-scheme out"),
])
def test_bad_flags_name_the_flag(dict_dir, flags, match):
    with pytest.raises(QuantConfigError, match=match):
        build(dict_dir, *flags)


def test_unknown_scheme_is_an_argparse_error(dict_dir, capsys):
    with pytest.raises(SystemExit):
        build(dict_dir, "--quant-scheme", "log")
    assert "--quant-scheme" in capsys.readouterr().err
