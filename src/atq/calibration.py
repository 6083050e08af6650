"""Calibrated post-training ternarisation: sequential block-by-block, GPTQ-style error compensation on a
ternary (or K-plane) grid, then optional block-wise reconstruction of the scales.

The inputs of decoder block i are produced by blocks 0..i-1 *already quantized*, so each block compensates the
errors of the ones before it. Per layer, the Hessian H = Σ xᵀx of its inputs is accumulated once per block.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .layers import PackedTernaryLinear
from .packing import pack
from .quantizers import fit_planes, keep_top, mean_kept_magnitude, nearest_level, trit_combinations
from .surgery import decoder_blocks, linear_weight, set_module
from .ternary import TernaryTensor, dense_weight, expand_group_scales

log = logging.getLogger(__name__)


def gptq_ternary(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    planes: int = 1,
    damp: float = 0.01,
    block_size: int = 128,
    compensate: bool = True,
    sparsity: float | None = None,
) -> TernaryTensor:
    """Quantize one weight (out, in) against its Hessian; see ``gptq_ternary_batched``."""
    return gptq_ternary_batched([weight], [hessian], group_size, planes, damp, block_size, compensate, sparsity)[0]


def gptq_ternary_batched(
    weights: list[torch.Tensor],
    hessians: list[torch.Tensor],
    group_size: int,
    planes: int = 1,
    damp: float = 0.01,
    block_size: int = 128,
    compensate: bool = True,
    sparsity: float | None = None,
) -> list[TernaryTensor]:
    """Quantize weights (out_b, n) column by column onto per-group K-plane ternary grids, all problems at once.

    Each group's scales are fitted (``fit_planes``, weighted by 1/[H⁻¹]_jj, the OBQ cost of each column) on the
    group's columns *as already updated* by the compensation of earlier columns. With ``compensate`` each
    column's rounding error is spread over the remaining columns through the Cholesky factor of H⁻¹ (GPTQ), in
    lazy batches of ``block_size`` columns. Dead inputs (zero diagonal) are handled by dampening, never a crash.

    With ``sparsity`` (one plane only) each group's threshold is instead the ``sparsity`` quantile of its updated
    |w| and columns round by that threshold, so the zero fraction follows the target (approximately: columns
    after the group's first keep moving under compensation); otherwise columns round to the nearest level.

    The problems share the input width n and are stacked (rows zero-padded) so that one Python loop over the
    columns serves them all: the loop's kernel launches, not the arithmetic, bound the speed at this size.
    """
    n = weights[0].shape[1]
    if any(w.shape[1] != n for w in weights):
        raise ValueError("gptq_ternary_batched: all weights must have the same input width")
    device, count, rows = weights[0].device, len(weights), max(w.shape[0] for w in weights)
    w = torch.zeros(count, rows, n, device=device)
    for b, weight in enumerate(weights):
        w[b, : weight.shape[0]] = weight.detach().float()
    h = torch.stack([hessian.detach().float() for hessian in hessians])
    diagonal = h.diagonal(dim1=-2, dim2=-1)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    w.masked_fill_(dead.unsqueeze(1), 0.0)
    diagonal.add_(damp * diagonal.mean(-1, keepdim=True))
    upper = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    importance = upper.diagonal(dim1=-2, dim2=-1).pow(-2)  # (count, n)

    group_size = min(group_size, n)
    block_size = max(block_size // group_size, 1) * group_size  # groups never straddle a lazy block
    combos = trit_combinations(planes, device)
    index = torch.zeros(count, rows, n, dtype=torch.long, device=device)
    rounded = torch.zeros(count, rows, n, device=device)  # the value each column had when it was rounded
    scales = torch.zeros(planes, count, rows, -(-n // group_size), device=device)
    if sparsity is not None and planes != 1:
        raise ValueError("a sparsity target applies to one trit-plane only")
    levels = torch.zeros(count, rows, len(combos), device=device)
    cutoff = torch.zeros(count, rows, 1, device=device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        block, u = w[:, :, i1:i2].clone(), upper[:, i1:i2, i1:i2]
        errors = torch.zeros(count, rows, i2 - i1, device=device)
        for i in range(i2 - i1):
            column = i1 + i
            if column % group_size == 0:
                width = min(group_size, n - column)
                group = block[:, :, i : i + width].reshape(count * rows, 1, width)
                weight_of = importance[:, None, column : column + width].expand(count, rows, width)
                # one plane converges in a few alternations from its exact MSE start; planes interact longer
                if sparsity is None:
                    _, alpha = fit_planes(group, weight_of.reshape(count * rows, 1, width), planes,
                                          iterations=4 if planes == 1 else 8)
                    alpha = alpha.reshape(planes, count, rows)
                else:
                    keep, threshold = keep_top(group.abs(), width - round(sparsity * width))
                    alpha = mean_kept_magnitude(group.abs(), keep).reshape(1, count, rows)
                    cutoff = threshold.reshape(count, rows, 1)
                scales[..., column // group_size] = alpha
                levels = torch.einsum("kbr,lk->brl", alpha, combos)
            if not compensate:  # columns are independent: round the whole group at once
                if column % group_size == 0:
                    value = block[:, :, i : i + width]
                    index[:, :, column : column + width] = _round(value, levels, cutoff, sparsity)
                    rounded[:, :, column : column + width] = value
                continue
            value = block[:, :, i : i + 1]
            chosen = _round(value, levels, cutoff, sparsity)  # (count, rows, 1)
            index[:, :, column] = chosen.squeeze(-1)
            rounded[:, :, column] = value.squeeze(-1)
            error = (block[:, :, i] - levels.gather(-1, chosen).squeeze(-1)) / u[:, i, i].unsqueeze(-1)
            block[:, :, i:] -= error.unsqueeze(-1) * u[:, i, i:].unsqueeze(1)
            errors[:, :, i] = error
        if compensate:
            w[:, :, i2:] -= torch.bmm(errors, upper[:, i1:i2, i2:])
    codes = combos[index].permute(3, 0, 1, 2).to(torch.int8)  # (planes, count, rows, n)
    results = []
    for b, weight in enumerate(weights):
        out = weight.shape[0]
        c, a = codes[:, b, :out], scales[:, b, :out]
        results.append(TernaryTensor(codes=c[0] if planes == 1 else c, scales=a[0] if planes == 1 else a,
                                     group_size=group_size, rounded=rounded[b, :out]))
    return results


def _round(values: torch.Tensor, levels: torch.Tensor, cutoff: torch.Tensor, sparsity: float | None) -> torch.Tensor:
    """Level index of each value: the nearest level, or with a sparsity target the group's threshold rule
    (combos are ordered (0, -1, +1))."""
    if sparsity is None:
        return nearest_level(values, levels)
    return torch.where(values.abs() > cutoff, torch.where(values > 0, 2, 1), 0)


class _StopForward(Exception):
    pass


def _block_output(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int
) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Run the model up to its first decoder block; return (hidden states, keyword arguments) per batch."""
    device = next(model.parameters()).device
    captured: list[tuple[torch.Tensor, dict[str, Any]]] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        captured.append((hidden.float(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for start in range(0, len(windows), batch_size):
            try:
                model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


@torch.no_grad()
def run_block(block: nn.Module, batches: list[tuple[torch.Tensor, dict[str, Any]]]) -> list[torch.Tensor]:
    return [_block_output(block(hidden, **kwargs)) for hidden, kwargs in batches]


@torch.no_grad()
def accumulate_hessians(
    block: nn.Module, layers: dict[str, nn.Module], batches: list[tuple[torch.Tensor, dict[str, Any]]]
) -> dict[str, torch.Tensor]:
    """H = mean over tokens of xᵀx for the input x of every layer in ``layers`` (one pass through the block)."""
    hessians: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def make_hook(name: str):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in hessians:
                hessians[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                counts[name] = 0
            hessians[name].addmm_(x.T, x)
            counts[name] += x.shape[0]
        return hook

    handles = [module.register_forward_pre_hook(make_hook(name)) for name, module in layers.items()]
    try:
        run_block(block, batches)
    finally:
        for handle in handles:
            handle.remove()
    return {name: hessians[name] / counts[name] for name in hessians}


class _TunableTernary(nn.Module):
    """The differentiable stand-in for a PackedTernaryLinear while tuning: trainable fp32 scales and, with
    ``latent``, trainable latent weights whose codes are re-rounded to the nearest level of the current grid
    every step (straight-through estimator), as EfficientQAT's Block-AP trains weights and scales together.

    The latent weights start at ``start`` (GPTQ's compensated values, whose rounding gave the codes) or, without
    it, on the grid (the dequantized weight): either way training starts from the compensated codes rather than
    from rounding the FP weights again.
    """

    def __init__(self, layer: PackedTernaryLinear, latent: bool = False, start: torch.Tensor | None = None) -> None:
        super().__init__()
        tensor = layer.ternary()
        self.layer = layer
        self.register_buffer("codes", tensor.codes.float(), persistent=False)
        self.register_buffer("combos", trit_combinations(tensor.planes, tensor.codes.device), persistent=False)
        self.scales = nn.Parameter(tensor.scales.float())
        start = tensor.dequantize(torch.float32) if start is None else start.float().clone()
        self.latent = nn.Parameter(start) if latent else None

    @torch.no_grad()
    def current_codes(self) -> torch.Tensor:
        """Codes of the latent weights on the current grid; the fixed codes when latent weights are off."""
        if self.latent is None:
            return self.codes
        alpha = self.scales if self.codes.dim() == 3 else self.scales.unsqueeze(0)  # (planes, rows, groups)
        levels = torch.einsum("krg,lk->rlg", alpha, self.combos)  # (rows, levels, groups)
        levels = expand_group_scales(levels, self.layer.group_size, self.latent.shape[1])  # (rows, levels, in)
        codes = self.combos[(self.latent.unsqueeze(1) - levels).abs().argmin(1)].permute(2, 0, 1)
        return codes if self.codes.dim() == 3 else codes[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dense_weight(self.current_codes(), self.scales, self.layer.group_size, torch.float32)
        if self.latent is not None:
            weight = weight + self.latent - self.latent.detach()
        return F.linear(x, weight.to(x.dtype), None if self.layer.bias is None else self.layer.bias.to(x.dtype))

    @torch.no_grad()
    def write_back(self) -> PackedTernaryLinear:
        """Store the tuned scales (and re-rounded codes) in the packed layer and return it."""
        if self.latent is not None:
            self.layer.packed.copy_(pack(self.current_codes().to(torch.int8), self.layer.layout))
        self.layer.scales.copy_(self.scales.to(self.layer.scales.dtype))
        return self.layer


def _swap_in_tunables(
    module: nn.Module, weight_lr: float, starts: dict[str, torch.Tensor], frozen: frozenset[int] = frozenset()
) -> tuple[dict[str, _TunableTernary], list[nn.Parameter], list[tuple[nn.Parameter, bool]]]:
    """Replace every PackedTernaryLinear under ``module`` by its tunable stand-in; make the other parameters
    trainable except those whose id is in ``frozen`` (made untrainable, so no gradient is computed for them).
    Returns (stand-ins by name, trainable FP parameters, every parameter's previous requires_grad) for
    ``_swap_out``."""
    tunables = {name: _TunableTernary(m, latent=weight_lr > 0, start=starts.get(name))
                for name, m in module.named_modules() if isinstance(m, PackedTernaryLinear)}
    for name, tunable in tunables.items():
        set_module(module, name, tunable)
    others = [p for n, p in module.named_parameters() if not n.endswith((".scales", ".latent"))]
    saved = [(p, p.requires_grad) for p in others]
    for p in others:
        p.requires_grad_(id(p) not in frozen)
    return tunables, [p for p in others if id(p) not in frozen], saved


@torch.no_grad()
def _swap_out(module: nn.Module, tunables: dict[str, _TunableTernary], saved: list[tuple[nn.Parameter, bool]]) -> None:
    for name, tunable in tunables.items():
        set_module(module, name, tunable.write_back())
    for p, requires_grad in saved:
        p.requires_grad_(requires_grad)


def _train(loss_on: Any, count: int, steps: int, groups: list[dict[str, Any]]) -> tuple[float, float]:
    """Adam on ``groups`` for ``steps`` random batches of ``count``; the mean loss over all batches before and
    after."""
    optimizer = torch.optim.Adam(groups)
    with torch.no_grad():
        before = sum(float(loss_on(i)) for i in range(count)) / count
    generator = torch.Generator().manual_seed(0)
    with torch.enable_grad():
        for _ in range(steps):
            index = int(torch.randint(count, (1,), generator=generator))
            optimizer.zero_grad(set_to_none=True)
            loss_on(index).backward()
            optimizer.step()
    with torch.no_grad():
        after = sum(float(loss_on(i)) for i in range(count)) / count
    return before, after


def reconstruct_block(
    block: nn.Module,
    batches: list[tuple[torch.Tensor, dict[str, Any]]],
    targets: list[torch.Tensor],
    steps: int,
    lr: float,
    weight_lr: float = 0.0,
    starts: dict[str, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """Tune the block's ternary scales and its other FP parameters (norms, biases, layers kept FP) so the block
    reproduces the FP block's outputs; with ``weight_lr`` > 0 the latent weights too (codes may change),
    starting from ``starts`` (layer name -> GPTQ's rounded values) where given.
    Returns (loss before, loss after) on the calibration batches."""
    tunables, fp_params, saved = _swap_in_tunables(block, weight_lr, starts or {})
    groups = [{"params": [t.scales for t in tunables.values()], "lr": lr}, {"params": fp_params, "lr": lr * 0.1}]
    if weight_lr > 0:
        groups.append({"params": [t.latent for t in tunables.values()], "lr": weight_lr})

    def loss_on(index: int) -> torch.Tensor:
        hidden, kwargs = batches[index]
        # bf16 autocast on the GPU: the tuning only needs a descent direction, and it halves the time
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=hidden.is_cuda):
            output = _block_output(block(hidden, **kwargs))
        return F.mse_loss(output.float(), targets[index])

    try:
        return _train(loss_on, len(batches), steps, groups)
    finally:
        _swap_out(block, tunables, saved)


@torch.no_grad()
def capture_head_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The FP model's inputs to its output embedding (the final hidden states, after the last norm), per batch:
    with the head kept FP they give back the FP logits on demand, at 1/85th of the logits' memory here."""
    head, device = model.get_output_embeddings(), next(model.parameters()).device
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return captured


def tune_end_to_end(
    model: nn.Module, windows: torch.Tensor, head_inputs: list[torch.Tensor], steps: int, lr: float,
    batch_size: int,
) -> tuple[float, float]:
    """Tune every ternary layer's scales (and, at lr/10, the norms and other FP parameters of the decoder, not the
    embeddings) so the whole quantized model's next-token distribution matches the FP model's: KL(FP ‖ model)
    on the calibration windows, codes fixed (EfficientQAT's end-to-end phase, E2E-QP). Block reconstruction
    matches each block's output alone; this corrects what the blocks' errors do together at the logits.
    Returns the mean KL before and after."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    frozen = frozenset({id(head.weight), id(embedding.weight)})
    tunables, fp_params, saved = _swap_in_tunables(model, 0.0, {}, frozen)
    groups = [{"params": [t.scales for t in tunables.values()], "lr": lr}, {"params": fp_params, "lr": lr * 0.1}]
    device = next(model.parameters()).device

    def loss_on(index: int) -> torch.Tensor:
        ids = windows[index * batch_size : (index + 1) * batch_size].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
            logits = model(input_ids=ids, use_cache=False).logits
            with torch.no_grad():
                target = head(head_inputs[index])
        vocab = logits.shape[-1]
        return F.kl_div(F.log_softmax(logits.float().reshape(-1, vocab), -1),
                        F.log_softmax(target.float().reshape(-1, vocab), -1), log_target=True, reduction="batchmean")

    try:
        return _train(loss_on, len(head_inputs), steps, groups)
    finally:
        _swap_out(model, tunables, saved)


def quantize_block_layers(
    weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor], config: QuantConfig
) -> dict[str, TernaryTensor]:
    """GPTQ-quantize a block's layers, fusing the work: layers fed the same input (q/k/v, gate/up) have equal
    Hessians and are stacked by rows into one problem, and problems of equal input width run as one batch."""
    shared: list[list[str]] = []
    for name in weights:
        match = next((g for g in shared if torch.equal(hessians[g[0]], hessians[name])), None)
        match.append(name) if match is not None else shared.append([name])
    by_width: dict[int, list[list[str]]] = {}
    for names in shared:
        by_width.setdefault(weights[names[0]].shape[1], []).append(names)
    tensors: dict[str, TernaryTensor] = {}
    for width, problems in by_width.items():
        fused = gptq_ternary_batched(
            [torch.cat([weights[n] for n in names]) for names in problems],
            [hessians[names[0]] for names in problems],
            group_size=width if config.granularity == "row" else config.group_size,
            planes=config.planes, damp=config.damp, block_size=config.block_size, compensate=config.compensation,
            sparsity=config.sparsity if config.mode == "sparsity" else None,
        )
        for names, tensor in zip(problems, fused):
            start = 0
            for name in names:
                rows = weights[name].shape[0]
                tensors[name] = TernaryTensor(tensor.codes[..., start : start + rows, :],
                                              tensor.scales[..., start : start + rows, :], tensor.group_size,
                                              rounded=tensor.rounded[start : start + rows])
                start += rows
    return tensors


def calibrated_quantize(
    model: nn.Module,
    layers: dict[str, nn.Module],
    config: QuantConfig,
    windows: torch.Tensor,
    batch_size: int = 4,
    quiet: bool = False,
) -> dict[str, dict[str, Any]]:
    """Quantize ``layers`` of ``model`` in place, block by block; returns per-layer extras for the report."""
    if config.granularity == "tensor":
        raise ValueError("calibrated quantization supports granularity 'row' or 'group', not 'tensor'")
    prefix, blocks = decoder_blocks(model)
    outside = [n for n in layers if not n.startswith(f"{prefix}.")]
    if outside:
        raise ValueError(f"calibrated quantization handles layers inside decoder blocks only; got {outside[:3]}")
    was_training = model.training
    model.eval()
    head_inputs = capture_head_inputs(model, windows, batch_size) if config.end_to_end_steps else None
    batches = capture_block_inputs(model, blocks[0], windows, batch_size)
    # the FP model's own activations, kept alongside when reconstruction targets them
    fp_batches = batches if config.reconstruct_steps and config.reconstruct_target == "fp" else None
    extras: dict[str, dict[str, Any]] = {}
    for index, block in enumerate(tqdm(blocks, desc="calibrate", disable=quiet, unit="block")):
        block_prefix = f"{prefix}.{index}."
        block_layers = {n[len(block_prefix):]: m for n, m in layers.items() if n.startswith(block_prefix)}
        fp_outputs = run_block(block, fp_batches) if fp_batches is not None else None
        if block_layers:
            hessians = accumulate_hessians(block, block_layers, batches)
            targets = fp_outputs if fp_outputs is not None else (
                run_block(block, batches) if config.reconstruct_steps else None)
            weights = {name: linear_weight(module).detach() for name, module in block_layers.items()}
            tensors = quantize_block_layers(weights, hessians, config)
            for name, module in block_layers.items():
                packed = PackedTernaryLinear.from_ternary(tensors[name], getattr(module, "bias", None), config.packing,
                                                    config.activations)
                set_module(block, name, packed.to(weights[name].device))
                delta = weights[name].float() - packed.dequantize(torch.float32)
                hessian, weight = hessians[name], weights[name].float()
                extras[block_prefix + name] = {"output_rel_error": float(
                    (torch.einsum("oi,ij,oj->", delta, hessian, delta)
                     / torch.einsum("oi,ij,oj->", weight, hessian, weight).clamp(min=1e-30)).sqrt()
                )}
            if targets is not None:
                before, after = reconstruct_block(block, batches, targets, config.reconstruct_steps,
                                                  config.reconstruct_lr, config.reconstruct_weight_lr,
                                                  {name: tensors[name].rounded for name in tensors})
                log.info("block %d reconstruction mse %.4g -> %.4g", index, before, after)
        batches = [(out, kw) for out, (_, kw) in zip(run_block(block, batches), batches)]
        if fp_outputs is not None:
            fp_batches = [(out, kw) for out, (_, kw) in zip(fp_outputs, fp_batches)]
    if head_inputs is not None:
        before, after = tune_end_to_end(model, windows, head_inputs, config.end_to_end_steps, config.end_to_end_lr,
                                        batch_size)
        log.info("end-to-end tuning KL %.4g -> %.4g", before, after)
    model.train(was_training)
    return extras
