"""Binary-code quantization (BCQ): ``W ~= sum_k diag(alpha_k) B_k``, B_k in {-1, +1} (METHODS.md §3).

The bit-planes ``B_k`` are the object the packed export stores (8 weights per byte) and the
lookup-table GEMM consumes. One bit is the sign binarization of seed 001 Eq. 5 with a scale
``alpha = mean|W|`` per row (or per tensor), which is what makes a 1-bit model usable.

Greedy construction: R = W; for k in 1..q: B_k = sign(R) (0 -> +1), alpha_k = mean|R|, R -= alpha_k B_k.
"""
from dataclasses import dataclass

import torch

from ..errors import QuantConfigError
from .base import Method, QuantizedWeight, QuantSpec, register_method


@dataclass
class BCQWeight(QuantizedWeight):
    """planes: bool [q, rows, cols] (True = +1); alpha: fp32 [q, rows or 1, 1]."""

    method = "bcq"
    planes: torch.Tensor
    alpha: torch.Tensor

    @property
    def shape(self):
        return tuple(self.planes.shape[1:])

    @property
    def bits(self) -> int:
        return self.planes.shape[0]

    def dequantize(self) -> torch.Tensor:
        signs = self.planes.float() * 2 - 1
        return (signs * self.alpha).sum(0)

    def storage_bits(self) -> int:
        return self.planes.numel() + self.alpha.numel() * 16

    def validate(self):
        q, rows, _ = self.planes.shape
        if self.planes.dtype != torch.bool or self.alpha.shape not in ((q, rows, 1), (q, 1, 1)):
            raise QuantConfigError(
                f"bcq weight: alpha {tuple(self.alpha.shape)} does not fit planes {tuple(self.planes.shape)}"
            )


def quantize_bcq(w: torch.Tensor, spec: QuantSpec) -> BCQWeight:
    residual = w.double()  # fp64 means: a binarized weight re-quantizes to exactly itself
    dims = (1,) if spec.granularity == "channel" else (0, 1)
    planes, alphas = [], []
    for _ in range(spec.bits):
        plane = residual >= 0
        alpha = residual.abs().mean(dim=dims, keepdim=True).float()
        residual = residual - (plane.double() * 2 - 1) * alpha.double()
        planes.append(plane)
        alphas.append(alpha)
    return BCQWeight(planes=torch.stack(planes), alpha=torch.stack(alphas))


register_method("bcq", Method(quantize=quantize_bcq, weight_type=BCQWeight, bits=(1, 4)))
