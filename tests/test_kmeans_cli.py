"""transformer_kmeans end to end through fairseq-train and fairseq-generate, and the analysis script."""
import re
import sys

import pytest
import torch

import fairseq_qplugin  # noqa: F401  (allow-lists fairseq checkpoints for torch.load)

from .conftest import ROOT, run, train_args
from .test_cli import generate

ARCH = "transformer_kmeans"


def max_values_per_tensor(state, keep=lambda name: True):
    return max(v.unique().numel() for k, v in state.items()
               if k.endswith(".weight") and v.dim() == 2 and "layer_norm" not in k and keep(k))


@pytest.fixture(scope="module")
def kmeans4_checkpoint(tiny_data, fp32_checkpoint):
    save = tiny_data / "kmeans4"
    run(train_args(tiny_data / "bin", save, ARCH, 20, "--quant-bits", 4, "--finetune-from-model", fp32_checkpoint))
    return save / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def bsflex_checkpoint(tiny_data, fp32_checkpoint):
    save = tiny_data / "bsflex"
    run(train_args(tiny_data / "bin", save, ARCH, 10, "--quant-method", "bsflex", "--quant-include", "self_attn",
                   "--finetune-from-model", fp32_checkpoint))
    return save / "checkpoint_last.pt"


def test_kmeans_train_then_generate(tiny_data, kmeans4_checkpoint):
    state = torch.load(kmeans4_checkpoint)
    assert state["cfg"]["model"].arch == ARCH
    assert max_values_per_tensor(state["model"]) <= 16
    hyps, log = generate(tiny_data / "bin", kmeans4_checkpoint)
    assert len(hyps) == 40, log[-2000:]
    assert re.search(r"BLEU4 = [\d.]+", log)


def test_bsflex_self_attention_only(tiny_data, bsflex_checkpoint):
    model = torch.load(bsflex_checkpoint)["model"]
    assert max_values_per_tensor(model, lambda k: ".self_attn." in k) <= 2
    assert max_values_per_tensor(model, lambda k: ".self_attn." not in k) > 16  # the rest stays fp32
    hyps, _ = generate(tiny_data / "bin", bsflex_checkpoint)
    assert len(hyps) == 40


@pytest.mark.parametrize("ranking", ["tensor", "global"])
def test_pruning_schedule_resume_and_generate(tiny_data, fp32_checkpoint, ranking):
    save = tiny_data / f"prune-{ranking}"
    args = train_args(tiny_data / "bin", save, ARCH, 12, "--quant-method", "none", "--prune-schedule", "0:0.3,10:0.5",
                      "--prune-ranking", ranking, "--quant-include", "encoder,decoder",
                      "--finetune-from-model", fp32_checkpoint)
    proc = run(args)
    assert "update 10: pruning to 50% sparsity" in proc.stdout
    assert ("with one magnitude threshold: embeddings" in proc.stdout) == (ranking == "global")
    first = torch.load(save / "checkpoint_last.pt")["model"]
    run(args[: args.index("--finetune-from-model")] + ["--max-update", 16])  # resumes from checkpoint_last.pt
    state = torch.load(save / "checkpoint_last.pt")["model"]
    tied = ("decoder.embed_tokens.", "decoder.output_projection.")  # --share-all-embeddings: encoder.embed_tokens
    masks = {name[: -len("wq.mask")]: mask for name, mask in state.items()
             if name.endswith(".wq.mask") and not name.startswith(tied)}
    assert len(masks) == 1 + 2 * 6 + 4  # the embedding; q, k, v, out, fc1, fc2 per layer; cross-attention
    for name, mask in masks.items():
        assert (state[name + "weight"][~mask] == 0).all() and torch.equal(mask, first[name + "wq.mask"]), name
        if ranking == "tensor":
            assert (~mask).sum() == round(0.5 * mask.numel()), name
    total = sum(m.numel() for m in masks.values())
    assert sum(int((~m).sum()) for m in masks.values()) == round(0.5 * total)
    assert (len({int((~m).sum()) * 1000 // m.numel() for m in masks.values()}) > 2) == (ranking == "global")
    hyps, _ = generate(tiny_data / "bin", save / "checkpoint_last.pt")
    assert len(hyps) == 40


@pytest.mark.parametrize("flags,message", [
    (["--quant-bits", 9], "--quant-bits 9"),
    (["--prune-schedule", "0:0.3,100:1.2"], "sparsity 1.2 is outside [0, 1)"),
    (["--quant-include", "attention"], "--quant-include 'attention' matches no quantizable module"),
])
def test_bad_input_gives_one_clear_error(tiny_data, fp32_checkpoint, tmp_path, flags, message):
    args = train_args(tiny_data / "bin", tmp_path / "ckpt", ARCH, 5, "--finetune-from-model", fp32_checkpoint)
    proc = run(args + flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout and "fairseq-qplugin: error:" in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]


def test_analysis_writes_png(tmp_path, fp32_checkpoint, kmeans4_checkpoint, bsflex_checkpoint):
    out = tmp_path / "attn.png"
    proc = run([sys.executable, "-m", "fairseq_qplugin.analysis", f"fp32={fp32_checkpoint}",
                f"4-bit={kmeans4_checkpoint}", f"BS-Flex (self-att only)={bsflex_checkpoint}", "--out", out], cwd=ROOT)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert re.search(r"4-bit: \d+ weights, .*, 16 distinct values at most", proc.stdout), proc.stdout
    assert re.search(r"BS-Flex \(self-att only\): \d+ weights, .*, 2 distinct values at most", proc.stdout)
