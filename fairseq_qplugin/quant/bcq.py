"""Binary-code quantization (BCQ): ``W ~= sum_k diag(alpha_k) B_k``, B_k in {-1, +1} (docs/methods.md §3).

The bit-planes ``B_k`` are the object the packed export stores (8 weights per byte) and the
lookup-table GEMM consumes. Scales are one per output row and bit, or one per row, bit and group of
``group_size`` input columns. One bit is the sign binarization of Fan 2019, Eq. 5 with a scale
``alpha = mean|W|`` per row (or per tensor), which is what makes a 1-bit model usable.

- Greedy (Chung et al. 2020): R = W; for k in 1..q: B_k = sign(R) (0 -> +1), alpha_k = mean|R|,
  R -= alpha_k B_k.
- Alternating (Xu et al. 2018), from the greedy start: alphas <- least squares given the B_k
  (per row and group, ``(B^T B) alpha = B^T w``); B <- for each weight the nearest of the 2^q values
  ``sum_k +-alpha_k``; repeat until no code changes or ``rounds`` rounds. Neither step can raise the
  error, so alternating is never worse than greedy. At 1 bit both are ``sign(W) * mean|W|``.

From 2 bits up, scales are rounded to 16 significant bits, so every sum of +-alphas is exact in fp32,
and a row that already is a q-bit code (e.g. of a saved quantized checkpoint) is decoded exactly
(``decode_levels``) and re-quantizes to itself, bit for bit, whenever each of its 2^q levels, or the
level's negative, occurs in it: always in practice for rows of 256 or more weights, while in short
rows or groups at 4 bits a few may not (those are quantized afresh).
"""
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import QuantConfigError
from .base import Method, QuantizedWeight, QuantSpec, register_method


@dataclass
class BCQWeight(QuantizedWeight):
    """planes: bool [q, rows, cols] (True = +1); alpha: fp32 [q, rows or 1, groups];
    group_size: columns per scale (0: one scale per row, groups = 1)."""

    method = "bcq"
    planes: torch.Tensor
    alpha: torch.Tensor
    group_size: int = 0

    @property
    def shape(self):
        return tuple(self.planes.shape[1:])

    @property
    def bits(self) -> int:
        return self.planes.shape[0]

    def dequantize(self) -> torch.Tensor:
        return bcq_decode(self.planes, self.alpha, self.shape[1]).to(self.dtype)

    def storage_bits(self) -> int:
        return self.planes.numel() + self.alpha.numel() * 16

    def validate(self):
        q, rows, cols = self.planes.shape
        groups = cols // self.group_size if self.group_size else 1
        ok = self.planes.dtype == torch.bool and self.alpha.shape in ((q, rows, groups), (q, 1, 1))
        if not ok or (self.group_size and groups * self.group_size != cols):
            raise QuantConfigError(
                f"bcq weight: alpha {tuple(self.alpha.shape)} (group size {self.group_size}) does not fit "
                f"planes {tuple(self.planes.shape)}"
            )


def expand_groups(alpha: torch.Tensor, cols: int) -> torch.Tensor:
    """alpha [q, rows, groups] -> [q, rows, cols or 1]: each group covers cols / groups columns."""
    groups = alpha.shape[-1]
    return alpha if groups == 1 else alpha.repeat_interleave(cols // groups, dim=-1)


def bcq_decode(planes: torch.Tensor, alpha: torch.Tensor, cols: int) -> torch.Tensor:
    """The bcq format's one dequantize rule: planes (bool or 0/1) [q, rows, cols], alpha [q, rows or 1,
    groups] -> fp32 ``sum_k alpha_k * (2 * bit_k - 1)`` (also of packed rows and the kernels' reference)."""
    return ((planes.float() * 2 - 1) * expand_groups(alpha.float(), cols)).sum(0)


def bcq_storage_bits(shape, spec: QuantSpec, row_bits: Optional[torch.Tensor] = None) -> int:
    """``storage_bits()`` of a [rows, cols] weight quantized with ``spec`` (and ``row_bits``, quant/mixed.py),
    without quantizing it."""
    rows, cols = shape
    groups = cols // spec.group_size if spec.group_size else 1
    if row_bits is not None:  # planes and fp16 alphas for each row's own bits, 8 bits per row for its count
        return int(row_bits.long().sum()) * (cols + groups * 16) + 8 * rows
    return spec.bits * (rows * cols + (rows * groups if spec.granularity == "channel" else 1) * 16)


def round_significand(x: torch.Tensor, bits: int = 16) -> torch.Tensor:
    """Round to the nearest value with ``bits`` significant bits (sums of a few such values are exact)."""
    mantissa, exponent = torch.frexp(x)
    return torch.ldexp(torch.round(mantissa * 2.0**bits) / 2.0**bits, exponent)


def greedy(x: torch.Tensor, bits: int):
    """x: fp64 [n, size] (one row or group each) -> planes bool [q, n, size], alpha fp64 [q, n]."""
    residual, planes, alphas = x, [], []
    for _ in range(bits):
        plane = residual >= 0
        alpha = residual.abs().mean(-1).float().double()  # fp32 scale, so 1 bit matches sign * mean|W| exactly
        residual = residual - (plane.double() * 2 - 1) * alpha[:, None]
        planes.append(plane)
        alphas.append(alpha)
    return torch.stack(planes), torch.stack(alphas)


def least_squares_alpha(x: torch.Tensor, planes: torch.Tensor) -> torch.Tensor:
    """The scales minimizing ||x - sum_k alpha_k B_k||^2 for fixed planes, per row: fp64 [q, n].

    Solves ``(B^T B) alpha = B^T x`` (B^T B holds exact integers); a singular B^T B (repeated planes,
    constant rows) gets the minimum-norm solution.
    """
    signs = planes.float() * 2 - 1  # [q, n, size]
    rhs = torch.einsum("qns,ns->nq", signs.double(), x)
    gram = torch.einsum("qns,pns->nqp", signs, signs).double()
    return (torch.linalg.pinv(gram, hermitian=True) @ rhs[..., None])[..., 0].T


def nearest_codes(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """For each weight of x [n, size], the planes (bool [q, n, size]) of the nearest of the 2^q levels
    ``sum_k +-alpha_k`` of its row, alpha [q, n]."""
    q = alpha.shape[0]
    code = torch.arange(2**q, device=x.device)
    bit = (code[:, None] >> torch.arange(q, device=x.device)) & 1  # [2^q, q]: bit k of code c = plane k
    levels, order = (alpha.T @ (bit.double() * 2 - 1).T).sort(-1)  # [n, 2^q]
    mids = (levels[:, 1:] + levels[:, :-1]) / 2
    rank = torch.zeros(x.shape, dtype=torch.long, device=x.device)
    for j in range(mids.shape[1]):  # the number of midpoints <= x: 2-6x faster than searchsorted at 2^q <= 16
        rank += x >= mids[:, j : j + 1]
    chosen = order.gather(1, rank)
    return torch.stack([(chosen >> k) & 1 == 1 for k in range(q)])


def alternate(x: torch.Tensor, planes: torch.Tensor, rounds: int):
    """Alternating refinement from ``planes``; returns planes and their least-squares alphas."""
    alpha = least_squares_alpha(x, planes)
    for _ in range(rounds):
        new = nearest_codes(x, alpha)
        if torch.equal(new, planes):
            break
        planes, alpha = new, least_squares_alpha(x, new)
    return planes, alpha


def decode_levels(x: torch.Tensor, bits: int):
    """Recover the exact code of the rows of x (fp64 [n, size]) whose values and their negatives make
    exactly 2^q levels (the level set of a code is symmetric, so a level missing from a row is
    recovered when its negative is there).

    With positive scales, the levels are ``L = L' + {-a, +a}`` where a is the smallest scale and L' the
    levels of the other q - 1 bits: a = (max L - second largest) / 2, and pairing each top remaining
    level m with m - 2a gives L'; q such steps leave {0}. Returns the indices of the rows this
    reproduces (to 2^-20 of their largest value; a row of 2^q levels that is no code fails this
    check), their planes bool [q, solved, size] and alphas fp64 [q, solved].
    """
    levels = 2**bits
    head = x[:, : 4 * levels].abs().sort(-1).values  # a code has at most 2^(q-1) magnitudes: a cheap first test
    rows = ((head[:, 1:] != head[:, :-1]).sum(-1) < levels // 2).nonzero().squeeze(1)
    values = torch.cat([x[rows], -x[rows]], 1).sort(-1).values
    new = torch.cat([torch.ones_like(values[:, :1], dtype=torch.bool), values[:, 1:] != values[:, :-1]], 1)
    full = new.sum(-1) == levels
    rows, level = rows[full], values[full][new[full]].reshape(-1, levels)  # ascending
    picked = torch.arange(len(rows), device=x.device)
    alpha = x.new_zeros(bits, len(rows))
    for k in range(bits - 1, -1, -1):
        a = (level[:, -1] - level[:, -2]) / 2
        left, upper = torch.ones_like(level, dtype=torch.bool), []
        for _ in range(level.shape[1] // 2):
            top = torch.where(left, level, -torch.inf).argmax(-1)
            left[picked, top] = False
            m = level[picked, top]
            left[picked, torch.where(left, (level - (m - 2 * a)[:, None]).abs(), torch.inf).argmin(-1)] = False
            upper.append(m - a)
        level, alpha[k] = torch.stack(upper[::-1], 1), a
    x = x[rows]
    planes = nearest_codes(x, alpha)
    error = ((planes.double() * 2 - 1) * alpha[..., None]).sum(0) - x
    ok = error.abs().amax(-1) <= x.abs().amax(-1) * 2.0**-20
    return rows[ok], planes[:, ok], alpha[:, ok]


def levels_recoverable(planes: torch.Tensor) -> torch.Tensor:
    """Per row of planes bool [q, n, size]: whether its codes and their negatives make all 2^q codes, so that
    ``decode_levels`` recovers the code from the dequantized values."""
    q = planes.shape[0]
    code = sum(planes[k].long() << k for k in range(q))
    used = torch.zeros(code.shape[0], 2**q, dtype=torch.bool, device=code.device).scatter_(1, code, True)
    return (used | used.flip(1)).all(1)


def row_errors(x: torch.Tensor, planes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Squared error of each row of x [n, size] against its code (planes [q, n, size], alpha [q, n])."""
    return (((planes.double() * 2 - 1) * alpha[..., None]).sum(0) - x).square().sum(-1)


def quantize_bcq(w: torch.Tensor, spec: QuantSpec, init_alpha: Optional[torch.Tensor] = None,
                 fresh: bool = True) -> BCQWeight:
    """Greedy or alternating BCQ of each row (or group, or the whole tensor); from 2 bits up, a row that
    already is a q-bit code is decoded exactly instead (see ``decode_levels``).

    ``init_alpha``: the scales of an earlier code of the same tensor (a pNR sync's). Alternating then
    also starts from the nearest codes for them, and each row keeps the better of the two results, so
    the new code is never farther from ``w`` than the old one is. Greedy alone does not have this
    property near a code: the levels of an alternating code are not ordered as greedy assumes, and a
    fresh search from a slightly moved code typically lands on a worse one (on the demo model at 3
    bits, 0.19 -> 0.25 relative error). ``fresh=False`` (with ``init_alpha``, alternating search,
    3 bits and more; below, a fresh search alone, ``init_alpha`` unused):
    the warm start alone, at the cost of one search, except for rows whose warm code leaves levels
    unused (searched fresh, as ``decode_levels`` could not recover that code from its values);
    straight-through training carries the scales from update to update this way, so its codes
    approach those of a full alternating search."""
    x = w.double() if spec.granularity == "channel" else w.double().reshape(1, -1)
    cols = x.shape[1]
    size = spec.group_size or cols
    if cols % size:
        raise QuantConfigError(f"bcq group size {size} does not divide the {cols} input columns")
    x = x.reshape(-1, size)  # one set of scales per row and group
    q = spec.bits
    if init_alpha is not None and init_alpha.numel() != q * len(x):
        raise QuantConfigError(f"bcq init: alpha {tuple(init_alpha.shape)} does not fit {q} bits "
                               f"over {len(x)} rows and groups")
    if not fresh and q < 3:  # 2 rounds from greedy already near the fixed point; carried: -0.7 BLEU at 2 bits
        init_alpha = None
    planes, alpha = torch.zeros(q, *x.shape, dtype=torch.bool, device=x.device), x.new_zeros(q, len(x))
    todo = torch.arange(len(x), device=x.device)
    if q > 1:
        solved, planes_solved, alpha_solved = decode_levels(x, q)
        planes[:, solved], alpha[:, solved] = planes_solved, alpha_solved
        todo = todo[~torch.isin(todo, solved)]
    alternating, warm = spec.search == "alternating" and q > 1, None
    if init_alpha is not None and alternating and len(todo):
        part = x[todo]
        warm = alternate(part, nearest_codes(part, init_alpha.double().reshape(q, -1)[:, todo]), spec.rounds)
        if not fresh:  # a row whose code leaves levels unused is searched fresh (decode_levels cannot recover it)
            keep = levels_recoverable(warm[0])
            planes[:, todo[keep]], alpha[:, todo[keep]] = warm[0][:, keep], warm[1][:, keep]
            todo, warm = todo[~keep], None
    if len(todo):
        part = x[todo]
        found = greedy(part, q)
        if alternating:
            found = alternate(part, found[0], spec.rounds)
        if warm is not None:
            better = row_errors(part, *warm) < row_errors(part, *found)
            found[0][:, better], found[1][:, better] = warm[0][:, better], warm[1][:, better]
        planes[:, todo], alpha[:, todo] = found
    if q > 1:  # one form per code, as decode_levels gives it: scales positive and falling
        planes ^= alpha[..., None] < 0
        alpha, order = round_significand(alpha).abs().sort(dim=0, descending=True, stable=True)
        planes = planes.gather(0, order[..., None].expand_as(planes))
    return BCQWeight(planes=planes.reshape(spec.bits, *w.shape),
                     alpha=alpha.float().reshape(spec.bits, -1, cols // size), group_size=spec.group_size)


register_method("bcq", Method(BCQWeight, (1, 4), quantize_bcq, bcq_storage_bits))
