"""Tuning after GPTQ, both as "swap in trainable layers, train, freeze": block reconstruction (each block's
output against the FP block's) and end-to-end tuning (the whole model's next-token distribution against the FP
model's, EfficientQAT's E2E-QP). Codes stay those GPTQ chose unless latent weights are trained too."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .capture import Batches, block_output
from .config import QuantConfig
from .layers import PackedTernaryLinear, TernaryLinear
from .surgery import set_module


def swap_in_trainable(
    module: nn.Module, config: QuantConfig, latent_starts: dict[str, torch.Tensor] | None = None,
    frozen: frozenset[int] = frozenset(),
) -> tuple[dict[str, TernaryLinear], list[nn.Parameter], list[tuple[nn.Parameter, bool]]]:
    """Replace every PackedTernaryLinear under ``module`` by a trainable TernaryLinear with its codes fixed or,
    with ``latent_starts`` (layer name -> start values, may be empty), with latent weights re-rounded to the
    nearest level. The other parameters are made trainable, except those whose id is in ``frozen``.
    Returns (trainable layers by name, trainable FP parameters, every parameter's previous requires_grad)."""
    layers = {name: TernaryLinear(m.ternary(), m.bias, config, rounding="fixed" if latent_starts is None else
                                  "nearest", latent=(latent_starts or {}).get(name))
              for name, m in module.named_modules() if isinstance(m, PackedTernaryLinear)}
    for name, layer in layers.items():
        set_module(module, name, layer)
    ternary = {id(p) for layer in layers.values() for p in (layer.scales, layer.weight) if p is not None}
    others = [p for p in module.parameters() if id(p) not in ternary]
    saved = [(p, p.requires_grad) for p in others]
    for p in others:
        p.requires_grad_(id(p) not in frozen)
    return layers, [p for p in others if id(p) not in frozen], saved


@torch.no_grad()
def freeze(module: nn.Module, layers: dict[str, TernaryLinear], saved: list[tuple[nn.Parameter, bool]]) -> None:
    """Put the frozen (packed) form of every trained layer back and restore the requires_grad flags."""
    for name, layer in layers.items():
        set_module(module, name, layer.freeze())
    for p, requires_grad in saved:
        p.requires_grad_(requires_grad)


def train_steps(loss_on: Callable[[int], torch.Tensor], count: int, steps: int,
                groups: list[dict[str, Any]]) -> tuple[float, float]:
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


def _groups(layers: dict[str, TernaryLinear], fp_params: list[nn.Parameter], lr: float,
            weight_lr: float = 0.0) -> list[dict[str, Any]]:
    """Scales at ``lr``, the FP parameters at a tenth of it, latent weights (if any) at ``weight_lr``."""
    groups = [{"params": [t.scales for t in layers.values()], "lr": lr}, {"params": fp_params, "lr": lr * 0.1}]
    latent = [t.weight for t in layers.values() if t.weight is not None]
    return groups + ([{"params": latent, "lr": weight_lr}] if latent else [])


def reconstruct_block(block: nn.Module, batches: Batches, targets: list[torch.Tensor], config: QuantConfig,
                      starts: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
    """Tune the block's ternary scales and its other FP parameters (norms, biases, layers kept FP) so the block
    reproduces ``targets``, as ``config.reconstruction`` says; with its ``weight_lr`` > 0 the latent weights too
    (codes may change), starting from ``starts`` (layer name -> GPTQ's rounded values). Returns the loss before
    and after."""
    stage = config.reconstruction
    weight_lr = stage.weight_lr
    layers, fp_params, saved = swap_in_trainable(block, config, (starts or {}) if weight_lr > 0 else None)

    def loss_on(index: int) -> torch.Tensor:
        hidden, kwargs = batches[index]
        # bf16 autocast on the GPU: the tuning only needs a descent direction, and it halves the time
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=hidden.is_cuda):
            output = block_output(block(hidden, **kwargs))
        return F.mse_loss(output.float(), targets[index])

    try:
        return train_steps(loss_on, len(batches), stage.steps, _groups(layers, fp_params, stage.lr, weight_lr))
    finally:
        freeze(block, layers, saved)


def chunked_kl(head: nn.Module, hidden: torch.Tensor, target_hidden: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """KL(FP ‖ model) of the next-token distributions, mean over positions, from the head's inputs (the model's
    final hidden states and the FP model's), ``chunk`` positions at a time, each chunk's logits recomputed in the
    backward (checkpoint). Why: a batch's logits in fp32 with their log-softmaxes and gradients take about six
    logits-sized tensors — 4 windows x 2048 tokens of Gemma 3's 262k vocabulary is 8.6 GB each, over 50 GB in all;
    here the peak is a chunk's."""
    hidden, target_hidden = hidden.reshape(-1, hidden.shape[-1]), target_hidden.reshape(-1, target_hidden.shape[-1])
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        part = functools.partial(_kl_sum, head, target_hidden[start : start + chunk])
        total = total + checkpoint(part, hidden[start : start + chunk], use_reentrant=False)
    return total / hidden.shape[0]


def _kl_sum(head: nn.Module, target_hidden: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """Σ over positions of KL(softmax(head(target_hidden)) ‖ softmax(head(hidden))), the target without gradient."""
    with torch.no_grad():
        target = F.log_softmax(head(target_hidden).float(), -1)
    return F.kl_div(F.log_softmax(head(hidden).float(), -1), target, log_target=True, reduction="sum")


def tune_end_to_end(model: nn.Module, windows: torch.Tensor, head_inputs: list[torch.Tensor], config: QuantConfig,
                    batch_size: int) -> tuple[float, float]:
    """Tune every ternary layer's scales (and, at a tenth of the rate, the decoder's norms and other FP
    parameters, not the embeddings) on KL(FP ‖ model) of the next-token distributions, codes fixed. Block
    reconstruction matches each block alone; this corrects what the blocks' errors do together at the logits.
    ``head_inputs``: the FP model's final hidden states per batch (capture.capture_head_inputs).
    Returns the mean KL before and after."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    frozen = frozenset({id(head.weight), id(embedding.weight)})
    layers, fp_params, saved = swap_in_trainable(model, config, None, frozen)
    device = next(model.parameters()).device

    def loss_on(index: int) -> torch.Tensor:
        ids = windows[index * batch_size : (index + 1) * batch_size].to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=ids.is_cuda):
            hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state  # the head's input
            return chunked_kl(head, hidden, head_inputs[index])

    try:
        return train_steps(loss_on, len(head_inputs), config.end_to_end.steps,
                           _groups(layers, fp_params, config.end_to_end.lr))
    finally:
        freeze(model, layers, saved)
