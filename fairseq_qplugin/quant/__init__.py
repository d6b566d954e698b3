"""Quantization math shared by every method; no fairseq imports (see base.py for the interface)."""
from .base import (METHODS, QuantizedWeight, QuantSpec, check_weight, fake_quantize, quantize, resolve, storage_bits,
                   straight_through)
from .bcq import BCQWeight
from .kmeans import KMeansWeight, bsflex_init, bsflex_step, kmeans_1d, kmeans_weight
from .linear import IntWeight, fake_quantize_range
from .pruning import PruneSchedule, SparseWeight, magnitude_mask, magnitude_masks
from .mixed import MixedBCQWeight, frequency_rank, frequency_row_bits, group_sizes, quantize_bcq_rows, ranked_row_bits
from .packed import PackedWeight, pack_weight, packed_formats, packed_from_dict

__all__ = [
    "METHODS", "QuantizedWeight", "QuantSpec", "check_weight", "fake_quantize", "quantize", "resolve", "storage_bits",
    "straight_through", "PackedWeight", "pack_weight", "packed_formats", "packed_from_dict",
    "BCQWeight", "IntWeight", "fake_quantize_range",
    "KMeansWeight", "bsflex_init", "bsflex_step", "kmeans_1d", "kmeans_weight",
    "PruneSchedule", "SparseWeight", "magnitude_mask", "magnitude_masks",
    "MixedBCQWeight", "frequency_rank", "frequency_row_bits", "group_sizes", "quantize_bcq_rows", "ranked_row_bits",
]
