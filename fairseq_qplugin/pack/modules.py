"""Inference modules over packed weights: ``PackedLinear`` and ``PackedEmbedding``.

Both hold their weight in a ``PackedParams`` submodule named ``wq`` (as the fake-quant modules
name their quantizer), whose buffers are the packed tensors: state-dict keys are
``<module>.wq.<field>`` (``codes``/``planes``/``indices``, ``scale``/``alpha``/``codebook``, ...).
An embedding and the output projection tied to it share one ``PackedParams``. No fp32 weight
matrix exists: the kernels (kernels.py) read the packed buffers.
"""
from dataclasses import MISSING, fields
from typing import Optional

import torch
from torch import nn

from ..errors import QuantConfigError
from ..modules import ActQuantizer
from . import int8
from ..quant.packed import PackedWeight, packed_formats, packed_from_dict
from .kernels import packed_embedding, packed_linear


class PackedParams(nn.Module):
    """The packed tensors of one weight, as buffers; loading validates them (``from_dict``).

    Buffers take the shapes and dtypes of the loaded tensors: the module is built from the method
    alone and is ready once a state dict is loaded.
    """

    def __init__(self, method: str, shape):
        super().__init__()
        formats = packed_formats()
        if method not in formats:
            raise QuantConfigError(f"unknown packed method {method!r}; known: {sorted(formats)}")
        self.method, self.shape = method, tuple(shape)
        self.names = [f.name for f in fields(formats[method])]
        self.required = [f.name for f in fields(formats[method]) if f.default is MISSING]
        for name in self.names:
            self.register_buffer(name, torch.zeros(0) if name in self.required else None)
        self._packed: Optional[PackedWeight] = None

    @property
    def packed(self) -> PackedWeight:
        if self._packed is None:
            d = {n: getattr(self, n) for n in self.names if getattr(self, n) is not None}
            self._packed = packed_from_dict(self.method, d)
        return self._packed

    def set_packed(self, pw: PackedWeight):
        for name, t in pw.as_dict().items():
            setattr(self, name, t)
        self._packed = pw

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        found = {n: state_dict[prefix + n] for n in self.names if prefix + n in state_dict}
        absent = [prefix + n for n in self.required if n not in found]
        if absent:
            missing.extend(absent)
            return
        try:
            pw = packed_from_dict(self.method, found)
        except QuantConfigError as e:
            raise QuantConfigError(f"{prefix.rstrip('.')}: {e}") from None
        if tuple(pw.shape) != self.shape:
            raise QuantConfigError(f"{prefix.rstrip('.')}: packed weight is {list(pw.shape)}, "
                                   f"the model needs {list(self.shape)}")
        self.set_packed(pw)

    def extra_repr(self):
        return f"{self.method}, shape={list(self.shape)}"


class PackedLinear(nn.Module):
    """``nn.Linear`` over a packed weight, with the fake-quant model's optional activation quantizers.

    ``int8_kernel``: "fbgemm" runs 8-bit ``int`` weights through torch's int8 GEMM (int8.py; packed
    once, on the first call), "dequant" through the exact dequantize + BLAS kernel.
    """

    def __init__(self, in_features: int, out_features: int, wq: PackedParams, bias: Optional[nn.Parameter],
                 act_in: Optional[ActQuantizer] = None, act_out: Optional[ActQuantizer] = None,
                 int8_kernel: str = "fbgemm"):
        super().__init__()
        if int8_kernel not in int8.KERNELS:
            raise QuantConfigError(f"unknown int8 kernel {int8_kernel!r}; choose one of {int8.KERNELS}")
        self.in_features, self.out_features = in_features, out_features
        self.wq, self.bias, self.act_in, self.act_out = wq, bias, act_in, act_out
        self.int8_kernel = int8_kernel
        self._int8 = None  # (packed weight, bias version, engine's packed weight or None)

    def _int8_packed(self, pw: PackedWeight):
        version = None if self.bias is None else self.bias._version
        if self._int8 is None or self._int8[0] is not pw or self._int8[1] != version:
            self._int8 = (pw, version, int8.prepack(pw, self.bias))
        return self._int8[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_in is not None:
            x = self.act_in(x)
        pw = self.wq.packed
        packed = self._int8_packed(pw) if self.int8_kernel == "fbgemm" and int8.supported(pw) else None
        if packed is not None:
            y = int8.int8_linear(x, packed)
        else:
            y = packed_linear(x, pw, self.bias)
        return self.act_out(y) if self.act_out is not None else y

    def extra_repr(self):
        s = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        return s + (f", int8_kernel={self.int8_kernel}" if self.wq.method == "int" else "")


class PackedEmbedding(nn.Module):
    """``nn.Embedding`` over a packed table: only looked-up rows are dequantized."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int], wq: PackedParams):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.wq = wq

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return packed_embedding(tokens, self.wq.packed)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"
