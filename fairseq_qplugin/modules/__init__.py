"""Quantized modules (no fairseq): the quantizer protocol and its methods, QuantLinear / QuantEmbedding, swapping."""
from .kmeans import BSFlexQuantizer, KMeansQuantizer, MaskedWeightQuantizer, PruneQuantizer  # noqa: F401
from .learned import LearnedBCQQuantizer, LSQQuantizer  # noqa: F401
from .qmodules import (ActQuantizer, QuantEmbedding, QuantLinear, RowBitsQuantizer, WeightQuantizer,  # noqa: F401
                       quantize_once_per_forward, quantizer_of, sync_pnr_weights_)
from .swap import act_quantizers, pattern_selector, quantizable_modules, select, set_module, swap_modules  # noqa: F401
