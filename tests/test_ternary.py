import pytest
import torch

from atq import TernaryTensor


def test_dequantize_matches_a_loop_over_groups():
    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (3, 10), dtype=torch.int8)
    scales = torch.rand(3, 3)  # groups of 4: 4 + 4 + 2 columns
    tensor = TernaryTensor(codes, scales, group_size=4)
    expected = torch.zeros(3, 10, dtype=torch.float64)
    for row in range(3):
        for col in range(10):
            expected[row, col] = float(codes[row, col]) * float(scales[row, col // 4])
    assert torch.allclose(tensor.dequantize(torch.float64), expected)


def test_shared_scale_row_broadcasts():
    codes = torch.ones(2, 3, dtype=torch.int8)
    tensor = TernaryTensor(codes, torch.tensor([[0.5]]), group_size=3)
    assert torch.equal(tensor.dequantize(), torch.full((2, 3), 0.5))


@pytest.mark.parametrize(
    ("codes", "scales", "group_size"),
    [
        (torch.zeros(2, 8, dtype=torch.int8), torch.ones(2, 3), 4),
        (torch.zeros(2, 8, dtype=torch.int32), torch.ones(2, 2), 4),
        (torch.zeros(8, dtype=torch.int8), torch.ones(1, 1), 8),
        (torch.zeros(2, 8, dtype=torch.int8), torch.ones(3, 2), 4),
    ],
)
def test_inconsistent_layouts_are_refused(codes, scales, group_size):
    with pytest.raises(ValueError):
        TernaryTensor(codes, scales, group_size)
