"""Calibrated post-training ternarisation, the driver: capture -> solve -> replace -> tune -> propagate.

Decoder blocks are quantized in order. The inputs of block i are produced by blocks 0..i-1 *already quantized*,
so each block compensates the errors of the ones before it. Per block: the input Hessians of its layers
(capture.py), GPTQ on ternary grids (gptq.py), packed layers swapped in, block reconstruction (tuning.py); after
the last block, optional end-to-end tuning of all scales.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import (
    Batches,
    accumulate_hessians,
    advance,
    capture_block_inputs,
    capture_head_inputs,
    run_block,
)
from .config import Calibration, QuantConfig
from .gptq import gptq_ternary_batched
from .layers import PackedTernaryLinear
from .onload import check_onload, onloaded, outside
from .surgery import decoder_blocks, linear_weight, set_module
from .ternary import PackedTernary, TernaryTensor
from .tuning import reconstruct_block, tune_end_to_end

log = logging.getLogger(__name__)


def calibrated_quantize(model: nn.Module, layers: dict[str, nn.Module], config: QuantConfig, windows: torch.Tensor,
                        batch_size: int = 4, quiet: bool = False, device: torch.device | None = None,
                        onload: bool = False) -> dict[str, dict[str, Any]]:
    """Quantize ``layers`` of ``model`` in place, block by block; returns per-layer extras for the report.
    ``onload``: the model stays where it is (CPU memory) and each block comes to ``device`` for its turn
    (onload.py); the result is the same as with the whole model on ``device``."""
    if config.granularity == "tensor":
        raise ValueError("calibrated quantization supports granularity 'row' or 'group', not 'tensor'")
    prefix, blocks = decoder_blocks(model)
    stray = [n for n in layers if not n.startswith(f"{prefix}.")]
    if stray:
        raise ValueError(f"calibrated quantization handles layers inside decoder blocks only; got {stray[:3]}")
    if onload:
        check_onload(calibrated=True, end_to_end=config.end_to_end is not None)
    home = next(model.parameters()).device
    device = home if device is None else device

    def turn(modules: list[nn.Module], whole: bool) -> contextlib.AbstractContextManager:
        return onloaded(modules, device, home, whole) if onload else contextlib.nullcontext()

    was_training = model.training
    model.eval()
    with turn(outside(model, blocks), whole=False):
        head_inputs = capture_head_inputs(model, windows, batch_size) if config.end_to_end else None
        batches = capture_block_inputs(model, blocks[0], windows, batch_size, device)
    # the FP model's own activations, carried alongside when reconstruction targets them
    fp_batches = batches if config.reconstruction and config.reconstruction.target == "fp" else None
    extras: dict[str, dict[str, Any]] = {}
    for index, block in enumerate(tqdm(blocks, desc="calibrate", disable=quiet, unit="block")):
        block_prefix = f"{prefix}.{index}."
        block_layers = {n[len(block_prefix):]: m for n, m in layers.items() if n.startswith(block_prefix)}
        with turn([block], whole=True):
            fp_outputs = run_block(block, fp_batches) if fp_batches is not None else None
            if block_layers:
                errors = _quantize_block(block, block_layers, batches, fp_outputs, config)
                extras |= {block_prefix + name: row for name, row in errors.items()}
            batches = advance(block, batches)
            if fp_outputs is not None:
                fp_batches = advance(block, fp_batches, fp_outputs)
    if head_inputs is not None:
        before, after = tune_end_to_end(model, windows, head_inputs, config, batch_size)
        log.info("end-to-end tuning KL %.4g -> %.4g", before, after)
    model.train(was_training)
    return extras


def _quantize_block(block: nn.Module, layers: dict[str, nn.Module], batches: Batches,
                    fp_outputs: list[torch.Tensor] | None, config: QuantConfig) -> dict[str, dict[str, float]]:
    """Solve, replace and (optionally) reconstruct one block's layers; returns each layer's output error."""
    hessians = accumulate_hessians(block, layers, batches)
    targets = fp_outputs if fp_outputs is not None else (run_block(block, batches) if config.reconstruction
                                                         else None)
    weights = {name: linear_weight(module).detach() for name, module in layers.items()}
    solved = solve_layers(weights, hessians, config)
    errors = {}
    for name, module in layers.items():
        packed = PackedTernaryLinear(PackedTernary.pack(solved[name][0], config.packing),
                                     getattr(module, "bias", None), config.activations)
        set_module(block, name, packed.to(weights[name].device))
        errors[name] = {"output_rel_error": output_error(weights[name], packed.dequantize(), hessians[name])}
    if targets is not None:
        before, after = reconstruct_block(block, batches, targets, config,
                                          {name: rounded for name, (_, rounded) in solved.items()})
        log.info("block reconstruction mse %.4g -> %.4g", before, after)
    return errors


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """Relative error of the layer's outputs on the calibration inputs: sqrt(ΔW H ΔWᵀ / W H Wᵀ)."""
    delta, weight = weight.float() - quantized, weight.float()
    return float((torch.einsum("oi,ij,oj->", delta, hessian, delta)
                  / torch.einsum("oi,ij,oj->", weight, hessian, weight).clamp(min=1e-30)).sqrt())


def solve_layers(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                 config: QuantConfig) -> dict[str, tuple[TernaryTensor, torch.Tensor]]:
    """GPTQ-quantize a block's layers, fusing the work: layers fed the same input (q/k/v, gate/up) have equal
    Hessians and are stacked by rows into one problem, and problems of equal input width run as one batch.
    Returns per layer (TernaryTensor, the values its columns were rounded from)."""
    shared: list[list[str]] = []
    for name in weights:
        match = next((g for g in shared if torch.equal(hessians[g[0]], hessians[name])), None)
        match.append(name) if match is not None else shared.append([name])
    by_width: dict[int, list[list[str]]] = {}
    for names in shared:
        by_width.setdefault(weights[names[0]].shape[1], []).append(names)
    solved: dict[str, tuple[TernaryTensor, torch.Tensor]] = {}
    stage = config.calibration or Calibration(source=None)  # windows handed to quantize: the stage's defaults
    for width, problems in by_width.items():
        fused = gptq_ternary_batched(
            [torch.cat([weights[n] for n in names]) for names in problems],
            [hessians[names[0]] for names in problems],
            group_size=width if config.granularity == "row" else config.group_size,
            planes=config.planes, damp=stage.damp, block_size=stage.block_size, compensate=stage.compensation,
            sparsity=config.sparsity if config.mode == "sparsity" else None,
        )
        for names, (tensor, rounded) in zip(problems, fused):
            start = 0
            for name in names:
                rows = slice(start, start + weights[name].shape[0])
                solved[name] = (TernaryTensor(tensor.codes[..., rows, :], tensor.scales[..., rows, :],
                                              tensor.group_size), rounded[rows])
                start = rows.stop
    return solved
