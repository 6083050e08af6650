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
    return fit_ternary(weight, config, name)[0]


def fit_ternary(
    weight: torch.Tensor, config: QuantConfig, name: str = "weight"
) -> tuple[TernaryTensor, torch.Tensor | None]:
    """``ternarize``, also returning the per-group thresholds that produced the codes (None for trit-planes,
    whose thresholds are implicit): reports show them, nothing else needs them."""
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

    if config.planes > 1:
        fitted = [fit_planes(block, planes=config.planes) for block in blocks]  # thresholds are implicit
        codes = torch.cat([c.reshape(config.planes, out_features, -1) for c, _ in fitted], dim=-1)
        scales = torch.cat([a for _, a in fitted], dim=-1)
        return TernaryTensor(codes=codes, scales=scales, group_size=group_size), None

    keeps, scales, thresholds = [], [], []
    for block in blocks:
        keep, threshold = fit_threshold(block, config)
        keeps.append(keep)
        # absmean's scale is its own definition (mean of all |w|), the others' the least-squares one
        scales.append(block.abs().mean(-1) if config.mode == "absmean" else mean_kept_magnitude(block.abs(), keep))
        thresholds.append(threshold)

    keep = torch.cat([k.reshape(out_features, -1) for k in keeps], dim=1)
    codes = (torch.sign(w) * keep).to(torch.int8)
    return TernaryTensor(codes=codes, scales=torch.cat(scales, dim=1), group_size=group_size), torch.cat(thresholds, 1)


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
    if config.mode == "absmean":  # round(w/γ) != 0 exactly when |w| > γ/2 (ties round to even: to 0)
        threshold = magnitude.mean(-1) / 2
        return magnitude > threshold.unsqueeze(-1), threshold
    if config.mode == "sparsity":
        length = block.shape[-1]
        return keep_top(magnitude, length - round(config.sparsity * length))
    return _mse_optimal(magnitude)


def keep_top(magnitude: torch.Tensor, n_keep: int | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
    return keep_top(magnitude, n_keep)


def mean_kept_magnitude(magnitude: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Least-squares scale for fixed codes: mean |w| over kept weights (0 for an all-zero group)."""
    kept = keep.to(magnitude.dtype)
    return (magnitude * kept).sum(-1) / kept.sum(-1).clamp(min=1)


def trit_combinations(planes: int, device: torch.device | str | None = None) -> torch.Tensor:
    """All 3^planes code tuples as a (3^planes, planes) float tensor: the levels of a K-plane grid are C @ α.

    The all-zero tuple comes first, so a tie (a zero scale makes every level 0) resolves to code 0.
    """
    grids = torch.meshgrid(*[torch.tensor([0.0, -1.0, 1.0], device=device)] * planes, indexing="ij")
    return torch.stack([g.reshape(-1) for g in grids], dim=-1)


def fit_planes(
    block: torch.Tensor, importance: torch.Tensor | None = None, planes: int = 1, iterations: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit W ≈ Σ_k α_k·T_k per group of ``block`` (rows, groups, length), minimising Σ d·(w − ŵ)².

    ``importance`` d broadcasts to ``block`` (None: uniform). Initialised greedily (each plane the exact
    MSE-optimal ternary fit of the previous residual), then refined alternately (PTQTP): assign every weight to
    the nearest level of the 3^K-level grid, then solve the K x K weighted least squares for the scales.
    Returns codes (planes, rows, groups, length) int8 and scales (planes, rows, groups).
    """
    w = block.float()
    d = torch.ones_like(w) if importance is None else importance.float().expand_as(w)
    residual, alphas = w, []
    for _ in range(planes):
        keep, _ = _mse_optimal(residual.abs())
        kept = keep.float() * d
        alpha = (residual.abs() * kept).sum(-1) / kept.sum(-1).clamp(min=1e-30)
        alphas.append(alpha)
        residual = residual - alpha.unsqueeze(-1) * torch.sign(residual) * keep
    alpha = torch.stack(alphas, dim=-1)  # (rows, groups, K)
    combos = trit_combinations(planes, w.device)  # (L, K)
    for _ in range(iterations):
        trits = combos[nearest_level(w, alpha @ combos.T)]  # (rows, groups, length, K)
        gram = torch.einsum("rgnk,rgnl,rgn->rgkl", trits, trits, d)
        rhs = torch.einsum("rgnk,rgn->rgk", trits, d * w)
        # An unused plane (a zero diagonal entry) would make the system singular: give it a unit diagonal, so
        # its scale solves to 0; a tiny relative ridge covers planes that coincide.
        diagonal = gram.diagonal(dim1=-2, dim2=-1)
        ridge = 1e-6 * diagonal.mean(-1, keepdim=True) + (diagonal == 0)
        alpha = torch.linalg.solve(gram + torch.diag_embed(ridge), rhs)
    trits = combos[nearest_level(w, alpha @ combos.T)]
    return trits.permute(3, 0, 1, 2).to(torch.int8), alpha.permute(2, 0, 1).contiguous()


def nearest_level(values: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of ``levels`` (..., L) for each entry of ``values`` (..., n)."""
    return (values.unsqueeze(-1) - levels.unsqueeze(-2)).abs().argmin(-1)
