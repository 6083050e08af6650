import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from atq.packing import check_packed, pack_trits, packed_length, unpack_trits

DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64]


@st.composite
def code_tensors(draw):
    shape = draw(st.lists(st.integers(1, 7), min_size=0, max_size=2)) + [draw(st.integers(1, 41))]
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, shape, generator=generator).to(dtype)


@settings(max_examples=200, deadline=None)
@given(code_tensors())
def test_round_trip_any_shape_and_dtype(codes):
    packed = pack_trits(codes)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*codes.shape[:-1], packed_length(codes.shape[-1]))
    restored = unpack_trits(packed, codes.shape[-1])
    assert restored.dtype == torch.int8
    assert torch.equal(restored.long(), codes.long())
    check_packed(packed, codes.shape[-1])


def test_bit_layout_is_value_plus_one_low_bits_first():
    # elements 0..3 -> bits 0-1, 2-3, 4-5, 6-7; stored as value + 1
    packed = pack_trits(torch.tensor([-1, 0, 1, 1, 1], dtype=torch.int8))
    assert packed.tolist() == [0b10_10_01_00, 0b01_01_01_10]  # padding trits are zeros (stored as 1)


def test_out_of_range_and_float_codes_are_refused():
    with pytest.raises(ValueError, match="-1, 0, 1"):
        pack_trits(torch.tensor([0, 2]))
    with pytest.raises(TypeError):
        pack_trits(torch.tensor([0.0, 1.0]))


def test_wrong_length_is_refused():
    packed = pack_trits(torch.zeros(2, 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="does not hold 20 trits"):
        unpack_trits(packed, 20)
    with pytest.raises(TypeError):
        unpack_trits(packed.to(torch.int16), 9)


def test_corruption_is_detected():
    packed = pack_trits(torch.zeros(1, 6, dtype=torch.int8))
    bad = packed.clone()
    bad[0, 0] = 0xFF
    with pytest.raises(ValueError, match="code 3"):
        check_packed(bad, 6)
    bad = packed.clone()
    bad[0, 1] = 0b10_10_01_01  # a non-zero trit in the padding of a 6-trit row
    with pytest.raises(ValueError, match="padding"):
        check_packed(bad, 6)


@settings(max_examples=200, deadline=None)
@given(code_tensors())
def test_base3_round_trip_any_shape_and_dtype(codes):
    from atq.packing import pack, packed_bytes, unpack

    packed = pack(codes, "base3")
    assert packed.dtype == torch.uint8 and packed.shape[-1] == packed_bytes(codes.shape[-1], "base3")
    assert torch.equal(unpack(packed, codes.shape[-1], "base3").long(), codes.long())
    check_packed(packed, codes.shape[-1], packing="base3")


def test_base3_layout_and_density():
    from atq.packing import pack

    # digits (code + 1) in base 3, element 0 least significant: [-1, 0, 1, 1, 0] -> 0 + 1*3 + 2*9 + 2*27 + 1*81
    assert pack(torch.tensor([-1, 0, 1, 1, 0]), "base3").tolist() == [156]
    assert pack(torch.zeros(3, 576, dtype=torch.int8), "base3").shape == (3, 116)  # 1.61 bits a trit
    bad = pack(torch.zeros(1, 7, dtype=torch.int8), "base3")
    bad[0, 0] = 250
    with pytest.raises(ValueError, match="above 242"):
        check_packed(bad, 7, packing="base3")
    with pytest.raises(ValueError, match="unknown packing"):
        pack(torch.zeros(4, dtype=torch.int8), "base4")
