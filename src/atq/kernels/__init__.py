"""Ternary matmul kernels behind one dispatch function, ``ternary_linear(x, weight, bias)``.

The Triton kernels (``kernels/triton.py``) run for CUDA inputs with one trit-plane in the 2-bit packing and
whole-word rows (in_features % 16 == 0); the torch reference (unpack, then ``F.linear``) runs everywhere else: CPU,
base-3 packing, several planes, other shapes, or when Triton is missing. ``ATQ_KERNEL=reference`` forces the
reference on the GPU too (results/decode_h100.json compares the two).

Under ``torch.compile`` the Triton call goes through the custom op ``atq::ternary_matmul``: the compiler sees one
opaque node with a known output shape and fuses the norms, rotary embeddings and activations around it, which
eager decoding launches one small kernel at a time.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from ..ternary import PackedTernary
from .reference import ternary_linear as reference_linear

__all__ = ["ternary_linear", "use_triton"]

_UNLOADED = object()
_triton: object = _UNLOADED  # the Triton module, or None where Triton cannot be imported


def _triton_kernels() -> ModuleType | None:
    """kernels/triton.py, imported once (None without Triton): a plain global, which torch.compile can read."""
    global _triton
    if _triton is _UNLOADED:
        try:
            from . import triton as module
        except ImportError:
            module = None
        _triton = module
    return _triton  # type: ignore[return-value]


def use_triton(x: torch.Tensor, weight: PackedTernary) -> bool:
    if not x.is_cuda or os.environ.get("ATQ_KERNEL", "triton") == "reference":
        return False
    kernels = _triton_kernels()
    return kernels is not None and kernels.supported(x, weight.packed, weight.packing, weight.in_features,
                                                     weight.group_size)


def ternary_linear(x: torch.Tensor, weight: PackedTernary, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ Wᵀ + bias for the packed ternary weight W, by the fastest kernel that supports the inputs."""
    if use_triton(x, weight):
        bias = None if bias is None else bias.to(x.dtype)
        if torch.compiler.is_compiling():
            return torch.ops.atq.ternary_matmul(x, weight.packed, weight.scales, weight.group_size,
                                                weight.in_features, bias)
        return _triton_kernels().ternary_matmul(x, weight.packed, weight.scales, weight.group_size,
                                                weight.in_features, bias)
    return reference_linear(x, weight, bias)


@torch.library.custom_op("atq::ternary_matmul", mutates_args=())
def _ternary_matmul_op(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int,
                       in_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The Triton product as one opaque operator for torch.compile (see the module docstring)."""
    return _triton_kernels().ternary_matmul(x, packed, scales, group_size, in_features, bias)


@_ternary_matmul_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], packed.shape[0])
