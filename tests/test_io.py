import json
import os

import pytest
import torch

from atq import ArtifactError, QuantConfig, load_quantized, quantize, save_quantized
from atq.io import ARTIFACT_CONFIG, WEIGHTS_FILE

from .conftest import make_gpt2, make_llama


def logits(model, seed=0):
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize(
    ("make", "config"),
    [
        (make_llama, QuantConfig(group_size=32)),
        (make_gpt2, QuantConfig(group_size=32)),
        (lambda: make_llama(tie=False), QuantConfig(granularity="row")),
        (make_llama, QuantConfig(planes=2, packing="base3", group_size=32)),
    ],
)
def test_round_trip_gives_bit_identical_logits(tmp_path, make, config):
    model = make()
    quantize(model, config, quiet=True)
    save_quantized(model, tmp_path / "artifact")
    loaded = load_quantized(tmp_path / "artifact")
    assert torch.equal(logits(model), logits(loaded))
    assert loaded.atq_config == model.atq_config
    if model.config.tie_word_embeddings:
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_artifact_contents(tmp_path, tiny_llama, char_tokenizer):
    quantize(tiny_llama, QuantConfig(), quiet=True)
    directory = save_quantized(tiny_llama, tmp_path / "a", tokenizer=char_tokenizer)
    meta = json.loads((directory / ARTIFACT_CONFIG).read_text())
    assert meta["format_version"] == 1 and meta["quant_config"]["mode"] == "mse"
    assert set(meta["files"]) == {WEIGHTS_FILE, "char_tokenizer.txt"}
    assert meta["layers"]["lm_head"] == {"precision": "fp"}
    assert meta["layers"]["model.layers.0.mlp.up_proj"]["precision"] == "ternary"
    assert meta["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), "pt") as handle:
        assert handle.get_tensor("model.layers.0.mlp.up_proj.packed").dtype == torch.uint8
        assert handle.get_tensor("model.layers.0.mlp.up_proj.scales").dtype == torch.float16


@pytest.fixture
def artifact(tmp_path, tiny_llama):
    quantize(tiny_llama, QuantConfig(), quiet=True)
    return save_quantized(tiny_llama, tmp_path / "artifact")


def test_truncated_weights_are_named(artifact):
    path = artifact / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="model.safetensors.*truncated"):
        load_quantized(artifact)


def test_altered_byte_is_detected(artifact):
    path = artifact / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="model.safetensors.*sha256"):
        load_quantized(artifact)


def test_missing_files(artifact):
    (artifact / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="model.safetensors.*missing"):
        load_quantized(artifact)
    (artifact / ARTIFACT_CONFIG).unlink()
    with pytest.raises(ArtifactError, match="atq_config.json.*missing"):
        load_quantized(artifact)


def test_corrupted_json(artifact):
    path = artifact / ARTIFACT_CONFIG
    path.write_text(path.read_text()[:50])
    with pytest.raises(ArtifactError, match="atq_config.json.*JSON"):
        load_quantized(artifact)


def test_incompatible_format_version(artifact):
    path = artifact / ARTIFACT_CONFIG
    meta = json.loads(path.read_text())
    meta["format_version"] = 99
    path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format version 99"):
        load_quantized(artifact)


def test_crash_mid_save_keeps_the_previous_artifact(artifact, monkeypatch):
    before = logits(load_quantized(artifact))
    other = make_llama(seed=9)
    quantize(other, QuantConfig(), quiet=True)

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr("safetensors.torch.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(other, artifact)
    assert torch.equal(logits(load_quantized(artifact)), before)
    assert sorted(os.listdir(artifact.parent)) == ["artifact"]  # no temporary leftovers


def test_overwrite_replaces_the_previous_artifact(artifact):
    other = make_llama(seed=9)
    quantize(other, QuantConfig(), quiet=True)
    save_quantized(other, artifact)
    assert torch.equal(logits(load_quantized(artifact)), logits(other))
    assert sorted(os.listdir(artifact.parent)) == ["artifact"]


def test_unquantized_model_is_refused(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="not been quantized"):
        save_quantized(tiny_llama, tmp_path / "x")
    assert not (tmp_path / "x").exists()
