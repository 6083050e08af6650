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
from .ternary import TernaryTensor, expand_group_scales

SCALE_DTYPE = torch.float16  # scales are stored (and computed with) in fp16: what the artifact holds
# The smallest normal fp16: a learned scale driven toward 0 must not round to 0 in fp16, or w/α is 0/0 = NaN.
_MIN_SCALE = torch.finfo(SCALE_DTYPE).tiny


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 fake quantization, exactly as transformers' BitLinear does it (absmax over the
    last dimension, clamped at 1e-5; round half to even), with a straight-through gradient for training."""
    scale = 127 / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    quantized = (x * scale).round().clamp(-128, 127) / scale
    return x + (quantized - x).detach()


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
        activations: str = "fp",
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.planes, self.layout, self.activations = planes, layout, activations
        n_groups = -(-in_features // group_size)
        lead = (planes,) if planes > 1 else ()
        zeros = pack(torch.zeros(1, in_features, dtype=torch.int8), layout)  # the packed form of all-zero codes
        self.register_buffer("packed", zeros.expand(*lead, out_features, packed_bytes(in_features, layout))
                             .clone().to(device))
        self.register_buffer("scales", torch.zeros(*lead, scale_rows, n_groups, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_ternary(
        cls, tensor: TernaryTensor, bias: torch.Tensor | None = None, layout: str = "2bit", activations: str = "fp"
    ) -> PackedTernaryLinear:
        out_features, in_features = tensor.shape
        layer = cls(
            in_features, out_features, tensor.group_size, tensor.scales.shape[-2], bias=bias is not None,
            dtype=bias.dtype if bias is not None else torch.float32, device=tensor.codes.device,
            planes=tensor.planes, layout=layout, activations=activations,
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
        if self.activations == "int8":
            x = quantize_activations(x)
        return ternary_linear(x, self.packed, self.scales, self.group_size, self.in_features, self.bias, self.layout)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
            f"scale_rows={self.scales.shape[-2]}, planes={self.planes}, layout={self.layout}, "
            f"activations={self.activations}, "
            f"bias={self.bias is not None}"
        )


def straight_through(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Forward value: the ternary weight; gradient: identity to the latent weight (straight-through estimator)."""
    quantized = ternarize(weight.detach(), config).dequantize(weight.dtype)
    return weight + (quantized - weight).detach()


class TernaryLinear(nn.Module):
    """Training layer: a latent FP weight ternarised every forward; gradients pass straight through.

    Scales are either *recomputed* from the latent weights each step by ``config``'s rule (the threshold and
    scale follow the weights), or *learned* (``learned_scales``): one trainable scale per row/group, codes
    round(clamp(w/α, -1, 1)) and an LSQ-style gradient for α (ParetoQ's choice for ternary), initialised from
    ``config``'s fit. ``dead_zone_bias`` (Tequila) adds λ·Σ of each row's zero-coded latent weights as a
    bias: weights trapped in the dead zone then get a real gradient instead of only the STE's noise, and at
    inference the term is a constant bias vector (folded in by ``to_packed``).
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        config: QuantConfig,
        learned_scales: bool = False,
        dead_zone_bias: bool = False,
    ) -> None:
        super().__init__()
        if weight.dim() != 2:
            raise ValueError(f"TernaryLinear expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        if learned_scales and config.planes != 1:
            raise ValueError("learned scales support one trit-plane only")
        self.out_features, self.in_features = weight.shape
        self.config = config
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.scales = self.group_size = None
        if learned_scales:
            fitted = ternarize(self.weight.detach(), config)
            self.group_size = fitted.group_size
            self.scales = nn.Parameter(fitted.scales.clone())
        self.dead_zone = nn.Parameter(torch.tensor(1e-3)) if dead_zone_bias else None

    def _learned_ratio(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(α, clamp(w/α, -1, 1)) for learned scales, α per column; the forward sees the stored fp16 value of α
        while its gradient reaches the fp32 parameter."""
        alpha = self.scales.abs().clamp(min=_MIN_SCALE)
        alpha = alpha + (alpha.to(SCALE_DTYPE).float() - alpha).detach()
        alpha = expand_group_scales(alpha, self.group_size, self.in_features)
        return alpha, (self.weight / alpha).clamp(-1, 1)

    def quantized_weight(self) -> torch.Tensor:
        """The ternary weight of the forward pass, differentiable through the straight-through estimator."""
        if self.scales is None:
            return straight_through(self.weight, self.config)
        alpha, ratio = self._learned_ratio()
        return alpha * (ratio + (ratio.round() - ratio).detach())

    def _bias(self, zero: torch.Tensor) -> torch.Tensor | None:
        """The layer's bias plus, with the dead-zone option, λ·Σ of each row's latent weights where ``zero``."""
        if self.dead_zone is None:
            return self.bias
        dead = self.dead_zone * (self.weight * zero).sum(-1)
        return dead if self.bias is None else self.bias + dead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.quantized_weight()
        bias = self._bias(weight.detach() == 0)
        if self.config.activations == "int8":
            x = quantize_activations(x)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @torch.no_grad()
    def to_ternary(self) -> TernaryTensor:
        if self.scales is None:
            return ternarize(self.weight, self.config)
        _, ratio = self._learned_ratio()
        alpha = self.scales.abs().clamp(min=_MIN_SCALE).to(SCALE_DTYPE).float()
        return TernaryTensor(ratio.round().to(torch.int8), alpha, self.group_size)

    @torch.no_grad()
    def to_packed(self) -> PackedTernaryLinear:
        tensor = self.to_ternary()
        bias = self._bias(tensor.dequantize() == 0)
        return PackedTernaryLinear.from_ternary(tensor, None if bias is None else bias.detach().clone(),
                                                self.config.packing, self.config.activations)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, mode={self.config.mode}, "
                f"learned_scales={self.scales is not None}, dead_zone_bias={self.dead_zone is not None}")
