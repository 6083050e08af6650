"""The bundled real model, SmolLM2-135M-Instruct (fetched once into $ATQ_CACHE by atq.smollm2())."""

import os
from pathlib import Path

import pytest
import torch

from atq import QuantConfig, load_model, load_quantized, perplexity, quantize, save_quantized

pytestmark = pytest.mark.real_model

DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

# Recorded from an independent computation: plain transformers (AutoModelForCausalLM.from_pretrained with
# gguf_file), tokenizer on the whole test text, 4 windows of 512 tokens, exp(mean of model(w, labels=w).loss).
REFERENCE_PPL_4x512 = 30.962334335747972


@pytest.fixture(scope="module")
def smollm2_model():
    return load_model("smollm2")


@pytest.fixture
def data_dir(monkeypatch):
    data_dir = os.environ.get("ATQ_DATA_DIR") or str(DATA_DIR)
    if not (Path(data_dir) / "wikitext2_test.txt").is_file():
        pytest.skip(f"WikiText-2 test text not found in {data_dir}; set ATQ_DATA_DIR")
    monkeypatch.setenv("ATQ_DATA_DIR", data_dir)


def test_fp_perplexity_matches_the_independent_reference(smollm2_model, data_dir):
    model, tokenizer = smollm2_model
    assert model.config.hidden_size == 576
    ppl = perplexity(model, tokenizer, "wikitext2", seq_len=512, max_windows=4, quiet=True)
    assert ppl == pytest.approx(REFERENCE_PPL_4x512, rel=1e-4)


def test_quantize_save_load_gives_identical_logits(smollm2_model, tmp_path):
    model, tokenizer = smollm2_model
    model = __import__("copy").deepcopy(model)
    report = quantize(model, QuantConfig(granularity="group", group_size=128), quiet=True)
    ternary = [r for r in report if r["precision"] == "ternary"]
    assert len(ternary) == 30 * 7
    assert ternary[0]["shape"] == [576, 576] and ternary[0]["group_size"] == 128  # 4 full groups + one of 64
    assert model.model.layers[0].self_attn.q_proj.scales.shape == (576, 5)
    save_quantized(model, tmp_path / "smollm2-atq", tokenizer=tokenizer, dtype="float32")
    loaded = load_quantized(tmp_path / "smollm2-atq")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


def test_gguf_q_k_row_order_matches_llama_cpp(smollm2_model):
    """Our permutation applied to transformers' (un-permuted) q/k reproduces the source GGUF's own tensors."""
    gguf = pytest.importorskip("gguf")
    import numpy as np

    from atq.export.gguf import permute_rows
    from atq.models import smollm2

    model, _ = smollm2_model
    tensors = {t.name: t for t in gguf.GGUFReader(smollm2()).tensors}
    for name, hf, heads in [("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3)]:
        stored = tensors[f"blk.3.{name}.weight"]
        source = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(stored.data, stored.tensor_type)))
        ours = permute_rows(getattr(model.model.layers[3].self_attn, hf).weight.detach(), heads)
        assert torch.allclose(source.reshape(ours.shape), ours, atol=1e-6)


def test_real_weights_export_to_q2_0_bit_for_bit(smollm2_model, tmp_path):
    """All 210 ternary layers of SmolLM2 (groups of 64) become Q2_0 blocks that ggml's dequantizer (transcribed in
    atq.export.q2_0) turns back into ATQ's weights exactly; the file is 2.25 bits a ternary weight."""
    pytest.importorskip("gguf")
    from atq.export.gguf import export_gguf
    from atq.export.gguf_read import read_gguf
    from atq.models import smollm2

    model, _ = smollm2_model
    model = __import__("copy").deepcopy(model)
    quantize(model, QuantConfig(mode="sparsity", granularity="group", group_size=64), quiet=True)
    report = export_gguf(model, tmp_path / "m.gguf", metadata_from=smollm2(), embedding="q8_0")
    assert report["fallback"] == [] and report["verified_exact"] == 210
    assert {report["tensors"][n] for n in report["tensors"] if ".layers." in n and "norm" not in n} == {"Q2_0"}
    assert report["bits_per_ternary_weight"] == pytest.approx(2.25)
    metadata, tensors = read_gguf(tmp_path / "m.gguf")
    assert tensors["token_embd.weight"].ggml_type == 8 and metadata["general.file_type"] == 41
    assert "tokenizer.chat_template" in metadata and metadata["general.architecture"] == "llama"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernels run natively on a CUDA GPU only")
def test_triton_kernels_on_real_activations_and_perplexity(smollm2_model, data_dir, monkeypatch):
    """The CUDA default path on the packed SmolLM2 in bf16. Per layer, on the activations each layer really sees
    (one token: the GEMV; six: the GEMM), the output is compared with the float64 product of the dequantized
    weights; end to end, the perplexity with the unpack-then-matmul reference. (Whole-model logits are no test:
    a weight-only ternary model amplifies bf16 rounding differences chaotically, whichever kernel rounds.)"""
    import copy

    from atq.layers import PackedTernaryLinear

    model, tokenizer = smollm2_model
    ternary = copy.deepcopy(model).to("cuda", torch.bfloat16)
    quantize(ternary, QuantConfig(group_size=64), quiet=True)
    layers = {name: m for name, m in ternary.named_modules() if isinstance(m, PackedTernaryLinear)}
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, name=name: inputs.__setitem__(name, args[0].detach()))
             for name, m in layers.items()]
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids.cuda()
    monkeypatch.setenv("ATQ_KERNEL", "reference")
    for tokens in (ids[:, :1], ids[:, :6]):
        with torch.no_grad():
            ternary(tokens)
        for name, layer in layers.items():
            exact = inputs[name].double() @ layer.dequantize(torch.float64).T
            monkeypatch.setenv("ATQ_KERNEL", "triton")
            with torch.no_grad():
                got = layer(inputs[name]).double()
            monkeypatch.setenv("ATQ_KERNEL", "reference")
            assert (got - exact).norm() / exact.norm() <= 1e-2, (name, tokens.shape)
    for hook in hooks:
        hook.remove()
    scores = {}
    for kernel in ("reference", "triton"):
        monkeypatch.setenv("ATQ_KERNEL", kernel)
        scores[kernel] = perplexity(ternary, tokenizer, "wikitext2", seq_len=512, max_windows=4, quiet=True)
    assert scores["triton"] == pytest.approx(scores["reference"], rel=2e-2), scores
