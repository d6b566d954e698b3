"""Packed storage of each quantized-weight type: what a packed checkpoint holds per weight.

Every ``Packed*`` class mirrors one ``QuantizedWeight``: ``Packed*.pack(qw, param_dtype)``
and ``.unpack()`` are exact inverses up to the dtype of the float parameters (scales, alphas,
codebooks), which are stored as ``param_dtype`` (fp16 by default, fp32 for bit-exact output).
They reuse ``QuantizedWeight.as_dict()/from_dict()``: a flat dict of tensors with validated keys,
plain ints stored as 0-d tensors. Codes are packed with ``bitpack.pack_bits`` along the input
(column) dimension, so each row starts on a byte boundary. Each class registers itself as its
method's ``packed`` format in ``METHODS`` (bsflex weights are 1-bit k-means ones). ``dequantize_rows``
unpacks the rows asked for and applies the format's one dequantize rule (``int_decode``,
``bcq_decode``, ``kmeans_decode``), which the kernels' reference paths (pack/kernels.py) call too.
The same packed fields are what a QAT checkpoint saves as ``<module>.wq.code.<field>`` (in fp32).

Layouts (``rows x cols`` = ``[out, in]`` of a linear layer, ``[vocab, dim]`` of an embedding):

- ``PackedInt``:    codes uint8 [rows, ceil(cols*bits/8)]; scale float [rows or 1, 1];
                    zero_point uint8 [rows or 1, 1]; ``w = (code - zero_point) * scale``.
- ``PackedBCQ``:    planes uint8 [q, rows, ceil(cols/8)] (8 signs per byte, bit j of byte c =
                    column 8c+j, 1 = +1); alpha float [q, rows or 1, groups] (groups split cols
                    evenly, 1 = one alpha per row); ``w = sum_k alpha_k * (2*bit_k - 1)``.
- ``PackedMixedBCQ``: BCQ with a bit count per row (frequency-mixed embeddings): row_bits uint8
                    [rows]; for k = 1..8 in turn, the rows with k bits (in row order, n_k of them)
                    add a block of k * n_k rows to planes uint8 [sum(row_bits), ceil(cols/8)] and
                    alpha float [sum(row_bits), groups], plane-major (block row j * n_k + i = plane j
                    of the group's i-th row): each block is a ``PackedBCQ`` of n_k rows. Nothing is
                    stored past a row's bits.
- ``PackedKMeans``: indices uint8 [rows, ceil(cols*bits/8)]; codebook float [2^bits] or
                    [rows, 2^bits]; optional mask uint8 [rows, ceil(cols/8)] (1 bit per weight,
                    1 = kept); ``w = codebook[index] * mask``.
"""
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Dict, List, Optional, Tuple, Type

import torch

from ..errors import QuantConfigError
from .base import METHODS, QuantizedWeight
from .bcq import BCQWeight, bcq_decode
from .bitpack import pack_bits, packed_size, unpack_bits
from .kmeans import KMeansWeight, kmeans_decode
from .linear import IntWeight, int_decode
from .mixed import MixedBCQWeight

FLOAT_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _check(cond: bool, what: str):
    if not cond:
        raise QuantConfigError(what)


class PackedWeight(QuantizedWeight):
    """Base of the packed formats; ``unpack()`` gives back the ``QuantizedWeight``."""

    source: ClassVar[Type[QuantizedWeight]]

    @classmethod
    def pack(cls, qw: QuantizedWeight, param_dtype: torch.dtype = torch.float16) -> "PackedWeight":
        raise NotImplementedError

    def unpack(self) -> QuantizedWeight:
        raise NotImplementedError

    def dequantize_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """fp32 [len(rows), cols] of the weight rows ``rows`` (long [m]), equal to ``dequantize()[rows]``."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_rows(torch.arange(self.shape[0]))

    def nbytes(self) -> int:
        """Bytes of the stored tensors (what the file holds for this weight)."""
        return sum(t.numel() * t.element_size() for t in self.as_dict().values() if t.dim() > 0)

    def storage_bits(self) -> int:
        return 8 * self.nbytes()


def _check_codes(what: str, t: torch.Tensor, lead: Tuple[Optional[int], ...], cols: int, bits: int = 1,
                 holds: str = ""):
    """``t`` must be bit-packed codes, uint8 [*lead, ceil(cols * bits / 8)] (a None in ``lead``: any size)."""
    ok = (t.dtype == torch.uint8 and t.dim() == len(lead) + 1 and t.shape[-1] == packed_size(cols, bits)
          and all(n is None or n == m for n, m in zip(lead, t.shape)))
    at = f" at {bits} bits" if bits > 1 else ""
    _check(ok, f"{what} {t.dtype} {list(t.shape)} do not hold {holds}{cols} columns{at}")


def _float_param(t: torch.Tensor, name: str):
    _check(t.dtype in FLOAT_DTYPES.values(), f"{name} must be fp16 or fp32, got {t.dtype}")


@dataclass
class PackedInt(PackedWeight):
    method = "int"
    source = IntWeight
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int
    cols: int

    @property
    def shape(self):
        return (self.codes.shape[0], self.cols)

    @classmethod
    def pack(cls, qw: IntWeight, param_dtype=torch.float16):
        return cls(pack_bits(qw.codes, qw.bits), qw.scale.to(param_dtype), qw.zero_point.to(torch.uint8),
                   qw.bits, qw.shape[1])

    def unpack(self) -> IntWeight:
        return IntWeight(unpack_bits(self.codes, self.bits, self.cols), self.scale.float(),
                         self.zero_point.to(torch.int32), self.bits)

    def dequantize_rows(self, rows):
        codes = unpack_bits(self.codes[rows], self.bits, self.cols)
        per_row = self.scale.shape[0] > 1
        return int_decode(codes, self.scale[rows] if per_row else self.scale,
                          self.zero_point[rows] if per_row else self.zero_point)

    def validate(self):
        _check(1 <= self.bits <= 8, f"int weight: {self.bits} bits is outside 1..8")
        _check_codes("int weight: codes", self.codes, (None,), self.cols, self.bits)
        rows = self.codes.shape[0]
        _check(tuple(self.scale.shape) in ((rows, 1), (1, 1)) and self.zero_point.shape == self.scale.shape
               and self.zero_point.dtype == torch.uint8,
               f"int weight: scale {list(self.scale.shape)} / zero point {list(self.zero_point.shape)} "
               f"do not fit {rows} rows")
        _float_param(self.scale, "int weight: scale")


@dataclass
class PackedBCQ(PackedWeight):
    method = "bcq"
    source = BCQWeight
    planes: torch.Tensor
    alpha: torch.Tensor
    cols: int

    @property
    def shape(self):
        return (self.planes.shape[1], self.cols)

    @property
    def bits(self) -> int:
        return self.planes.shape[0]

    @classmethod
    def pack(cls, qw: BCQWeight, param_dtype=torch.float16):
        return cls(pack_bits(qw.planes, 1), qw.alpha.to(param_dtype), qw.shape[1])

    def unpack(self) -> BCQWeight:
        planes = unpack_bits(self.planes, 1, self.cols).bool()
        groups = self.alpha.shape[2]
        return BCQWeight(planes=planes, alpha=self.alpha.float(), group_size=self.cols // groups if groups > 1 else 0)

    def dequantize_rows(self, rows):
        alpha = self.alpha if self.alpha.shape[1] == 1 else self.alpha[:, rows]
        return bcq_decode(unpack_bits(self.planes[:, rows], 1, self.cols), alpha, self.cols)

    def validate(self):
        _check_codes("bcq weight: planes", self.planes, (None, None), self.cols)
        q, rows, _ = self.planes.shape
        _check(1 <= q <= 8, f"bcq weight: {q} bit-planes is outside 1..8")
        _check(self.alpha.dim() == 3 and self.alpha.shape[0] == q and self.alpha.shape[1] in (rows, 1)
               and self.cols % self.alpha.shape[2] == 0,
               f"bcq weight: alpha {list(self.alpha.shape)} does not fit planes {list(self.planes.shape)}")
        _float_param(self.alpha, "bcq weight: alpha")


@dataclass
class PackedMixedBCQ(PackedWeight):
    method = "bcq_mixed"
    source = MixedBCQWeight
    planes: torch.Tensor
    alpha: torch.Tensor
    row_bits: torch.Tensor
    cols: int

    @property
    def shape(self):
        return (self.row_bits.shape[0], self.cols)

    @property
    def bits(self) -> int:
        """The most bits of any row."""
        return int(self.row_bits.max()) if self.row_bits.numel() else 0

    @cached_property
    def by_bits(self) -> List[Tuple[torch.Tensor, PackedBCQ]]:
        """[(rows long [n_k], PackedBCQ [n_k, cols])] for each bit count k present, ascending."""
        bits, nbytes, groups = self.row_bits.long(), self.planes.shape[1], self.alpha.shape[1]
        out, start = [], 0
        for k in range(1, 9):
            rows = (bits == k).nonzero().squeeze(1)
            end = start + k * len(rows)
            if len(rows):
                out.append((rows, PackedBCQ(self.planes[start:end].reshape(k, len(rows), nbytes),
                                            self.alpha[start:end].reshape(k, len(rows), groups), self.cols)))
            start = end
        return out

    @cached_property
    def position(self) -> torch.Tensor:
        """long [rows]: each row's index inside its bit group."""
        pos = torch.empty(self.shape[0], dtype=torch.long)
        for rows, _ in self.by_bits:
            pos[rows] = torch.arange(len(rows))
        return pos

    @classmethod
    def pack(cls, qw: MixedBCQWeight, param_dtype=torch.float16):
        bits = qw.row_bits.long()
        planes = pack_bits(qw.planes, 1)  # [b, rows, nbytes]
        parts = [(planes[:k, rows].reshape(-1, planes.shape[2]), qw.alpha[:k, rows].reshape(-1, qw.alpha.shape[2]))
                 for k in range(1, 9) for rows in [(bits == k).nonzero().squeeze(1)] if len(rows)]
        return cls(torch.cat([p for p, _ in parts]), torch.cat([a for _, a in parts]).to(param_dtype),
                   qw.row_bits.to(torch.uint8), qw.shape[1])

    def unpack(self) -> MixedBCQWeight:
        b, (rows, cols), groups = self.bits, self.shape, self.alpha.shape[1]
        planes = torch.zeros(b, rows, cols, dtype=torch.bool)
        alpha = torch.zeros(b, rows, groups)
        for idx, pw in self.by_bits:
            planes[: pw.bits, idx] = unpack_bits(pw.planes, 1, cols).bool()
            alpha[: pw.bits, idx] = pw.alpha.float()
        return MixedBCQWeight(planes=planes, alpha=alpha, group_size=cols // groups if groups > 1 else 0,
                              row_bits=self.row_bits.to(torch.int8))

    def dequantize_rows(self, rows):
        out, bits = torch.empty(len(rows), self.cols), self.row_bits[rows]
        for _, group in self.by_bits:  # each row from its own bit group
            sel = (bits == group.bits).nonzero().squeeze(1)
            out[sel] = group.dequantize_rows(self.position[rows[sel]])
        return out

    def validate(self):
        bits = self.row_bits
        _check(bits.dim() == 1 and bits.dtype == torch.uint8 and bits.numel() > 0
               and 1 <= int(bits.min()) and int(bits.max()) <= 8,
               f"bcq_mixed weight: row_bits {bits.dtype} {list(bits.shape)} must be uint8 [rows] in 1..8")
        used = int(bits.long().sum())
        _check_codes("bcq_mixed weight: planes", self.planes, (used,), self.cols, holds=f"{used} row-planes of ")
        _check(self.alpha.dim() == 2 and self.alpha.shape[0] == used and self.cols % self.alpha.shape[1] == 0,
               f"bcq_mixed weight: alpha {list(self.alpha.shape)} does not fit {used} row-planes of "
               f"{self.cols} columns")
        _float_param(self.alpha, "bcq_mixed weight: alpha")


@dataclass
class PackedKMeans(PackedWeight):
    method = "kmeans"
    source = KMeansWeight
    indices: torch.Tensor
    codebook: torch.Tensor
    bits: int
    cols: int
    mask: Optional[torch.Tensor] = None

    @property
    def shape(self):
        return (self.indices.shape[0], self.cols)

    @classmethod
    def pack(cls, qw: KMeansWeight, param_dtype=torch.float16):
        mask = None if qw.mask is None else pack_bits(qw.mask, 1)
        return cls(pack_bits(qw.indices, qw.bits), qw.codebook.to(param_dtype), qw.bits, qw.shape[1], mask)

    def unpack(self) -> KMeansWeight:
        mask = None if self.mask is None else unpack_bits(self.mask, 1, self.cols).bool()
        return KMeansWeight(self.codebook.float(), unpack_bits(self.indices, self.bits, self.cols), self.bits, mask)

    def dequantize_rows(self, rows):
        mask = None if self.mask is None else unpack_bits(self.mask[rows], 1, self.cols).bool()
        codebook = self.codebook if self.codebook.dim() == 1 else self.codebook[rows]
        return kmeans_decode(codebook, unpack_bits(self.indices[rows], self.bits, self.cols), mask)

    def validate(self):
        _check(1 <= self.bits <= 8, f"kmeans weight: {self.bits} bits is outside 1..8")
        _check_codes("kmeans weight: indices", self.indices, (None,), self.cols, self.bits)
        rows, k = self.indices.shape[0], 2**self.bits
        _check(tuple(self.codebook.shape) in ((k,), (rows, k)),
               f"kmeans weight: codebook {list(self.codebook.shape)} does not fit {self.bits} bits and {rows} rows")
        _float_param(self.codebook, "kmeans weight: codebook")
        if self.mask is not None:
            _check_codes("kmeans weight: mask", self.mask, (rows,), self.cols)


for _method in METHODS.values():  # the first format whose source type the method's weights are: subclasses first
    _method.packed = next((f for f in (PackedInt, PackedMixedBCQ, PackedBCQ, PackedKMeans)
                           if issubclass(_method.weight_type, f.source)), None)


def packed_formats() -> Dict[str, Type[PackedWeight]]:
    """{format name: class}: the formats a packed file or checkpoint stores (a layout's ``method``)."""
    return {m: v.packed for m, v in METHODS.items() if v.packed is not None and v.packed.method == m}


def pack_weight(qw: QuantizedWeight, param_dtype: torch.dtype = torch.float16) -> PackedWeight:
    """The packed form of any packable QuantizedWeight (``bsflex`` weights are 1-bit k-means)."""
    method = METHODS.get(qw.method)
    if method is None or method.packed is None:
        raise QuantConfigError(f"no packed format for {type(qw).__name__} (method {qw.method!r}); "
                               f"packable: {sorted(packed_formats())}")
    if param_dtype != torch.float32:
        return method.packed.pack(qw, param_dtype)
    if "packed_fp32" not in qw.__dict__:  # kept with the code: checkpoints and packed files share it
        qw.packed_fp32 = method.packed.pack(qw, torch.float32)
    return qw.packed_fp32


def packed_from_dict(method: str, d: Dict[str, torch.Tensor]) -> PackedWeight:
    if method not in METHODS or METHODS[method].packed is None:
        raise QuantConfigError(f"unknown packed method {method!r}; known: {sorted(packed_formats())}")
    return METHODS[method].packed.from_dict(d)
