"""Where llama.cpp expects each tensor of a Llama or Qwen2: its GGUF name, a Llama's q/k row order (llama.cpp's
converter interleaves the two rotary halves of each head; Qwen2 runs NEOX rotary and keeps HF's order), and the
biases llama.cpp reads (Qwen2's q/k/v). The exporter writes by these rules and the GGUF reader undoes them."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..surgery import LLAMA_LINEARS
from .gguf_metadata import ExportError

_BLOCK_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"} | LLAMA_LINEARS


def gguf_name(name: str) -> str:
    """HF Llama parameter name (without ``.weight``) -> llama.cpp tensor name (without ``.weight``)."""
    if name == "model.embed_tokens":
        return "token_embd"
    if name == "model.norm":
        return "output_norm"
    if name == "lm_head":
        return "output"
    parts = name.split(".")
    if parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _BLOCK_NAMES:
        return f"blk.{parts[2]}.{_BLOCK_NAMES['.'.join(parts[3:])]}"
    raise ExportError(f"GGUF export: no llama.cpp name for tensor {name!r} (Llama and Qwen2 architectures only)")


def permute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order: within each head, interleave the two rotary halves (its converter's permute)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def unpermute_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of ``permute_rows``: q/k rows from llama.cpp's rotary order back to HF's."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def llama_cpp_rows(model: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """Layer ``name``'s rows in llama.cpp's order: a Llama's q/k in its rotary order (its converter's permute);
    other tensors, and every tensor of a Qwen2 (NEOX rotary, HF's order), as they are."""
    heads = _rotary_heads(model, name)
    return weight if heads is None else permute_rows(weight, heads)


def hf_rows(model: nn.Module, name: str, weight: torch.Tensor) -> torch.Tensor:
    """The inverse of ``llama_cpp_rows``: layer ``name``'s rows as the GGUF holds them, back in HF's order."""
    heads = _rotary_heads(model, name)
    return weight if heads is None else unpermute_rows(weight, heads)


def _rotary_heads(model: nn.Module, name: str) -> int | None:
    """The heads whose rows llama.cpp interleaves in layer ``name`` (a Llama's q_proj / k_proj), else None."""
    config = model.config
    if config.model_type != "llama":
        return None
    return {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(name.rsplit(".", 1)[-1])


def bias_tensor(model: nn.Module, name: str, bias: torch.Tensor | None) -> list[tuple[str, np.ndarray, Any]]:
    """The bias of layer ``name`` as an F32 tensor where llama.cpp reads one (Qwen2's q/k/v); none where it is
    absent or zero; an ExportError where llama.cpp would drop it (any bias of a Llama: a dead-zone bias, say)."""
    import gguf

    if bias is None or not bias.abs().max() > 0:
        return []
    if model.config.model_type != "qwen2" or name.rsplit(".", 1)[-1] not in ("q_proj", "k_proj", "v_proj"):
        raise ExportError(f"{name} has a bias (dead-zone bias or a biased layer): llama.cpp's {model.config.model_type} "
                          "reads none there")
    return [(gguf_name(name) + ".bias", bias.detach().float().cpu().numpy(), gguf.GGMLQuantizationType.F32)]
