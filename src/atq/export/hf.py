"""ATQ artifact -> a transformers checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads with no ATQ
import, through transformers' own BitNet integration (``quantization_config.quant_method = "bitnet"``).

What that integration holds decides what can be exported exactly: its ``BitLinear`` keeps packed uint8 weights
of shape (out/4, in) — four *rows* per byte, row r + k·out/4 in bits 2k — and ONE ``weight_scale`` per tensor
(stored inverted: its forward divides by it), and its forward always quantizes the activations to int8 per
token. So a model exports exactly only when every ternary layer has one plane, one scale per tensor, a row count
divisible by 4, and was built with int8 activations: the ``QuantConfig.bitnet()`` preset (PTQ or QAT). Anything
else is refused with the reason, unless ``dequantize`` asks for a plain FP checkpoint (no compression).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from ..embedding import BlockQuantizedMatrix
from ..files import atomic_directory
from ..layers import PackedTernaryLinear
from .gguf import ExportError


def bitnet_blockers(layer: PackedTernaryLinear) -> list[str]:
    """Why ``layer`` cannot be a transformers BitLinear exactly (empty when it can)."""
    reasons, weight = [], layer.qweight
    if weight.planes != 1:
        reasons.append(f"{weight.planes} trit-planes (BitLinear holds one)")
    if weight.scales.shape[-2] != 1 or weight.scales.shape[-1] != 1:
        reasons.append(f"{weight.scales.shape[-2]}x{weight.scales.shape[-1]} scales (BitLinear holds one per tensor)")
    if layer.out_features % 4:
        reasons.append(f"{layer.out_features} rows (BitLinear packs 4 rows a byte)")
    if layer.activations != "int8":
        reasons.append("fp activations (BitLinear always quantizes them to int8 per token)")
    return reasons


def export_hf(model: nn.Module, out: str | os.PathLike, dequantize: bool = False,
              tokenizer: Any = None, overwrite: bool = False) -> dict[str, Any]:
    """Write ``model`` (ATQ-quantized) as a transformers checkpoint in ``out``; returns a short report. An existing
    non-empty ``out`` is replaced only with ``overwrite``."""
    from safetensors.torch import save_file
    from transformers.integrations.bitnet import pack_weights

    layers = {n: m for n, m in model.named_modules() if isinstance(m, PackedTernaryLinear)}
    if not layers:
        raise ExportError("HF export: the model has no ternary layers (quantize it first)")
    if hasattr(getattr(model, "model", None), "atq_rotation") or isinstance(model.get_input_embeddings(),
                                                                             BlockQuantizedMatrix):
        raise ExportError("HF export: the model rotates its residual stream at run time or stores its embedding "
                          "in 8/4-bit blocks, which plain transformers layers cannot run; quantize without "
                          "rotation= and embedding= for this export (the ATQ artifact itself loads with "
                          "from_pretrained after `import atq`)")
    blockers = {n: r for n, m in layers.items() if (r := bitnet_blockers(m))}
    if blockers and not dequantize:
        first = next(iter(blockers))
        raise ExportError(
            f"HF export: {len(blockers)} of {len(layers)} ternary layers cannot be transformers BitLinear layers "
            f"exactly, e.g. {first}: {'; '.join(blockers[first])}. Quantize with QuantConfig.bitnet() (per-tensor "
            "absmean scale, int8 activations) for an exact BitNet checkpoint, or pass dequantize=True "
            "(--dequantize) for a plain FP one without compression.")
    config = model.config.__class__.from_dict(model.config.to_dict())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    for name, layer in layers.items():
        for key in ("packed", "scales"):
            state.pop(f"{name}.{key}")
        tensor = layer.qweight.ternary()
        if dequantize:
            state[f"{name}.weight"] = tensor.dequantize(dtype)
        else:
            state[f"{name}.weight"] = pack_weights(tensor.codes.clone())
            state[f"{name}.weight_scale"] = (1 / tensor.scales.reshape(1)).to(dtype)
        if layer.bias is None:
            state.pop(f"{name}.bias", None)
    if not dequantize:
        kept = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        head = model.get_output_embeddings()
        head_name = next((n for n, m in model.named_modules() if m is head), None)
        config.quantization_config = {
            "quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
            "modules_to_not_convert": sorted(set(kept) | ({head_name} if head_name else set())),
        }
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)  # transformers re-ties it on load
    state = {k: v.contiguous() for k, v in state.items()}
    out = Path(out)
    with atomic_directory(out, lambda path: overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return {"path": str(out), "format": "dense fp" if dequantize else "transformers bitnet (bitlinear, offline)",
            "ternary_layers": len(layers), "bytes": sum(f.stat().st_size for f in out.iterdir())}
