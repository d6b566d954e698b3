"""Agreement of the torch-free runtime with fairseq-generate on the same packed file, at scale.

    python benchmarks/check_runtime.py PACKED.pt DATA_BIN [--subset test] [--beams 1,5] [--batch-size 32]
                                       [--sentences 1000] [--out DIR]

Exports PACKED.pt (``fairseq-qpack --export``), runs ``fairseq-generate`` on the first ``--sentences``
sentences of ``--subset`` for each beam, translates fairseq's own source lines (its ``S-`` lines) with
``fairseq_qruntime.Translator`` and prints, per beam, how many best hypotheses are identical (token
strings) and the largest score difference among them.
"""
import argparse
import math
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def fairseq_hyps(packed, data_bin, subset, beam, batch, sentences, log: Path):
    cmd = [str(Path(sys.executable).parent / "fairseq-generate"), str(data_bin), "--user-dir",
           str(ROOT / "fairseq_qplugin"), "--path", str(packed), "--gen-subset", subset, "--beam", str(beam),
           "--batch-size", str(batch), "--required-batch-size-multiple", "1"]
    text = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False).stdout
    log.write_text(text, encoding="utf-8")
    src, hyp = {}, {}
    for line in text.splitlines():
        m = re.match(r"([SH])-(\d+)\t(.*)", line)
        if m and int(m.group(2)) < sentences:
            i, rest = int(m.group(2)), m.group(3)
            if m.group(1) == "S":
                src[i] = rest
            else:
                score, _, tokens = rest.partition("\t")
                hyp[i] = (tokens, float(score))
    if not hyp:
        raise SystemExit(f"error: fairseq-generate produced no hypotheses (log {log})")
    return src, hyp


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("packed")
    p.add_argument("data_bin")
    p.add_argument("--subset", default="test")
    p.add_argument("--beams", default="1,5")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--sentences", type=int, default=1000, help="compare the first N sentences (ids) of the subset")
    p.add_argument("--out", type=Path, default=ROOT / "exp" / "check-runtime")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model_dir = args.out / "runtime"
    subprocess.run([sys.executable, "-m", "fairseq_qplugin.pack.cli", "--export", str(model_dir), args.packed,
                    "--data", args.data_bin], check=True, stdout=subprocess.DEVNULL)
    from fairseq_qruntime import Translator

    translator = Translator(str(model_dir))
    for beam in map(int, args.beams.split(",")):
        src, ref = fairseq_hyps(args.packed, args.data_bin, args.subset, beam, args.batch_size, args.sentences,
                                args.out / f"generate.beam{beam}.log")
        sd, td = translator.source_dictionary, translator.target_dictionary
        ids = sorted(ref, key=lambda i: len(src[i].split()))  # batches of similar lengths, as fairseq's
        start, got = time.perf_counter(), {}
        for k in range(0, len(ids), args.batch_size):
            batch = ids[k:k + args.batch_size]
            for i, hyps in zip(batch, translator.model.generate([sd.encode(src[i]) for i in batch], beam=beam)):
                got[i] = hyps[0]
        seconds = time.perf_counter() - start
        same, worst = 0, 0.0
        for i in ids:
            if got[i][0] == td.encode(ref[i][0])[:-1]:  # ids: fairseq prints unk as <<unk>>, both map to unk
                same += 1
                worst = max(worst, abs(got[i][1] / math.log(2) - ref[i][1]))  # fairseq prints base 2
        print(f"beam {beam}: {same} of {len(ids)} hypotheses identical ({100 * same / len(ids):.1f}%), "
              f"largest score difference among them {worst:.2g}; "
              f"runtime {seconds:.1f}s in batches of {args.batch_size}")


if __name__ == "__main__":
    main()
