"""Ternary matmul kernels behind one dispatch function.

``ternary_linear`` runs the Triton kernel (``kernels/triton.py``) when ``ATQ_KERNEL=triton`` is set, for CUDA
inputs with one trit-plane in the 2-bit layout, and the torch reference (unpack, then ``F.linear``) everywhere
else: CPU, base-3 packing, several planes, or when Triton is missing. The kernel is opt-in until it has been
measured on a GPU (so far it is verified in Triton's interpreter on the CPU only).
"""

from __future__ import annotations

import os

import torch

from .reference import dequantize_packed
from .reference import ternary_linear as reference_linear

__all__ = ["dequantize_packed", "ternary_linear", "use_triton"]


def use_triton(x: torch.Tensor, packed: torch.Tensor, group_size: int, in_features: int, layout: str) -> bool:
    if not x.is_cuda or os.environ.get("ATQ_KERNEL") != "triton":
        return False
    if group_size < in_features and group_size % 16:
        return False
    try:
        from . import triton as triton_kernels
    except ImportError:
        return False
    return triton_kernels.supported(x, packed, layout)


def ternary_linear(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
    bias: torch.Tensor | None = None, layout: str = "2bit",
) -> torch.Tensor:
    if use_triton(x, packed, group_size, in_features, layout):
        from .triton import ternary_matmul

        return ternary_matmul(x, packed, scales, group_size, in_features, None if bias is None else bias.to(x.dtype))
    return reference_linear(x, packed, scales, group_size, in_features, bias, layout)
