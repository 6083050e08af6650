"""The verbs: ``quantize`` (in place, one config, torchao-style) and the seed's one-call ``quantize_model``."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .bench import model_stats
from .config import QuantConfig
from .layers import PackedTernaryLinear
from .quantizers import ternarize
from .surgery import all_linear_names, linear_weight, select_linear_layers, set_module

log = logging.getLogger(__name__)


def quantize(model: nn.Module, config: QuantConfig | None = None, *, quiet: bool = False) -> list[dict[str, Any]]:
    """Replace the selected linear layers of ``model`` by packed ternary layers, in place.

    Returns one report row per linear layer (ternary ones with threshold, sparsity, scales and relative
    reconstruction error ||W - Ŵ||/||W||, measured on the fp16-scaled weight the model will actually use).
    The config and the precision of every linear layer are attached to the model for ``save_quantized``.
    """
    config = config or QuantConfig()
    layers = select_linear_layers(model, config)
    # Validate every weight before touching the model, so a NaN in the last layer leaves it unmodified.
    weights = {name: linear_weight(module) for name, module in layers.items()}
    for name, weight in weights.items():
        if not torch.isfinite(weight).all():
            raise ValueError(f"{name}.weight contains NaN/Inf values; ternarisation needs finite weights")

    report = []
    for name in tqdm(layers, desc="ternarise", disable=quiet, unit="layer"):
        module, weight = layers[name], weights[name]
        tensor = ternarize(weight, config, name=f"{name}.weight")
        packed = PackedTernaryLinear.from_ternary(tensor, getattr(module, "bias", None)).to(weight.device)
        restored = packed.dequantize(torch.float32)
        reference = weight.detach().float()
        report.append({
            "name": name,
            "precision": "ternary",
            "shape": list(weight.shape),
            "group_size": tensor.group_size,
            "threshold_mean": float(tensor.thresholds.mean()),
            "sparsity": tensor.sparsity(),
            "scale_mean": float(packed.scales.float().mean()),
            "scale_min": float(packed.scales.float().min()),
            "scale_max": float(packed.scales.float().max()),
            "rel_error": float((reference - restored).norm() / reference.norm().clamp(min=1e-30)),
        })
        set_module(model, name, packed)
        del module
    ternary_names = set(layers)
    report += [{"name": n, "precision": "fp"} for n in all_linear_names(model) if n not in ternary_names]
    model.atq_config = config
    model.atq_report = report
    log.info("ternarised %d linear layers", len(layers))
    return report


def quantize_model(
    model_name: str = "gpt2",
    use_calibration: bool = False,
    config: QuantConfig | None = None,
    *,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    quiet: bool = False,
    **config_fields: Any,
) -> dict[str, Any]:
    """The seed's pipeline in one call: load ``model_name`` (hub id, directory, .gguf or ``smollm2``), ternarise.

    ``config_fields`` (``mode=``, ``sparsity=``, ``group_size=`` ...) override fields of ``config``.
    Returns ``{"model", "tokenizer", "config", "stats", "report"}``; ``stats`` has ``compression_ratio``
    (vs FP32), ``compression_ratio_fp16``, ``bits_per_weight`` (scales included) and byte counts.
    """
    from .models import load_model

    if use_calibration:
        raise NotImplementedError(
            "calibrated PTQ is not available in this version; call with use_calibration=False"
        )
    config = (config or QuantConfig()).replace(**config_fields) if config_fields else (config or QuantConfig())
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    report = quantize(model, config, quiet=quiet)
    return {"model": model, "tokenizer": tokenizer, "config": config, "stats": model_stats(model),
            "report": report}
