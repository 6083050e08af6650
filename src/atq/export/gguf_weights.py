"""The weights of a llama.cpp GGUF of a Llama or Qwen2 model, dequantized into an HF model of the same config.

Why: to score any llama.cpp file — its own quantizer's Q2_K / IQ2_XS / IQ2_XXS / Q2_0, or an ATQ export — with
ATQ's evaluation loop on exactly the tokens ATQ's models are scored on (benchmarks/peers.py). transformers' GGUF
loader dequantizes through the gguf package, which does not know Q2_0 (type 42); here Q2_0 goes through
``q2_0.dequantize`` (ggml's dequantizer transcribed) and every other type through the gguf package. Tensor names
map back through ``gguf_layout.gguf_name`` (biases too: Qwen2's q/k/v), and a Llama's q/k rows are put back
from llama.cpp's rotary order (Qwen2's are stored in HF's).
"""

from __future__ import annotations

import os
from collections import Counter

import numpy as np
import torch
from torch import nn

from . import q2_0
from .gguf_layout import gguf_name, hf_rows, unpermute_rows
from .gguf_metadata import ExportError
from .gguf_read import GGUFTensor, read_gguf

__all__ = ["dequantized", "load_gguf_weights", "unpermute_rows"]


def dequantized(tensor: GGUFTensor) -> np.ndarray:
    """The float32 values of one GGUF tensor, in its numpy shape (rows first)."""
    import gguf

    kind = tensor.ggml_type
    if kind == q2_0.GGML_TYPE:
        return q2_0.dequantize(tensor.data, tensor.shape[0], int(np.prod(tensor.shape[1:])))
    plain = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}
    if kind in plain:
        return np.asarray(tensor.data).view(plain[kind]).astype(np.float32).reshape(tensor.shape)
    rows = np.asarray(tensor.data).reshape(int(np.prod(tensor.shape[:-1])), -1)
    return gguf.quants.dequantize(rows, gguf.GGMLQuantizationType(kind)).astype(np.float32).reshape(tensor.shape)


@torch.no_grad()
def load_gguf_weights(model: nn.Module, path: str | os.PathLike) -> dict[str, int]:
    """Copy every tensor of the GGUF at ``path`` into ``model`` (an FP HF Llama or Qwen2 of the file's shape),
    dequantized;
    returns how many tensors of each GGUF type it held. A head the file stores apart from the embedding unties a
    tied model. Raises ExportError naming a tensor the model lacks, a parameter the file lacks, or a shape that
    differs."""
    _, tensors = read_gguf(path)
    config = model.config
    parameters = dict(model.named_parameters(remove_duplicate=False))
    by_gguf = {f"{gguf_name(layer)}.{leaf}": name for name in parameters for layer, leaf in [name.rsplit(".", 1)]}
    if "output.weight" in tensors and model.lm_head.weight is model.get_input_embeddings().weight:
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
        config.tie_word_embeddings = False
    unknown = sorted(set(tensors) - set(by_gguf))
    missing = sorted(n for n in set(by_gguf) - set(tensors) if n != "output.weight" or not config.tie_word_embeddings)
    if unknown or missing:
        raise ExportError(f"{path}: tensors the model lacks {unknown[:5]}, parameters the file lacks {missing[:5]}: "
                          "the GGUF is not of this model's architecture")
    for name, tensor in tensors.items():
        target = model.get_parameter(by_gguf[name])
        value = torch.from_numpy(dequantized(tensor))
        value = hf_rows(model, by_gguf[name].rsplit(".", 1)[0], value)
        if value.shape != target.shape:
            raise ExportError(f"{path}: tensor {name} has shape {tuple(value.shape)}, the model's {by_gguf[name]} "
                              f"{tuple(target.shape)}")
        target.copy_(value.to(target.dtype))
    return dict(Counter(_type_name(t.ggml_type) for t in tensors.values()))


def _type_name(kind: int) -> str:
    import gguf

    return "Q2_0" if kind == q2_0.GGML_TYPE else gguf.GGMLQuantizationType(kind).name
