"""Pure tensor math: thresholds, scales and grouping that turn a weight matrix into a TernaryTensor.

No modules, no I/O. Each scale group is fitted independently; groups of equal length are processed together as
a (rows, groups, length) tensor, and a shorter last group (576 inputs with groups of 128) as a second such
tensor, so no padding value can leak into a quantile or a mean.
"""

from __future__ import annotations

import torch

from .config import QuantConfig
from .ternary import TernaryTensor


def check_finite(weight: torch.Tensor, name: str = "weight") -> None:
    """Refuse NaN/Inf: a single one silently poisons every threshold and scale of its group."""
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); ternarisation needs finite weights")


def ternarize(weight: torch.Tensor, config: QuantConfig, name: str = "weight") -> TernaryTensor:
    """Fit codes in {-1, 0, 1} and one scale per group of ``weight`` (out, in) as ``config`` says."""
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D (out, in) weight, got shape {tuple(weight.shape)}")
    check_finite(weight, name)
    w = weight.detach().float()
    out_features, in_features = w.shape
    if config.granularity == "tensor":
        blocks, group_size = [w.reshape(1, 1, -1)], in_features
    elif config.granularity == "row":
        blocks, group_size = [w.reshape(out_features, 1, in_features)], in_features
    else:
        group_size = min(config.group_size, in_features)
        full = in_features // group_size
        blocks = [w[:, : full * group_size].reshape(out_features, full, group_size)]
        if in_features % group_size:
            blocks.append(w[:, full * group_size :].reshape(out_features, 1, -1))

    keeps, scales, thresholds = [], [], []
    for block in blocks:
        keep, threshold = fit_threshold(block, config)
        keeps.append(keep)
        scales.append(mean_kept_magnitude(block.abs(), keep))
        thresholds.append(threshold)

    if config.granularity == "group":
        keep = torch.cat([k.reshape(out_features, -1) for k in keeps], dim=1)
    else:
        keep = keeps[0].reshape(out_features, in_features)
    codes = (torch.sign(w) * keep).to(torch.int8)
    return TernaryTensor(
        codes=codes,
        scales=torch.cat(scales, dim=1),
        group_size=group_size,
        thresholds=torch.cat(thresholds, dim=1),
    )


def fit_threshold(block: torch.Tensor, config: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (keep mask, threshold) for signed weights laid out as (rows, groups, length)."""
    magnitude = block.abs()
    if config.mode == "magnitude":
        if config.threshold is not None:
            threshold = torch.full(block.shape[:2], float(config.threshold), device=block.device)
        else:
            # The seed's rule: alpha times the (unbiased) standard deviation of the signed weights.
            std = block.std(dim=-1) if block.shape[-1] > 1 else torch.zeros(block.shape[:2], device=block.device)
            threshold = config.alpha * std
        return magnitude > threshold.unsqueeze(-1), threshold
    if config.mode == "sparsity":
        length = block.shape[-1]
        return _keep_top(magnitude, length - round(config.sparsity * length))
    return _mse_optimal(magnitude)


def _keep_top(magnitude: torch.Tensor, n_keep: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``n_keep`` largest |w| of each group (by rank, so ties cannot change the count).

    ``n_keep`` is an int or a (rows, groups) tensor. The reported threshold is the midpoint between the
    largest dropped and the smallest kept magnitude.
    """
    length = magnitude.shape[-1]
    ordered, order = magnitude.sort(dim=-1, descending=True)
    n_keep = torch.as_tensor(n_keep, device=magnitude.device).expand(magnitude.shape[:2])
    ranks = torch.arange(length, device=magnitude.device)
    keep_sorted = ranks < n_keep.unsqueeze(-1)
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    padded = torch.cat([ordered, torch.zeros_like(ordered[..., :1])], dim=-1)
    last_kept = padded.gather(-1, (n_keep - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
    first_dropped = padded.gather(-1, n_keep.unsqueeze(-1)).squeeze(-1)
    threshold = torch.where(n_keep > 0, (last_kept + first_dropped) / 2, ordered[..., 0])
    return keep, threshold


def _mse_optimal(magnitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact minimiser of ||w - α·t||² over thresholds: keep the k largest |w| with k = argmax S_k²/k.

    For fixed support of size k the best α is S_k/k and the residual is ||w||² - S_k²/k, so maximising
    S_k²/k over k (a prefix sum of the sorted magnitudes) is the whole search. Float64 sums keep the
    argmax exact for per-tensor groups of millions of weights.
    """
    ordered = magnitude.sort(dim=-1, descending=True).values.double()
    counts = torch.arange(1, ordered.shape[-1] + 1, device=magnitude.device, dtype=torch.float64)
    objective = ordered.cumsum(dim=-1).pow(2) / counts
    n_keep = objective.argmax(dim=-1) + 1
    n_keep = torch.where(ordered[..., 0] > 0, n_keep, torch.zeros_like(n_keep))
    return _keep_top(magnitude, n_keep)


def mean_kept_magnitude(magnitude: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Least-squares scale for fixed codes: mean |w| over kept weights (0 for an all-zero group)."""
    kept = keep.to(magnitude.dtype)
    return (magnitude * kept).sum(-1) / kept.sum(-1).clamp(min=1)
