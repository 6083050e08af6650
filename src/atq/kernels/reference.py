"""Reference ternary matmul in plain torch: unpack, scale, ``F.linear``. Runs everywhere; tests trust it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ternary import PackedTernary


def ternary_linear(x: torch.Tensor, weight: PackedTernary, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, weight.dequantize(x.dtype), None if bias is None else bias.to(x.dtype))
