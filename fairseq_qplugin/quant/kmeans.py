"""K-means weight sharing and the flexible binary scheme (BS-Flex), the k-means poster (docs/methods.md §2).

K-means: the values of a weight tensor (or of each of its rows) are clustered into K = 2^b centroids
and every weight is replaced by the index of its centroid: ``w_hat[i, j] = codebook[indices[i, j]]``.
Values are 1-D points, so Lloyd's assignment step is a binary search between sorted centroids
(``searchsorted`` on the midpoints), which keeps clustering fast: a 2048 x 512 tensor at 4 bits
takes well under a second on one CPU core. Seeding is k-means++ (D^2 sampling, vectorized over rows).

BS-Flex (1 bit): each weight takes the nearer of two centroids c1 <= c2 (``w > (c1 + c2) / 2``),
and the centroids are recomputed as the means of their current members. It is Lloyd's algorithm
at K = 2 written as pure tensor indexing; during training one step runs per update, so weights may
change cluster (the poster's point against fixed k-means assignments).

Pruned weights (``mask`` False) take no part in clustering and dequantize to exactly 0.
"""
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch

from ..errors import QuantConfigError
from .base import Method, QuantizedWeight, QuantSpec, register_method


@dataclass
class KMeansWeight(QuantizedWeight):
    """codebook: fp32 [K] (per tensor) or [rows, K] (per row), K = 2^bits; indices: uint8 [rows, cols];
    mask: optional bool [rows, cols], False where the weight is pruned (it dequantizes to 0)."""

    method = "kmeans"
    codebook: torch.Tensor
    indices: torch.Tensor
    bits: int
    mask: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return tuple(self.indices.shape)

    def dequantize(self) -> torch.Tensor:
        return kmeans_decode(self.codebook, self.indices, self.mask).to(self.dtype)

    def storage_bits(self) -> int:
        spec = QuantSpec("kmeans", self.bits, granularity="channel" if self.codebook.dim() == 2 else "tensor")
        return kmeans_storage_bits(self.shape, spec, None if self.mask is None else int(self.mask.sum()))

    def validate(self):
        rows, _ = self.indices.shape
        k = 2**self.bits
        if self.codebook.shape not in ((k,), (rows, k)) or self.indices.dtype != torch.uint8:
            raise QuantConfigError(
                f"kmeans weight: codebook {tuple(self.codebook.shape)} does not fit {self.bits}-bit "
                f"indices {tuple(self.indices.shape)} (want [{k}] or [{rows}, {k}], uint8 indices)"
            )
        if int(self.indices.max()) >= k:
            raise QuantConfigError(f"kmeans weight: indices exceed {self.bits} bits")
        if self.mask is not None and (self.mask.shape != self.indices.shape or self.mask.dtype != torch.bool):
            raise QuantConfigError(f"kmeans weight: mask {tuple(self.mask.shape)} does not fit the indices")


def kmeans_decode(codebook: torch.Tensor, indices: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The kmeans format's one dequantize rule: ``codebook[index] * mask`` in fp32, codebook [K] or
    [rows, K] (also of packed rows, the kernels' reference and the training quantizers)."""
    idx, codebook = indices.long(), codebook.float()
    w = codebook[idx] if codebook.dim() == 1 else codebook.gather(1, idx)
    return w if mask is None else w * mask


def kmeans_storage_bits(shape, spec: QuantSpec, kept: Optional[int] = None) -> int:
    """b bits per kept weight, fp16 centroids, and a 1-bit-per-weight bitmap when pruned (``kept`` given)."""
    rows, cols = shape
    codebook = 2**spec.bits * (rows if spec.granularity == "channel" else 1)
    return (rows * cols if kept is None else kept) * spec.bits + codebook * 16 + (0 if kept is None else rows * cols)


class KMeansFit(NamedTuple):
    centroids: torch.Tensor  # float64 [groups, k], ascending
    indices: torch.Tensor  # int64 [groups, n]
    objective: List[float]  # sum of squared errors: after seeding, then after each Lloyd iteration


def kmeans_plus_plus(x: torch.Tensor, k: int, weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeds [groups, k] for the rows of ``x`` [groups, n] (D^2 sampling, all rows at once).

    ``weights`` (0 or 1) excludes pruned values. A row whose kept values are all seeds already
    (fewer than k distinct values) repeats a seed.
    """
    groups, n = x.shape
    seeds = x.new_empty(groups, k)
    d2 = torch.ones_like(x)
    for j in range(k):
        cdf = (d2 * weights).cumsum(1)
        if not bool((cdf[:, -1] > 0).all()):  # every kept value is a seed already, or nothing is kept
            cdf = torch.where(cdf[:, -1:] > 0, cdf, (weights + (weights.sum(1, keepdim=True) == 0)).cumsum(1))
        u = torch.rand(groups, 1, generator=generator, dtype=x.dtype, device=x.device) * cdf[:, -1:]
        pick = torch.searchsorted(cdf, u, right=True).clamp_(max=n - 1)
        seeds[:, j:j + 1] = x.gather(1, pick)
        d2 = torch.minimum(d2, (x - seeds[:, j:j + 1]) ** 2) if j else (x - seeds[:, :1]) ** 2
    return seeds


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index [groups, n] of the nearest of the ascending ``centroids`` [groups, k] for each value of ``x``
    (a value exactly between two centroids takes the lower one)."""
    mids = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    return torch.searchsorted(mids.to(x.dtype), x.contiguous())


class _SortedValues:
    """The rows of ``x`` sorted once, with prefix sums of weight, w*x and w*x^2 (fp64), so one Lloyd
    iteration costs O(k log n): a cluster is the run of sorted values between two midpoints."""

    def __init__(self, x: torch.Tensor, weights: torch.Tensor):
        xs, order = x.sort(1)
        ws = weights.gather(1, order)
        zero = xs.new_zeros(xs.shape[0], 1)
        self.xs = xs
        self.prefix = [torch.cat([zero, v.cumsum(1)], 1) for v in (ws, ws * xs, ws * xs * xs)]

    def clusters(self, centroids: torch.Tensor):
        """Boundaries [groups, k-1] of the nearest-centroid clusters and their (count, sum, sum of squares)."""
        mids = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
        bounds = torch.searchsorted(self.xs, mids, right=True)
        n = self.xs.new_full((self.xs.shape[0], 1), self.xs.shape[1], dtype=torch.long)
        edges = torch.cat([torch.zeros_like(n), bounds, n], 1)
        return bounds, [p.gather(1, edges).diff(dim=1) for p in self.prefix]


def _sse(centroids, stats) -> float:
    count, total, squares = stats
    return float((squares - 2 * centroids * total + centroids**2 * count).clamp(min=0).sum())


def kmeans_1d(x: torch.Tensor, k: int, iters: int = 100, mask: Optional[torch.Tensor] = None,
              init: Optional[torch.Tensor] = None, seed: int = 0) -> KMeansFit:
    """Lloyd's algorithm on each row of ``x`` [groups, n] (fp64), seeded by k-means++ or by ``init``.

    Stops when no assignment changes or after ``iters`` iterations. The objective never increases:
    the nearest-centroid assignment and the mean update each lower it. A centroid left without
    members keeps its value. ``mask`` (bool, x's shape) leaves pruned values out.
    """
    weights = torch.ones_like(x, dtype=torch.float64) if mask is None else mask.reshape(x.shape).double()
    if init is None:
        generator = torch.Generator(device=x.device).manual_seed(seed)
        init = kmeans_plus_plus(x.float(), k, weights.float(), generator)
    centroids = init.double().reshape(x.shape[0], k).sort(1).values
    values = _SortedValues(x.double(), weights)
    bounds, stats = values.clusters(centroids)
    objective = [_sse(centroids, stats)]
    for _ in range(iters):
        count, total, _ = stats
        centroids = torch.where(count > 0, total / count.clamp(min=1), centroids)
        new, stats = values.clusters(centroids)
        objective.append(_sse(centroids, stats))
        if torch.equal(new, bounds):
            break
        bounds = new
    return KMeansFit(centroids, nearest(x.double(), centroids), objective)


def _as_weight(w, centroids, idx, bits, granularity, mask) -> KMeansWeight:
    codebook = centroids.float() if granularity == "channel" else centroids.float().reshape(-1)
    return KMeansWeight(codebook=codebook, indices=idx.reshape(w.shape).to(torch.uint8), bits=bits,
                        mask=None if mask is None else mask.clone())


def kmeans_weight(w: torch.Tensor, bits: int, granularity: str = "tensor", mask: Optional[torch.Tensor] = None,
                  init: Optional[torch.Tensor] = None, iters: int = 100, seed: int = 0) -> KMeansWeight:
    """Cluster a 2-D weight into 2^bits centroids per tensor or per row; ``init`` ([K] or [rows, K])
    warm-starts Lloyd instead of k-means++ (used for periodic re-clustering)."""
    groups = w.shape[0] if granularity == "channel" else 1
    fit = kmeans_1d(w.detach().reshape(groups, -1), 2**bits, iters, mask, init, seed)
    return _as_weight(w, fit.centroids, fit.indices, bits, granularity, mask)


def quantize_kmeans(w: torch.Tensor, spec: QuantSpec) -> KMeansWeight:
    return kmeans_weight(w, spec.bits, spec.granularity)


def bsflex_step(x: torch.Tensor, centroids: torch.Tensor, mask: Optional[torch.Tensor] = None):
    """One BS-Flex step on ``x`` [groups, n] with ascending ``centroids`` [groups, 2].

    Returns ``upper`` (bool [groups, n], True where the weight is nearer c2) and the new centroids
    [groups, 2], the means of the members (computed in fp64; an empty cluster keeps its centroid).
    """
    upper = x > centroids.mean(1, keepdim=True)
    return upper, _member_means(x, upper, mask, centroids)


def _member_means(x, upper, mask, fallback):
    """Means [groups, 2] of the kept weights below / above the split; an empty side keeps ``fallback``.
    Sums are fp64, so a cluster of equal values has exactly that value as its mean."""
    high = upper if mask is None else upper & mask.reshape(upper.shape)
    low = ~upper if mask is None else ~upper & mask.reshape(upper.shape)
    totals = torch.stack([torch.where(side, x, 0).sum(1, dtype=torch.float64) for side in (low, high)], 1)
    counts = torch.stack([low.sum(1), high.sum(1)], 1)
    return torch.where(counts > 0, totals / counts.clamp(min=1), fallback.double()).to(fallback.dtype)


def bsflex_init(x: torch.Tensor, mask: Optional[torch.Tensor] = None, iters: int = 30) -> torch.Tensor:
    """Centroids [groups, 2] of ``x`` [groups, n]: split at 0, then BS-Flex steps until no weight moves."""
    fallback = torch.stack([x.amin(1), x.amax(1)], 1)
    upper = x >= 0
    centroids = _member_means(x, upper, mask, fallback)
    for _ in range(iters):
        new, centroids = bsflex_step(x, centroids, mask)
        if torch.equal(new, upper):
            break
        upper = new
    return centroids


def quantize_bsflex(w: torch.Tensor, spec: QuantSpec) -> KMeansWeight:
    x = w.detach().float().reshape(w.shape[0] if spec.granularity == "channel" else 1, -1)
    centroids = bsflex_init(x)
    upper, _ = bsflex_step(x, centroids)
    return _as_weight(w, centroids, upper.long(), 1, spec.granularity, None)


register_method("kmeans", Method(KMeansWeight, (1, 8), quantize_kmeans, kmeans_storage_bits))
register_method("bsflex", Method(KMeansWeight, (1, 1), quantize_bsflex, kmeans_storage_bits))
