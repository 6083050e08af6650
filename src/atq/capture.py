"""Activation capture for calibration: the inputs of the first decoder block, a block's outputs, the input
Hessians of a block's layers, and the FP model's final hidden states. Forward hooks only; no weights change."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

Batches = list[tuple[torch.Tensor, dict[str, Any]]]  # per batch: (hidden states, the block's keyword arguments)


class _StopForward(Exception):
    pass


def block_output(output: Any) -> torch.Tensor:
    """A decoder block's hidden states, whether it returns a tensor or a tuple (families differ)."""
    return output[0] if isinstance(output, (tuple, list)) else output


@torch.no_grad()
def capture_block_inputs(model: nn.Module, first_block: nn.Module, windows: torch.Tensor, batch_size: int,
                         device: torch.device | None = None) -> Batches:
    """Run the model up to its first decoder block; return (hidden states, keyword arguments) per batch.
    ``device``: where the windows go (the embedding's device; by default the model's first parameter's)."""
    device = next(model.parameters()).device if device is None else device
    captured: Batches = []

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
def run_block(block: nn.Module, batches: Batches) -> list[torch.Tensor]:
    return [block_output(block(hidden, **kwargs)) for hidden, kwargs in batches]


def advance(block: nn.Module, batches: Batches, outputs: list[torch.Tensor] | None = None) -> Batches:
    """The next block's batches: ``block``'s outputs (computed unless given) with the same keyword arguments."""
    outputs = run_block(block, batches) if outputs is None else outputs
    return [(out, kwargs) for out, (_, kwargs) in zip(outputs, batches)]


@torch.no_grad()
def accumulate_hessians(block: nn.Module, layers: dict[str, nn.Module], batches: Batches) -> dict[str, torch.Tensor]:
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


@torch.no_grad()
def capture_head_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The FP model's inputs to its output embedding (the final hidden states, after the last norm), per batch:
    with the head kept FP they give back the FP logits on demand, at a small fraction of the logits' memory."""
    head, device = model.get_output_embeddings(), next(model.parameters()).device
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        for start in range(0, len(windows), batch_size):
            model(input_ids=windows[start : start + batch_size].to(device), use_cache=False)
    finally:
        handle.remove()
    return captured
