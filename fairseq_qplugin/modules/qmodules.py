"""Quantized drop-in modules: one linear, one embedding, and the weight / activation fake-quantizers.

The modules keep fairseq's parameter names (``weight``, ``bias``), so a plain ``transformer``
state dict loads into them and theirs loads into a plain ``transformer``. ``weight`` is the latent
full-precision tensor; the forward pass uses its quantized value. ``state_dict()`` stores the
quantized value, so a saved checkpoint *is* the quantized model.
"""
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed import global_range
from ..quant import QuantizedWeight, QuantSpec, fake_quantize_range, quantize, quantize_bcq_rows
from ..quant.base import straight_through
from ..quant.bcq import bcq_storage_bits
from ..quant.mixed import mixed_storage_bits


class WeightQuantizer(nn.Module):
    """Maps a latent weight to its fake-quantized value (straight-through gradients in training).

    Without gradients (validation, generation) the quantized weight is cached until the latent
    weight changes (tracked by its in-place version counter). In training it is computed once per
    forward pass inside ``quantize_once_per_forward`` (a model's training forward), however many
    modules use it (tied embeddings and output projection), and at every use outside it.

    ``pnr`` (set by the pNR optimizer wrapper, ``optim/pnr.py``): the training forward uses the
    latent weight as is, in full precision; ``sync_`` replaces it in place by its quantized value.
    Evaluation and ``state_dict`` still see the quantized weight. A BCQ search warm-starts from the
    last sync's code (its scales: ``quantize_bcq``'s ``init_alpha``), so a sync never moves the weight
    farther than the distance to that code, and a resumed run (whose weights are codes) continues
    from the same ones.

    Subclasses with their own training parametrization (k-means codebooks, pruning masks:
    modules/kmeans.py) override ``forward`` and the methods below; ``trains_latent = False`` freezes
    the latent weight (it gets no gradient).
    """

    trains_latent = True

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self.pnr = False
        self._cache = None
        self._synced = None  # (data pointer, version) of the weight right after its last sync
        self._warm = None  # pNR, bcq: the scales of the last sync's code, the next search's starting point
        self._per_forward = None  # inside quantize_once_per_forward: {weight data pointer: quantized value}

    def quantized(self, w: torch.Tensor) -> QuantizedWeight:
        """The quantized weight object (codes and parameters) of a 2-D tensor: what the packed export stores."""
        return quantize(w.detach(), self.spec, self._warm)

    def average_bits(self) -> float:
        """Bits per weight of the codes alone (without scales)."""
        return float(self.spec.bits)

    def storage_bits(self, w: torch.Tensor) -> int:
        """``self.quantized(w).storage_bits()``; computed from the shape alone for BCQ (no slow search)."""
        if self.spec.method == "bcq":
            return bcq_storage_bits(tuple(w.shape), self.spec)
        return self.quantized(w).storage_bits()

    def fake_quantize(self, w: torch.Tensor) -> torch.Tensor:
        """The quantized value of ``w`` with a straight-through gradient (training without pNR)."""
        memo = self._per_forward
        wq = None if memo is None else memo.get(w.data_ptr())
        if wq is None:
            wq = self.quantized(w).dequantize().to(w.dtype)
            if memo is not None:
                memo[w.data_ptr()] = wq
        return self.straight_through(w, wq)

    def straight_through(self, w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        return straight_through(w, wq, self.spec)

    def state_dict_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The value saved as the module's ``weight`` in state dicts: the quantized weight."""
        return self(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and w.requires_grad:
            self._cache = self._synced = None  # a training step follows (which may update w through w.data)
            if self.pnr and self._warm is None and self.spec.method == "bcq":
                self._warm = self.quantized(w).alpha  # of the starting weight's code (exactly it after a resume)
            return w if self.pnr else self.fake_quantize(w)
        key = (w.data_ptr(), w._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.quantized(w).dequantize().to(w.dtype))
        return self._cache[1]

    @torch.no_grad()
    def sync_(self, w: torch.Tensor):
        """pNR projection: overwrite ``w`` with its quantized value (which is then also the cached one).
        A weight left unchanged since its last sync (no training forward, same version) is skipped."""
        if self._synced == (w.data_ptr(), w._version):
            return
        qw = self.quantized(w)
        w.copy_(qw.dequantize().to(w.dtype))
        if self._warm is not None:  # a bcq quantizer in pNR mode, set up by its first training forward
            self._warm = qw.alpha
        self._synced = (w.data_ptr(), w._version)
        self._cache = (self._synced, w.detach())

    def extra_repr(self):
        s = self.spec
        if s.method == "bcq":
            kind = f"bcq, bits={s.bits}, granularity={s.granularity}, search={s.search}"
            kind += f", group_size={s.group_size}" if s.group_size else ""
        else:
            kind = f"{s.method}, bits={s.bits}, scheme={s.scheme}, granularity={s.granularity}"
        return kind + (", pnr" if self.pnr else "")


class RowBitsQuantizer(WeightQuantizer):
    """BCQ with its own bit count per row (frequency-mixed embeddings and output projections).

    ``row_bits``: int8 [rows] in 1..spec.bits (a buffer: it follows the module's device, and is not
    saved since it is rebuilt from the dictionary). Straight-through gradient: the identity.
    """

    def __init__(self, spec: QuantSpec, row_bits: torch.Tensor):
        super().__init__(spec)
        self.register_buffer("row_bits", row_bits.to(torch.int8), persistent=False)

    def quantized(self, w: torch.Tensor) -> QuantizedWeight:
        return quantize_bcq_rows(w.detach(), self.row_bits, self.spec, self._warm)

    def average_bits(self) -> float:
        return self.row_bits.float().mean().item()

    def storage_bits(self, w: torch.Tensor) -> int:
        return mixed_storage_bits(self.row_bits, w.shape[1], self.spec.group_size)

    def straight_through(self, w: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
        return wq + (w - w.detach()) if w.requires_grad else wq

    def extra_repr(self):
        counts = torch.bincount(self.row_bits.long(), minlength=self.spec.bits + 1).tolist()
        per_bits = ", ".join(f"{n}x{b}" for b, n in reversed(list(enumerate(counts))) if n)
        return f"{super().extra_repr()}, rows at bits: {per_bits} ({self.average_bits():.2f} average)"


QUANTIZER_ATTR = "qplugin_quantizer"


def quantizer_of(param: torch.Tensor) -> Optional[WeightQuantizer]:
    """The WeightQuantizer of a quantized module's weight Parameter, or None.

    QuantLinear and QuantEmbedding tag their weight Parameter with its quantizer (like fairseq's
    ``param.param_group`` tags), so code that only sees parameters, such as an optimizer, can
    reach it.
    """
    return getattr(param, QUANTIZER_ATTR, None)


@torch.no_grad()
def sync_pnr_weights_(params) -> int:
    """Replace every pNR-mode quantized weight among ``params`` by its quantized value; return how many."""
    synced = 0
    for p in params:
        wq = quantizer_of(p)
        if wq is not None and wq.pnr:
            wq.sync_(p)
            synced += 1
    return synced


@contextmanager
def quantize_once_per_forward(module: nn.Module):
    """For one training forward pass of ``module``: each of its weight quantizers quantizes its weight
    once and reuses the value (a weight tied between the embeddings and the output projection is
    otherwise quantized three times). The weights change at the next update, so only one pass."""
    quantizers = [m for m in module.modules() if isinstance(m, WeightQuantizer)]
    for wq in quantizers:
        wq._per_forward = {}
    try:
        yield
    finally:
        for wq in quantizers:
            wq._per_forward = None


class ActQuantizer(nn.Module):
    """Fake-quantizes activations to ``bits`` on a running [min, max] range (exponential average).

    The range is learned in training; a model that never trained with it (e.g. fine-tuned from a
    plain checkpoint and evaluated at once) uses each batch's own range. In data-parallel training
    a training batch's range is all-reduced over the ranks (one tiny all-reduce per quantizer and
    forward), so every rank holds the same range: the combined batch's.
    """

    def __init__(self, bits: int, momentum: float = 0.95):
        super().__init__()
        self.bits, self.momentum = bits, momentum
        self.register_buffer("running_min", torch.zeros(()))
        self.register_buffer("running_max", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.detach().min().float(), x.detach().max().float()
        if self.training:
            lo, hi = global_range(lo, hi)
            if self.initialized:
                m = self.momentum
                lo = self.running_min * m + lo * (1 - m)
                hi = self.running_max * m + hi * (1 - m)
            self.running_min.copy_(lo)
            self.running_max.copy_(hi)
            self.initialized.fill_(True)
        elif self.initialized:
            lo, hi = self.running_min, self.running_max
        return fake_quantize_range(x, lo, hi, self.bits)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        """A checkpoint trained without activation quantization has no range yet: start without one."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        own = {prefix + name for name in self._buffers}
        missing[:] = [k for k in missing if k not in own]

    def extra_repr(self):
        return f"bits={self.bits}"


class _QuantizedWeightMixin:
    """Forward uses ``self.wq(self.weight)``; ``state_dict`` saves the quantized weight."""

    def _attach(self, wq: WeightQuantizer):
        self.wq = wq
        setattr(self.weight, QUANTIZER_ATTR, wq)

    def quantized_weight(self) -> torch.Tensor:
        return self.wq(self.weight)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        with torch.no_grad():
            destination[prefix + "weight"] = self.wq.state_dict_weight(self.weight.detach()).clone()


class QuantLinear(_QuantizedWeightMixin, nn.Module):
    """``nn.Linear`` with a quantized weight and optionally quantized input or output activations.

    Built from an existing ``nn.Linear`` whose Parameter objects it reuses (so weight ties survive).
    ``wq`` may be shared with a tied embedding so that both use one quantized matrix.
    """

    def __init__(self, linear: nn.Linear, wq: WeightQuantizer, act_in: Optional[ActQuantizer] = None,
                 act_out: Optional[ActQuantizer] = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.act_in, self.act_out = act_in, act_out
        self._attach(wq)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_in is not None:
            x = self.act_in(x)
        y = F.linear(x, self.quantized_weight(), self.bias)
        return self.act_out(y) if self.act_out is not None else y

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantEmbedding(_QuantizedWeightMixin, nn.Module):
    """``nn.Embedding`` whose lookup table is quantized (one scale per row = per word)."""

    def __init__(self, embedding: nn.Embedding, wq: WeightQuantizer):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight
        self._attach(wq)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.quantized_weight(), self.padding_idx)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"
