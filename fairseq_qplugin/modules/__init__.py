from .kmeans import BSFlexQuantizer, KMeansQuantizer, MaskedWeightQuantizer, PruneQuantizer
from .learned import LearnedBCQQuantizer, LSQQuantizer
from .qmodules import (ActQuantizer, QuantEmbedding, QuantLinear, RowBitsQuantizer, WeightQuantizer,
                       quantize_once_per_forward, quantizer_of, sync_pnr_weights_)
from .swap import (PART_ALIASES, act_quantizers, parse_patterns, pattern_selector, quantizable_modules, select,
                   set_module, swap_modules)

__all__ = [
    "ActQuantizer", "QuantEmbedding", "QuantLinear", "RowBitsQuantizer", "WeightQuantizer",
    "quantize_once_per_forward", "quantizer_of", "sync_pnr_weights_",
    "BSFlexQuantizer", "KMeansQuantizer", "MaskedWeightQuantizer", "PruneQuantizer", "LearnedBCQQuantizer", "LSQQuantizer",
    "PART_ALIASES", "act_quantizers", "parse_patterns", "pattern_selector", "quantizable_modules", "select", "set_module", "swap_modules",
]
