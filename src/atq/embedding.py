"""8-bit and 4-bit storage of the embedding and the LM head, in llama.cpp's Q8_0 / Q4_0 blocks.

The embedding (and the head tied to it) is the largest FP tensor left once the linear layers are ternary: 49,152
x 576 in SmolLM2, as many bytes in bf16 as all its ternary layers together. llama.cpp keeps ``token_embd`` at
8 or 4 bits for the same reason. The blocks here are bit for bit ggml's (32 weights along a row, one fp16 scale;
Q8_0: int8 codes, d = max|x|/127; Q4_0: 4-bit codes q - 8, d = (signed max)/-8, two codes a byte, element j in
the low and j + 16 in the high nibble), so a GGUF export copies them without re-quantizing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import EMBEDDINGS
from .layers import FixedDtypeBuffers
from .ternary import SCALE_DTYPE

BLOCK = 32


def _roundf(values: torch.Tensor) -> torch.Tensor:
    """C's roundf (half away from zero), which ggml uses; torch.round rounds half to even."""
    return torch.sign(values) * torch.floor(values.abs() + 0.5)


def quantize_blocks(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, fp16 scales) of ``weight`` (rows, cols) in ``kind`` blocks of 32 along each row, as ggml's
    reference quantizer computes them. Q8_0 codes: int8 (rows, cols); Q4_0: uint8 (rows, cols // 2)."""
    rows, cols = weight.shape
    if cols % BLOCK:
        raise ValueError(f"{kind} stores rows in blocks of {BLOCK}; a row of {cols} is not whole blocks")
    blocks = weight.detach().float().reshape(rows, cols // BLOCK, BLOCK)
    if kind == "q8_0":
        d = blocks.abs().amax(-1, keepdim=True) / 127
        codes = _roundf(blocks * torch.where(d == 0, 0, 1 / d)).to(torch.int8).reshape(rows, cols)
    elif kind == "q4_0":
        signed_max = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
        d = signed_max / -8
        q = torch.trunc(blocks * torch.where(d == 0, 0, 1 / d) + 8.5).clamp(0, 15).to(torch.uint8)
        codes = (q[..., : BLOCK // 2] | (q[..., BLOCK // 2 :] << 4)).reshape(rows, cols // 2)
    else:
        raise ValueError(f"unknown block type {kind!r}; expected one of {EMBEDDINGS[1:]}")
    return codes, d.squeeze(-1).to(SCALE_DTYPE)


def dequantize_blocks(codes: torch.Tensor, scales: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize_blocks`` for any leading rows: (..., cols) in ``dtype``."""
    if kind == "q8_0":
        values = codes.to(dtype).unflatten(-1, (-1, BLOCK))
    else:
        packed = codes.unflatten(-1, (-1, BLOCK // 2))
        values = (torch.cat([packed & 15, packed >> 4], -1).to(torch.int16) - 8).to(dtype)
    return (values * scales.to(dtype).unsqueeze(-1)).flatten(-2)


class BlockQuantizedMatrix(FixedDtypeBuffers, nn.Module):
    """A (rows, cols) matrix stored in Q8_0 / Q4_0 blocks; ``dtype`` is the dtype it computes in (the model's),
    while the fp16 scales keep their dtype whatever ``.to()`` asks (they are what the file holds)."""

    fixed_dtype_buffers = ("scales",)

    def __init__(self, rows: int, cols: int, kind: str, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        width = cols if kind == "q8_0" else cols // 2
        self.rows, self.cols, self.kind = rows, cols, kind
        self.register_buffer("codes", torch.zeros(rows, width, dtype=torch.int8 if kind == "q8_0" else torch.uint8,
                                                  device=device))
        self.register_buffer("scales", torch.zeros(rows, cols // BLOCK, dtype=SCALE_DTYPE, device=device))
        self.register_buffer("dtype_probe", torch.zeros((), dtype=dtype, device=device), persistent=False)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, kind: str) -> BlockQuantizedMatrix:
        matrix = cls(*weight.shape, kind, weight.dtype, weight.device)
        matrix.codes, matrix.scales = quantize_blocks(weight, kind)
        return matrix

    @property
    def dtype(self) -> torch.dtype:
        return self.dtype_probe.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_blocks(self.codes, self.scales, self.kind, dtype or self.dtype)

    def nbytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scales.numel() * self.scales.element_size()


class QuantizedEmbedding(BlockQuantizedMatrix):
    """nn.Embedding's lookup on block-quantized rows: only the looked-up rows are dequantized."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_blocks(self.codes[ids], self.scales[ids], self.kind, self.dtype)

    @property
    def num_embeddings(self) -> int:
        return self.rows

    @property
    def embedding_dim(self) -> int:
        return self.cols


class QuantizedHead(BlockQuantizedMatrix):
    """An LM head (nn.Linear without bias) on block-quantized rows, its own storage."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.dequantize(hidden.dtype))


class TiedQuantizedHead(nn.Module):
    """The LM head of a tied model: the embedding's quantized rows, read through a reference that is not a
    submodule (so the state dict holds the matrix once, and ``.to()`` moves it with the embedding)."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        object.__setattr__(self, "embedding", embedding)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.embedding.dequantize(hidden.dtype))


def check_blockable(model: nn.Module) -> None:
    """Raise ValueError unless ``model``'s embedding rows are whole blocks of 32 (what Q8_0 / Q4_0 store); touches
    nothing, so callers check before any slow work."""
    width = getattr(model.get_input_embeddings(), "embedding_dim", 0)
    if width % BLOCK:
        raise ValueError(f"8/4-bit embedding blocks hold rows of whole blocks of {BLOCK}; this model's embedding "
                         f"is {width} wide: use embedding='fp'")


def quantize_embeddings(model: nn.Module, kind: str) -> None:
    """Replace ``model``'s input embedding (and its LM head: shared if tied, its own blocks if not) by
    ``kind`` block storage, in place; ``fp`` leaves them as they are."""
    if kind == "fp":
        return
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    stored = QuantizedEmbedding.from_weight(embedding.weight, kind)
    model.set_input_embeddings(stored)
    if head is not None and getattr(head, "bias", None) is None:
        model.set_output_embeddings(TiedQuantizedHead(stored) if tied else QuantizedHead.from_weight(head.weight, kind))


def quantized_embedding_frames(model: nn.Module, kind: str, tied: bool, dtype: torch.dtype) -> None:
    """The empty modules an artifact's embedding blocks are loaded into (``quantize_embeddings``' shapes)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    stored = QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim, kind, dtype)
    model.set_input_embeddings(stored)
    if head is not None:
        model.set_output_embeddings(TiedQuantizedHead(stored) if tied else QuantizedHead(
            head.out_features, head.in_features, kind, dtype))
