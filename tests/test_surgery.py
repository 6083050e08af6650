import pytest
import torch

from atq import PackedTernaryLinear, QuantConfig, quantize
from atq.surgery import select_linear_layers


def test_llama_all_linears_but_head(tiny_llama):
    names = list(select_linear_layers(tiny_llama, QuantConfig()))
    assert len(names) == 2 * 7 and "lm_head" not in names
    assert all(n.startswith("model.layers.") for n in names)


def test_tied_embeddings_stay_tied(tiny_llama):
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    quantize(tiny_llama, QuantConfig(), quiet=True)
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight
    assert isinstance(tiny_llama.model.layers[0].mlp.down_proj, PackedTernaryLinear)


def test_gpt2_conv1d_layers_are_replaced_and_compute_the_same_function(tiny_gpt2):
    attn = tiny_gpt2.transformer.h[0].attn.c_attn
    x = torch.randn(3, 72)
    quantize(tiny_gpt2, QuantConfig.seed(), quiet=True)
    packed = tiny_gpt2.transformer.h[0].attn.c_attn
    assert isinstance(packed, PackedTernaryLinear) and packed.out_features == 3 * 72
    # Conv1D computes x @ W + b with W (in, out); the ternary layer must compute x @ Ŵ^T + b with Ŵ (out, in)
    attn.weight.data = packed.dequantize().T.contiguous()
    assert torch.allclose(packed(x), attn(x), atol=1e-5)


def test_include_and_exclude_patterns(tiny_llama):
    names = select_linear_layers(tiny_llama, QuantConfig(include=(r"mlp",), exclude=(r"down_proj",)))
    assert names and all("mlp" in n and "down_proj" not in n for n in names)


def test_nothing_left_after_exclusion_is_an_error(tiny_llama):
    with pytest.raises(ValueError, match="no linear layer left"):
        quantize(tiny_llama, QuantConfig(exclude=(r".",)), quiet=True)


def test_nan_weight_fails_before_the_model_is_touched(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="model.layers.1.mlp.up_proj.weight.*NaN"):
        quantize(tiny_llama, QuantConfig(), quiet=True)
    assert not any(isinstance(m, PackedTernaryLinear) for m in tiny_llama.modules())


def test_quantize_head_when_asked(tiny_llama):
    names = select_linear_layers(tiny_llama, QuantConfig(quantize_head=True))
    assert "lm_head" in names
