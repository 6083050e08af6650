"""Triton kernels: activations (M, K) @ packed 2-bit ternary weights (N, ⌈K/4⌉) with group scales -> (M, N).

The weights never exist in memory as floats: each program loads packed codes and unpacks them in registers
(bits 2i..2i+1 of byte j hold column 4j+i, stored as value + 1, see packing.py), so a decode step reads 2 bits a
weight plus the scales instead of 16.

Decode (one activation row) is bound both by bytes in flight and by how fast codes become numbers: an int->float
conversion is a quarter-rate instruction, and four per byte cost more than reading the byte. So the GEMV never
converts: it reads the codes as int32 words (16 trits each) and ORs a trit's two bits into the mantissa of a power
of two *in place*, which is then an exact float (2^23 + c·4^t); one FMA rescales it to c - 1 exactly. ``F16X2``
does the same two codes at a time in packed half precision through inline PTX (``lop3`` + ``fma.f16x2``, the trick
of FasterTransformer's int4 dequantizers), faster than the fp32 form (results/kernels_h100.json times both). It
needs a CUDA GPU and |x| < 65504 (activations go through fp16): the fp32 form stays for the CPU and fp32 inputs.

- ``_gemv`` (up to GEMV_MAX_ROWS activation rows): one program per (BLOCK_N weight rows, GEMV_BLOCK_M activation
  rows), walking K in wide tiles of BLOCK_W words with the next tile's loads issued before the current tile is
  computed; each word is loaded once for all its activation rows. The activations' side of the PTX (``_x_pairs``)
  is computed once per (activation row, word) a thread holds and shared by its weight rows: two 16-byte loads and
  ``prmt`` instead of 16 scattered 2-byte loads, which would make the L1 the bottleneck (timings against cuBLAS:
  results/kernels_h100.json).
- ``_gemm``: out^T = W x^T in (BLOCK_N, BLOCK_M) tiles, so the weights are the MMA's wide side and small batches
  its narrow one. Weight tiles are decoded from words in packed halves of the activation dtype (``_DECODE_*``:
  code x scale, exact) and put in K order with ``join``s; up to SPLIT_K_MAX_ROWS rows, K is split so that enough
  programs run, and ``_sum_splits`` adds the fp32 partial sums; on small shapes that second launch costs most
  (timings against cuBLAS: results/kernels_h100.json).

Both need K % 16 == 0 (a row is whole int32 words; every Llama and GPT-2 shape is), which ``supported`` checks;
other shapes take the torch reference. Scales are looked up per word (every group is whole words): the GEMV sums a
tile's words group by group and scales each group once (or, for one group a row, the row's total once); the GEMM
scales the decoded codes. On a GPU the tile sizes are autotuned per shape (the first call of a shape is slow;
``ATQ_AUTOTUNE=0`` takes the first configuration); in the CPU interpreter (``TRITON_INTERPRET=1``, how the tests
run without a GPU) the first configuration runs, with the fp32 forms (the PTX needs a GPU). One trit-plane and the
2-bit layout only.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

GEMV_MAX_ROWS = 8  # up to this many activation rows: the GEMV; more: the GEMM
GEMV_BLOCK_M = 4  # activation rows a GEMV program takes (each weight word loaded once for them)
_ON_GPU = torch.cuda.is_available()


def supported(x: torch.Tensor, packed: torch.Tensor, layout: str, in_features: int, group_size: int) -> bool:
    """Whether the kernels take this product; everything else goes to the torch reference."""
    return (layout == "2bit" and packed.dim() == 2 and in_features % 16 == 0 and _group_fits(group_size, in_features)
            and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


def _tuned(configs: list[triton.Config], key: list[str]):
    """Autotune over ``configs`` on a GPU; under the interpreter, or with ATQ_AUTOTUNE=0 (quick GPU test runs), only
    the first runs."""
    tune = _ON_GPU and os.environ.get("ATQ_AUTOTUNE", "1") != "0"
    return triton.autotune(configs=configs if tune else configs[:1], key=key)


def _group_fits(group_size: int, in_features: int) -> bool:
    """Scales are looked up per int32 word (16 columns), so a group must be whole words or span the row."""
    return group_size >= in_features or group_size % 16 == 0


def _check_group(group_size: int, in_features: int) -> None:
    if not _group_fits(group_size, in_features):
        raise ValueError(f"group_size {group_size} must be a multiple of 16 (or span the row) for the Triton kernel")


def _half_bits(value: float, dtype: torch.dtype) -> int:
    """The 16 bits of ``value`` in ``dtype`` (fp16 or bf16), for PTX immediates."""
    return int(torch.tensor(value, dtype=dtype).view(torch.int16)) & 0xFFFF


def _decoded_pairs(word: str, dtype: torch.dtype) -> list[str]:
    """PTX that decodes the int32 ``word`` (16 trits) into 8 pairs (c_p, c_{8+p}) of ``dtype``, exactly -1/0/+1,
    in registers c0..c7.

    ``lop3`` puts trit p (low half) and trit 8+p (high half) into the mantissas of two copies of a magic power of
    two where they lie, at bit 2p, and ``fma(v, 4^-p, -(magic·4^-p + 1))`` turns magic + (c+1)·4^p into c exactly.
    The magic number is 1024 for fp16 (10 mantissa bits: five trits a half per shift) and 128 for bf16 (7 bits:
    three), so the word is also read shifted by 10 (fp16) or by 6 and 12 (bf16).
    """
    magic, per_shift = (128, 3) if dtype == torch.bfloat16 else (1024, 5)
    kind = "bf16x2" if dtype == torch.bfloat16 else "f16x2"
    magic_bits = _half_bits(magic, dtype)
    lines = [".reg .b32 dv, dk, do, dw1, dw2, c<8>;", f"shr.b32 dw1, {word}, {2 * per_shift};",
             f"shr.b32 dw2, {word}, {4 * per_shift};"]
    for p in range(8):
        source, at = [(word, p), ("dw1", p - per_shift), ("dw2", p - 2 * per_shift)][p // per_shift]
        scale, offset = _half_bits(0.25**at, dtype), _half_bits(-(magic * 0.25**at + 1), dtype)
        lines += [f"lop3.b32 dv, {source}, {0x00030003 << (2 * at):#010x}, {magic_bits << 16 | magic_bits:#010x}, 0xea;",
                  f"mov.b32 dk, {scale << 16 | scale:#010x};", f"mov.b32 do, {offset << 16 | offset:#010x};",
                  f"fma.rn.{kind} c{p}, dv, dk, do;"]
    return lines


def _f16x2_ptx() -> str:
    """PTX for one int32 word of 16 trits ($1) against 8 fp16 pairs (x[p], x[8+p]) ($2..$9) -> their dot product
    as fp32 ($0): the codes decoded in fp16 pairs, then one ``fma.f16x2`` a pair accumulates the products. Eight
    products per half are summed in fp16 (relative error ~1e-3), the two halves in fp32."""
    lines = ["{", ".reg .b32 acc;", ".reg .f16 lo, hi;", ".reg .f32 flo, fhi;", *_decoded_pairs("$1", torch.float16),
             "mov.b32 acc, 0;", *[f"fma.rn.f16x2 acc, c{p}, ${p + 2}, acc;" for p in range(8)]]
    lines += ["mov.b32 {lo, hi}, acc;", "cvt.f32.f16 flo, lo;", "cvt.f32.f16 fhi, hi;", "add.f32 $0, flo, fhi;", "}"]
    return "\n".join(lines)


_F16X2_PTX = tl.constexpr(_f16x2_ptx())  # a jit function reads globals only as constexpr


def _x_pairs_ptx(bf16: bool) -> str:
    """PTX for the activation side of ``_F16X2_PTX``: x[16q..16q+15] from the address in $8 -> the 8 fp16 pairs
    (x[p], x[8+p]) in $0..$7.

    Two 16-byte loads fetch the 16 activations of a word (a thread's x for one word is 32 contiguous bytes, not 16
    scattered 2-byte loads: those made the L1 the bottleneck) and ``prmt`` pairs x[p] with x[8+p]; a bf16 goes
    into the high half of an fp32 (``prmt`` with a zero word) and one ``cvt.rn.f16x2.f32`` narrows two of them.
    """
    lines = ["{", ".reg .b32 r<8>, lo, hi, d, z;", "mov.b32 z, 0;", "ld.global.nc.v4.b32 {r0, r1, r2, r3}, [$8];",
             "ld.global.nc.v4.b32 {r4, r5, r6, r7}, [$8+16];"]
    for p in range(8):  # pair p: the same half (p % 2) of words p // 2 (x[p]) and 4 + p // 2 (x[8 + p])
        if bf16:
            select = 0x3244 if p % 2 else 0x1044
            lines += [f"prmt.b32 lo, r{p // 2}, z, {select:#x};", f"prmt.b32 hi, r{4 + p // 2}, z, {select:#x};",
                      "cvt.rn.f16x2.f32 d, hi, lo;"]
        else:
            lines.append(f"prmt.b32 d, r{p // 2}, r{4 + p // 2}, {0x7632 if p % 2 else 0x5410:#x};")
        lines.append(f"mov.b32 ${p}, d;")
    return "\n".join(lines + ["}"])


_X_PAIRS_F16_PTX = tl.constexpr(_x_pairs_ptx(bf16=False))
_X_PAIRS_BF16_PTX = tl.constexpr(_x_pairs_ptx(bf16=True))


def _decode_ptx(dtype: torch.dtype) -> str:
    """PTX for the GEMM's weight tiles: one int32 word of 16 trits ($8) and a scale pair (s, s) ($9) -> the 8 pairs
    (c_p·s, c_{8+p}·s) of ``dtype`` (fp16 or bf16) in $0..$7. ``c·s`` is exact: the weight is the scale in
    ``dtype``, as the reference dequantizes it."""
    kind = "bf16x2" if dtype == torch.bfloat16 else "f16x2"
    lines = ["{", ".reg .b32 z, d<8>;", "mov.b32 z, 0x80008000;", *_decoded_pairs("$8", dtype),
             *[f"fma.rn.{kind} d{p}, c{p}, $9, z;" for p in range(8)]]  # c·s + (-0) = c·s, exactly
    return "\n".join(lines + [f"mov.b32 ${p}, d{p};" for p in range(8)] + ["}"])


_DECODE_F16_PTX = tl.constexpr(_decode_ptx(torch.float16))
_DECODE_BF16_PTX = tl.constexpr(_decode_ptx(torch.bfloat16))


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
def _x_pairs(x_ptr, x_rows, q, KW, X_BF16: tl.constexpr):
    """The 8 fp16 pairs (x[16q + p], x[16q + 8 + p]) of each (activation row, word): a tuple of (BLOCK_M, BLOCK_W)
    int32. Words past the row end read the last word's activations (their codes are masked to 0)."""
    address = (x_ptr + x_rows[:, None] + 16 * tl.minimum(q, KW - 1)[None, :]).to(tl.int64)
    return tl.inline_asm_elementwise(_X_PAIRS_BF16_PTX if X_BF16 else _X_PAIRS_F16_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,l",
                                     [address], dtype=(tl.int32,) * 8, is_pure=True, pack=1)


_GEMV_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_W": w}, num_warps=warps, num_stages=1)
                 for n, w, warps in [(8, 128, 4), (8, 64, 2), (16, 64, 4), (16, 128, 8), (8, 256, 8), (4, 128, 2),
                                     (16, 256, 8), (4, 256, 4), (16, 128, 4), (32, 64, 8), (4, 64, 1), (16, 64, 2)]]
MIN_BLOCK_W = min(config.kwargs["BLOCK_W"] for config in _GEMV_CONFIGS)


@triton.jit
def _tile_dots(x_ptr, x_rows, words, q, KW, F16X2: tl.constexpr, X_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """codes · x for each (activation row, weight row, word) of a tile: (BLOCK_M, BLOCK_N, BLOCK_W) fp32 partial
    sums of 16 products each. The activations' side is computed once per (activation row, word) and shared by the
    weight rows a thread holds."""
    if F16X2:
        x = _x_pairs(x_ptr, x_rows, q, KW, X_BF16)
        dots = tl.inline_asm_elementwise(
            _F16X2_PTX, "=r,r,r,r,r,r,r,r,r,r",
            [words[None, :, :], x[0][:, None, :], x[1][:, None, :], x[2][:, None, :], x[3][:, None, :],
             x[4][:, None, :], x[5][:, None, :], x[6][:, None, :], x[7][:, None, :]],
            dtype=tl.float32, is_pure=True, pack=1)
    else:
        dots = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_W), tl.float32)
        for t in tl.static_range(16):
            x = tl.load(x_ptr + x_rows[:, None] + 16 * q[None, :] + t, mask=(q < KW)[None, :], other=0.0)
            dots += _trit(words, t)[None, :, :] * x.to(tl.float32)[:, None, :]
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


@triton.jit
def _gemv_tile(acc, x_ptr, x_rows, words, scale, q, KW, F16X2: tl.constexpr, X_BF16: tl.constexpr,
               ROW_GROUP: tl.constexpr, ALIGNED: tl.constexpr, GROUP_W: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) + this tile's scaled dot products."""
    dots = _tile_dots(x_ptr, x_rows, words, q, KW, F16X2, X_BF16, BLOCK_M, BLOCK_N, BLOCK_W)
    if ROW_GROUP:
        acc += tl.sum(dots, axis=2)
    elif ALIGNED:
        per_group = tl.sum(tl.reshape(dots, (BLOCK_M, BLOCK_N, BLOCK_W // GROUP_W, GROUP_W)), axis=3)
        acc += tl.sum(per_group * scale[None, :, :], axis=2)
    else:
        acc += tl.sum(dots * scale[None, :, :], axis=2)
    return acc


@triton.jit
def _gemv_words(w_rows, s_rows, row_mask, w0, KW, EVEN: tl.constexpr, ROW_GROUP: tl.constexpr, ALIGNED: tl.constexpr,
                GROUP_W: tl.constexpr, BLOCK_W: tl.constexpr):
    """The words of the tile starting at word ``w0`` (past the row: 0 trits) and their scales."""
    q = w0 + tl.arange(0, BLOCK_W)
    if EVEN:  # whole tiles and whole row blocks: no masks to compute
        words = tl.load(w_rows + q[None, :])
    else:
        words = tl.load(w_rows + q[None, :], mask=row_mask[:, None] & (q < KW)[None, :], other=0x55555555)
    return words, _tile_scales(s_rows, row_mask, w0, q, KW, ROW_GROUP, ALIGNED, GROUP_W, BLOCK_W), q


@_tuned(_GEMV_CONFIGS, key=["N", "KW", "F16X2", "GROUP_W", "BLOCK_M"])
@triton.heuristics({"EVEN": lambda args: args["KW"] % args["BLOCK_W"] == 0 and args["N"] % args["BLOCK_N"] == 0})
@triton.jit
def _gemv(x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, M, N, KW, stride_xm, stride_wn, stride_sn, stride_om,
          HAS_BIAS: tl.constexpr, F16X2: tl.constexpr, X_BF16: tl.constexpr, ROW_GROUP: tl.constexpr,
          ALIGNED: tl.constexpr, GROUP_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_W: tl.constexpr, EVEN: tl.constexpr):
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    x_rows = tl.minimum(ms, M - 1) * stride_xm  # rows past M repeat the last one; their outputs are not stored
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None] * stride_wn
    s_rows = scales_ptr + rows[:, None] * stride_sn
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    words, scale, q = _gemv_words(w_rows, s_rows, row_mask, 0, KW, EVEN, ROW_GROUP, ALIGNED, GROUP_W, BLOCK_W)
    for w0 in range(BLOCK_W, KW + BLOCK_W, BLOCK_W):  # the next tile's loads are issued before this tile is computed
        if EVEN:  # (past the last tile: reload the last one rather than compute masks; it is never used)
            w0 = tl.minimum(w0, KW - BLOCK_W)
        words_next, scale_next, q_next = _gemv_words(w_rows, s_rows, row_mask, w0, KW, EVEN, ROW_GROUP, ALIGNED,
                                                     GROUP_W, BLOCK_W)
        acc = _gemv_tile(acc, x_ptr, x_rows, words, scale, q, KW, F16X2, X_BF16, ROW_GROUP, ALIGNED, GROUP_W,
                         BLOCK_M, BLOCK_N, BLOCK_W)
        words, scale, q = words_next, scale_next, q_next
    if ROW_GROUP:
        acc *= tl.load(scales_ptr + rows * stride_sn, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + ms[:, None] * stride_om + rows[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(ms < M)[:, None] & row_mask[None, :])


@triton.jit
def _halves(pairs, DTYPE: tl.constexpr):
    """int32 pairs -> (..., 2) of ``DTYPE``: [..., 0] the low half, [..., 1] the high half."""
    return tl.join(pairs.to(tl.int16).to(DTYPE, bitcast=True), (pairs >> 16).to(tl.int16).to(DTYPE, bitcast=True))


@triton.jit
def _weight_tile(words, scale, DTYPE: tl.constexpr, ASM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """(BLOCK_N, BLOCK_K / 16) words and their scales -> the (BLOCK_N, BLOCK_K) weights in ``DTYPE``, K in order.

    ``ASM`` decodes in packed halves (``_DECODE_*_PTX``), two weights an instruction, and puts the 16 weights of
    a word in order with ``join``s (each thread keeps its words' 16 values, so the final reshape moves nothing);
    otherwise the fp32 ``_trit`` decoding, which the CPU interpreter runs.
    """
    if ASM:
        s = scale.to(DTYPE).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
        p = tl.inline_asm_elementwise(_DECODE_BF16_PTX if DTYPE == tl.bfloat16 else _DECODE_F16_PTX,
                                      "=r,=r,=r,=r,=r,=r,=r,=r,r,r", [words, s | (s << 16)],
                                      dtype=(tl.int32,) * 8, is_pure=True, pack=1)
        # pair i holds trits i (low) and 8 + i (high); the joins below index trit e + 2f + 4g + 8h as [.., h, g, f, e]
        a0, a1, a2, a3 = _halves(p[0], DTYPE), _halves(p[1], DTYPE), _halves(p[2], DTYPE), _halves(p[3], DTYPE)
        a4, a5, a6, a7 = _halves(p[4], DTYPE), _halves(p[5], DTYPE), _halves(p[6], DTYPE), _halves(p[7], DTYPE)
        c0 = tl.join(tl.join(a0, a4), tl.join(a2, a6))
        c1 = tl.join(tl.join(a1, a5), tl.join(a3, a7))
        weight = tl.reshape(tl.join(c0, c1), (BLOCK_N, BLOCK_K))
    else:
        code = _trit(words[:, :, None] >> (2 * tl.arange(0, 16))[None, None, :], 0)  # (BLOCK_N, BLOCK_K / 16, 16)
        weight = tl.reshape(code * scale.to(tl.float32)[:, :, None], (BLOCK_N, BLOCK_K)).to(DTYPE)
    return weight


@triton.jit
def _activation_tile(x_ptr, rows_m, m_mask, k0, K, stride_xm, BLOCK_K: tl.constexpr):
    """x^T for the K tile starting at column ``k0``: (BLOCK_K, BLOCK_M), zeros past the row or the batch."""
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(x_ptr + rows_m[None, :] * stride_xm + ks[:, None], mask=m_mask[None, :] & (ks < K)[:, None],
                   other=0.0)


@triton.jit
def _weight_words(w_ptr, scales_ptr, rows_n, n_mask, k0, KW, stride_wn, stride_sn, GROUP_W: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    """The weight words of the K tile starting at column ``k0`` and one scale per word (words past the row: 0).

    Groups that tile the K tile are loaded once each and broadcast to their words: a per-word gather (``q //
    GROUP_W``) makes Triton lay the decoded tile out row-major in shared memory, one 2-byte store per weight,
    which slows the GEMM (its timings: results/kernels_h100.json)."""
    q = k0 // 16 + tl.arange(0, BLOCK_K // 16)
    both = n_mask[:, None] & (q < KW)[None, :]
    words = tl.load(w_ptr + rows_n[:, None] * stride_wn + q[None, :], mask=both, other=0x55555555)
    if (BLOCK_K // 16) % GROUP_W == 0 and GROUP_W & (GROUP_W - 1) == 0:
        groups = k0 // (16 * GROUP_W) + tl.arange(0, BLOCK_K // 16 // GROUP_W)
        scale = tl.load(scales_ptr + rows_n[:, None] * stride_sn + groups[None, :],
                        mask=n_mask[:, None] & (groups * GROUP_W < KW)[None, :], other=0.0)
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (scale.shape[0], scale.shape[1], GROUP_W)),
                           (scale.shape[0], BLOCK_K // 16))
    else:
        scale = tl.load(scales_ptr + rows_n[:, None] * stride_sn + (q // GROUP_W)[None, :], mask=both, other=0.0)
    return words, scale


_GEMM_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_K": bk, "PREFETCH": prefetch}, num_warps=warps,
                               num_stages=3)
                 for bn, bm, bk, prefetch, warps in [
                     (64, 16, 128, 0, 4), (64, 16, 128, 1, 4), (64, 16, 128, 2, 4), (64, 16, 256, 1, 4),
                     (128, 32, 128, 1, 8), (64, 64, 128, 0, 4), (64, 64, 128, 1, 4), (128, 64, 64, 0, 8),
                     (128, 64, 64, 1, 8), (128, 64, 128, 0, 8), (128, 128, 64, 2, 8), (128, 256, 64, 0, 8)]]


@_tuned(_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_W", "ASM", "K_SPLIT"])
@triton.jit(do_not_specialize=["M_BUCKET"])
def _gemm(x_ptr, w_ptr, scales_ptr, bias_ptr, out_ptr, M, N, K, KW, stride_xm, stride_wn, stride_sn, stride_om,
          M_BUCKET, K_SPLIT, HAS_BIAS: tl.constexpr, ASM: tl.constexpr, GROUP_W: tl.constexpr, BLOCK_N: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr):
    """One (BLOCK_N, BLOCK_M) tile of out^T over the columns [k_start, k_start + K_SPLIT) of its split (program
    axis 2): with several splits ``out_ptr`` is the fp32 (splits, M, N) workspace ``_sum_splits`` adds up."""
    rows_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # weight rows: the MMA's long side
    rows_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # activation rows: its short side
    k_start = tl.program_id(2) * K_SPLIT
    k_end = tl.minimum(k_start + K_SPLIT, K)
    m_mask, n_mask = rows_m < M, rows_n < N
    acc = tl.full((BLOCK_N, BLOCK_M), 0.0, tl.float32)
    if PREFETCH == 0:  # Triton pipelines the activations' loads num_stages deep (cp.async: they feed the dot)
        for k0 in range(k_start, k_end, BLOCK_K):
            x_t = _activation_tile(x_ptr, rows_m, m_mask, k0, K, stride_xm, BLOCK_K)
            words, scale = _weight_words(w_ptr, scales_ptr, rows_n, n_mask, k0, KW, stride_wn, stride_sn, GROUP_W,
                                         BLOCK_K)
            acc = tl.dot(_weight_tile(words, scale, x_t.dtype, ASM, BLOCK_N, BLOCK_K), x_t, acc)
    elif PREFETCH == 1:  # the same, and the words (which only feed the decoding) loaded a tile ahead by hand
        words, scale = _weight_words(w_ptr, scales_ptr, rows_n, n_mask, k_start, KW, stride_wn, stride_sn, GROUP_W,
                                     BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            x_t = _activation_tile(x_ptr, rows_m, m_mask, k0, K, stride_xm, BLOCK_K)
            words_next, scale_next = _weight_words(w_ptr, scales_ptr, rows_n, n_mask, k0 + BLOCK_K, KW, stride_wn,
                                                   stride_sn, GROUP_W, BLOCK_K)
            acc = tl.dot(_weight_tile(words, scale, x_t.dtype, ASM, BLOCK_N, BLOCK_K), x_t, acc)
            words, scale = words_next, scale_next
    else:  # both loaded a tile ahead by hand
        words, scale = _weight_words(w_ptr, scales_ptr, rows_n, n_mask, k_start, KW, stride_wn, stride_sn, GROUP_W,
                                     BLOCK_K)
        x_t = _activation_tile(x_ptr, rows_m, m_mask, k_start, K, stride_xm, BLOCK_K)
        for k0 in range(k_start + BLOCK_K, k_end + BLOCK_K, BLOCK_K):
            x_next = _activation_tile(x_ptr, rows_m, m_mask, k0, K, stride_xm, BLOCK_K)
            words_next, scale_next = _weight_words(w_ptr, scales_ptr, rows_n, n_mask, k0, KW, stride_wn, stride_sn,
                                                   GROUP_W, BLOCK_K)
            acc = tl.dot(_weight_tile(words, scale, x_t.dtype, ASM, BLOCK_N, BLOCK_K), x_t, acc)
            x_t, words, scale = x_next, words_next, scale_next
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    out_ptr += tl.program_id(2) * M * stride_om
    tl.store(out_ptr + rows_m[None, :] * stride_om + rows_n[:, None], acc.to(out_ptr.dtype.element_ty),
             mask=m_mask[None, :] & n_mask[:, None])


@triton.jit
def _sum_splits(partial_ptr, bias_ptr, out_ptr, MN, N, SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr,
                BLOCK: tl.constexpr):
    """out = Σ_splits partial (+ bias), in a fixed order (no atomics: the same input gives the same output)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < MN
    acc = tl.load(partial_ptr + offsets, mask=mask, other=0.0)
    for split in tl.static_range(1, SPLITS):
        acc += tl.load(partial_ptr + split * MN + offsets, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offsets % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)


SPLIT_K_MAX_ROWS = 128  # up to this many rows the GEMM splits K: too few output tiles to fill the GPU otherwise
SPLIT_K_MIN_COLUMNS = 512  # the shortest K slice (a multiple of every BLOCK_K)
PROGRAMS = 264  # about two programs per SM of an H100


def _k_split(rows: int, out_features: int, in_features: int) -> int:
    """Columns per K slice for the GEMM (``in_features`` when it does not split).

    A split GEMM moves activations from L2 once per output-row block and partial sums once per split: for P programs
    that is ~(P/S)·K·2 + S·N·8 bytes per activation row, smallest at S = sqrt(P·K / (4·N)) splits (timings of the
    split shapes: results/kernels_h100.json). Slices are whole multiples of 512 columns.
    """
    if rows > SPLIT_K_MAX_ROWS:
        return in_features
    splits = min(8, in_features // SPLIT_K_MIN_COLUMNS, round(math.sqrt(PROGRAMS * in_features / (4 * out_features))))
    if splits <= 1:
        return in_features
    return triton.cdiv(triton.cdiv(in_features, splits), SPLIT_K_MIN_COLUMNS) * SPLIT_K_MIN_COLUMNS


def ternary_matmul(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, group_size: int, in_features: int,
    bias: torch.Tensor | None = None, f16x2: bool | None = None,
) -> torch.Tensor:
    """x (..., K) @ W^T (+ bias) for one-plane 2-bit packed W (K % 16 == 0); the result has x's dtype.

    ``f16x2`` picks the packed-half PTX paths (default: on CUDA for fp16/bf16 inputs, see the module docstring).
    """
    if in_features % 16:
        raise ValueError(f"the Triton kernels need in_features % 16 == 0 (whole int32 words), got {in_features}")
    _check_group(group_size, in_features)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    rows, out_features = x2.shape[0], packed.shape[0]
    out = torch.empty(rows, out_features, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*shape[:-1], out_features)
    if f16x2 is None:
        f16x2 = x.is_cuda and x.dtype != torch.float32
    if f16x2 and x2.data_ptr() % 16:
        x2 = x2.clone()  # the PTX reads activations 16 bytes at a time
    words = packed.contiguous().view(torch.int32)
    scales = scales.contiguous()
    stride_sn = 0 if scales.shape[0] == 1 else scales.stride(0)  # a per-tensor scale row is shared by all rows
    group_words = max(group_size // 16, 1) if group_size < in_features else words.shape[1]  # (one group a row)
    inputs = (x2, words, scales, bias if bias is not None else out)  # (no bias: any pointer, never read)
    if rows <= GEMV_MAX_ROWS:
        block_m = min(triton.next_power_of_2(rows), GEMV_BLOCK_M)
        _gemv[lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(rows, block_m))](
            *inputs, out, rows, out_features, words.shape[1], x2.stride(0), words.stride(0), stride_sn, out.stride(0),
            HAS_BIAS=bias is not None, F16X2=bool(f16x2), X_BF16=x.dtype == torch.bfloat16,
            ROW_GROUP=group_size >= in_features, GROUP_W=group_words, BLOCK_M=block_m,
            ALIGNED=group_words & (group_words - 1) == 0 and group_words <= MIN_BLOCK_W)
    else:
        k_split = _k_split(rows, out_features, in_features)
        splits = triton.cdiv(in_features, k_split)
        target = out if splits == 1 else torch.empty(splits, rows, out_features, dtype=torch.float32, device=x.device)
        _gemm[lambda meta: (triton.cdiv(out_features, meta["BLOCK_N"]), triton.cdiv(rows, meta["BLOCK_M"]), splits)](
            *inputs, target, rows, out_features, in_features, words.shape[1], x2.stride(0), words.stride(0), stride_sn,
            out_features, min(triton.next_power_of_2(rows), 512), k_split, HAS_BIAS=bias is not None and splits == 1, ASM=bool(f16x2), GROUP_W=group_words)
        if splits > 1:
            _sum_splits[(triton.cdiv(rows * out_features, 1024),)](
                target, inputs[3], out, rows * out_features, out_features, SPLITS=splits,
                HAS_BIAS=bias is not None, BLOCK=1024)
    return out.reshape(*shape[:-1], out_features)
