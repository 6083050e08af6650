"""Find and replace the linear layers of any HF model, generically (DESIGN rule 3: no per-family classes).

A "linear layer" is ``nn.Linear`` or transformers' GPT-2 ``Conv1D`` (which stores its weight as (in, out));
``linear_weight`` hands both out in (out, in) orientation so nothing downstream knows the difference.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .config import QuantConfig

# The linear layers of a Llama-family decoder block: HF attribute path -> llama.cpp tensor name. Rotation walks
# them, the GGUF export names them; one table so the two cannot disagree.
LLAMA_LINEARS = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a core dependency
        return None
    return Conv1D


def is_linear(module: nn.Module) -> bool:
    conv1d = _conv1d_class()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight in nn.Linear orientation (out, in); GPT-2's Conv1D is transposed here, once."""
    if isinstance(module, nn.Linear):
        return module.weight
    if is_linear(module):
        return module.weight.t()
    raise TypeError(f"unsupported layer type {type(module).__name__}: expected nn.Linear or Conv1D")


def _tied_to_embedding(model: nn.Module, module: nn.Module) -> bool:
    get_input = getattr(model, "get_input_embeddings", None)
    embedding = get_input() if callable(get_input) else None
    return embedding is not None and getattr(embedding, "weight", None) is getattr(module, "weight", None)


def select_linear_layers(model: nn.Module, config: QuantConfig) -> dict[str, nn.Module]:
    """Linear layers to ternarise, by name, in module order.

    The output embedding (LM head) and anything sharing its weight with the input embedding are skipped unless
    ``config.quantize_head``: ternarising a tied head would also ternarise the embedding it shares.
    """
    get_output = getattr(model, "get_output_embeddings", None)
    head = get_output() if callable(get_output) else None
    selected: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if not is_linear(module):
            continue
        if not config.quantize_head and (module is head or _tied_to_embedding(model, module)):
            continue
        if config.include and not any(re.search(p, name) for p in config.include):
            continue
        if any(re.search(p, name) for p in config.exclude):
            continue
        selected[name] = module
    if not selected:
        raise ValueError(
            f"no linear layer left to ternarise in {type(model).__name__} after include={list(config.include)} "
            f"exclude={list(config.exclude)} (the LM head is skipped unless quantize_head=True)"
        )
    return selected


def all_linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if is_linear(module)]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def decoder_blocks(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The model's decoder blocks: the longest ``nn.ModuleList`` whose every child holds a linear layer (FP or
    ternary).

    Found by structure, not by family (``model.layers`` in Llama, ``transformer.h`` in GPT-2), so sequential
    calibration works on any decoder stack.
    """
    from .layers import PackedTernaryLinear, TernaryLinear

    def holds_linear(block: nn.Module) -> bool:  # FP, packed or trainable ternary: the finder works at every stage
        return any(is_linear(m) or isinstance(m, (PackedTernaryLinear, TernaryLinear)) for m in block.modules())

    best: tuple[str, list[nn.Module]] | None = None
    for name, module in model.named_modules():
        is_stack = isinstance(module, nn.ModuleList) and len(module) > 0 and all(holds_linear(c) for c in module)
        if is_stack and (best is None or len(module) > len(best[1])):
            best = (name, list(module))
    if best is None:
        raise ValueError(f"{type(model).__name__}: no decoder blocks found (a ModuleList of blocks with linear layers)")
    return best
