"""The two ternary linear layers and their lifecycle: ``TernaryLinear`` (trainable) ``.freeze()`` ->
``PackedTernaryLinear`` (inference). Block reconstruction, end-to-end tuning and QAT all swap trainable layers
in, train them, and freeze them back (tuning.py, qat.py).

Both take weights in nn.Linear orientation (out, in); GPT-2's Conv1D is transposed once, in surgery.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import QuantConfig
from .kernels import ternary_linear
from .quantizers import ternarize, trit_combinations
from .ternary import SCALE_DTYPE, PackedTernary, TernaryTensor, dense_weight, expand_group_scales

# The smallest normal fp16: a learned scale driven toward 0 must not round to 0 in fp16, or w/α is 0/0 = NaN.
_MIN_SCALE = torch.finfo(SCALE_DTYPE).tiny
ROUNDINGS = ("fixed", "nearest", "lsq", "rule")


def straight_through(value: torch.Tensor, forward: torch.Tensor) -> torch.Tensor:
    """``forward`` in the forward pass, the identity to ``value`` in the backward (the straight-through
    estimator): the one spelling of the trick for weights, scales and activations alike."""
    return value + (forward - value).detach()


def quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 fake quantization, exactly as transformers' BitLinear does it (absmax over the
    last dimension, clamped at 1e-5; round half to even), with a straight-through gradient for training."""
    scale = 127 / x.detach().abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return straight_through(x, (x * scale).round().clamp(-128, 127) / scale)


class FixedDtypeBuffers:
    """Mixin: the buffers named in ``fixed_dtype_buffers`` keep their dtype through ``.to(dtype)``, ``.half()``
    and the like (devices still move). They hold stored values (fp16 scales): a cast to bf16 would change them."""

    fixed_dtype_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse: bool = True):
        kept = {name: self._buffers[name] for name in self.fixed_dtype_buffers if self._buffers.get(name) is not None}
        result = super()._apply(fn, recurse)
        for name, original in kept.items():
            if self._buffers[name].dtype != original.dtype:
                self._buffers[name] = original.to(self._buffers[name].device)
        return result


class PackedTernaryLinear(FixedDtypeBuffers, nn.Module):
    """Inference layer holding one ``PackedTernary`` (``.qweight``) and an optional bias.

    The packed codes and scales are registered as buffers (``<name>.packed``, ``<name>.scales`` in the state
    dict, so ``.to()``, CUDA graphs and safetensors see plain tensors); ``weight`` presents them with their
    metadata as the one packed-weight type that kernels, artifacts and exports take. It is not called ``weight``:
    transformers and other libraries read ``.weight`` of linear layers as a tensor.
    """

    fixed_dtype_buffers = ("scales",)

    def __init__(self, weight: PackedTernary, bias: torch.Tensor | None = None, activations: str = "fp") -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size, self.packing, self.activations = weight.group_size, weight.packing, activations
        self.register_buffer("packed", weight.packed)
        self.register_buffer("scales", weight.scales)
        self.register_buffer("bias", None if bias is None else bias.detach().clone().to(weight.device))

    @property
    def qweight(self) -> PackedTernary:
        return PackedTernary(self.packed, self.scales, self.group_size, self.in_features, self.packing)

    @property
    def planes(self) -> int:
        return self.packed.shape[0] if self.packed.dim() == 3 else 1

    def ternary(self) -> TernaryTensor:
        return self.qweight.ternary()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.qweight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activations == "int8":
            x = quantize_activations(x)
        return ternary_linear(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"scale_rows={self.scales.shape[-2]}, planes={self.planes}, packing={self.packing}, "
                f"activations={self.activations}, bias={self.bias is not None}")


class TernaryLinear(nn.Module):
    """Trainable ternary layer; ``freeze()`` returns the PackedTernaryLinear that computes what it computed.

    ``rounding`` says how codes follow training (chosen once, at construction):
      ``fixed``   codes frozen (a PTQ layer's), scales trained: block reconstruction, end-to-end tuning;
      ``nearest`` latent weights re-rounded each step to the nearest level of the current (K-plane) grid,
                  identity gradient to the latent weights (EfficientQAT's Block-AP);
      ``lsq``     one plane, codes round(clamp(w/α, -1, 1)) and an LSQ gradient for α (ParetoQ's choice for
                  ternary QAT);
      ``rule``    scales recomputed from the latent weights each step by ``config``'s PTQ rule (no trained α).
    LSQ scales enter the forward at the fp16 value the artifact will store, so the frozen QAT layer is exact.
    ``dead_zone_bias`` (Tequila) adds λ·Σ of each row's zero-coded latent weights as a bias, so weights trapped
    in the dead zone get a real gradient; ``freeze`` folds it into a constant bias.
    """

    def __init__(self, tensor: TernaryTensor, bias: torch.Tensor | None, config: QuantConfig, *,
                 rounding: str = "fixed", latent: torch.Tensor | None = None, dead_zone_bias: bool = False) -> None:
        super().__init__()
        if rounding not in ROUNDINGS:
            raise ValueError(f"TernaryLinear rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if rounding == "lsq" and tensor.planes != 1:
            raise ValueError("learned (LSQ) scales support one trit-plane only")
        self.out_features, self.in_features = tensor.shape
        self.config, self.rounding, self.group_size = config, rounding, tensor.group_size
        start = tensor.dequantize(torch.float32) if latent is None else latent.detach().float()
        self.weight = nn.Parameter(start.clone()) if rounding != "fixed" else None
        self.register_buffer("codes", None if rounding != "fixed" else tensor.codes.float(), persistent=False)
        self.scales = nn.Parameter(tensor.scales.detach().float().clone()) if rounding != "rule" else None
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.dead_zone = nn.Parameter(torch.tensor(1e-3)) if dead_zone_bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, config: QuantConfig,
                    learned_scales: bool = False, dead_zone_bias: bool = False) -> TernaryLinear:
        """QAT from an FP weight: latent weights start at it, scales at ``config``'s fit (if learned)."""
        if weight.dim() != 2:
            raise ValueError(f"TernaryLinear expects a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
        if learned_scales and config.planes != 1:
            raise ValueError("learned scales support one trit-plane only")
        fitted = ternarize(weight.detach(), config)
        return cls(fitted, bias, config, rounding="lsq" if learned_scales else "rule", latent=weight,
                   dead_zone_bias=dead_zone_bias)

    def _alpha(self) -> torch.Tensor:
        """The learned scales as the forward sees them. LSQ: kept positive (w/α divides by them) and at their
        stored fp16 value (gradient to the fp32 parameter), so QAT trains exactly the model it will store.
        PTQ tuning (``fixed``, ``nearest``): the fp32 parameter itself; ``freeze`` rounds it to fp16."""
        if self.rounding != "lsq":
            return self.scales if torch.is_grad_enabled() else self.scales.detach()
        alpha = self.scales.abs().clamp(min=_MIN_SCALE)
        stored = alpha.to(SCALE_DTYPE).float()
        return straight_through(alpha, stored) if torch.is_grad_enabled() else stored

    @torch.no_grad()
    def current_codes(self) -> torch.Tensor:
        """The codes the forward uses now ([planes,] out, in), as floats."""
        if self.rounding == "fixed":
            return self.codes
        if self.rounding == "rule":
            return ternarize(self.weight, self.config).codes.float()
        alpha = self._alpha()
        if self.rounding == "lsq":
            return (self.weight / expand_group_scales(alpha, self.group_size, self.in_features)).clamp(-1, 1).round()
        planes = alpha if alpha.dim() == 3 else alpha.unsqueeze(0)  # (planes, rows, groups)
        combos = trit_combinations(planes.shape[0], alpha.device)
        levels = torch.einsum("krg,lk->rlg", planes, combos)  # (rows, levels, groups)
        levels = expand_group_scales(levels, self.group_size, self.in_features)  # (rows, levels, in)
        codes = combos[(self.weight.unsqueeze(1) - levels).abs().argmin(1)].permute(2, 0, 1)
        return codes if alpha.dim() == 3 else codes[0]

    def quantized_weight(self) -> torch.Tensor:
        """The ternary weight of the forward pass, differentiable as ``rounding`` says."""
        if self.rounding == "rule":
            return straight_through(self.weight, ternarize(self.weight.detach(), self.config).dequantize())
        alpha = self._alpha()
        if self.rounding == "lsq":
            alpha = expand_group_scales(alpha, self.group_size, self.in_features)
            ratio = (self.weight / alpha).clamp(-1, 1)
            return alpha * straight_through(ratio, ratio.round())
        weight = dense_weight(self.current_codes(), alpha, self.group_size, torch.float32)
        if self.rounding == "nearest":  # the latent weights take the weight's gradient as it is (identity)
            weight = weight + (self.weight - self.weight.detach())
        return weight

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
        if self.rounding == "rule":
            return ternarize(self.weight, self.config)
        return TernaryTensor(self.current_codes().to(torch.int8), self._alpha(), self.group_size)

    @torch.no_grad()
    def freeze(self) -> PackedTernaryLinear:
        """The inference layer: codes packed, scales in fp16, a dead-zone term folded into the bias."""
        tensor = self.to_ternary()
        bias = self._bias(tensor.dequantize() == 0)
        return PackedTernaryLinear(PackedTernary.pack(tensor, self.config.packing),
                                   None if bias is None else bias.detach(), self.config.activations)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rounding={self.rounding}, "
                f"dead_zone_bias={self.dead_zone is not None}")
