"""The model card fairseq-qpack writes next to a packed file (pack/card.py)."""
import hashlib
import json

import fairseq_qplugin

from .conftest import run
from .test_pack_cli import _assert_clear_error, qpack


def test_card_describes_the_packed_file(tiny_data, fp32_checkpoint, tmp_path):
    refs = (tiny_data / "test.de").read_text(encoding="utf-8").splitlines()
    (tmp_path / "hyp.txt").write_text("\n".join(r.lower() for r in refs) + "\n", encoding="utf-8")
    score = run(["sacrebleu", tiny_data / "test.de", "-i", tmp_path / "hyp.txt", "-m", "bleu", "-f", "json"]).stdout
    (tmp_path / "bleu.json").write_text(score, encoding="utf-8")
    expected = json.loads(score)
    packed = tmp_path / "m.pt"
    qpack(fp32_checkpoint, packed, "--method", "int", "--bits", 4, "--exclude", "decoder",
          "--bleu-json", tmp_path / "bleu.json")
    card = json.loads((tmp_path / "m.card.json").read_text())
    assert card["plugin_version"] == fairseq_qplugin.__version__
    assert card["source"] == {"checkpoint": fp32_checkpoint.name, "arch": "transformer", "post_training": True,
                              "sha256": hashlib.sha256(fp32_checkpoint.read_bytes()).hexdigest()}
    parts = card["quantization"]["parts"]
    assert parts["encoder.layers.*.fc1"] == "int 4-bit" and parts["encoder.embed_tokens"] == "int 4-bit"
    assert not any(k.startswith("decoder.layers") for k in parts)
    assert card["quantization"]["post_training"]["exclude"] == "decoder"
    size = card["size"]
    assert size["file_bytes"] == packed.stat().st_size
    assert size["components"]["encoder"]["avg_bits"] > 4 and size["components"]["decoder"]["avg_bits"] is None
    assert card["bleu"]["score"] == expected["score"] and card["bleu"]["signature"] == expected["signature"]
    md = (tmp_path / "m.card.md").read_text()
    assert expected["signature"] in md and f"{expected['score']:.2f}" in md and card["source"]["sha256"] in md


def test_bad_bleu_json_is_refused_before_packing(fp32_checkpoint, tmp_path):
    (tmp_path / "bleu.json").write_text("BLEU = 20.1\n")
    proc = qpack(fp32_checkpoint, tmp_path / "m.pt", "--method", "int", "--bits", 4,
                 "--bleu-json", tmp_path / "bleu.json", check=False)
    _assert_clear_error(proc, "not sacrebleu's JSON output")
    assert not (tmp_path / "m.pt").exists()
