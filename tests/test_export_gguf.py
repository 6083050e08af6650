"""GGUF export: exact TQ2_0 where blocks of 256 hold one scale, reported fallbacks elsewhere, clean failures."""

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from atq import QuantConfig, quantize
from atq.export.gguf import ExportError, export_gguf, permute_rows

from .conftest import make_gpt2, make_llama

gguf = pytest.importorskip("gguf")


def bpe_tokenizer_dir(tmp_path, vocab_size):
    """A minimal BPE tokenizer.json (the only part the exporter reads)."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    directory = tmp_path / "tok"
    directory.mkdir(parents=True)
    (directory / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": vocab, "merges": ["t 1"]}}))
    return directory


def wide_llama():
    """Input widths 256 and 512: whole TQ blocks per row."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def read_tensors(path):
    reader = gguf.GGUFReader(path)
    return reader, {t.name: t for t in reader.tensors}


def dequantized(tensor):
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))


@pytest.mark.parametrize("ternary_type", ["tq2_0", "tq1_0"])
def test_row_scales_export_bit_exactly(tmp_path, ternary_type):
    model = wide_llama()
    quantize(model, QuantConfig(granularity="row"), quiet=True)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=bpe_tokenizer_dir(tmp_path, 64),
                         ternary_type=ternary_type)
    assert report["fallback"] == [] and len(report["tensors"]) == 14 + 4 + 3  # ternary, block norms, embed + norm + head
    reader, tensors = read_tensors(tmp_path / "m.gguf")
    expected_type = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}[ternary_type]
    assert reader.fields["general.file_type"].contents() == expected_type
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2
    for index, block in enumerate(model.model.layers):
        for hf, name, heads in [("self_attn.q_proj", "attn_q", 4), ("self_attn.k_proj", "attn_k", 2),
                                ("mlp.down_proj", "ffn_down", None)]:
            weight = block.get_submodule(hf).dequantize(torch.float32)
            if heads:
                weight = permute_rows(weight, heads)
            stored = tensors[f"blk.{index}.{name}.weight"]
            assert stored.tensor_type.name == ternary_type.upper()
            assert torch.equal(dequantized(stored).reshape(weight.shape), weight)  # bit for bit
    assert report["bits_per_ternary_weight"] == pytest.approx(66 * 8 / 256 if ternary_type == "tq2_0" else 54 * 8 / 256)


def test_groups_smaller_than_a_block_fall_back_and_are_reported(tmp_path):
    model = make_llama(hidden=96)  # rows of 96 and 192: not whole TQ blocks of 256, whole Q8_0 blocks of 32
    quantize(model, QuantConfig(group_size=64), quiet=True)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=bpe_tokenizer_dir(tmp_path, 256))
    assert len(report["fallback"]) == 14 and {report["tensors"][n] for n in report["fallback"]} == {"Q8_0"}
    assert report["bits_per_ternary_weight"] == pytest.approx(8.5)
    _, tensors = read_tensors(tmp_path / "m.gguf")
    weight = model.model.layers[0].mlp.up_proj.dequantize(torch.float32)
    restored = dequantized(tensors["blk.0.ffn_up.weight"]).reshape(weight.shape)
    assert torch.allclose(restored, weight, rtol=2**-10, atol=0)  # Q8_0 holds ±127·d: exact up to fp16 d
    odd = make_llama()  # rows of 72 are not even whole Q8_0 blocks: F16
    quantize(odd, QuantConfig(group_size=64), quiet=True)
    report = export_gguf(odd, tmp_path / "odd.gguf", tokenizer_dir=bpe_tokenizer_dir(tmp_path / "x", 256))
    assert {report["tensors"][n] for n in report["fallback"]} == {"F16"}


def test_bad_inputs_fail_clearly_and_leave_nothing(tmp_path):
    gpt2 = make_gpt2()
    quantize(gpt2, QuantConfig(), quiet=True)
    with pytest.raises(ExportError, match="Llama"):
        export_gguf(gpt2, tmp_path / "g.gguf", tokenizer_dir=tmp_path)
    model = make_llama()
    quantize(model, QuantConfig(), quiet=True)
    with pytest.raises(ExportError, match="tokenizer"):
        export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=tmp_path / "missing")
    with pytest.raises(ExportError, match="fallback"):
        export_gguf(model, tmp_path / "m.gguf", fallback="q4_0")
    assert list(tmp_path.iterdir()) == []  # no half-written file
