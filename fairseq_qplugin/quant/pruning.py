"""Iterative magnitude pruning, the k-means poster (docs/methods.md §2): remove the X% smallest-magnitude
weights, retrain, raise X (30% -> 50%, 50% -> 80%). Pruned weights stay exactly zero.

``magnitude_mask`` prunes exactly ``round(sparsity * numel)`` weights of a tensor (ties broken by
position), always including those pruned before, so masks only grow; ``magnitude_masks`` does the
same over several tensors with one threshold (class-blind). ``PruneSchedule`` says which
sparsity holds at which update. A pruned fp32 weight is a ``SparseWeight`` (method "sparse").
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..errors import QuantConfigError
from .base import Method, QuantizedWeight, QuantSpec, register_method


def pruned_count(numel: int, sparsity: float) -> int:
    return int(round(sparsity * numel))


def magnitude_mask(w: torch.Tensor, sparsity: float, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
    """bool mask of ``w``'s shape, False at the ``round(sparsity * numel)`` smallest |w|.

    Weights already pruned (``keep`` False) are pruned first, so the result never revives one.
    """
    return magnitude_masks([w], sparsity, [keep])[0]


def magnitude_masks(ws: Sequence[torch.Tensor], sparsity: float,
                    keeps: Optional[Sequence[Optional[torch.Tensor]]] = None) -> List[torch.Tensor]:
    """One magnitude threshold over all of ``ws`` (class-blind pruning, See et al. 2016): masks with
    ``round(sparsity * total)`` False over all tensors together, at the smallest |w| of any tensor, so
    a tensor of small weights loses more than one of large weights. Ties go by position; weights
    already pruned (``keeps`` False) are pruned first, so masks only grow.
    """
    if not 0 <= sparsity < 1:
        raise QuantConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    scores = []
    for w, keep in zip(ws, keeps or [None] * len(ws)):
        score = w.detach().abs().float().flatten()
        scores.append(score if keep is None else score.masked_fill(~keep.flatten(), -1.0))
    score = torch.cat(scores)
    prune = score < 0  # pruned before: stays pruned, even beyond k
    k = pruned_count(score.numel(), sparsity)
    if k:
        threshold = score.kthvalue(k).values
        prune |= score < threshold
        ties = (score == threshold).nonzero().flatten()
        prune[ties[: max(k - int(prune.sum()), 0)]] = True
    return [m.reshape(w.shape) for m, w in zip((~prune).split([w.numel() for w in ws]), ws)]


@dataclass(frozen=True)
class PruneSchedule:
    """``steps``: ((update, sparsity), ...), updates increasing, sparsities non-decreasing; a sparsity
    holds from its update on, and nothing is pruned before the first step."""

    steps: Tuple[Tuple[int, float], ...]

    @classmethod
    def parse(cls, text: str, flag: str = "--prune-schedule") -> Optional["PruneSchedule"]:
        """``"0.5"`` (from the start) or ``"0:0.3,4000:0.5"`` (update:sparsity pairs); "" is no pruning."""
        if not (text or "").strip():
            return None
        items = [t.strip() for t in text.split(",")]
        if not all(items):
            raise QuantConfigError(f"{flag} {text!r}: empty entry; write a sparsity such as '0.5' or "
                                   "update:sparsity pairs separated by single commas, such as '0:0.3,4000:0.5'")
        steps = []
        for item in items:
            update, _, sparsity = item.rpartition(":")
            try:
                steps.append((int(update or 0), float(sparsity)))
            except ValueError:
                raise QuantConfigError(
                    f"{flag} {text!r}: expected a sparsity such as '0.5' or update:sparsity pairs such as "
                    "'0:0.3,4000:0.5'"
                ) from None
        for update, sparsity in steps:
            if not 0 <= sparsity < 1:
                raise QuantConfigError(f"{flag} {text!r}: sparsity {sparsity} is outside [0, 1)")
            if update < 0:
                raise QuantConfigError(f"{flag} {text!r}: update {update} is negative")
        if any(b[0] <= a[0] or b[1] < a[1] for a, b in zip(steps, steps[1:])):
            raise QuantConfigError(
                f"{flag} {text!r}: updates must increase and sparsities must not decrease (pruned weights stay pruned)"
            )
        return cls(tuple(steps))

    def sparsity_at(self, num_updates: int) -> float:
        return next((sparsity for update, sparsity in reversed(self.steps) if num_updates >= update), 0.0)

    @property
    def final(self) -> float:
        return self.steps[-1][1]


@dataclass
class SparseWeight(QuantizedWeight):
    """values: fp32 [rows, cols] (0 where pruned); mask: bool [rows, cols], False where pruned."""

    method = "sparse"
    values: torch.Tensor
    mask: torch.Tensor

    @property
    def shape(self):
        return tuple(self.values.shape)

    def dequantize(self) -> torch.Tensor:
        return (self.values * self.mask).to(self.dtype)

    def storage_bits(self) -> int:
        return sparse_storage_bits(self.shape, None, int(self.mask.sum()))

    def validate(self):
        if self.mask.shape != self.values.shape or self.mask.dtype != torch.bool:
            raise QuantConfigError(f"sparse weight: mask {tuple(self.mask.shape)} does not fit values {self.shape}")


def quantize_sparse(w: torch.Tensor, spec: QuantSpec) -> SparseWeight:
    mask = w != 0
    return SparseWeight(values=w.float() * mask, mask=mask)


def sparse_storage_bits(shape, spec: Optional[QuantSpec], kept: Optional[int] = None) -> int:
    """The kept values at 32 bits plus a 1-bit-per-weight bitmap."""
    numel = shape[0] * shape[1]
    return (numel if kept is None else kept) * 32 + numel


register_method("sparse", Method(SparseWeight, (32, 32), quantize_sparse, sparse_storage_bits))
