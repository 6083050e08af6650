"""Rotations: orthogonal matrices checked against H·Hᵀ = n·I, and rotated models against the original's logits."""

from __future__ import annotations

import json

import pytest
import torch

from atq import QuantConfig, load_quantized, quantize, save_quantized
from atq.orthogonal import hadamard, random_rotation
from atq.rotation import check_rotatable, folded_stream, rotate_model

from .conftest import make_llama


@pytest.mark.parametrize("n", [1, 2, 12, 24, 64, 144, 576, 1536])
def test_hadamard_is_a_hadamard_matrix(n):
    matrix = hadamard(n)
    assert matrix is not None and set(matrix.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(matrix @ matrix.T, n * torch.eye(n, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("n", [10, 20, 72, 100])
def test_hadamard_without_a_construction_is_none(n):
    assert hadamard(n) is None


@pytest.mark.parametrize("kind,n", [("hadamard", 576), ("hadamard", 72), ("orthogonal", 72)])
def test_random_rotation_is_orthogonal_and_seeded(kind, n):
    q = random_rotation(n, kind, seed=3)
    torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(q, random_rotation(n, kind, seed=3), rtol=0, atol=0)
    assert not torch.equal(q, random_rotation(n, kind, seed=4))


def _non_unit_norms(model):
    """Random norm gains, so that folding them into the next layers is exercised."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) + 0.5)
    return model


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
@pytest.mark.parametrize("tie", [True, False])
def test_rotated_model_computes_the_same_function(kind, tie):
    model = _non_unit_norms(make_llama(seed=2, hidden=48, tie=tie)).double()
    rotated = _non_unit_norms(make_llama(seed=2, hidden=48, tie=tie)).double()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    rotate_model(rotated, kind)
    with torch.no_grad():
        torch.testing.assert_close(rotated(ids).logits, model(ids).logits, rtol=0, atol=1e-5)  # RMSNorm computes in fp32
    # the blocks' weights did change and every norm gain is now 1; the embedding and the head (still one tensor
    # when tied) are untouched: the stream is rotated where it enters and leaves
    assert not torch.allclose(rotated.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    assert all(float((p - 1).abs().max()) == 0 for n, p in rotated.named_parameters() if n.endswith("norm.weight"))
    assert (rotated.lm_head.weight is rotated.model.embed_tokens.weight) == tie
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert torch.equal(rotated.get_parameter(name), model.get_parameter(name))
    assert torch.equal(rotated.model.atq_rotation.gain.double(), model.model.norm.weight.float().double())
    q = rotated.model.atq_rotation.matrix.double()
    torch.testing.assert_close(q @ q.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-6)


def test_folded_stream_is_the_same_function_without_hooks():
    """What llama.cpp gets: Q folded into an untied embedding and head, the final gain into the head."""
    from atq.rotation import folded_stream

    model = _non_unit_norms(make_llama(seed=2, hidden=48, tie=True)).double()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits
        rotate_model(model, "hadamard")
        embedding, head, gain = folded_stream(model)
    plain = make_llama(seed=2, hidden=48, tie=False).double()
    with torch.no_grad():
        for name, value in model.state_dict().items():
            if "layers." in name:
                plain.get_parameter(name).copy_(value)
        plain.model.embed_tokens.weight.copy_(embedding)
        plain.lm_head.weight.copy_(head)
        plain.model.norm.weight.copy_(gain)
        torch.testing.assert_close(plain(ids).logits, expected, rtol=0, atol=1e-5)


def test_rotation_refuses_what_it_cannot_rotate(tiny_gpt2, tiny_llama):
    with pytest.raises(ValueError, match="RMSNorm|Llama-family"):
        rotate_model(tiny_gpt2, "hadamard")
    with pytest.raises(ValueError, match="rotation must be one of"):
        rotate_model(tiny_llama, "spin")
    rotated = make_llama(seed=4)
    rotate_model(rotated, "hadamard")
    with pytest.raises(ValueError, match="already rotated"):
        rotate_model(rotated, "hadamard")
    quantize(tiny_llama, QuantConfig())
    with pytest.raises(ValueError, match="rotate before quantizing"):
        check_rotatable(tiny_llama)


@pytest.mark.parametrize("build", ["llama", "gemma3"])
def test_quantize_with_rotation_round_trips(tmp_path, char_tokenizer, build):
    """Gemma's post-norm hooks come back with the artifact too (loading attaches them as quantizing did)."""
    make = {"llama": make_llama, "gemma3": make_gemma3}[build]
    model, original = make(seed=3), make(seed=3)
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(rotation="hadamard", group_size=16)
    report = quantize(model, config, calibration=windows)
    # the report's error is measured against the rotated FP weights, the ones that were ternarised
    assert all(row["rel_error"] < 1.0 for row in report if row["precision"] == "ternary")
    save_quantized(model, tmp_path / "artifact", char_tokenizer, dtype="float32")
    loaded = load_quantized(tmp_path / "artifact")
    with torch.no_grad():
        torch.testing.assert_close(loaded(windows).logits, model(windows).logits, rtol=0, atol=0)
        # and it is still close to the original FP model's function: ternary error, not a broken rotation
        drift = (model(windows).logits - original(windows).logits).abs().mean()
        assert float(drift) < float(original(windows).logits.abs().mean())
    assert loaded.atq_config.rotation == "hadamard"
    form = {"llama": "stream", "gemma3": "inputs"}[build]
    assert loaded.model.atq_rotation.form == form
    # a file of an earlier ATQ has no rotation_form: a Llama one (the stream form) loads as before, a Gemma one
    # (the stream form too, broken there) is refused
    from atq.io import ArtifactError

    from .bad_inputs import edit_config

    config = json.loads((tmp_path / "artifact" / "config.json").read_text())
    config["quantization_config"].pop("rotation_form")
    (tmp_path / "artifact" / "config.json").write_text(json.dumps(config))
    edit_config(tmp_path / "artifact", rewrite_checksums=True)
    if build == "llama":
        with torch.no_grad():
            assert torch.equal(load_quantized(tmp_path / "artifact")(windows).logits, model(windows).logits)
    else:
        with pytest.raises(ArtifactError, match="rotation_form is 'stream' but this model takes the 'inputs' form "
                                                ".* quantize the source model again"):
            load_quantized(tmp_path / "artifact")


def test_quantize_refuses_rotation_of_gpt2_before_touching_it(tiny_gpt2):
    before = {k: v.clone() for k, v in tiny_gpt2.state_dict().items()}
    with pytest.raises(ValueError, match="Llama-family"):
        quantize(tiny_gpt2, QuantConfig(rotation="orthogonal"))
    after = tiny_gpt2.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rotated_base_model_takes_positional_and_keyword_inputs():
    """The entry hook turns input_ids into rotated embeddings however the base model is called."""
    model, rotated = make_llama(seed=2, hidden=48).double(), make_llama(seed=2, hidden=48).double()
    rotate_model(rotated, "hadamard")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = model.model(ids, mask).last_hidden_state
        for hidden in (rotated.model(ids, mask).last_hidden_state, rotated.model(input_ids=ids, attention_mask=mask)
                       .last_hidden_state, rotated.model(inputs_embeds=rotated.model.embed_tokens(ids)).last_hidden_state):
            torch.testing.assert_close(hidden, expected, rtol=0, atol=1e-5)


def test_the_stream_rotation_stays_fp32_under_bf16_autocast():
    """End-to-end tuning and QAT run under bf16 autocast on a GPU; the residual stream must still enter and leave
    the rotated basis exactly (as an E·Q table would), not rounded to bf16. Reference: the rotation in float64."""
    model = make_llama(seed=2, hidden=64)
    rotate_model(model, "hadamard")
    rotation = model.model.atq_rotation
    hidden = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(0))
    for transpose in (False, True):
        matrix = rotation.matrix.double().T if transpose else rotation.matrix.double()
        expected = hidden.double() @ matrix * (rotation.gain.double() if transpose else 1.0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = rotation.apply(hidden, transpose=transpose)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


def test_the_stream_enters_as_the_folded_table_bit_for_bit():
    """Calibration must see the inputs a model with the rotation folded into its embedding sees (the GGUF, and
    ATQ before the stream rotation): the rows of E·Q taken in float64 and rounded once. An fp32 product differs
    by ~1e-7, enough to flip GPTQ rounding decisions (the one-plane SmolLM2 recipe moved by 4-5% on a GPU).
    Hidden width 576 (SmolLM2's), where 1/sqrt(576) is inexact in fp32. Reference: folded_stream's table."""
    model = make_llama(seed=3, hidden=576)  # 4 heads of 144
    rotate_model(model, "hadamard")
    ids = torch.tensor([[0, 5, 17, 31, 63, 7]])
    table = folded_stream(model)[0]
    captured = {}
    layer = model.model.layers[0]
    layer.register_forward_pre_hook(
        lambda module, args, kwargs: captured.update(x=args[0] if args else kwargs["hidden_states"]), with_kwargs=True)
    model(ids)
    entered, expected = captured["x"], table[ids]
    differ = entered != expected  # float64 results one rounding tie apart may round to neighbouring floats
    assert differ.float().mean() < 1e-3, f"{int(differ.sum())} of {differ.numel()} entries differ"
    ulp = torch.finfo(torch.float32).eps * expected.abs()
    assert ((entered - expected).abs() <= ulp).all()


def make_gemma3(seed: int = 2, hidden: int = 48):
    """A tiny Gemma 3 with norm weights away from 0 (Gemma scales by 1 + w), so folding them is exercised."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, sliding_window=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(torch.rand(parameter.shape, generator=generator) - 0.5)
    return model.eval()


def test_a_rotated_gemma3_computes_the_same_function():
    """Gemma is rotated in the inputs form: the readers become W·Q and each pre-norm's output (gain kept) is
    rotated by a hook; the stream, the writers, the norms and the embedding stay as they are."""
    model, rotated = make_gemma3().double(), make_gemma3().double()
    rotate_model(rotated, "hadamard")
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # float64 with the float64 Q: equal but for the order of float64 sums
        torch.testing.assert_close(rotated(ids).logits, model(ids).logits, rtol=0, atol=1e-12)
    assert rotated.model.atq_rotation.form == "inputs"
    q = rotated.model.atq_rotation.matrix.double()
    before, after = model.model.layers[0], rotated.model.layers[0]
    for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj"):  # W·Q, no gain folded
        torch.testing.assert_close(after.get_submodule(name).weight, before.get_submodule(name).weight @ q,
                                   rtol=0, atol=1e-6)
    torch.testing.assert_close(after.mlp.down_proj.weight, before.mlp.down_proj.weight, rtol=0, atol=0)
    for name in ("input_layernorm", "pre_feedforward_layernorm", "post_attention_layernorm",
                 "post_feedforward_layernorm"):  # every gain stays in its norm
        assert torch.equal(after.get_submodule(name).weight, before.get_submodule(name).weight)
    assert torch.equal(rotated.model.norm.weight, model.model.norm.weight)
    assert torch.equal(rotated.model.embed_tokens.weight, model.model.embed_tokens.weight)
    from atq.rotation import folded_stream

    with pytest.raises(ValueError, match="post-norms .* at run time"):
        folded_stream(rotated)


def test_gemma3_rotation_keeps_zero_gains_in_the_norm():
    """Why the inputs form: a pre-norm gain of exactly 0 (Gemma 3 270M silences its massive-activation channels
    so) stays in the norm, so whatever that channel carries never reaches the ternary weights (folded into them,
    as the stream form does, its zero must be reproduced by ternary codes, which they cannot). Planted: 1 + w = 0
    on channel 5 of layer 0's input norm; q_proj's input, un-rotated, is 0 on channel 5."""
    model = make_gemma3().double()
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[5] = -1.0
    rotate_model(model, "hadamard")
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        model(torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(4)))
    unrotated = seen[0] @ model.model.atq_rotation.matrix.double().T
    assert float(unrotated[..., 5].abs().max()) < 1e-6 * float(unrotated.abs().max())
    assert float(unrotated[..., 4].abs().max()) > 0.01 * float(unrotated.abs().max())


def test_gemma3_input_rotation_keeps_a_float64_model_in_float64():
    """The input hook of a float64 model takes its product in float64 with the float64 Q the weights were rotated
    by, so the rotated model is the original's function exactly (an fp32 product, or the fp32-rounded Q, is ~1e-7
    off)."""
    rotated = make_gemma3().double()
    rotate_model(rotated, "hadamard")
    norm = rotated.model.layers[0].pre_feedforward_layernorm
    hidden = torch.randn(2, 5, 48, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hooked = norm(hidden)
        norm._forward_hooks.clear()
        expected = norm(hidden) @ random_rotation(48, "hadamard", 0)
    assert hooked.dtype == torch.float64
    torch.testing.assert_close(hooked, expected, rtol=0, atol=1e-12)
