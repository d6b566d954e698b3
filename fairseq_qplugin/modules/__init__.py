from .qmodules import ActQuantizer, QuantEmbedding, QuantLinear, WeightQuantizer
from .swap import PART_ALIASES, parse_patterns, pattern_selector, quantizable_modules, select, swap_modules

__all__ = [
    "ActQuantizer", "QuantEmbedding", "QuantLinear", "WeightQuantizer",
    "PART_ALIASES", "parse_patterns", "pattern_selector", "quantizable_modules", "select", "swap_modules",
]
