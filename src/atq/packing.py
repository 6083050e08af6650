"""Trits to bytes and back: the one place that knows the bit layouts (a weight's ``packing``).

Two packings, both along the last dimension with zero padding (callers keep the true length):
``2bit``  four trits a byte (2 bits each): cheap to unpack with shifts, what GPU kernels and TQ2_0 want;
``base3`` five trits a byte as one base-3 number (3^5 = 243 <= 256): 1.6 bits a trit, TQ1_0's density, for
          storage-bound uses such as several trit-planes.

2bit: codes run along the last dimension (the input dimension of a weight, so a row's bytes are contiguous for
a GEMV kernel); byte ``b`` holds elements ``4b + j`` for ``j = 0..3`` in bits ``2j..2j+1``; each element is
stored as ``value + 1`` (so -1, 0, +1 -> 0, 1, 2, the convention of llama.cpp's TQ2_0). The last dimension is
padded with zeros (stored as 1) up to a multiple of 4; callers keep the true length. Code 3 never occurs in a
valid buffer, which lets ``check_packed`` detect many corruptions.
"""

from __future__ import annotations

import torch

TRITS_PER_BYTE = 4


def _shifts(device: torch.device) -> torch.Tensor:
    """Bit offsets of the four trits of a byte, made on ``device`` (no host copy: CUDA graphs can capture it)."""
    return torch.arange(0, 8, 2, dtype=torch.uint8, device=device)


def _fields(packed: torch.Tensor) -> torch.Tensor:
    """The four 2-bit fields of every byte: uint8 (..., bytes) -> (..., bytes, 4), stored digits 0..3."""
    return (packed.unsqueeze(-1) >> _shifts(packed.device)) & 3


def _check_codes(codes: torch.Tensor, caller: str) -> None:
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"{caller} expects an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError(f"{caller} expects at least one dimension")
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(f"{caller}: codes must lie in {{-1, 0, 1}}")


def _check_buffer(packed: torch.Tensor, n_bytes: int, length: int, caller: str) -> None:
    if packed.dtype != torch.uint8:
        raise TypeError(f"{caller} expects uint8, got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] != n_bytes:
        raise ValueError(
            f"{caller}: last dimension {tuple(packed.shape)[-1:]} does not hold {length} trits (needs {n_bytes} bytes)"
        )


def packed_length(length: int) -> int:
    """Bytes needed for ``length`` trits."""
    return -(-length // TRITS_PER_BYTE)


def _byte_digits(codes: torch.Tensor, per_byte: int, dtype: torch.dtype) -> torch.Tensor:
    """The stored digits (code + 1) as (..., bytes, per_byte), the last byte padded with zero trits."""
    digits = torch.nn.functional.pad((codes + 1).to(dtype), (0, -codes.shape[-1] % per_byte), value=1)
    return digits.reshape(*codes.shape[:-1], -1, per_byte)


def pack_trits(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in {-1, 0, 1} along the last dimension into uint8, four per byte."""
    _check_codes(codes, "pack_trits")
    shifted = _byte_digits(codes, TRITS_PER_BYTE, torch.uint8) << _shifts(codes.device)
    return (shifted[..., 0] | shifted[..., 1] | shifted[..., 2] | shifted[..., 3]).contiguous()


def unpack_trits(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of ``pack_trits``: uint8 (..., ceil(length/4)) -> int8 (..., length) in {-1, 0, 1}."""
    _check_buffer(packed, packed_length(length), length, "unpack_trits")
    fields = _fields(packed)
    codes = fields.reshape(*packed.shape[:-1], -1)[..., :length]
    return codes.to(torch.int8) - 1


TRITS_PER_BASE3_BYTE = 5
_POWERS = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32)
# byte value -> its five base-3 digits minus one; values 243..255 never occur in a valid buffer
_BASE3_TABLE = ((torch.arange(256, dtype=torch.int32).unsqueeze(-1) // _POWERS) % 3 - 1).to(torch.int8)
PACKINGS = ("2bit", "base3")


def packed_length_base3(length: int) -> int:
    return -(-length // TRITS_PER_BASE3_BYTE)


def pack_base3(codes: torch.Tensor) -> torch.Tensor:
    """Pack codes in {-1, 0, 1} five to a byte: byte = Σ_j (code_j + 1)·3^j for the byte's elements 5b + j."""
    _check_codes(codes, "pack_base3")
    digits = _byte_digits(codes, TRITS_PER_BASE3_BYTE, torch.int32)
    return (digits * _POWERS.to(codes.device)).sum(-1).to(torch.uint8)


def unpack_base3(packed: torch.Tensor, length: int) -> torch.Tensor:
    _check_buffer(packed, packed_length_base3(length), length, "unpack_base3")
    codes = _BASE3_TABLE.to(packed.device)[packed.long()]
    return codes.reshape(*packed.shape[:-1], -1)[..., :length]


def pack(codes: torch.Tensor, packing: str = "2bit") -> torch.Tensor:
    """Pack with the named packing (``2bit`` or ``base3``)."""
    return {"2bit": pack_trits, "base3": pack_base3}[_packing(packing)](codes)


def unpack(packed: torch.Tensor, length: int, packing: str = "2bit") -> torch.Tensor:
    return {"2bit": unpack_trits, "base3": unpack_base3}[_packing(packing)](packed, length)


def packed_bytes(length: int, packing: str = "2bit") -> int:
    return {"2bit": packed_length, "base3": packed_length_base3}[_packing(packing)](length)


def _packing(packing: str) -> str:
    if packing not in PACKINGS:
        raise ValueError(f"unknown packing {packing!r}; expected one of {PACKINGS}")
    return packing


def check_packed(packed: torch.Tensor, length: int, name: str = "packed", packing: str = "2bit") -> None:
    """Raise if a buffer holds values no valid packing produces (signs of corruption)."""
    if _packing(packing) == "base3":
        if bool((packed > 242).any()):
            raise ValueError(f"{name}: byte value above 242 in a base-3 buffer; the buffer is corrupted")
        padding = unpack_base3(packed, packed.shape[-1] * TRITS_PER_BASE3_BYTE)[..., length:]
        if padding.numel() and bool(padding.any()):
            raise ValueError(f"{name}: padding trits are not zero; the buffer is corrupted")
        return
    _check_2bit(packed, length, name)


def _check_2bit(packed: torch.Tensor, length: int, name: str) -> None:
    """Raise if any 2-bit field holds the unused code 3 or the padding is not zero (signs of corruption)."""
    fields = _fields(packed)
    if bool((fields == 3).any()):
        raise ValueError(f"{name}: invalid 2-bit code 3 found; the buffer is corrupted")
    padding = fields.reshape(*packed.shape[:-1], -1)[..., length:]
    if padding.numel() and bool((padding != 1).any()):
        raise ValueError(f"{name}: padding trits are not zero; the buffer is corrupted")
