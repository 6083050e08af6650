"""Sizes of quantized models, and the measured run that the CLI and every benchmark share.

Sizes count what an artifact stores: 2-bit codes (rows padded to whole bytes) plus fp16 scales for ternary
layers, and every other parameter at its floating-point width. ``bits_per_weight`` includes the scales.
``measure_recipe`` is the one definition of "quantize a copy, evaluate it, weigh it", so the PTQ table, the
ablation grid and the QAT starting point count perplexity, time and bytes the same way.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .evaluate import evaluate_windows
from .io import save_quantized, unique_state_dict
from .layers import PackedTernaryLinear
from .surgery import is_linear


def _ternary_storage_bytes(module: nn.Module) -> int:
    """Bytes a ternary layer's own state holds apart from its bias (packed codes and scales): what the
    artifact stores for its weight, whatever names the layer gives those tensors."""
    return sum(t.numel() * t.element_size() for name, t in module.state_dict().items() if name != "bias")


def model_stats(model: nn.Module) -> dict[str, float | int]:
    """Sizes of a quantized model. ``bits_per_weight`` covers the ternary layers (codes + scales);
    ``bits_per_linear_weight`` covers every linear layer except the LM head, FP ones counted at 16 bits,
    the honest figure for mixed precision."""
    ternary_weights = ternary_bytes = zero_codes = ternary_layers = 0
    fp_params = 0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    fp_linear_weights = sum(
        m.weight.numel() for m in model.modules() if is_linear(m) and m is not head and m.weight is not getattr(
            head, "weight", None)
    )
    for module in model.modules():
        if isinstance(module, PackedTernaryLinear):
            ternary_layers += 1
            ternary_weights += module.in_features * module.out_features
            ternary_bytes += _ternary_storage_bytes(module)
            zero_codes += round(module.ternary().sparsity() * module.in_features * module.out_features)
            fp_params += module.bias.numel() if module.bias is not None else 0
    fp_params += sum(p.numel() for p in model.parameters())  # unique parameters: tied weights count once
    original = ternary_weights + fp_params
    quantized_fp32 = ternary_bytes + 4 * fp_params
    quantized_fp16 = ternary_bytes + 2 * fp_params
    return {
        "ternary_layers": ternary_layers,
        "ternary_weights": ternary_weights,
        "fp_params": fp_params,
        "packed_bytes": ternary_bytes,
        "fp_bytes_fp16": 2 * fp_params,
        "fp_bytes_fp32": 4 * fp_params,
        "original_bytes_fp32": 4 * original,
        "original_bytes_fp16": 2 * original,
        "compression_ratio": 4 * original / quantized_fp32 if quantized_fp32 else 1.0,
        "compression_ratio_fp16": 2 * original / quantized_fp16 if quantized_fp16 else 1.0,
        "bits_per_weight": 8 * ternary_bytes / ternary_weights if ternary_weights else 0.0,
        "fp_linear_weights": fp_linear_weights,
        "bits_per_linear_weight": (8 * ternary_bytes + 16 * fp_linear_weights) / (ternary_weights + fp_linear_weights)
        if ternary_weights + fp_linear_weights else 0.0,
        "sparsity": zero_codes / ternary_weights if ternary_weights else 0.0,
    }


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under ``path``: the on-disk cost of an artifact or export."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def markdown_table(header: list[str], rows: list[list[str]], numeric_from: int = 1) -> str:
    """A markdown table whose columns from ``numeric_from`` on are right-aligned (numbers)."""
    rule = ["---" if i < numeric_from else "---:" for i in range(len(header))]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in [header, rule, *rows])


def _synchronize(device: str | torch.device) -> None:
    """Wait for queued CUDA work, so a wall-clock interval covers the kernels it launched."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure_recipe(
    fp_model: nn.Module,
    config: QuantConfig,
    eval_windows: torch.Tensor,
    *,
    calibration: torch.Tensor | str | None = None,
    tokenizer: Any = None,
    device: str | torch.device = "cpu",
    quiet: bool = True,
    keep_model: bool = False,
) -> dict[str, Any]:
    """Quantize a deep copy of ``fp_model`` on ``device`` with ``config`` and measure it; ``fp_model`` is left
    as it was, so one FP model serves a whole table of recipes.

    ``calibration`` and ``tokenizer`` go to ``atq.quantize`` unchanged (windows, or a source the tokenizer
    reads). Returns ``config`` (``to_dict()``), ``ppl`` and ``token_accuracy`` on ``eval_windows`` (GPTQ
    protocol), ``quant_seconds`` (wall time of ``quantize``, CUDA-synchronised at both ends),
    ``bits_per_weight``, ``bits_per_linear_weight`` and ``sparsity`` (``model_stats``), and ``artifact_bytes``
    (the directory ``save_quantized`` writes, without a tokenizer); with ``keep_model`` also the quantized
    model under ``model``.
    """
    from . import quantize  # the pipeline imports this module for model_stats: resolve at call time

    model = copy.deepcopy(fp_model).to(device)
    _synchronize(device)
    start = time.perf_counter()
    quantize(model, config, calibration=calibration, tokenizer=tokenizer, quiet=quiet)
    _synchronize(device)
    seconds = time.perf_counter() - start
    evaluation = evaluate_windows(model, eval_windows, quiet=quiet)
    stats = model_stats(model)
    with tempfile.TemporaryDirectory() as tmp:
        artifact_bytes = directory_bytes(save_quantized(model, Path(tmp) / "artifact"))
    result = {
        "config": config.to_dict(), "ppl": evaluation["ppl"], "token_accuracy": evaluation["token_accuracy"],
        "quant_seconds": seconds, "bits_per_weight": stats["bits_per_weight"],
        "bits_per_linear_weight": stats["bits_per_linear_weight"], "sparsity": stats["sparsity"],
        "artifact_bytes": artifact_bytes,
    }
    if keep_model:
        result["model"] = model
    return result


def fp_reference(
    fp_model: nn.Module, eval_windows: torch.Tensor, device: str | torch.device = "cpu", *, quiet: bool = True
) -> dict[str, Any]:
    """The floating-point row beside ``measure_recipe``'s: ``ppl`` and ``token_accuracy`` on ``eval_windows``,
    and ``artifact_bytes`` of the model's unique tensors in one safetensors file.

    The model is evaluated in place on ``device`` and moved back where it was, not copied: a second FP copy
    on the device would only cost memory.
    """
    from safetensors.torch import save_file

    home = next(fp_model.parameters()).device
    evaluation = evaluate_windows(fp_model.to(device), eval_windows, quiet=quiet)
    fp_model.to(home)
    with tempfile.TemporaryDirectory() as tmp:
        save_file(unique_state_dict(fp_model)[0], f"{tmp}/model.safetensors")
        artifact_bytes = directory_bytes(tmp)
    return {"ppl": evaluation["ppl"], "token_accuracy": evaluation["token_accuracy"], "artifact_bytes": artifact_bytes}
