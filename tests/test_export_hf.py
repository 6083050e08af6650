"""transformers export: a BitNet checkpoint that plain transformers loads and runs to ATQ's logits."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from atq import QuantConfig, load_quantized, quantize, save_quantized
from atq.export.gguf import ExportError
from atq.export.hf import export_hf
from atq.qat import TrainConfig, prepare_qat, to_packed, train

from .conftest import make_llama

pytest.importorskip("accelerate")  # transformers' BitNet loader requires it


def tokens(n=2, length=12):
    return torch.randint(0, 16, (n, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("tie", [True, False])
def test_bitnet_preset_round_trips_through_plain_transformers(tmp_path, tie):
    model = make_llama(tie=tie)
    quantize(model, QuantConfig.bitnet(), quiet=True)
    save_quantized(model, tmp_path / "atq", dtype="float32")
    atq_model = load_quantized(tmp_path / "atq")  # through the artifact, as a user would
    report = export_hf(atq_model, tmp_path / "hf")
    assert report["ternary_layers"] == 14
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded.model.layers[0].mlp.up_proj).__name__ == "BitLinear"
    assert loaded.model.layers[0].mlp.up_proj.weight.dtype == torch.uint8  # packed, four rows a byte
    ids = tokens()
    with torch.no_grad():
        expected, got = atq_model(ids).logits, loaded(ids).logits
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_bitnet_preset_trains_and_exports(tmp_path):
    student, teacher = make_llama(), make_llama(seed=1)
    prepare_qat(student, QuantConfig.bitnet())
    train(student, torch.randint(0, 16, (8, 16), generator=torch.Generator().manual_seed(1)),
          TrainConfig(steps=3, batch_size=4, lr=1e-3), teacher=teacher, quiet=True)
    to_packed(student)
    student.atq_config = QuantConfig.bitnet()
    export_hf(student, tmp_path / "hf")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.allclose(loaded(tokens()).logits, student(tokens()).logits, rtol=1e-4, atol=1e-4)


def test_other_layouts_are_refused_with_the_reason_or_dequantized(tmp_path):
    model = make_llama()
    quantize(model, QuantConfig(group_size=32), quiet=True)
    with pytest.raises(ExportError, match="one per tensor.*bitnet|BitLinear"):
        export_hf(model, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    export_hf(model, tmp_path / "dense", dequantize=True)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not hasattr(loaded.config, "quantization_config")
    with torch.no_grad():
        assert torch.allclose(loaded(tokens()).logits, model(tokens()).logits, atol=1e-5)
