"""Artifacts: an HF checkpoint that atq.load_quantized and transformers' from_pretrained load bit for bit, with
every file under a checksum, published atomically and never over something ATQ did not write."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from atq import ArtifactError, QuantConfig, load_quantized, quantize, save_quantized
from atq.io import CHECKSUMS, WEIGHTS_FILE

from .conftest import make_gpt2, make_llama


def logits(model, seed=0):
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


WINDOWS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize(
    ("make", "config"),
    [
        (make_llama, QuantConfig(group_size=32)),
        (make_gpt2, QuantConfig(group_size=32)),
        (lambda: make_llama(tie=False), QuantConfig(granularity="row")),
        (make_llama, QuantConfig(planes=2, packing="base3", group_size=32)),
        (lambda: make_llama(hidden=64), QuantConfig(group_size=32, rotation="hadamard", embedding="q8_0")),
        (lambda: make_llama(tie=False, hidden=64), QuantConfig(group_size=32, embedding="q4_0")),
    ],
)
def test_round_trip_gives_bit_identical_logits(tmp_path, make, config):
    model = make()
    quantize(model, config, calibration=WINDOWS if config.rotation else None, quiet=True)
    save_quantized(model, tmp_path / "artifact", dtype="float32")
    loaded = load_quantized(tmp_path / "artifact")
    assert torch.equal(logits(model), logits(loaded))
    assert loaded.atq_config == model.atq_config
    if model.config.tie_word_embeddings and config.embedding == "fp":
        assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_transformers_loads_what_atq_loads(tmp_path, char_tokenizer):
    """from_pretrained (the registered quantizer), generate and save_pretrained, against load_quantized."""
    from transformers import AutoModelForCausalLM

    model = make_llama(seed=1, hidden=64)
    quantize(model, QuantConfig(group_size=32, rotation="hadamard", embedding="q8_0"), calibration=WINDOWS, quiet=True)
    directory = save_quantized(model, tmp_path / "artifact", char_tokenizer)  # bf16 FP parts, the default
    ours, theirs = load_quantized(directory), AutoModelForCausalLM.from_pretrained(directory)
    assert theirs.dtype == torch.bfloat16 and torch.equal(logits(ours), logits(theirs))
    prompt = torch.tensor([[5, 6, 7]])
    assert torch.equal(ours.generate(prompt, max_new_tokens=6, do_sample=False),
                       theirs.generate(prompt, max_new_tokens=6, do_sample=False))
    theirs.save_pretrained(tmp_path / "again")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again")), logits(ours))
    # the 16-bit file is the FP32 model rounded once: close to it, not equal
    assert 0 < float((logits(ours).float() - logits(model)).abs().max()) < 0.1 * float(logits(model).abs().max())


def test_artifact_contents(tmp_path, char_tokenizer):
    tiny_llama = make_llama(hidden=64)
    quantize(tiny_llama, QuantConfig(embedding="q8_0"), quiet=True)
    directory = save_quantized(tiny_llama, tmp_path / "a", tokenizer=char_tokenizer)
    config = json.loads((directory / "config.json").read_text())
    qconfig = config["quantization_config"]
    assert qconfig["quant_method"] == "atq" and qconfig["format_version"] == 2 and qconfig["embedding"] == "q8_0"
    assert qconfig["recipe"]["mode"] == "mse" and config["dtype"] == "bfloat16"
    assert qconfig["modules"]["model.layers.0.mlp.up_proj"]["packing"] == "2bit" and "lm_head" not in qconfig["modules"]
    checked = json.loads((directory / CHECKSUMS).read_text())["files"]
    assert set(checked) == set(os.listdir(directory)) - {CHECKSUMS}
    assert {WEIGHTS_FILE, "config.json", "char_tokenizer.txt", "generation_config.json"} <= set(checked)
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as handle:
        dtypes = {key: handle.get_tensor(key).dtype for key in handle.keys()}  # noqa: SIM118
    assert dtypes["model.layers.0.mlp.up_proj.packed"] == torch.uint8
    assert dtypes["model.layers.0.mlp.up_proj.scales"] == torch.float16
    assert dtypes["model.embed_tokens.codes"] == torch.int8 and dtypes["model.embed_tokens.scales"] == torch.float16
    assert dtypes["model.norm.weight"] == torch.bfloat16 and "lm_head.codes" not in dtypes  # tied: stored once


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_storage_dtype_is_the_users_choice(tmp_path, tiny_llama, dtype):
    quantize(tiny_llama, QuantConfig(), quiet=True)
    directory = save_quantized(tiny_llama, tmp_path / "a", dtype=dtype)
    with safe_open(str(directory / WEIGHTS_FILE), "pt") as handle:
        assert handle.get_tensor("model.embed_tokens.weight").dtype == getattr(torch, dtype)
        assert handle.get_tensor("model.layers.0.mlp.up_proj.scales").dtype == torch.float16
    assert load_quantized(directory).model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_quantized(tiny_llama, tmp_path / "b", dtype="int8")


@pytest.fixture
def artifact(tmp_path, tiny_llama, char_tokenizer):
    quantize(tiny_llama, QuantConfig(), quiet=True)
    return save_quantized(tiny_llama, tmp_path / "artifact", char_tokenizer)


def test_truncated_weights_are_named(artifact):
    path = artifact / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ArtifactError, match="model.safetensors.*truncated"):
        load_quantized(artifact)


@pytest.mark.parametrize("name", [WEIGHTS_FILE, "config.json", "generation_config.json", "char_tokenizer.txt"])
def test_one_flipped_bit_in_any_file_is_detected(artifact, name):
    path = artifact / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=f"{name}.*(sha256|altered)"):
        load_quantized(artifact)


def test_edited_rope_base_is_detected(artifact):
    path = artifact / "config.json"
    config = json.loads(path.read_text())
    config["rope_theta"] = 110000.0
    path.write_text(json.dumps(config, indent=2))
    with pytest.raises(ArtifactError, match="config.json.*(sha256|altered)"):
        load_quantized(artifact)


def test_missing_and_extra_files(artifact):
    (artifact / "notes.txt").write_text("a file the save did not write is not checked, and not deleted")
    load_quantized(artifact)
    (artifact / WEIGHTS_FILE).unlink()
    with pytest.raises(ArtifactError, match="model.safetensors.*missing"):
        load_quantized(artifact)
    (artifact / CHECKSUMS).unlink()
    with pytest.raises(ArtifactError, match="atq_checksums.json.*missing"):
        load_quantized(artifact)


def test_altered_checksum_list(artifact):
    path = artifact / CHECKSUMS
    payload = json.loads(path.read_text())
    payload["files"][WEIGHTS_FILE]["bytes"] += 1
    path.write_text(json.dumps(payload))
    with pytest.raises(ArtifactError, match="list of checksums was altered"):
        load_quantized(artifact)
    path.write_text(path.read_text()[:30])
    with pytest.raises(ArtifactError, match="atq_checksums.json.*unreadable"):
        load_quantized(artifact)


def test_edited_quantization_config_names_the_field(artifact):
    """An edited group size (checksums rewritten, as a careless tool would) fails on the field, before loading."""
    from transformers import AutoModelForCausalLM

    path = artifact / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["modules"]["model.layers.0.mlp.up_proj"]["group_size"] = 32
    path.write_text(json.dumps(config))
    (artifact / CHECKSUMS).unlink()
    with pytest.raises(ArtifactError, match=r"modules\['model.layers.0.mlp.up_proj'\].*scales"):
        AutoModelForCausalLM.from_pretrained(artifact)


def test_old_format_gets_a_clear_error(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "atq_config.json").write_text(json.dumps({"format_version": 1, "quant_config": {"mode": "mse"}}))
    (old / WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(ArtifactError, match="format 1.*Quantize the source model again.*QuantConfig.from_dict"):
        load_quantized(old)


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
    save_quantized(other, artifact, dtype="float32")
    assert torch.equal(logits(load_quantized(artifact)), logits(other))
    assert sorted(os.listdir(artifact.parent)) == ["artifact"]


def test_saving_never_replaces_what_it_did_not_write(tmp_path, tiny_llama):
    quantize(tiny_llama, QuantConfig(), quiet=True)
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "paper.tex").write_text("x")
    with pytest.raises(FileExistsError, match="work exists and is not.*refusing"):
        save_quantized(tiny_llama, work)
    assert (work / "paper.tex").read_text() == "x" and (work / "sub").is_dir()
    (tmp_path / "file").write_text("y")
    with pytest.raises(FileExistsError, match="is a file"):
        save_quantized(tiny_llama, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "y"
    save_quantized(tiny_llama, work, overwrite=True)  # when asked, it does
    assert not (work / "paper.tex").exists() and load_quantized(work) is not None


def test_unquantized_model_is_refused(tmp_path, tiny_llama):
    with pytest.raises(ValueError, match="not been quantized"):
        save_quantized(tiny_llama, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_gpt2_and_pipeline_through_transformers(tmp_path, tiny_model_dir):
    """A GPT-2 (Conv1D layers) through from_pretrained; a Llama with a real tokenizer through pipeline()."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    gpt2 = make_gpt2(seed=3)
    quantize(gpt2, QuantConfig(group_size=32), quiet=True)
    directory = save_quantized(gpt2, tmp_path / "gpt2", dtype="float32")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(directory)), logits(gpt2))

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    quantize(model, QuantConfig(group_size=32), quiet=True)
    directory = save_quantized(model, tmp_path / "llama", tokenizer=tokenizer, dtype="float32")
    generator = pipeline("text-generation", model=str(directory))
    generated = generator("the quick brown", max_new_tokens=5, do_sample=False, return_tensors=True)
    ids = tokenizer("the quick brown", return_tensors="pt").input_ids
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)[0]
    assert list(generated[0]["generated_token_ids"]) == expected.tolist()


def test_from_pretrained_checks_the_checksums_and_load_quantized_hashes_once(artifact, monkeypatch):
    """transformers' own loading path verifies the files too; atq.load_quantized, which verified them just before,
    does not make it hash them a second time."""
    from transformers import AutoModelForCausalLM

    import atq.io

    hashed = []
    real = atq.io.sha256_file
    monkeypatch.setattr(atq.io, "sha256_file", lambda path: (hashed.append(path), real(path))[1])
    load_quantized(artifact)
    checked = len(json.loads((artifact / CHECKSUMS).read_text())["files"])
    assert len(hashed) == checked
    path = artifact / "char_tokenizer.txt"
    path.write_bytes(path.read_bytes() + b"!")
    with pytest.raises(ArtifactError, match="char_tokenizer.txt.*(truncated|altered)"):
        AutoModelForCausalLM.from_pretrained(artifact)
