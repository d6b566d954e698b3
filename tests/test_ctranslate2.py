"""fairseq-qpack --export-ctranslate2: an 8-bit symmetric QAT checkpoint in CTranslate2, codes unchanged."""
import numpy as np
import pytest
import torch

from .conftest import run
from .test_cli import generate
from .test_pack_cli import _assert_clear_error, qat, qpack

ctranslate2 = pytest.importorskip("ctranslate2", reason="pip install 'fairseq-qplugin[bench]'")
sacrebleu = pytest.importorskip("sacrebleu")

from fairseq_qplugin.pack.ctranslate2 import read_model_bin  # noqa: E402
from fairseq_qplugin.quant import QuantSpec, quantize  # noqa: E402

BEAM = 2  # tests.test_cli.generate's


@pytest.fixture(scope="module")
def sym8(tiny_data, fp32_checkpoint, tmp_path_factory):
    """(QAT checkpoint at 8 bits sym per channel, its CTranslate2 export directory)."""
    ckpt = qat(tiny_data, fp32_checkpoint, "ct2_sym8", "transformer_int8", "--quant-bits", 8)
    out = tmp_path_factory.mktemp("ct2") / "model"
    proc = qpack("--export-ctranslate2", out, ckpt)
    assert "int8 weight matrices" in proc.stdout, proc.stdout[-2000:]
    return ckpt, out


def expected_codes(state, prefix):
    """int8 codes (code - 128) of a checkpoint weight, computed here from the saved (fake-quant) tensor."""
    qw = quantize(state[prefix + ".weight"].float(), QuantSpec("int", 8, "sym", "channel"))
    return (qw.codes.to(torch.int16) - 128).to(torch.int8).numpy(), qw.scale.reshape(-1).numpy()


def test_exported_int8_weights_are_the_qat_codes_bit_for_bit(sym8):
    ckpt, out = sym8
    state = torch.load(ckpt)["model"]
    ct2 = read_model_bin(str(out / "model.bin"))
    pairs = {"encoder/embeddings_0/weight": ["encoder.embed_tokens"],
             "decoder/projection/weight": ["decoder.output_projection"]}
    for side, n in (("encoder", 1), ("decoder", 1)):
        for i in range(n):
            lp, mp = f"{side}/layer_{i}", f"{side}.layers.{i}"
            pairs[f"{lp}/ffn/linear_0/weight"] = [f"{mp}.fc1"]
            pairs[f"{lp}/ffn/linear_1/weight"] = [f"{mp}.fc2"]
            pairs[f"{lp}/self_attention/linear_0/weight"] = [f"{mp}.self_attn.{p}_proj" for p in "qkv"]
            pairs[f"{lp}/self_attention/linear_1/weight"] = [f"{mp}.self_attn.out_proj"]
            if side == "decoder":
                pairs[f"{lp}/attention/linear_0/weight"] = [f"{mp}.encoder_attn.q_proj"]
                pairs[f"{lp}/attention/linear_1/weight"] = [f"{mp}.encoder_attn.{p}_proj" for p in "kv"]
                pairs[f"{lp}/attention/linear_2/weight"] = [f"{mp}.encoder_attn.out_proj"]
    for path, modules in pairs.items():
        codes, scales = zip(*(expected_codes(state, m) for m in modules))
        codes, scales = np.concatenate(codes), np.concatenate(scales)
        got = ct2[path]
        assert got.dtype == np.int8 and got.tobytes() == codes.tobytes(), path
        assert np.abs(got).max() == 127  # the QAT grid: max|w| of a row is code +-127
        ct2_scale = ct2[path[: -len("weight")] + "weight_scale"]
        np.testing.assert_allclose(1.0 / ct2_scale.astype(np.float64), scales, rtol=1e-7)
        weights = np.concatenate([state[m + ".weight"].float().numpy() for m in modules])
        np.testing.assert_allclose(got / ct2_scale[:, None], weights, rtol=1e-6, atol=0)


def ct2_translate(out, source_lines, compute_type):
    translator = ctranslate2.Translator(str(out), device="cpu", compute_type=compute_type, intra_threads=1)
    results = translator.translate_batch([line.split() for line in source_lines], beam_size=BEAM,
                                         max_decoding_length=200)
    return [" ".join(r.hypotheses[0]) for r in results]


def fairseq_translations(tiny_data, ckpt, split):
    hyps, _ = generate(tiny_data / "bin", ckpt, "--gen-subset", split)
    by_id = {int(h.split("\t")[0][2:]): h.split("\t")[2] for h in hyps}
    return [by_id[i] for i in range(len(by_id))]


def bleu(hyps, refs):
    detok = [h.replace(" ", "").replace("\u2581", " ").strip() for h in hyps]
    return sacrebleu.corpus_bleu(detok, [refs]).score


def test_translations_match_fairseq_generate(tiny_data, sym8):
    """On the 600 training sentences (enough for a 98% threshold to allow a few near-ties)."""
    ckpt, out = sym8
    source = (tiny_data / "train.spm.en").read_text(encoding="utf-8").splitlines()
    refs = (tiny_data / "train.de").read_text(encoding="utf-8").splitlines()
    expected = fairseq_translations(tiny_data, ckpt, "train")
    assert len(expected) == len(source) == 600
    exact = ct2_translate(out, source, "float32")
    same = sum(a == b for a, b in zip(exact, expected))
    assert same >= 0.98 * len(expected), (same, len(expected))
    fast = ct2_translate(out, source, "int8")
    assert abs(bleu(fast, refs) - bleu(expected, refs)) <= 0.2, (bleu(fast, refs), bleu(expected, refs))
    # the tiny model scores about 0 BLEU against the references, so also: int8 (which quantizes the
    # activations too) scored against fairseq's own translations stays close to them
    agreement = sacrebleu.corpus_bleu(fast, [expected]).score
    print(f"float32: {same}/{len(expected)} identical; int8: {sum(a == b for a, b in zip(fast, expected))} "
          f"identical, BLEU against fairseq's translations {agreement:.2f}")
    assert agreement >= 90, agreement


@pytest.mark.parametrize("flags,message", [
    (["--method", "int", "--bits", 4], "--export-ctranslate2 takes symmetric 8-bit int weights"),
    (["--method", "int", "--bits", 8, "--scheme", "asym"], "is 8-bit int (asym)"),
    (["--method", "bcq", "--bits", 2], "is 2-bit bcq"),
    ([], "has no quantized module"),
])
def test_other_schemes_and_bit_widths_are_refused_with_one_line(fp32_checkpoint, tmp_path, flags, message):
    proc = qpack("--export-ctranslate2", tmp_path / "ct2", fp32_checkpoint, *flags, check=False)
    _assert_clear_error(proc, message)
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1, proc.stdout[-2000:]
    assert not (tmp_path / "ct2" / "model.bin").exists()


def test_post_training_8_bit_export_runs(fp32_checkpoint, tmp_path):
    """--method int --bits 8 on an fp32 checkpoint: the same grid, exported without training."""
    proc = qpack("--export-ctranslate2", tmp_path / "ct2", fp32_checkpoint, "--method", "int", "--bits", 8)
    assert "int8 weight matrices" in proc.stdout
    ct2 = read_model_bin(str(tmp_path / "ct2" / "model.bin"))
    assert ct2["encoder/layer_0/ffn/linear_0/weight"].dtype == np.int8
    assert run(["python", "-c", f"import ctranslate2; ctranslate2.Translator({str(tmp_path / 'ct2')!r})"]).returncode == 0
