import pytest
import torch

from atq import QuantConfig, quantize
from atq.sensitivity import keep_in_fp, sensitivity
from atq.stats import model_stats
from atq.surgery import linear_weight, select_linear_layers

from .conftest import make_gpt2, make_llama


def windows(seed=0):
    return torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [make_llama, make_gpt2])
def test_measured_score_is_the_loss_increase_of_that_layer_alone(make):
    model, config, data = make(), QuantConfig(), windows()
    layers = select_linear_layers(model, config)
    scores = sensitivity(model, layers, config, data, "measured", quiet=True)
    name = sorted(layers)[3]
    # independent: a fresh copy with only that layer ternarised through quantize(include=...)
    reference, alone = make(), make()
    quantize(alone, config.replace(include=(f"^{name}$",)), quiet=True)
    with torch.no_grad():
        base = float(reference(data, labels=data).loss)
        moved = float(alone(data, labels=data).loss)
    assert scores[name] == pytest.approx(moved - base, rel=1e-3, abs=1e-6)
    assert torch.equal(linear_weight(layers[name]), linear_weight(make().get_submodule(name)))  # restored


def test_gradient_score_matches_a_manual_backward():
    model, config, data = make_llama(), QuantConfig(), windows()
    layers = select_linear_layers(model, config)
    scores = sensitivity(model, layers, config, data, "gradient", quiet=True)
    name = "model.layers.1.mlp.down_proj"
    check = make_llama()
    layer = check.get_submodule(name)
    check(data, labels=data).loss.backward()
    from atq import ternarize

    delta = layer.weight.detach() - ternarize(layer.weight, config).dequantize()
    assert scores[name] == pytest.approx(float((layer.weight.grad * delta).abs().sum()), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_mixed_precision_keeps_the_top_fraction_and_counts_them_at_16_bits():
    model, data = make_llama(), windows()
    config = QuantConfig(fp_fraction=0.25, calibration="given")
    report = quantize(model, config, calibration=data, quiet=True)
    rows = {r["name"]: r for r in report if "sensitivity" in r}
    kept = keep_in_fp({n: r["sensitivity"] for n, r in rows.items()}, 0.25)
    assert len(kept) == round(0.25 * 14) and all(rows[n]["precision"] == "fp" for n in kept)
    stats = model_stats(model)
    fp_weights = sum(model.get_submodule(n).weight.numel() for n in kept)
    assert stats["fp_linear_weights"] == fp_weights
    expected = (8 * stats["packed_bytes"] + 16 * fp_weights) / (stats["ternary_weights"] + fp_weights)
    assert stats["bits_per_linear_weight"] == pytest.approx(expected)


def test_mixed_precision_needs_calibration_data(tiny_llama):
    with pytest.raises(ValueError, match="calibration"):
        quantize(tiny_llama, QuantConfig(fp_fraction=0.2), quiet=True)
    with pytest.raises(ValueError, match="QuantConfig.fp_fraction"):
        QuantConfig(fp_fraction=1.0)
