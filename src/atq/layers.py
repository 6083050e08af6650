"""Ternary linear layers: one for training (latent weights + STE), one for inference (packed buffers).

Both take weights in nn.Linear orientation (out, in); GPT-2's Conv1D is transposed once, in surgery.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .kernels import dequantize_packed, ternary_linear
from .packing import pack, packed_bytes, unpack
from .quantizers import ternarize
from .ternary import TernaryTensor

SCALE_DTYPE = torch.float16  # scales are stored (and computed with) in fp16: what the artifact holds


class PackedTernaryLinear(nn.Module):
    """Inference layer: packed 2-bit codes ([planes,] out, ceil(in/4)) uint8 + fp16 scales ([planes,] 1|out, groups).

    Row-major along the input dimension, the layout a GEMV kernel streams and that regroups into llama.cpp's
    TQ2_0 blocks of 256 without re-quantizing (see packing.py).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        scale_rows: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        planes: int = 1,
        layout: str = "2bit",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.planes, self.layout = planes, layout
        n_groups = -(-in_features // group_size)
        lead = (planes,) if planes > 1 else ()
        zeros = pack(torch.zeros(1, in_features, dtype=torch.int8), layout)  # the packed form of all-zero codes
        self.register_buffer("packed", zeros.expand(*lead, out_features, packed_bytes(in_features, layout))
                             .clone().to(device))
        self.register_buffer("scales", torch.zeros(*lead, scale_rows, n_groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_ternary(
        cls, tensor: TernaryTensor, bias: torch.Tensor | None = None, layout: str = "2bit"
    ) -> PackedTernaryLinear:
        out_features, in_features = tensor.shape
        layer = cls(
            in_features, out_features, tensor.group_size, tensor.scales.shape[-2], bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32, device=tensor.codes.device,
            planes=tensor.planes, layout=layout,
        )
        layer.packed.copy_(pack(tensor.codes, layout))
        layer.scales.copy_(tensor.scales.to(SCALE_DTYPE))
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    def ternary(self) -> TernaryTensor:
        codes = unpack(self.packed, self.in_features, self.layout)
        return TernaryTensor(codes, self.scales.float(), self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_packed(self.packed, self.scales, self.group_size, self.in_features, dtype, self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ternary_linear(x, self.packed, self.scales, self.group_size, self.in_features, self.bias, self.layout)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"scale_rows={self.scales.shape[-2]}, planes={self.planes}, layout={self.layout}, "
            f"bias={self.bias is not None}"
        )


def straight_through(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Forward value: the ternary weight; gradient: identity to the latent weight (straight-through estimator)."""
    quantized = ternarize(weight.detach(), config).dequantize(weight.dtype)
    return weight + (quantized - weight).detach()


class TernaryLinear(nn.Module):
    """Training layer: a latent FP weight re-ternarised every forward; gradients pass straight through."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"TernaryLinear expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.config = config
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, straight_through(self.weight, self.config).to(x.dtype), self.bias)

    def to_packed(self) -> PackedTernaryLinear:
        return PackedTernaryLinear.from_ternary(ternarize(self.weight, self.config), self.bias, self.config.packing)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.config.mode}"
