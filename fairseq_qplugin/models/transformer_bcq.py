"""``transformer_bcq``: binary-code quantization with mixed precision by block, sub-layer and word frequency.

Chung et al. 2020 (docs/methods.md §3): every weight matrix is
``W ~= sum_k diag(alpha_k) B_k`` with 1-4 bits (alternating search by default). Bits are chosen, in
increasing precedence, by ``--bcq-bits`` (everything), the block flags ``--bcq-embed-bits``,
``--bcq-encoder-bits`` and ``--bcq-decoder-bits``, and the sub-layer map ``--bcq-layer-bits``. With
``--bcq-embed-freq-ratio r`` the rows of the token embeddings and the output projection get bits by
word frequency (``quant/mixed.py``). Train it with ``--optimizer pnr_<name>`` (pNR, the paper's
method, ``optim/pnr.py``); with a plain optimizer it trains with straight-through fake quantization.
"""
import logging
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model
from torch import nn

from ..errors import QuantConfigError
from ..modules import LearnedBCQQuantizer, QuantEmbedding, QuantLinear, RowBitsQuantizer, WeightQuantizer
from ..quant import METHODS, QuantSpec, group_sizes, ranked_row_bits
from .base import (SIZE_PRESETS, QuantConfig, QuantizedTransformerModel, flag, parse_part_bits, register_preset,
                   register_size_presets, uses_pnr)

logger = logging.getLogger(__name__)

BITS = METHODS["bcq"].bits
# block flag -> the parts it covers
BLOCKS = [
    ("bcq_embed_bits", ["embeddings", "output_projection"]),
    ("bcq_encoder_bits", ["encoder_layers"]),
    ("bcq_decoder_bits", ["decoder_layers"]),
]
# Chung & Kim et al. 2020, final configuration: embedding 2.5 (b = 4, r = 1), decoder 1.8, encoder 3.7
PAPER_LAYER_BITS = "encoder_self_attn:3,encoder_ffn:4,decoder_self_attn:2,decoder_cross_attn:3,decoder_ffn:1"


@dataclass
class BCQConfig(QuantConfig):
    bcq_bits: int = field(default=3, metadata={"help": "bits (1-4) of every quantized weight the flags below leave unset"})
    bcq_embed_bits: Optional[int] = field(
        default=None, metadata={"help": "bits of the embedding block: token embeddings and output projection (with "
                                         "--bcq-embed-freq-ratio: b, the bits of the most frequent words)"})
    bcq_encoder_bits: Optional[int] = field(default=None, metadata={"help": "bits of the encoder layers"})
    bcq_decoder_bits: Optional[int] = field(default=None, metadata={"help": "bits of the decoder layers"})
    bcq_layer_bits: str = field(
        default="",
        metadata={"help": "sub-layer bits over the block bits, later entries winning: comma list of PART:BITS, PART "
                          "one of encoder_self_attn, encoder_ffn, decoder_self_attn, decoder_cross_attn, decoder_ffn, "
                          "output_projection, embeddings, or a glob over module names (e.g. 'decoder.layers.0.fc1:2')"})
    bcq_embed_freq_ratio: Optional[float] = field(
        default=None,
        metadata={"help": "r > 0: bits per vocabulary row (embeddings, output projection) by training frequency "
                          "(dictionary counts): b = the block's bits groups, group i holding a share r^i/sum_k r^k of "
                          "the words, most frequent first, at b - i bits (b=4: r=1 -> 2.5 average bits, 2 -> 1.73, "
                          "4 -> 1.32, 8 -> 1.14); unset: every word gets b bits"})
    bcq_embed_groups: str = field(
        default="",
        metadata={"help": "explicit word-frequency groups of the vocabulary rows: comma list of SIZE:BITS, most "
                          "frequent words first, sizes summing to the dictionary size (e.g. '100:4,300:2,600:1'); "
                          "overrides the embedding block's bits; excludes --bcq-embed-freq-ratio"})
    bcq_search: ChoiceEnum(["alternating", "greedy"]) = field(
        default="alternating", metadata={"help": "greedy, or greedy refined by alternating least squares / nearest code"})
    bcq_rounds: int = field(default=10, metadata={"help": "the most alternating rounds per quantization"})
    bcq_group_size: int = field(
        default=0, metadata={"help": "input columns sharing one scale per bit (0: one per output row); must divide them"})
    bcq_learn_scales: bool = field(
        default=False,
        metadata={"help": "train the scales (alphas) with the loss, through W_q = sum_k alpha_k B_k (straight-through "
                          "to the latent weights), starting from the searched ones; the binary codes are re-searched "
                          "every --bcq-research-every updates for the current scales. Not with pNR"})
    bcq_research_every: int = field(
        default=1,
        metadata={"help": "with --bcq-learn-scales: every N updates each weight takes the nearest of its row's 2^bits "
                          "level sums of the current learned scales; the codes stay fixed in between"})


def check_bits(what: str, bits) -> int:
    if not isinstance(bits, int) or not BITS[0] <= bits <= BITS[1]:
        raise QuantConfigError(f"{what}: BCQ takes {BITS[0]} to {BITS[1]} bits per weight, got {bits!r}")
    return bits


def parse_layer_bits(text: str) -> List[Tuple[str, int]]:
    """'decoder_ffn:1,encoder.layers.0.*:4' -> [('decoder_ffn', 1), ('encoder.layers.0.*', 4)]."""
    return parse_part_bits(text, "--bcq-layer-bits", check_bits)


def parse_embed_groups(text: str) -> List[Tuple[int, int]]:
    """'100:4,300:2' -> [(100, 4), (300, 2)]: word-group sizes (most frequent first) and their bits."""
    groups = parse_part_bits(text, "--bcq-embed-groups", check_bits, "SIZE:BITS", "100:4,300:2,600:1")
    for size, bits in groups:
        if not size.isdigit() or int(size) < 1:
            raise QuantConfigError(f"--bcq-embed-groups '{size}:{bits}': write SIZE:BITS with SIZE >= 1 words, "
                                   "e.g. '100:4,300:2,600:1'")
    return [(int(size), bits) for size, bits in groups]


def is_vocabulary_rows(names: List[str]) -> bool:
    return any(n.endswith("embed_tokens") or n == "decoder.output_projection" for n in names)


def word_groups_quantizer(spec: QuantSpec, dictionary, sizes, bits, names: List[str], note="") -> RowBitsQuantizer:
    """Bits per vocabulary row: the words ranked by their training counts (the special symbols -- bos,
    pad, eos, unk, whose counts a loaded dictionary does not keep -- first) in groups of ``sizes`` words
    at ``bits``."""
    if sum(sizes) != len(dictionary):
        raise QuantConfigError(f"--bcq-embed-groups sizes sum to {sum(sizes)} words but the dictionary of "
                               f"{names[0]} has {len(dictionary)}; make them sum to {len(dictionary)}")
    counts = torch.tensor(dictionary.count, dtype=torch.float64)
    row_bits = ranked_row_bits(counts, sizes, bits, first=range(dictionary.nspecial))
    top = (row_bits == max(bits)) & (torch.arange(len(counts)) >= dictionary.nspecial)
    coverage = counts[top].sum() / max(counts[dictionary.nspecial:].sum(), 1)
    logger.info("%s: %d words by training frequency in groups of %s words at %s bits%s: %.2f average bits; the "
                "%d-bit words cover %.1f%% of the training tokens", ", ".join(names), len(counts),
                "/".join(map(str, sizes)), "/".join(map(str, bits)), note, row_bits.float().mean().item(), max(bits),
                100 * coverage)
    return RowBitsQuantizer(replace(spec, bits=max(bits)), row_bits)


def average_bits(model) -> Dict[str, float]:
    """Code bits per weight of the embedding, encoder and decoder blocks and of all weight matrices,
    weighted by parameter count; a weight matrix left in full precision counts 32 bits."""
    weights, bits = Counter(), Counter()
    seen = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (QuantLinear, QuantEmbedding, nn.Linear, nn.Embedding)) or weight in seen \
                or "embed_positions" in name:
            continue
        seen.add(weight)
        block = "embedding" if is_vocabulary_rows([name]) else name.split(".")[0]
        for key in (block, "all"):
            weights[key] += weight.numel()
            bits[key] += weight.numel() * (module.wq.average_bits() if hasattr(module, "wq") else 32.0)
    return {key: bits[key] / weights[key] for key in ("embedding", "encoder", "decoder", "all") if weights[key]}


@register_model("transformer_bcq")
class TransformerBCQModel(QuantizedTransformerModel):
    config_cls = BCQConfig
    renamed_flags = {"bcq_include": "quant_include", "bcq_exclude": "quant_exclude"}  # in older checkpoints

    @classmethod
    def validate(cls, args):
        for attr in ("bcq_bits", *(attr for attr, _ in BLOCKS)):
            if getattr(args, attr) is not None:
                check_bits(f"{flag(attr)} {getattr(args, attr)}", getattr(args, attr))
        r = args.bcq_embed_freq_ratio
        if r is not None and not r > 0:
            raise QuantConfigError(f"--bcq-embed-freq-ratio must be > 0 (the ratio of successive group sizes), got {r}")
        if parse_embed_groups(args.bcq_embed_groups) and r is not None:
            raise QuantConfigError("--bcq-embed-groups and --bcq-embed-freq-ratio both size the word groups: give one")
        if args.bcq_rounds < 1:
            raise QuantConfigError(f"--bcq-rounds must be >= 1, got {args.bcq_rounds}")
        if args.bcq_search == "greedy":
            cls.refuse_unused(args, "bcq_rounds", "to --bcq-search alternating only")
        if args.bcq_group_size < 0:
            raise QuantConfigError(f"--bcq-group-size must be >= 0 (0: one scale per row), got {args.bcq_group_size}")
        if args.bcq_learn_scales:
            cls.refuse_pnr(args, "bcq_learn_scales", "the scales")
            if args.bcq_research_every < 1:
                raise QuantConfigError(f"--bcq-research-every must be >= 1 (updates), got {args.bcq_research_every}")
        else:
            cls.refuse_unused(args, "bcq_research_every", "with --bcq-learn-scales only")
        super().validate(args)

    @classmethod
    def weight_spec(cls, args) -> QuantSpec:
        return QuantSpec(method="bcq", bits=args.bcq_bits, group_size=args.bcq_group_size, search=args.bcq_search,
                         rounds=args.bcq_rounds)

    @classmethod
    def bit_rules(cls, args):
        """The block flags, then --bcq-layer-bits."""
        blocks = [(parts, flag(attr), getattr(args, attr)) for attr, parts in BLOCKS if getattr(args, attr) is not None]
        return blocks + [([part], "--bcq-layer-bits", bits) for part, bits in parse_layer_bits(args.bcq_layer_bits)]

    @classmethod
    def quantizer_fn(cls, args, task):
        ratio, size = args.bcq_embed_freq_ratio, args.bcq_group_size
        groups = parse_embed_groups(args.bcq_embed_groups)

        def make(spec, names, weight):
            if size and weight.shape[1] % size:
                raise QuantConfigError(f"--bcq-group-size {size} does not divide the {weight.shape[1]} input "
                                       f"columns of {names[0]}; use a divisor of every layer's input dimension")
            wq = WeightQuantizer(spec)
            if (ratio is not None or groups) and is_vocabulary_rows(names):
                encoder_side = any(n.startswith("encoder.") for n in names)
                dictionary = task.source_dictionary if encoder_side else task.target_dictionary
                sizes, bits = zip(*groups) if groups else (group_sizes(len(dictionary), spec.bits, ratio),
                                                           range(spec.bits, 0, -1))
                wq = word_groups_quantizer(spec, dictionary, sizes, bits, names, "" if groups else f" (r = {ratio:g})")
            if not args.bcq_learn_scales:
                return wq
            return LearnedBCQQuantizer(wq.spec, weight.shape, wq.row_bits, args.bcq_research_every)

        return make

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        bits = average_bits(model)
        logger.info("transformer_bcq average bits per weight (codes; weighted by parameter count; fp32 weights count "
                    "32): %s", ", ".join(f"{k} {v:.2f}" for k, v in bits.items()))
        if not uses_pnr(args):
            logger.info("training with straight-through fake quantization; --optimizer pnr_<name> trains with pNR")
        return model


register_size_presets("transformer_bcq")
for _size in ("", "_iwslt_de_en"):
    register_preset("transformer_bcq", "transformer_bcq_paper" + _size, SIZE_PRESETS[_size], bcq_embed_bits=4,
                    bcq_embed_freq_ratio=1.0, bcq_layer_bits=PAPER_LAYER_BITS)
