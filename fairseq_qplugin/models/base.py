"""What every quantized transformer architecture shares: building, size reporting and checkpoint checks.

A quantized architecture is fairseq's ``TransformerModel`` whose linear layers and embeddings are
swapped for quantized ones after it is built, so its state dict has the same keys and shapes as a
plain ``transformer`` of the same size: ``--finetune-from-model fp32.pt`` starts quantization-aware
training from a trained fp32 model.
"""
import logging
import math
from dataclasses import dataclass, field, fields, replace
from typing import Callable, Dict, List, Optional, Tuple

from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.dataclass.utils import gen_parser_from_dataclass
from fairseq.models import MODEL_REGISTRY, register_model_architecture
from fairseq.models.transformer import TransformerModel
from fairseq.models.transformer import transformer_legacy as fairseq_transformer
from fairseq.modules import MultiheadAttention
from torch.nn import Parameter

from ..errors import QuantConfigError
from ..modules import (QuantEmbedding, QuantLinear, WeightQuantizer, pattern_selector, quantizable_modules,
                       quantize_once_per_forward, select, swap_modules, sync_pnr_weights_)
from ..modules.qmodules import drop_unusable_state, is_schema_key
from ..quant import QuantSpec

logger = logging.getLogger(__name__)


@dataclass
class QuantConfig(FairseqDataclass):
    """The flags every architecture's flags extend: the modules, activation quantization, temperature."""

    quant_include: str = field(
        default="all",
        metadata={"help": "comma list of parts to quantize: all, embeddings, encoder, decoder, self_attn, "
                          "cross_attn, ffn, output_projection, encoder_layers, decoder_layers, or globs over module "
                          "names (e.g. 'encoder.layers.*.self_attn.*')"},
    )
    quant_exclude: str = field(default="", metadata={"help": "parts or globs to leave in full precision"})
    quant_act: ChoiceEnum(["none", "input", "output"]) = field(
        default="none", metadata={"help": "also quantize the inputs or outputs of the quantized linear layers"}
    )
    quant_act_bits: int = field(default=8, metadata={"help": "bits for activations (2-8) with --quant-act"})
    attn_temperature: float = field(
        default=1.0, metadata={"help": "attention temperature tau: softmax(QK^T / (tau sqrt(d_k))); values > 1 flatten "
                                       "attention; the Quantized Transformer paper (2019) used 200 with 1-bit weights"}
    )


@dataclass
class LayerBitsConfig(QuantConfig):
    """--quant-layer-bits: bits per part over one --quant-bits (transformer_int8, transformer_kmeans)."""

    quant_layer_bits: str = field(
        default="",
        metadata={"help": "bits per part over --quant-bits, later entries winning: comma list of PART:BITS, PART a "
                          "part (encoder_ffn, decoder_self_attn, ...) or a glob over module names "
                          "(e.g. 'decoder.layers.0.fc1:2')"},
    )


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def uses_pnr(args) -> bool:
    """Whether ``--optimizer`` is a pNR wrapper (``pnr_<name>``)."""
    return str(getattr(args, "optimizer", "")).startswith("pnr_")


def flag_spec(what: str, hint: str = "", base: Optional[QuantSpec] = None, **fields) -> QuantSpec:
    """``QuantSpec(**fields)``, or ``base`` with ``fields`` replaced; its error as one line that starts with the
    flag and value ``what`` (e.g. "--quant-bits 9") and ends with ``hint``."""
    try:
        return replace(base, **fields) if base is not None else QuantSpec(**fields)
    except QuantConfigError as e:
        raise QuantConfigError(f"{what}: {e}" + (f"; {hint}" if hint else "")) from None


def parse_part_bits(text: str, flag: str, check: Callable[[str, int], int], form="PART:BITS",
                    example="decoder_ffn:1,encoder_ffn:4") -> List[Tuple[str, int]]:
    """'decoder_ffn:1,encoder.layers.0.*:4' -> [('decoder_ffn', 1), ('encoder.layers.0.*', 4)];
    ``check(what, bits)`` validates the bits of each entry."""
    entries = []
    if not (text or "").strip():
        return entries
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            raise QuantConfigError(f"{flag} {text!r}: empty entry; write {form} pairs separated by single commas, "
                                   f"e.g. '{example}'")
        part, sep, bits = entry.rpartition(":")
        if not sep or not part or not bits.strip().isdigit():
            raise QuantConfigError(f"{flag} {entry!r}: write {form}, e.g. '{example.split(',')[0]}'")
        entries.append((part.strip(), check(f"{flag} {entry!r}", int(bits))))
    return entries


# fairseq's transformer sizes, mirrored by every quantized architecture as ``<model>_<suffix>``.
SIZE_PRESETS = {
    "": fairseq_transformer.base_architecture,
    "_iwslt_de_en": fairseq_transformer.transformer_iwslt_de_en,
    "_wmt_en_de": fairseq_transformer.transformer_wmt_en_de,
    "_wmt_en_de_big": fairseq_transformer.transformer_vaswani_wmt_en_de_big,
}


def register_preset(model_name: str, arch_name: str, size_fn, **preset):
    """Register ``arch_name`` for ``model_name``: where the command line left a flag out, fill the value
    of ``preset``, else its dataclass default; validate the flags (once); fill the size of ``size_fn``."""
    model = MODEL_REGISTRY[model_name]
    flags = model.config_cls()
    defaults = {**{f.name: getattr(flags, f.name) for f in fields(flags)}, **preset}

    @register_model_architecture(model_name, arch_name)
    def arch(args):
        for old, new in model.renamed_flags.items():  # in checkpoints of older releases
            if getattr(args, new, None) is None:
                setattr(args, new, getattr(args, old, None))
        for key, value in defaults.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
        model.validate(args)
        size_fn(args)

    return arch


def register_size_presets(model_name: str):
    """``<model_name>`` plus one architecture per fairseq size in ``SIZE_PRESETS``."""
    for suffix, size_fn in SIZE_PRESETS.items():
        register_preset(model_name, model_name + suffix, size_fn)


def set_attention_temperature(model, tau: float):
    """softmax(QK^T / (tau * sqrt(d_k))) (Fan 2019, Eq. 8) in every attention module.

    Also turns off fairseq's fused attention path, which reads the projection weights directly
    (bypassing the quantized modules) and recomputes the scaling itself.
    """
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            module.skip_embed_dim_check = True
            module.scaling = module.head_dim**-0.5 / tau


def quantization_summary(model) -> Dict[str, float]:
    """Parameter counts and packed sizes: quantized weights at their bits, all else at fp32.

    ``avg_bits`` counts codes and scales; ``code_bits`` the codes alone (the "average bits" of the
    papers), both per quantized weight.
    """
    quant_params = quant_bits = code_bits = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)) and module.weight not in seen:
            seen.update([module.weight, *module.wq.parameters()])  # e.g. trained centroids: in storage_bits
            quant_params += module.weight.numel()
            quant_bits += module.wq.storage_bits(module.weight.detach())
            code_bits += module.weight.numel() * module.wq.average_bits()
    other_params = sum(p.numel() for p in model.parameters() if p not in seen)
    return {
        "quantized_params": quant_params,
        "other_params": other_params,
        "avg_bits": quant_bits / max(quant_params, 1),
        "code_bits": code_bits / max(quant_params, 1),
        "packed_bytes": (quant_bits + 32 * other_params) / 8,
        "fp32_bytes": 4 * (quant_params + other_params),
    }


def check_compatible(model, state_dict):
    """Raise a QuantConfigError naming the mismatching tensors if ``state_dict`` cannot load.

    The state a module rebuilds when a checkpoint lacks it (its ``rebuilt_state``: activation ranges,
    k-means codebooks, pruning masks, learned scales) may be missing, extra or of another shape; so
    may the saved codes and latent weights (``is_schema_key``). Nothing is quantized to find the keys.
    """
    own = {k: v for k, v in model.state_dict(keep_vars=True).items() if not is_schema_key(k)}
    state_dict = {k: v for k, v in state_dict.items() if not is_schema_key(k)}
    optional = {f"{name}.{n}" for name, m in model.named_modules(remove_duplicate=False)
                for n in getattr(m, "rebuilt_state", ())}
    missing = [k for k in own if k not in state_dict and k not in optional]
    unexpected = [k for k in state_dict if k not in own and k not in optional]
    shapes = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}" for k, v in own.items()
              if k in state_dict and state_dict[k].shape != v.shape and k not in optional]
    foreign = [k for k in unexpected if ".wq." in k]
    if foreign:
        raise QuantConfigError(
            f"the checkpoint holds another quantization method's model (its quantizer state, e.g. {foreign[0]}, "
            f"is not part of this --arch): fine-tune from the fp32 checkpoint it was trained from, or keep the "
            "--arch it was trained with"
        )
    problems = shapes + [f"missing in checkpoint: {k}" for k in missing] + [f"not in model: {k}" for k in unexpected]
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise QuantConfigError(
            "the checkpoint does not fit the model built from your flags: "
            + "; ".join(problems[:5]) + more
            + ". Build the quantized model with the same architecture as the checkpoint's: the same "
            "--arch size preset or --encoder/decoder-layers, --*-embed-dim, --*-ffn-embed-dim, "
            "--*-attention-heads and --share-*-embed(dings) flags it was trained with."
        )


class QuantizedTransformerModel(TransformerModel):
    """Base class: subclasses define ``config_cls`` (their flags, extending QuantConfig), extend
    ``validate(args)``, define ``weight_spec(args)`` or ``spec_fn(args, names)``, and may define
    ``quantizer_fn(args, task)`` and ``renamed_flags`` ({old name: new name} of flags in older checkpoints)."""

    config_cls = QuantConfig
    renamed_flags: Dict[str, str] = {}

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        gen_parser_from_dataclass(parser, cls.config_cls(), delete_default=True)  # no defaults: presets fill them

    @classmethod
    def validate(cls, args):
        """Check the flags (all filled in) before anything is built; a bad one raises QuantConfigError naming it."""
        if args.quant_act == "none":
            cls.refuse_unused(args, "quant_act_bits", "with --quant-act input or output only")
        elif not 2 <= args.quant_act_bits <= 8:
            raise QuantConfigError(f"--quant-act-bits must be 2-8 for --quant-act {args.quant_act}, "
                                   f"got {args.quant_act_bits}")
        tau = args.attn_temperature
        if not (math.isfinite(tau) and tau > 0):
            raise QuantConfigError(f"--attn-temperature must be a finite number > 0 (1 = plain attention), got {tau}")
        cls.weight_spec(args)
        cls.bit_rules(args)  # the module names they select are checked when the model is built

    @classmethod
    def refuse_unused(cls, args, name: str, applies: str):
        """A flag set away from its default where it would change nothing is an error naming the flag
        (``applies`` says when it does apply), not silently ignored."""
        if getattr(args, name) != getattr(cls.config_cls, name):
            raise QuantConfigError(f"{flag(name)} {getattr(args, name)} applies {applies}; leave {flag(name)} out")

    @staticmethod
    def refuse_pnr(args, name: str, trains: str):
        """``flag(name)`` trains ``trains`` through the fake-quantized forward, which pNR does not run: an error
        naming both flags when the optimizer is a pNR wrapper."""
        if uses_pnr(args):
            raise QuantConfigError(f"{flag(name)} trains {trains} through the fake-quantized forward, which pNR "
                                   f"(--optimizer {args.optimizer}) replaces by full-precision weights; use a plain "
                                   f"--optimizer or leave {flag(name)} out")

    @classmethod
    def weight_spec(cls, args) -> QuantSpec:
        """The spec of every quantized weight, at the bits that no rule of ``bit_rules`` overrides."""
        raise NotImplementedError

    @classmethod
    def bit_rules(cls, args) -> List[Tuple[List[str], str, int]]:
        """[(parts or globs, flag, bits)] over the spec's bits, lowest precedence first: --quant-layer-bits."""
        spec = cls.weight_spec(args)

        def check(what, bits):
            return flag_spec(what, base=spec, bits=bits).bits

        return [([part], "--quant-layer-bits", bits)
                for part, bits in parse_part_bits(args.quant_layer_bits, "--quant-layer-bits", check)]

    @classmethod
    def spec_fn(cls, args, all_names: List[str]) -> Callable[[List[str]], Optional[QuantSpec]]:
        """Given every quantizable module name, the function from a module's names to its spec: None for
        the modules --quant-include / --quant-exclude leave out, else ``weight_spec`` at the bits of the
        last rule that selects any of the names."""
        spec = cls.weight_spec(args)
        rules = [(select(all_names, parts, name), bits) for parts, name, bits in cls.bit_rules(args)]
        chosen = pattern_selector(all_names, args.quant_include, args.quant_exclude)

        def spec_for(names):
            if not chosen(names):
                return None
            bits = spec.bits
            for selected, rule_bits in rules:
                if any(n in selected for n in names):
                    bits = rule_bits
            return replace(spec, bits=bits)

        return spec_for

    @classmethod
    def quantizer_fn(cls, args, task) -> Optional[Callable[[QuantSpec, List[str], Parameter], WeightQuantizer]]:
        """Given a spec, a weight's module names and the weight, build its quantizer (None: ``WeightQuantizer(spec)``)."""
        return None

    @classmethod
    def build_model(cls, args, task):
        model = super().build_model(args, task)
        all_names = [n for names in quantizable_modules(model).values() for n in names]
        done = swap_modules(model, cls.spec_fn(args, all_names),
                            act_bits=args.quant_act_bits, act_where=args.quant_act,
                            make_quantizer=cls.quantizer_fn(args, task))
        set_attention_temperature(model, args.attn_temperature)
        s = quantization_summary(model)
        logger.info(
            "quantized %d modules: %d weights at %.2f average bits (%.2f with scales); %d parameters left in "
            "fp32; packed size %.2f MB (fp32 %.2f MB)",
            len(done), s["quantized_params"], s["code_bits"], s["avg_bits"], s["other_params"],
            s["packed_bytes"] / 1e6, s["fp32_bytes"] / 1e6,
        )
        return model

    def forward(self, *args, **kwargs):
        if not self.training:
            return super().forward(*args, **kwargs)
        with quantize_once_per_forward(self):
            return super().forward(*args, **kwargs)

    def train(self, mode: bool = True):
        """Leaving training mode (fairseq validates in eval mode) syncs the pNR-mode weights first, so
        validation evaluates, and training resumes from, the quantized weights (docs/methods.md §3, pNR)."""
        if not mode and self.training:
            synced = sync_pnr_weights_(self.parameters())
            if synced:
                logger.info("pNR: synced %d weights to their quantized values for evaluation", synced)
        return super().train(mode)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        state_dict = drop_unusable_state(self, state_dict)
        if strict:
            self.upgrade_state_dict(state_dict)
            check_compatible(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)

