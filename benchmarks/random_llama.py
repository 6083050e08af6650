"""Llama shapes with random weights, for the benchmarks where the shape, not the weights, sets time and memory
(qat_multigpu.py, scale.py); ``tiny`` is their smoke test on any machine."""

from __future__ import annotations

import torch

SHAPES = {
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "vocab_size": 128256},
    "llama3-70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                   "num_key_value_heads": 8, "vocab_size": 128256},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512},
}


def random_llama(shape: str, device: str | torch.device, layers: int | None = None) -> torch.nn.Module:
    """A Llama-3-style model of ``shape`` (``layers`` blocks instead of all), fp32, untied, its random weights
    seeded alike on every process, built directly on ``device``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**SHAPES[shape], "num_hidden_layers": layers or SHAPES[shape]["num_hidden_layers"]},
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)
