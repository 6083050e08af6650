"""Reference ternary matmul in plain torch: unpack, scale, ``F.linear``. Runs everywhere; tests trust it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import unpack_trits
from ..ternary import expand_group_scales


def dequantize_packed(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """Packed codes (out, ceil(in/4)) and group scales (1|out, groups) -> dense (out, in) weight in ``dtype``."""
    codes = unpack_trits(packed, in_features)
    return codes.to(dtype) * expand_group_scales(scales.to(dtype), group_size, in_features)


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    weight = dequantize_packed(packed, scales, group_size, in_features, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
