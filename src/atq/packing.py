"""Four trits per byte and back: the one place that knows the bit layout.

Layout: codes run along the last dimension (the input dimension of a weight, so a row's bytes are contiguous for
a GEMV kernel); byte ``b`` holds elements ``4b + j`` for ``j = 0..3`` in bits ``2j..2j+1``; each element is
stored as ``value + 1`` (so -1, 0, +1 -> 0, 1, 2, the convention of llama.cpp's TQ2_0). The last dimension is
padded with zeros (stored as 1) up to a multiple of 4; callers keep the true length. Code 3 never occurs in a
valid buffer, which lets ``check_packed`` detect many corruptions.
"""

from __future__ import annotations

import torch

TRITS_PER_BYTE = 4
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def packed_length(length: int) -> int:
    """Bytes needed for ``length`` trits."""
    return -(-length // TRITS_PER_BYTE)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in {-1, 0, 1} along the last dimension into uint8, four per byte."""
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"pack_trits expects an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("pack_trits expects at least one dimension")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("pack_trits: codes must lie in {-1, 0, 1}")
    length = codes.shape[-1]
    pad = packed_length(length) * TRITS_PER_BYTE - length
    stored = torch.nn.functional.pad((codes + 1).to(torch.uint8), (0, pad), value=1)
    stored = stored.reshape(*codes.shape[:-1], -1, TRITS_PER_BYTE)
    shifted = stored << _SHIFTS.to(codes.device)
    return (shifted[..., 0] | shifted[..., 1] | shifted[..., 2] | shifted[..., 3]).contiguous()


def unpack_trits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``pack_trits``: uint8 (..., ceil(length/4)) -> int8 (..., length) in {-1, 0, 1}."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_trits expects uint8, got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] != packed_length(length):
        raise ValueError(
            f"unpack_trits: last dimension {tuple(packed.shape)[-1:]} does not hold {length} trits "
            f"(needs {packed_length(length)} bytes)"
        )
    fields = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 3
    codes = fields.reshape(*packed.shape[:-1], -1)[..., :length]
    return codes.to(torch.int8) - 1


def check_packed(packed: torch.Tensor, length: int, name: str = "packed") -> None:
    """Raise if any 2-bit field holds the unused code 3 or the padding is not zero (signs of corruption)."""
    fields = (packed.unsqueeze(-1) >> _SHIFTS.to(packed.device)) & 3
    if bool((fields == 3).any()):
        raise ValueError(f"{name}: invalid 2-bit code 3 found; the buffer is corrupted")
    padding = fields.reshape(*packed.shape[:-1], -1)[..., length:]
    if padding.numel() and bool((padding != 1).any()):
        raise ValueError(f"{name}: padding trits are not zero; the buffer is corrupted")
