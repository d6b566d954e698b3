"""``fairseq-qtranslate``: translate raw text with an exported model, without torch or fairseq.

    fairseq-qtranslate MODEL_DIR --spm SPM_MODEL [--bpe CODES] --beam 5 --batch-size 32 --threads 1 \\
        < raw.txt > out.txt

Each input line is split into subwords (sentencepiece ``--spm``, then subword-nmt ``--bpe`` if given),
translated, and written back as text (subwords joined / decoded). Progress goes to stderr; its last
line is ``N tokens/s``: output tokens plus EOS over the translation wall time (model loading and
tokenization excluded). Errors are one line on stderr, with nothing written to stdout.
"""
import argparse
import json
import logging
import sys
import time


def get_parser():
    p = argparse.ArgumentParser(prog="fairseq-qtranslate", description=__doc__.split("\n\n")[0])
    p.add_argument("model_dir", help="directory written by fairseq-qpack --export")
    p.add_argument("--spm", help="sentencepiece model that splits the source (and joins the output)")
    p.add_argument("--bpe", help="subword-nmt BPE codes applied to the (space-tokenized) source; "
                                 "output '@@ ' is removed")
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--nbest", type=int, default=1, help="hypotheses per line (tab-separated)")
    p.add_argument("--batch-size", type=int, default=32, help="sentences per batch at most")
    p.add_argument("--max-batch-tokens", type=int, default=6000, help="padded source tokens per batch at most")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--lut", choices=("auto", "fp32", "int16"), default="auto",
                   help="arithmetic of the packed BCQ products (int16 lookup tables for few rows, an int16 "
                        "GEMM for many): int16 (faster; error bound in docs/runtime.md; needs AVX-512 VBMI and "
                        "VNNI), fp32 (exact: the translations of fairseq-generate) or auto (default: int16 "
                        "where the CPU has it)")
    p.add_argument("--lenpen", type=float, default=1.0)
    p.add_argument("--max-len-a", type=float, default=0.0)
    p.add_argument("--max-len-b", type=int, default=200)
    p.add_argument("--min-len", type=int, default=1)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument("--input", help="read this file instead of stdin")
    p.add_argument("--output", help="write this file instead of stdout (only once everything is translated)")
    p.add_argument("--stats", help="also write {\"tokens\", \"seconds\", \"lines\"} of the timed part as JSON here")
    return p


class Subwords:
    def __init__(self, spm_model=None, bpe_codes=None):
        self.sp = self.bpe = None
        if spm_model:
            import sentencepiece as spm

            self.sp = spm.SentencePieceProcessor(model_file=spm_model)
        if bpe_codes:
            from subword_nmt.apply_bpe import BPE

            with open(bpe_codes, encoding="utf-8") as f:
                self.bpe = BPE(f)

    def encode(self, line: str) -> str:
        line = line.strip()
        if self.sp is not None:
            line = " ".join(self.sp.encode(line, out_type=str))
        if self.bpe is not None:
            line = self.bpe.process_line(line)
        return line

    def decode(self, line: str) -> str:
        if self.bpe is not None:
            line = (line + " ").replace("@@ ", "").rstrip()
        if self.sp is not None:
            line = self.sp.decode(line.split())
        return line


def main(argv=None):
    args = get_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fairseq-qtranslate: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    from .model import ModelError
    from .translator import Translator

    try:
        words = Subwords(args.spm, args.bpe)
        translator = Translator(args.model_dir, threads=args.threads, lut=args.lut)
    except (ModelError, OSError, RuntimeError, ValueError) as e:
        print(f"fairseq-qtranslate: error: {e}", file=sys.stderr)
        return 2
    try:
        if args.input:
            with open(args.input, encoding="utf-8") as f:
                raw = f.read().splitlines()
        else:
            raw = sys.stdin.read().splitlines()
    except OSError as e:
        print(f"fairseq-qtranslate: error: {e}", file=sys.stderr)
        return 2
    source = [words.encode(line) for line in raw]
    out, seconds, done = [], 0.0, 0
    buffer = max(4 * args.batch_size, 256)
    for k in range(0, len(source), buffer):
        chunk = source[k:k + buffer]
        start = time.perf_counter()
        hyps = translator.translate(chunk, beam=args.beam, nbest=args.nbest, max_batch_size=args.batch_size,
                                    max_batch_tokens=args.max_batch_tokens, lenpen=args.lenpen,
                                    max_len_a=args.max_len_a, max_len_b=args.max_len_b, min_len=args.min_len,
                                    buffer_lines=buffer)
        seconds += time.perf_counter() - start
        for h in hyps:
            out.append("\t".join(words.decode(x) for x in h) if args.nbest > 1 else words.decode(h))
        done += len(chunk)
        if not args.quiet:
            print(f"translated {done}/{len(source)} lines", file=sys.stderr, flush=True)
    text = "".join(line + "\n" for line in out)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    if args.stats:
        with open(args.stats, "w", encoding="utf-8") as f:
            json.dump({"tokens": translator.output_tokens, "seconds": seconds, "lines": len(out)}, f)
    print(f"{translator.output_tokens / max(seconds, 1e-9):.1f} tokens/s", file=sys.stderr)
    return 0


def cli():
    sys.exit(main())


if __name__ == "__main__":
    cli()
