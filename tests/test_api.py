"""The Python API (fairseq_qplugin/api.py) and the snippets of docs/api.md, executed as written."""
import os
import re

import pytest

from .conftest import ROOT, run
from .test_cli import generate

import fairseq_qplugin
from fairseq_qplugin import load_packed, quantize_model
from fairseq_qplugin.errors import QuantConfigError


def blocks(doc, lang):
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / doc).read_text(encoding="utf-8"), re.S)


@pytest.fixture()
def workdir(tiny_data, fp32_checkpoint, tmp_path, monkeypatch):
    """The folder docs/api.md assumes: fp32/checkpoint_best.pt, data-bin/, spm.model."""
    (tmp_path / "fp32").mkdir()
    os.symlink(fp32_checkpoint, tmp_path / "fp32" / "checkpoint_best.pt")
    os.symlink(tiny_data / "bin", tmp_path / "data-bin")
    os.symlink(tiny_data / "spm.model", tmp_path / "spm.model")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_version_is_the_packages():
    assert re.fullmatch(r"\d+\.\d+\.\d+", fairseq_qplugin.__version__)
    assert f'__version__ = "{fairseq_qplugin.__version__}"' in (ROOT / "fairseq_qplugin/__init__.py").read_text()


def test_documented_snippets_run(workdir, capsys):
    (command,) = blocks("docs/api.md", "bash")
    run(command.split(), cwd=workdir)  # fairseq-qpack ... --method int --bits 4
    namespace = {}
    for code in blocks("docs/api.md", "python"):
        exec(compile(code, "docs/api.md", "exec"), namespace)  # noqa: S102 - the documented snippet
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 3 and printed[1].endswith(" bits"), printed
    assert isinstance(namespace["packed"].translate(["a", "b"]), list)


def test_quantize_model_translates_as_the_packed_file(workdir, tiny_data):
    """The API's swap equals fairseq-qpack --method: fairseq-generate on the packed file, and the hub
    with quantize_model, give the same hypotheses for the test sentences."""
    from fairseq.models.transformer import TransformerModel

    run(["fairseq-qpack", "fp32/checkpoint_best.pt", "p.pt", "--method", "bcq", "--bits", 2], cwd=workdir)
    hyps, _ = generate(tiny_data / "bin", workdir / "p.pt")
    expected = {int(h.split("\t")[0][2:]): h.split("\t")[2] for h in hyps}
    hub = TransformerModel.from_pretrained("fp32", checkpoint_file="checkpoint_best.pt", data_name_or_path="data-bin")
    summary = quantize_model(hub, method="bcq", bits=2)
    assert summary["code_bits"] == 2.0
    pieces = (tiny_data / "test.spm.en").read_text(encoding="utf-8").splitlines()
    got = hub.translate(pieces, beam=2)
    assert sum(got[i] == expected[i] for i in expected) >= 0.95 * len(expected)
    packed = load_packed(workdir / "p.pt", data=workdir / "data-bin")
    assert packed.translate(pieces[:5], beam=2) == got[:5]


def test_quantize_model_rejects_bad_values_with_one_line(fp32_checkpoint, tiny_data):
    from fairseq.models.transformer import TransformerModel

    hub = TransformerModel.from_pretrained(str(fp32_checkpoint.parent), checkpoint_file=fp32_checkpoint.name,
                                           data_name_or_path=str(tiny_data / "bin"))
    with pytest.raises(QuantConfigError, match="bcq quantization takes 1 to 4 bits, got 5"):
        quantize_model(hub, method="bcq", bits=5)
    with pytest.raises(QuantConfigError, match="--include 'attention' matches no quantizable module"):
        quantize_model(hub, include="attention")
