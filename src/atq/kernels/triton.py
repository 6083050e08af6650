"""Triton kernels: activations (M, K) @ packed 2-bit ternary weights (N, ⌈K/4⌉) with group scales -> (M, N).

The weights never exist in memory as floats: each program loads packed bytes and unpacks the four trits of a
byte in registers (bits 2i..2i+1 hold column 4j+i, stored as value + 1, see packing.py), so a decode step
reads 2 bits a weight plus the scales instead of 16.

- ``gemv`` (batch rows M < 16): one program per (BLOCK_N output rows, input row); for each K tile, the four
  trit planes of the loaded bytes are multiplied with the four strided slices of x, so every byte is read once.
- ``gemm`` (M >= 16): tiles of (BLOCK_M, BLOCK_N), weights dequantized tile by tile in registers and fed to
  ``tl.dot`` in the activation dtype with fp32 accumulation.

A K tile never straddles two scale groups (BLOCK_K divides the group size, or one group spans the row), so a
tile's partial sum is scaled once per row. One trit-plane and the 2-bit layout only; ``supported`` says when.
Runs on CUDA, and on the CPU under ``TRITON_INTERPRET=1`` (how the tests check it without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def supported(x: torch.Tensor, packed: torch.Tensor, layout: str) -> bool:
    return layout == "2bit" and packed.dim() == 2 and x.dtype in (torch.float16, torch.bfloat16, torch.float32)


def _block_k(group_size: int, in_features: int, cap: int = 128) -> int:
    """The largest power-of-two tile (>= 16, <= cap) that keeps every tile inside one scale group."""
    if group_size >= in_features:
        return cap
    block = cap
    while block > 16 and group_size % block:
        block //= 2
    if group_size % block:
        raise ValueError(f"group_size {group_size} must be a multiple of 16 (or span the row) for the Triton kernel")
    return block


@triton.jit
def _gemv_kernel(x_ptr, packed_ptr, scales_ptr, bias_ptr, out_ptr, N, K, KB, stride_xm, stride_pn, stride_sn,
                 stride_om, group_size, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        j = k0 // 4 + tl.arange(0, BLOCK_K // 4)
        byte = tl.load(packed_ptr + rows[:, None] * stride_pn + j[None, :],
                       mask=row_mask[:, None] & (j < KB)[None, :], other=85)  # 0b01010101: four zero trits
        partial = tl.full((BLOCK_N,), 0.0, tl.float32)
        for i in tl.static_range(4):
            col = 4 * j + i
            x = tl.load(x_ptr + m * stride_xm + col, mask=col < K, other=0.0).to(tl.float32)
            code = ((byte >> (2 * i)) & 3).to(tl.float32) - 1.0
            partial += tl.sum(code * x[None, :], axis=1)
        scale = tl.load(scales_ptr + rows * stride_sn + k0 // group_size, mask=row_mask, other=0.0)
        acc += partial * scale.to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _gemm_kernel(x_ptr, packed_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_pn, stride_sn,
                 stride_om, group_size, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rows_m < M, rows_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        x = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        byte = tl.load(packed_ptr + rows_n[:, None] * stride_pn + (ks // 4)[None, :],
                       mask=n_mask[:, None] & k_mask[None, :], other=85)
        code = ((byte >> ((ks % 4) * 2).to(tl.uint8)[None, :]) & 3).to(tl.float32) - 1.0
        scale = tl.load(scales_ptr + rows_n * stride_sn + k0 // group_size, mask=n_mask, other=0.0)
        weight = (code * scale.to(tl.float32)[:, None]).to(x.dtype)
        acc += tl.dot(x, tl.trans(weight))
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows_m[:, None] * stride_om + rows_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def ternary_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
    bias: torch.Tensor | None = None, block_n: int | None = None,
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) for one-plane 2-bit packed W; the result has x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    rows, out_features = x2.shape[0], packed.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    scales = scales.contiguous()
    stride_sn = 0 if scales.shape[0] == 1 else scales.stride(0)  # a per-tensor scale row is shared by all rows
    block_k = _block_k(group_size, in_features)
    common = {"HAS_BIAS": bias is not None}
    bias_arg = bias if bias is not None else out
    if rows < 16:
        block_n = block_n or 64
        grid = (triton.cdiv(out_features, block_n), rows)
        _gemv_kernel[grid](x2, packed, scales, bias_arg, out, out_features, in_features, packed.shape[1],
                           x2.stride(0), packed.stride(0), stride_sn, out.stride(0), group_size,
                           BLOCK_N=block_n, BLOCK_K=block_k, **common)
    else:
        block_m, block_n = (64, block_n or 64) if rows >= 64 else (16, block_n or 64)
        grid = (triton.cdiv(rows, block_m), triton.cdiv(out_features, block_n))
        _gemm_kernel[grid](x2, packed, scales, bias_arg, out, rows, out_features, in_features, x2.stride(0),
                           packed.stride(0), stride_sn, out.stride(0), group_size,
                           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=min(block_k, 64), **common)
    return out.reshape(*shape[:-1], out_features)
