"""BLEU as the papers report it, and the post-processing of a ``fairseq-generate`` run.

Two scores of the same detokenized hypotheses against the raw reference:

- ``detok_bleu``: sacrebleu's corpus BLEU with its defaults (13a tokenization, mixed case). This
  is the comparable number (Post 2018).
- ``compound_split_bleu``: the "tokenized BLEU" of the Transformer paper and of the WMT14 en-de
  results that follow it (fairseq's ``scripts/compound_split_bleu.sh``, tensor2tensor's
  ``get_ende_bleu.sh``): both sides Moses-tokenized, hyphenated compounds split as
  ``E-Mail`` -> ``E ##AT##-##AT## Mail`` (the perl rule ``s{(\S)-(\S)}{$1 ##AT##-##AT## $2}g``,
  reproduced exactly), then multi-bleu.perl's BLEU on the tokens: sacrebleu with
  ``tokenize='none'`` (case-sensitive, no smoothing, brevity penalty against the reference length).

Command line (also run by recipes/generate.sh):

    python -m fairseq_qplugin.scoring score --hyp hyp.txt --ref test.de --lang de
    python -m fairseq_qplugin.scoring generate-out DIR --ref test.de --lang de [--detok moses] [--wall-s S]

``generate-out`` reads ``DIR/generate.out`` (fairseq-generate's output) and writes ``DIR/hyp.txt``,
``bleu.txt``, ``compound_bleu.txt``, ``sacrebleu.json``, ``speed.txt`` and ``speed.json``.
"""
import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import sacrebleu

_COMPOUND = re.compile(r"(\S)-(\S)")
_TRANSLATED = re.compile(r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
                         r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)")


def compound_split(line: str) -> str:
    """``s{(\\S)-(\\S)}{$1 ##AT##-##AT## $2}g``: split hyphenated compounds. The matches do not
    overlap, so one-letter parts stay joined (``a-b-c`` -> ``a ##AT##-##AT## b-c``), as with perl."""
    return _COMPOUND.sub(r"\1 ##AT##-##AT## \2", line)


def moses_tokenize(lines: Sequence[str], lang: str, aggressive_dash_splits: bool = False) -> List[str]:
    """Moses tokenizer.perl -l LANG (sacremoses), without escaping: each line -> space-separated tokens.

    (tokenizer.perl's default escaping maps tokens one to one, so BLEU does not depend on it.)"""
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    return [tok.tokenize(line, return_str=True, escape=False, aggressive_dash_splits=aggressive_dash_splits)
            for line in lines]


def moses_detokenize(lines: Sequence[str], lang: str) -> List[str]:
    """Moses detokenizer.perl -l LANG (sacremoses); also joins aggressive ``@-@`` dash splits."""
    from sacremoses import MosesDetokenizer

    detok = MosesDetokenizer(lang=lang)
    return [detok.detokenize(line.split(), unescape=True) for line in lines]


def detok_bleu(hyps: Sequence[str], refs: Sequence[str]) -> "sacrebleu.metrics.bleu.BLEUScore":
    """sacrebleu's corpus BLEU with its defaults (13a tokenization, mixed case) on detokenized text."""
    return sacrebleu.metrics.BLEU().corpus_score(list(hyps), [list(refs)])


def compound_split_bleu(hyps: Sequence[str], refs: Sequence[str], lang: str) -> "sacrebleu.metrics.bleu.BLEUScore":
    """Tokenized BLEU with compound splitting (see the module docstring) of detokenized text."""
    sys_tok = [compound_split(s) for s in moses_tokenize(hyps, lang)]
    ref_tok = [compound_split(s) for s in moses_tokenize(refs, lang)]
    return sacrebleu.metrics.BLEU(tokenize="none", force=True).corpus_score(sys_tok, [ref_tok])


def read_lines(path) -> List[str]:
    """The lines of a UTF-8 text file, without their newlines (only '\\n' ends a line)."""
    with open(path, encoding="utf-8", newline="\n") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line.rstrip("\r") for line in lines]


def score(hyps: Sequence[str], refs: Sequence[str], lang: str) -> Dict:
    """sacrebleu's JSON for detokenized BLEU, plus chrF2 and the compound-split tokenized BLEU."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses but {len(refs)} reference lines")
    bleu = sacrebleu.metrics.BLEU()
    s = bleu.corpus_score(list(hyps), [list(refs)])
    result = json.loads(s.format(signature=str(bleu.get_signature()), is_json=True))
    chrf = sacrebleu.metrics.CHRF()
    result["chrF2"] = round(chrf.corpus_score(list(hyps), [list(refs)]).score, 2)
    result["chrF2_signature"] = str(chrf.get_signature())
    result["compound_split_bleu"] = round(compound_split_bleu(hyps, refs, lang).score, 2)
    result["compound_split_signature"] = f"moses-tok:{lang}|compound-split|multi-bleu (sacrebleu tok:none)"
    return result


def parse_generate_out(path) -> (Dict[int, str], Optional[Dict]):
    """The ``D-`` hypotheses by sentence id, and the numbers of the ``Translated ...`` line (or None)."""
    hyps, speed = {}, None
    for line in read_lines(path):
        if line.startswith("D-"):
            parts = line.split("\t")
            hyps[int(parts[0][2:])] = parts[2] if len(parts) > 2 else ""
        m = _TRANSLATED.search(line)
        if m:
            sentences, tokens, seconds, sentences_per_s, tokens_per_s = m.groups()
            speed = {"sentences": int(sentences.replace(",", "")), "tokens": int(tokens.replace(",", "")),
                     "generation_s": float(seconds), "sentences_per_s": float(sentences_per_s),
                     "tokens_per_s": float(tokens_per_s)}
    return hyps, speed


def process_generate_out(out: Path, ref_path: Path, lang: str, detok: str = "none", wall_s: Optional[float] = None):
    """Write hyp.txt, bleu.txt, compound_bleu.txt, sacrebleu.json, speed.txt, speed.json into ``out``."""
    hyps, speed = parse_generate_out(out / "generate.out")
    refs = read_lines(ref_path)
    if sorted(hyps) != list(range(len(refs))):
        raise SystemExit(f"ERROR: {len(hyps)} hypotheses (ids {min(hyps, default=None)}..{max(hyps, default=None)}) "
                         f"do not match the {len(refs)} lines of the reference {ref_path}: wrong --raw-ref or --subset?")
    if speed is None:
        raise SystemExit(f"ERROR: no 'Translated ... tokens/s' line in {out}/generate.out")
    hyp_list = [hyps[i] for i in range(len(refs))]
    if detok == "moses":
        hyp_list = moses_detokenize(hyp_list, lang)
    (out / "hyp.txt").write_text("".join(h + "\n" for h in hyp_list), encoding="utf-8")
    result = score(hyp_list, refs, lang)
    (out / "sacrebleu.json").write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "bleu.txt").write_text(f"{result['score']:.2f}\n", encoding="utf-8")
    (out / "compound_bleu.txt").write_text(f"{result['compound_split_bleu']:.2f}\n", encoding="utf-8")
    if wall_s is not None:
        speed["wall_s"] = wall_s
    (out / "speed.txt").write_text(f"{speed['tokens_per_s']:.1f}\n", encoding="utf-8")
    (out / "speed.json").write_text(json.dumps(speed, indent=1) + "\n", encoding="utf-8")
    return result, speed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score a hypothesis file against a reference; print JSON")
    p.add_argument("--hyp", required=True, help="detokenized hypotheses, one per line")
    p.add_argument("--ref", required=True, help="raw reference, one per line")
    p.add_argument("--lang", required=True, help="target language for the Moses tokenizer (e.g. de)")
    g = sub.add_parser("generate-out", help="post-process DIR/generate.out of recipes/generate.sh")
    g.add_argument("dir", type=Path)
    g.add_argument("--ref", required=True, type=Path, help="raw reference of the split")
    g.add_argument("--lang", required=True, help="target language (Moses tokenizer/detokenizer)")
    g.add_argument("--detok", choices=("none", "moses"), default="none",
                   help="moses: the D- lines are Moses-tokenized (BPE data); detokenize them first")
    g.add_argument("--wall-s", type=float, help="wall time of the fairseq-generate command, recorded in speed.json")
    args = parser.parse_args(argv)
    if args.command == "score":
        hyps, refs = read_lines(args.hyp), read_lines(args.ref)
        if len(hyps) != len(refs):
            parser.error(f"--hyp has {len(hyps)} lines but --ref has {len(refs)}")
        json.dump(score(hyps, refs, args.lang), sys.stdout, indent=1, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        result, speed = process_generate_out(args.dir, args.ref, args.lang, args.detok, args.wall_s)
        wall = f", command wall {args.wall_s:.1f}s" if args.wall_s is not None else ""
        print(f"BLEU {result['score']:.2f} (compound-split tokenized {result['compound_split_bleu']:.2f}) "
              f"chrF2 {result['chrF2']:.2f} | {speed['sentences']} sentences, {speed['tokens']} tokens in "
              f"{speed['generation_s']:.1f}s ({speed['tokens_per_s']:.1f} tokens/s){wall}", file=sys.stderr)


if __name__ == "__main__":
    main()
