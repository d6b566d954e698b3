"""Results table: BLEU, delta to a baseline, average weight bits and packed size of each checkpoint.

"code bits" are the bits per quantized weight of the codes alone (the papers' "average bits");
"bits with scales" add the fp16 scales, codebooks and masks.

    python -m fairseq_qplugin.results --out results.md fp32=exp/fp32/checkpoint_best.pt:exp/gen/fp32 \
        int8-8bit=exp/int8/checkpoint_best.pt:exp/gen/int8 ...

Each row is NAME=CHECKPOINT:GEN_DIR, where GEN_DIR holds ``bleu.txt`` (written by recipes/generate.sh).
The first row is the baseline for the delta column. Sizes are computed from the model the checkpoint
builds: quantized weights at their bits plus fp16 scales, everything else at fp32.
"""
import argparse
import logging
import sys
from pathlib import Path

import torch

logger = logging.getLogger("fairseq_qplugin.results")


def checkpoint_summary(path: str) -> dict:
    """Average bits and packed size of a checkpoint's model (fp32 for a plain transformer)."""
    from fairseq import checkpoint_utils

    from .models.base import quantization_summary

    models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([path])
    model = models[0]
    s = quantization_summary(model)
    if s["quantized_params"] == 0:  # plain fp32 model
        s["avg_bits"] = s["code_bits"] = 32.0
    s["arch"] = _cfg.model.arch if hasattr(_cfg.model, "arch") else "?"
    return s


def table(rows):
    """rows: (name, summary, bleu); the first is the baseline. Returns markdown."""
    base_bleu = rows[0][2]
    base_bytes = rows[0][1]["fp32_bytes"]
    lines = [
        "| model | BLEU | Δ BLEU | % of baseline | code bits (avg) | bits with scales | packed size (MB) | compression |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s, bleu in rows:
        delta = "" if name == rows[0][0] else f"{bleu - base_bleu:+.2f}"
        lines.append(
            f"| {name} | {bleu:.2f} | {delta} | {100 * bleu / base_bleu:.1f}% | {s['code_bits']:.2f} "
            f"| {s['avg_bits']:.2f} | {s['packed_bytes'] / 1e6:.2f} | {base_bytes / s['packed_bytes']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", metavar="NAME=CHECKPOINT:GEN_DIR")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s")
    import fairseq_qplugin  # noqa: F401  (architectures and checkpoint loading)

    rows = []
    for spec in args.rows:
        name, _, rest = spec.partition("=")
        ckpt, _, gen = rest.rpartition(":")
        if not name or not ckpt or not gen:
            parser.error(f"row {spec!r} is not NAME=CHECKPOINT:GEN_DIR")
        for p in (Path(ckpt), Path(gen) / "bleu.txt"):
            if not p.exists():
                parser.error(f"{p} does not exist (row {name})")
        bleu = float((Path(gen) / "bleu.txt").read_text().split()[0])
        logger.info("summarizing %s (%s)", name, ckpt)
        with torch.no_grad():
            rows.append((name, checkpoint_summary(ckpt), bleu))
    text = table(rows)
    sys.stdout.write(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
