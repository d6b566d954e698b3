"""Quantized drop-in modules: one linear, one embedding, and the weight / activation fake-quantizers.

The modules keep fairseq's parameter names (``weight``, ``bias``), so a plain ``transformer``
state dict loads into them and theirs loads into a plain ``transformer``. ``weight`` is the latent
full-precision tensor; the forward pass uses its quantized value. ``state_dict()`` stores the
quantized value, so a saved checkpoint *is* the quantized model.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..quant import QuantizedWeight, QuantSpec, fake_quantize, fake_quantize_range, quantize


class WeightQuantizer(nn.Module):
    """Maps a latent weight to its fake-quantized value (straight-through gradients in training).

    Without gradients (validation, generation) the quantized weight is cached until the latent
    weight changes (tracked by its in-place version counter). Subclasses with their own training
    parametrization (k-means codebooks, pruning masks: modules/kmeans.py) override ``forward`` and
    the methods below; ``trains_latent = False`` freezes the latent weight (it gets no gradient).
    """

    trains_latent = True

    def __init__(self, spec: QuantSpec):
        super().__init__()
        self.spec = spec
        self._cache = None

    def quantized(self, w: torch.Tensor) -> QuantizedWeight:
        """The quantized weight object (codes and parameters) the packed export stores."""
        return quantize(w.detach(), self.spec)

    def storage_bits(self, w: torch.Tensor) -> int:
        """Packed size of the quantized ``w`` in bits."""
        return self.quantized(w).storage_bits()

    def state_dict_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The value saved as the module's ``weight`` in state dicts: the quantized weight."""
        return self(w)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and w.requires_grad:
            self._cache = None
            return fake_quantize(w, self.spec)
        key = (w.data_ptr(), w._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, fake_quantize(w.detach(), self.spec))
        return self._cache[1]

    def extra_repr(self):
        s = self.spec
        return f"{s.method}, bits={s.bits}, scheme={s.scheme}, granularity={s.granularity}"


class ActQuantizer(nn.Module):
    """Fake-quantizes activations to ``bits`` on a running [min, max] range (exponential average).

    The range is learned in training; a model that never trained with it (e.g. fine-tuned from a
    plain checkpoint and evaluated at once) uses each batch's own range.
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
        self.wq, self.act_in, self.act_out = wq, act_in, act_out

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
        self.wq = wq

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.embedding(tokens, self.quantized_weight(), self.padding_idx)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"
