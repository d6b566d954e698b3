"""Optimizers: the pNR wrapper around any fairseq optimizer (registers ``pnr_<name>``)."""
from .pnr import PNRConfig, PNROptimizer, register_pnr_optimizers

__all__ = ["PNRConfig", "PNROptimizer", "register_pnr_optimizers"]
