"""Post-training quantization, the verbs: ``quantize`` (in place, one config, torchao-style) and the seed's
one-call ``quantize_model``."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .config import Calibration, QuantConfig
from .embedding import check_blockable, quantize_embeddings
from .layers import PackedTernaryLinear
from .onload import check_device, check_onload, fits, same_device
from .quantizers import fit_ternary
from .rotation import check_rotatable, rotate_model
from .stats import model_stats
from .surgery import all_linear_names, linear_weight, select_linear_layers, set_module
from .ternary import PackedTernary

log = logging.getLogger(__name__)


def quantize(
    model: nn.Module,
    config: QuantConfig | None = None,
    calibration: torch.Tensor | str | None = None,
    *,
    tokenizer: Any = None,
    quiet: bool = False,
    device: str | torch.device | None = None,
    onload: bool | None = None,
) -> list[dict[str, Any]]:
    """Replace the selected linear layers of ``model`` by packed ternary layers, in place.

    ``device``: where the work runs (default: where the model is). A model held elsewhere (CPU memory) moves
    there whole if it fits, else calibration brings one decoder block at a time (onload.py; same result, no
    end-to-end tuning) and the model stays where it is. ``onload`` True or False decides instead of the fit.
    Text for ``calibration="generated"`` is sampled before, where the model is.

    ``calibration``: token windows (n, seq_len), or a source (``wikitext2_valid``, a text file, ``generated``)
    that ``tokenizer`` turns into ``config.calibration.windows`` windows; defaults to the calibration stage's source.
    With calibration, layers are quantized block by block against their input statistics (calibration.py);
    without, each weight is ternarised on its own (quantizers.py).

    Returns one report row per linear layer (ternary ones with threshold, sparsity, scales and relative error
    ||W - Ŵ||/||W|| of the fp16-scaled weight); config and precisions are attached for ``save_quantized``.
    """
    config = config or QuantConfig()
    device = None if device is None else check_device(device)
    layers = select_linear_layers(model, config)
    weights = _checked_weights(model, layers, config)
    windows = calibration_windows(model, config, calibration, tokenizer)
    target, onload = _place(model, config, device, onload, windows is not None)
    if config.rotation is not None:
        rotate_model(model, config.rotation)  # the same function; the weights to ternarise change
        weights = {name: linear_weight(module).detach() for name, module in layers.items()}
    layers, scores = _keep_sensitive_fp(model, layers, config, windows, quiet)
    if windows is not None:
        from .calibration import calibrated_quantize

        extras = calibrated_quantize(model, layers, config, windows, quiet=quiet, device=target, onload=onload)
    else:
        extras = _ternarize_layers(model, layers, weights, config, quiet)
    report = [_report_row(name, weights[name], model.get_submodule(name)) | extras.get(name, {}) for name in layers]
    report += [{"name": n, "precision": "fp"} for n in all_linear_names(model) if n not in layers]
    report = [row | ({"sensitivity": scores[row["name"]]} if row["name"] in scores else {}) for row in report]
    quantize_embeddings(model, config.embedding)
    model.atq_config = config
    model.atq_report = report
    log.info("ternarised %d linear layers", len(layers))
    return report


def _checked_weights(model: nn.Module, layers: dict[str, nn.Module], config: QuantConfig) -> dict[str, torch.Tensor]:
    """The layers' weights, once every check that can refuse has passed: validated before the model is touched
    (then the calibration data), so a NaN in the last layer or a too-short text leaves it unmodified."""
    weights = {name: linear_weight(module).detach() for name, module in layers.items()}
    for name, weight in weights.items():
        if not torch.isfinite(weight).all():
            raise ValueError(f"{name}.weight contains NaN/Inf values; ternarisation needs finite weights")
    if config.embedding != "fp":
        try:
            check_blockable(model)
        except ValueError as error:
            raise ValueError(f"QuantConfig.embedding={config.embedding!r}: {error}") from error
    if config.rotation is not None:
        check_rotatable(model)  # before the calibration data: a refusal must come before any slow work
    return weights


def _place(model: nn.Module, config: QuantConfig, device: torch.device | None, onload: bool | None,
           calibrated: bool) -> tuple[torch.device, bool]:
    """Where quantize's work runs and whether blocks are onloaded (see ``quantize``); moves the model there when
    it goes whole. Refuses what onloading cannot do before the model changes."""
    home = next(model.parameters()).device
    elsewhere = device is not None and not same_device(home, device)
    target = device if device is not None else home
    if onload is None:
        onload = elsewhere and calibrated and not fits(model, target)
    if onload:
        check_onload(calibrated, config.end_to_end is not None)
    if elsewhere and not onload:
        model.to(target)
    return target, onload


def _keep_sensitive_fp(model: nn.Module, layers: dict[str, nn.Module], config: QuantConfig,
                       windows: torch.Tensor | None, quiet: bool) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """Mixed precision: drop the most sensitive layers from ``layers`` (they stay FP); returns (the layers left
    to ternarise, every layer's sensitivity score)."""
    stage = config.mixed_precision
    if stage is None:
        return layers, {}
    from .sensitivity import most_sensitive

    if windows is None:
        raise ValueError("mixed precision (fp_fraction > 0) scores layers on calibration data: give calibration")
    kept, scores = most_sensitive(model, config, windows[:16], stage.fp_fraction, stage.sensitivity, layers, quiet)
    layers = {name: module for name, module in layers.items() if name not in kept}
    if not layers:
        raise ValueError(f"fp_fraction={stage.fp_fraction} keeps every selected layer in floating point")
    return layers, scores


def _ternarize_layers(model: nn.Module, layers: dict[str, nn.Module], weights: dict[str, torch.Tensor],
                      config: QuantConfig, quiet: bool) -> dict[str, dict[str, Any]]:
    """Data-free: each weight ternarised on its own and replaced by its packed layer; returns report extras."""
    extras = {}
    for name in tqdm(layers, desc="ternarise", disable=quiet, unit="layer"):
        tensor, thresholds = fit_ternary(weights[name], config, name=f"{name}.weight")
        packed = PackedTernaryLinear(PackedTernary.pack(tensor, config.packing), getattr(layers[name], "bias", None),
                                     config.activations)
        set_module(model, name, packed.to(weights[name].device))
        if thresholds is not None:
            extras[name] = {"threshold_mean": float(thresholds.mean())}
    return extras


def _report_row(name: str, weight: torch.Tensor, packed: PackedTernaryLinear) -> dict[str, Any]:
    restored = packed.dequantize(torch.float32)
    reference = weight.float()
    tensor = packed.ternary()
    return {
        "name": name,
        "precision": "ternary",
        "shape": list(weight.shape),
        "group_size": packed.group_size,
        "planes": packed.planes,
        "sparsity": tensor.sparsity(),
        # nearest rounding onto {-α, 0, α} switches at α/2; threshold modes overwrite it with their cutoff
        "threshold_mean": float(tensor.scales.abs().mean() / 2) if packed.planes == 1 else None,
        "scale_mean": float(tensor.scales.abs().mean()),
        "scale_min": float(tensor.scales.abs().min()),
        "scale_max": float(tensor.scales.abs().max()),
        "rel_error": float((reference - restored).norm() / reference.norm().clamp(min=1e-30)),
    }


def calibration_windows(
    model: nn.Module, config: QuantConfig, calibration: torch.Tensor | str | None, tokenizer: Any
) -> torch.Tensor | None:
    """Token windows for calibration, or None for data-free weight-only ternarisation."""
    from .data import DataError, generated_windows, load_text, token_windows

    stage = config.calibration or Calibration(source=None)
    source = calibration if calibration is not None else stage.source
    if source is None:
        return None
    if isinstance(source, torch.Tensor):
        windows = source
    elif tokenizer is None:
        raise ValueError(f"calibration source {source!r} needs a tokenizer (quantize(..., tokenizer=tok))")
    elif source == "generated":
        windows = generated_windows(model, tokenizer, stage.windows, stage.seq_len)
    else:
        windows = token_windows(tokenizer, load_text(source), stage.seq_len, stage.windows)
    if windows.dim() != 2 or windows.shape[0] == 0 or windows.shape[1] < 2:
        raise DataError(f"calibration needs at least one window of >= 2 tokens, got shape {tuple(windows.shape)}")
    return windows


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

    config = (config or QuantConfig()).replace(**config_fields) if config_fields else (config or QuantConfig())
    if use_calibration and config.calibration is None:
        config = config.replace(calibration="wikitext2_valid")
    if not use_calibration:
        config = config.replace(calibration=None)
    model, tokenizer = load_model(model_name, dtype=dtype, device=device)
    report = quantize(model, config, tokenizer=tokenizer, quiet=quiet)
    return {"model": model, "tokenizer": tokenizer, "config": config, "stats": model_stats(model),
            "report": report}
