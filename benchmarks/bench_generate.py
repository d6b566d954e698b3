"""End-to-end translation benchmark: fairseq-generate on fp32 vs packed checkpoints, and CTranslate2 int8.

    python benchmarks/bench_generate.py --exp /work/main/exp/demo [--out exp/bench] [--sentences 100]
                                        [--threads 1] [--quick] [--no-ct2]
    # speed at another model size: post-training packing of an fp32 model, every output N tokens long
    python benchmarks/bench_generate.py --fp32 base/checkpoint_last.pt --qat none --ptq bcq3=bcq:3 \
                                        --fixed-len 40 ...

Prints one markdown table (and writes OUT/results.json): for each model and each setting
(batch 1 beam 1, batch 1 beam 5, batch 32 beam 5) on the first ``--sentences`` sentences of the
test split:

- tokens/s: generated target tokens (EOS included, as fairseq counts them) / seconds of generation,
  model loading excluded: fairseq-generate's own "Translated N sentences (M tokens) in Xs" line; for
  CTranslate2 the wall time of ``translate_batch`` in the same way.
- peak RSS: the child process's own high-water mark (VmHWM), imports and model loading included.
- "NAME (fairseq-qtranslate)" rows: the torch-free runtime (fairseq_qruntime) on the packed model
  exported with ``fairseq-qpack --export`` (file: model.safetensors), on the raw source (it runs
  sentencepiece itself; tokenization is outside its timed part, as for the other rows), with its default
  arithmetic (``--lut auto``: int16 where the CPU has it; ``--lut fp32,...`` adds rows).
- file: bytes of the model file (fp32: the checkpoint without optimizer state; CTranslate2: model.bin).
- BLEU: sacrebleu (13a, mixed case) on the sentencepiece-detokenized output against the raw
  reference, as recipes/generate.sh scores.

Inputs (defaults under ``--exp``, the layout of scripts/demo.sh): the fp32 ``transformer`` checkpoint
(``--fp32``), the quantization-aware checkpoints to pack (``--qat NAME=CKPT``, repeatable), the
data-bin with the dictionaries (``--data-bin``), the sentencepiece model (``--spm``) and the raw
test text (``--raw-src``, ``--raw-ref``). Everything derived (the sentence subset binarized with the
data-bin's dictionaries, the packed files made with ``fairseq-qpack`` defaults, the CTranslate2
model converted with ``ct2-fairseq-converter --quantization int8``, generation logs) goes to
``--out`` and is reused when present (``--redo`` rebuilds it). fairseq runs with
``OMP_NUM_THREADS=--threads`` and CTranslate2 with ``intra_threads=--threads``; CTranslate2's
``max_decoding_length`` is fairseq's default maximum length (200).

``--ptq NAME=METHOD:BITS`` packs the fp32 model itself (``fairseq-qpack --method --bits``, post-training
quantization) instead of a QAT checkpoint; ``--qat none`` leaves out the default QAT rows.
``--fixed-len N`` makes every translation exactly N tokens long (fairseq ``--min-len N --max-len-b N``,
CTranslate2 ``min/max_decoding_length``): for speed at a model size that has no trained checkpoint
(an untrained model's outputs otherwise differ in length between rows); its BLEU means nothing.
``--base-size`` (with ``--fixed-len``, instead of ``--fp32``) makes such a model: a transformer-base-size
``transformer`` (6+6 layers, d=512, FFN 2048, 8 heads, embeddings shared over the data-bin's joined
dictionary) after one ``fairseq-train`` update from random initialization, in OUT/models/base-fp32.

``--rounds N`` runs the runtime and CTranslate2 rows of each setting N times, back to back, in alternating
order (round 1 in table order, round 2 reversed, ...), and reports the median tokens/s of each row and a
second table of ratios: each runtime row over CTranslate2 int8 (the median over the rounds of the
ratio within a round) and over fairseq fp32. The fairseq-generate rows, much slower, run once per
setting (before the rounds); ``--no-fairseq-packed`` leaves out the fairseq-generate rows of the
packed files (and with them the check that the runtime translates as they do), ``--no-fairseq`` all
fairseq-generate rows.
"""
import argparse
import json
import statistics
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "fairseq_qplugin"
SETTINGS = [(1, 1), (1, 5), (32, 5)]  # (batch size, beam)
DEFAULT_QAT = {"int8": "int8-w8", "int4": "int8-w4", "bcq3": "bcq-w3", "bcq-paper": "bcq-paper", "km4": "km-w4"}
TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s")
MAX_LEN = 200  # fairseq-generate's default --max-len-b (with --max-len-a 0)
RUNTIME_SUFFIX = " (fairseq-qtranslate)"


def checkpoint_in(directory: Path) -> Path:
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        if (directory / name).exists():
            return directory / name
    raise SystemExit(f"error: no checkpoint_best.pt or checkpoint_last.pt in {directory}")


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def tool(name):
    exe = Path(sys.executable).parent / name
    return str(exe) if exe.exists() else name


def _vm_hwm_kib(pid: int) -> int:
    """The process's peak resident set (VmHWM, KiB) from /proc, or 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except (OSError, ValueError):
        return 0


def run_measured(cmd, env, log_path: Path):
    """Run ``cmd`` with its output to ``log_path``; return (exit status, peak RSS of that child in MiB, output).

    The peak is the child's own VmHWM, read every 20 ms while it runs. (Not ``ru_maxrss``: on Linux
    a child that is forked and exec'd inherits this process's high-water mark, which would put a
    floor of this benchmark's own size under every number.)"""
    peak = 0
    with open(log_path, "w", encoding="utf-8") as out:
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=out, stderr=subprocess.STDOUT)
        while proc.poll() is None:
            peak = max(peak, _vm_hwm_kib(proc.pid))
            time.sleep(0.02)
    return proc.returncode, peak / 1024, log_path.read_text(encoding="utf-8")


def run_checked(cmd, what):
    proc = subprocess.run([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {what} failed:\n{proc.stdout[-3000:]}")
    return proc.stdout


def prepare_subset(args, out: Path) -> Path:
    """First N sentences of the raw test split, sentencepiece-encoded and binarized with the data-bin's
    dictionaries (so the dictionary checksum of the packed files matches)."""
    import sentencepiece as spm

    d = out / f"data-{args.sentences}"
    if (d / ".done").exists() and not args.redo:
        return d
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    sp = spm.SentencePieceProcessor(model_file=str(args.spm))
    for lang, raw in ((args.src, args.raw_src), (args.tgt, args.raw_ref)):
        lines = raw.read_text(encoding="utf-8").split("\n")[: args.sentences]
        (d / f"raw.{lang}").write_text("".join(t + "\n" for t in lines), encoding="utf-8")
        (d / f"test.{lang}").write_text("".join(" ".join(sp.encode(t, out_type=str)) + "\n" for t in lines),
                                        encoding="utf-8")
    run_checked([tool("fairseq-preprocess"), "--source-lang", args.src, "--target-lang", args.tgt,
                 "--srcdict", args.data_bin / f"dict.{args.src}.txt",
                 "--tgtdict", args.data_bin / f"dict.{args.tgt}.txt",
                 "--testpref", d / "test", "--destdir", d / "bin", "--workers", 1], "fairseq-preprocess")
    (d / ".done").write_text("")
    return d


def strip_optimizer(src: Path, dst: Path):
    """The fp32 checkpoint without optimizer state (the file a user would ship)."""
    import torch

    from fairseq_qplugin.checkpoint import load_state

    state = load_state(src)  # weights_only=True: a crafted file is refused, never run
    state["last_optimizer_state"] = None
    for h in state.get("optimizer_history", []):
        h.pop("optimizer", None)
    torch.save(state, dst)


def make_base_model(args, out: Path) -> Path:
    """A transformer-base-size fp32 checkpoint: one fairseq-train update from random initialization."""
    save = out / "models" / "base-fp32"
    ckpt = save / "checkpoint_last.pt"
    if ckpt.exists() and not args.redo:
        return ckpt
    log(f"base-size model: fairseq-train {args.data_bin} --arch transformer (one update) -> {ckpt}")
    run_checked([tool("fairseq-train"), args.data_bin, "--user-dir", PLUGIN, "--arch", "transformer",
                 "--share-all-embeddings", "--optimizer", "adam", "--lr", "1e-4", "--max-tokens", 512,
                 "--max-update", 1, "--criterion", "cross_entropy", "--save-dir", save, "--no-epoch-checkpoints",
                 "--disable-validation", "--seed", 1, "--num-workers", 0], "fairseq-train (base-size model)")
    return ckpt


def prepare_models(args, out: Path):
    """[(label, model path or CTranslate2 dir, extra fairseq-generate args, file bytes)]."""
    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    rows = []
    fp32 = models / "fp32.pt"
    if args.redo or not fp32.exists():
        log(f"fp32: {args.fp32} without optimizer state -> {fp32}")
        strip_optimizer(args.fp32, fp32)
    if args.fairseq:
        rows.append(("fp32", fp32, [], fp32.stat().st_size))
    packs = [(name, ckpt, []) for name, ckpt in args.qat.items()]
    packs += [(name, args.fp32, ["--method", method, "--bits", bits]) for name, (method, bits) in args.ptq.items()]
    for name, ckpt, ptq in packs:
        packed = models / f"{name}.packed.pt"
        if args.redo or not packed.exists():
            log(f"{name}: fairseq-qpack {ckpt} {packed} {' '.join(ptq)}")
            run_checked([sys.executable, "-m", "fairseq_qplugin.pack.cli", ckpt, packed, "--data", args.data_bin,
                         "--report", models / f"{name}.report.md", *ptq], f"fairseq-qpack {ckpt}")
        if args.fairseq and args.fairseq_packed:
            rows.append((name, packed, [], packed.stat().st_size))
        if args.runtime:
            rt = models / f"{name}.runtime"
            if args.redo or not (rt / "config.json").exists():
                log(f"{name}: fairseq-qpack --export {rt} {packed}")
                run_checked([sys.executable, "-m", "fairseq_qplugin.pack.cli", "--export", rt, packed,
                             "--data", args.data_bin], f"fairseq-qpack --export {packed}")
            for lut in args.lut.split(","):  # "runtime" rows: the default (--lut auto); "runtime:fp32": --lut fp32
                rows.append((name + (RUNTIME_SUFFIX if lut == "auto" else f" (fairseq-qtranslate --lut {lut})"), rt,
                             "runtime" if lut == "auto" else f"runtime:{lut}", (rt / "model.safetensors").stat().st_size))
        if name == "int8" and args.int8_dequant:
            rows.append(("int8 (dequant kernel)", packed, ["--model-overrides", "{'int8_kernel': 'dequant'}"],
                         packed.stat().st_size))
    if args.ct2:
        ct2 = models / "ct2-int8"
        if args.redo or not (ct2 / "model.bin").exists():
            log(f"CTranslate2: ct2-fairseq-converter {args.fp32} -> {ct2}")
            run_checked([tool("ct2-fairseq-converter"), "--model_path", args.fp32, "--data_dir", args.data_bin,
                         "--user_dir", PLUGIN, "--source_lang", args.src, "--target_lang", args.tgt,
                         "--quantization", "int8", "--output_dir", ct2, "--force"], "ct2-fairseq-converter")
        rows.append(("CTranslate2 int8", ct2, None, (ct2 / "model.bin").stat().st_size))
    return rows


def bleu(hyps, refs) -> float:
    import sacrebleu

    return sacrebleu.metrics.BLEU().corpus_score(hyps, [refs]).score


def fairseq_run(args, data: Path, path: Path, extra, batch, beam, log_path: Path):
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [tool("fairseq-generate"), data / "bin", "--user-dir", PLUGIN, "--task", "translation", "--path", path,
           "--gen-subset", "test", "--beam", beam, "--batch-size", batch, "--post-process", "sentencepiece",
           "--required-batch-size-multiple", 1, *extra]  # the default (8) drops a batch when --batch-size < 8
    if args.fixed_len:
        cmd += ["--min-len", args.fixed_len, "--max-len-a", 0, "--max-len-b", args.fixed_len]
    status, rss, text = run_measured(cmd, env, log_path)
    m = TRANSLATED.search(text)
    if status != 0 or not m:
        raise SystemExit(f"error: fairseq-generate {path} failed (log {log_path}):\n{text[-3000:]}")
    hyps = {}
    for line in text.splitlines():
        if line.startswith("D-"):
            parts = line.split("\t")
            hyps[int(parts[0][2:])] = parts[2] if len(parts) > 2 else ""
    if sorted(hyps) != list(range(args.sentences)):
        raise SystemExit(f"error: fairseq-generate {path} translated {len(hyps)} of {args.sentences} sentences "
                         f"(log {log_path})")
    tokens, seconds = int(m.group(2).replace(",", "")), float(m.group(3))
    return [hyps[i] for i in range(len(hyps))], tokens, seconds, rss


def ct2_worker(argv):
    """Child process: translate with CTranslate2, write {"hyps", "tokens", "seconds"} to --json."""
    p = argparse.ArgumentParser()
    for a in ("--model", "--src", "--spm", "--json"):
        p.add_argument(a, required=True)
    for a in ("--batch", "--beam", "--threads"):
        p.add_argument(a, type=int, required=True)
    p.add_argument("--fixed-len", type=int, default=0)
    a = p.parse_args(argv)
    import ctranslate2
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=a.spm)
    src = [line.split() for line in Path(a.src).read_text(encoding="utf-8").splitlines()]
    translator = ctranslate2.Translator(a.model, device="cpu", intra_threads=a.threads, inter_threads=1)
    start = time.perf_counter()
    results = translator.translate_batch(src, beam_size=a.beam, max_batch_size=a.batch,
                                         max_decoding_length=a.fixed_len or MAX_LEN,
                                         min_decoding_length=a.fixed_len or 1)
    seconds = time.perf_counter() - start
    hyps = [r.hypotheses[0] for r in results]
    result = {"hyps": [sp.decode(h) for h in hyps], "tokens": sum(len(h) + 1 for h in hyps),  # + EOS
              "seconds": seconds}
    Path(a.json).write_text(json.dumps(result, ensure_ascii=False), encoding="utf-8")


def ct2_run(args, data: Path, model: Path, batch, beam, log_path: Path):
    result = log_path.with_suffix(".json")
    cmd = [sys.executable, __file__, "ct2-worker", "--model", model, "--src", data / f"test.{args.src}",
           "--spm", args.spm, "--batch", batch, "--beam", beam, "--threads", args.threads, "--json", result,
           "--fixed-len", args.fixed_len]
    status, rss, text = run_measured(cmd, dict(os.environ), log_path)
    if status != 0:
        raise SystemExit(f"error: CTranslate2 on {model} failed (log {log_path}):\n{text[-3000:]}")
    r = json.loads(result.read_text(encoding="utf-8"))
    return r["hyps"], r["tokens"], r["seconds"], rss


def runtime_run(args, data: Path, model_dir: Path, batch, beam, log_path: Path, lut="auto"):
    """fairseq-qtranslate (the torch-free runtime) on the raw source; its --stats JSON has tokens and seconds
    counted as fairseq's (output tokens + EOS, translation time only)."""
    stats = log_path.with_suffix(".json")
    out = log_path.with_suffix(".out")
    cmd = [sys.executable, "-m", "fairseq_qruntime.cli", model_dir, "--spm", args.spm, "--beam", beam,
           "--batch-size", batch, "--threads", args.threads, "--lut", lut, "--quiet", "--stats", stats,
           "--input", data / f"raw.{args.src}", "--output", out]
    if args.fixed_len:
        cmd += ["--min-len", args.fixed_len, "--max-len-b", args.fixed_len]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(args.threads)}
    status, rss, text = run_measured(cmd, env, log_path)
    if status != 0:
        raise SystemExit(f"error: fairseq-qtranslate {model_dir} failed (log {log_path}):\n{text[-3000:]}")
    r = json.loads(stats.read_text(encoding="utf-8"))
    return out.read_text(encoding="utf-8").splitlines(), r["tokens"], r["seconds"], rss


def ratio_cell(v) -> str:
    return f"{v:.2f}x" if v is not None else ""


def table(results, args) -> str:
    lines = [f"{args.sentences} test sentences, {args.threads} thread(s); tokens/s = generated target tokens "
             "(EOS included) / generation seconds (model load excluded); peak RSS of the process"
             + (f"; every output forced to {args.fixed_len} tokens (BLEU meaningless)" if args.fixed_len else "")
             + (f"; runtime and CTranslate2 rows: median of {args.rounds} rounds in alternating order"
                if args.rounds > 1 else ""), "",
             "| model | file MB | batch | beam | tokens/s | peak RSS MB | BLEU |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['file_bytes'] / 1e6:.2f} | {r['batch']} | {r['beam']} | "
                     f"{r['tokens_per_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['bleu']:.2f} |")
    ratios = [r for r in results if r.get("vs_ct2") is not None or r.get("vs_fp32") is not None]
    if ratios:
        lines += ["", "| runtime row | batch | beam | tokens/s vs CTranslate2 int8 | vs fairseq fp32 | peak RSS vs "
                  "CTranslate2 | file vs CTranslate2 |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in ratios:
            lines.append(f"| {r['model']} | {r['batch']} | {r['beam']} | {ratio_cell(r.get('vs_ct2'))} | "
                         f"{ratio_cell(r.get('vs_fp32'))} | {ratio_cell(r.get('rss_vs_ct2'))} | {ratio_cell(r.get('file_vs_ct2'))} |")
    return "\n".join(lines)


def get_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--exp", type=Path, default=ROOT / "exp" / "demo",
                   help="experiment directory with fp32/, the QAT runs and data/ (scripts/demo.sh layout)")
    p.add_argument("--out", type=Path, default=ROOT / "exp" / "bench", help="scratch directory (reused)")
    p.add_argument("--fp32", type=Path, help="fp32 transformer checkpoint (default: EXP/fp32/checkpoint_best.pt)")
    p.add_argument("--qat", action="append", metavar="NAME=CKPT",
                   help="quantization-aware checkpoint to pack and run (repeatable; 'none': no QAT rows; default: "
                        + ", ".join(f"{k}=EXP/{v}" for k, v in DEFAULT_QAT.items()) + ")")
    p.add_argument("--ptq", action="append", metavar="NAME=METHOD:BITS",
                   help="pack the fp32 model itself with fairseq-qpack --method METHOD --bits BITS (repeatable)")
    p.add_argument("--fixed-len", type=int, default=0, metavar="N",
                   help="every translation exactly N tokens (speed of untrained models; BLEU meaningless)")
    p.add_argument("--base-size", action="store_true",
                   help="instead of --fp32: a transformer-base-size model after one training update (needs --fixed-len)")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each runtime / CTranslate2 row per setting, in alternating order (median reported)")
    p.add_argument("--data-bin", type=Path, help="fairseq data-bin with the dictionaries (default: EXP/data/bin)")
    p.add_argument("--spm", type=Path, help="sentencepiece model (default: EXP/data/spm.model)")
    p.add_argument("--raw-src", type=Path, help="raw test source (default: EXP/data/raw/test.SRC)")
    p.add_argument("--raw-ref", type=Path, help="raw test reference (default: EXP/data/raw/test.TGT)")
    p.add_argument("--src", default="en")
    p.add_argument("--tgt", default="de")
    p.add_argument("--sentences", type=int, default=100, help="first N test sentences")
    p.add_argument("--threads", type=int, default=1, help="OMP threads for fairseq, intra_threads for CTranslate2")
    p.add_argument("--settings", default=",".join(f"{b}x{k}" for b, k in SETTINGS),
                   help="comma-separated BATCHxBEAM settings")
    p.add_argument("--quick", action="store_true", help="40 sentences (a smoke run of the whole table)")
    p.add_argument("--no-ct2", dest="ct2", action="store_false", help="leave out CTranslate2")
    p.add_argument("--no-fairseq-packed", dest="fairseq_packed", action="store_false",
                   help="leave out the fairseq-generate rows of the packed files")
    p.add_argument("--no-fairseq", dest="fairseq", action="store_false",
                   help="leave out every fairseq-generate row (fp32 and packed)")
    p.add_argument("--lut", default="auto",
                   help="comma-separated arithmetic of the runtime rows (fairseq-qtranslate --lut): auto (the "
                        "default: int16 where the CPU has it), int16, fp32 (exact) or e.g. auto,fp32 (one row each)")
    p.add_argument("--no-runtime", dest="runtime", action="store_false",
                   help="leave out the torch-free runtime rows (fairseq-qtranslate on each packed model)")
    p.add_argument("--no-int8-dequant", dest="int8_dequant", action="store_false",
                   help="leave out the int8 row with the exact dequantize kernel")
    p.add_argument("--redo", action="store_true", help="rebuild the subset, packed files and CTranslate2 model")
    return p


def resolve(args):
    if args.quick:
        args.sentences = min(args.sentences, 40)
    exp = args.exp
    if args.base_size and (args.fp32 or not args.fixed_len):
        raise SystemExit("error: --base-size makes its own fp32 model: give --fixed-len N and no --fp32")
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds must be >= 1, got {args.rounds}")
    args.fp32 = args.fp32 or (None if args.base_size else checkpoint_in(exp / "fp32"))
    args.data_bin = args.data_bin or exp / "data" / "bin"
    args.spm = args.spm or exp / "data" / "spm.model"
    args.raw_src = args.raw_src or exp / "data" / "raw" / f"test.{args.src}"
    args.raw_ref = args.raw_ref or exp / "data" / "raw" / f"test.{args.tgt}"
    if args.qat == ["none"]:
        args.qat = {}
    elif args.qat:
        args.qat = dict(q.split("=", 1) for q in args.qat)
    else:
        args.qat = {k: checkpoint_in(exp / v) for k, v in DEFAULT_QAT.items()}
    ptq = {}
    for q in args.ptq or []:
        name, _, spec = q.partition("=")
        method, _, bits = spec.partition(":")
        if not (name and method and bits.isdigit()) or name in args.qat:
            raise SystemExit(f"error: --ptq takes NAME=METHOD:BITS with a NAME not used by --qat, e.g. bcq3=bcq:3 "
                             f"(got {q!r})")
        ptq[name] = (method, bits)
    args.ptq = ptq
    args.settings = [tuple(map(int, s.split("x"))) for s in args.settings.split(",")]
    inputs = [args.data_bin, args.spm, args.raw_src, args.raw_ref, *args.qat.values()]
    for path in ([args.fp32] if args.fp32 else []) + inputs:
        if not Path(path).exists():
            raise SystemExit(f"error: {path} does not exist")
    if args.ct2:
        try:
            import ctranslate2  # noqa: F401
        except ImportError:
            raise SystemExit("error: ctranslate2 is not installed: pip install -e '.[bench]' (or give --no-ct2)")
    return args


def is_runtime(extra) -> bool:
    return isinstance(extra, str) and extra.partition(":")[0] == "runtime"


def run_row(args, data: Path, out: Path, label, path, extra, batch, beam, rnd):
    """One run of one row: (hyps, tokens, seconds, peak RSS MB)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-")
    tag = f".r{rnd + 1}" if args.rounds > 1 and (extra is None or is_runtime(extra)) else ""
    log_path = out / "logs" / f"{slug}.b{batch}.k{beam}.n{args.sentences}.t{args.threads}{tag}.log"
    log_path.parent.mkdir(exist_ok=True)
    if extra is None:
        return ct2_run(args, data, path, batch, beam, log_path)
    if is_runtime(extra):
        return runtime_run(args, data, path, batch, beam, log_path, extra.partition(":")[2] or "auto")
    return fairseq_run(args, data, path, extra, batch, beam, log_path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ct2-worker"]:
        return ct2_worker(argv[1:])
    args = resolve(get_parser().parse_args(argv))
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    if args.base_size:
        args.fp32 = make_base_model(args, out)
    data = prepare_subset(args, out)
    refs = (data / f"raw.{args.tgt}").read_text(encoding="utf-8").splitlines()
    rows = prepare_models(args, out)
    results = []
    for batch, beam in args.settings:
        runs = {row[0]: [] for row in rows}
        repeated = [row for row in rows if row[2] is None or is_runtime(row[2])]
        for label, path, extra, _ in rows:  # fairseq-generate: once
            if extra is not None and not is_runtime(extra):
                runs[label].append(run_row(args, data, out, label, path, extra, batch, beam, 0))
        for rnd in range(args.rounds):
            for label, path, extra, _ in (repeated if rnd % 2 == 0 else repeated[::-1]):
                runs[label].append(run_row(args, data, out, label, path, extra, batch, beam, rnd))
        tps = {label: [t / s for _, t, s, _ in rs] for label, rs in runs.items()}
        ct2 = next((row[0] for row in rows if row[2] is None), None)
        for label, _, extra, size in rows:
            hyps, tokens, seconds, _ = runs[label][0]
            rss = max(r[3] for r in runs[label])
            r = {"model": label, "file_bytes": size, "batch": batch, "beam": beam, "tokens": tokens,
                 "seconds": seconds, "tokens_per_s": statistics.median(tps[label]), "runs_tokens_per_s": tps[label],
                 "peak_rss_mb": rss, "bleu": bleu(hyps, refs), "same_as_fairseq": None}
            if is_runtime(extra):
                ref = runs.get(label.split(" (fairseq-qtranslate")[0])
                if ref:  # the runtime computes what fairseq-generate computes on the same packed file
                    r["same_as_fairseq"] = sum(a == b for a, b in zip(hyps, ref[0][0])) / len(ref[0][0])
                    log(f"{label} batch {batch} beam {beam}: {100 * r['same_as_fairseq']:.1f}% of the translations "
                        "equal fairseq-generate's on the same packed file")
                if ct2:
                    r["vs_ct2"] = statistics.median(a / b for a, b in zip(tps[label], tps[ct2]))
                    r["rss_vs_ct2"] = rss / max(x[3] for x in runs[ct2])
                    r["file_vs_ct2"] = size / next(row[3] for row in rows if row[0] == ct2)
                if "fp32" in tps:
                    r["vs_fp32"] = r["tokens_per_s"] / tps["fp32"][0]
            log(f"{label} batch {batch} beam {beam}: {r['tokens_per_s']:.1f} tokens/s "
                f"({', '.join(f'{v:.1f}' for v in tps[label])}), {rss:.0f} MB, BLEU {r['bleu']:.2f}")
            results.append(r)
    order = {row[0]: i for i, row in enumerate(rows)}
    results.sort(key=lambda r: order[r["model"]])  # stable: settings stay in order within a model
    text = table(results, args)
    (out / "results.json").write_text(json.dumps({"sentences": args.sentences, "threads": args.threads,
                                                  "rounds": args.rounds, "results": results}, indent=1) + "\n")
    (out / "results.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
