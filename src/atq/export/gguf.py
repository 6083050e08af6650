"""ATQ artifact (Llama or Qwen2 architecture) -> GGUF that stock llama.cpp loads, written with the ``gguf`` package.

Each ternary layer gets the smallest llama.cpp type that holds it *exactly* (the GGUF dequantizes bit for bit to
ATQ's weight; ``ternary_type="auto"``): TQ2_0 (blocks of 256 along a row, one fp16 scale, 2.06 bits) where rows
and groups are whole multiples of 256, else Q2_0 (blocks of 64, 2.25 bits; q2_0.py) where they are multiples
of 64 — SmolLM2's 576-wide rows with groups of 64. What neither holds (two trit-planes, groups of 32 or 96)
falls back to ``fallback`` (default Q8_0, exact up to the fp16 rounding of d, 8.5 bits; F16 where rows are not
whole blocks of 32), listed in the report with every tensor's type and the bits per ternary weight. Every exact
tensor is read back from the written file and checked bit for bit before it is published (``verify_gguf``).

Metadata and tokenizer: copied from a source GGUF (``metadata_from``, e.g. the bundled SmolLM2 file) or written
from the HF config and a BPE ``tokenizer.json``. llama.cpp expects q/k rows in the GGML rotary order, so they
are permuted as llama.cpp's own converter does (rows move with their per-row scales, codes are unchanged); its
Qwen2 keeps HF's order (NEOX rotary) and reads the q/k/v biases, which are written F32 beside the ternary weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..embedding import BlockQuantizedMatrix, TiedQuantizedHead
from ..files import atomic_file
from ..layers import PackedTernaryLinear
from ..rotation import folded_stream
from ..ternary import PackedTernary
from . import q2_0
from .gguf_layout import bias_tensor, gguf_name, llama_cpp_rows, permute_rows
from .gguf_metadata import ExportError, architecture, copy_metadata, open_source, write_metadata
from .gguf_read import read_gguf

__all__ = ["ExportError", "export_gguf", "gguf_name", "permute_rows", "ternary_exact", "verify_gguf"]

TERNARY_TYPES = ("auto", "q2_0", "tq2_0", "tq1_0", "f16")  # f16: a same-weights reference file, no ternary types
EMBEDDINGS = (None, "q8_0", "f16")  # None: as the artifact holds it (F16, or its own Q8_0 / Q4_0 blocks)
FALLBACKS = ("q8_0", "f16")
_BLOCK = 256


def ternary_exact(weight: PackedTernary) -> bool:
    """Whether TQ blocks of 256 can hold this weight exactly (the rule Q2_0's blocks of 64 follow too)."""
    return q2_0.holds_exactly(weight, _BLOCK)


def export_gguf(
    model: nn.Module,
    out: str | os.PathLike,
    metadata_from: str | os.PathLike | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    ternary_type: str = "auto",
    fallback: str = "q8_0",
    embedding: str | None = None,
) -> dict[str, Any]:
    """Write ``model`` (an ATQ-quantized Llama or Qwen2) to ``out``; returns the report (types, fallbacks, bits).

    ``metadata_from``: a GGUF whose metadata and tokenizer are copied; otherwise ``tokenizer_dir`` must hold a
    BPE ``tokenizer.json`` (the artifact directory does). ``embedding``: "q8_0" or "f16" for the embedding and
    head whatever the artifact holds (llama.cpp keeps ``token_embd`` at Q8_0 too). The file is written to a
    temporary sibling, read back and checked, and renamed: a failed export leaves nothing behind.
    """
    import gguf

    if ternary_type not in TERNARY_TYPES:
        raise ExportError(f"ternary_type must be one of {TERNARY_TYPES}, got {ternary_type!r}")
    if fallback not in FALLBACKS:
        raise ExportError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if embedding not in EMBEDDINGS:
        raise ExportError(f"embedding must be one of {EMBEDDINGS}, got {embedding!r}")
    config = model.config
    arch = architecture(config)
    if not any(isinstance(m, PackedTernaryLinear) for m in model.modules()):
        raise ExportError("GGUF export: the model has no ternary layers (quantize it first, or load an ATQ artifact)")
    _check_out(Path(out))
    reader = None if metadata_from is None else open_source(metadata_from, config, out)  # before any work
    ftype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "f16": gguf.GGMLQuantizationType.F16}[fallback]
    report: dict[str, Any] = {"tensors": {}, "fallback": [], "ternary_type": ternary_type}
    tensors, ternary_weights, ternary_bytes = _ternary_tensors(model, ternary_type, ftype, report)
    file_type = _file_type({kind for name, _, kind in tensors if name.endswith(".weight")}, bool(report["fallback"]))
    tensors += _fp_tensors(model, report, embedding)
    out = Path(out)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        if reader is not None:
            copy_metadata(writer, reader, config)
        else:
            write_metadata(writer, config, tokenizer_dir)
        writer.add_file_type(file_type)
        for name, data, kind in tensors:  # Q2_0, a type gguf 0.19 does not know: raw bytes, the weights' shape
            raw = (data.view(np.int8), q2_0.weight_shape(data)) if kind == q2_0.GGML_TYPE else (data, None)
            writer.add_tensor(name, raw[0], raw_shape=raw[1], raw_dtype=kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        report["verified_exact"] = verify_gguf(tmp, model)
    report |= {"path": str(out), "bytes": out.stat().st_size, "ternary_weights": ternary_weights,
               "bits_per_ternary_weight": 8 * ternary_bytes / ternary_weights if ternary_weights else 0.0}
    return report


def verify_gguf(path: str | os.PathLike, model: nn.Module) -> int:
    """Check every ternary layer written in an exact type (Q2_0 by q2_0.dequantize, ggml's dequantizer
    transcribed; TQ2_0 / TQ1_0 by the gguf package's) against ``model``'s weight, bit for bit; returns how many
    were checked. Raises ExportError naming the first tensor that differs (a corrupted or foreign block)."""
    import gguf

    try:
        _, tensors = read_gguf(path)
    except (ValueError, OSError) as error:
        raise ExportError(f"cannot check {path}: {error}") from error
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, PackedTernaryLinear):
            continue
        tensor = tensors.get(gguf_name(name) + ".weight")
        if tensor is None:
            raise ExportError(f"{path}: tensor {gguf_name(name)}.weight of layer {name} is missing")
        if tensor.ggml_type not in _exact_types():
            continue  # a reported fallback (Q8_0 / F16): not exact by design
        if tensor.ggml_type == q2_0.GGML_TYPE:
            values = q2_0.dequantize(tensor.data, *tensor.shape)
        else:
            values = gguf.quants.dequantize(np.asarray(tensor.data).reshape(tensor.shape[0], -1),
                                            gguf.GGMLQuantizationType(tensor.ggml_type))
        expected = llama_cpp_rows(model, name, module.qweight.dequantize(torch.float32)).cpu().numpy()
        if values.shape != expected.shape or not np.array_equal(values, expected):
            raise ExportError(f"{path}: tensor {gguf_name(name)}.weight does not dequantize to layer {name}'s "
                              "weight (a corrupted or foreign block); export the artifact again")
        checked += 1
    return checked


def _exact_types() -> set[Any]:
    """The GGUF types that hold a ternary layer exactly (checked after writing); the others are fallbacks."""
    import gguf

    return {q2_0.GGML_TYPE, gguf.GGMLQuantizationType.TQ2_0, gguf.GGMLQuantizationType.TQ1_0}


def _file_type(kinds: set[Any], fallback: bool) -> int:
    """llama.cpp's ``general.file_type``: the ternary layers' type when every one has an exact type, else F16."""
    import gguf

    if not fallback and kinds and kinds <= {q2_0.GGML_TYPE, gguf.GGMLQuantizationType.TQ2_0}:
        return q2_0.FILE_TYPE if q2_0.GGML_TYPE in kinds else gguf.LlamaFileType.MOSTLY_TQ2_0
    if not fallback and kinds == {gguf.GGMLQuantizationType.TQ1_0}:
        return gguf.LlamaFileType.MOSTLY_TQ1_0
    return gguf.LlamaFileType.MOSTLY_F16


def _check_out(out: Path) -> None:
    """An existing file at ``out`` is replaced only if it is a GGUF (an earlier export), never a user's file."""
    if out.is_file():
        with open(out, "rb") as handle:
            if handle.read(4) != b"GGUF":
                raise FileExistsError(f"{out} exists and is not a GGUF file; refusing to replace it. "
                                      "Choose another output path (nothing was written)")


def _ternary_type(weight: PackedTernary, choice: str, fallback: Any) -> Any:
    """The GGUF type of one ternary layer: under "auto" the smallest exact type (TQ2_0, else Q2_0); a named type
    where it is exact; ``fallback`` otherwise (and for "f16", F16)."""
    import gguf

    tq = {"tq2_0": gguf.GGMLQuantizationType.TQ2_0, "tq1_0": gguf.GGMLQuantizationType.TQ1_0}
    if choice == "f16":
        return gguf.GGMLQuantizationType.F16
    if choice in ("auto", "tq2_0", "tq1_0") and ternary_exact(weight):
        return tq.get(choice, gguf.GGMLQuantizationType.TQ2_0)
    if choice in ("auto", "q2_0") and q2_0.holds_exactly(weight):
        return q2_0.GGML_TYPE
    return fallback


def _ternary_tensors(model: nn.Module, choice: str, fallback: Any,
                     report: dict[str, Any]) -> tuple[list[tuple[str, np.ndarray, Any]], int, int]:
    """Every ternary layer as (gguf name, data, type) by ``_ternary_type``; records types and fallbacks in
    ``report``. Returns (tensors, weights, bytes)."""
    import gguf

    tensors, ternary_weights, ternary_bytes = [], 0, 0
    for name, module in model.named_modules():
        if not isinstance(module, PackedTernaryLinear):
            continue
        bias = bias_tensor(model, name, module.bias)
        kind = _ternary_type(module.qweight, choice, fallback)
        if kind == q2_0.GGML_TYPE:  # blocks built from the codes; rows reordered as llama.cpp wants q/k
            stored = llama_cpp_rows(model, name, torch.from_numpy(q2_0.encode(module.qweight))).numpy()
        else:
            data = llama_cpp_rows(model, name, module.qweight.dequantize(torch.float32)).cpu().numpy()
            if kind == gguf.GGMLQuantizationType.Q8_0 and module.in_features % 32:  # Q8_0 blocks are 32 wide
                kind = gguf.GGMLQuantizationType.F16
            stored = data.astype(np.float16) if kind == gguf.GGMLQuantizationType.F16 else gguf.quants.quantize(data, kind)
        if kind not in _exact_types() and choice != "f16":
            report["fallback"].append(name)
        tensors += [(gguf_name(name) + ".weight", stored, kind), *bias]
        report["tensors"][name] = "Q2_0" if kind == q2_0.GGML_TYPE else kind.name
        ternary_weights += module.qweight.in_features * module.qweight.shape[0]
        ternary_bytes += stored.nbytes
    return tensors, ternary_weights, ternary_bytes


def _fp_tensors(model: nn.Module, report: dict[str, Any], choice: str | None) -> list[tuple[str, np.ndarray, Any]]:
    """Every FP tensor: vectors (norms) as F32, matrices as F16, the embedding and head as ``choice`` asks
    (Q8_0 or F16), or else a block-quantized embedding (and head) in its own Q8_0 / Q4_0 blocks, exactly. A
    stream rotation is folded into the embedding, head and final norm (llama.cpp runs no hooks); a tied head is
    written once (llama.cpp reads token_embd for it)."""
    import gguf

    modules = dict(model.named_modules())
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    rotated = hasattr(getattr(model, "model", None), "atq_rotation")
    tied = isinstance(head, TiedQuantizedHead) or (
        getattr(head, "weight", None) is not None and head.weight is getattr(embedding, "weight", None))
    blocked = isinstance(embedding, BlockQuantizedMatrix)
    as_blocks = blocked and not rotated and choice in (None, embedding.kind)
    tensors = _block_tensors(model, report, tied) if as_blocks else []
    dense = rotated or (blocked and not as_blocks)  # the embedding (and head) rebuilt dense, folded if rotated
    folded = dict(zip(("model.embed_tokens", "lm_head", "model.norm"), _folded(model))) if dense else {}
    for name, param in [*model.named_parameters(), *[(f"{n}.weight", None) for n in folded]]:
        base, kind_of = name.rsplit(".", 1)
        if isinstance(modules.get(base), PackedTernaryLinear) or (base in folded and param is not None):
            continue
        if (tied and base == "lm_head" and not rotated) or base in report["tensors"]:
            continue
        if kind_of == "bias":  # an FP layer's bias (a Qwen2 q/k/v layer kept FP)
            tensors += bias_tensor(model, base, param)
            continue
        if kind_of != "weight":
            raise ExportError(f"GGUF export: unexpected parameter {name!r}")
        value = folded[base] if base in folded else param.detach()
        data = llama_cpp_rows(model, base, value.float()).cpu().numpy()  # q/k of a layer kept FP move too
        kind = gguf.GGMLQuantizationType.F32 if data.ndim == 1 else gguf.GGMLQuantizationType.F16
        if base in ("model.embed_tokens", "lm_head") and choice == "q8_0" and data.shape[-1] % 32 == 0:
            kind = gguf.GGMLQuantizationType.Q8_0
        stored = (gguf.quants.quantize(data, kind) if kind == gguf.GGMLQuantizationType.Q8_0
                  else data.astype(np.float32 if data.ndim == 1 else np.float16))
        tensors.append((gguf_name(base) + ".weight", stored, kind))
        report["tensors"][base] = kind.name
    return tensors


def _folded(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rotated model's embedding, head and final norm with the rotation folded in (dense)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    dense_embedding = embedding.dequantize(torch.float32) if isinstance(embedding, BlockQuantizedMatrix) else None
    if dense_embedding is None:
        return folded_stream(model)
    head_weight = dense_embedding if isinstance(head, TiedQuantizedHead) else head.dequantize(torch.float32)
    return folded_stream(model, dense_embedding, head_weight)


def _block_tensors(model: nn.Module, report: dict[str, Any], tied: bool) -> list[tuple[str, np.ndarray, Any]]:
    """The block-quantized embedding (and an untied head) as GGUF Q8_0 / Q4_0 blocks, byte for byte."""
    import gguf

    parts = [("model.embed_tokens", model.get_input_embeddings())]
    parts += [] if tied else [("lm_head", model.get_output_embeddings())]
    tensors = []
    for name, matrix in parts:
        kind = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[matrix.kind]
        rows = matrix.rows
        scales = matrix.scales.cpu().numpy().view(np.uint8).reshape(rows, -1, 2)
        codes = matrix.codes.cpu().numpy().view(np.uint8).reshape(rows, scales.shape[1], -1)
        tensors.append((gguf_name(name) + ".weight", np.concatenate([scales, codes], -1).reshape(rows, -1), kind))
        report["tensors"][name] = kind.name
    return tensors
