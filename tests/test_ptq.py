import pytest
import torch

from atq import QuantConfig, quantize, quantize_model
from atq.stats import model_stats
from atq.surgery import linear_weight


def test_report_rows_match_an_independent_error_computation(tiny_llama):
    originals = {n: linear_weight(m).detach().clone().double() for n, m in tiny_llama.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    report = quantize(tiny_llama, QuantConfig(mode="sparsity", sparsity=0.5, group_size=64), quiet=True)
    ternary = {r["name"]: r for r in report if r["precision"] == "ternary"}
    assert set(ternary) == set(originals)
    assert [r["name"] for r in report if r["precision"] == "fp"] == ["lm_head"]
    for name, weight in originals.items():
        restored = tiny_llama.get_submodule(name).dequantize(torch.float64)
        assert ternary[name]["rel_error"] == pytest.approx(float((weight - restored).norm() / weight.norm()), rel=1e-5)
        assert ternary[name]["sparsity"] == pytest.approx(0.5, abs=0.02)
        assert ternary[name]["shape"] == list(weight.shape)


def test_stats_count_codes_and_scales(tiny_llama):
    quantize(tiny_llama, QuantConfig(group_size=64), quiet=True)
    stats = model_stats(tiny_llama)
    # hidden 72, intermediate 144: every row is 72 or 144 wide -> groups 64+8 or 64+64+16
    expected_bytes = 0
    weights = 0
    for layer in tiny_llama.model.layers:
        for module in [*vars(layer.self_attn)["_modules"].values(), *vars(layer.mlp)["_modules"].values()]:
            if not hasattr(module, "packed"):
                continue
            out_f, in_f = module.out_features, module.in_features
            expected_bytes += out_f * (-(-in_f // 4)) + 2 * out_f * (-(-in_f // 64))
            weights += out_f * in_f
    assert stats["packed_bytes"] == expected_bytes and stats["ternary_weights"] == weights
    assert stats["bits_per_weight"] == pytest.approx(8 * expected_bytes / weights)
    fp = sum(p.numel() for p in tiny_llama.parameters())
    assert stats["compression_ratio"] == pytest.approx(4 * (weights + fp) / (expected_bytes + 4 * fp))


def test_quantize_model_from_a_local_directory(tiny_model_dir):
    result = quantize_model(str(tiny_model_dir), mode="sparsity", sparsity=0.3, quiet=True)
    assert result["config"].sparsity == 0.3 and result["config"].mode == "sparsity"
    assert result["stats"]["ternary_layers"] == 14
    assert result["stats"]["sparsity"] == pytest.approx(0.3, abs=0.02)
    assert result["stats"]["compression_ratio"] > 1 and len(result["report"]) == 15
    assert result["tokenizer"]("the fox").input_ids


def test_an_embedding_that_is_not_whole_blocks_is_refused_before_anything_changes(tiny_llama):
    from atq import PackedTernaryLinear

    with pytest.raises(ValueError, match=r"QuantConfig.embedding='q8_0'.*72 wide"):  # 72 is not whole 32-blocks
        quantize(tiny_llama, QuantConfig(embedding="q8_0"), quiet=True)
    assert not any(isinstance(m, PackedTernaryLinear) for m in tiny_llama.modules())
