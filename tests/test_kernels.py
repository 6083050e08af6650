"""Triton ternary matmul against the float64 reference of the dequantized product.

On a GPU the kernels run natively; without one they run in Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before anything imports triton), which executes the same kernel code on the CPU. Skipped only when
triton is absent.
"""

import pytest
import torch

from atq.ternary import PackedTernary

triton_kernels = pytest.importorskip("atq.kernels.triton", exc_type=ImportError)

from atq import QuantConfig, ternarize
from atq.packing import pack

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Relative error (norm) allowed against the float64 reference, at the precision of the path under test: fp32
# inputs are summed in fp32 (Triton's interpreter on the CPU, the GEMV on CUDA), so 1e-5, about 100 ulps of a
# sum of a few hundred terms; the CUDA GEMM's tl.dot rounds fp32 inputs to TF32 (10-bit mantissa); fp16/bf16
# inputs carry their own rounding (bf16: 8 bits). A 0.9% error in the result fails every fp32 case.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
TF32_TOLERANCE = 2e-3


def tolerance(dtype, rows):
    gemm_on_cuda = DEVICE == "cuda" and rows > triton_kernels.GEMV_MAX_ROWS
    return TF32_TOLERANCE if dtype == torch.float32 and gemm_on_cuda else TOLERANCE[dtype]


def packed_weight(out_features, in_features, granularity, group_size, seed=0):
    torch.manual_seed(seed)
    tensor = ternarize(torch.randn(out_features, in_features),
                       QuantConfig(granularity=granularity, group_size=group_size))
    return tensor, pack(tensor.codes).to(DEVICE), tensor.scales.half().to(DEVICE)


@pytest.mark.parametrize("rows", [1, 3, 5, 70])
@pytest.mark.parametrize("granularity,group_size,in_features", [("group", 64, 192), ("group", 32, 96), ("group", 48, 96),
                                                               ("row", 64, 80), ("tensor", 64, 784)])
def test_matches_the_float64_reference_and_writes_every_output(rows, granularity, group_size, in_features):
    tensor, packed, scales = packed_weight(40, in_features, granularity, group_size)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    bias = torch.randn(40).to(DEVICE)
    weight = tensor.codes.double() * tensor.expanded_scales(torch.float16).double()
    expected = x.double().cpu() @ weight.T + bias.double().cpu()
    for dtype in (torch.float32, torch.float16, torch.bfloat16) if DEVICE == "cuda" else (torch.float32,):
        got = triton_kernels.ternary_matmul(x.to(dtype), packed, scales, tensor.group_size, in_features,
                                            bias.to(dtype))
        assert got.shape == (rows, 40) and got.dtype == dtype and torch.isfinite(got).all()  # no unwritten output
        error = (got.double().cpu() - expected).norm() / expected.norm()
        assert error <= tolerance(dtype, rows), (dtype, float(error))


@pytest.mark.parametrize("bias", [False, True])
def test_split_k_gemm_matches_the_reference(bias):
    """Enough columns that the GEMM splits K (the last slice shorter) and adds the slices up."""
    in_features = 2064
    assert triton_kernels._k_split(20, 24, in_features) == 1024  # three slices, the last one 16 columns
    tensor, packed, scales = packed_weight(24, in_features, "group", 48)
    x = torch.randn(20, in_features, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    b = torch.randn(24).to(DEVICE) if bias else None
    expected = x.double().cpu() @ (tensor.codes.double() * tensor.expanded_scales(torch.float16).double()).T
    if bias:
        expected += b.double().cpu()
    got = triton_kernels.ternary_matmul(x, packed, scales, 48, in_features, b)
    assert ((got.double().cpu() - expected).norm() / expected.norm()) <= tolerance(torch.float32, 20)


def test_poisoned_output_is_fully_overwritten(monkeypatch):
    _, packed, scales = packed_weight(33, 64, "group", 32)
    poisoned = torch.full((2, 33), float("nan"), device=DEVICE)
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned)  # the kernel's output buffer starts as NaN
    got = triton_kernels.ternary_matmul(torch.randn(2, 64, device=DEVICE), packed, scales, 32, 64)
    assert got.data_ptr() == poisoned.data_ptr() and torch.isfinite(got).all()


@pytest.mark.skipif(DEVICE != "cuda", reason="the packed-half GEMV is inline PTX: it runs on a CUDA GPU only")
def test_packed_half_and_fp32_gemv_agree():
    _, packed, scales = packed_weight(300, 576, "group", 64)
    x = torch.randn(1, 576, device=DEVICE, dtype=torch.bfloat16)
    fast = triton_kernels.ternary_matmul(x, packed, scales, 64, 576, f16x2=True).float()
    plain = triton_kernels.ternary_matmul(x, packed, scales, 64, 576, f16x2=False).float()
    assert ((fast - plain).norm() / plain.norm()) <= 1e-2


def test_group_sizes_the_tiles_cannot_follow_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        triton_kernels._check_group(24, 96)


def test_rows_of_partial_words_are_refused_and_dispatched_to_the_reference():
    from atq.kernels import use_triton

    _, packed, scales = packed_weight(8, 72, "row", 64)
    with pytest.raises(ValueError, match="% 16"):
        triton_kernels.ternary_matmul(torch.randn(1, 72, device=DEVICE), packed, scales, 72, 72)
    assert not triton_kernels.supported(torch.randn(1, 72), packed, "2bit", 72, 72)
    assert not use_triton(torch.randn(1, 72, device=DEVICE), PackedTernary(packed, scales, 72, 72))


def test_dispatch_uses_triton_on_cuda_unless_told_otherwise(monkeypatch):
    from atq.kernels import use_triton

    x = torch.randn(1, 64)
    two_bit = PackedTernary.empty(4, 64, 64, 4)
    monkeypatch.delenv("ATQ_KERNEL", raising=False)
    assert not use_triton(x, two_bit)  # CPU input: the reference
    assert not use_triton(x.to(DEVICE), PackedTernary.empty(4, 64, 64, 4, packing="base3", device=DEVICE))
    assert use_triton(x.to(DEVICE), PackedTernary.empty(4, 64, 64, 4, device=DEVICE)) == (DEVICE == "cuda")
    monkeypatch.setenv("ATQ_KERNEL", "reference")
    assert not use_triton(x.to(DEVICE), PackedTernary.empty(4, 64, 64, 4, device=DEVICE))


def test_the_compiled_custom_op_computes_the_triton_product():
    """Under torch.compile the Triton product is the opaque operator atq::ternary_matmul (so the compiler fuses
    what surrounds it). Eager and compiled calls of it equal the float64 reference, and its fake version gives
    the compiler the true output shape (a wrong one fails compilation or the comparison)."""
    tensor, packed, scales = packed_weight(40, 192, "group", 64)
    x = torch.randn(2, 3, 192, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    bias = torch.randn(40).to(DEVICE)
    weight = tensor.codes.double() * tensor.expanded_scales(torch.float16).double()
    expected = 2 * x.double().cpu() @ weight.T + bias.double().cpu()

    def product(x):
        return torch.relu(torch.ops.atq.ternary_matmul(x * 2, packed, scales, 64, 192, bias)) - 1

    reference = torch.relu(expected) - 1
    for function in (product, torch.compile(product, fullgraph=True)):
        got = function(x)
        assert got.shape == (2, 3, 40)
        error = (got.double().cpu() - reference).norm() / reference.norm()
        assert error <= TOLERANCE[torch.float32], float(error)
    torch.library.opcheck(torch.ops.atq.ternary_matmul.default, (x, packed, scales, 64, 192, bias),
                          test_utils=("test_schema", "test_faketensor"))
