"""GPTQ on ternary grids: pure tensors, Hessians in, TernaryTensors out.

The reference GPTQ's ``fasterquant`` with its uniform grid replaced by a per-group ternary (or K-plane) grid:
each group's grid is fitted on the group's columns *as already updated* by the compensation of earlier columns,
then every column is rounded to it and its error pushed onto the columns not yet quantized through the
Cholesky factor of H⁻¹, in lazy batches. How a group's grid is fitted and how a value is rounded (nearest
level of K planes, or a sparsity target's threshold) is one ``Grid`` object chosen before the loop.

Problems that share an input width are stacked (rows zero-padded) and solved together: the column loop's kernel
launches, not the arithmetic, bound the speed at these sizes.
"""

from __future__ import annotations

import torch

from .quantizers import fit_planes, keep_top, mean_kept_magnitude, nearest_level, trit_combinations
from .ternary import TernaryTensor


class PlaneGrid:
    """Levels Σ_k α_k·t_k (t ∈ {-1, 0, 1}^K) per row and group, fitted by ``fit_planes`` with each column
    weighted by its OBQ importance 1/[H⁻¹]_jj; values round to the nearest level."""

    def __init__(self, planes: int, device: torch.device) -> None:
        self.planes, self.combos = planes, trit_combinations(planes, device)
        self.levels = torch.zeros(0, device=device)

    def fit(self, group: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        """Fit the grid of ``group`` (count, rows, width); returns its scales (planes, count, rows)."""
        count, rows, width = group.shape
        # one plane converges in a few alternations from its exact MSE start; planes interact longer
        _, alpha = fit_planes(group.reshape(count * rows, 1, width),
                              importance.expand(count, rows, width).reshape(count * rows, 1, width), self.planes,
                              iterations=4 if self.planes == 1 else 8)
        alpha = alpha.reshape(self.planes, count, rows)
        self.levels = torch.einsum("kbr,lk->brl", alpha, self.combos)
        return alpha

    def round(self, values: torch.Tensor) -> torch.Tensor:
        """Level index (into ``combos``) of each of ``values`` (count, rows, width)."""
        return nearest_level(values, self.levels)

    def value(self, index: torch.Tensor) -> torch.Tensor:
        return self.levels.gather(-1, index)


class SparsityGrid(PlaneGrid):
    """One plane whose threshold is the ``sparsity`` quantile of the group's |w|; kept values round to ±α with
    α their mean magnitude. The zero fraction then follows the target (approximately: columns after the group's
    first keep moving under compensation)."""

    def __init__(self, sparsity: float, device: torch.device) -> None:
        super().__init__(1, device)
        self.sparsity, self.cutoff = sparsity, torch.zeros(0, device=device)

    def fit(self, group: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
        count, rows, width = group.shape
        keep, threshold = keep_top(group.abs(), width - round(self.sparsity * width))
        alpha = mean_kept_magnitude(group.abs(), keep).reshape(1, count, rows)
        self.cutoff = threshold.reshape(count, rows, 1)
        self.levels = torch.einsum("kbr,lk->brl", alpha, self.combos)
        return alpha

    def round(self, values: torch.Tensor) -> torch.Tensor:
        # combos are ordered (0, -1, +1)
        return torch.where(values.abs() > self.cutoff, torch.where(values > 0, 2, 1), 0)


def gptq_ternary(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, planes: int = 1, damp: float = 0.01,
                 block_size: int = 128, compensate: bool = True,
                 sparsity: float | None = None) -> tuple[TernaryTensor, torch.Tensor]:
    """Quantize one weight (out, in) against its Hessian; see ``gptq_ternary_batched``."""
    return gptq_ternary_batched([weight], [hessian], group_size, planes, damp, block_size, compensate, sparsity)[0]


def gptq_ternary_batched(
    weights: list[torch.Tensor], hessians: list[torch.Tensor], group_size: int, planes: int = 1,
    damp: float = 0.01, block_size: int = 128, compensate: bool = True, sparsity: float | None = None,
) -> list[tuple[TernaryTensor, torch.Tensor]]:
    """Quantize weights (out_b, n) column by column onto per-group ternary grids, all problems at once.

    Returns, per weight, the TernaryTensor and the values its columns had when they were rounded (the
    compensated weights, from which block reconstruction can start latent weights). ``compensate=False`` rounds
    each group as fitted, with no error propagation. ``sparsity`` (one plane only) selects the threshold grid.
    Dead inputs (zero Hessian diagonal) are handled by dampening, never a crash.
    """
    if sparsity is not None and planes != 1:
        raise ValueError("a sparsity target applies to one trit-plane only")
    w, upper = _stack(weights, hessians, damp)
    count, rows, n = w.shape
    grid = PlaneGrid(planes, w.device) if sparsity is None else SparsityGrid(sparsity, w.device)
    group_size = min(group_size, n)
    index = torch.zeros(count, rows, n, dtype=torch.long, device=w.device)
    rounded = torch.zeros(count, rows, n, device=w.device)  # the value each column had when it was rounded
    scales = torch.zeros(planes, count, rows, -(-n // group_size), device=w.device)
    solve = _compensated if compensate else _rounded_groups
    solve(w, upper, grid, group_size, max(block_size // group_size, 1) * group_size, index, rounded, scales)
    codes = grid.combos[index].permute(3, 0, 1, 2).to(torch.int8)  # (planes, count, rows, n)
    results = []
    for b, weight in enumerate(weights):
        c, a = codes[:, b, : weight.shape[0]], scales[:, b, : weight.shape[0]]
        tensor = TernaryTensor(c[0] if planes == 1 else c, a[0] if planes == 1 else a, group_size)
        results.append((tensor, rounded[b, : weight.shape[0]]))
    return results


def _stack(weights: list[torch.Tensor], hessians: list[torch.Tensor], damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack the problems, zero the weights of dead inputs, dampen the Hessians; returns (weights, the upper
    Cholesky factor of H⁻¹)."""
    n = weights[0].shape[1]
    if any(w.shape[1] != n for w in weights):
        raise ValueError("gptq_ternary_batched: all weights must have the same input width")
    w = torch.zeros(len(weights), max(w.shape[0] for w in weights), n, device=weights[0].device)
    for b, weight in enumerate(weights):
        w[b, : weight.shape[0]] = weight.detach().float()
    h = torch.stack([hessian.detach().float() for hessian in hessians])
    diagonal = h.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    w.masked_fill_(dead.unsqueeze(1), 0.0)
    diagonal.add_(damp * diagonal.mean(-1, keepdim=True))
    return w, torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _importance(upper: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """The OBQ cost of each column, 1/[H⁻¹]_jj, as (count, 1, width)."""
    return upper.diagonal(dim1=-2, dim2=-1)[:, None, start : start + width].pow(-2)


def _compensated(w: torch.Tensor, upper: torch.Tensor, grid: PlaneGrid, group_size: int, block_size: int,
                 index: torch.Tensor, rounded: torch.Tensor, scales: torch.Tensor) -> None:
    """GPTQ's column loop with lazy batch updates, writing ``index``, ``rounded`` and ``scales`` in place."""
    n = w.shape[-1]
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block, u = w[:, :, i1:i2].clone(), upper[:, i1:i2, i1:i2]
        errors = torch.zeros_like(block)
        for i in range(i2 - i1):
            column = i1 + i
            if column % group_size == 0:
                width = min(group_size, n - column)
                scales[..., column // group_size] = grid.fit(block[:, :, i : i + width],
                                                             _importance(upper, column, width))
            value = block[:, :, i : i + 1]
            chosen = grid.round(value)
            index[:, :, column], rounded[:, :, column] = chosen.squeeze(-1), value.squeeze(-1)
            errors[:, :, i] = (value - grid.value(chosen)).squeeze(-1) / u[:, i, i].unsqueeze(-1)
            block[:, :, i:] -= errors[:, :, i].unsqueeze(-1) * u[:, i, i:].unsqueeze(1)
        w[:, :, i2:] -= torch.bmm(errors, upper[:, i1:i2, i2:])


def _rounded_groups(w: torch.Tensor, upper: torch.Tensor, grid: PlaneGrid, group_size: int, block_size: int,
                    index: torch.Tensor, rounded: torch.Tensor, scales: torch.Tensor) -> None:
    """No compensation: columns are independent, so each group is fitted and rounded at once."""
    for column in range(0, w.shape[-1], group_size):
        value = w[:, :, column : column + group_size]
        scales[..., column // group_size] = grid.fit(value, _importance(upper, column, value.shape[-1]))
        index[:, :, column : column + value.shape[-1]] = grid.round(value)
        rounded[:, :, column : column + value.shape[-1]] = value
