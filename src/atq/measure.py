"""Measured runs shared by the CLI and benchmarks/: copy an FP model, quantize it, evaluate it and measure what
it stores, so that every table that reports a recipe computes its numbers the same way."""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import QuantConfig
from .evaluate import evaluate_windows
from .io import save_quantized, unique_state_dict
from .ptq import quantize
from .stats import directory_bytes, model_stats


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
