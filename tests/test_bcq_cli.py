"""transformer_bcq end to end: fairseq-train with the pNR optimizer, resume, staged retraining, fairseq-generate."""
import re

import pytest
import torch

import fairseq_qplugin  # noqa: F401  (torch.load of fairseq checkpoints under weights_only)

from .conftest import BIN, ROOT, TINY_MODEL, run, train_args
from .test_cli import generate


def rows_over(state, levels_of):
    """Names of the 2-D weights with a row holding more distinct values than ``levels_of(name, row)``."""
    return [name for name, value in state.items() if name.endswith(".weight") and value.dim() == 2
            and any(row.unique().numel() > levels_of(name, i) for i, row in enumerate(value))]


@pytest.fixture(scope="module")
def pnr_run(tiny_data, fp32_checkpoint):
    save = tiny_data / "bcq3"
    proc = run(train_args(tiny_data / "bin", save, "transformer_bcq", 10, "--bcq-bits", 3,
                          "--optimizer", "pnr_adam", "--adam-betas", "(0.9, 0.98)", "--pnr-period", 4,
                          "--update-freq", 2, "--save-interval-updates", 3, "--keep-interval-updates", 10,
                          "--finetune-from-model", fp32_checkpoint))
    return save, proc.stdout


def test_pnr_training_saves_only_quantized_checkpoints_then_generates(tiny_data, pnr_run):
    save, log = pnr_run
    synced = re.findall(r"pNR: synced \d+ weights to their quantized values \((update \d+|checkpoint)\)", log)
    assert [s for s in synced if s.startswith("update")] == ["update 4", "update 8"], synced
    assert "for evaluation" in log and "checkpoint" in synced
    checkpoints = sorted(save.glob("*.pt"))
    assert {"checkpoint_1_3.pt", "checkpoint_last.pt", "checkpoint_best.pt"} <= {p.name for p in checkpoints}
    for path in checkpoints:
        state = torch.load(path)
        assert state["cfg"]["model"].arch == "transformer_bcq"
        assert rows_over(state["model"], lambda name, row: 8) == [], path.name
    hyps, out = generate(tiny_data / "bin", save / "checkpoint_last.pt")
    assert len(hyps) == 40, out[-2000:]
    assert re.search(r"BLEU4 = [\d.]+", out)


def test_resumed_pnr_run_keeps_its_sync_schedule(tiny_data, pnr_run):
    save, _ = pnr_run
    log = run(train_args(tiny_data / "bin", save, "transformer_bcq", 14, "--bcq-bits", 3, "--optimizer", "pnr_adam",
                         "--pnr-period", 4, "--update-freq", 2)).stdout
    assert re.search(r"Loaded checkpoint .*@ 10 updates", log)
    assert "quantized values (update 12)" in log  # the counter came back with the optimizer state
    assert rows_over(torch.load(save / "checkpoint_last.pt")["model"], lambda name, row: 8) == []


def test_staged_retraining_recipe_with_the_paper_preset(tiny_data, fp32_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{BIN}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("STAGE_UPDATES", "3")
    monkeypatch.setenv("PNR_PERIOD", "2")
    monkeypatch.setenv("FROM", "checkpoint_last.pt")
    run(["bash", ROOT / "recipes" / "bcq_staged.sh", tiny_data / "bin", fp32_checkpoint, tmp_path,
         "--arch", "transformer_bcq_paper", *TINY_MODEL, "--share-all-embeddings", "--max-tokens", 2000,
         "--no-epoch-checkpoints", "--seed", 1, "--log-format", "simple"])
    stage1 = torch.load(tmp_path / "1-embedding" / "checkpoint_last.pt")["model"]
    final = torch.load(tmp_path / "3-encoder" / "checkpoint_last.pt")
    assert final["cfg"]["model"].arch == "transformer_bcq_paper"
    # stage 1 quantized the (shared) embedding only; the final model has the paper's bits everywhere
    assert rows_over(stage1, lambda name, row: 16 if "embed_tokens" in name or "output_projection" in name else 10**6) == []
    assert rows_over(stage1, lambda name, row: 16) != []
    paper = {"encoder.layers.0.self_attn": 3, "encoder.layers.0.fc": 4, "decoder.layers.0.self_attn": 2,
             "decoder.layers.0.encoder_attn": 3, "decoder.layers.0.fc": 1, "embed_tokens": 4, "output_projection": 4}
    assert rows_over(final["model"], lambda name, row: 2 ** next(b for k, b in paper.items() if k in name)) == []
    assert rows_over(final["model"], lambda name, row: 2) != []  # not everything is 1 bit
    # generation rebuilds the word-frequency bits from the dictionary
    hyps, out = generate(tiny_data / "bin", tmp_path / "3-encoder" / "checkpoint_last.pt")
    assert len(hyps) == 40 and "2.50 average bits" in out, out[-2000:]


@pytest.mark.parametrize("flags,message", [
    (["--bcq-bits", 5], "--bcq-bits 5: BCQ takes 1 to 4 bits"),
    (["--optimizer", "pnr_adam", "--pnr-period", 0], "--pnr-period must be >= 1"),
    (["--bcq-layer-bits", "decoder_attn:2"], "--bcq-layer-bits 'decoder_attn' matches no quantizable module"),
])
def test_bad_input_gives_one_clear_error(tiny_data, fp32_checkpoint, tmp_path, flags, message):
    """One case per stage where flags are checked (parsing, model building, optimizer building); the
    other bad flags are checked in test_bcq_model.py."""
    args = train_args(tiny_data / "bin", tmp_path / "ckpt", "transformer_bcq", 5, "--finetune-from-model", fp32_checkpoint)
    proc = run(args + flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
