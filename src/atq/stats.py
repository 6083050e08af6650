"""Sizes of quantized models and the one markdown-table helper of the CLI and benchmarks.

Sizes count what an artifact stores: 2-bit codes (rows padded to whole bytes) plus fp16 scales for ternary
layers, and every other parameter at its floating-point width. ``bits_per_weight`` includes the scales.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from torch import nn

from .layers import PackedTernaryLinear
from .surgery import is_linear


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
            ternary_bytes += module.qweight.nbytes()
            zero_codes += round(module.qweight.ternary().sparsity() * module.in_features * module.out_features)
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


def key_value_table(rows: list[tuple[str, str]]) -> str:
    """The CLI's two-column summary (what | value), keys padded to one width for reading in a terminal."""
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| what | value |", "| --- | --- |"] + [f"| {k:<{width}} | {v} |" for k, v in rows])


ARTIFACT_FILES = {"config.json", "generation_config.json", "model.safetensors", "atq_checksums.json"}


def artifact_breakdown(directory: str | os.PathLike) -> dict[str, int]:
    """An artifact's bytes by what they hold: ternary codes and scales, the block-quantized embedding, other
    tensors (FP), the tokenizer files, and the rest (configs, checksums, the safetensors header); and the total."""
    from safetensors import safe_open

    directory = Path(directory)
    parts = dict.fromkeys(("ternary_codes", "ternary_scales", "embedding", "fp_tensors", "tokenizer", "other"), 0)
    with safe_open(str(directory / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
        for name in names:
            tensor = handle.get_slice(name)
            size = math.prod(tensor.get_shape()) * _DTYPE_BYTES[tensor.get_dtype()]
            owner = name.rpartition(".")[0]
            if f"{owner}.packed" in names:
                parts["ternary_codes" if name.endswith(".packed") else "ternary_scales"] += size
            elif f"{owner}.codes" in names:
                parts["embedding"] += size
            else:
                parts["fp_tensors"] += size
    files = {f.name: f.stat().st_size for f in directory.rglob("*") if f.is_file()}
    parts["tokenizer"] = sum(size for name, size in files.items() if name not in ARTIFACT_FILES)
    parts["total"] = sum(files.values())
    parts["other"] = parts["total"] - sum(v for k, v in parts.items() if k not in ("other", "total"))
    return parts


_DTYPE_BYTES = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I32": 4, "I64": 8}
