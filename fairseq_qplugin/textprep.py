"""Text preprocessing for the WMT recipes: Moses tokenization, corpus cleaning, SGML test sets.

The steps of fairseq's ``examples/translation/prepare-wmt14en2de.sh``, in Python (sacremoses) so
that no perl checkout of mosesdecoder is needed:

    python -m fairseq_qplugin.textprep tokenize --lang en [--workers 2] < raw > tok
        normalize-punctuation.perl, remove-non-printing-char.perl, tokenizer.perl -a (aggressive
        hyphen splitting: "E-Mail" -> "E @-@ Mail"), no escaping
    python -m fairseq_qplugin.textprep clean --ratio 1.5 --min-len 1 --max-len 250 IN SRC TGT OUT
        clean-corpus-n.perl: keep the pairs IN.SRC/IN.TGT whose two sides have MIN..MAX tokens and a
        length ratio of at most RATIO; write OUT.SRC/OUT.TGT
    python -m fairseq_qplugin.textprep sgm < newstest2014-deen-ref.de.sgm > test.de
        the text of each <seg ...>...</seg>, in order
"""
import argparse
import re
import sys
import unicodedata
from itertools import chain, islice
from multiprocessing import Pool
from typing import Iterable, Iterator, List

_SEG = re.compile(r"<seg[^>]*>\s*(.*?)\s*</seg>", re.IGNORECASE)
_tokenizer_state = {}


def remove_non_printing(line: str) -> str:
    """remove-non-printing-char.perl: every character of Unicode category C* becomes a space."""
    return "".join(" " if unicodedata.category(c).startswith("C") else c for c in line)


def _init_worker(lang: str):
    from sacremoses import MosesPunctNormalizer, MosesTokenizer

    _tokenizer_state["norm"] = MosesPunctNormalizer(lang=lang)
    _tokenizer_state["tok"] = MosesTokenizer(lang=lang)


def _tokenize_chunk(lines: List[str]) -> List[str]:
    norm, tok = _tokenizer_state["norm"], _tokenizer_state["tok"]
    return [tok.tokenize(remove_non_printing(norm.normalize(line)), aggressive_dash_splits=True,
                         return_str=True, escape=False) for line in lines]


def _chunks(lines: Iterable[str], size: int) -> Iterator[List[str]]:
    """Lists of ``size`` lines (the last one shorter), without their newlines."""
    stripped = (line.rstrip("\n") for line in lines)
    return iter(lambda: list(islice(stripped, size)), [])


def tokenize_stream(lines: Iterable[str], lang: str, workers: int = 1) -> Iterator[str]:
    """Normalize punctuation, drop non-printing characters, Moses-tokenize (-a); one line per line."""
    if workers <= 1:
        _init_worker(lang)
        yield from chain.from_iterable(map(_tokenize_chunk, _chunks(lines, 1000)))
        return
    with Pool(workers, initializer=_init_worker, initargs=(lang,)) as pool:
        yield from chain.from_iterable(pool.imap(_tokenize_chunk, _chunks(lines, 1000)))


def keep_pair(src: str, tgt: str, ratio: float, min_len: int, max_len: int) -> bool:
    """clean-corpus-n.perl's test on two whitespace-tokenized lines."""
    ns, nt = len(src.split()), len(tgt.split())
    if ns == 0 or nt == 0 or not (min_len <= ns <= max_len and min_len <= nt <= max_len):
        return False
    return ratio <= 0 or (ns / nt <= ratio and nt / ns <= ratio)


def clean_corpus(prefix: str, src: str, tgt: str, out: str, ratio: float, min_len: int, max_len: int):
    """Write the kept pairs of PREFIX.SRC/PREFIX.TGT to OUT.SRC/OUT.TGT; return (kept, total)."""
    kept = total = 0
    with open(f"{prefix}.{src}", encoding="utf-8", newline="\n") as fs, \
            open(f"{prefix}.{tgt}", encoding="utf-8", newline="\n") as ft, \
            open(f"{out}.{src}", "w", encoding="utf-8") as os_, open(f"{out}.{tgt}", "w", encoding="utf-8") as ot:
        for ls, lt in zip(fs, ft):
            total += 1
            ls, lt = " ".join(ls.split()), " ".join(lt.split())
            if keep_pair(ls, lt, ratio, min_len, max_len):
                kept += 1
                os_.write(ls + "\n")
                ot.write(lt + "\n")
        if fs.readline() or ft.readline():
            raise SystemExit(f"ERROR: {prefix}.{src} and {prefix}.{tgt} have different line counts")
    return kept, total


def sgm_segments(text: str) -> List[str]:
    """The text of each <seg ...>...</seg> of an SGML test set, in order (as fairseq's grep/sed)."""
    return [m.group(1) for m in _SEG.finditer(text)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("tokenize", help="stdin -> stdout: normalize, remove non-printing, Moses tokenize -a")
    t.add_argument("--lang", required=True)
    t.add_argument("--workers", type=int, default=1)
    c = sub.add_parser("clean", help="clean-corpus-n.perl")
    for name in ("prefix", "src", "tgt", "out"):
        c.add_argument(name)
    c.add_argument("--ratio", type=float, default=1.5, help="the most length ratio (0: no ratio test)")
    c.add_argument("--min-len", type=int, default=1)
    c.add_argument("--max-len", type=int, default=250)
    sub.add_parser("sgm", help="stdin (SGML) -> stdout: one line per <seg>")
    args = parser.parse_args(argv)
    sys.stdin.reconfigure(encoding="utf-8", newline="\n")
    sys.stdout.reconfigure(encoding="utf-8", newline="\n")
    if args.command == "tokenize":
        for line in tokenize_stream(sys.stdin, args.lang, args.workers):
            sys.stdout.write(line + "\n")
    elif args.command == "clean":
        kept, total = clean_corpus(args.prefix, args.src, args.tgt, args.out, args.ratio, args.min_len, args.max_len)
        print(f"clean: kept {kept} of {total} pairs ({args.min_len}..{args.max_len} tokens, ratio <= {args.ratio})",
              file=sys.stderr)
    else:
        for seg in sgm_segments(sys.stdin.read()):
            sys.stdout.write(seg + "\n")


if __name__ == "__main__":
    main()
