"""End to end through the real command-line tools: fairseq-train, fairseq-generate, fairseq-interactive."""
import re

import pytest
import torch

from .conftest import PLUGIN, ROOT, run, train_args


def max_levels_per_row(state, bits):
    worst = {}
    for name, value in state.items():
        if name.endswith(".weight") and value.dim() == 2:
            worst[name] = max(row.unique().numel() for row in value)
    assert worst, "no 2-D weights in the checkpoint"
    return {n: k for n, k in worst.items() if k > 2**bits}


def generate(data_bin, checkpoint, *extra):
    out = run(["fairseq-generate", data_bin, "--user-dir", PLUGIN, "--path", checkpoint, "--gen-subset", "test",
               "--beam", 2, "--max-tokens", 4000, *extra])
    hyps = [line for line in out.stdout.splitlines() if line.startswith("H-")]
    return hyps, out.stdout


@pytest.fixture(scope="module")
def int4_checkpoint(tiny_data, fp32_checkpoint):
    save = tiny_data / "int4"
    run(train_args(tiny_data / "bin", save, "transformer_int8", 20, "--quant-bits", 4,
                   "--finetune-from-model", fp32_checkpoint))
    return save / "checkpoint_last.pt"


def test_plain_fairseq_checkpoint_loads_under_weights_only(fp32_checkpoint):
    import fairseq_qplugin  # noqa: F401

    state = torch.load(fp32_checkpoint)  # torch >= 2.6 defaults to weights_only=True
    assert "model" in state and state["cfg"]["model"]


LIBRARY_IMPORT = """
import sys
import argparse
import torch
from fairseq import checkpoint_utils
from fairseq.criterions import CRITERION_REGISTRY
from fairseq.models import ARCH_MODEL_REGISTRY
from fairseq.optim import OPTIMIZER_REGISTRY

LOADERS = ("load_checkpoint_to_cpu", "load_model_ensemble_and_task", "load_checkpoint")
before = [sys.excepthook] + [getattr(checkpoint_utils, n) for n in LOADERS]
import fairseq_qplugin
assert [sys.excepthook] + [getattr(checkpoint_utils, n) for n in LOADERS] == before, "import changed a hook"
assert {"transformer_int8", "transformer_bcq", "transformer_kmeans", "transformer_packed"} <= set(ARCH_MODEL_REGISTRY)
assert "pnr_adam" in OPTIMIZER_REGISTRY and "label_smoothed_cross_entropy_distill" in CRITERION_REGISTRY
assert argparse.Namespace in torch.serialization.get_safe_globals()
fairseq_qplugin.install_command_hooks()
after = [sys.excepthook] + [getattr(checkpoint_utils, n) for n in LOADERS]
assert all(a is not b for a, b in zip(after, before)), "install_command_hooks installed nothing"
print("library import: ok")
"""


def test_library_import_registers_everything_and_installs_no_hook():
    """``import fairseq_qplugin`` in a program (here ``python -c``) leaves sys.excepthook and fairseq's
    loader alone; the commands install both (the tests above and below run them)."""
    import sys

    from fairseq_qplugin.commands import is_command

    assert "library import: ok" in run([sys.executable, "-c", LIBRARY_IMPORT], cwd=ROOT).stdout
    for argv0 in ("/venv/bin/fairseq-train", "fairseq-generate", "/venv/bin/fairseq-interactive", "fairseq-validate",
                  "/venv/bin/fairseq-qpack", "/venv/lib/python3.12/site-packages/fairseq_cli/generate.py"):
        assert is_command(argv0), argv0
    for argv0 in ("-c", "", "/venv/bin/pytest", "/home/me/translate.py", "/venv/lib/fairseq/train.py"):
        assert not is_command(argv0), argv0


def test_train_from_fp32_then_generate(tiny_data, fp32_checkpoint, int4_checkpoint):
    state = torch.load(int4_checkpoint)
    assert state["cfg"]["model"].arch == "transformer_int8"
    assert max_levels_per_row(state["model"], 4) == {}
    # the fp32 checkpoint is not quantized, so the check above can fail
    assert max_levels_per_row(torch.load(fp32_checkpoint)["model"], 4) != {}
    hyps, log = generate(tiny_data / "bin", int4_checkpoint)
    assert len(hyps) == 40, log[-2000:]
    assert re.search(r"BLEU4 = [\d.]+", log)


def test_interactive_translates(tiny_data, int4_checkpoint):
    proc = run(["fairseq-interactive", tiny_data / "bin", "--user-dir", PLUGIN, "--path", int4_checkpoint,
                "--source-lang", "en", "--target-lang", "de", "--beam", 2, "--input", tiny_data / "test.spm.en",
                "--max-tokens", 4000])
    assert len([line for line in proc.stdout.splitlines() if line.startswith("H-")]) == 40


def test_resume_training_continues(tiny_data, fp32_checkpoint, int4_checkpoint):
    """checkpoint_last.pt of a quantized run resumes (optimizer state and all) for more updates."""
    save = int4_checkpoint.parent
    proc = run(train_args(tiny_data / "bin", save, "transformer_int8", 30, "--quant-bits", 4))
    assert re.search(r"Loaded checkpoint .*@ 20 updates", proc.stdout) and "num_updates 30" in proc.stdout
    assert max_levels_per_row(torch.load(save / "checkpoint_last.pt")["model"], 4) == {}


def test_binarized_with_activations_and_temperature(tiny_data, fp32_checkpoint):
    save = tiny_data / "bin1"
    run(train_args(tiny_data / "bin", save, "transformer_int8", 10, "--quant-bits", 1, "--quant-act", "output",
                   "--quant-act-bits", 8, "--attn-temperature", 2, "--quant-include", "encoder,decoder",
                   "--finetune-from-model", fp32_checkpoint))
    state = torch.load(save / "checkpoint_last.pt")["model"]
    assert max_levels_per_row(state, 1) == {}
    assert any(k.endswith("act_out.running_max") for k in state)
    hyps, _ = generate(tiny_data / "bin", save / "checkpoint_last.pt")
    assert len(hyps) == 40


@pytest.mark.parametrize("flags,message", [
    (["--quant-bits", 9], "--quant-bits 9"),
    (["--quant-bits", 0], "--quant-bits 0"),
    (["--quant-include", "attention"], "--quant-include 'attention' matches no quantizable module"),
    (["--quant-scheme", "log"], "--quant-scheme: invalid choice"),
    (["--encoder-ffn-embed-dim", 128], "does not fit the model built from your flags"),
])
def test_bad_input_gives_one_clear_error(tiny_data, fp32_checkpoint, tmp_path, flags, message):
    args = train_args(tiny_data / "bin", tmp_path / "ckpt", "transformer_int8", 5,
                      "--finetune-from-model", fp32_checkpoint)
    proc = run(args + flags, check=False)
    assert proc.returncode != 0
    assert message in proc.stdout, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]


def test_results_table_reports_bits_and_size(tiny_data, fp32_checkpoint, int4_checkpoint, tmp_path):
    for name, bleu in (("fp32", "12.5"), ("int4", "11.9")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "bleu.txt").write_text(bleu + "\n")
    out = tmp_path / "results.md"
    run(["python", "-m", "fairseq_qplugin.results", "--out", out,
         f"fp32={fp32_checkpoint}:{tmp_path / 'fp32'}", f"int4={int4_checkpoint}:{tmp_path / 'int4'}"], cwd=ROOT)
    lines = out.read_text().splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = {cells[0]: dict(zip(header, cells)) for cells in
            ([c.strip() for c in line.split("|")[1:-1]] for line in lines[2:])}
    fp32, int4 = rows["fp32"], rows["int4"]
    assert [fp32[k] for k in ("BLEU", "Δ BLEU vs fp32", "% of baseline", "code bits (avg)")] == ["12.50", "", "100.0%", "32.00"]
    assert [int4[k] for k in ("Δ BLEU vs fp32", "% of baseline", "code bits (avg)")] == ["-0.60", "95.2%", "4.00"]
    assert (fp32["method"], int4["method"]) == ("fp32", "int (range-based linear)")
    assert 4.0 < float(int4["bits with scales"]) < 4.6  # 4-bit codes plus one fp16 scale per row
    assert float(int4["compression"].rstrip("x")) > 4.0  # layer norms and biases stay fp32
    assert int4["tok. BLEU (compound split)"] == int4["tokens/s"] == "n/a"  # bleu.txt only


def test_results_table_of_a_checkpoint_trained_on_a_relative_data_path(tiny_data, int4_checkpoint, tmp_path):
    """A checkpoint names its data directory as it was given to fairseq-train (e.g. ``bin``): elsewhere the
    table says to give --data, and with --data it reads the dictionaries from there."""
    from fairseq_qplugin.checkpoint import load_state

    state = load_state(int4_checkpoint)
    state["cfg"]["task"]["data"] = "bin"
    ckpt = tmp_path / "relative.pt"
    torch.save(state, ckpt)
    (tmp_path / "gen").mkdir()
    (tmp_path / "gen" / "bleu.txt").write_text("11.9\n")
    args = ["python", "-m", "fairseq_qplugin.results", "--out", tmp_path / "t.md", f"int4={ckpt}:{tmp_path / 'gen'}"]
    proc = run(args, cwd=ROOT, check=False)
    assert proc.returncode != 0 and "give --data DIR" in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-2000:]
    run(args + ["--data", tiny_data / "bin"], cwd=ROOT)
    assert "| int4 |" in (tmp_path / "t.md").read_text()
