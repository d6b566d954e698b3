import gzip
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "fairseq_qplugin"
CORPUS = ROOT / "data" / "debian-doc-en-de"
BIN = Path(sys.executable).parent


def read_lines(split, lang, n):
    with gzip.open(CORPUS / f"{split}.{lang}.gz", "rt", encoding="utf-8") as f:
        return [line for _, line in zip(range(n), f)]


def run(cmd, cwd=None, check=True):
    """Run a command line tool of the venv; return the CompletedProcess (stdout+stderr as text)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    proc = subprocess.run([exe, *map(str, cmd[1:])], cwd=cwd, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed:\n{proc.stdout[-4000:]}")
    return proc


TINY_MODEL = [
    "--encoder-layers", 1, "--decoder-layers", 1, "--encoder-embed-dim", 32, "--decoder-embed-dim", 32,
    "--encoder-ffn-embed-dim", 64, "--decoder-ffn-embed-dim", 64,
    "--encoder-attention-heads", 2, "--decoder-attention-heads", 2,
]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Real sentence pairs from the shipped corpus, sentencepiece-encoded and binarized by fairseq."""
    import sentencepiece as spm

    d = tmp_path_factory.mktemp("tiny")
    sizes = {"train": 600, "valid": 40, "test": 40}
    for split, n in sizes.items():
        for lang in ("en", "de"):
            (d / f"{split}.{lang}").write_text("".join(read_lines(split, lang, n)), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=f"{d}/train.en,{d}/train.de", model_prefix=str(d / "spm"), vocab_size=400,
        character_coverage=1.0, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_file=str(d / "spm.model"))
    for split in sizes:
        for lang in ("en", "de"):
            lines = (d / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
            (d / f"{split}.spm.{lang}").write_text(
                "".join(" ".join(sp.encode(t, out_type=str)) + "\n" for t in lines), encoding="utf-8")
    run(["fairseq-preprocess", "--source-lang", "en", "--target-lang", "de", "--joined-dictionary",
         "--trainpref", d / "train.spm", "--validpref", d / "valid.spm", "--testpref", d / "test.spm",
         "--destdir", d / "bin", "--workers", 1])
    return d


def train_args(data_bin, save_dir, arch, max_update, *extra):
    return ["fairseq-train", data_bin, "--user-dir", PLUGIN, "--arch", arch, *TINY_MODEL,
            "--share-all-embeddings", "--optimizer", "adam", "--lr", "0.003", "--max-tokens", 2000,
            "--max-update", max_update, "--save-dir", save_dir, "--no-epoch-checkpoints",
            "--seed", 1, "--log-format", "simple", "--log-interval", 10, *extra]


@pytest.fixture(scope="session")
def fp32_checkpoint(tiny_data):
    """A plain fairseq ``transformer`` trained for a few updates on the tiny data."""
    save = tiny_data / "fp32"
    run(train_args(tiny_data / "bin", save, "transformer", 60))
    return save / "checkpoint_last.pt"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
