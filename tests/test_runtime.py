"""The torch-free runtime (fairseq_qruntime): export, parity with fairseq on the same packed file, bad input.

Parity: for every packed format, teacher-forced logits within 1e-4 of fairseq's and the same
hypotheses (tokens; scores within 1e-4) as fairseq's SequenceGenerator on the same padded batches,
beam 1 and beam 5. 8-bit int weights are compared with fairseq's exact dequant kernel. With the default
int16 products (approximate) a hypothesis may differ only where it is a near-tie under the exact model.
The engine library is built on demand; with QPLUGIN_REQUIRE_NATIVE=1 (CI) a failed build fails.
"""
import json
import os
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from .conftest import ROOT, run, train_args


def qat_checkpoint(tiny_data, fp32_checkpoint, name, arch, *flags):
    """checkpoint_last.pt of 10 updates of quantization-aware fine-tuning from the tiny fp32 model."""
    save = tiny_data / name
    run(train_args(tiny_data / "bin", save, arch, 10, *flags, "--finetune-from-model", fp32_checkpoint))
    return save / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def rt():
    import fairseq_qruntime
    from fairseq_qruntime.model import NativeUnavailable

    try:
        fairseq_qruntime.load_library()
    except NativeUnavailable as e:
        if os.environ.get("QPLUGIN_REQUIRE_NATIVE") == "1":
            pytest.fail(f"QPLUGIN_REQUIRE_NATIVE=1 but the runtime engine is not available: {e}")
        pytest.skip(f"runtime engine not built: {e}")
    return fairseq_qruntime


# name -> (source checkpoint fixture, fairseq-qpack flags)
PTQ = {
    "fp32": ["--method", "int", "--bits", 8, "--include", "decoder.layers.0.fc1", "--int8-kernel", "dequant",
             "--param-dtype", "fp32", "--other-dtype", "fp32"],
    "fp16": ["--method", "int", "--bits", 8, "--include", "decoder.layers.0.fc1", "--int8-kernel", "dequant",
             "--other-dtype", "fp16"],
    "int4": ["--method", "int", "--bits", 4],
    "int3-asym": ["--method", "int", "--bits", 3, "--scheme", "asym"],
    "int8": ["--method", "int", "--bits", 8, "--int8-kernel", "dequant"],
    "bcq3": ["--method", "bcq", "--bits", 3],
    "kmeans3": ["--method", "kmeans", "--bits", 3],
}
QAT = {
    # frequency-mixed BCQ embeddings (bcq_mixed) and 2-bit BCQ layers
    "bcq-mixed": ("transformer_bcq", "--bcq-bits", 2, "--bcq-embed-bits", 3, "--bcq-embed-freq-ratio", 2,
                  "--bcq-rounds", 2),
    # 1-bit weights with output activation quantization and attention temperature
    "bin1-act": ("transformer_int8", "--quant-bits", 1, "--quant-act", "output", "--attn-temperature", 2,
                 "--quant-include", "encoder,decoder"),
    # k-means with magnitude pruning masks
    "kmeans-pruned": ("transformer_kmeans", "--quant-bits", 2, "--kmeans-iters", 5, "--prune-schedule", 0.5),
}
# the other transformer variants: pre-norm, learned positions, gelu, no embedding scale, layernorm_embedding,
# separate source / target embeddings with the output projection tied to the target one; packed BCQ 3-bit
VARIANT = ["--encoder-normalize-before", "--decoder-normalize-before", "--encoder-learned-pos",
           "--decoder-learned-pos", "--activation-fn", "gelu", "--no-scale-embedding", "--layernorm-embedding",
           "--share-decoder-input-output-embed"]
FORMATS = list(PTQ) + list(QAT) + ["variant-bcq3"]
ACT_QUANT = {"bin1-act"}


@pytest.fixture(scope="module")
def exported(tiny_data, fp32_checkpoint):
    """name -> (packed .pt, exported dir), made on first use."""
    cache = {}

    def get(name):
        if name not in cache:
            d = tiny_data / f"rt_{name}"
            d.mkdir(exist_ok=True)
            if name in PTQ:
                src, flags = fp32_checkpoint, PTQ[name]
            elif name == "variant-bcq3":
                args = [a for a in train_args(tiny_data / "bin", tiny_data / "rt_variant_fp32", "transformer", 60)
                        if a != "--share-all-embeddings"]
                run(args + VARIANT)
                src, flags = tiny_data / "rt_variant_fp32" / "checkpoint_last.pt", ["--method", "bcq", "--bits", 3]
            else:
                arch, *flags = QAT[name]
                src, flags = qat_checkpoint(tiny_data, fp32_checkpoint, f"rt_qat_{name}", arch, *flags), []
            packed = d / "packed.pt"
            run(["python", "-m", "fairseq_qplugin.pack.cli", src, packed, "--data", tiny_data / "bin", *flags],
                cwd=ROOT)
            run(["python", "-m", "fairseq_qplugin.pack.cli", "--export", d / "model", packed,
                 "--data", tiny_data / "bin"], cwd=ROOT)
            cache[name] = (packed, d / "model")
        return cache[name]

    return get


def fairseq_model(packed, data_bin):
    import fairseq_qplugin  # noqa: F401
    from fairseq import checkpoint_utils

    models, _, task = checkpoint_utils.load_model_ensemble_and_task([str(packed)],
                                                                    arg_overrides={"data": str(data_bin)})
    task.load_dataset("test")
    return models[0].eval(), task


def batches(task, size):
    ds = task.dataset("test")
    order = sorted(range(len(ds)), key=lambda i: ds.src_sizes[i])  # mixed lengths in a batch: padding
    for k in range(0, len(order), size):
        yield ds.collater([ds[i] for i in order[k:k + size]])


def unpadded(sample, pad):
    return [t[t.ne(pad)].tolist() for t in sample["net_input"]["src_tokens"]]


@pytest.mark.parametrize("name", FORMATS)
def test_runtime_matches_fairseq(rt, exported, tiny_data, name):
    from fairseq.sequence_generator import SequenceGenerator

    packed, model_dir = exported(name)
    model, task = fairseq_model(packed, tiny_data / "bin")
    engine = rt.Model(str(model_dir), lut="fp32")  # exact products; the default (int16 products): below
    fast = rt.Model(str(model_dir))
    pad, tgt = task.target_dictionary.pad(), task.target_dictionary
    worst, positions, off, worst_fast = 0.0, 0, 0, 0.0
    with torch.no_grad():
        for sample in batches(task, 8):
            ni = sample["net_input"]
            logits = model(**ni)[0].float().numpy()
            src = unpadded(sample, pad)
            for i, prev in enumerate(ni["prev_output_tokens"]):
                n = int(prev.ne(pad).sum())
                got = engine.score([src[i]], prev[:n].numpy()[None])[0]
                diff = np.abs(got - logits[i, :n]).max(axis=1)
                worst, positions, off = max(worst, float(diff.max())), positions + n, off + int((diff > 1e-4).sum())
                if fast.lut == "int16":  # else the same engine as above
                    got = fast.score([src[i]], prev[:n].numpy()[None])[0]
                    worst_fast = max(worst_fast, float(np.abs(got - logits[i, :n]).max()))
    # int16 products (docs/runtime.md, int16 products; not for models with activation quantization): measured
    # up to 5.7e-4 on these models (d=32; 0 where no BCQ product runs)
    assert worst_fast <= 2e-3, f"{name}: teacher-forced logits with int16 products differ by {worst_fast}"
    if name in ACT_QUANT:
        # Quantized activations: a value within float rounding of a rounding boundary may land one step
        # away in either engine (other summation order); measured 14 of 2,028 positions.
        assert off <= 0.02 * positions, f"{name}: {off} of {positions} teacher-forced positions differ (worst {worst})"
    else:
        assert worst <= 1e-4, f"{name}: teacher-forced logits differ by {worst}"
    # Quantized activations move a teacher-forced position now and then (above), so a hypothesis's score too
    score_tol = 2e-3 if name in ACT_QUANT else 1e-4
    for beam in (1, 5):
        gen = SequenceGenerator([model], tgt, beam_size=beam)
        total = same = same_fast = 0
        for sample in batches(task, 8):
            with torch.no_grad():
                ref = gen.generate([model], sample)
            src = unpadded(sample, pad)
            got = engine.generate(src, beam=beam)
            got_fast = fast.generate(src, beam=beam)
            for s, r, g, gf in zip(src, ref, got, got_fast):
                total += 1
                ref_tokens, ref_score = r[0]["tokens"].tolist()[:-1], float(r[0]["score"])
                if ref_tokens == g[0][0]:
                    same += 1
                    assert abs(ref_score - g[0][1]) <= score_tol
                if ref_tokens == gf[0][0]:
                    same_fast += 1
                else:
                    # int16 products may break a near-tie the other way (measured: 3 of 40 at beam 5 on an Intel CPU,
                    # at most 1 on an AMD one; scores within 1e-3); the exact model must score the other hypothesis as
                    # high as the one fairseq chose, and as the fast engine reported
                    exact = exact_score(engine, s, gf[0][0], tgt.eos())
                    assert abs(exact - gf[0][1]) <= 2e-3 and exact >= ref_score - 2e-3, \
                        f"{name} beam {beam}, int16 products: {gf[0][1]} (exact {exact}) where fairseq has {ref_score}"
        assert same == total, f"{name} beam {beam}: {total - same} of {total} hypotheses differ"
        assert same_fast >= 0.8 * total, f"{name} beam {beam}, int16 products: {total - same_fast} of {total} differ"


def exact_score(engine, src, tokens, eos):
    """fairseq's hypothesis score (mean log-probability of tokens + EOS, length penalty 1) under engine."""
    prev = np.asarray([[eos] + tokens])
    lprobs = torch.from_numpy(engine.score([src], prev)[0]).double().log_softmax(-1)
    return float(lprobs[torch.arange(len(tokens) + 1), tokens + [eos]].mean())


@pytest.mark.parametrize("name", ["bcq3", "fp32"])
def test_kernel_sets_agree_on_many_rows(rt, exported, tiny_data, name, monkeypatch):
    """Each kernel set the CPU runs (QRUNTIME_ISA) computes the same logits within 1e-5 and the same
    translations, also where rows are many: 30 copies of a sentence (above the direct kernels' 24 rows) take
    the dequantize-tile + packed-panel GEMM path and its AVX-512 / AVX2 / portable micro-kernels."""
    import platform

    packed, model_dir = exported(name)
    _, task = fairseq_model(packed, tiny_data / "bin")
    sample = next(batches(task, 8))
    pad = task.target_dictionary.pad()
    src = unpadded(sample, pad)
    prev = sample["net_input"]["prev_output_tokens"][0]
    prev = prev[prev.ne(pad)].numpy()[None].repeat(30, axis=0)
    isas = ["avx512", "avx2", "scalar"] if platform.machine().lower() in ("x86_64", "amd64") else ["scalar"]
    logits, hyps = {}, {}
    for isa in isas:
        monkeypatch.setenv("QRUNTIME_ISA", isa)
        try:
            engine = rt.Model(str(model_dir), lut="fp32")
        except rt.ModelError as e:
            assert "is not available on this CPU" in str(e)
            continue
        logits[isa] = engine.score([src[0]] * 30, prev)
        hyps[isa] = [[h[0] for h in g] for g in engine.generate(src, beam=5)]
    assert "scalar" in logits and len(logits) >= min(2, len(isas))
    ref = logits["scalar"]
    assert np.abs(ref - ref[:1]).max() == 0.0  # the 30 copies agree
    for isa in logits:
        assert np.abs(logits[isa] - ref).max() <= 1e-5, isa
        assert hyps[isa] == hyps["scalar"], isa


def test_import_does_not_load_torch():
    code = ("import sys, fairseq_qruntime; "
            "print(sorted(m for m in ('torch', 'fairseq', 'fairseq_qplugin') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_failed_build_raises_and_leaves_nothing(tmp_path, monkeypatch):
    from fairseq_qruntime import build

    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    with pytest.raises(RuntimeError, match=r"building the runtime engine failed \(false\)"):
        build.build(str(tmp_path / "engine.so"))
    assert list(tmp_path.iterdir()) == []


def test_translator_threads_and_order(rt, exported, tiny_data):
    """Batched translate() equals one sentence at a time; two Python threads share one Translator."""
    _, model_dir = exported("bcq3")
    t = rt.Translator(str(model_dir))
    lines = (tiny_data / "test.spm.en").read_text(encoding="utf-8").splitlines()[:24]
    batched = t.translate(lines, beam=4, max_batch_tokens=200)
    alone = [t.translate([line], beam=4)[0] for line in lines]
    assert batched == alone
    assert rt.Translator(str(model_dir), threads=2).translate(lines, beam=4, max_batch_tokens=200) == batched
    results = {}
    threads = [threading.Thread(target=lambda k=k: results.__setitem__(k, t.translate(lines, beam=4)))
               for k in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results[0] == results[1] == batched


def qtranslate(model_dir, spm, stdin, *extra):
    cmd = [sys.executable, "-m", "fairseq_qruntime.cli", str(model_dir), "--spm", str(spm), *map(str, extra)]
    return subprocess.run(cmd, cwd=ROOT, input=stdin, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_cli_translates_and_reports_speed(rt, exported, tiny_data):
    import sentencepiece as spm

    _, model_dir = exported("bcq3")
    raw = "".join(open(tiny_data / "test.en", encoding="utf-8").readlines()[:6])
    out = qtranslate(model_dir, tiny_data / "spm.model", raw, "--beam", 3, "--batch-size", 4)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 6
    t = rt.Translator(str(model_dir))
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / "spm.model"))
    pieces = [" ".join(sp.encode(x, out_type=str)) for x in raw.splitlines()]
    expect = [sp.decode(h.split()) for h in t.translate(pieces, beam=3)]
    assert lines == expect
    last = out.stderr.strip().splitlines()[-1]
    assert last.endswith(" tokens/s") and float(last.split()[0]) > 0


def test_long_line_warns_and_rest_is_translated(rt, exported, tiny_data):
    _, model_dir = exported("bcq3")
    cfg = json.loads((model_dir / "config.json").read_text())
    long_line = "▁the " * (cfg["encoder"]["max_positions"] + 5)
    t = rt.Translator(str(model_dir))
    good = (tiny_data / "test.spm.en").read_text(encoding="utf-8").splitlines()[:2]
    expect = t.translate(good, beam=2)
    with _LogCapture() as logs:
        got = t.translate([good[0], long_line, good[1]], beam=2)
    assert got == [expect[0], "", expect[1]]
    assert any("line 2:" in m and "source positions" in m for m in logs.messages)


class _LogCapture:
    """Collects the runtime logger's warnings."""

    def __enter__(self):
        import logging

        self.messages = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.messages.append(record.getMessage())
        logging.getLogger("fairseq_qruntime").addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        import logging

        logging.getLogger("fairseq_qruntime").removeHandler(self.handler)


@pytest.fixture
def broken(exported, tmp_path):
    _, model_dir = exported("bcq3")
    d = tmp_path / "model"
    shutil.copytree(model_dir, d)
    return d


def load_error(rt, d):
    with pytest.raises(rt.ModelError) as e:
        rt.Translator(str(d))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_file(rt, broken):
    os.remove(broken / "dict.de.txt")
    assert "dict.de.txt: missing" in load_error(rt, broken)


def test_truncated_safetensors(rt, broken):
    p = broken / "model.safetensors"
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    assert "truncated or corrupted" in load_error(rt, broken)


def test_tensor_bytes_contradict_sha256(rt, broken):
    from safetensors.numpy import load_file, save_file

    p = broken / "model.safetensors"
    t = load_file(p)
    name = next(k for k in t if k.endswith(".wq.planes"))
    t[name] = t[name] ^ np.uint8(1)
    save_file(t, p)
    assert "do not match the sha256" in load_error(rt, broken)


def test_tensor_shape_contradicts_config(rt, broken):
    cfg = json.loads((broken / "config.json").read_text())
    name = next(k for k in cfg["tensors"] if k.endswith(".wq.alpha"))
    cfg["tensors"][name]["shape"][-1] += 1
    (broken / "config.json").write_text(json.dumps(cfg))
    msg = load_error(rt, broken)
    assert f"tensor {name} is float" in msg and "config.json says" in msg


def test_module_format_contradicts_tensors(rt, broken):
    cfg = json.loads((broken / "config.json").read_text())
    name = next(k for k, e in cfg["modules"].items() if e["format"] == "bcq" and k.endswith("fc1"))
    cfg["modules"][name]["format"] = "kmeans"
    (broken / "config.json").write_text(json.dumps(cfg))
    assert f"tensor {cfg['modules'][name]['weight']}.wq.indices is missing" in load_error(rt, broken)


def test_dictionary_mismatch(rt, broken):
    p = broken / "dict.en.txt"
    lines = p.read_text(encoding="utf-8").splitlines()
    lines[0], lines[1] = lines[1], lines[0]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert "are not the model's" in load_error(rt, broken)


def test_cli_error_is_one_line_and_no_output(rt, broken, tiny_data):
    os.remove(broken / "model.safetensors")
    out = qtranslate(broken, tiny_data / "spm.model", "hello\n")
    assert out.returncode != 0 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [f"fairseq-qtranslate: error: {broken}/model.safetensors: missing; "
                                               "the model directory is incomplete (re-export it with "
                                               "fairseq-qpack --export DIR PACKED.pt)"]


def test_cli_bpe_round_trip(tmp_path):
    """--bpe splits with subword-nmt codes and the output side joins '@@ ' pieces back."""
    from subword_nmt.learn_bpe import learn_bpe

    from fairseq_qruntime.cli import Subwords

    text = "the translation of the packed transformer model\nlower lowest newer newest widest\n" * 5
    (tmp_path / "train.txt").write_text(text, encoding="utf-8")
    with open(tmp_path / "train.txt", encoding="utf-8") as f, open(tmp_path / "codes", "w", encoding="utf-8") as out:
        learn_bpe(f, out, 20)
    words = Subwords(bpe_codes=str(tmp_path / "codes"))
    line = "the untranslatable newest transformers"
    pieces = words.encode(line)
    assert "@@ " in pieces and pieces.replace("@@ ", "") == line
    assert words.decode(pieces) == line
