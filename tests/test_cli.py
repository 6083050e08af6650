import argparse
import json
import os

import pytest

from atq import QuantConfig
from atq.cli import build_parser, main
from atq.flags import config_from_args
from atq.io import ARTIFACT_CONFIG

# The flags users and the README rely on: the generated parser must keep every one of these names.
FLAGS = ["--mode", "--sparsity", "--threshold", "--alpha", "--granularity", "--group-size", "--include", "--exclude",
         "--quantize-head", "--planes", "--packing", "--activations", "--rotation", "--calibration",
         "--calibration-windows", "--calibration-seq-len", "--compensation", "--no-compensation", "--damp",
         "--block-size", "--reconstruct-steps", "--reconstruct-lr", "--reconstruct-target", "--reconstruct-weight-lr",
         "--end-to-end-steps", "--end-to-end-lr", "--fp-fraction", "--sensitivity", "--preset"]
# A value other than the default for every QuantConfig keyword, consistent with each other.
SAMPLE = {"mode": "magnitude", "sparsity": 0.25, "threshold": 0.03, "alpha": 0.9, "granularity": "row",
          "group_size": 32, "include": ["mlp", "attn"], "exclude": ["o_proj"], "quantize_head": True, "planes": 2,
          "packing": "base3", "activations": "int8", "rotation": "hadamard", "calibration": "generated",
          "calibration_windows": 16, "calibration_seq_len": 256, "compensation": False, "damp": 0.05,
          "block_size": 32, "reconstruct_steps": 12, "reconstruct_lr": 2e-3, "reconstruct_target": "block",
          "reconstruct_weight_lr": 1e-5, "end_to_end_steps": 6, "end_to_end_lr": 3e-5, "fp_fraction": 0.1,
          "sensitivity": "measured"}


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
    return config_from_args(build_parser().parse_args(["quantize", *argv]))


def test_every_keyword_has_a_flag_that_parses_like_the_api():
    assert set(SAMPLE) == {keyword.name for keyword in QuantConfig.keywords()}
    assert _parse(_argv(SAMPLE)) == QuantConfig(**SAMPLE)
    assert _parse([]) == QuantConfig()
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


def test_quantize_with_eval_then_eval_the_artifact(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "artifact"
    code = main(["quantize", "--model", str(tiny_model_dir), "--mode", "sparsity", "--sparsity", "0.5",
                 "--group-size", "32", "--out", str(out), "--eval", "--data", str(text_file), "--seq-len", "16",
                 "--device", "cpu", "--quiet"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "perplexity ternary" in printed and "bits per weight" in printed
    meta = json.loads((out / ARTIFACT_CONFIG).read_text())
    assert meta["quant_config"]["group_size"] == 32 and meta["quant_config"]["sparsity"] == 0.5

    result_file = tmp_path / "eval.json"
    code = main(["eval", "--model", str(out), "--data", str(text_file), "--seq-len", "16", "--device", "cpu",
                 "--quiet", "--json", str(result_file)])
    assert code == 0
    result = json.loads(result_file.read_text())
    assert result["ppl"] > 1 and result["windows"] >= 1
    assert f"{result['ppl']:.3f}" in capsys.readouterr().out


def test_seed_preset(tiny_model_dir, tmp_path):
    out = tmp_path / "seed"
    assert main(["quantize", "--model", str(tiny_model_dir), "--preset", "seed", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / ARTIFACT_CONFIG).read_text())["quant_config"]["granularity"] == "tensor"


def test_bad_input_fails_cleanly_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["quantize", "--model", str(tiny_model_dir), "--sparsity", "1.5", "--out", str(out)]) == 2
    assert "QuantConfig.sparsity" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_model_dir), "--eval", "--data", "no-such-data",
                 "--out", str(out)]) == 2
    assert "cannot resolve data source" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tiny_model_dir), "--exclude", ".", "--out", str(out)]) == 2
    assert "no linear layer left" in capsys.readouterr().err
    assert not out.exists()


def test_calibrated_two_plane_mixed_precision_from_the_cli(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "calibrated"
    code = main(["quantize", "--model", str(tiny_model_dir), "--calibration", str(text_file),
                 "--calibration-windows", "4", "--calibration-seq-len", "16", "--planes", "2", "--packing", "base3",
                 "--reconstruct-steps", "5", "--fp-fraction", "0.2", "--rotation", "hadamard",
                 "--end-to-end-steps", "3",
                 "--out", str(out), "--device", "cpu", "--quiet"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((out / ARTIFACT_CONFIG).read_text())
    config = meta["quant_config"]
    assert config["planes"] == 2 and config["calibration"]["source"] == str(text_file)
    assert config["calibration"]["windows"] == 4 and config["reconstruction"]["steps"] == 5
    assert config["rotation"] == "hadamard" and config["end_to_end"]["steps"] == 3
    assert config["mixed_precision"] == {"fp_fraction": 0.2, "sensitivity": "gradient"}
    assert meta["model_config"]["tie_word_embeddings"] is False  # the rotation untied the head
    layers = meta["layers"].values()
    assert sum(layer["precision"] == "fp" for layer in layers) == 1 + round(0.2 * 14)  # head + kept layers
    assert all(layer["packing"] == "base3" and layer["planes"] == 2 for layer in layers if layer["precision"] != "fp")


def test_preset_with_calibration_calibrates(tiny_model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "bitnet"  # the preset used to replace every other flag: these ran uncalibrated
    command = ["quantize", "--model", str(tiny_model_dir), "--preset", "bitnet", "--calibration", str(text_file),
               "--calibration-windows", "2", "--calibration-seq-len", "16", "--out", str(out), "--device", "cpu",
               "--quiet"]
    assert main(command) == 2  # bitnet's one scale per tensor: calibration is refused, no longer dropped
    assert "granularity" in capsys.readouterr().err and not out.exists()
    assert main(command + ["--granularity", "row"]) == 0, capsys.readouterr().err
    config = json.loads((out / ARTIFACT_CONFIG).read_text())["quant_config"]
    assert config["calibration"]["source"] == str(text_file) and config["calibration"]["windows"] == 2
    assert (config["mode"], config["granularity"], config["activations"]) == ("absmean", "row", "int8")


def test_train_from_a_ptq_artifact_then_eval(tiny_model_dir, text_file, tmp_path, capsys):
    ptq = tmp_path / "ptq"
    assert main(["quantize", "--model", str(tiny_model_dir), "--out", str(ptq), "--device", "cpu", "--quiet"]) == 0
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


def test_train_under_torchrun_with_two_cpu_processes(tiny_model_dir, text_file, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "qat"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "atq.cli", "train", "--model", str(tiny_model_dir), "--data", str(text_file), "--windows", "8",
         "--seq-len", "16", "--steps", "2", "--batch-size", "4", "--out", str(out), "--device", "cpu", "--quiet"],
        check=False, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "qat.log.json").read_text())["world_size"] == 2
    assert (out / "atq_config.json").is_file()


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
