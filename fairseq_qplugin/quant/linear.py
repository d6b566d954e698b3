"""Range-based linear ("int-n") quantization, Fan 2019, Eq. 4, with symmetric and asymmetric ranges.

Both schemes share one affine form, ``w_hat = (codes - zero_point) * scale`` with unsigned ``codes``
of ``bits`` bits and an integer ``zero_point``, which is what integer GEMM kernels consume:

- asym: ``scale = (max - min) / (2^n - 1)``, ``codes = round((w - min) / scale)`` (Eq. 4). The range
  is widened to contain 0 so that 0 is exact and the zero point is an integer; for weight rows that
  straddle 0 (all real ones) this is Eq. 4 unchanged.
- sym: ``scale = max|w| / (2^(n-1) - 1)``, ``zero_point = 2^(n-1)``; codes use 2^n - 1 levels.

Scales are rounded down to 16 significant bits, so ``(codes - zero_point) * scale`` is exact in fp32
and quantizing an already quantized weight returns it unchanged: a saved quantized checkpoint
reloads to bit-identical outputs. A constant or all-zero tensor or row gets a finite
scale (1 for zeros) and is reproduced exactly, never NaN.
"""
from dataclasses import dataclass

import torch

from ..errors import QuantConfigError
from .base import Method, QuantizedWeight, QuantSpec, register_method, straight_through


def truncate_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round positive fp32 values down to 16 significant bits (products with |int| < 256 are exact).

    Rounding down means the extreme values map to the extreme codes (clipped by at most 2^-16 of a
    step), so re-quantizing finds the same range, scale and zero point: quantization is idempotent.
    """
    bits = scale.float().contiguous().view(torch.int32)
    return (bits & -0x100).view(torch.float32)


@dataclass
class IntWeight(QuantizedWeight):
    """codes: uint8 [rows, cols] in [0, 2^bits); scale: fp32 [rows or 1, 1]; zero_point: int32 like scale."""

    method = "int"
    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    bits: int

    @property
    def shape(self):
        return tuple(self.codes.shape)

    def dequantize(self) -> torch.Tensor:
        return int_decode(self.codes, self.scale, self.zero_point).to(self.dtype)

    def storage_bits(self) -> int:
        return self.codes.numel() * self.bits + self.scale.numel() * (16 + self.bits)

    def validate(self):
        rows, _ = self.codes.shape
        if self.scale.shape not in ((rows, 1), (1, 1)) or self.zero_point.shape != self.scale.shape:
            raise QuantConfigError(
                f"int weight: scale {tuple(self.scale.shape)} / zero point {tuple(self.zero_point.shape)} "
                f"do not fit codes {tuple(self.codes.shape)}"
            )
        if int(self.codes.max()) >= 2**self.bits:
            raise QuantConfigError(f"int weight: codes exceed {self.bits} bits")


def int_decode(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """The int format's one dequantize rule, ``(code - zero_point) * scale`` in fp32 (also of packed rows
    and of the kernels' per-row tables)."""
    return (codes.float() - zero_point.float()) * scale.float()


def int_storage_bits(shape, spec: QuantSpec) -> int:
    rows, cols = shape
    return rows * cols * spec.bits + (rows if spec.granularity == "channel" else 1) * (16 + spec.bits)


def _finite_scale(scale: torch.Tensor) -> torch.Tensor:
    return truncate_scale(torch.where(scale > 0, scale, torch.ones_like(scale)))


def asym_params(lo: torch.Tensor, hi: torch.Tensor, bits: int):
    """Scale and integer zero point of the range [min(lo, 0), max(hi, 0)] at ``bits`` bits."""
    levels = 2**bits - 1
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = _finite_scale((hi - lo) / levels)
    return scale, torch.round(-lo / scale).clamp(0, levels).to(torch.int32)


def quantize_int(w: torch.Tensor, spec: QuantSpec) -> IntWeight:
    x = w.float()
    dims = dict(dim=1, keepdim=True) if spec.granularity == "channel" else dict()
    if spec.scheme == "sym":
        half = 2 ** (spec.bits - 1)
        scale = _finite_scale(x.abs().amax(**dims).reshape(-1, 1) / (half - 1))
        zero_point = torch.full_like(scale, half, dtype=torch.int32)
        lowest = 1
    else:  # asym (QuantSpec checks the scheme)
        lo, hi = x.amin(**dims).reshape(-1, 1), x.amax(**dims).reshape(-1, 1)
        scale, zero_point = asym_params(lo, hi, spec.bits)
        lowest = 0
    codes = (torch.round(x / scale) + zero_point).clamp(lowest, 2**spec.bits - 1)
    return IntWeight(codes=codes.to(torch.uint8), scale=scale, zero_point=zero_point, bits=spec.bits)


def fake_quantize_range(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize activations to ``bits`` on the range [lo, hi] (values outside are clamped), with an
    identity straight-through gradient (Fan 2019, Eq. 6)."""
    scale, zero_point = asym_params(lo, hi, bits)
    codes = (torch.round(x.detach() / scale) + zero_point).clamp(0, 2**bits - 1)
    return straight_through(x, int_decode(codes, scale, zero_point).to(x.dtype))


register_method("int", Method(IntWeight, (1, 8), quantize_int, int_storage_bits))
