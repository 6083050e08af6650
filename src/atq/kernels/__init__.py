"""Ternary matmul kernels behind one dispatch function.

``ternary_linear`` runs the Triton kernels (``kernels/triton.py``) for CUDA inputs with one trit-plane in the 2-bit
layout and whole-word rows (in_features % 16 == 0), and the torch reference (unpack, then ``F.linear``) everywhere
else: CPU, base-3 packing, several planes, other shapes, or when Triton is missing. ``ATQ_KERNEL=reference`` forces
the reference on the GPU too. On the H100 the Triton path beat the reference at every measured batch
(results/decode_h100.json: 2.6x at batch 1 and 2.1x at batch 16 under CUDA graphs).
"""

from __future__ import annotations

import os

import torch

from .reference import dequantize_packed
from .reference import ternary_linear as reference_linear

__all__ = ["dequantize_packed", "ternary_linear", "use_triton"]


def use_triton(x: torch.Tensor, packed: torch.Tensor, group_size: int, in_features: int, layout: str) -> bool:
    if not x.is_cuda or os.environ.get("ATQ_KERNEL", "triton") == "reference":
        return False
    try:
        from . import triton as triton_kernels
    except ImportError:
        return False
    return triton_kernels.supported(x, packed, layout, in_features, group_size)


def ternary_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
    bias: torch.Tensor | None = None, layout: str = "2bit",
) -> torch.Tensor:
    if use_triton(x, packed, group_size, in_features, layout):
        from .triton import ternary_matmul

        return ternary_matmul(x, packed, scales, group_size, in_features, None if bias is None else bias.to(x.dtype))
    return reference_linear(x, packed, scales, group_size, in_features, bias, layout)
