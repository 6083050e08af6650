"""GGUF export: exact TQ2_0 where blocks of 256 hold one scale (Q2_0: tests/test_export_q2_0.py), reported fallbacks
elsewhere, clean failures."""

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


def wide_llama(**overrides):
    """Input widths 256 and 512: whole TQ blocks per row."""
    torch.manual_seed(0)
    shape = {"vocab_size": 64, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    config = LlamaConfig(**{**shape, **overrides})
    return LlamaForCausalLM(config).eval()


# Every number distinct from the others and from transformers' defaults, so a key written from the wrong field
# (or a default) cannot pass.
DISTINCT = {"num_hidden_layers": 3, "max_position_embeddings": 96, "rms_norm_eps": 3e-6, "rope_theta": 50000.0}


def expected_llama_keys(config):
    """The llama.* keys llama.cpp reads, from the HF config, written out here independently of the exporter."""
    return {
        "llama.context_length": config.max_position_embeddings,
        "llama.embedding_length": config.hidden_size,
        "llama.block_count": config.num_hidden_layers,
        "llama.feed_forward_length": config.intermediate_size,
        "llama.attention.head_count": config.num_attention_heads,
        "llama.attention.head_count_kv": config.num_key_value_heads,
        "llama.rope.dimension_count": config.hidden_size // config.num_attention_heads,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(config.rms_norm_eps, rel=1e-6),  # float32
        "llama.rope.freq_base": pytest.approx(config.rope_parameters["rope_theta"], rel=1e-6),
        "llama.vocab_size": config.vocab_size,
    }


def source_gguf(path, config, **extra):
    """A metadata-only GGUF describing ``config`` (what --metadata-from reads), with a name, a chat template and
    a token list of its own, so a copy can be told from metadata written from the config."""
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("the source model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    if extra.get("rope", True):
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"s{i}" for i in range(config.vocab_size)])
    writer.add_token_types([gguf.TokenType.NORMAL] * config.vocab_size)
    writer.add_chat_template("{{ messages }}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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
    model = make_llama(hidden=96)  # rows of 96 and 192: whole Q8_0 blocks of 32; groups of 32: no Q2_0/TQ block
    quantize(model, QuantConfig(group_size=32), quiet=True)
    report = export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=bpe_tokenizer_dir(tmp_path, 256))
    assert len(report["fallback"]) == 14 and {report["tensors"][n] for n in report["fallback"]} == {"Q8_0"}
    assert report["bits_per_ternary_weight"] == pytest.approx(8.5)
    _, tensors = read_tensors(tmp_path / "m.gguf")
    weight = model.model.layers[0].mlp.up_proj.dequantize(torch.float32)
    restored = dequantized(tensors["blk.0.ffn_up.weight"]).reshape(weight.shape)
    assert torch.allclose(restored, weight, rtol=2**-10, atol=0)  # Q8_0 holds ±127·d: exact up to fp16 d
    odd = make_llama()  # rows of 72 are not even whole Q8_0 blocks: F16
    quantize(odd, QuantConfig(group_size=32), quiet=True)
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


@pytest.fixture(scope="module")
def distinct_model():
    """Quantized once for the metadata tests (none of them changes it)."""
    model = wide_llama(**DISTINCT)
    quantize(model, QuantConfig(mode="absmean", granularity="row"), quiet=True)
    return model


def llama_fields(path):
    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("llama.")}


def test_every_llama_key_written_matches_the_config(tmp_path, distinct_model):
    model = distinct_model
    export_gguf(model, tmp_path / "m.gguf", tokenizer_dir=bpe_tokenizer_dir(tmp_path, 64))
    assert llama_fields(tmp_path / "m.gguf") == expected_llama_keys(model.config)


def test_metadata_from_copies_the_source_and_adds_what_it_lacks(tmp_path, distinct_model):
    model = distinct_model
    source = source_gguf(tmp_path / "source.gguf", model.config, rope=False)  # no rope base, no vocab_size
    export_gguf(model, tmp_path / "m.gguf", metadata_from=source)
    copied = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "m.gguf").fields.items()}
    for key, field in gguf.GGUFReader(source).fields.items():
        if not key.startswith("GGUF."):
            assert copied[key] == field.contents(), key  # tokens, name, chat template: the source's
    assert copied["tokenizer.ggml.tokens"][:2] == ["s0", "s1"] and copied["general.name"] == "the source model"
    assert llama_fields(tmp_path / "m.gguf") == expected_llama_keys(model.config)  # the missing two from the config


@pytest.mark.parametrize(("field", "value", "key"), [
    ("num_hidden_layers", 30, "llama.block_count"),
    ("hidden_size", 576, "llama.embedding_length"),
    ("vocab_size", 49152, "tokenizer.ggml.tokens"),
    ("num_attention_heads", 8, "llama.attention.head_count"),
    ("num_key_value_heads", 4, "llama.attention.head_count_kv"),
    ("intermediate_size", 1536, "llama.feed_forward_length"),
    ("max_position_embeddings", 8192, "llama.context_length"),
    ("rms_norm_eps", 1e-5, "llama.attention.layer_norm_rms_epsilon"),
    ("rope_theta", 100000.0, "llama.rope.freq_base"),
])
def test_metadata_from_another_model_is_refused_naming_the_key(tmp_path, distinct_model, field, value, key):
    model = distinct_model
    other = LlamaConfig(**{**model.config.to_dict(), field: value})
    if field == "rope_theta":
        other.rope_parameters = {"rope_type": "default", "rope_theta": value}
    source = source_gguf(tmp_path / "source.gguf", other)
    with pytest.raises(ExportError, match=f"{key}.*nothing was written"):
        export_gguf(model, tmp_path / "m.gguf", metadata_from=source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source.gguf"]


@pytest.mark.real_model
def test_the_readme_command_on_another_model_is_refused(tmp_path):
    """`atq export --format gguf --metadata-from smollm2` on a model that is not SmolLM2."""
    from atq.models import smollm2

    model = make_llama()
    quantize(model, QuantConfig(mode="absmean"), quiet=True)
    with pytest.raises(ExportError, match="llama.block_count is 30 there, the model's num_hidden_layers is 2"):
        export_gguf(model, tmp_path / "m.gguf", metadata_from=smollm2())
    assert not (tmp_path / "m.gguf").exists()
