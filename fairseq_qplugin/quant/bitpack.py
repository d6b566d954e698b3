"""Mirrored bit packing of small unsigned codes into uint8 containers (HQQ ``bitpack.py`` style).

Layout (``pack_bits``): codes of ``bits`` bits are laid out along the **last** dimension as one
little-endian bit stream: code ``j`` occupies stream bits ``j*bits .. j*bits + bits - 1`` (its
least significant bit first), and stream bit ``i`` is bit ``i % 8`` of byte ``i // 8``. The stream
is zero-padded to whole bytes, so a row of ``n`` codes takes ``ceil(n * bits / 8)`` bytes and every
row starts on a byte boundary (rows can be sliced without unpacking their neighbours).

For ``bits`` = 1 this puts code ``j`` at bit ``j % 8`` of byte ``j // 8``: byte ``c`` of a BCQ
bit-plane row is exactly the 8-bit index into the lookup table of input chunk ``c`` (METHODS.md §3).
For ``bits`` in {2, 4, 8} it is the usual "low nibble first" layout. The pair is exact for every
width 1..8 and any shape (odd sizes included): ``unpack_bits(pack_bits(c, b), b, c.shape[-1]) == c``.
"""
import torch

from ..errors import QuantConfigError

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def packed_size(n: int, bits: int) -> int:
    """Bytes of one packed row of ``n`` codes at ``bits`` bits."""
    return (n * bits + 7) // 8


def _check_bits(bits: int):
    if not 1 <= bits <= 8:
        raise QuantConfigError(f"bit packing takes 1 to 8 bits per code, got {bits}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 (or bool) codes [..., n], each < 2^bits -> uint8 [..., ceil(n * bits / 8)]."""
    _check_bits(bits)
    codes = codes.to(torch.uint8)
    if bits == 8:
        return codes.contiguous()
    if bool((codes >> bits).any()):
        raise QuantConfigError(f"codes do not fit in {bits} bits (max {int(codes.max())})")
    *lead, n = codes.shape
    if 8 % bits == 0:  # whole codes per byte: one shift per code slot (same layout, faster)
        return _pack_units(codes, bits, packed_size(n, bits))
    stream = ((codes.unsqueeze(-1) >> _SHIFTS[:bits]) & 1).reshape(*lead, n * bits)  # LSB first
    return _pack_units(stream, 1, packed_size(n, bits))


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """uint8 [..., ceil(n * bits / 8)] -> uint8 codes [..., n]; the mirror of ``pack_bits``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8 or packed.shape[-1] != packed_size(n, bits):
        raise QuantConfigError(
            f"packed codes: expected uint8 [..., {packed_size(n, bits)}] for {n} codes at {bits} bits, "
            f"got {packed.dtype} {list(packed.shape)}"
        )
    if bits == 8:
        return packed
    if 8 % bits == 0:  # whole codes per byte: one shift per code slot (same layout, faster)
        return _unpack_units(packed, bits, n)
    stream = _unpack_units(packed, 1, n * bits).reshape(*packed.shape[:-1], n, bits)
    return (stream << _SHIFTS[:bits]).sum(-1, dtype=torch.uint8)


def _pack_units(units: torch.Tensor, width: int, nbytes: int) -> torch.Tensor:
    """uint8 units [..., m] of ``width`` bits (8 % width == 0), the first in the low bits of byte 0 ->
    uint8 [..., nbytes], zero-padded."""
    per = 8 // width
    units = torch.nn.functional.pad(units, (0, nbytes * per - units.shape[-1]))
    units = units.reshape(*units.shape[:-1], nbytes, per)
    return (units << torch.arange(0, 8, width, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)


def _unpack_units(packed: torch.Tensor, width: int, m: int) -> torch.Tensor:
    """The mirror of ``_pack_units``: the first ``m`` units of ``width`` bits of uint8 [..., nbytes]."""
    units = (packed.unsqueeze(-1) >> torch.arange(0, 8, width, dtype=torch.uint8)) & (2**width - 1)
    return units.reshape(*packed.shape[:-1], packed.shape[-1] * (8 // width))[..., :m]
