"""Vector-wise mixed precision: BCQ with a bit count per row, and the word-frequency bit allocation.

Chung et al. 2020 (docs/methods.md §3): sort the vocabulary by training-data frequency and split it into b
clusters; cluster i (i = 0..b-1, most frequent first) holds a share ``r^i / sum_k r^k`` of the words
and gets ``b - i`` bits. With b = 4: r = 1 -> 2.5 average bits, r = 2 -> 1.73, r = 4 -> 1.32,
r = 8 -> 1.14. An embedding row is a word, and so is a row of the output projection.
"""
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence

import torch

from ..errors import QuantConfigError
from .base import Method, QuantSpec, register_method
from .bcq import BCQWeight, bcq_storage_bits, quantize_bcq


@dataclass
class MixedBCQWeight(BCQWeight):
    """A BCQWeight whose row r uses only its first ``row_bits[r]`` planes and alphas.

    planes: bool [b, rows, cols] and alpha: fp32 [b, rows, groups] with b = max(row_bits); the planes
    past a row's bits are False and their alphas 0, so ``dequantize()`` is BCQWeight's.
    row_bits: int8 [rows], each in 1..b.
    """

    method = "bcq_mixed"
    row_bits: torch.Tensor = field(default=None)

    def storage_bits(self) -> int:
        return bcq_storage_bits(self.shape, QuantSpec("bcq", 1, group_size=self.group_size), self.row_bits)

    def validate(self):
        super().validate()
        b, rows, _ = self.planes.shape
        bits = self.row_bits.long() if self.row_bits is not None else None
        if bits is None or bits.shape != (rows,) or int(bits.min()) < 1 or int(bits.max()) != b:
            raise QuantConfigError(f"bcq_mixed weight: row_bits must be [{rows}] values in 1..{b} reaching {b}")
        unused = torch.arange(b, device=bits.device)[:, None] >= bits[None, :]  # [b, rows]
        if self.planes[unused].any() or self.alpha[unused].any():
            raise QuantConfigError("bcq_mixed weight: planes or alphas set past a row's bit count")


def quantize_bcq_rows(w: torch.Tensor, row_bits: torch.Tensor, spec: QuantSpec,
                      init_alpha: Optional[torch.Tensor] = None, fresh: bool = True) -> MixedBCQWeight:
    """BCQ (``spec``'s search, rounds and group size) with ``row_bits[r]`` bits for row r of w [rows, cols];
    ``init_alpha``, ``fresh``: an earlier code's scales of w with the same row bits (``quantize_bcq``)."""
    if spec.method != "bcq" or spec.granularity != "channel":
        raise QuantConfigError("per-row bits need method 'bcq' with granularity 'channel'")
    bits = row_bits.to(device=w.device, dtype=torch.long)
    b = int(bits.max())
    groups = w.shape[1] // spec.group_size if spec.group_size else 1
    planes = torch.zeros(b, *w.shape, dtype=torch.bool, device=w.device)
    alpha = torch.zeros(b, w.shape[0], groups, device=w.device)
    for k in bits.unique().tolist():
        rows = (bits == k).nonzero().squeeze(1)
        warm = None if init_alpha is None else init_alpha[:k, rows]
        part = quantize_bcq(w[rows], replace(spec, bits=k), warm, fresh)
        planes[:k, rows], alpha[:k, rows] = part.planes, part.alpha
    return MixedBCQWeight(planes=planes, alpha=alpha, group_size=spec.group_size, row_bits=bits.to(torch.int8))


def group_sizes(n: int, groups: int, ratio: float) -> List[int]:
    """Sizes of ``groups`` consecutive clusters of n items, cluster i holding ``n r^i / sum_k r^k``
    (rounded so that they sum to n; the largest remainders get the leftover items)."""
    if ratio <= 0:
        raise QuantConfigError(f"the frequency ratio r must be > 0, got {ratio}")
    shares = [ratio**i for i in range(groups)]
    exact = [n * s / sum(shares) for s in shares]
    sizes = [int(e) for e in exact]
    by_remainder = sorted(range(groups), key=lambda i: sizes[i] - exact[i])
    for i in by_remainder[: n - sum(sizes)]:
        sizes[i] += 1
    return sizes


def frequency_row_bits(counts: torch.Tensor, max_bits: int, ratio: float, first: Sequence[int] = ()) -> torch.Tensor:
    """Bits per word: rank the words by ``counts`` [vocab] (the ids in ``first`` on top, ties kept in
    id order), split the ranking with ``group_sizes(vocab, max_bits, ratio)``; cluster i gets
    ``max_bits - i`` bits. Returns int8 [vocab]."""
    return ranked_row_bits(counts, group_sizes(len(counts), max_bits, ratio), range(max_bits, 0, -1), first)


def frequency_rank(counts: torch.Tensor, first: Sequence[int] = ()) -> torch.Tensor:
    """Word ids from the most to the least frequent by ``counts`` [vocab]; the ids in ``first`` on top,
    ties kept in id order."""
    key = counts.double().clone()
    key[list(first)] = torch.inf
    return torch.argsort(key, descending=True, stable=True)


def ranked_row_bits(counts: torch.Tensor, sizes: Sequence[int], bits: Sequence[int],
                    first: Sequence[int] = ()) -> torch.Tensor:
    """Bits per word: the ``frequency_rank`` split into consecutive groups of ``sizes`` words (most
    frequent first, summing to vocab), group i at ``bits[i]``. Returns int8 [vocab]."""
    if sum(sizes) != len(counts) or len(sizes) != len(bits):
        raise QuantConfigError(f"word groups of {list(sizes)} words do not split a vocabulary of {len(counts)}")
    ranked = torch.repeat_interleave(torch.tensor(list(bits)), torch.tensor(list(sizes)))
    out = torch.empty(len(counts), dtype=torch.int8)
    out[frequency_rank(counts, first)] = ranked.to(torch.int8)
    return out


register_method("bcq_mixed", Method(MixedBCQWeight, (1, 4), storage_bits=bcq_storage_bits))
