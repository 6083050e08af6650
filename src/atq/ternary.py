"""TernaryTensor: the one representation of a ternary weight (DESIGN rule 2).

Every granularity is stored the same way, as groups along the input dimension: a per-tensor scale is one group
spanning a whole (flattened) tensor, a per-row scale is one group per row, and group scales split each row into
``ceil(in_features / group_size)`` groups whose last one may be shorter. A single layout keeps dequantize,
packing, kernels and export free of per-granularity branches.

Several trit-planes (W ≈ Σ_k α_k·T_k, PTQTP) add a leading plane dimension to codes and scales; one plane is
stored without it, so the common case stays a plain (out, in) matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TernaryTensor:
    """codes: int8 ([planes,] out, in) in {-1, 0, 1}; scales: float ([planes,] 1 or out, n_groups).

    ``scales.shape[-2] == 1`` means one scale row shared by all output rows (per-tensor scale).
    ``thresholds`` (same shape as scales) record the cutoff that produced the codes, for reports only.
    ``rounded`` (out, in), when set, holds the continuous values whose rounding produced the codes (GPTQ's
    compensated weights): block reconstruction starts its latent weights there. Never stored in artifacts.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    group_size: int
    thresholds: torch.Tensor | None = None
    rounded: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.codes.dim() not in (2, 3):
            raise ValueError(
                f"TernaryTensor codes must be (out, in) or (planes, out, in), got shape {tuple(self.codes.shape)}"
            )
        if self.codes.dtype != torch.int8:
            raise ValueError(f"TernaryTensor codes must be int8, got {self.codes.dtype}")
        out_features, in_features = self.codes.shape[-2:]
        expected_groups = -(-in_features // self.group_size)
        if self.scales.dim() != self.codes.dim() or self.scales.shape[:-2] != self.codes.shape[:-2] or (
            self.scales.shape[-2] not in (1, out_features) or self.scales.shape[-1] != expected_groups
        ):
            raise ValueError(
                f"TernaryTensor scales shape {tuple(self.scales.shape)} does not fit codes {tuple(self.codes.shape)}"
                f" with group_size {self.group_size} (expected (1 or {out_features}, {expected_groups})"
                " with the same leading plane dimension)"
            )

    @property
    def shape(self) -> torch.Size:
        """The weight's (out, in) shape, whatever the number of planes."""
        return self.codes.shape[-2:]

    @property
    def planes(self) -> int:
        return self.codes.shape[0] if self.codes.dim() == 3 else 1

    @property
    def n_groups(self) -> int:
        return self.scales.shape[-1]

    def expanded_scales(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Scales broadcast to (1 or out, in): each input column gets its group's scale."""
        scales = self.scales if dtype is None else self.scales.to(dtype)
        return expand_group_scales(scales, self.group_size, self.codes.shape[-1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dense_weight(self.codes, self.scales, self.group_size, dtype)

    def sparsity(self) -> float:
        """Fraction of weights that are exactly zero (all planes zero)."""
        codes = self.codes if self.codes.dim() == 2 else self.codes.abs().sum(0)
        return float((codes == 0).float().mean())


def dense_weight(codes: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Σ_planes codes · scales (each column its group's scale) as a dense (out, in) weight in ``dtype``."""
    dense = codes.to(dtype) * expand_group_scales(scales.to(dtype), group_size, codes.shape[-1])
    return dense.sum(0) if dense.dim() == 3 else dense


def expand_group_scales(scales: torch.Tensor, group_size: int, in_features: int) -> torch.Tensor:
    """Repeat each group's scale over its columns (a short last group only over the columns it has).

    Built from expanded views joined by ``cat``, never by cutting a longer tensor: torch.compile's CPU code (torch
    2.13) read the wrong scales past the first group when a ``repeat_interleave``-d tensor was cut to
    ``in_features``, and crashed in the backward of the equivalent gather (both found by test_qat's
    compiled-blocks test); this form compiles to the eager values, forward and backward."""
    full, rest = divmod(in_features, group_size)
    lead = scales.shape[:-1]
    parts = [scales[..., :full, None].expand(*lead, full, group_size).flatten(-2)] if full else []
    if rest:
        parts.append(scales[..., full : full + 1].expand(*lead, rest))
    return torch.cat(parts, -1) if len(parts) > 1 else parts[0]
