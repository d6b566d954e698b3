"""``fairseq-qallocate``: choose bits per layer (and per word-frequency group) for a target average.

    fairseq-qallocate fp32.pt DATA_BIN --method bcq --target-bits 2.5 --output alloc.json

Measures each quantizable part's sensitivity on a few validation sentences: the validation loss
increase when only that part is quantized at each candidate bit width, all else in fp32. Parts are
the weight matrices (one per linear layer; a tied embedding is one), and for BCQ the vocabulary rows
split into word-frequency groups. Assuming the increases add up (the loss increase of a mix is the sum
of its parts' increases), it solves exactly: minimize that sum subject to the parameter-weighted
average code bits <= the target (a multiple-choice knapsack over parameter counts, ``solve``), and
prints and saves the fairseq flags that build this mix (``--bcq-layer-bits`` / ``--bcq-embed-groups``
for transformer_bcq, ``--quant-layer-bits`` for transformer_int8 / transformer_kmeans).
"""
import argparse
import json
import logging
import math
import sys
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from functools import reduce
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .errors import QuantConfigError
from .quant import METHODS, QuantSpec, frequency_rank, group_sizes, quantize

logger = logging.getLogger("fairseq_qplugin.allocate")
ARCH = {"bcq": "transformer_bcq", "int": "transformer_int8", "kmeans": "transformer_kmeans"}
# the quantizer each architecture builds by default (transformer_int8: symmetric per channel; kmeans: per tensor)
SPEC = {"bcq": dict(method="bcq"), "int": dict(method="int", scheme="sym", granularity="channel"),
        "kmeans": dict(method="kmeans", granularity="tensor")}


@dataclass
class Part:
    """One unit of the allocation: whole weight matrices (``rows`` None) or some rows of each of them."""

    name: str
    weights: List[torch.Tensor]
    rows: Optional[List[torch.Tensor]] = None  # per weight: the word ids of a frequency group (BCQ vocabulary)
    loss: Dict[int, float] = field(default_factory=dict)  # bits -> validation loss increase

    @property
    def params(self) -> int:
        if self.rows is None:
            return sum(w.numel() for w in self.weights)
        return sum(len(r) * w.shape[1] for w, r in zip(self.weights, self.rows))


def solve(params: Sequence[int], costs: Sequence[Dict[int, float]], target_bits: float) -> List[int]:
    """Bits per part minimizing ``sum(costs[i][bits_i])`` subject to
    ``sum(params[i] * bits_i) <= target_bits * sum(params)``, exactly: dynamic programming over the
    budget in units of the parameter counts' greatest common divisor. Ties go to the cheaper mix."""
    g = reduce(math.gcd, params)
    units = [p // g for p in params]
    cap = math.floor(Fraction(repr(float(target_bits))) * sum(units))
    if sum(u * min(c) for u, c in zip(units, costs)) > cap:
        raise QuantConfigError(f"--target-bits {target_bits} is below the smallest mix "
                               f"({sum(p * min(c) for p, c in zip(params, costs)) / sum(params):.4g} average bits)")
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    choice = np.zeros((len(units), cap + 1), dtype=np.int8)
    for i, (u, cost) in enumerate(zip(units, costs)):
        new = np.full(cap + 1, np.inf)
        for bits in sorted(cost):
            c = u * bits
            if c > cap:
                continue
            cand = best[: cap + 1 - c] + cost[bits]
            better = cand < new[c:]
            new[c:][better] = cand[better]
            choice[i, c:][better] = bits
        best = new
    j = int(np.argmin(best))  # the first (cheapest) of the minima
    out = []
    for i in reversed(range(len(units))):
        bits = int(choice[i, j])
        out.append(bits)
        j -= units[i] * bits
    return out[::-1]


def validation_batches(task, subset: str, max_sentences: int, max_tokens: int):
    """The first ``max_sentences`` sentences of ``subset`` (file order) in batches of <= ``max_tokens``."""
    task.load_dataset(subset)
    dataset = task.dataset(subset)
    indices = np.arange(min(max_sentences, len(dataset)))
    indices = indices[np.argsort([dataset.num_tokens(i) for i in indices], kind="stable")]
    batches = dataset.batch_by_size(indices, max_tokens=max_tokens)
    return [dataset.collater([dataset[int(i)] for i in b]) for b in batches]


@torch.no_grad()
def validation_loss(model, batches, pad: int) -> float:
    """Token-level cross entropy in bits (fairseq's ``nll_loss``) over ``batches``."""
    total, tokens = 0.0, 0
    for sample in batches:
        lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
        target = sample["target"]
        mask = target != pad
        total += -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)[mask].double().sum().item()
        tokens += int(mask.sum())
    return total / tokens / math.log(2)


def find_parts(model, task, method: str, embed_groups: int) -> List[Part]:
    """Every quantized weight matrix once (as the architectures quantize them); for BCQ the vocabulary
    rows as ``embed_groups`` equal groups of words ranked by training frequency, each vocabulary weight by
    its own dictionary as transformer_bcq ranks them (one --bcq-embed-groups serves them all)."""
    from .models.transformer_bcq import is_vocabulary_rows
    from .modules import quantizable_modules

    by_weight: Dict[int, List[str]] = {}
    weights = {}
    for module, names in quantizable_modules(model).items():
        by_weight.setdefault(id(module.weight), []).extend(names)
        weights[id(module.weight)] = module.weight
    parts, vocab = [], []
    for key, names in by_weight.items():
        names = sorted(names, key=lambda n: "embed_tokens" not in n)  # a tied embedding is named as such
        if method == "bcq" and is_vocabulary_rows(names):
            encoder_side = any(n.startswith("encoder.") for n in names)
            vocab.append((weights[key], task.source_dictionary if encoder_side else task.target_dictionary))
        else:
            parts.append(Part(names[0], [weights[key]]))
    if vocab:
        sizes = {len(d) for _, d in vocab}
        if len(sizes) > 1:
            raise QuantConfigError(f"the vocabularies have {sorted(sizes)} words: one --bcq-embed-groups serves "
                                   "them all, so BCQ allocation needs dictionaries of one size (--joined-dictionary)")
        if embed_groups > min(sizes):
            raise QuantConfigError(f"--embed-groups {embed_groups}: more groups than the {min(sizes)} words")
        ranks = [frequency_rank(torch.tensor(d.count, dtype=torch.float64), first=range(d.nspecial)) for _, d in vocab]
        start = 0
        for size in group_sizes(sizes.pop(), embed_groups, 1.0):
            parts.append(Part(f"words[{start}:{start + size}]", [w for w, _ in vocab],
                              rows=[rank[start:start + size] for rank in ranks]))
            start += size
    return parts


@torch.no_grad()
def measure(model, parts: List[Part], bits: Sequence[int], method: str, loss_fn) -> float:
    """Fill each part's ``loss`` (bits -> increase over the fp32 loss); return the fp32 loss."""
    base = loss_fn()
    logger.info("fp32 validation loss %.4f bits per token; measuring %d parts at %s bits", base, len(parts),
                ",".join(map(str, bits)))
    for k, part in enumerate(parts, 1):
        for b in bits:
            spec = QuantSpec(bits=b, **SPEC[method])
            saved = [w.detach().clone() for w in part.weights]
            for i, w in enumerate(part.weights):
                if part.rows is None:
                    w.data.copy_(quantize(w, spec).dequantize())
                else:
                    w.data[part.rows[i]] = quantize(w[part.rows[i]], spec).dequantize()
            part.loss[b] = loss_fn() - base
            for w, s in zip(part.weights, saved):
                w.data.copy_(s)
        logger.info("part %d/%d %s (%d weights): loss increase %s", k, len(parts), part.name, part.params,
                    ", ".join(f"{b} bits {part.loss[b]:+.4f}" for b in bits))
    return base


def flags_for(method: str, parts: List[Part], bits: List[int]) -> List[str]:
    """The fairseq-train flags that give each part its bits (the most common bits as the default)."""
    modules = [(p, b) for p, b in zip(parts, bits) if p.rows is None]
    groups = [(len(p.rows[0]), b) for p, b in zip(parts, bits) if p.rows is not None]
    default = Counter(b for _, b in modules).most_common(1)[0][0] if modules else max(bits)
    layer = ",".join(f"{p.name}:{b}" for p, b in modules if b != default)
    if method == "bcq":
        flags = ["--bcq-bits", str(default)] + (["--bcq-layer-bits", layer] if layer else [])
        return flags + (["--bcq-embed-groups", ",".join(f"{n}:{b}" for n, b in groups)] if groups else [])
    return ["--quant-bits", str(default)] + (["--quant-layer-bits", layer] if layer else [])


def check_args(args) -> List[int]:
    """The candidate bits; one-line errors for a bad method, bits or file."""
    if args.method not in ARCH:
        raise QuantConfigError(f"--method {args.method!r}: choose one of {', '.join(ARCH)}")
    lo, hi = METHODS[args.method].bits
    try:
        bits = sorted({int(b) for b in args.bits.split(",")}) if args.bits else list(range(lo, hi + 1))
    except ValueError:
        raise QuantConfigError(f"--bits {args.bits!r}: write a comma list of bit widths, e.g. 1,2,3,4") from None
    if not bits or bits[0] < lo or bits[-1] > hi:
        raise QuantConfigError(f"--bits {args.bits}: {args.method} takes {lo} to {hi} bits")
    if not (math.isfinite(args.target_bits) and bits[0] <= args.target_bits <= bits[-1]):
        raise QuantConfigError(f"--target-bits {args.target_bits}: outside {args.method}'s range of {bits[0]} to "
                               f"{bits[-1]} average bits; give a target in it")
    if not Path(args.checkpoint).is_file():
        raise QuantConfigError(f"{args.checkpoint}: no such checkpoint file")
    if not Path(args.data).is_dir():
        raise QuantConfigError(f"{args.data}: no such data directory (the binarized data of the checkpoint)")
    if args.max_sentences < 1 or args.max_tokens < 1:
        raise QuantConfigError("--max-sentences and --max-tokens must be >= 1")
    if args.embed_groups < 1:
        raise QuantConfigError(f"--embed-groups must be >= 1, got {args.embed_groups}")
    if args.output and not Path(args.output).resolve().parent.is_dir():
        raise QuantConfigError(f"--output {args.output}: the directory does not exist; create it first")
    return bits


def allocate(args) -> dict:
    from fairseq import checkpoint_utils

    from .modules import QuantEmbedding, QuantLinear

    bits = check_args(args)
    models, _, task = checkpoint_utils.load_model_ensemble_and_task([args.checkpoint],
                                                                    arg_overrides={"data": args.data})
    model = models[0].eval()
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) for m in model.modules()):
        raise QuantConfigError(f"{args.checkpoint} is already quantized; allocate bits on the fp32 checkpoint")
    batches = validation_batches(task, args.valid_subset, args.max_sentences, args.max_tokens)
    parts = find_parts(model, task, args.method, args.embed_groups)
    base = measure(model, parts, bits, args.method,
                   lambda: validation_loss(model, batches, task.target_dictionary.pad()))
    params = [p.params for p in parts]
    chosen = solve(params, [p.loss for p in parts], args.target_bits)
    flags = flags_for(args.method, parts, chosen)
    avg = sum(n * b for n, b in zip(params, chosen)) / sum(params)
    result = {
        "method": args.method, "arch": ARCH[args.method], "target_bits": args.target_bits, "average_bits": avg,
        "fp32_loss": base, "predicted_loss_increase": sum(p.loss[b] for p, b in zip(parts, chosen)),
        "sentences": sum(len(b["id"]) for b in batches), "candidate_bits": bits,
        "parts": [{"name": p.name, "params": p.params, "bits": b, "loss_increase": {str(k): v for k, v in p.loss.items()}}
                  for p, b in zip(parts, chosen)],
        "flags": flags, "flags_line": " ".join(f"'{f}'" if "," in f or "[" in f else f for f in flags),
    }
    logger.info("allocated %.4f average code bits (target %g); predicted loss increase %.4f (additive)",
                avg, args.target_bits, result["predicted_loss_increase"])
    return result


def get_parser():
    p = argparse.ArgumentParser(prog="fairseq-qallocate", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="trained fp32 transformer checkpoint")
    p.add_argument("data", help="its binarized data directory (dictionaries and the validation subset)")
    p.add_argument("--method", required=True, help="bcq, int or kmeans (transformer_bcq / _int8 / _kmeans)")
    p.add_argument("--target-bits", type=float, required=True, help="the most average code bits per quantized weight")
    p.add_argument("--bits", default="", help="candidate bit widths, comma list (default: all the method takes)")
    p.add_argument("--embed-groups", type=int, default=4,
                   help="bcq: split the vocabulary rows into this many equal word-frequency groups")
    p.add_argument("--valid-subset", default="valid", help="the data subset that measures the loss")
    p.add_argument("--max-sentences", type=int, default=200, help="use the first N sentences of the subset")
    p.add_argument("--max-tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--output", help="write the allocation (JSON, with the flags) to this file")
    return p


def main(argv=None) -> int:
    from .commands import start_command  # (the package import registers the architectures)

    start_command()
    args = get_parser().parse_args(argv)
    result = allocate(args)
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(result["flags_line"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
