"""Results table and BLEU-vs-size plot: method, configuration, bits, size, BLEU, speed of each model.

"code bits" are the bits per quantized weight of the codes alone (the papers' "average bits");
"bits with scales" add the fp16 scales, codebooks and masks. Sizes are computed from the model the
checkpoint builds: quantized weights at their bits plus fp16 scales, everything else at fp32.

Rows given one by one (NAME=CHECKPOINT:GEN_DIR; the first row is the baseline of the delta column;
``--control NAME`` adds a Δ and % against another row, e.g. fp32 fine-tuned without quantization):

    python -m fairseq_qplugin.results --out results.md fp32=exp/fp32/checkpoint_best.pt:exp/gen/fp32 \\
        int8-w4=exp/int8-w4/checkpoint_best.pt:exp/gen/int8-w4 ...

or collected from an experiment directory: every EXP/gen/NAME made by recipes/generate.sh is a row,
its checkpoint the one recorded in EXP/gen/NAME/.done (the layout of scripts/demo.sh, scripts/methods.sh
and examples/wmt14_en_de/run.sh); writes EXP/results.md and EXP/results.png:

    python -m fairseq_qplugin.results --exp-dir exp/demo [--baseline fp32]

A GEN_DIR holds ``bleu.txt`` and, from recipes/generate.sh, ``compound_bleu.txt`` (tokenized BLEU
with compound splitting; computed here from ``hyp.txt`` and the stamp's reference when missing) and
``speed.json`` (tokens/s of fairseq-generate's "Translated" line).
"""
import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from .errors import QuantConfigError

logger = logging.getLogger("fairseq_qplugin.results")


@dataclass
class Row:
    name: str
    summary: dict  # checkpoint_summary()
    bleu: float
    compound_bleu: Optional[float] = None
    tokens_per_s: Optional[float] = None


def describe(model_cfg) -> Tuple[str, str]:
    """(method, configuration) of a checkpoint's model configuration (an argparse Namespace)."""
    get = lambda key, default=None: getattr(model_cfg, key, default)  # noqa: E731
    arch = str(get("arch", "?"))
    where = "" if get("quant_act", "none") == "none" else f" + {get('quant_act_bits')}-bit activations"
    if (get("attn_temperature") or 1.0) != 1.0:
        where += f", tau {get('attn_temperature'):g}"
    if get("quant_include", "all") not in (None, "all"):
        where += f", only {get('quant_include')}"
    if get("quant_exclude"):
        where += f", not {get('quant_exclude')}"
    if arch.startswith("transformer_int8"):
        bits = get("quant_bits", 8)
        method = "binary (int family)" if bits == 1 else "int (range-based linear)"
        return method, f"{bits}-bit {get('quant_scheme', 'sym')} per-{get('quant_granularity', 'channel')} weights{where}"
    if arch.startswith("transformer_bcq"):
        conf = f"{get('bcq_bits')}-bit default"
        blocks = [(k, get(f"bcq_{k}_bits")) for k in ("embed", "encoder", "decoder")]
        conf += "".join(f", {k} {b}" for k, b in blocks if b is not None)
        if get("bcq_embed_freq_ratio") is not None:
            conf += f" (frequency r={get('bcq_embed_freq_ratio'):g})"
        if get("bcq_layer_bits"):
            conf += f", {get('bcq_layer_bits')}"
        return "BCQ", conf + (", greedy" if get("bcq_search") == "greedy" else "") + where
    if arch.startswith("transformer_kmeans"):
        qm = get("quant_method", "kmeans")
        ranking = ", one threshold over all weights" if get("prune_ranking") == "global" else ""
        prune = f", pruning {get('prune_schedule')}{ranking}" if get("prune_schedule") else ""
        if qm == "none":
            return "pruning", f"magnitude {get('prune_schedule')}{ranking}{where}"
        if qm == "kmeans":
            every = get("kmeans_recluster_interval")
            recluster = f", re-clustered every {every} updates" if every else ""
            conf = f"{get('quant_bits') or 4}-bit per-{get('quant_granularity', 'tensor')}"
            return "k-means", f"{conf}{recluster}{where}{prune}"
        per = ", per-row centroids" if get("quant_granularity") == "channel" else ""
        return "BS-Flex" + (" (fixed)" if qm == "bsflex_fixed" else ""), f"1-bit{per}{where}{prune}"
    return "packed" if arch.startswith("transformer_packed") else "fp32", arch


def checkpoint_summary(path: str, data: Optional[str] = None) -> dict:
    """Average bits, packed size, method and configuration of a checkpoint's model; ``data``: the
    binarized data directory with its dictionaries (default: the one the checkpoint names)."""
    from fairseq import checkpoint_utils

    from .models.base import quantization_summary

    try:
        models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], arg_overrides={"data": str(data)} if data else None)
    except FileNotFoundError as e:
        raise QuantConfigError(f"{path}: its dictionaries are not where it was trained ({e.filename or e}); "
                               "give --data DIR, the binarized data directory") from None
    s = quantization_summary(models[0])
    if s["quantized_params"] == 0:  # plain fp32 model
        s["avg_bits"] = s["code_bits"] = 32.0
    s["arch"] = getattr(cfg.model, "arch", "?")
    s["method"], s["configuration"] = describe(cfg.model)
    return s


def _number(path: Path) -> Optional[float]:
    return float(path.read_text().split()[0]) if path.exists() else None


def _stamp(gen: Path) -> Dict[str, str]:
    """key=value lines of GEN_DIR/.done (recipes/generate.sh)."""
    f = gen / ".done"
    if not f.exists():
        return {}
    return dict(line.split("=", 1) for line in f.read_text().splitlines() if "=" in line and not line.startswith("#"))


def gen_scores(gen: Path) -> Tuple[float, Optional[float], Optional[float]]:
    """(BLEU, compound-split tokenized BLEU, tokens/s) of a generate.sh output directory."""
    bleu = _number(gen / "bleu.txt")
    if bleu is None:
        raise FileNotFoundError(f"{gen / 'bleu.txt'} does not exist (not a finished recipes/generate.sh output)")
    compound = _number(gen / "compound_bleu.txt")
    stamp = _stamp(gen)
    if compound is None and (gen / "hyp.txt").exists() and Path(stamp.get("raw_ref", "")).is_file():
        from .scoring import compound_split_bleu, read_lines

        ref = stamp["raw_ref"]
        lang = stamp.get("lang") or Path(ref).suffix.lstrip(".")
        compound = round(compound_split_bleu(read_lines(gen / "hyp.txt"), read_lines(ref), lang).score, 2)
    speed_json = gen / "speed.json"
    speed = json.loads(speed_json.read_text())["tokens_per_s"] if speed_json.exists() else _number(gen / "speed.txt")
    return bleu, compound, speed


def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def table(rows: List[Row], ctrl: Optional[Row] = None) -> str:
    """Markdown table; the first row is the baseline. ``ctrl``, one of the rows (the fp32 model trained
    as long as the quantized ones, without quantization), gets its own Δ and % columns."""
    base = rows[0]
    base_bytes = base.summary["fp32_bytes"]

    def versus(r: Row, ref: Row) -> str:  # the Δ and % cells of r against ref
        delta = "" if r is ref else f"{r.bleu - ref.bleu:+.2f}"
        return f"{delta} | " + (f"{100 * r.bleu / ref.bleu:.1f}%" if ref.bleu else "n/a")

    ctrl_head = f" Δ vs {ctrl.name} | % of {ctrl.name} |" if ctrl else ""
    lines = [
        f"| model | method | configuration | BLEU | Δ BLEU vs {base.name} | % of baseline |{ctrl_head} "
        "tok. BLEU (compound split) | code bits (avg) | bits with scales | size (MB) | compression | tokens/s |",
        "|---|---|---|---:|---:|---:|" + ("---:|---:|" if ctrl else "") + "---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        s = r.summary
        ctrl_cells = "" if not ctrl else " | |" if r is base else f" {versus(r, ctrl)} |"
        lines.append(
            f"| {r.name} | {s.get('method', '?')} | {s.get('configuration', '?')} | {r.bleu:.2f} | {versus(r, base)} "
            f"|{ctrl_cells} {_fmt(r.compound_bleu, '.2f')} | {s['code_bits']:.2f} | {s['avg_bits']:.2f} "
            f"| {s['packed_bytes'] / 1e6:.2f} | {base_bytes / s['packed_bytes']:.1f}x | {_fmt(r.tokens_per_s, '.1f')} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: List[Row], path: Path, title: str = "BLEU vs model size"):
    """Scatter of BLEU against packed size (MB, log scale), one labelled point per row."""
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # before the import, which logs at DEBUG
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    sizes = [r.summary["packed_bytes"] / 1e6 for r in rows]
    for i, m in enumerate(sorted({r.summary.get("method", "?") for r in rows})):
        points = [(mb, r.bleu) for mb, r in zip(sizes, rows) if r.summary.get("method", "?") == m]
        ax.scatter(*zip(*points), label=m, color=plt.cm.tab10(i % 10), s=40, zorder=3)
    for mb, r in zip(sizes, rows):
        ax.annotate(r.name, (mb, r.bleu), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.axhline(rows[0].bleu, color="grey", lw=0.8, ls="--", zorder=1, label=f"{rows[0].name} (baseline)")
    if max(sizes) / min(sizes) > 3:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
    ax.set(xlabel="packed model size (MB)", ylabel="BLEU (sacrebleu)", title=title)
    ax.grid(True, alpha=0.3, zorder=0)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def collect(exp_dir: Path, baseline: Optional[str]) -> List[Tuple[str, str, Path]]:
    """(name, checkpoint, gen dir) of every finished EXP/gen/NAME, the baseline first."""
    gen_root = exp_dir / "gen"
    found = []
    for gen in sorted(gen_root.glob("*/")) if gen_root.is_dir() else []:
        stamp = _stamp(gen)
        if "checkpoint" not in stamp:
            logger.warning("skipping %s: no finished recipes/generate.sh output there (no .done)", gen)
            continue
        found.append((gen.name, stamp["checkpoint"], gen))
    if not found:
        raise SystemExit(f"error: no finished recipes/generate.sh output under {gen_root} (expected {gen_root}/NAME/.done)")
    names = [f[0] for f in found]
    if baseline is None:
        baseline = "fp32" if "fp32" in names else names[0]
    if baseline not in names:
        raise SystemExit(f"error: --baseline {baseline} is not among the rows found in {gen_root}: {', '.join(names)}")
    return sorted(found, key=lambda f: f[0] != baseline)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="*", metavar="NAME=CHECKPOINT:GEN_DIR")
    parser.add_argument("--exp-dir", type=Path, help="collect the rows from EXP_DIR/gen/*/ (instead of giving them)")
    parser.add_argument("--baseline", help="with --exp-dir: the row for the delta column (default: fp32 if present)")
    parser.add_argument("--control", help="also give each row's Δ and %% against this row (e.g. the fp32 model "
                                          "fine-tuned as long as the quantized rows, without quantization)")
    parser.add_argument("--out", type=Path, help="write the table to this file (default with --exp-dir: EXP_DIR/results.md)")
    parser.add_argument("--plot", type=Path, help="write the BLEU-vs-size plot (PNG) to this file "
                                                  "(default with --exp-dir: EXP_DIR/results.png)")
    parser.add_argument("--data", help="the binarized data directory (its dictionaries) of the checkpoints "
                        "(default: the directory each checkpoint was trained on)")
    parser.add_argument("--title", default="BLEU vs model size", help="title of the plot")
    args = parser.parse_args(argv)
    from .commands import start_command  # (the package import registers the architectures)

    start_command()
    if args.exp_dir is not None:
        if args.rows:
            parser.error("give either rows NAME=CHECKPOINT:GEN_DIR or --exp-dir, not both")
        if not args.exp_dir.is_dir():
            parser.error(f"--exp-dir {args.exp_dir} is not a directory")
        specs = collect(args.exp_dir, args.baseline)
        args.out = args.out or args.exp_dir / "results.md"
        args.plot = args.plot or args.exp_dir / "results.png"
    else:
        if not args.rows:
            parser.error("give rows NAME=CHECKPOINT:GEN_DIR or --exp-dir")
        specs = []
        for spec in args.rows:
            name, _, rest = spec.partition("=")
            ckpt, _, gen = rest.rpartition(":")
            if not name or not ckpt or not gen:
                parser.error(f"row {spec!r} is not NAME=CHECKPOINT:GEN_DIR")
            specs.append((name, ckpt, Path(gen)))
    names = [name for name, _, _ in specs]
    if args.control is not None and args.control not in names:
        parser.error(f"--control {args.control} is not among the rows: {', '.join(names)}")
    for name, ckpt, gen in specs:
        for p in (Path(ckpt), gen / "bleu.txt"):
            if not p.exists():
                parser.error(f"{p} does not exist (row {name})")

    rows = []
    for name, ckpt, gen in specs:
        logger.info("summarizing %s (%s)", name, ckpt)
        with torch.no_grad():
            summary = checkpoint_summary(ckpt, args.data)
        rows.append(Row(name, summary, *gen_scores(gen)))
    text = table(rows, next((r for r in rows if r.name == args.control), None))
    sys.stdout.write(text)
    if args.out:
        args.out.write_text(text)
    if args.plot:
        plot(rows, args.plot, args.title)
        logger.info("plot: %s", args.plot)


if __name__ == "__main__":
    main()
