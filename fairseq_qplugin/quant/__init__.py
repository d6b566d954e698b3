"""Quantization math shared by every method; no fairseq imports (see base.py for the interface)."""
from .base import METHODS, QuantizedWeight, QuantSpec, fake_quantize, quantize, resolve
from .bcq import BCQWeight
from .linear import IntWeight, fake_quantize_range

__all__ = [
    "METHODS", "QuantizedWeight", "QuantSpec", "fake_quantize", "quantize", "resolve",
    "BCQWeight", "IntWeight", "fake_quantize_range",
]
