"""python -m fairseq_qplugin.help (every architecture's flags with defaults) and fairseq-qpack's progress log."""
import re

import pytest

from fairseq_qplugin import help as qhelp

from .test_pack_cli import qpack

INTERNAL = re.compile(r"seed 0\d|seeds 0\d|METHODS\.md|§|the issue|the poster", re.I)


def test_every_architecture_lists_its_flags_with_defaults(capsys):
    archs = qhelp.plugin_archs()
    assert {"transformer_int8", "transformer_bcq", "transformer_kmeans", "transformer_bcq_paper"} <= set(archs)
    for arch, model in archs.items():
        text = qhelp.arch_help(arch)
        flags = re.findall(r"^  (--[a-z0-9-]+)", text, re.M)
        assert len(flags) == len([f for f in model.config_cls.__dataclass_fields__ if not f.startswith("_")]), arch
        assert text.count("(default:") == len(flags), arch
        assert not INTERNAL.search(text), (arch, INTERNAL.search(text))
    int8 = qhelp.arch_help("transformer_int8")
    assert re.search(r"--quant-bits QUANT_BITS\s+bits per weight.*?\(default: 8\)", int8, re.S)
    assert "encoder-layers 6" in int8 and "encoder-layers 3" not in int8
    paper = qhelp.arch_help("transformer_bcq_paper")  # a preset's own defaults, not the dataclass's
    assert re.search(r"--bcq-embed-bits.*?\(default: 4\)", paper, re.S)
    qhelp.main([])
    assert "transformer_kmeans_wmt_en_de" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="'transformer' is not an architecture of fairseq-qplugin"):
        qhelp.main(["transformer"])


def test_post_training_quantization_logs_each_weight(fp32_checkpoint, tmp_path):
    log = qpack(fp32_checkpoint, tmp_path / "p.pt", "--method", "bcq", "--bits", 2).stdout
    steps = re.findall(r"\[(\d+)/(\d+)\] (\S+): \((\d+), (\d+)\) bcq, bits=2", log)
    assert [int(s[0]) for s in steps] == list(range(1, len(steps) + 1)) and steps, log[-3000:]
    assert {int(s[1]) for s in steps} == {len(steps)} == {17}
    assert steps[0][2] == "encoder.embed_tokens"  # the tied embedding first, once
