"""Dense bit packing of integer quantization codes for export.

Layout ("dense little-endian bit stream"): element i of the flattened (row-major) tensor, stored as the
unsigned value ``u_i`` (``u_i = code_i + 2^(b-1)`` for signed codes, ``u_i = code_i`` otherwise), occupies
stream bits ``[i*b, (i+1)*b)``, least significant bit first; stream bit k is bit ``k % 8`` of byte ``k // 8``.
The buffer holds exactly ``ceil(numel * b / 8)`` bytes; unused high bits of the last byte are 0.

For b = 4, for example, byte j holds element 2j in its low nibble and element 2j+1 in its high nibble.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["pack", "unpack", "packed_nbytes", "code_range"]

_INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return bits


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """The storable code range: ``[-2^(b-1), 2^(b-1) - 1]`` if signed, else ``[0, 2^b - 1]``."""
    _check_bits(bits)
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


def packed_nbytes(numel: int, bits: int) -> int:
    """Bytes of a packed buffer: ``ceil(numel * bits / 8)``."""
    return (numel * _check_bits(bits) + 7) // 8


def pack(codes: Tensor, bits: int, signed: bool) -> tuple[Tensor, dict[str, Any]]:
    """Pack integer ``codes`` into a dense little-endian bit stream of ``bits`` bits per element.

    Returns ``(packed, meta)``: a 1-D uint8 tensor of ``ceil(numel * bits / 8)`` bytes on ``codes``' device,
    and a JSON-serialisable dict ``{"bits", "signed", "shape", "numel", "offset", "layout"}`` (``offset`` is
    the value added before storing: ``2^(b-1)`` for signed codes, else 0).
    Raises ValueError for a non-integer dtype, ``bits`` outside 1..8, or codes outside :func:`code_range`.
    """
    _check_bits(bits)
    if codes.dtype not in _INT_DTYPES:
        raise ValueError(f"codes must have an integer dtype, got {codes.dtype}")
    lo, hi = code_range(bits, signed)
    offset = -lo
    n = codes.numel()
    meta = {"bits": bits, "signed": bool(signed), "shape": list(codes.shape), "numel": n, "offset": offset,
            "layout": "dense-le"}
    if n == 0:
        return torch.zeros(0, dtype=torch.uint8, device=codes.device), meta
    flat = codes.reshape(-1).to(torch.int32)
    cmin, cmax = int(flat.min()), int(flat.max())
    if cmin < lo or cmax > hi:
        raise ValueError(
            f"codes out of range for {bits}-bit {'signed' if signed else 'unsigned'} packing: "
            f"[{cmin}, {cmax}] not within [{lo}, {hi}]"
        )
    u = (flat + offset).to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)
    stream = ((u.unsqueeze(1) >> shifts) & 1).reshape(-1)  # n*bits bits, element-major, LSB first
    nbytes = packed_nbytes(n, bits)
    pad = nbytes * 8 - stream.numel()
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=codes.device)
    packed = (stream.view(nbytes, 8) << byte_shifts).sum(dim=1, dtype=torch.int32).to(torch.uint8)
    return packed, meta


def unpack(
    packed: Tensor,
    bits: int,
    signed: bool,
    shape: Sequence[int] | torch.Size,
    dtype: torch.dtype = torch.int32,
) -> Tensor:
    """Inverse of :func:`pack`: decode ``prod(shape)`` codes of ``bits`` bits from the uint8 ``packed``.

    ``packed`` must be a uint8 tensor of exactly ``ceil(prod(shape) * bits / 8)`` bytes (any shape; it is
    flattened); a shorter or longer buffer raises ValueError before anything is read. Returns ``dtype`` codes
    of the given shape (signed codes have ``2^(b-1)`` subtracted).
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be a uint8 tensor, got {packed.dtype}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise ValueError(f"invalid shape {shape}")
    n = math.prod(shape)
    need = packed_nbytes(n, bits)
    if packed.numel() != need:
        what = "too short" if packed.numel() < need else "too long"
        raise ValueError(
            f"packed buffer {what}: {packed.numel()} bytes, but {n} codes of {bits} bits need exactly {need}"
        )
    lo, _ = code_range(bits, signed)
    if n == 0:
        return torch.zeros(shape, dtype=dtype, device=packed.device)
    byte_shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    stream = ((packed.reshape(-1).unsqueeze(1) >> byte_shifts) & 1).reshape(-1)[: n * bits]
    shifts = torch.arange(bits, dtype=torch.int32, device=packed.device)
    u = (stream.view(n, bits).to(torch.int32) << shifts).sum(dim=1)
    return (u + lo).to(dtype).reshape(shape)
