"""llama.cpp's Q2_0 blocks (ggml type 42), which hold ATQ's one-plane ternary weights exactly.

A Q2_0 block covers 64 consecutive weights of a row: an fp16 scale ``d`` and 16 bytes of 2-bit codes ``q``, four
weights a byte, the first in the low bits; the weight is ``(q - 1) * d`` (00 = -1, 01 = 0, 10 = +1, 11 = +2).
A ternary group of 64 (or any multiple of 64, or a whole row of a multiple of 64) with fp16 scale ``α`` is
therefore written as ``d = α``, ``q = t + 1``: llama.cpp dequantizes it to ``t * α`` in float32, which is what
``PackedTernary.dequantize`` computes, bit for bit. At 18 bytes per 64 weights it costs 2.25 bits a weight.

The gguf package on PyPI (0.19.0) does not know type 42 yet, so the blocks are built here and handed to its
writer as raw bytes. ``dequantize`` transcribes ``dequantize_row_q2_0`` of ggml/src/ggml-quants.c (and
``block_q2_0`` of ggml-common.h) in the llama.cpp that llama-cpp-python 0.3.36 vendors: the independent
reference the export is checked against.
"""

from __future__ import annotations

import numpy as np

from ..ternary import PackedTernary

GGML_TYPE = 42  # GGML_TYPE_Q2_0
FILE_TYPE = 41  # LLAMA_FTYPE_MOSTLY_Q2_0
BLOCK = 64  # QK2_0
BLOCK_BYTES = 2 + BLOCK // 4  # sizeof(block_q2_0): ggml_half d, uint8_t qs[QK2_0 / 4]


def holds_exactly(weight: PackedTernary, block: int = BLOCK) -> bool:
    """Whether ggml blocks of ``block`` weights along a row, one fp16 scale each, hold ``weight`` exactly: one
    plane, rows of whole blocks, one scale per block. Q2_0's blocks are 64 wide, TQ2_0's and TQ1_0's 256."""
    one_scale_per_block = weight.group_size >= weight.in_features or weight.group_size % block == 0
    return weight.planes == 1 and weight.in_features % block == 0 and one_scale_per_block


def encode(weight: PackedTernary) -> np.ndarray:
    """The (out, in / 64 * 18) bytes of ``weight``'s Q2_0 blocks, row by row as ggml stores them."""
    if not holds_exactly(weight):
        raise ValueError(f"Q2_0 holds one-plane weights whose groups are whole multiples of {BLOCK} along rows of "
                         f"whole blocks; got planes={weight.planes}, group_size={weight.group_size}, "
                         f"in_features={weight.in_features}")
    tensor = weight.ternary()
    rows, cols = tensor.shape
    blocks = cols // BLOCK
    q = (tensor.codes.cpu().numpy().astype(np.int16) + 1).astype(np.uint8)  # -1, 0, +1 -> 0, 1, 2
    q = q.reshape(rows, blocks, BLOCK // 4, 4)
    qs = q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)
    first_column = np.arange(blocks) * BLOCK  # each block's scale: the scale of its group
    scales = weight.scales.cpu().numpy().astype(np.float16).reshape(-1, tensor.n_groups)
    d = scales[:, first_column // min(weight.group_size, cols)]
    d = np.broadcast_to(d, (rows, blocks))
    out = np.empty((rows, blocks, BLOCK_BYTES), dtype=np.uint8)
    out[..., :2] = np.ascontiguousarray(d).view(np.uint8).reshape(rows, blocks, 2)
    out[..., 2:] = qs
    return out.reshape(rows, blocks * BLOCK_BYTES)


def weight_shape(blocks: np.ndarray) -> tuple[int, int]:
    """The (out, in) shape of the weight that ``encode`` turned into these (out, in / 64 * 18) bytes."""
    return blocks.shape[0], blocks.shape[1] // BLOCK_BYTES * BLOCK


def dequantize(data: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """ggml's ``dequantize_row_q2_0`` over a whole tensor: (rows, cols) float32 from its Q2_0 bytes."""
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // BLOCK, BLOCK_BYTES)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)  # GGML_FP16_TO_FP32(x[i].d)
    qs = blocks[..., 2:]
    j = np.arange(BLOCK)
    q = (qs[..., j // 4] >> ((j % 4) * 2)) & 0x03  # byte_index = j / 4, bit_offset = (j % 4) * 2
    return ((q.astype(np.float32) - 1) * d).reshape(rows, cols)  # y = ((int)q - 1) * d, d of shape (.., 1)
