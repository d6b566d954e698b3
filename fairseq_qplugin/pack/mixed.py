"""Kernels over ``PackedMixedBCQ`` (BCQ with a bit count per row): one BCQ kernel call per bit group.

A frequency-mixed embedding stores, for each bit count k, the rows with k bits as one ``PackedBCQ``
(formats.py). The linear product (the tied output projection) runs ``kernels.packed_linear`` on each
group and scatters its columns into the output; the embedding dequantizes only the looked-up rows,
each from its own group. Work and weight reads are proportional to ``sum(row_bits)``, not to
``rows * max(row_bits)``.

Shapes: x float [..., cols] -> y float [..., rows]; tokens long [...] -> float [..., cols].
"""
import torch

from .formats import PackedMixedBCQ
from .kernels import LUT_MAX_ROWS, dequantize_rows, packed_linear


def mixed_linear(x: torch.Tensor, pw: PackedMixedBCQ, bias=None, lut_max_rows: int = LUT_MAX_ROWS) -> torch.Tensor:
    """y = x @ W^T + bias over the bit groups of ``pw``."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    y = x2.new_empty(x2.shape[0], pw.shape[0])
    for rows, group in pw.by_bits:
        y[:, rows] = packed_linear(x2, group, None, lut_max_rows).to(y.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, -1)


def mixed_embedding(tokens: torch.Tensor, pw: PackedMixedBCQ) -> torch.Tensor:
    """Rows of the mixed-precision table for ``tokens`` (long [...]) -> float [..., cols]."""
    uniq, inverse = tokens.reshape(-1).unique(return_inverse=True)
    out = torch.empty(len(uniq), pw.cols)
    bits = pw.row_bits[uniq]
    for rows, group in pw.by_bits:
        sel = (bits == group.bits).nonzero().squeeze(1)
        if len(sel):
            out[sel] = dequantize_rows(group, pw.position[uniq[sel]])
    return out[inverse].reshape(*tokens.shape, pw.cols)
