"""Loading a GGUF's weights back into an HF model (export/gguf_weights.py), for scoring llama.cpp files with ATQ's
evaluation loop. References: the ATQ model the file was exported from (its dequantized layers, its logits)."""

import pytest
import torch

from atq import QuantConfig, quantize
from atq.export.gguf import ExportError, export_gguf, permute_rows
from atq.export.gguf_weights import load_gguf_weights, unpermute_rows

from .conftest import make_llama
from .test_export_gguf import bpe_tokenizer_dir

pytest.importorskip("gguf")


def test_unpermute_undoes_llama_cpps_row_order():
    weight = torch.arange(48.0).reshape(8, 6)
    assert torch.equal(unpermute_rows(permute_rows(weight, 2), 2), weight)
    assert not torch.equal(permute_rows(weight, 2), weight)


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_an_exported_model_loads_back_to_its_own_weights_and_logits(tmp_path, rotation):
    """Every Q2_0 layer comes back bit for bit (codes through ggml's dequantizer, q/k rows un-permuted); with F16
    embedding and head the logits match the ATQ model's at fp16 rounding. A rotated model's file holds the
    rotation folded in, with its head apart: the plain HF model computes what the hooked ATQ model computes."""
    model = make_llama(hidden=128)
    quantize(model, QuantConfig(group_size=64, rotation=rotation), quiet=True)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, tokenizer_dir=bpe_tokenizer_dir(tmp_path, 256), embedding="f16")
    fresh = make_llama(seed=9, hidden=128)
    types = load_gguf_weights(fresh, path)
    assert types["Q2_0"] == 14
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            assert torch.equal(fresh.get_submodule(name).weight, module.qweight.dequantize(torch.float32)), name
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(ids).logits, fresh(ids).logits
    assert (got - expected).norm() / expected.norm() < 2e-3


def test_a_file_of_another_shape_is_refused(tmp_path):
    model = make_llama(hidden=128)
    quantize(model, QuantConfig(group_size=64), quiet=True)
    path = tmp_path / "m.gguf"
    export_gguf(model, path, tokenizer_dir=bpe_tokenizer_dir(tmp_path, 256))
    with pytest.raises(ExportError, match="shape"):
        load_gguf_weights(make_llama(hidden=64), path)


def make_qwen2(seed: int = 0):
    """A Qwen2 whose q/k/v biases are not zero (transformers starts them at zero), widths of whole Q2_0 blocks."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         rope_theta=1e6)).eval()
    for layer in model.model.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            projection.bias.data.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("rotation", ["none", "hadamard"])
def test_a_qwen2_export_keeps_hf_row_order_and_its_biases(tmp_path, rotation):
    """Qwen2 in llama.cpp reads q/k in HF's order (NEOX rotary) and q/k/v biases. Reference: transformers' own
    GGUF reader (its Qwen2 name map, no un-permute) on the same weights written F16 gives the ATQ model's logits;
    the Q2_0 file loads back bit for bit with the biases."""
    from transformers import AutoModelForCausalLM

    model = make_qwen2()
    quantize(model, QuantConfig(group_size=64, rotation=rotation), quiet=True)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
    tokenizer = bpe_tokenizer_dir(tmp_path, 256)
    export_gguf(model, tmp_path / "f16.gguf", tokenizer_dir=tokenizer, ternary_type="f16", embedding="f16")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="f16.gguf", dtype=torch.float32).eval()
    assert type(reference).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        got = reference(ids).logits
    assert (got - expected).norm() / expected.norm() < 2e-3

    report = export_gguf(model, tmp_path / "q.gguf", tokenizer_dir=tokenizer, embedding="f16")
    assert {report["tensors"][n] for n, m in model.named_modules() if hasattr(m, "qweight")} == {"Q2_0"}
    fresh = make_qwen2(seed=9)
    assert load_gguf_weights(fresh, tmp_path / "q.gguf")["F32"] >= 6  # the q/k/v biases of both layers
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            assert torch.equal(fresh.get_submodule(name).weight, module.qweight.dequantize(torch.float32)), name
            if module.bias is not None:
                assert torch.equal(fresh.get_submodule(name).bias, module.bias), name
    with torch.no_grad():
        assert (fresh(ids).logits - expected).norm() / expected.norm() < 2e-3

