"""The model card ``fairseq-qpack`` writes next to each packed file: ``NAME.card.json`` and ``NAME.card.md``.

It says what the file holds without loading it: the method and bits of every quantized part (module
names with layer numbers folded to ``*``), the bytes per component, the source checkpoint (name,
architecture, sha256), the plugin version, how it was quantized (post-training settings, dtypes),
and, when given (``--bleu-json``, the output of ``sacrebleu REF -i HYP -f json``), the BLEU score
with sacrebleu's signature.
"""
import datetime
import hashlib
import json
import os
import re
from typing import Optional

from .. import __version__
from ..errors import QuantConfigError


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def parts(layout: dict) -> dict:
    """{module pattern (layer numbers as *): "method b-bit" (or several, comma-joined)} of a layout."""
    out = {}
    for name, e in layout.items():
        pattern = re.sub(r"layers\.\d+\.", "layers.*.", name)
        out.setdefault(pattern, set()).add(f"{e['method']} {e['bits']}-bit" + (
            f", {e['act']} activations {e['act_bits']}-bit" if e.get("act", "none") != "none" else ""))
    return {k: ", ".join(sorted(v)) for k, v in sorted(out.items())}


def read_bleu(path: str) -> dict:
    """score and signature from sacrebleu's JSON output (``sacrebleu REF -i HYP -m bleu -f json``)."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return {"score": float(d["score"]), "signature": str(d["signature"]),
                "verbose": d.get("verbose_score", "")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantConfigError(f"--bleu-json {path}: not sacrebleu's JSON output ({type(e).__name__}: {e}); "
                               "write it with: sacrebleu REF -i HYP -m bleu -f json > FILE") from None


def model_card(packed_path: str, header: dict, source_sha256: str, report: dict, bleu: Optional[dict] = None) -> dict:
    """The card of the packed file ``packed_path`` written with ``header`` (its ``qpack`` entry)."""
    source = header["source"]
    return {
        "packed_file": os.path.basename(packed_path),
        "plugin_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "source": {"checkpoint": source["checkpoint"], "sha256": source_sha256,
                   "arch": source["arch"], "post_training": source["ptq"] is not None},
        "quantization": {"parts": parts(header["layout"]),
                         "post_training": {k: source["ptq"][k] for k in
                                           ("method", "bits", "scheme", "granularity", "include", "exclude")}
                         if source["ptq"] else None,
                         "param_dtype": source["param_dtype"], "other_dtype": source["other_dtype"]},
        "size": {"components": {c: {"bytes": r["bytes"], "fp32_bytes": r["fp32_bytes"],
                                    "avg_bits": r["qbits"] / r["qparams"] if r["qparams"] else None}
                                for c, r in report["components"].items()},
                 "file_bytes": report["file_bytes"], "fp32_bytes": report["fp32_bytes"],
                 "avg_bits": report["avg_bits"], "compression": report["compression"]},
        "bleu": bleu,
        "packed_sha256": header["sha256"],
    }


def card_markdown(card: dict) -> str:
    src, q, size = card["source"], card["quantization"], card["size"]
    how = ("post-training: " + ", ".join(f"{k} {v}" for k, v in q["post_training"].items() if v not in ("", None))
           if q["post_training"] else f"as trained ({src['arch']} checkpoint)")
    lines = [f"# {card['packed_file']}", "",
             f"Packed by fairseq-qplugin {card['plugin_version']} on {card['created']} from `{src['checkpoint']}` "
             f"(`{src['arch']}`, sha256 `{src['sha256']}`); quantized {how}. Float parameters: "
             f"{q['param_dtype']}, other tensors: {q['other_dtype']}.", "",
             "## Quantized parts", "", "| modules | method |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in q["parts"].items()]
    lines += ["", "## Size", "", "| component | bytes | fp32 bytes | avg bits (packed weights) |", "|---|---:|---:|---:|"]
    for name, c in size["components"].items():
        lines.append(f"| {name} | {c['bytes']:,} | {c['fp32_bytes']:,} | "
                     f"{'-' if c['avg_bits'] is None else format(c['avg_bits'], '.2f')} |")
    lines += ["", f"File {size['file_bytes']:,} bytes; {size['compression']:.2f}x smaller than the fp32 weights "
                  f"({size['fp32_bytes']:,} bytes); {size['avg_bits']:.2f} bits per packed weight with its scales.", ""]
    bleu = card["bleu"]
    lines += ["## Quality", "", f"BLEU {bleu['score']:.2f} (sacrebleu signature `{bleu['signature']}`)" if bleu
              else "No score given (fairseq-qpack --bleu-json FILE records one).", ""]
    return "\n".join(lines)


def card_paths(packed_path: str):
    stem = os.path.splitext(packed_path)[0]
    return stem + ".card.json", stem + ".card.md"


def write_model_card(packed_path: str, header: dict, source_sha256: str, report: dict, bleu: Optional[dict] = None):
    """Write the card's .json and .md next to ``packed_path`` (``bleu``: from ``read_bleu``); return their paths."""
    card = model_card(packed_path, header, source_sha256, report, bleu)
    json_path, md_path = card_paths(packed_path)
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(card_markdown(card))
    return json_path, md_path
