"""``transformer_kmeans``: k-means weight sharing, BS-Flex and iterative magnitude pruning (docs/methods.md §2).

The poster's rows (docs/methods.md §2) as flags: ``--quant-method kmeans --quant-bits 4`` (4-bit
k-means), ``--quant-method bsflex --quant-include self_attn`` (1-bit BS-Flex on self-attention
only), ``--quant-method none --prune-schedule 0:0.3,4000:0.5`` (iterative pruning 30% -> 50%);
pruning combines with either method (prune, then share weights, as in deep compression).
Fine-tune it from a trained fp32 ``transformer`` with ``--finetune-from-model``.
"""
import logging
from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model

from ..errors import QuantConfigError
from ..modules import BSFlexQuantizer, KMeansQuantizer, MaskedWeightQuantizer, PruneQuantizer
from ..quant import PruneSchedule, QuantSpec, magnitude_masks
from ..quant.pruning import pruned_count
from .base import LayerBitsConfig, QuantizedTransformerModel, flag_spec, register_size_presets

logger = logging.getLogger(__name__)


@dataclass
class KMeansConfig(LayerBitsConfig):
    quant_method: ChoiceEnum(["kmeans", "bsflex", "bsflex_fixed", "none"]) = field(
        default="kmeans",
        metadata={"help": "kmeans: 2^b shared values per tensor (or row), fixed assignments, trained centroids; "
                          "bsflex: 1 bit, weights move to the nearer of two centroids, centroids are the means "
                          "of their members; bsflex_fixed: the same with constant centroids; none: no weight "
                          "sharing (pruning only, with --prune-schedule)"},
    )
    quant_bits: Optional[int] = field(
        default=None, metadata={"help": "bits per weight, 1-8 for kmeans (default 4); bsflex is 1 bit"}
    )
    quant_granularity: ChoiceEnum(["tensor", "channel"]) = field(
        default="tensor", metadata={"help": "one codebook per weight tensor or one per output row"}
    )
    kmeans_iters: int = field(default=100, metadata={"help": "maximum Lloyd iterations per clustering"})
    kmeans_recluster_interval: int = field(
        default=0,
        metadata={"help": "kmeans: every N updates cluster the weights again; the latent fp32 weights then also "
                          "train (straight-through) and take their nearest centroid at every update. 0: cluster "
                          "once, train only the centroids"},
    )
    prune_ranking: ChoiceEnum(["tensor", "global"]) = field(
        default="tensor",
        metadata={"help": "tensor: every pruned tensor loses its own smallest weights, the same fraction of each "
                          "(class-uniform); global: one magnitude threshold over all pruned weights, so layers of "
                          "small weights lose more (class-blind, See et al. 2016)"},
    )
    prune_schedule: str = field(
        default="",
        metadata={"help": "iterative magnitude pruning of the selected weights: a sparsity ('0.5') or "
                          "update:sparsity steps ('0:0.3,4000:0.5' = 30%% from the start, 50%% from update "
                          "4000); sparsities in [0, 1)"},
    )


@register_model("transformer_kmeans")
class TransformerKMeansModel(QuantizedTransformerModel):
    config_cls = KMeansConfig

    @classmethod
    def weight_spec(cls, args) -> QuantSpec:
        method = args.quant_method
        if method == "none":
            return QuantSpec(method="sparse", bits=32)
        bits = (4 if method == "kmeans" else 1) if args.quant_bits is None else args.quant_bits
        if method != "kmeans" and bits != 1:
            raise QuantConfigError(f"--quant-bits {bits}: --quant-method {method} is a 1-bit scheme; use 1 or leave it out")
        return flag_spec(f"--quant-bits {bits}", "use 1-8", method="kmeans" if method == "kmeans" else "bsflex",
                         bits=bits, granularity=args.quant_granularity)

    @classmethod
    def validate(cls, args):
        super().validate(args)
        schedule = PruneSchedule.parse(args.prune_schedule)
        if args.quant_method == "none":
            if schedule is None:
                raise QuantConfigError(
                    "--quant-method none shares no weights: give a --prune-schedule (e.g. 0.5) or pick a method")
            for name in ("quant_bits", "quant_granularity", "quant_layer_bits"):
                cls.refuse_unused(args, name, "to weight sharing (--quant-method kmeans or bsflex)")
        if args.prune_ranking != "tensor" and schedule is None:
            raise QuantConfigError(f"--prune-ranking {args.prune_ranking} applies to pruning: give a --prune-schedule")
        if args.kmeans_iters < 1:
            raise QuantConfigError(f"--kmeans-iters must be >= 1, got {args.kmeans_iters}")
        if args.kmeans_recluster_interval < 0:
            raise QuantConfigError(f"--kmeans-recluster-interval must be >= 0, got {args.kmeans_recluster_interval}")
        if args.quant_method != "kmeans":
            for name in ("kmeans_iters", "kmeans_recluster_interval"):
                cls.refuse_unused(args, name, "to --quant-method kmeans only")

    @classmethod
    def quantizer_fn(cls, args, task):
        schedule = PruneSchedule.parse(args.prune_schedule)
        method = args.quant_method

        def make(spec, names, weight):
            if method == "kmeans":
                return KMeansQuantizer(spec, weight.shape, schedule, args.kmeans_recluster_interval, args.kmeans_iters)
            if method in ("bsflex", "bsflex_fixed"):
                return BSFlexQuantizer(spec, weight.shape, schedule, fixed=method == "bsflex_fixed")
            return PruneQuantizer(spec, weight.shape, schedule)

        return make

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        model.prune_schedule = PruneSchedule.parse(args.prune_schedule)
        model.prune_global = args.prune_ranking == "global"
        for _, _, wq in model.pruned_weights():
            wq.global_ranking = model.prune_global
        return model

    def pruned_weights(self):
        """(module name, latent weight, quantizer) of every pruned weight; a tied weight once."""
        seen = set()
        for name, module in self.named_modules():
            wq = getattr(module, "wq", None)
            if isinstance(wq, MaskedWeightQuantizer) and wq.mask is not None and id(module.weight) not in seen:
                seen.add(id(module.weight))
                yield name, module.weight, wq

    def set_num_updates(self, num_updates):
        """Passed on to the quantizers, which prune (and re-cluster) in the next training forward."""
        schedule = getattr(self, "prune_schedule", None)
        if schedule and self.training and schedule.sparsity_at(num_updates) != schedule.sparsity_at(num_updates - 1):
            logger.info("update %d: pruning to %.0f%% sparsity", num_updates, 100 * schedule.sparsity_at(num_updates))
        self._num_updates = num_updates
        super().set_num_updates(num_updates)

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled() and getattr(self, "prune_global", False):
            self.prune_globally()
        return super().forward(*args, **kwargs)

    @torch.no_grad()
    def prune_globally(self):
        """--prune-ranking global: prune all selected weights to the scheduled sparsity with one
        magnitude threshold (masks only grow), and log how much of each block that removed."""
        pruned = list(self.pruned_weights())
        target = self.prune_schedule.sparsity_at(getattr(self, "_num_updates", 0))
        total = sum(w.numel() for _, w, _ in pruned)
        if pruned_count(total, target) <= sum(wq.pruned for _, _, wq in pruned):
            return
        masks = magnitude_masks([wq.pruning_scores(w.detach()) for _, w, wq in pruned], target,
                                [wq.mask for _, _, wq in pruned])
        blocks = {}
        for (name, w, wq), mask in zip(pruned, masks):
            wq.set_mask(mask)
            block = blocks.setdefault(name.split(".")[0] if ".layers." in name else "embeddings", [0, 0])
            block[0] += wq.pruned
            block[1] += w.numel()
        logger.info("pruned %.1f%% of %d weights with one magnitude threshold: %s", 100 * target, total,
                    ", ".join(f"{k} {100 * p / n:.1f}%" for k, (p, n) in blocks.items()))



register_size_presets("transformer_kmeans")
