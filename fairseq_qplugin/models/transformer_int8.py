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
from ..quant import QuantSpec
from .base import (QuantizedTransformerModel, QuantPartsConfig, check_temperature, layer_bits_spec_fn,
                   register_size_presets)


@dataclass
class Int8Config(QuantPartsConfig):
    quant_bits: int = field(
        default=8, metadata={"help": "bits per weight: 2-8 range-based linear quantization, 1 = binarize (sign x mean|W|)"}
    )
    quant_scheme: ChoiceEnum(["sym", "asym"]) = field(
        default="sym", metadata={"help": "sym: range [-max|W|, max|W|], zero point in the middle; asym: range [min W, max W]"}
    )
    quant_granularity: ChoiceEnum(["channel", "tensor"]) = field(
        default="channel", metadata={"help": "one scale per output channel (row) or per tensor"}
    )
    quant_act: ChoiceEnum(["none", "input", "output"]) = field(
        default="none", metadata={"help": "also quantize the inputs or outputs of the quantized linear layers"}
    )
    quant_act_bits: int = field(default=8, metadata={"help": "bits for activations (2-8) with --quant-act"})
    attn_temperature: float = field(
        default=1.0, metadata={"help": "attention temperature tau: softmax(QK^T / (tau sqrt(d_k))); values > 1 flatten attention; the Quantized Transformer paper (2019) used 200 with 1-bit weights"}
    )


def weight_spec(args) -> QuantSpec:
    try:
        return QuantSpec(method="int", bits=args.quant_bits, scheme=args.quant_scheme,
                         granularity=args.quant_granularity)
    except QuantConfigError as e:
        raise QuantConfigError(f"--quant-bits {args.quant_bits}: {e}; use 1 (binarize) or 2-8") from None


def validate(args):
    weight_spec(args)
    if args.quant_act != "none" and not 2 <= args.quant_act_bits <= 8:
        raise QuantConfigError(f"--quant-act-bits must be 2-8 for --quant-act {args.quant_act}, got {args.quant_act_bits}")
    check_temperature(args.attn_temperature)


@register_model("transformer_int8")
class TransformerInt8Model(QuantizedTransformerModel):
    config_cls = Int8Config

    @classmethod
    def spec_fn(cls, args, all_names):
        return layer_bits_spec_fn(args, all_names, weight_spec(args))



register_size_presets("transformer_int8", Int8Config, validate)
