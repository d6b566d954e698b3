"""``transformer_int8``: range-based linear quantization of weights (and optionally activations).

Fan, "Quantized Transformer" (2019), docs/methods.md §1: n = 2..8 bits with asymmetric (Eq. 4) or
symmetric per-output-channel ranges, 1 bit as sign binarization with a mean|W| scale (Eq. 5, clipped
straight-through gradient Eq. 7), optional attention temperature (Eq. 8). Fine-tune it from a
trained fp32 ``transformer`` with ``--finetune-from-model``.
"""
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum
from fairseq.models import register_model

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


register_size_presets("transformer_int8")
