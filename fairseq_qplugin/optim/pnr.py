"""pNR (period of non-regularization, Lee et al.; docs/methods.md §3) as a wrapper around any fairseq optimizer.

    fairseq-train ... --arch transformer_bcq --optimizer pnr_adam --adam-betas '(0.9, 0.98)' --pnr-period 1000

Every fairseq optimizer NAME registered when the plugin is imported gets a twin ``pnr_NAME`` that
takes NAME's flags plus ``--pnr-period`` (fairseq adds only the chosen optimizer's flags to the
command line, so the wrapped optimizer has to be part of the choice). It:

1. finds the quantized weights among its parameters (QuantLinear and QuantEmbedding tag their
   weight Parameter with its quantizer, ``modules.quantizer_of``; no global registry) and puts their
   quantizers in pNR mode: the training forward uses the full-precision weights, no fake quantization;
2. steps the wrapped optimizer, and after every ``--pnr-period``-th update replaces each quantized
   weight in place by its quantized value (one step is one update, whatever ``--update-freq``);
3. syncs the same way before every checkpoint save (fairseq calls ``state_dict`` only to save one),
   while the model syncs itself when it enters eval mode, i.e. before every validation
   (``QuantizedTransformerModel.train``). Evaluation and saved checkpoints are thus always the
   quantized model; its ``state_dict`` stores quantized weights even between syncs.
   In data-parallel training only rank 0 saves, so the save-time sync is skipped (it would leave
   rank 0's weights different from the others'); the validation before each save still syncs
   every rank, and without validation a resumed run starts from the saved (quantized) weights
   where the uninterrupted one continues from its latent ones.

The update counter is saved with the optimizer state, so a resumed run syncs on the same schedule.
"""
import logging
from argparse import Namespace
from dataclasses import dataclass, field

from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.optim import (OPTIMIZER_DATACLASS_REGISTRY, OPTIMIZER_REGISTRY, FairseqOptimizer, build_optimizer,
                          register_optimizer)
from omegaconf import OmegaConf

from ..distributed import data_parallel_group
from ..errors import QuantConfigError
from ..modules import quantizer_of, sync_pnr_weights_

logger = logging.getLogger(__name__)

COUNTER_KEY = "pnr_num_updates"


@dataclass
class PNRConfig(FairseqDataclass):
    pnr_period: int = field(
        default=1000,
        metadata={"help": "pNR: replace the quantized weights by their quantized values every N updates "
                          "(500-2000 work equally well in the papers); also done before validation and saving"},
    )


def inner_config(args: Namespace, name: str):
    """The wrapped optimizer's config, as fairseq would have built it from the same flags: its
    dataclass as an OmegaConf node if it has one, else the flat namespace."""
    dataclass_cls = OPTIMIZER_DATACLASS_REGISTRY.get(name)
    if dataclass_cls is None:
        return Namespace(**{**vars(args), "optimizer": name})
    cfg = dataclass_cls.from_namespace(args)
    cfg._name = name
    return OmegaConf.structured(cfg)


class PNROptimizer(FairseqOptimizer):
    """Steps the wrapped optimizer ``inner`` and periodically projects the quantized weights (see module doc)."""

    inner_name: str = None  # set on each registered subclass

    def __init__(self, args, params):
        super().__init__(args)
        self.period = getattr(args, "pnr_period", PNRConfig.pnr_period)
        if self.period is None or self.period < 1:
            raise QuantConfigError(f"--pnr-period must be >= 1 (updates between syncs), got {self.period}")
        params = list(params)
        self.quantized = [p for p in params if quantizer_of(p) is not None]
        if not self.quantized:
            raise QuantConfigError(
                f"--optimizer {type(self).registry_name}: none of the parameters is a quantized weight. Use a "
                "quantized --arch (e.g. transformer_bcq); with --fp16 the optimizer only sees fp32 copies of "
                "the weights, so use --memory-efficient-fp16 or --amp instead"
            )
        for p in self.quantized:
            quantizer_of(p).pnr = True
        self.inner = build_optimizer(inner_config(args, self.inner_name), params)
        self.num_updates = 0
        logger.info("pNR: %s over %d parameters; %d quantized weights synced every %d updates",
                    self.inner_name, len(params), len(self.quantized), self.period)

    @classmethod
    def add_args(cls, parser):
        OPTIMIZER_REGISTRY[cls.inner_name].add_args(parser)
        gen_parser_from_dataclass(parser, PNRConfig())

    def sync(self, why: str) -> int:
        synced = sync_pnr_weights_(self.quantized)
        logger.info("pNR: synced %d weights to their quantized values (%s)", synced, why)
        return synced

    def step(self, closure=None, scale=1.0, groups=None):
        self.inner.step(closure, scale=scale, groups=groups)
        self.num_updates += 1
        if self.num_updates % self.period == 0:
            self.sync(f"update {self.num_updates}")

    def state_dict(self):
        if data_parallel_group() is None:  # only the saving rank is here in data-parallel training
            self.sync("checkpoint")
        return {**self.inner.state_dict(), COUNTER_KEY: self.num_updates}

    def load_state_dict(self, state_dict, optimizer_overrides=None):
        state_dict = dict(state_dict)
        self.num_updates = int(state_dict.pop(COUNTER_KEY, 0))
        self.inner.load_state_dict(state_dict, optimizer_overrides)


# everything else is the wrapped optimizer's: its methods and properties, delegated one by one (fairseq's
# FairseqOptimizer defines them all, so they are overridden here rather than found by __getattr__)
for _name in ("get_lr", "set_lr", "backward", "all_reduce_grads", "multiply_grads", "clip_grad_norm", "zero_grad",
              "average_params", "broadcast_global_state_dict", "__getstate__"):
    setattr(PNROptimizer, _name, lambda self, *a, _name=_name, **kw: getattr(self.inner, _name)(*a, **kw))
for _name in ("optimizer", "optimizer_config", "param_groups", "supports_memory_efficient_fp16",
              "supports_step_with_scale", "supports_groups", "supports_flat_params"):
    setattr(PNROptimizer, _name, property(lambda self, _name=_name: getattr(self.inner, _name)))


def register_pnr_optimizers():
    """Register ``pnr_NAME`` for every fairseq optimizer NAME registered so far (idempotent)."""
    for name in sorted(OPTIMIZER_REGISTRY):
        if name.startswith("pnr_") or f"pnr_{name}" in OPTIMIZER_REGISTRY:
            continue
        cls = type(f"PNR_{name}", (PNROptimizer,), {
            "inner_name": name, "registry_name": f"pnr_{name}",
            "__doc__": f"pNR wrapper around fairseq's {name!r} optimizer.",
        })
        register_optimizer(f"pnr_{name}")(cls)


register_pnr_optimizers()
