"""Weight quantizers with learned quantization parameters (docs/methods.md, "Learned quantization
parameters").

- ``LearnedBCQQuantizer`` (``transformer_bcq --bcq-learn-scales``): BCQ ``W_q = sum_k alpha_k B_k`` whose
  scales are trained by the loss: the forward is differentiable in alpha (``dW_q / d alpha_k = B_k``)
  and straight-through to the latent weight. The binary codes are re-searched every
  ``research_every`` updates: with the current learned scales held fixed, each weight takes the
  nearest of the 2^k level sums ``sum_k +-alpha_k`` of its row (and group). Between re-searches the
  codes stay fixed.
- ``LSQQuantizer`` (``transformer_int8 --quant-learn-scale``): Learned Step Size Quantization (Esser
  et al., "Learned Step Size Quantization", 2020) of symmetric int weights: one step per output row
  (or tensor), initialised from the range-based scale ``max|w| / (2^(b-1) - 1)``,
  ``W_q = clamp(round(w / s), -Q, Q) * s`` with Q = 2^(b-1) - 1, the latent weight's gradient passed
  inside the clipping range and the step's gradient ``round(w/s) - w/s`` (inside) or ``+-Q`` (outside)
  times LSQ's gradient scale ``1 / sqrt(N Q)``, N the weights per step.

Both keep a scale as ``init * exp(delta / init)`` (``scales``, ``step``): ``<name>_init`` is a buffer,
set from a search of the latent weight on first use (as ``KMeansQuantizer`` keeps its centroids,
initialisation never writes into a Parameter an optimizer wrapper may have copied); ``<name>_delta`` is
the trained Parameter, starting at 0. Near the start this is ``init + delta``: ``d scale / d delta =
exp(delta / init)`` is 1 there, so Adam moves a scale by about the learning rate per step, as it moves
the weights (LSQ's balance of step and weight updates); unlike ``init + delta`` it never reaches zero
or changes sign (an additive step drove int steps of the test model through zero within 20 updates
at lr 3e-3, with NaN gradients). A scale of 0 (a BCQ row's unused bits) stays 0. The
forward uses the scale rounded to the values the bcq / int formats store exactly (16 significant
bits; the gradient passes the rounding unchanged), so the saved and packed code (``search``: the
current state, no search) reproduces the training forward's weight bit for bit.
"""
import math
from typing import Optional, Sequence

import torch
from torch import nn

from ..quant import QuantSpec, quantize, straight_through
from ..quant.bcq import BCQWeight, bcq_decode, nearest_codes, round_significand
from ..quant.linear import IntWeight, int_decode, truncate_scale
from ..quant.mixed import MixedBCQWeight
from .kmeans import MaskedWeightQuantizer
from .qmodules import WeightQuantizer


def learned(init: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``init * exp(delta / init)`` (module doc); 0 where ``init`` is 0."""
    safe = torch.where(init == 0, torch.ones_like(init), init)
    return init * torch.exp(delta / safe)


def rounded(x: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """``exact`` (a rounding of ``x``) in the forward pass, the identity gradient to ``x``."""
    return x + (exact - x.detach())


class LearnedBCQQuantizer(MaskedWeightQuantizer):
    """BCQ with trained scales. ``planes``: bool [bits, rows, cols] (True = +1; saved once, bit-packed in the
    code ``wq.code.*``);
    ``alpha_init``, ``alpha_delta``: [bits, rows, groups]; ``row_bits`` (optional, int8 [rows]): a
    bit count per row as ``RowBitsQuantizer``'s, the scales past a row's bits held at 0."""

    state_groups = (("planes", "alpha_init", "alpha_delta", "initialized"),)
    code_state = ("planes",)

    def __init__(self, spec: QuantSpec, shape: Sequence[int], row_bits: Optional[torch.Tensor] = None,
                 research_every: int = 1):
        super().__init__(spec, shape)
        rows, cols = self.shape
        groups = cols // spec.group_size if spec.group_size else 1
        self.row_bits = None if row_bits is None else row_bits.to(torch.int8)  # WeightQuantizer's buffer
        self.register_buffer("planes", torch.zeros(spec.bits, *self.shape, dtype=torch.bool))
        self.register_buffer("alpha_init", torch.zeros(spec.bits, rows, groups))
        self.alpha_delta = nn.Parameter(torch.zeros(spec.bits, rows, groups))
        self.research_every = research_every
        self.researches = 0  # code re-searches done (tests count them)
        self._researched_at = None

    # -- state ------------------------------------------------------------------------------------
    def used(self) -> Optional[torch.Tensor]:
        """bool [bits, rows, 1]: the scales a row uses (None: all)."""
        if self.row_bits is None:
            return None
        return (torch.arange(self.spec.bits, device=self.planes.device)[:, None] < self.row_bits.long())[..., None]

    def scales(self) -> torch.Tensor:
        """The learned scales as the forward uses them (differentiable): rounded to 16 significant bits,
        0 past a row's bits."""
        alpha = learned(self.alpha_init, self.alpha_delta)
        alpha = rounded(alpha, round_significand(alpha.detach()))
        used = self.used()
        return alpha if used is None else alpha * used

    def initialize(self, w: torch.Tensor):
        """The searched code of ``w`` (the spec's search), its scales the starting point of the learned ones."""
        qw = WeightQuantizer.search(self, w)  # the spec's search (with the row bits)
        self.alpha_init.copy_(qw.alpha.to(self.alpha_init))  # alpha_delta is 0 here: as built, or not loaded
        self.planes.copy_(qw.planes)

    def research(self, w: torch.Tensor):
        """Each weight takes the nearest level sum of its row's (and group's) current scales."""
        alpha = self.scales().detach().double()
        bits, rows, groups = alpha.shape
        size = self.shape[1] // groups
        x = w.detach().double().reshape(rows * groups, size)
        alpha = alpha.reshape(bits, rows * groups)
        row_bits = torch.full((rows,), bits) if self.row_bits is None else self.row_bits.long().cpu()
        planes = torch.zeros(bits, rows * groups, size, dtype=torch.bool, device=x.device)
        for k in row_bits.unique().tolist():
            idx = (row_bits == k).nonzero().squeeze(1)
            idx = (idx[:, None] * groups + torch.arange(groups)).reshape(-1).to(x.device)
            planes[:k, idx] = nearest_codes(x[idx], alpha[:k, idx])
        self.planes.copy_(planes.reshape(bits, *self.shape))
        self.researches += 1

    # -- the protocol ------------------------------------------------------------------------------
    def prepare(self, w: torch.Tensor):
        super().prepare(w)
        n = self.num_updates
        if n % self.research_every == 0 and self._researched_at != n:
            self.research(w)
            self._researched_at = n

    def train_value(self, w: torch.Tensor) -> torch.Tensor:
        wq = self.once_per_forward(w, lambda: bcq_decode(self.planes, self.scales(), self.shape[1]).to(w.dtype))
        return straight_through(w, wq, self.gate(w))

    def search(self, w: torch.Tensor):
        """The current code: the stored planes and the learned scales (no search)."""
        self._ensure_ready(w)
        planes, alpha = self.planes.clone(), self.scales().detach().float()
        group_size = self.spec.group_size
        if self.row_bits is None:
            return BCQWeight(planes=planes, alpha=alpha, group_size=group_size)
        return MixedBCQWeight(planes=planes, alpha=alpha, group_size=group_size, row_bits=self.row_bits.clone())

    def extra_repr(self):
        s = self.spec
        rows = "" if self.row_bits is None else f", row bits {self.average_bits():.2f} average"
        return (f"bcq, bits={s.bits}, group_size={s.group_size}, learned scales, codes re-searched every "
                f"{self.research_every} updates{rows}")


class LSQQuantizer(MaskedWeightQuantizer):
    """Symmetric int weights with a learned step (LSQ). ``step_init``, ``step_delta``: [rows or 1, 1]."""

    state_groups = (("step_init", "step_delta", "initialized"),)

    def __init__(self, spec: QuantSpec, shape: Sequence[int]):
        super().__init__(spec, shape)
        steps = (self.shape[0], 1) if spec.granularity == "channel" else (1, 1)
        self.register_buffer("step_init", torch.ones(steps))
        self.step_delta = nn.Parameter(torch.zeros(steps))
        self.levels = 2 ** (spec.bits - 1) - 1  # Q: codes -Q..Q around the zero point 2^(b-1)
        per_step = self.shape[1] if spec.granularity == "channel" else self.shape[0] * self.shape[1]
        self.grad_scale = 1 / math.sqrt(per_step * self.levels)

    def initialize(self, w: torch.Tensor):
        qw = quantize(w, self.spec)
        self.step_init.copy_(qw.scale.to(self.step_init))  # step_delta is 0 here: as built, or not loaded

    def step(self) -> torch.Tensor:
        """The learned step as the forward uses it (differentiable): rounded down to 16 significant bits
        (the int format's exact scales), at least 2^-100."""
        s = learned(self.step_init, self.step_delta)
        return rounded(s, truncate_scale(s.detach().clamp(min=2.0**-100)))

    def codes(self, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (torch.round(w.detach().float() / s.detach()) + (self.levels + 1)).clamp(1, 2 * self.levels + 1)

    def train_value(self, w: torch.Tensor) -> torch.Tensor:
        """The exact quantized value, with LSQ's gradients (through the surrogate ``v * s``)."""
        s = self.step()
        value = int_decode(self.codes(w, s), s.detach(), torch.tensor(self.levels + 1)).to(w.dtype)
        scaled = rounded(s * self.grad_scale, s.detach())  # forward s, gradient times the LSQ scale
        v = (w / scaled).clamp(-self.levels, self.levels)
        surrogate = rounded(v, torch.round(v.detach())) * scaled
        return value + (surrogate - surrogate.detach()).to(w.dtype)

    def search(self, w: torch.Tensor) -> IntWeight:
        """The current code: the latent weight rounded with the learned step (no range search)."""
        self._ensure_ready(w)
        s = self.step().detach().float()
        codes = self.codes(w, s).to(torch.uint8)
        return IntWeight(codes=codes, scale=s, zero_point=torch.full_like(s, self.levels + 1, dtype=torch.int32),
                         bits=self.spec.bits)

    def extra_repr(self):
        s = self.spec
        return f"int, bits={s.bits}, scheme=sym, granularity={s.granularity}, learned step (LSQ)"
