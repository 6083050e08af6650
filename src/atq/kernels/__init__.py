"""Ternary matmul kernels behind one dispatch function.

Only the torch reference exists so far; a GPU kernel plugs in here without touching the layers.
"""

from __future__ import annotations

from .reference import dequantize_packed, ternary_linear

__all__ = ["dequantize_packed", "ternary_linear"]
