"""The recipes end to end on tiny data: local corpus -> every method -> results table and plot; the
WMT14 example's data preparation on fake archives; the BLEU scorers; idempotency and bad input."""
import io
import os
import re
import struct
import subprocess
import tarfile
import time
from collections import Counter
from math import exp, log
from pathlib import Path

import pytest
import sacrebleu

from fairseq_qplugin.scoring import compound_split, compound_split_bleu, detok_bleu, moses_tokenize, score

from .conftest import BIN, ROOT, TINY_MODEL, read_lines

RECIPES = ROOT / "recipes"
EXAMPLE = ROOT / "examples" / "wmt14_en_de"
TINY = [str(x) for x in TINY_MODEL]
GEN_SHORT = ["--", "--max-len-b", "20"]  # tiny models babble: keep generation short


def sh(*cmd, check=True):
    """Run a recipe with the venv on PATH and this tree's package importable; return (proc, seconds)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    start = time.monotonic()
    proc = subprocess.run(["bash", *map(str, cmd)], env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout[-4000:]}")
    return proc, time.monotonic() - start


def write_corpus(d: Path, sizes=(("train", 300), ("valid", 20), ("test", 20))):
    d.mkdir(parents=True, exist_ok=True)
    for split, n in sizes:
        for lang in ("en", "de"):
            (d / f"{split}.{lang}").write_text("".join(read_lines(split, lang, n)), encoding="utf-8")
    return d


def is_png(path: Path) -> bool:
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        return False
    width, height = struct.unpack(">II", data[16:24])
    return width > 100 and height > 100 and data[-8:-4] == b"IEND"


def mtimes(d: Path):
    return {p: p.stat().st_mtime_ns for p in d.rglob("*") if p.is_file()}


# ---- BLEU ---------------------------------------------------------------------------------------

HYPS = ["Die Hals-Nasen-Ohren-Klinik ist heute geschlossen.", "Das ist ein kleiner Test für E-Mail-Adressen."]
REFS = ["Die Hals-Nasen-Ohren-Klinik ist heute zu.", "Dies ist ein kleiner Test für E-Mail-Adressen."]
# The same sentences, Moses-tokenized and compound-split by hand.
HYPS_SPLIT = ["Die Hals ##AT##-##AT## Nasen ##AT##-##AT## Ohren ##AT##-##AT## Klinik ist heute geschlossen .",
              "Das ist ein kleiner Test für E ##AT##-##AT## Mail ##AT##-##AT## Adressen ."]
REFS_SPLIT = ["Die Hals ##AT##-##AT## Nasen ##AT##-##AT## Ohren ##AT##-##AT## Klinik ist heute zu .",
              "Dies ist ein kleiner Test für E ##AT##-##AT## Mail ##AT##-##AT## Adressen ."]


def multi_bleu(hyps, refs):
    """multi-bleu.perl on whitespace tokens (one reference): clipped n-gram precisions, brevity penalty."""
    match, total = [0] * 4, [0] * 4
    hyp_len = ref_len = 0
    for h, r in zip(hyps, refs):
        h, r = h.split(), r.split()
        hyp_len, ref_len = hyp_len + len(h), ref_len + len(r)
        for n in range(1, 5):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    bp = 1.0 if hyp_len > ref_len else exp(1 - ref_len / hyp_len)
    return 100 * bp * exp(sum(log(m / t) for m, t in zip(match, total)) / 4)


def test_compound_split_rule():
    # the perl rule's matches do not overlap: one-letter parts between two hyphens stay joined
    assert compound_split("a-b-c d-e x- -y") == "a ##AT##-##AT## b-c d ##AT##-##AT## e x- -y"
    assert [compound_split(s) for s in moses_tokenize(HYPS, "de")] == HYPS_SPLIT


def test_compound_split_bleu_equals_an_independent_reference():
    ours = compound_split_bleu(HYPS, REFS, "de").score
    # by hand: 12 + 12 tokens on each side (no brevity penalty); one word differs in each sentence
    # ("geschlossen" is the 11th token of 12, "Das" the 1st): n-grams matched 22/24, 19/22, 17/20, 15/18
    by_hand = 100 * exp((log(22 / 24) + log(19 / 22) + log(17 / 20) + log(15 / 18)) / 4)
    assert ours == pytest.approx(by_hand, abs=1e-6)
    assert ours == pytest.approx(multi_bleu(HYPS_SPLIT, REFS_SPLIT), abs=1e-6)
    # the compound split matters: without it the score differs
    assert ours != pytest.approx(multi_bleu(moses_tokenize(HYPS, "de"), moses_tokenize(REFS, "de")), abs=1e-3)


def test_detokenized_bleu_equals_sacrebleu():
    expected = sacrebleu.corpus_bleu(HYPS, [REFS])
    assert detok_bleu(HYPS, REFS).score == pytest.approx(expected.score, abs=1e-9)
    result = score(HYPS, REFS, "de")
    assert result["score"] == pytest.approx(round(expected.score, 2))
    assert result["compound_split_bleu"] == pytest.approx(round(compound_split_bleu(HYPS, REFS, "de").score, 2))


# ---- the local-corpus pipeline: every method, table and plot ----------------------------------

METHODS = {  # name -> (architecture, flags after the model flags)
    "int8-w4": ("transformer_int8", ["--quant-bits", "4"]),
    "bcq-paper": ("transformer_bcq_paper", ["--optimizer", "pnr_adam", "--pnr-period", "2"]),
    "km-w4": ("transformer_kmeans", ["--quant-method", "kmeans", "--quant-bits", "4"]),
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    src = write_corpus(root / "corpus")
    exp = root / "exp"
    sh(RECIPES / "prepare_corpus.sh", "--src-dir", src, "--out", exp / "data", "--vocab-size", 300, "--workers", 1)
    data = exp / "data" / "bin"
    sh(RECIPES / "train.sh", "--data", data, "--save-dir", exp / "fp32", "--arch", "transformer", "--max-update", 30,
       "--lr", 0.003, "--warmup", 10, "--max-tokens", 2000, "--save-interval", 0, "--", *TINY)
    fp32 = exp / "fp32" / "checkpoint_best.pt"
    ckpts = {"fp32": fp32}
    for name, (arch, flags) in METHODS.items():
        sh(RECIPES / "train.sh", "--data", data, "--save-dir", exp / name, "--arch", arch, "--finetune-from", fp32,
           "--max-update", 4, "--lr", 0.001, "--warmup", 2, "--max-tokens", 2000, "--save-interval", 0,
           "--", *TINY, *flags)
        ckpts[name] = exp / name / "checkpoint_best.pt"
    for name, ckpt in ckpts.items():
        sh(RECIPES / "generate.sh", "--data", data, "--checkpoint", ckpt, "--raw-ref", exp / "data" / "raw" / "test.de",
           "--out", exp / "gen" / name, "--beam", 4, "--lenpen", 0.6, *GEN_SHORT)
    proc, _ = sh("-c", f"cd {ROOT} && python -m fairseq_qplugin.results --exp-dir {exp}")
    return exp, proc.stdout


def read_table(path: Path):
    """Rows of a results.md table by model name, each a dict keyed by the header."""
    lines = path.read_text().splitlines()
    header = [c.strip() for c in lines[0].split("|")[1:-1]]
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break  # the end of the table
        cells = [c.strip() for c in line.split("|")[1:-1]]
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def test_pipeline_writes_a_table_row_per_method_and_a_plot(pipeline):
    exp, _ = pipeline
    rows = read_table(exp / "results.md")
    assert list(rows) == ["fp32", "bcq-paper", "int8-w4", "km-w4"]  # baseline first
    assert {name: r["method"] for name, r in rows.items()} == {
        "fp32": "fp32", "bcq-paper": "BCQ", "int8-w4": "int (range-based linear)", "km-w4": "k-means"}
    numeric = ["BLEU", "tok. BLEU (compound split)", "code bits (avg)", "bits with scales", "size (MB)", "tokens/s"]
    for name, r in rows.items():
        assert all(float(r[k]) >= 0 for k in numeric), r
        assert float(r["size (MB)"]) > 0 and float(r["tokens/s"]) > 0 and r["compression"].endswith("x")
        assert (r["Δ BLEU vs fp32"] == "") == (name == "fp32")
        if name != "fp32":
            assert float(r["Δ BLEU vs fp32"]) == pytest.approx(float(r["BLEU"]) - float(rows["fp32"]["BLEU"]), abs=0.011)
    bits = {name: float(r["code bits (avg)"]) for name, r in rows.items()}
    assert bits["fp32"] == 32.0 and bits["int8-w4"] == 4.0 and bits["km-w4"] == 4.0
    assert 2.0 < bits["bcq-paper"] < 3.0  # the paper's mixed configuration
    assert float(rows["int8-w4"]["size (MB)"]) < float(rows["fp32"]["size (MB)"]) / 4
    assert is_png(exp / "results.png")


def test_generate_records_bleu_compound_bleu_and_speed(pipeline):
    exp, _ = pipeline
    gen = exp / "gen" / "int8-w4"
    hyps = (gen / "hyp.txt").read_text(encoding="utf-8").splitlines()
    refs = (exp / "data" / "raw" / "test.de").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs) == 20
    assert float((gen / "bleu.txt").read_text()) == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=0.01)
    assert float((gen / "compound_bleu.txt").read_text()) == pytest.approx(
        compound_split_bleu(hyps, refs, "de").score, abs=0.01)
    speed = (gen / "generate.out").read_text()
    tokens_per_s = re.search(r"Translated .* \(([\d.]+) sentences/s, ([\d.]+) tokens/s\)", speed).group(2)
    # fairseq's printed tokens/s at one decimal (an abs=0.05 comparison failed on x.x5 values)
    assert (gen / "speed.txt").read_text().strip() == f"{float(tokens_per_s):.1f}"


def test_rerunning_finished_steps_does_no_work(pipeline):
    exp, _ = pipeline
    before = mtimes(exp)
    proc, secs = sh(RECIPES / "prepare_corpus.sh", "--src-dir", exp.parent / "corpus", "--out", exp / "data",
                    "--vocab-size", 300, "--workers", 1)
    assert "already prepared with this configuration: skipping" in proc.stdout and secs < 5, proc.stdout
    proc, secs = sh(RECIPES / "generate.sh", "--data", exp / "data" / "bin", "--checkpoint", exp / "fp32" / "checkpoint_best.pt",
                    "--raw-ref", exp / "data" / "raw" / "test.de", "--out", exp / "gen" / "fp32", "--beam", 4,
                    "--lenpen", 0.6, *GEN_SHORT)
    assert "already has this generation: skipping" in proc.stdout and secs < 5, proc.stdout
    assert mtimes(exp) == before


def results_table(tmp_path, args: str, check=True):
    """Run ``python -m fairseq_qplugin.results ARGS`` into tmp_path; (process, rows of its table)."""
    out = tmp_path / "t.md"
    proc, _ = sh("-c", f"cd {ROOT} && python -m fairseq_qplugin.results --out {out} --plot {tmp_path / 'p.png'} {args}",
                 check=check)
    return proc, read_table(out) if proc.returncode == 0 else None


def test_results_keeps_the_name_checkpoint_gendir_rows(pipeline, tmp_path):
    exp, _ = pipeline
    _, rows = results_table(tmp_path, f"base={exp}/fp32/checkpoint_best.pt:{exp}/gen/fp32 "
                                      f"q4={exp}/int8-w4/checkpoint_best.pt:{exp}/gen/int8-w4")
    assert list(rows) == ["base", "q4"] and rows["q4"]["Δ BLEU vs base"].startswith(("+", "-"))
    assert is_png(tmp_path / "p.png")


def test_results_control_columns(pipeline, tmp_path):
    exp, _ = pipeline
    _, rows = results_table(tmp_path, f"--exp-dir {exp} --control int8-w4")
    bleu = {name: float(r["BLEU"]) for name, r in rows.items()}
    assert float(rows["km-w4"]["Δ vs int8-w4"]) == pytest.approx(bleu["km-w4"] - bleu["int8-w4"], abs=0.011)
    if bleu["int8-w4"]:  # the tiny pipeline's BLEU may be 0
        assert float(rows["km-w4"]["% of int8-w4"].rstrip("%")) == pytest.approx(
            100 * bleu["km-w4"] / bleu["int8-w4"], abs=0.051)
    assert rows["int8-w4"]["Δ vs int8-w4"] == ""
    assert rows["int8-w4"]["% of int8-w4"] == ("100.0%" if bleu["int8-w4"] else "n/a")
    assert rows["fp32"]["Δ vs int8-w4"] == "" and rows["fp32"]["% of int8-w4"] == ""
    proc, _ = results_table(tmp_path, f"--exp-dir {exp} --control nope", check=False)
    assert proc.returncode != 0 and "--control nope is not among the rows" in proc.stdout, proc.stdout


# ---- bad input: a clear message before any long work -------------------------------------------

def test_missing_input_file(pipeline, tmp_path):
    src = write_corpus(tmp_path / "c", sizes=(("train", 5), ("valid", 5)))
    proc, secs = sh(RECIPES / "prepare_corpus.sh", "--src-dir", src, "--out", tmp_path / "o", check=False)
    assert proc.returncode == 1 and secs < 5
    assert f"missing {src}/test.en (or test.en.gz)" in proc.stdout, proc.stdout
    assert not (tmp_path / "o").exists()
    exp, _ = pipeline
    proc, _ = sh(RECIPES / "generate.sh", "--data", exp / "data" / "bin", "--checkpoint", tmp_path / "nope.pt",
                 "--raw-ref", exp / "data" / "raw" / "test.de", "--out", tmp_path / "g", check=False)
    assert proc.returncode == 1 and f"--checkpoint not found: {tmp_path}/nope.pt" in proc.stdout, proc.stdout


def test_wrong_language_pair(pipeline, tmp_path):
    exp, _ = pipeline
    proc, secs = sh(RECIPES / "prepare_corpus.sh", "--src-dir", exp.parent / "corpus", "--out", tmp_path / "o",
                    "--tgt", "fr", check=False)
    assert proc.returncode == 1 and secs < 5
    assert "no en-fr pair there (train languages found: de en)" in proc.stdout, proc.stdout
    proc, _ = sh(RECIPES / "prepare_wmt14.sh", "--out", tmp_path / "w", "--local-dir", tmp_path, "--tgt", "fr",
                 check=False)
    assert proc.returncode == 2
    assert "WMT14 en-de has the language pair en-de or de-en only (--src en --tgt fr)" in proc.stdout, proc.stdout


def test_output_dir_of_another_configuration(pipeline):
    exp, _ = pipeline
    before = mtimes(exp)
    proc, secs = sh(RECIPES / "prepare_corpus.sh", "--src-dir", exp.parent / "corpus", "--out", exp / "data",
                    "--vocab-size", 400, check=False)
    assert proc.returncode == 1 and secs < 5
    assert (f"{exp}/data was made with another configuration (vocab_size: 300 -> 400); delete it or choose "
            "another --out") in proc.stdout, proc.stdout
    proc, _ = sh(RECIPES / "generate.sh", "--data", exp / "data" / "bin", "--checkpoint", exp / "fp32" / "checkpoint_best.pt",
                 "--raw-ref", exp / "data" / "raw" / "test.de", "--out", exp / "gen" / "fp32", "--beam", 5, check=False)
    assert proc.returncode == 1
    assert "was made with another configuration (beam: 4 -> 5; lenpen: 0.6 -> 1.0; extra_args: --max-len-b 20 -> )" \
        in proc.stdout, proc.stdout
    proc, _ = sh(RECIPES / "train.sh", "--data", exp / "data" / "bin", "--save-dir", exp / "gen" / "fp32",
                 "--arch", "transformer", check=False)
    assert proc.returncode == 1 and "holds the output of generate, not train" in proc.stdout, proc.stdout
    assert mtimes(exp) == before


def test_train_resumes_from_the_newest_intact_checkpoint(tiny_data, tmp_path):
    """A kill during fairseq's (non-atomic) copy can leave checkpoint_last.pt empty: train.sh resumes
    from the newest intact checkpoint instead, or says what to do when there is none."""
    save = tmp_path / "run"
    args = [RECIPES / "train.sh", "--data", tiny_data / "bin", "--save-dir", save, "--arch", "transformer",
            "--max-update", 4, "--warmup", 2, "--max-tokens", 2000, "--", *TINY]
    sh(*args)
    (save / ".done").unlink()
    (save / "checkpoint_last.pt").write_bytes(b"")
    proc, _ = sh(*args)
    assert (f"{save}/checkpoint_last.pt was empty or damaged (kept as {save}/checkpoint_last.pt.damaged): resuming "
            "from the newest intact checkpoint, checkpoint_best.pt") in proc.stdout, proc.stdout
    assert re.search(r"Loaded checkpoint .*checkpoint_last\.pt \(epoch \d+ @ 4 updates\)", proc.stdout), proc.stdout
    assert (save / ".done").exists() and (save / "checkpoint_last.pt.damaged").stat().st_size == 0
    (save / ".done").unlink()
    for f in ("checkpoint_last.pt", "checkpoint_best.pt"):
        (save / f).write_bytes((save / f).read_bytes()[:1000])
    proc, _ = sh(*args, check=False)
    assert proc.returncode == 1
    assert (f"{save}/checkpoint_last.pt is empty or damaged and {save} holds no other intact checkpoint: delete "
            f"{save} to train from scratch") in proc.stdout, proc.stdout


# ---- the WMT14 example: data preparation from local archives ----------------------------------

def _tgz(path: Path, files: dict):
    with tarfile.open(path, "w:gz") as t:
        for name, text in files.items():
            data = text.encode("utf-8")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def _sgm(lines, kind):
    segs = "".join(f'<seg id="{i + 1}">{line.rstrip()}</seg>\n' for i, line in enumerate(lines))
    return f'<{kind}set setid="newstest2014" srclang="any" trglang="de">\n<doc docid="x">\n{segs}</doc>\n</{kind}set>\n'


@pytest.fixture(scope="module")
def fake_wmt14(tmp_path_factory):
    """The five WMT archives, laid out as the real ones, with debian-doc sentences in them."""
    d = tmp_path_factory.mktemp("wmt14_downloads")
    train = {lang: read_lines("train", lang, 300) for lang in ("en", "de")}
    for i, (archive, prefix) in enumerate([("training-parallel-europarl-v7.tgz", "training/europarl-v7.de-en"),
                                           ("training-parallel-commoncrawl.tgz", "commoncrawl.de-en"),
                                           ("training-parallel-nc-v12.tgz", "training/news-commentary-v12.de-en")]):
        _tgz(d / archive, {f"{prefix}.{lang}": "".join(train[lang][100 * i:100 * (i + 1)]) for lang in ("en", "de")})
    _tgz(d / "dev.tgz", {f"dev/newstest2013.{lang}": "".join(read_lines("valid", lang, 20)) for lang in ("en", "de")})
    test = {lang: read_lines("test", lang, 20) for lang in ("en", "de")}
    _tgz(d / "test-full.tgz", {f"test-full/newstest2014-deen-{kind}.{lang}.sgm": _sgm(test[lang], kind)
                               for kind in ("src", "ref") for lang in ("en", "de")})
    return d, test


@pytest.fixture(scope="module")
def wmt14_bpe(fake_wmt14, tmp_path_factory):
    local, _ = fake_wmt14
    exp = tmp_path_factory.mktemp("wmt14_exp")
    sh(RECIPES / "prepare_wmt14.sh", "--out", exp / "wmt14", "--local-dir", local, "--bpe-merges", 300, "--workers", 1)
    return exp


def test_wmt14_prepare_bpe(wmt14_bpe, fake_wmt14):
    _, test = fake_wmt14
    data = wmt14_bpe / "wmt14" / "data"
    assert (data / "raw" / "test.de").read_text(encoding="utf-8") == "".join(line.strip() + "\n" for line in test["de"])
    assert len((data / "raw" / "train.en").read_text(encoding="utf-8").splitlines()) == 300
    assert (data / "bin" / "preprocessing.txt").read_text() == "subword=bpe\ntokenize=moses\nsrc=en\ntgt=de\n"
    assert (data / "bin" / "bpe.codes").is_file() and (data / "bin" / "train.en-de.en.bin").is_file()
    tokenized = (data / "tok" / "train.en").read_text(encoding="utf-8")
    assert " @-@ " in tokenized  # Moses -a
    bpe = (data / "bpe" / "train.en").read_text(encoding="utf-8")
    assert "@@ " in bpe and bpe.replace("@@ ", "") == tokenized  # BPE applied, and only that
    kept = len((data / "bpe" / "train.clean.en").read_text(encoding="utf-8").splitlines())
    assert 250 < kept < 300  # clean-corpus-n dropped the pairs of too different lengths


def test_wmt14_prepare_sentencepiece(fake_wmt14, tmp_path):
    local, _ = fake_wmt14
    sh(RECIPES / "prepare_wmt14.sh", "--out", tmp_path / "w", "--local-dir", local, "--subword", "spm",
       "--vocab-size", 300, "--workers", 1)
    data = tmp_path / "w" / "data"
    assert (data / "bin" / "preprocessing.txt").read_text().startswith("subword=spm\ntokenize=none\n")
    assert (data / "bin" / "spm.model").is_file() and (data / "bin" / "test.en-de.de.idx").is_file()
    assert not (data / "tok").exists()
    assert "\u2581" in (data / "spm" / "train.de").read_text(encoding="utf-8")


def test_wmt14_local_dir_missing_archive(fake_wmt14, tmp_path):
    local, _ = fake_wmt14
    partial = tmp_path / "partial"
    partial.mkdir()
    for f in local.iterdir():
        if f.name != "dev.tgz":
            (partial / f.name).symlink_to(f)
    proc, secs = sh(RECIPES / "prepare_wmt14.sh", "--out", tmp_path / "w", "--local-dir", partial, check=False)
    assert proc.returncode == 1 and secs < 5
    assert f"--local-dir {partial} lacks: dev.tgz (or its file dev/newstest2013.en;" in proc.stdout, proc.stdout
    assert not (tmp_path / "w").exists()


def test_wmt14_example_end_to_end(wmt14_bpe, fake_wmt14):
    """examples/wmt14_en_de/run.sh --tiny: its data step finds the prepared data and skips."""
    local, _ = fake_wmt14
    proc, _ = sh(EXAMPLE / "run.sh", "--tiny", "--exp", wmt14_bpe, "--local-dir", local, "--bpe-merges", 300,
                 "--methods", "int8-w8")
    assert "already prepared with this configuration: skipping" in proc.stdout
    rows = read_table(wmt14_bpe / "results.md")
    assert rows["fp32"]["method"] == "fp32" and rows["int8-w8"]["configuration"].startswith("8-bit")
    text = (wmt14_bpe / "results.md").read_text()
    assert "## Published numbers (from the papers, not measured here)" in text
    assert is_png(wmt14_bpe / "results.png")
    hyps = (wmt14_bpe / "gen" / "fp32" / "hyp.txt").read_text(encoding="utf-8")
    assert "@@" not in hyps and " @-@ " not in hyps  # BPE removed and Moses-detokenized
