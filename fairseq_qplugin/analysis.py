"""Histograms of self-attention weight values, one row per checkpoint (the k-means poster's figure).

    python -m fairseq_qplugin.analysis fp32=fp32/checkpoint_best.pt 8-bit=k8/checkpoint_best.pt \\
        4-bit=k4/checkpoint_best.pt "BS-Flex (self-att only)"=bsflex/checkpoint_best.pt --out self_attn.png

Each row pools the weights of every tensor whose name matches ``--pattern`` (default: the q, k, v and
output projections of every self-attention) and is titled with the largest number of distinct
values in one of those tensors: 16 for 4-bit k-means, 2 for BS-Flex. Any fairseq checkpoint works,
quantized or not, since a quantized checkpoint's ``weight`` entries hold the quantized values.
"""
import argparse
import fnmatch
import logging
import sys
from typing import Dict, List, Tuple

import torch

from .checkpoint import load_state

logger = logging.getLogger("fairseq_qplugin.analysis")

SELF_ATTN = "*.self_attn.*_proj.weight"


def attention_weights(path: str, pattern: str = SELF_ATTN) -> Tuple[torch.Tensor, int]:
    """All values of the matching tensors of a checkpoint (fp32, flat) and the most distinct values in one."""
    state = load_state(path)
    state = state.get("model", state)
    tensors = [v.float() for k, v in state.items() if fnmatch.fnmatchcase(k, pattern)]
    if not tensors:
        raise SystemExit(f"error: no tensor in {path} matches {pattern!r}")
    return torch.cat([t.flatten() for t in tensors]), max(t.unique().numel() for t in tensors)


def plot(rows: List[Tuple[str, str]], out: str, pattern: str = SELF_ATTN, bins: int = 200, log_y: bool = False):
    """One histogram per (label, checkpoint) row, stacked top to bottom on a shared x axis, saved as ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data: Dict[str, Tuple[torch.Tensor, int]] = {label: attention_weights(path, pattern) for label, path in rows}
    lo = min(float(v.min()) for v, _ in data.values())
    hi = max(float(v.max()) for v, _ in data.values())
    fig, axes = plt.subplots(len(rows), 1, figsize=(7, 1.9 * len(rows)), sharex=True, squeeze=False)
    for ax, (label, (values, distinct)) in zip(axes[:, 0], data.items()):
        ax.hist(values.numpy(), bins=bins, range=(lo, hi), color="tab:blue", log=log_y)
        ax.set_title(f"{label}: {values.numel():,} weights, up to {distinct:,} distinct values per tensor",
                     fontsize=9)
        ax.set_ylabel("count")
        logger.info("%s: %d weights, mean %.4g, std %.4g, %d distinct values at most",
                    label, values.numel(), float(values.mean()), float(values.std()), distinct)
    axes[-1, 0].set_xlabel(f"weight value ({pattern})")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    logger.info("wrote %s", out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", metavar="LABEL=PATH", help="checkpoints, one row each, top to bottom")
    parser.add_argument("--out", default="self_attention_weights.png", help="PNG to write")
    parser.add_argument("--pattern", default=SELF_ATTN, help="glob over state-dict keys (default: %(default)s)")
    parser.add_argument("--bins", type=int, default=200)
    parser.add_argument("--log-y", action="store_true", help="logarithmic counts")
    args = parser.parse_args(argv)
    rows = []
    for item in args.checkpoints:
        label, sep, path = item.partition("=")
        rows.append((label, path) if sep else (item, item))
    logging.basicConfig(format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO,
                        stream=sys.stdout)
    plot(rows, args.out, args.pattern, args.bins, args.log_y)


if __name__ == "__main__":
    main()
