"""stats: the markdown table, and measure_recipe / fp_reference against separately computed references."""

import copy
import math

import pytest
import torch
from safetensors.torch import save_file

from atq import PackedTernaryLinear, QuantConfig, quantize, save_quantized
from atq.evaluate import evaluate_windows
from atq.measure import fp_reference, measure_recipe
from atq.stats import markdown_table

KEYS = {"config", "ppl", "token_accuracy", "quant_seconds", "bits_per_weight", "bits_per_linear_weight", "sparsity",
        "artifact_bytes"}


def test_markdown_table_right_aligns_numeric_columns():
    assert markdown_table(["name", "n", "x"], [["a", "1", "2.5"]], numeric_from=1).splitlines() == [
        "| name | n | x |", "| --- | ---: | ---: |", "| a | 1 | 2.5 |"]


@pytest.fixture
def windows():
    return torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(3))


def _expected_sizes(report: list[dict]) -> tuple[float, float, float]:
    """bits/weight (ternary), bits/weight (decoder linears, FP at 16) and sparsity from the per-layer report:
    2-bit codes with rows padded to whole bytes, one fp16 scale per group of a row."""
    ternary = [row for row in report if row["precision"] == "ternary"]
    weights = sum(out * width for out, width in (row["shape"] for row in ternary))
    stored_bytes = sum(out * (math.ceil(width / 4) + 2 * math.ceil(width / row["group_size"]))
                       for row, (out, width) in ((row, row["shape"]) for row in ternary))
    zeros = sum(row["sparsity"] * row["shape"][0] * row["shape"][1] for row in ternary)
    return 8 * stored_bytes / weights, zeros / weights, stored_bytes


@pytest.mark.parametrize("config, with_windows", [
    (QuantConfig(mode="mse", granularity="group", group_size=64), False),
    (QuantConfig(granularity="group", group_size=64, fp_fraction=0.25), True),  # calibrated, 25% of layers FP
])
def test_measure_recipe_matches_a_separate_quantize_evaluate_save(tiny_llama, windows, tmp_path, config,
                                                                   with_windows):
    before = copy.deepcopy(tiny_llama.state_dict())
    calibration = windows if with_windows else None
    result = measure_recipe(tiny_llama, config, windows, calibration=calibration)

    assert set(result) == KEYS
    assert result["config"] == config.to_dict()
    assert result["quant_seconds"] > 0
    # the caller's FP model is untouched
    assert not any(isinstance(m, PackedTernaryLinear) for m in tiny_llama.modules())
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())

    reference = copy.deepcopy(tiny_llama)
    report = quantize(reference, config, calibration=calibration, quiet=True)
    evaluation = evaluate_windows(reference, windows, quiet=True)
    assert result["ppl"] == pytest.approx(evaluation["ppl"], rel=1e-9)
    assert result["ppl"] != pytest.approx(evaluate_windows(tiny_llama, windows, quiet=True)["ppl"], rel=1e-6)
    assert result["token_accuracy"] == pytest.approx(evaluation["token_accuracy"], abs=1e-12)

    artifact = save_quantized(reference, tmp_path / "artifact")
    assert result["artifact_bytes"] == sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file())

    bits, sparsity, stored_bytes = _expected_sizes(report)
    assert result["bits_per_weight"] == pytest.approx(bits, rel=1e-12)
    assert result["sparsity"] == pytest.approx(sparsity, abs=1e-6)
    fp_linear = sum(reference.get_submodule(row["name"]).weight.numel() for row in report
                    if row["precision"] == "fp" and row["name"] != "lm_head")
    ternary_weights = sum(row["shape"][0] * row["shape"][1] for row in report if row["precision"] == "ternary")
    assert (fp_linear > 0) == with_windows
    assert result["bits_per_linear_weight"] == pytest.approx(
        (8 * stored_bytes + 16 * fp_linear) / (ternary_weights + fp_linear), rel=1e-12)


def test_measure_recipe_keeps_the_quantized_model_when_asked(tiny_llama, windows):
    result = measure_recipe(tiny_llama, QuantConfig(), windows, keep_model=True)
    model = result.pop("model")
    assert set(result) == KEYS
    assert any(isinstance(m, PackedTernaryLinear) for m in model.modules())
    assert evaluate_windows(model, windows, quiet=True)["ppl"] == pytest.approx(result["ppl"], rel=1e-12)


def test_fp_reference_evaluates_in_place_and_weighs_the_unique_tensors(tiny_llama, windows, tmp_path):
    result = fp_reference(tiny_llama, windows)
    evaluation = evaluate_windows(tiny_llama, windows, quiet=True)
    assert result["ppl"] == pytest.approx(evaluation["ppl"], rel=1e-12)
    assert result["token_accuracy"] == evaluation["token_accuracy"]
    # the LM head shares the embedding's storage: written once, under the embedding's name
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    tensors = {k: v.contiguous() for k, v in tiny_llama.state_dict().items() if k != "lm_head.weight"}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    assert result["artifact_bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert next(tiny_llama.parameters()).device.type == "cpu"
