"""Per-layer importance scores and the precision map of mixed-precision quantization.

Two scores, both measured on calibration windows with the LM loss L:
``gradient``  E_batches[ Σ |g ⊙ ΔW| ], g = ∂L/∂W and ΔW = W − Ŵ the layer's ternarisation error: a first-order
              (Taylor) bound on how much ternarising the layer moves the loss, from one backward pass a batch;
``measured``  L(model with only this layer ternarised) − L(FP model): exact, one forward pass per layer.
The layers with the highest scores (a fraction of the layer count) stay in floating point.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .quantizers import ternarize
from .surgery import linear_weight, select_linear_layers

SCORES = ("gradient", "measured")


def _ternary_delta(module: nn.Module, config: QuantConfig) -> torch.Tensor:
    """W − Ŵ in the orientation the module stores its weight (Conv1D keeps (in, out))."""
    weight = linear_weight(module).detach()
    delta = weight.float() - ternarize(weight, config).dequantize(torch.float32)
    return delta if isinstance(module, nn.Linear) else delta.T


def _loss(model: nn.Module, windows: torch.Tensor, batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    total = torch.zeros((), device=device)
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size].to(device)
        total = total + model(input_ids=batch, labels=batch, use_cache=False).loss * len(batch)
    return total / len(windows)


def gradient_sensitivity(
    model: nn.Module, layers: dict[str, nn.Module], config: QuantConfig, windows: torch.Tensor,
    batch_size: int = 4, quiet: bool = False,
) -> dict[str, float]:
    deltas = {name: _ternary_delta(module, config) for name, module in layers.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for module in layers.values():
        module.weight.requires_grad_(True)
        module.weight.grad = None
    scores = dict.fromkeys(layers, 0.0)
    device = next(model.parameters()).device
    try:
        with torch.enable_grad():
            for start in tqdm(range(0, len(windows), batch_size), desc="sensitivity", disable=quiet, unit="batch"):
                batch = windows[start : start + batch_size].to(device)
                model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
                for name, module in layers.items():
                    scores[name] += float((module.weight.grad.float() * deltas[name]).abs().sum())
                    module.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
    batches = math.ceil(len(windows) / batch_size)
    return {name: score / batches for name, score in scores.items()}


@torch.no_grad()
def measured_sensitivity(
    model: nn.Module, layers: dict[str, nn.Module], config: QuantConfig, windows: torch.Tensor,
    batch_size: int = 4, quiet: bool = False,
) -> dict[str, float]:
    base = float(_loss(model, windows, batch_size))
    scores = {}
    for name, module in tqdm(layers.items(), desc="sensitivity", disable=quiet, unit="layer"):
        original = module.weight.detach().clone()
        module.weight.sub_(_ternary_delta(module, config).to(module.weight.dtype))
        scores[name] = float(_loss(model, windows, batch_size)) - base
        module.weight.copy_(original)
    return scores


def sensitivity(
    model: nn.Module, layers: dict[str, nn.Module], config: QuantConfig, windows: torch.Tensor,
    method: str = "gradient", quiet: bool = False,
) -> dict[str, float]:
    if method not in SCORES:
        raise ValueError(f"unknown sensitivity score {method!r}; expected one of {SCORES}")
    score = gradient_sensitivity if method == "gradient" else measured_sensitivity
    return score(model, layers, config, windows, quiet=quiet)


def keep_in_fp(scores: dict[str, float], fraction: float) -> set[str]:
    """Names of the round(fraction · layers) highest-scoring layers."""
    count = round(fraction * len(scores))
    return set(sorted(scores, key=scores.__getitem__, reverse=True)[:count])


def most_sensitive(
    model: nn.Module, config: QuantConfig, windows: torch.Tensor, fraction: float, method: str = "gradient",
    layers: dict[str, nn.Module] | None = None, quiet: bool = True,
) -> tuple[set[str], dict[str, float]]:
    """The names of the ``fraction`` most sensitive of ``layers`` (default: those ``config`` selects) and every
    layer's score: the layers mixed precision keeps in floating point."""
    layers = select_linear_layers(model, config) if layers is None else layers
    scores = sensitivity(model, layers, config, windows, method, quiet)
    return keep_in_fp(scores, fraction), scores
