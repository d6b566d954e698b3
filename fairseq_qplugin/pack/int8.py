"""Integer GEMM for packed 8-bit ``int`` weights through torch's quantized engine (FBGEMM on x86).

``prepack(pw, bias)`` turns a ``PackedInt`` with ``bits == 8`` into the engine's packed int8 matrix
(``torch.ops.quantized.linear_prepack``) straight from the codes, without any fp32 copy of the
weight: ``code - 128`` is the qint8 value and ``zero_point - 128`` its zero point, so
``(code - zero_point) * scale`` is unchanged; per-row scales become a per-channel affine qint8
tensor (axis 0), one scale a per-tensor one. ``int8_linear`` then runs
``torch.ops.quantized.linear_dynamic``, i.e. exactly what ``torch.ao.nn.quantized.dynamic.Linear``
computes (same op, same ``reduce_range=True``):

1. the activations x [n, cols] are quantized per call to quint8 with one scale for the whole
   tensor, on 7 bits (``reduce_range``: avoids int16 saturation of AVX2's u8*s8 pair sums):
   ``s_x = (max(x, 0) - min(x, 0)) / 127``;
2. int32 accumulation of the integer products, corrected for both zero points;
3. ``y = s_x * scale[r] * acc + bias``.

Error vs the dequantized weight in fp32: each activation moves by at most ``s_x`` (half a step of
rounding, plus at most half a step where the integer zero point clips the range's end), so
``|y[i, r] - (x @ W^T)[i, r]| <= s_x * sum_c |W[r, c]|`` (tested). For transformer activations this
is a relative error of about 1e-2; it changes the numerics, so translations can differ from the
fake-quant model's. ``--int8-kernel dequant`` keeps the exact path (kernels.blocked_linear).

If the engine is missing or cannot pack the weight (e.g. ``onednn`` rejects non-zero weight zero
points, or a future torch without quantized tensors, which it already marks deprecated), ``prepack``
logs one line and returns None: the caller falls back to the dequant kernel.
"""
import logging
import warnings
from typing import Optional

import torch

from ..quant.packed import PackedInt, PackedWeight

logger = logging.getLogger(__name__)
KERNELS = ("fbgemm", "dequant")  # --int8-kernel choices; fbgemm = torch's quantized engine
_warned = set()


def supported(pw: PackedWeight) -> bool:
    """Whether ``pw`` is a weight the int8 GEMM serves (8-bit ``int``)."""
    return isinstance(pw, PackedInt) and pw.bits == 8


def _fallback(reason: str):
    if reason not in _warned:
        _warned.add(reason)
        logger.warning("int8 GEMM unavailable (%s): using the dequantize + BLAS kernel", reason)


def qint8_weight(pw: PackedInt) -> torch.Tensor:
    """The qint8 quantized tensor [rows, cols] holding the same values as ``pw.dequantize()``."""
    q = (pw.codes.to(torch.int16) - 128).to(torch.int8)  # 8-bit codes are stored unpacked
    zp = pw.zero_point.reshape(-1).long() - 128
    scale = pw.scale.reshape(-1).double()
    if scale.numel() == 1:
        return torch._make_per_tensor_quantized_tensor(q, float(scale), int(zp))
    return torch._make_per_channel_quantized_tensor(q, scale, zp, 0)


def prepack(pw: PackedInt, bias: Optional[torch.Tensor]):
    """The engine's packed weight (a ``LinearPackedParamsBase`` script object), or None if unavailable."""
    engine = torch.backends.quantized.engine
    if engine not in torch.backends.quantized.supported_engines or engine == "none":
        _fallback(f"torch has no quantized engine {engine!r}")
        return None
    try:
        b = None if bias is None else bias.detach().float()
        with warnings.catch_warnings():  # recent torch warns that quantized tensors are deprecated
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            return torch.ops.quantized.linear_prepack(qint8_weight(pw), b)
    except (RuntimeError, NotImplementedError, AttributeError) as e:
        _fallback(f"engine {engine!r}: {str(e).splitlines()[0]}")
        return None


def int8_linear(x: torch.Tensor, packed) -> torch.Tensor:
    """y [..., rows] = x [..., cols] @ W^T + bias with dynamic 7-bit activation quantization."""
    lead = x.shape[:-1]
    y = torch.ops.quantized.linear_dynamic(x.reshape(-1, x.shape[-1]).float(), packed, True)
    return y.to(x.dtype).reshape(*lead, -1)
