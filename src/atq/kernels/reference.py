"""Reference ternary matmul in plain torch: unpack, scale, ``F.linear``. Runs everywhere; tests trust it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..packing import unpack
from ..ternary import dense_weight


def dequantize_packed(
    packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int, dtype: torch.dtype,
    layout: str = "2bit",
) -> torch.Tensor:
    """Packed codes ([planes,] out, bytes) and scales ([planes,] 1|out, groups) -> dense (out, in)."""
    return dense_weight(unpack(packed, in_features, layout), scales, group_size, dtype)


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    in_features: int,
    bias: torch.Tensor | None = None,
    layout: str = "2bit",
) -> torch.Tensor:
    weight = dequantize_packed(packed, scales, group_size, in_features, x.dtype, layout)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))
