"""Ternary matmul kernels behind one dispatch function, ``ternary_linear(x, weight, bias)``.

The Triton kernels (``kernels/triton.py``) run for CUDA inputs with one trit-plane in the 2-bit packing and
whole-word rows (in_features % 16 == 0); the torch reference (unpack, then ``F.linear``) runs everywhere else: CPU,
base-3 packing, several planes, other shapes, or when Triton is missing. ``ATQ_KERNEL=reference`` forces the
reference on the GPU too (results/decode_h100.json compares the two).
"""

from __future__ import annotations

import os

import torch

from ..ternary import PackedTernary
from .reference import ternary_linear as reference_linear

__all__ = ["ternary_linear", "use_triton"]


def use_triton(x: torch.Tensor, weight: PackedTernary) -> bool:
    if not x.is_cuda or os.environ.get("ATQ_KERNEL", "triton") == "reference":
        return False
    try:
        from . import triton as triton_kernels
    except ImportError:
        return False
    return triton_kernels.supported(x, weight.packed, weight.packing, weight.in_features, weight.group_size)


def ternary_linear(x: torch.Tensor, weight: PackedTernary, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ Wᵀ + bias for the packed ternary weight W, by the fastest kernel that supports the inputs."""
    if use_triton(x, weight):
        from .triton import ternary_matmul

        return ternary_matmul(x, weight.packed, weight.scales, weight.group_size, weight.in_features,
                              None if bias is None else bias.to(x.dtype))
    return reference_linear(x, weight, bias)
