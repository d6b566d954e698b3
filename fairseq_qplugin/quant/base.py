"""The quantizer interface every method shares (no fairseq imports).

    spec = QuantSpec(method="int", bits=4)      # what to do, validated on construction
    qw = quantize(weight, spec)                 # -> QuantizedWeight (codes + parameters)
    w_hat = qw.dequantize()                     # fp tensor of weight's shape, used by fake-quant training
    qw.as_dict() / type(qw).from_dict(d)        # flat dict of tensors
    pack_weight(qw) / packed_from_dict(m, d)    # bit-packed codes (quant/packed.py): checkpoints and packed files

``METHODS`` is the one registry of methods, keyed by the name that training (``QuantSpec.method``),
checkpoints and packed files use: each ``Method`` names its quantize function, its QuantizedWeight
class, its bit range, its storage-size formula and (set by quant/packed.py) its packed format. Weights are 2-D
``[rows, cols]`` like ``nn.Linear.weight`` ``[out, in]`` and ``nn.Embedding.weight`` ``[vocab, dim]``;
"per channel" always means one set of parameters per row.
"""
from dataclasses import MISSING, dataclass, fields
from typing import Callable, ClassVar, Dict, Optional, Tuple, Type

import torch

from ..errors import QuantConfigError

GRANULARITIES = ("tensor", "channel")
SEARCHES = ("greedy", "alternating")


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight tensor.

    method: key of ``METHODS`` ("int" for range-based linear, "bcq" for binary codes; bits=1 with
        method "int" is the sign binarization of Fan 2019, Eq. 5 and is served by "bcq"; "kmeans"
        and "bsflex" for weight sharing, "sparse" for pruned weights kept in fp32).
    bits: bits per weight.
    scheme: "int" only: "sym" (zero point in the middle) or "asym" (min/max range, Fan 2019, Eq. 4).
    granularity: "tensor" (one set of parameters) or "channel" (one per row).
    group_size: "bcq" only: input columns sharing one scale (0 = the whole row); must divide the
        number of columns.
    search: "bcq" only: "greedy" or "alternating" (greedy, then alternating refinement).
    rounds: "bcq" only: the most alternating rounds (it stops earlier once no code changes).
    """

    method: str = "int"
    bits: int = 8
    scheme: str = "sym"
    granularity: str = "channel"
    group_size: int = 0
    search: str = "alternating"
    rounds: int = 10

    def __post_init__(self):
        if self.method not in METHODS or METHODS[self.method].quantize is None:
            known = sorted(m for m, v in METHODS.items() if v.quantize is not None)
            raise QuantConfigError(f"unknown quantization method {self.method!r}; choose one of {known}")
        lo, hi = METHODS[self.method].bits
        if not lo <= self.bits <= hi:
            raise QuantConfigError(f"{self.method} quantization takes {lo} to {hi} bits, got {self.bits}")
        if self.method == "int" and self.scheme not in ("sym", "asym"):
            raise QuantConfigError(f"unknown int scheme {self.scheme!r}; choose 'sym' or 'asym'")
        if self.granularity not in GRANULARITIES:
            raise QuantConfigError(f"unknown granularity {self.granularity!r}; choose one of {GRANULARITIES}")
        if self.group_size < 0 or (self.group_size and (self.method != "bcq" or self.granularity != "channel")):
            raise QuantConfigError(
                f"group size {self.group_size}: groups along the input dimension need method 'bcq' with "
                f"granularity 'channel' and a size >= 1 (0 = one scale per row)"
            )
        if self.search not in SEARCHES:
            raise QuantConfigError(f"unknown bcq search {self.search!r}; choose one of {SEARCHES}")
        if self.rounds < 1:
            raise QuantConfigError(f"alternating bcq needs at least 1 round, got {self.rounds}")


class QuantizedWeight:
    """A quantized 2-D weight: integer codes plus the parameters that map them back to floats.

    Subclasses are dataclasses whose tensor fields are listed in ``tensor_fields``; ``as_dict`` and
    ``from_dict`` turn them into a flat, validated ``{name: tensor}`` dict (ints become 0-d tensors),
    which is what the packed export stores.
    """

    method: ClassVar[str]
    dtype: ClassVar[torch.dtype] = torch.float32  # of ``dequantize()``; ``quantize`` sets the input's

    @property
    def shape(self) -> Tuple[int, int]:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def storage_bits(self) -> int:
        """Bits needed to store the packed codes plus fp16 parameters (the packed size, not padding)."""
        raise NotImplementedError

    def as_dict(self) -> Dict[str, torch.Tensor]:
        """Optional fields (default ``None``) that are unset are left out."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v if torch.is_tensor(v) else torch.tensor(v) for k, v in values.items() if v is not None}

    @classmethod
    def from_dict(cls, d: Dict[str, torch.Tensor]) -> "QuantizedWeight":
        names = {f.name: f for f in fields(cls)}
        required = {n for n, f in names.items() if f.default is MISSING}
        if not required <= set(d) <= set(names):
            optional = sorted(set(names) - required)
            raise QuantConfigError(
                f"a {cls.method} weight needs exactly the keys {sorted(required)}"
                + (f" (optionally {optional})" if optional else "") + f", got {sorted(d)}"
            )
        qw = cls(**{k: (int(v) if names[k].type is int else v) for k, v in d.items()})
        qw.validate()
        return qw

    def validate(self):
        """Check shapes and ranges; raise QuantConfigError on a corrupted weight."""


@dataclass
class Method:
    """One quantization method. ``quantize`` is None for a method reached only through its own
    function (bcq_mixed: ``quantize_bcq_rows``); ``storage_bits(shape, spec, **state)`` is the packed
    size in bits (codes plus fp16 parameters) computed from the shape and the quantizer's state
    (``row_bits``, ``kept``), without quantizing; ``packed`` is the bit-packed format (quant/packed.py;
    None: not packable, the weight stays float)."""

    weight_type: Type[QuantizedWeight]
    bits: Tuple[int, int]  # allowed range, inclusive
    quantize: Optional[Callable[..., QuantizedWeight]] = None
    storage_bits: Optional[Callable[..., int]] = None
    packed: Optional[type] = None


METHODS: Dict[str, Method] = {}


def register_method(name: str, method: Method):
    METHODS[name] = method


def storage_bits(spec: QuantSpec, shape, **state) -> int:
    """The packed size in bits of a ``shape`` weight quantized with ``spec`` (see ``Method``)."""
    spec = resolve(spec)
    return METHODS[spec.method].storage_bits(tuple(shape), spec, **state)


def resolve(spec: QuantSpec) -> QuantSpec:
    """Map ``int`` at 1 bit to sign binarization, which is 1-bit BCQ (one scale per row or tensor)."""
    if spec.method == "int" and spec.bits == 1:
        return QuantSpec(method="bcq", bits=1, granularity=spec.granularity)
    return spec


def check_weight(w: torch.Tensor, name: str = "weight"):
    """Raise a QuantConfigError naming ``name`` unless ``w`` is a non-empty 2-D tensor of finite values."""
    if w.dim() != 2:
        raise QuantConfigError(f"{name}: only 2-D weights are quantized, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise QuantConfigError(f"{name}: cannot quantize an empty weight of shape {tuple(w.shape)}")
    if torch.isfinite(w.detach().sum()):  # one pass without a copy; a non-finite value makes the sum one
        return
    finite = torch.isfinite(w.detach()).all(dim=1)
    if not finite.all():
        row = int((~finite).nonzero()[0])
        bad = w.detach()[row][~torch.isfinite(w.detach()[row])][0].item()
        raise QuantConfigError(f"{name}: row {row} of {tuple(w.shape)} holds {bad} ({int((~finite).sum())} such "
                               "row(s)); quantize only finite weights (the training diverged?)")


def quantize(w: torch.Tensor, spec: QuantSpec, init_alpha: Optional[torch.Tensor] = None,
             name: str = "weight", fresh: bool = True) -> QuantizedWeight:
    """Quantize a non-empty 2-D float tensor of finite values; the result's ``dequantize()`` has ``w``'s
    shape and dtype. ``init_alpha``: the scales of an earlier code of the same tensor, to warm-start the
    search (bcq only; ``fresh=False``: from them alone, see ``quantize_bcq``); ``name`` names the tensor in errors."""
    check_weight(w, name)
    spec = resolve(spec)
    if init_alpha is not None and spec.method != "bcq":
        raise QuantConfigError(f"only bcq codes can be warm-started, not {spec.method!r}")
    extra = {} if init_alpha is None else {"init_alpha": init_alpha, "fresh": fresh}
    qw = METHODS[spec.method].quantize(w.detach(), spec, **extra)
    if w.dtype != torch.float32 and w.is_floating_point():
        qw.dtype = w.dtype
    return qw


def straight_through(w: torch.Tensor, wq: torch.Tensor, gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``wq`` (w's quantized value) in the forward pass with a straight-through gradient to ``w``: the
    identity (Fan 2019, Eq. 6), times ``gate`` where given (bool or 0/1: binarization's |w| <= 1, Eq. 7;
    a pruning mask). The forward value is exactly ``wq`` (``wq + (w - w)`` adds an exact zero). The one
    straight-through estimator of the plugin: weights of every method and activations."""
    if not w.requires_grad:
        return wq
    delta = w - w.detach()
    return wq + (delta if gate is None else delta * gate.to(w.dtype))


def binarize_gate(w: torch.Tensor, spec: QuantSpec) -> Optional[torch.Tensor]:
    """The straight-through gate of ``spec``: |w| <= 1 at 1 bit (Eq. 7), else None (identity)."""
    return (w.detach().abs() <= 1) if spec.bits == 1 else None


def fake_quantize(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """``quantize(w).dequantize()`` in the forward pass with a straight-through gradient to ``w``."""
    return straight_through(w, quantize(w, spec).dequantize().to(w.dtype), binarize_gate(w, spec))
