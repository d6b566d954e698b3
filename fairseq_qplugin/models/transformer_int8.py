"""``transformer_int8``: range-based linear quantization of weights (and optionally activations).

Fan, "Quantized Transformer" (2019), docs/methods.md §1: n = 2..8 bits with asymmetric (Eq. 4) or
symmetric per-output-channel ranges, 1 bit as sign binarization with a mean|W| scale (Eq. 5, clipped
straight-through gradient Eq. 7), optional attention temperature (Eq. 8). Fine-tune it from a
trained fp32 ``transformer`` with ``--finetune-from-model``.
"""
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model

from ..errors import QuantConfigError
from ..modules import LSQQuantizer
from ..quant import QuantSpec
from .base import LayerBitsConfig, QuantizedTransformerModel, flag_spec, register_size_presets


@dataclass
class Int8Config(LayerBitsConfig):
    quant_bits: int = field(
        default=8, metadata={"help": "bits per weight: 2-8 range-based linear quantization, 1 = binarize (sign x mean|W|)"}
    )
    quant_scheme: ChoiceEnum(["sym", "asym"]) = field(
        default="sym", metadata={"help": "sym: range [-max|W|, max|W|], zero point in the middle; asym: range [min W, max W]"}
    )
    quant_granularity: ChoiceEnum(["channel", "tensor"]) = field(
        default="channel", metadata={"help": "one scale per output channel (row) or per tensor"}
    )
    quant_learn_scale: bool = field(
        default=False,
        metadata={"help": "train the weights' steps (Learned Step Size Quantization, 2020): one per output channel "
                          "(or tensor), starting from the range-based scale, with LSQ's gradient scale "
                          "1/sqrt(N*Qp); symmetric 2-8-bit weights only, activations (--quant-act) keep their "
                          "range-based scales; not with pNR"}
    )


@register_model("transformer_int8")
class TransformerInt8Model(QuantizedTransformerModel):
    config_cls = Int8Config

    @classmethod
    def weight_spec(cls, args) -> QuantSpec:
        return flag_spec(f"--quant-bits {args.quant_bits}", "use 1 (binarize) or 2-8", method="int",
                         bits=args.quant_bits, scheme=args.quant_scheme, granularity=args.quant_granularity)

    @classmethod
    def validate(cls, args):
        super().validate(args)
        if args.quant_bits == 1:
            cls.refuse_unused(args, "quant_scheme", "to 2-8 bits (1 bit is sign x mean|W|, no range)")
        if args.quant_learn_scale:
            if args.quant_bits == 1:
                raise QuantConfigError("--quant-learn-scale learns the step of 2-8-bit weights; 1 bit is sign x "
                                       "mean|W|: use --quant-bits 2-8 or leave --quant-learn-scale out")
            if args.quant_scheme != "sym":
                raise QuantConfigError("--quant-learn-scale learns a symmetric step (LSQ): use --quant-scheme sym")
            cls.refuse_pnr(args, "quant_learn_scale", "the steps")

    @classmethod
    def quantizer_fn(cls, args, task):
        if not args.quant_learn_scale:
            return None

        def make(spec, names, weight):
            if spec.bits == 1:
                raise QuantConfigError(f"--quant-layer-bits gives {names[0]} 1 bit, which has no step to learn: "
                                       "use 2-8 bits with --quant-learn-scale")
            return LSQQuantizer(spec, weight.shape)

        return make


register_size_presets("transformer_int8")
