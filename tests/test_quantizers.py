"""Quantizers against independent float64 references (brute force where the claim is optimality)."""

import math

import pytest
import torch

from atq import QuantConfig, ternarize


def groups_of(weight: torch.Tensor, group_size: int):
    """Yield (row, group index, columns) for every scale group, the short last one included."""
    for row in range(weight.shape[0]):
        for index, start in enumerate(range(0, weight.shape[1], group_size)):
            yield row, index, slice(start, min(start + group_size, weight.shape[1]))


def brute_force_mse(values: torch.Tensor) -> float:
    """min over every support size k of ||w - alpha*t||^2 with the best alpha, in float64."""
    w = values.double()
    magnitude = w.abs().sort(descending=True).values
    best = float((w**2).sum())  # k = 0: everything zero
    for k in range(1, len(w) + 1):
        alpha = float(magnitude[:k].mean())
        t = torch.where(w.abs() >= magnitude[k - 1], torch.sign(w), torch.zeros_like(w))
        if int((t != 0).sum()) != k:  # ties: the threshold form cannot express this k
            continue
        best = min(best, float(((w - alpha * t) ** 2).sum()))
    return best


@pytest.mark.parametrize("in_features", [576, 64, 70])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.7])
def test_sparsity_mode_zeroes_exactly_the_smallest_fraction(in_features, sparsity):
    torch.manual_seed(1)
    weight = torch.randn(6, in_features)
    config = QuantConfig(mode="sparsity", sparsity=sparsity, granularity="group", group_size=128)
    tensor = ternarize(weight, config)
    assert tensor.scales.shape == (6, math.ceil(in_features / 128))
    for row, index, cols in groups_of(weight, 128):
        group, codes = weight[row, cols].double(), tensor.codes[row, cols]
        n_zero = round(sparsity * group.numel())
        assert int((codes == 0).sum()) == n_zero
        kept = codes != 0
        if kept.any() and (~kept).any():
            assert group.abs()[kept].min() >= group.abs()[~kept].max()
        assert torch.equal(codes[kept].double(), torch.sign(group[kept]))
        expected_scale = group.abs()[kept].mean() if kept.any() else torch.tensor(0.0)
        assert float(tensor.scales[row, index]) == pytest.approx(float(expected_scale), rel=1e-6)


@pytest.mark.parametrize("granularity", ["tensor", "row", "group"])
def test_mse_mode_reaches_the_brute_force_optimum(granularity):
    torch.manual_seed(2)
    weight = torch.randn(3, 40) * torch.rand(3, 40)  # uneven magnitudes
    config = QuantConfig(mode="mse", granularity=granularity, group_size=16)
    tensor = ternarize(weight, config)
    restored = tensor.dequantize(torch.float64)
    if granularity == "tensor":
        pieces = [(weight.reshape(-1), restored.reshape(-1))]
    elif granularity == "row":
        pieces = [(weight[r], restored[r]) for r in range(3)]
    else:
        pieces = [(weight[r, c], restored[r, c]) for r, _, c in groups_of(weight, 16)]
    for original, approx in pieces:
        ours = float(((original.double() - approx) ** 2).sum())
        assert ours == pytest.approx(brute_force_mse(original), rel=1e-9, abs=1e-12)


def test_magnitude_mode_alpha_std_is_the_seed_rule():
    torch.manual_seed(3)
    weight = torch.randn(8, 50)
    tensor = ternarize(weight, QuantConfig.seed())
    w = weight.double()
    threshold = 0.7 * w.std()
    kept = w.abs() > threshold
    assert torch.equal(tensor.codes.double(), torch.sign(w) * kept)
    assert float(tensor.scales.squeeze()) == pytest.approx(float(w.abs()[kept].mean()), rel=1e-6)
    assert tensor.scales.shape == (1, 1)


def test_magnitude_mode_absolute_threshold_per_row():
    weight = torch.tensor([[0.1, -0.5, 0.3, -0.05], [1.0, 0.2, -0.25, 0.0]])
    tensor = ternarize(weight, QuantConfig(mode="magnitude", threshold=0.2, granularity="row"))
    assert tensor.codes.tolist() == [[0, -1, 1, 0], [1, 0, -1, 0]]
    assert torch.allclose(tensor.scales.squeeze(1), torch.tensor([0.4, 0.625]))


def test_row_granularity_layout():
    tensor = ternarize(torch.randn(5, 33), QuantConfig(granularity="row"))
    assert tensor.scales.shape == (5, 1) and tensor.group_size == 33


def test_group_larger_than_row_becomes_one_group():
    tensor = ternarize(torch.randn(4, 10), QuantConfig(granularity="group", group_size=64))
    assert tensor.scales.shape == (4, 1) and tensor.group_size == 10


def test_all_zero_weight_gives_zero_codes_and_scales():
    tensor = ternarize(torch.zeros(3, 8), QuantConfig(mode="mse", group_size=4))
    assert not tensor.codes.any() and not tensor.scales.any()
    assert torch.isfinite(tensor.dequantize()).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weights_are_refused(bad):
    weight = torch.randn(4, 4)
    weight[2, 3] = bad
    with pytest.raises(ValueError, match="my.layer.*NaN/Inf"):
        ternarize(weight, QuantConfig(), name="my.layer")


def test_non_2d_weight_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        ternarize(torch.randn(4, 4, 4), QuantConfig())


def test_absmean_is_bitnet_b158_weight_quantization():
    torch.manual_seed(0)
    weight = torch.randn(16, 40) * 0.05
    gamma = weight.abs().mean()
    expected = (weight / gamma).round().clamp(-1, 1) * gamma  # BitNet b1.58's RoundClip(W/γ)·γ
    tensor = ternarize(weight, QuantConfig.bitnet())
    assert tensor.scales.shape == (1, 1)
    assert torch.allclose(tensor.dequantize(), expected, atol=1e-7)
