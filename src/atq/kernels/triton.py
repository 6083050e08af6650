"""Triton kernels: activations (M, K) @ packed 2-bit ternary weights (N, ⌈K/4⌉) with group scales -> (M, N).

The weights never exist in memory as floats: each program loads packed codes and unpacks them in registers
(bits 2i..2i+1 of byte j hold column 4j+i, stored as value + 1, see packing.py), so a decode step reads 2 bits a
weight plus the scales instead of 16.

Decode (one activation row) is bound both by bytes in flight and by how fast codes become numbers: an int->float
conversion is a quarter-rate instruction, and four per byte cost more than reading the byte. So the GEMV never
converts: it reads the codes as int32 words (16 trits each) and ORs a trit's two bits into the mantissa of a power
of two *in place*, which is then an exact float (2^23 + c·4^t); one FMA rescales it to c - 1 exactly. ``F16X2``
does the same two codes at a time in packed half precision through inline PTX (``lop3`` + ``fma.f16x2``, the trick
of FasterTransformer's int4 dequantizers): 1.2-1.4x faster than the fp32 form on the H100. It needs a CUDA GPU and
|x| < 65504 (activations go through fp16), so the fp32 form stays for the CPU interpreter and for fp32 inputs.

- ``_gemv`` (fewer than GEMV_MAX_ROWS rows): one program per (BLOCK_N output rows, activation row), walking K in
  wide tiles of BLOCK_W words with the next tile's loads issued before the current tile is computed (2 KB tiles
  without prefetch reached 8-13% of the copy bandwidth; these reach 27-40%, see results/kernels_h100.json).
- ``_gemm``: tiles of (BLOCK_M, BLOCK_N), the weight tile unpacked from words in registers (the 16 trits of a
  word are consecutive columns, so a (BLOCK_N, BLOCK_K/16, 16) expansion reshapes to the natural K order) and fed
  to ``tl.dot`` in the activation dtype with fp32 accumulation, next tiles prefetched; BLOCK_M rows share each
  unpacking. Still 0.5-0.8x of cuBLAS bf16 at batch 8-64. (Walking K as (trit, word), so that each operand is an
  elementwise function of the words and needs no reshape, measured 2x slower still.)

Both need K % 16 == 0 (a row is whole int32 words; every Llama and GPT-2 shape is), which ``supported`` checks;
other shapes take the torch reference. Scales are looked up per word (every group is whole words): the GEMV sums a
tile's words group by group and scales each group once (or, for one group a row, the row's total once); the GEMM
scales the unpacked codes. On a GPU the tile sizes are autotuned per shape (the first call of a shape is slow); in
the CPU interpreter (``TRITON_INTERPRET=1``, how the tests run without a GPU) the first config runs. One
trit-plane and the 2-bit layout only.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 4  # fewer rows: one GEMV program per row; more: the GEMM (a guess, not a measured crossover)
_ON_GPU = torch.cuda.is_available()


def supported(x: torch.Tensor, packed: torch.Tensor, layout: str, in_features: int, group_size: int) -> bool:
    """Whether the kernels take this product; everything else goes to the torch reference."""
    return (layout == "2bit" and packed.dim() == 2 and in_features % 16 == 0 and _group_fits(group_size, in_features)
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


def _tuned(configs: list[triton.Config], key: list[str]):
    """Autotune over ``configs`` on a GPU; under the interpreter only the first runs (nothing there to time)."""
    return triton.autotune(configs=configs if _ON_GPU else configs[:1], key=key)


def _group_fits(group_size: int, in_features: int) -> bool:
    """Scales are looked up per int32 word (16 columns), so a group must be whole words or span the row."""
    return group_size >= in_features or group_size % 16 == 0


def _check_group(group_size: int, in_features: int) -> None:
    if not _group_fits(group_size, in_features):
        raise ValueError(f"group_size {group_size} must be a multiple of 16 (or span the row) for the Triton kernel")


def _f16x2_ptx() -> str:
    """PTX for one int32 word of 16 trits against 8 fp16 pairs (x[p], x[8+p]) -> their dot product as fp32.

    ``lop3`` puts trit p (low half) and trit 8+p (high half) into the mantissas of two fp16 1024s at bit 2p (p <= 4;
    the word shifted right by 10 serves p = 5..7); ``fma(v, 4^-p, -(1024·4^-p + 1))`` turns 1024 + c·4^p into c - 1
    exactly; a second ``fma.f16x2`` accumulates the pair products. Eight products per half are summed in fp16
    (relative error ~1e-3), the two halves in fp32.
    """
    lines = ["{", ".reg .b32 v, w10, s, k, o, acc;", ".reg .f16 lo, hi;", ".reg .f32 flo, fhi;",
             "shr.b32 w10, $1, 10;", "mov.b32 acc, 0;", "mov.b32 s, 0x64006400;"]
    for p in range(8):
        source, at = ("$1", p) if p < 5 else ("w10", p - 5)
        mask = 0x00030003 << (2 * at)
        scale = int(torch.tensor(0.25**at, dtype=torch.float16).view(torch.int16)) & 0xFFFF
        offset = int(torch.tensor(-(1024 * 0.25**at + 1), dtype=torch.float16).view(torch.int16)) & 0xFFFF
        lines += [f"lop3.b32 v, {source}, {mask:#010x}, s, 0xea;",  # (source & mask) | 0x6400_6400
                  f"mov.b32 k, {scale << 16 | scale:#010x};",
                  f"mov.b32 o, {offset << 16 | offset:#010x};",
                  "fma.rn.f16x2 v, v, k, o;",
                  f"fma.rn.f16x2 acc, v, ${p + 2}, acc;"]
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;", "}"]
    return "\n".join(lines)


_F16X2_PTX = tl.constexpr(_f16x2_ptx())  # a jit function reads globals only as constexpr


@triton.jit
def _trit(words, t: tl.constexpr):
    """Trit ``t`` (0..15) of each int32 word as float32 -1/0/+1, without an int->float conversion: its bits are
    OR-ed into the mantissa of 2^23 where they lie (t <= 10; the word shifted by 22 serves the rest), giving
    2^23 + c·4^t exactly, and one FMA maps that to c - 1 exactly."""
    if t < 11:
        value = ((words & (3 << (2 * t))) | 0x4B000000).to(tl.float32, bitcast=True)
        code = value * (1.0 / (1 << (2 * t))) - ((1 << (23 - 2 * t)) + 1.0)
    else:
        value = (((words >> 22) & (3 << (2 * t - 22))) | 0x4B000000).to(tl.float32, bitcast=True)
        code = value * (1.0 / (1 << (2 * t - 22))) - ((1 << (45 - 2 * t)) + 1.0)
    return code


@triton.jit
def _fp16_pair(x_ptr, base, q, p: tl.constexpr, mask):
    """(x[16q + p], x[16q + 8 + p]) as fp16 in one int32: the operand order of ``_F16X2_PTX``."""
    lo = tl.load(x_ptr + base + 16 * q + p, mask=mask, other=0.0).to(tl.float16).to(tl.int16, bitcast=True)
    hi = tl.load(x_ptr + base + 16 * q + 8 + p, mask=mask, other=0.0).to(tl.float16).to(tl.int16, bitcast=True)
    return (lo.to(tl.int32) & 0xFFFF) | (hi.to(tl.int32) << 16)

_GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=warps, num_stages=1)
                 for n, w, warps in [(8, 128, 4), (16, 128, 4), (4, 256, 4), (8, 256, 8), (16, 64, 4), (4, 128, 2),
                                     (2, 256, 2), (16, 256, 8), (32, 64, 4), (8, 64, 2), (32, 128, 8), (64, 64, 8),
                                     (32, 256, 8), (64, 128, 8), (4, 64, 1)]]
MIN_BLOCK_W = min(config.kwargs["BLOCK_W"] for config in _GEMV_CONFIGS)


@triton.jit
def _tile_dots(x_ptr, x_base, words, q, q_mask, F16X2: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """codes · x for each (row, word) of a tile: (BLOCK_N, BLOCK_W) fp32 partial sums of 16 products each."""
    if F16X2:
        dots = tl.inline_asm_elementwise(
            _F16X2_PTX, "=r,r,r,r,r,r,r,r,r,r",
            [words, _fp16_pair(x_ptr, x_base, q, 0, q_mask), _fp16_pair(x_ptr, x_base, q, 1, q_mask),
             _fp16_pair(x_ptr, x_base, q, 2, q_mask), _fp16_pair(x_ptr, x_base, q, 3, q_mask),
             _fp16_pair(x_ptr, x_base, q, 4, q_mask), _fp16_pair(x_ptr, x_base, q, 5, q_mask),
             _fp16_pair(x_ptr, x_base, q, 6, q_mask), _fp16_pair(x_ptr, x_base, q, 7, q_mask)],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        dots = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
        for t in tl.static_range(16):
            x = tl.load(x_ptr + x_base + 16 * q + t, mask=q_mask, other=0.0).to(tl.float32)
            dots += _trit(words, t) * x[None, :]
    return dots


@triton.jit
def _tile_scales(s_rows, row_mask, w_start, q, KW, ROW_GROUP: tl.constexpr, ALIGNED: tl.constexpr, GROUP_W: tl.constexpr,
                 BLOCK_W: tl.constexpr):
    """The scales a tile needs: none (one group per row, applied at the end), one per group of the tile
    (groups of a power-of-two number of words that divides the tile), or one per word (anything else)."""
    if ROW_GROUP:
        scale = tl.full((1, 1), 1.0, tl.float32)
    elif ALIGNED:
        groups = w_start // GROUP_W + tl.arange(0, BLOCK_W // GROUP_W)
        mask = row_mask[:, None] & (groups * GROUP_W < KW)[None, :]
        scale = tl.load(s_rows + groups[None, :], mask=mask, other=0.0).to(tl.float32)
    else:
        mask = row_mask[:, None] & (q < KW)[None, :]
        scale = tl.load(s_rows + (q // GROUP_W)[None, :], mask=mask, other=0.0).to(tl.float32)
    return scale


@_tuned(_GEMV_CONFIGS, key=["N", "KW", "F16X2", "GROUP_W"])
@triton.jit
def _gemv(x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, N, KW, stride_xm, stride_wn, stride_sn, stride_om,
          HAS_BIAS: tl.constexpr, F16X2: tl.constexpr, ROW_GROUP: tl.constexpr, ALIGNED: tl.constexpr,
          GROUP_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    m = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None] * stride_wn
    s_rows = scales_ptr + rows[:, None] * stride_sn
    q = tl.arange(0, BLOCK_W)
    words = tl.load(w_rows + q[None, :], mask=row_mask[:, None] & (q < KW)[None, :], other=0x55555555)  # 0 trits
    scale = _tile_scales(s_rows, row_mask, 0, q, KW, ROW_GROUP, ALIGNED, GROUP_W, BLOCK_W)
    acc = tl.full((BLOCK_N,), 0.0, tl.float32)
    for w0 in range(BLOCK_W, KW + BLOCK_W, BLOCK_W):
        q_next = w0 + tl.arange(0, BLOCK_W)  # the next tile's loads are issued before this tile is computed
        words_next = tl.load(w_rows + q_next[None, :], mask=row_mask[:, None] & (q_next < KW)[None, :],
                             other=0x55555555)
        scale_next = _tile_scales(s_rows, row_mask, w0, q_next, KW, ROW_GROUP, ALIGNED, GROUP_W, BLOCK_W)
        dots = _tile_dots(x_ptr, m * stride_xm, words, q, q < KW, F16X2, BLOCK_N, BLOCK_W)
        if ROW_GROUP:
            acc += tl.sum(dots, axis=1)
        elif ALIGNED:
            per_group = tl.sum(tl.reshape(dots, (BLOCK_N, BLOCK_W // GROUP_W, GROUP_W)), axis=2)
            acc += tl.sum(per_group * scale, axis=1)
        else:
            acc += tl.sum(dots * scale, axis=1)
        words, scale, q = words_next, scale_next, q_next
    if ROW_GROUP:
        acc *= tl.load(scales_ptr + rows * stride_sn, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rows, acc.to(out_ptr.dtype.element_ty), mask=row_mask)


_GEMM_CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=1)
                 for bm, bn, bk, warps in [(16, 32, 128, 4), (16, 64, 128, 4), (16, 32, 256, 4), (16, 16, 256, 2),
                                           (32, 32, 128, 4), (32, 64, 128, 4), (64, 32, 128, 4), (64, 64, 128, 4),
                                           (64, 64, 64, 4), (64, 128, 64, 8), (128, 64, 64, 8), (128, 128, 64, 8),
                                           (64, 16, 256, 4), (16, 64, 64, 4), (32, 32, 64, 4)]]


@triton.jit
def _gemm_tiles(x_ptr, w_ptr, scales_ptr, rows_m, rows_n, m_mask, n_mask, k0, K, KW, stride_xm, stride_wn,
                stride_sn, GROUP_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """The activation tile, the weight words and one scale per word for the K tile starting at ``k0``."""
    ks = k0 + tl.arange(0, BLOCK_K)
    x = tl.load(x_ptr + rows_m[:, None] * stride_xm + ks[None, :], mask=m_mask[:, None] & (ks < K)[None, :],
                other=0.0)
    q = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    both = n_mask[:, None] & (q < KW)[None, :]
    words = tl.load(w_ptr + rows_n[:, None] * stride_wn + q[None, :], mask=both, other=0x55555555)
    scale = tl.load(scales_ptr + rows_n[:, None] * stride_sn + (q // GROUP_W)[None, :], mask=both, other=0.0)
    return x, words, scale


@_tuned(_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_W"])
@triton.jit
def _gemm(x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, KW, stride_xm, stride_wn, stride_sn, stride_om,
          M_BUCKET, HAS_BIAS: tl.constexpr, GROUP_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_K: tl.constexpr):
    rows_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rows_m < M, rows_n < N
    shifts = 2 * tl.arange(0, 16)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    x, words, scale = _gemm_tiles(x_ptr, w_ptr, scales_ptr, rows_m, rows_n, m_mask, n_mask, 0, K, KW, stride_xm,
                                  stride_wn, stride_sn, GROUP_W, BLOCK_K)
    for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):
        x_next, words_next, scale_next = _gemm_tiles(  # issued before this tile is unpacked and multiplied
            x_ptr, w_ptr, scales_ptr, rows_m, rows_n, m_mask, n_mask, k0, K, KW, stride_xm, stride_wn, stride_sn,
            GROUP_W, BLOCK_K)
        code = _trit(words[:, :, None] >> shifts[None, None, :], 0)  # (BLOCK_N, BLOCK_K / 16, 16)
        weight = tl.reshape(code * scale.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K)).to(x.dtype)
        acc = tl.dot(x, tl.trans(weight), acc)
        x, words, scale = x_next, words_next, scale_next
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows_m[:, None] * stride_om + rows_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


def ternary_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
    bias: torch.Tensor | None = None, f16x2: bool | None = None,
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) for one-plane 2-bit packed W (K % 16 == 0); the result has x's dtype.

    ``f16x2`` picks the packed-half GEMV (default: on CUDA for fp16/bf16 inputs, see the module docstring).
    """
    if in_features % 16:
        raise ValueError(f"the Triton kernels need in_features % 16 == 0 (whole int32 words), got {in_features}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    rows, out_features = x2.shape[0], packed.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*shape[:-1], out_features)
    words = packed.contiguous().view(torch.int32)
    scales = scales.contiguous()
    stride_sn = 0 if scales.shape[0] == 1 else scales.stride(0)  # a per-tensor scale row is shared by all rows
    _check_group(group_size, in_features)
    group_words = max(group_size // 16, 1) if group_size < in_features else words.shape[1]  # (one group a row)
    common = (x2, words, scales, bias if bias is not None else out, out)
    if rows < GEMV_MAX_ROWS:
        if f16x2 is None:
            f16x2 = x.is_cuda and x.dtype != torch.float32
        _gemv[lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), rows)](
            *common, out_features, words.shape[1], x2.stride(0), words.stride(0), stride_sn, out.stride(0),
            HAS_BIAS=bias is not None, F16X2=bool(f16x2), ROW_GROUP=group_size >= in_features,
            ALIGNED=group_words & (group_words - 1) == 0 and group_words <= MIN_BLOCK_W, GROUP_W=group_words)
    else:
        _gemm[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]), triton.cdiv(out_features, meta["BLOCK_N"]))](
            *common, rows, out_features, in_features, words.shape[1], x2.stride(0), words.stride(0), stride_sn,
            out.stride(0), min(triton.next_power_of_2(rows), 512), HAS_BIAS=bias is not None, GROUP_W=group_words)
    return out.reshape(*shape[:-1], out_features)
