import argparse
import json
import math
import os

import pytest
import torch

import atq
from atq import QuantConfig
from atq.cli import build_parser, main
from atq.flags import config_from_args, preset_for_model, preset_name
from atq.io import CHECKSUMS

# The flags users and the README rely on: the generated parser must keep every one of these names.
FLAGS = ["--mode", "--sparsity", "--threshold", "--alpha", "--granularity", "--group-size", "--include", "--exclude",
         "--quantize-head", "--planes", "--packing", "--activations", "--rotation", "--calibration",
         "--calibration-windows", "--calibration-seq-len", "--compensation", "--no-compensation", "--damp",
         "--block-size", "--reconstruct-steps", "--reconstruct-lr", "--reconstruct-target", "--reconstruct-weight-lr",
         "--end-to-end-steps", "--end-to-end-lr", "--fp-fraction", "--sensitivity", "--preset"]
# A value other than the default for every QuantConfig keyword, consistent with each other.
SAMPLE = {"mode": "magnitude", "sparsity": 0.25, "threshold": 0.03, "alpha": 0.9, "granularity": "row",
          "group_size": 32, "include": ["mlp", "attn"], "exclude": ["o_proj"], "quantize_head": True, "planes": 2,
          "packing": "base3", "activations": "int8", "embedding": "q8_0", "rotation": "hadamard", "calibration": "generated",
          "calibration_windows": 16, "calibration_seq_len": 256, "compensation": False, "damp": 0.05,
          "block_size": 32, "reconstruct_steps": 12, "reconstruct_lr": 2e-3, "reconstruct_target": "block",
          "reconstruct_weight_lr": 1e-5, "end_to_end_steps": 6, "end_to_end_lr": 3e-5, "fp_fraction": 0.1,
          "sensitivity": "measured"}


def quantization_config(artifact):
    """The ATQ quantization_config an artifact's config.json holds."""
    return json.loads((artifact / "config.json").read_text())["quantization_config"]

def _argv(keywords: dict) -> list[str]:
    argv = []
    for name, value in keywords.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag[2:])
        else:
            argv += [flag, *map(str, value)] if isinstance(value, list) else [flag, str(value)]
    return argv


def _parse(argv: list[str]) -> QuantConfig:
    """The config of ``atq quantize ARGV`` on the data-free base (a --preset in ARGV comes later and wins)."""
    return config_from_args(build_parser().parse_args(["quantize", "--preset", "data-free", *argv]))


def test_every_keyword_has_a_flag_that_parses_like_the_api():
    assert set(SAMPLE) == {keyword.name for keyword in QuantConfig.keywords()}
    assert _parse(_argv(SAMPLE)) == QuantConfig(**SAMPLE)
    assert _parse([]) == QuantConfig()  # the data-free preset is today's default config
    options = {o for a in build_parser()._subparsers._group_actions[0].choices["quantize"]._actions
               for o in a.option_strings}
    assert set(FLAGS) <= options


@pytest.mark.parametrize("keyword", sorted(SAMPLE))
def test_each_flag_alone_parses_like_its_keyword(keyword):
    stage = next(k.stage for k in QuantConfig.keywords() if k.name == keyword)
    switch = {"calibration": "calibration", "reconstruction": "reconstruct_steps", "end_to_end": "end_to_end_steps",
              "mixed_precision": "fp_fraction"}.get(stage, keyword)
    keywords = {switch: SAMPLE[switch], keyword: SAMPLE[keyword]}
    assert _parse(_argv(keywords)) == QuantConfig(**keywords)


def test_preset_is_the_base_that_the_given_flags_override(text_file):
    calibrated = _parse(["--preset", "bitnet", "--calibration", str(text_file), "--calibration-windows", "8"])
    assert calibrated == QuantConfig.bitnet().replace(calibration=str(text_file), calibration_windows=8)
    assert calibrated.calibration.source == str(text_file) and calibrated.activations == "int8"
    assert _parse(["--preset", "seed", "--granularity", "row"]) == QuantConfig.seed().replace(granularity="row")
    assert _parse(["--preset", "seed"]) == QuantConfig.seed()
    assert _parse(["--no-compensation", "--calibration", "generated"]).calibration.compensation is False
    with pytest.raises(ValueError, match="calibration_windows sets the calibration stage"):
        _parse(["--calibration-windows", "8"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--mode", "bogus"])
    assert isinstance(build_parser().parse_args(["quantize"]), argparse.Namespace)


def _rows(printed: str) -> dict[str, str]:
    """The CLI's markdown table as {what: value} (``| what | value |`` rows; a key may hold ``||``)."""
    return dict(line[2:-2].split(" | ", 1) for line in printed.splitlines()
                if line.startswith("| ") and line.endswith(" |") and " | " in line[2:-2])


def test_quantize_json_equals_the_printed_table_and_the_api(tiny_model_dir, text_file, tmp_path, capsys):
    out, run_file = tmp_path / "artifact", tmp_path / "run.json"
    code = main(["quantize", "--model", str(tiny_model_dir), "--preset", "data-free", "--mode", "sparsity",
                 "--sparsity", "0.5", "--group-size", "32", "--out", str(out), "--eval", "--data", str(text_file),
                 "--seq-len", "16", "--device", "cpu", "--quiet", "--json", str(run_file)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    rows, run = {k.strip(): v for k, v in _rows(printed).items()}, json.loads(run_file.read_text())
    assert "preset data-free, device cpu" in printed.splitlines()[0]  # said before any work

    # the reference: the FP model and the saved artifact, each loaded and evaluated on its own through the API
    fp_model, tokenizer = atq.load_model(str(tiny_model_dir))
    fp = atq.evaluate(fp_model, tokenizer, str(text_file), seq_len=16, quiet=True)
    ternary = atq.evaluate(atq.load_model(str(out))[0], tokenizer, str(text_file), seq_len=16, quiet=True)
    assert run["ppl_fp"] == pytest.approx(fp["ppl"], rel=1e-9)
    assert run["ppl_ternary"] == pytest.approx(ternary["ppl"], rel=1e-9)
    assert f"{ternary['ppl']:.2f}" != f"{fp['ppl']:.2f}"  # the two can be told apart at the printed precision
    assert rows["perplexity ternary (the saved artifact)"] == f"{ternary['ppl']:.2f}"
    assert rows[f"perplexity FP ({text_file}, {fp['windows']}x16)"] == f"{fp['ppl']:.2f}"
    tokens = len(tokenizer(text_file.read_text(), return_tensors="pt").input_ids[0])
    assert run["windows"] == fp["windows"] == tokens // 16

    # sizes from first principles: 2-bit codes (a row padded to whole bytes) and one fp16 scale per group of 32
    shapes = [(m.out_features, m.in_features) for n, m in fp_model.named_modules()
              if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    bits = sum(rows_ * (8 * math.ceil(columns / 4) + 16 * math.ceil(columns / 32)) for rows_, columns in shapes)
    assert run["bits_per_weight"] == pytest.approx(bits / sum(r * c for r, c in shapes), rel=1e-12)
    assert run["artifact_bytes"] == sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    assert run["recipe"] == {"preset": "data-free",
                             "config": QuantConfig(mode="sparsity", sparsity=0.5, group_size=32).to_dict()}
    assert run["device"] == "cpu" and run["data"] == str(text_file) and run["seq_len"] == 16
    assert 0 < run["quantize_seconds"] <= run["total_seconds"]
    assert rows["quantize time"] == f"{run['quantize_seconds']:.1f} s"

    eval_file = tmp_path / "eval.json"
    code = main(["eval", "--model", str(out), "--data", str(text_file), "--seq-len", "16", "--device", "cpu",
                 "--quiet", "--json", str(eval_file)])
    assert code == 0
    assert json.loads(eval_file.read_text())["ppl"] == pytest.approx(ternary["ppl"], rel=1e-9)


def test_quantize_json_without_eval_has_null_perplexities(tiny_model_dir, tmp_path, capsys):
    run_file = tmp_path / "run.json"
    assert main(["quantize", "--model", str(tiny_model_dir), "--preset", "seed", "--out", str(tmp_path / "a"),
                 "--device", "cpu", "--quiet", "--json", str(run_file)]) == 0
    run = json.loads(run_file.read_text())
    assert (run["ppl_fp"], run["ppl_ternary"], run["windows"]) == (None, None, None)
    assert run["recipe"] == {"preset": "seed", "config": QuantConfig.seed().to_dict()}
    assert "perplexity" not in capsys.readouterr().out


def test_default_preset_follows_the_device():
    gpu = QuantConfig(calibration="wikitext2_valid", planes=2, packing="base3", group_size=128, rotation="hadamard",
                      reconstruct_steps=256, end_to_end_steps=128, embedding="q8_0")
    cpu = QuantConfig(calibration="wikitext2_valid", calibration_windows=16, calibration_seq_len=512, planes=2,
                      packing="base3", group_size=128, rotation="hadamard", embedding="q8_0")
    parse = build_parser().parse_args
    for argv, preset, config in [(["--device", "cuda"], "gpu", gpu), (["--device", "cuda:1"], "gpu", gpu),
                                 (["--device", "cpu"], "cpu", cpu), (["--preset", "cpu", "--device", "cuda"], "cpu", cpu),
                                 (["--preset", "data-free"], "data-free", QuantConfig())]:
        args = parse(["quantize", *argv])
        assert (preset_name(args), config_from_args(args)) == (preset, config)
    auto = parse(["quantize"])
    assert config_from_args(auto) == (gpu if torch.cuda.is_available() else cpu)
    assert config_from_args(parse(["quantize", "--device", "cpu", "--calibration-windows", "4"])) == cpu.replace(
        calibration_windows=4)
    with pytest.raises(ValueError, match=r"planes must be 1 .* on top of --preset cpu; --preset data-free"):
        config_from_args(parse(["quantize", "--device", "cpu", "--mode", "sparsity"]))  # calibrated, two planes


def test_a_presets_rotation_and_embedding_blocks_are_dropped_where_the_model_cannot_take_them(tiny_gpt2, capsys):
    from .conftest import make_llama

    args = build_parser().parse_args(["quantize", "--device", "cpu"])
    config = config_from_args(args)
    assert config.rotation == "hadamard" and config.embedding == "q8_0"
    assert preset_for_model(config, make_llama(hidden=64), args) is config
    assert preset_for_model(config, make_llama(hidden=72), args) == config.replace(embedding="fp")  # 72 % 32
    assert "q8_0 embedding is off" in capsys.readouterr().out
    assert preset_for_model(config, tiny_gpt2, args) == config.replace(rotation=None, embedding="fp")
    assert "rotation is off" in capsys.readouterr().out
    given = build_parser().parse_args(["quantize", "--device", "cpu", "--rotation", "hadamard", "--embedding", "q8_0"])
    assert preset_for_model(config, tiny_gpt2, given) is config  # asked for by name: quantize refuses it


def test_seed_preset(tiny_model_dir, tmp_path):
    out = tmp_path / "seed"
    assert main(["quantize", "--model", str(tiny_model_dir), "--preset", "seed", "--out", str(out), "--quiet"]) == 0
    assert quantization_config(out)["recipe"]["granularity"] == "tensor"


def test_bad_input_fails_cleanly_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["quantize", "--model", str(tiny_model_dir), "--sparsity", "1.5", "--out", str(out)]) == 2  # auto
    assert "QuantConfig.sparsity" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_model_dir), "--eval", "--data", "no-such-data",
                 "--out", str(out)]) == 2
    assert "cannot resolve data source" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_model_dir), "--preset", "data-free", "--exclude", ".",
                 "--out", str(out)]) == 2
    assert "no linear layer left" in capsys.readouterr().err
    assert not out.exists()


def test_calibrated_two_plane_mixed_precision_from_the_cli(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "calibrated"
    code = main(["quantize", "--model", str(tiny_model_dir), "--preset", "data-free", "--calibration", str(text_file),
                 "--calibration-windows", "4", "--calibration-seq-len", "16", "--planes", "2", "--packing", "base3",
                 "--reconstruct-steps", "5", "--fp-fraction", "0.2", "--rotation", "hadamard",
                 "--end-to-end-steps", "3",
                 "--out", str(out), "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = quantization_config(out)
    config = meta["recipe"]
    assert config["planes"] == 2 and config["calibration"]["source"] == str(text_file)
    assert config["calibration"]["windows"] == 4 and config["reconstruction"]["steps"] == 5
    assert config["rotation"] == "hadamard" and config["end_to_end"]["steps"] == 3
    assert config["mixed_precision"] == {"fp_fraction": 0.2, "sensitivity": "gradient"}
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True  # the rotation keeps it
    assert meta["rotation"] == "hadamard" and len(meta["fp_layers"]) == 1 + round(0.2 * 14)  # head + kept layers
    assert len(meta["modules"]) == 14 - round(0.2 * 14)
    assert all(layer["packing"] == "base3" and layer["planes"] == 2 for layer in meta["modules"].values())


def test_preset_with_calibration_calibrates(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "bitnet"  # the preset used to replace every other flag: these ran uncalibrated
    command = ["quantize", "--model", str(tiny_model_dir), "--preset", "bitnet", "--calibration", str(text_file),
               "--calibration-windows", "2", "--calibration-seq-len", "16", "--out", str(out), "--device", "cpu",
               "--quiet"]
    assert main(command) == 2  # bitnet's one scale per tensor: calibration is refused, no longer dropped
    assert "granularity" in capsys.readouterr().err and not out.exists()
    assert main(command + ["--granularity", "row"]) == 0, capsys.readouterr().err
    config = quantization_config(out)["recipe"]
    assert config["calibration"]["source"] == str(text_file) and config["calibration"]["windows"] == 2
    assert (config["mode"], config["granularity"], config["activations"]) == ("absmean", "row", "int8")


def test_train_from_a_ptq_artifact_then_eval(tiny_model_dir, text_file, tmp_path, capsys):
    ptq = tmp_path / "ptq"
    assert main(["quantize", "--model", str(tiny_model_dir), "--preset", "data-free", "--out", str(ptq), "--device",
                 "cpu", "--quiet"]) == 0
    out = tmp_path / "qat"
    code = main(["train", "--model", str(tiny_model_dir), "--init", str(ptq), "--data", str(text_file),
                 "--windows", "8", "--seq-len", "16", "--steps", "4", "--batch-size", "2", "--checkpoint-every", "2",
                 "--out", str(out), "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "loss first / last" in capsys.readouterr().out
    assert (tmp_path / "qat.ckpt" / "train_state.pt").is_file()
    assert main(["eval", "--model", str(out), "--data", str(text_file), "--seq-len", "16", "--device", "cpu",
                 "--quiet"]) == 0


def test_train_data_free_in_timed_segments_with_learned_scales(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "qat"
    command = ["train", "--model", str(tiny_model_dir), "--data", "generated", "--windows", "4", "--seq-len", "12",
               "--steps", "3", "--batch-size", "2", "--checkpoint-every", "0", "--learned-scales",
               "--dead-zone-bias", "--out", str(out), "--device", "cpu", "--quiet"]
    assert main(command + ["--minutes", "0"]) == 0  # the budget ends the first segment after one step
    assert "time budget spent at step 1/3" in capsys.readouterr().out and not out.exists()
    assert (tmp_path / "qat.tokens.safetensors").is_file()  # generated once, reused by the next segment
    assert main(command) == 0
    assert "loss first / last" in capsys.readouterr().out
    log = json.loads((tmp_path / "qat.log.json").read_text())
    assert [h["step"] for h in log["history"]] == [0, 1, 2]
    assert main(["eval", "--model", str(out), "--data", str(tiny_model_dir / "tokenizer.json"), "--seq-len", "8",
                 "--max-windows", "2", "--device", "cpu", "--quiet"]) == 0


def test_train_mixes_generated_windows_with_a_text(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "mixed"
    assert main(["train", "--model", str(tiny_model_dir), "--data", f"generated+{text_file}", "--windows", "3",
                 "--seq-len", "12", "--steps", "2", "--batch-size", "2", "--checkpoint-every", "0", "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    assert "6x12" in capsys.readouterr().out  # three windows from each source
    assert (tmp_path / "mixed.tokens.safetensors").is_file()
    assert main(["train", "--model", str(tiny_model_dir), "--data", "generated+missing.txt", "--out",
                 str(tmp_path / "bad"), "--device", "cpu", "--quiet"]) == 2  # refused before any model loads
    assert "missing.txt" in capsys.readouterr().err and not list(tmp_path.glob("bad*"))


CALIBRATION = "\n".join(" ".join(["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "."][i:] +
                                  ["a", "fox", "and", "a", "dog", "."][: i + 1]) for i in range(6))


def test_train_mixes_calibration_text_and_prompted_generated_text_in_a_share(tiny_model_dir, tmp_path, capsys,
                                                                           monkeypatch):
    """``--data mix --generated-fraction 0.5``: half the windows cut from the calibration text, half generated
    from its paragraph openings with the sampling flags (recorded in the cache), trained with CAKLD."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    from atq import qat
    from atq.data import text_prompts, token_windows

    (tmp_path / "calibration.txt").write_text(CALIBRATION)
    seen = []
    real = qat.train
    monkeypatch.setattr(qat, "train", lambda student, windows, *a, **k: seen.append(windows) or real(
        student, windows, *a, **k))
    out = tmp_path / "mixed"
    assert main(["train", "--model", str(tiny_model_dir), "--data", "mix", "--generated-fraction", "0.5",
                 "--calibration", str(tmp_path / "calibration.txt"), "--windows", "4", "--seq-len", "8", "--steps", "2",
                 "--batch-size", "2", "--checkpoint-every", "0", "--greedy-tokens", "2", "--temperature", "0.7",
                 "--top-p", "0.9", "--prompts-from-calibration", "3", "--loss", "cakld", "--confidence", "data",
                 "--out", str(out), "--device", "cpu", "--quiet"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "4x8" in printed and "cakld (confidence 0." in printed
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    calibration = token_windows(tokenizer, CALIBRATION, 8)
    prompts = text_prompts(tokenizer, CALIBRATION, 2, 3)
    (windows,) = seen
    generated = [row for row in windows if not any(torch.equal(row, window) for window in calibration[:2])]
    assert len(windows) == 4 and len(generated) == 2  # two windows of the text, two generated ones ...
    assert sorted(row[:3].tolist() for row in generated) == sorted(prompts.tolist())  # ... continuing its openings
    with safe_open(str(tmp_path / "mixed.tokens.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert (meta["windows"], meta["greedy_tokens"], meta["temperature"], meta["top_p"]) == ("2", "2", "0.7", "0.9")
    assert meta["prompts"].startswith("2x3 sha256:")
    config = json.loads((tmp_path / "mixed.log.json").read_text())["config"]
    assert config["loss"] == "cakld" and 0 < config["confidence"] <= 1
    assert main(["train", "--model", str(tiny_model_dir), "--data", "mix", "--generated-fraction", "0",
                 "--calibration", str(tmp_path / "calibration.txt"), "--windows", "4", "--seq-len", "8", "--steps", "1",
                 "--batch-size", "2", "--out", str(tmp_path / "text"), "--device", "cpu", "--quiet"]) == 0
    assert not (tmp_path / "text.tokens.safetensors").exists()  # calibration text only: nothing generated


@pytest.mark.parametrize("mode", [[], ["--shard", "--learned-scales"]], ids=["data-parallel", "sharded"])
def test_train_under_torchrun_with_two_cpu_processes(tiny_model_dir, text_file, tmp_path, mode):
    import subprocess
    import sys

    out = tmp_path / "qat"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "atq.cli", "train", "--model", str(tiny_model_dir), "--data", str(text_file), "--windows", "8",
         "--seq-len", "16", "--steps", "2", "--batch-size", "4", "--out", str(out), "--device", "cpu", "--quiet",
         *mode],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "qat.log.json").read_text())["world_size"] == 2
    assert (out / CHECKSUMS).is_file() and atq.load_quantized(out) is not None
    assert any((tmp_path / "qat.ckpt").glob("*.distcp")) == bool(mode)  # the sharded run saved shards


def test_train_shard_needs_two_processes(tiny_model_dir, text_file, tmp_path, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(text_file), "--windows", "8", "--seq-len",
                 "16", "--steps", "1", "--out", str(tmp_path / "q"), "--device", "cpu", "--quiet", "--shard"]) == 2
    assert "at least two processes" in capsys.readouterr().err and not list(tmp_path.glob("q*"))


def test_experiment_wrappers_pass_options_through():
    import importlib.util
    from pathlib import Path

    for name, model in [("gpt2", "gpt2"), ("tinyllama", "TinyLlama/TinyLlama-1.1B-Chat-v1.0")]:
        path = Path(__file__).resolve().parents[1] / "experiments" / f"train_atq_{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        assert module.argv(["--out", "x"]) == ["train", "--model", model, "--data", "generated", "--learned-scales",
                                               "--out", "x"]
        assert module.argv(["--model", "local", "--data", "f.txt"]) == ["train", "--learned-scales", "--model",
                                                                         "local", "--data", "f.txt"]


def test_export_bitnet_artifact_to_transformers_and_refuse_gguf_without_bpe(tiny_model_dir, tmp_path, capsys):
    artifact = tmp_path / "bitnet"
    assert main(["quantize", "--model", str(tiny_model_dir), "--preset", "bitnet", "--out", str(artifact),
                 "--device", "cpu", "--quiet"]) == 0
    assert main(["export", "--model", str(artifact), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert "transformers bitnet" in capsys.readouterr().out
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    # the tiny model's word-level tokenizer has no GGUF form: a clear error, no file
    assert main(["export", "--model", str(artifact), "--format", "gguf", "--out", str(tmp_path / "m.gguf")]) == 2
    assert "BPE" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()
    assert main(["export", "--model", str(tiny_model_dir), "--format", "hf", "--out", str(tmp_path / "x")]) == 2
    assert "not an ATQ artifact" in capsys.readouterr().err


CHAT_TEMPLATE = ("{% for m in messages %}w1 {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}w2{% endif %}")


def _word_model_dir(directory, seed: int):
    """A tiny Llama whose 256 token ids are the words w0 .. w255 (every generated id decodes to a visible word),
    with a chat template that wraps a user turn as ``w1 <content> w2`` and no end-of-sequence token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={f"w{i}": i for i in range(256)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture
def word_artifact(tmp_path):
    """(FP model dir, its data-free ATQ artifact made by the CLI)."""
    fp_dir, out = _word_model_dir(tmp_path / "fp", seed=3), tmp_path / "atq"
    assert main(["quantize", "--model", str(fp_dir), "--preset", "data-free", "--group-size", "32", "--out", str(out),
                 "--device", "cpu", "--quiet"]) == 0
    return fp_dir, out


def _greedy(model, tokenizer, text: str, new_tokens: int, **sampling) -> str:
    """The reference: one generate() call on the prompt's ids, its new tokens decoded."""
    ids = tokenizer(text, return_tensors="pt").input_ids
    sampling = sampling or {"do_sample": False}
    tokens = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, **sampling)
    return tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True)


def _answers(printed: str) -> dict[str, str]:
    """``=== heading ===`` sections of ``atq generate``'s output: {heading: the streamed text}."""
    answers, heading = {}, None
    for line in printed.splitlines():
        if line.startswith("=== ") and line.endswith(" ==="):
            heading = line[4:-4]
            answers[heading] = []
        elif heading is not None:
            answers[heading].append(line)
    return {h: "\n".join(lines).strip("\n") for h, lines in answers.items()}


def test_generate_streams_the_greedy_answer_under_the_chat_template(word_artifact, capsys):

    _, out = word_artifact
    model, tokenizer = atq.load_model(str(out))
    templated = _greedy(model, tokenizer, "w1 w7 w9 w2", 12)  # the template applied by hand
    plain = _greedy(model, tokenizer, "w7 w9", 12)
    assert len(templated.split()) == 12 and templated != plain
    for flags, expected in [([], templated), (["--no-chat-template"], plain)]:
        assert main(["generate", "--model", str(out), "--prompt", "w7 w9", "--max-new-tokens", "12",
                     "--device", "cpu", *flags]) == 0
        assert _answers(capsys.readouterr().out) == {f"ternary: {out}": expected}


def test_generate_samples_reproducibly_with_temperature_and_top_p(word_artifact, capsys):
    _, out = word_artifact
    model, tokenizer = atq.load_model(str(out))
    torch.manual_seed(5)
    expected = _greedy(model, tokenizer, "w1 w7 w2", 10, do_sample=True, temperature=1.5, top_p=0.9, top_k=None)
    command = ["generate", "--model", str(out), "--prompt", "w7", "--max-new-tokens", "10", "--temperature", "1.5",
               "--top-p", "0.9", "--seed", "5", "--device", "cpu"]
    assert main(command) == 0
    sampled = _answers(capsys.readouterr().out)[f"ternary: {out}"]
    assert sampled == expected and sampled != _greedy(model, tokenizer, "w1 w7 w2", 10)


def test_generate_compare_prints_the_fp_answer_after_the_ternary_one(word_artifact, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fp_dir, out = word_artifact
    tokenizer = AutoTokenizer.from_pretrained(fp_dir)
    ternary = _greedy(atq.load_model(str(out))[0], tokenizer, "w1 w4 w2", 10)
    fp = _greedy(AutoModelForCausalLM.from_pretrained(fp_dir), tokenizer, "w1 w4 w2", 10)
    other_dir = _word_model_dir(tmp_path / "other", seed=4)
    other = _greedy(AutoModelForCausalLM.from_pretrained(other_dir), tokenizer, "w1 w4 w2", 10)
    assert len({ternary, fp, other}) == 3
    command = ["generate", "--model", str(out), "--prompt", "w4", "--max-new-tokens", "10", "--device", "cpu",
               "--compare"]
    assert main(command) == 0  # the FP model is the source the artifact records
    printed = capsys.readouterr().out
    assert _answers(printed) == {f"ternary: {out}": ternary, f"FP: {fp_dir}": fp}
    assert printed.index(f"=== FP: {fp_dir} ===") > printed.index(ternary)
    assert main(command + ["--fp-model", str(other_dir)]) == 0
    assert _answers(capsys.readouterr().out) == {f"ternary: {out}": ternary, f"FP: {other_dir}": other}


def test_generate_refuses_bad_options_before_loading(word_artifact, tmp_path, capsys):
    fp_dir, _ = word_artifact
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "w4", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err  # not the missing model: options are checked first
    assert main(["generate", "--model", str(fp_dir), "--prompt", "w4", "--compare", "--device", "cpu"]) == 2
    assert "--fp-model" in capsys.readouterr().err
