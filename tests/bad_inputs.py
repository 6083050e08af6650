"""The bad-input table: one row a thing a new (or careless) user will do, run through the API or the CLI, and the
error it must end in: the exception type and a fragment of its message (a regular expression, searched) that
names the input and, where there is one, the fix. ``after`` checks what must still hold afterwards (nothing
written, nothing lost). tests/test_bad_inputs.py runs every row on the tiny models of conftest.py.

Rows marked ``cli=True`` run ``atq ...`` through ``atq.cli.main`` and expect exit code 2 with one line on
stderr (``CliExit``); they are written against the CLI of this commit and may need adapting to a rewritten one.
Rows with ``pending`` need a fix outside the code this suite came with (the reason says where); they run as
strict xfail, so the day the fix lands they fail until the marker is removed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atq import ArtifactError, QuantConfig, load_model, load_quantized, quantize, save_quantized
from atq.data import DataError, generated_windows, load_text, mixed_windows, text_prompts, token_windows
from atq.evaluate import evaluate_windows, perplexity
from atq.export.gguf import ExportError, export_gguf
from atq.export.hf import export_hf
from atq.io import write_checksums
from atq.qat import TrainConfig, prepare_qat, train

from .conftest import CharTokenizer, make_gpt2, make_llama, make_word_tokenizer

ARTIFACT_FILES = ["model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                  "tokenizer_config.json", "atq_checksums.json"]


class CliExit(Exception):
    """``atq ...`` ended with a non-zero exit code; the message is ``exit CODE: <the last line of stderr>``
    (progress bars and log lines may come before it), ``stderr`` all of it."""

    def __init__(self, code: int, stderr: str) -> None:
        lines = stderr.strip().splitlines() or [""]
        super().__init__(f"exit {code}: {lines[-1]}")
        self.stderr = stderr


@dataclass(frozen=True)
class Row:
    name: str
    run: Callable[[Case], Any]
    error: type[BaseException]
    match: str
    after: Callable[[Case], None] | None = None
    cli: bool = False
    pending: str | None = None
    skip: str | None = None


@dataclass
class Case:
    """What a row runs in: a fresh directory, pytest's monkeypatch, and the pristine files it may copy."""

    tmp: Path
    monkeypatch: Any
    pristine: Path

    def artifact(self) -> Path:
        return Path(shutil.copytree(self.pristine / "artifact", self.tmp / "artifact"))

    def model_dir(self) -> Path:
        return Path(shutil.copytree(self.pristine / "model", self.tmp / "model"))

    def file(self, content: str | bytes, name: str = "data.txt") -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path


def build_pristine(root: Path) -> Path:
    """The files rows copy: a tiny Llama as an HF directory and as an ATQ artifact (word-level tokenizer)."""
    model = make_llama(seed=5)
    model.save_pretrained(root / "model")
    make_word_tokenizer().save_pretrained(root / "model")
    quantize(model, QuantConfig(mode="absmean"), quiet=True)
    save_quantized(model, root / "artifact", tokenizer=make_word_tokenizer(), dtype="float32")
    return root


def source_gguf(path: Path, config: Any, **changes: Any) -> Path:
    """A metadata-only GGUF describing ``config`` with ``changes`` (what --metadata-from reads)."""
    import gguf

    values = {**config.to_dict(), **changes}
    writer = gguf.GGUFWriter(path, changes.pop("architecture", "llama"))
    writer.add_name("the source model")
    writer.add_context_length(values["max_position_embeddings"])
    writer.add_embedding_length(values["hidden_size"])
    writer.add_block_count(values["num_hidden_layers"])
    writer.add_feed_forward_length(values["intermediate_size"])
    writer.add_head_count(values["num_attention_heads"])
    writer.add_head_count_kv(values["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(values["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"s{i}" for i in range(values["vocab_size"])])
    writer.add_token_types([gguf.TokenType.NORMAL] * values["vocab_size"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def cli(*argv: Any) -> int:
    """``atq ARGV`` in this process; a non-zero exit raises CliExit with what it wrote to stderr."""
    from atq.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    if code:
        raise CliExit(code, err.getvalue())
    return code


# --- small builders ---------------------------------------------------------------------------------------

def quantized(family: str = "llama", **config: Any) -> torch.nn.Module:
    model = make_llama() if family == "llama" else make_gpt2()
    quantize(model, QuantConfig(mode="absmean", **config), quiet=True)
    return model


def student() -> torch.nn.Module:
    model = make_llama()
    prepare_qat(model, QuantConfig(mode="absmean"))
    return model


def windows(n: int = 8, seq: int = 16, high: int = 256) -> torch.Tensor:
    return torch.randint(0, high, (n, seq), generator=torch.Generator().manual_seed(0))


def fit(model: torch.nn.Module, data: torch.Tensor | None = None, teacher: Any = None, checkpoint: Any = None,
        **config: Any) -> Any:
    return train(model, windows() if data is None else data, TrainConfig(**{"steps": 2, "batch_size": 4, **config}),
                 teacher=teacher, checkpoint_dir=checkpoint, quiet=True)


def poisoned(model: torch.nn.Module, name: str = "model.norm.weight") -> torch.nn.Module:
    with torch.no_grad():
        model.get_parameter(name)[0] = float("nan")
    return model


def flip_bit(path: Path, position: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * position)] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def edit_config(directory: Path, rewrite_checksums: bool = False, **fields: Any) -> Path:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    for key, value in fields.items():
        if key.startswith("q_"):
            config["quantization_config"][key[2:]] = value
        else:
            config[key] = value
    path.write_text(json.dumps(config, indent=2))
    if rewrite_checksums:  # what a careless tool would do
        (directory / "atq_checksums.json").unlink()
        write_checksums(directory)
    return directory


def loaded_artifact(c: Case) -> torch.nn.Module:
    return load_quantized(c.artifact())


def unchanged(*names: str) -> Callable[[Case], None]:
    """``after``: the files the row made under tmp (``name=content``) still hold what they held."""
    def check(c: Case) -> None:
        for item in names:
            name, _, content = item.partition("=")
            assert (c.tmp / name).read_text() == content, f"{name} was changed"
    return check


def absent(*names: str) -> Callable[[Case], None]:
    def check(c: Case) -> None:
        left = [name for name in names if (c.tmp / name).exists()]
        assert not left, f"written although the call failed: {left}"
    return check


def user_directory(c: Case) -> Path:
    (c.tmp / "work" / "sub").mkdir(parents=True)
    (c.tmp / "work" / "paper.tex").write_text("x")
    return c.tmp / "work"


def source_config_intact(c: Case) -> None:
    assert json.loads((c.tmp / "model" / "config.json").read_text())["model_type"] == "llama"
    assert not (c.tmp / "model" / "atq_checksums.json").exists()


def fake_smollm2_cache(c: Case) -> None:
    c.monkeypatch.delenv("ATQ_TEST_GGUF", raising=False)
    c.monkeypatch.setenv("ATQ_CACHE", str(c.tmp))
    cached = c.tmp / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached.parent.mkdir()
    cached.write_bytes(b"GGUF" + bytes(1000))  # not the file whose sha256 the code holds: a flipped bit, say


def read_only_parent(c: Case) -> Path:
    parent = c.tmp / "locked"
    parent.mkdir()
    parent.chmod(0o555)
    return parent / "out"


ROOT_IGNORES_PERMISSIONS = "root writes into read-only directories (the /proc row covers an unwritable place)"

# --- configs: every QuantConfig keyword with a bad value (with what turns its stage on) ---------------------

BAD_KEYWORDS: dict[str, tuple[Any, dict[str, Any]]] = {
    "mode": ("ternary", {}), "sparsity": (1.5, {}), "threshold": (-0.1, {}), "alpha": (-1.0, {}),
    "granularity": ("channel", {}), "group_size": (0, {}), "include": ("down_proj", {}), "exclude": ([3], {}),
    "quantize_head": ("yes", {}), "planes": (5, {}), "packing": ("3bit", {}), "activations": ("int4", {}),
    "embedding": ("q2_k", {}), "rotation": ("random", {}), "calibration": ("", {}),
    "calibration_windows": (0, {"calibration": "generated"}),
    "calibration_seq_len": (1, {"calibration": "generated"}),
    "compensation": ("no", {"calibration": "generated"}), "damp": (0.0, {"calibration": "generated"}),
    "block_size": (0, {"calibration": "generated"}), "reconstruct_steps": (-5, {}),
    "reconstruct_lr": (0.0, {"reconstruct_steps": 4}), "reconstruct_target": ("teacher", {"reconstruct_steps": 4}),
    "reconstruct_weight_lr": (-1e-3, {"reconstruct_steps": 4}), "end_to_end_steps": (-1, {}),
    "end_to_end_lr": (float("nan"), {"end_to_end_steps": 4}), "fp_fraction": (1.0, {}),
    "sensitivity": ("random", {"fp_fraction": 0.1}),
}


def _keyword_row(keyword: str) -> Row:
    value, stage = BAD_KEYWORDS[keyword]
    return Row(f"QuantConfig({keyword}={value!r})", lambda c: QuantConfig(**stage, **{keyword: value}), ValueError,
               rf"QuantConfig\.{keyword}\b.*must be .*got")


BAD_TRAIN = {"steps": 0, "batch_size": 0, "grad_accum": 0, "lr": 0.0, "warmup_steps": -1, "weight_decay": -0.1,
             "grad_clip": -1.0, "temperature": 0.0, "seed": -1, "checkpoint_every": -1, "hidden_weight": -1.0,
             "compile": "fast", "loss": "mse", "confidence": 1.5}


def _train_row(field: str, value: Any) -> Row:
    return Row(f"TrainConfig({field}={value!r})", lambda c: TrainConfig(**{"steps": 1, field: value}), ValueError,
               rf"TrainConfig\.{field} must be .*got {value!r}")


CONFIGS = [_keyword_row(k) for k in BAD_KEYWORDS] + [
    Row("QuantConfig(groupsize=64): a misspelt keyword", lambda c: QuantConfig(groupsize=64), TypeError,
        r"unknown keyword 'groupsize'"),
    Row("QuantConfig(calibration=token windows): they belong to quantize", lambda c: QuantConfig(
        calibration=torch.zeros(2, 8, dtype=torch.long)), TypeError,
        r"calibration is a data name .* got Tensor; token windows go to quantize\(model, config, calibration=windows\)"),
    Row("QuantConfig(reconstruct_lr=...) with the stage off", lambda c: QuantConfig(reconstruct_lr=1e-3), ValueError,
        r"reconstruct_lr sets the reconstruction stage, which is off: give reconstruct_steps=N"),
    Row("QuantConfig: two planes with a calibrated sparsity", lambda c: QuantConfig(
        mode="sparsity", planes=2, calibration="generated"), ValueError, r"QuantConfig\.planes must be 1"),
    Row("QuantConfig.from_dict with an unknown field", lambda c: QuantConfig.from_dict({"mode": "mse", "bogus": 1}),
        ValueError, r"unknown field\(s\) \['bogus'\]"),
    Row("quantize_model(include='q_proj'): a string, not a list", lambda c: __import__("atq").quantize_model(
        str(c.model_dir()), include="q_proj", quiet=True), ValueError, r"QuantConfig\.include must be a list"),
    Row("QuantConfig(include=['(']): not a regular expression", lambda c: QuantConfig(include=["("]), ValueError,
        r"QuantConfig\.include.*'\('"),
    Row("TrainConfig(lr=nan)", lambda c: TrainConfig(steps=1, lr=float("nan")), ValueError, r"TrainConfig\.lr must be"),
    Row("TrainConfig(lr=inf)", lambda c: TrainConfig(steps=1, lr=float("inf")), ValueError, r"TrainConfig\.lr must be"),
    Row("TrainConfig(steps=1.5)", lambda c: TrainConfig(steps=1.5), ValueError, r"TrainConfig\.steps must be an int"),
    Row("TrainConfig(batch_size=True)", lambda c: TrainConfig(steps=1, batch_size=True), ValueError,
        r"TrainConfig\.batch_size must be an integer"),
    Row("TrainConfig(grad_clip=nan)", lambda c: TrainConfig(steps=1, grad_clip=float("nan")), ValueError,
        r"TrainConfig\.grad_clip must be a finite number >= 0 \(0: no clipping\)"),
] + [_train_row(field, value) for field, value in BAD_TRAIN.items()]

# --- model sources -----------------------------------------------------------------------------------------

SOURCES = [
    Row("load_model(a local directory that does not exist)", lambda c: load_model(str(c.tmp / "no-such-dir")),
        FileNotFoundError, r"no-such-dir"),
    Row("load_model(a hub id that does not exist, offline)", lambda c: load_model("atq-tests/no-such-model"), OSError,
        r"atq-tests/no-such-model"),
    Row("load_model(a .gguf that is not a GGUF)", lambda c: load_model(str(c.file(b"not a gguf" * 20, "m.gguf"))),
        ValueError, r"m\.gguf does not start with the GGUF magic"),
    Row("load_model(a .gguf that does not exist)", lambda c: load_model(str(c.tmp / "none.gguf")), FileNotFoundError,
        r"GGUF file not found: .*none\.gguf"),
    Row("load_model(a directory without config.json)", lambda c: load_model(str(c.file("x", "notes.txt").parent)),
        ValueError, r"Unrecognized model in .*model_type"),
    Row("load_model(an artifact with a flipped bit)", lambda c: (flip_bit(c.artifact() / "model.safetensors"),
                                                                 load_model(str(c.tmp / "artifact"))),
        ArtifactError, r"model\.safetensors: sha256 mismatch"),
    Row("load_model('smollm2') with a corrupted cached file", lambda c: (fake_smollm2_cache(c), load_model("smollm2")),
        RuntimeError, r"SmolLM2-135M-Instruct\.Q4_1\.gguf: its sha256 is not SmolLM2's.*delete it \(rm "),
]

# --- data ---------------------------------------------------------------------------------------------------

DATA = [
    Row("load_text(a file that does not exist)", lambda c: load_text(c.tmp / "missing.txt"), DataError,
        r"missing\.txt': not a known name .*and not an existing file"),
    Row("load_text(an empty file)", lambda c: load_text(c.file("")), DataError, r"data\.txt' is empty"),
    Row("load_text(a file of whitespace)", lambda c: load_text(c.file(" \n\t\n")), DataError, r"data\.txt' is empty"),
    Row("load_text(a file that is not UTF-8)", lambda c: load_text(c.file(b"caf\xe9 latin-1")), DataError,
        r"data\.txt: not UTF-8 text \(byte 3.*save it as UTF-8"),
    Row("load_text('wikitext2') with ATQ_DATA_DIR holding no copy", lambda c: (
        c.monkeypatch.setenv("ATQ_DATA_DIR", str(c.tmp)), load_text("wikitext2")), DataError,
        r"ATQ_DATA_DIR is set but .*wikitext2_test\.txt does not exist"),
    Row("token_windows(text shorter than one window)", lambda c: token_windows(CharTokenizer(), "abc", 64), DataError,
        r"text has 3 tokens, fewer than one window of 64"),
    Row("token_windows(seq_len=1)", lambda c: token_windows(CharTokenizer(), "abcdef", 1), DataError,
        r"seq_len must be >= 2, got 1"),
    Row("token_windows(max_windows=0)", lambda c: token_windows(CharTokenizer(), "abcdef", 2, 0), DataError,
        r"max_windows must be >= 1"),
    Row("perplexity(Llama, seq_len past its positions)", lambda c: perplexity(
        make_llama(), CharTokenizer(), c.file("x" * 2000), seq_len=512, quiet=True), DataError,
        r"seq_len 512 is longer than the model's 256 positions"),
    Row("perplexity(GPT-2, seq_len past its positions)", lambda c: perplexity(
        make_gpt2(), CharTokenizer(), c.file("x" * 2000), seq_len=512, quiet=True), DataError,
        r"seq_len 512 is longer than the model's 256 positions"),
    Row("evaluate_windows(no windows)", lambda c: evaluate_windows(make_llama(), torch.zeros(0, 16, dtype=torch.long)),
        DataError, r"windows must be .*got shape \(0, 16\)"),
    Row("generated_windows(n_windows=0)", lambda c: generated_windows(make_llama(), CharTokenizer(), 0, 16),
        DataError, r"n_windows >= 1 and seq_len >= 2, got 0"),
] + [Row(f"generated_windows({name}={value!r})", lambda c, name=name, value=value: generated_windows(
        make_llama(), CharTokenizer(), 2, 8, **{name: value}), DataError, rf"generated_windows: {name} must be {allowed}")
     for name, value, allowed in [("greedy_tokens", -1, "an integer >= 0"), ("temperature", 0.0, "a finite number > 0"),
                                  ("top_p", 0.0, r"in \(0, 1\]"), ("top_p", 1.5, r"in \(0, 1\]"),
                                  ("first_token", "bos", r"one of \('model', 'uniform'\)")]] + [
    Row("generated_windows(top_k=5): not a sampling keyword", lambda c: generated_windows(
        make_llama(), CharTokenizer(), 2, 8, top_k=5), TypeError, r"unknown sampling keyword\(s\) \['top_k'\]"),
    Row("generated_windows(prompts as long as the windows)", lambda c: generated_windows(
        make_llama(), CharTokenizer(), 2, 8, prompts=torch.ones(2, 8, dtype=torch.long)), DataError,
        r"prompts must be .*1 <= length < seq_len 8 \(something left to generate\), got shape \(2, 8\)"),
    Row("text_prompts(longer than every paragraph)", lambda c: text_prompts(CharTokenizer(), "short\nlines\n", 2, 16),
        DataError, r"no paragraph \(non-blank line\) of the text has the 16 tokens.*give shorter prompts"),
    Row("text_prompts(n_prompts=0)", lambda c: text_prompts(CharTokenizer(), "some text", 0, 4), DataError,
        r"n_prompts >= 1 and prompt_len >= 1, got 0"),
    Row("mixed_windows(generated_fraction=1.5)", lambda c: mixed_windows(windows(), windows(), 1.5, 8), DataError,
        r"mixed_windows: generated_fraction must be in \[0, 1\], got 1\.5"),
    Row("mixed_windows(windows of two lengths)", lambda c: mixed_windows(windows(8, 16), windows(8, 12), 0.5, 8),
        DataError, r"windows of one length, got 8, calibration \(8, 16\) and generated \(8, 12\)"),
    Row("mixed_windows(fewer generated windows than the share)", lambda c: mixed_windows(windows(), windows(2), 0.5, 8),
        DataError, r"4 generated and 4 calibration windows asked for, 2 generated and 8 calibration windows given"),
]

# --- artifacts ----------------------------------------------------------------------------------------------


def _flip_row(name: str) -> Row:
    return Row(f"artifact: a flipped bit in {name}", lambda c: (flip_bit(c.artifact() / name),
                                                               load_quantized(c.tmp / "artifact")),
               ArtifactError, rf"{name}: (sha256 mismatch|its list of checksums was altered|unreadable)")


def _truncated_row(name: str) -> Row:
    return Row(f"artifact: {name} truncated", lambda c: (truncate(c.artifact() / name),
                                                        load_quantized(c.tmp / "artifact")),
               ArtifactError, rf"{name}: (\d+ bytes, expected \d+; truncated|unreadable)")


def _edit_row(label: str, fields: dict[str, Any]) -> Row:
    return Row(f"artifact: config.json edited ({label})", lambda c: load_quantized(edit_config(c.artifact(), **fields)),
               ArtifactError, r"config\.json: (sha256 mismatch|\d+ bytes, expected \d+; truncated or altered)")


def _same_length_rope_edit(directory: Path) -> Path:
    """rope_theta 10000.0 -> 11000.0 in place: same size, so only the sha256 can see it (the issue's one bit)."""
    path = directory / "config.json"
    text = path.read_text()
    assert text.count('"rope_theta": 10000.0') == 1
    path.write_text(text.replace('"rope_theta": 10000.0', '"rope_theta": 11000.0'))
    return directory


def _edit_group_size(directory: Path) -> Path:
    modules = json.loads((directory / "config.json").read_text())["quantization_config"]["modules"]
    modules["model.layers.0.mlp.up_proj"]["group_size"] = 32
    return edit_config(directory, True, q_modules=modules)


def _old_format(c: Case) -> Path:
    old = c.tmp / "old"
    old.mkdir()
    (old / "atq_config.json").write_text(json.dumps({"format_version": 1, "quant_config": {"mode": "mse"}}))
    (old / "model.safetensors").write_bytes(b"")
    return old


ARTIFACTS = [_flip_row(name) for name in ARTIFACT_FILES] + [
    _truncated_row(name) for name in ("model.safetensors", "config.json", "atq_checksums.json")] + [
    Row("artifact: config.json's rope_theta edited in place (same size)", lambda c: load_quantized(
        _same_length_rope_edit(c.artifact())), ArtifactError, r"config\.json: sha256 mismatch"),
    _edit_row("rope_theta", {"rope_theta": 11000.0}),
    _edit_row("hidden_size", {"hidden_size": 64}),
    _edit_row("dtype", {"dtype": "float16"}),
    _edit_row("quantization_config.modules emptied", {"q_modules": {}}),
    Row("artifact: a module's group size edited, checksums rewritten", lambda c: load_quantized(
        _edit_group_size(c.artifact())), ArtifactError,
        r"modules\['model\.layers\.0\.mlp\.up_proj'\].*scales of shape"),
    Row("artifact: format_version edited, checksums rewritten", lambda c: load_quantized(
        edit_config(c.artifact(), True, q_format_version=3)), ArtifactError, r"format version 3; this ATQ reads 2"),
    Row("artifact: num_hidden_layers edited, checksums rewritten", lambda c: load_quantized(
        edit_config(c.artifact(), True, num_hidden_layers=3)), ArtifactError, r"num_hidden_layers|layers\.2"),
    Row("artifact: model.safetensors deleted", lambda c: ((c.artifact() / "model.safetensors").unlink(),
                                                         load_quantized(c.tmp / "artifact")),
        ArtifactError, r"model\.safetensors: missing \(listed in atq_checksums\.json\)"),
    Row("artifact: config.json deleted", lambda c: ((c.artifact() / "config.json").unlink(),
                                                   load_quantized(c.tmp / "artifact")),
        ArtifactError, r"config\.json: missing"),
    Row("artifact: atq_checksums.json deleted", lambda c: ((c.artifact() / "atq_checksums.json").unlink(),
                                                          load_quantized(c.tmp / "artifact")),
        ArtifactError, r"atq_checksums\.json: missing; not an ATQ artifact directory"),
    Row("artifact: an old-format (ATQ 0.1) directory", lambda c: load_quantized(_old_format(c)), ArtifactError,
        r"format 1.*Quantize the source model again"),
    Row("load_quantized(a plain HF checkpoint)", lambda c: load_quantized(c.model_dir()), ArtifactError,
        r"atq_checksums\.json: missing; not an ATQ artifact"),
    Row("load_quantized(a file)", lambda c: load_quantized(c.file("x")), ArtifactError,
        r"data\.txt/atq_checksums\.json: missing"),
]

# --- saves --------------------------------------------------------------------------------------------------

SAVES = [
    Row("save_quantized(into a directory holding the user's files)", lambda c: save_quantized(
        quantized(), user_directory(c)), FileExistsError, r"work exists and is not something this command writes",
        after=unchanged("work/paper.tex=x")),
    Row("save_quantized(into the source checkpoint's directory)", lambda c: save_quantized(
        quantized(), c.model_dir()), FileExistsError, r"model exists and is not something this command writes",
        after=source_config_intact),
    Row("save_quantized(a file path)", lambda c: save_quantized(quantized(), c.file("y", "notes.txt")),
        FileExistsError, r"notes\.txt is a file", after=unchanged("notes.txt=y")),
    Row("save_quantized(a FIFO)", lambda c: (os.mkfifo(c.tmp / "pipe"), save_quantized(quantized(), c.tmp / "pipe")),
        FileExistsError, r"pipe is a file"),
    Row("save_quantized(under a read-only directory)", lambda c: save_quantized(quantized(), read_only_parent(c)),
        PermissionError, r"locked", skip=ROOT_IGNORES_PERMISSIONS if os.geteuid() == 0 else None),
    Row("save_quantized(somewhere nothing can be written: /proc)", lambda c: save_quantized(
        quantized(), "/proc/atq-out"), OSError, r"/proc/atq-out\b"),
    Row("save_quantized(a model that was not quantized)", lambda c: save_quantized(make_llama(), c.tmp / "x"),
        ValueError, r"has not been quantized", after=absent("x")),
    Row("save_quantized(dtype='int8')", lambda c: save_quantized(quantized(), c.tmp / "x", dtype="int8"), ValueError,
        r"dtype must be one of", after=absent("x")),
    Row("export_hf(over the artifact it reads)", lambda c: export_hf(loaded_artifact(c), c.tmp / "artifact",
                                                                     dequantize=True), FileExistsError,
        r"artifact exists and is not something this command writes"),
    Row("export_gguf(over a file that is not a GGUF)", lambda c: export_gguf(
        quantized(), c.file("keep me", "notes.txt"), tokenizer_dir=c.tmp), FileExistsError,
        r"notes\.txt exists and is not a GGUF file", after=unchanged("notes.txt=keep me")),
    Row("export_gguf(to a directory)", lambda c: export_gguf(quantized(), c.tmp, tokenizer_dir=c.tmp),
        IsADirectoryError, r"is a directory; give a file path"),
]

# --- QAT ----------------------------------------------------------------------------------------------------


def _forward_gives_nan(model: torch.nn.Module) -> torch.nn.Module:
    model.model.norm.register_forward_hook(lambda module, inputs, output: output * float("inf"))
    return model


def _nan_gradients(model: torch.nn.Module) -> torch.nn.Module:
    model.model.norm.weight.register_hook(lambda grad: grad * float("nan"))
    return model


def _other_config_checkpoint(c: Case) -> Any:
    fit(student(), checkpoint=c.tmp / "ck", lr=1e-3)
    return fit(student(), checkpoint=c.tmp / "ck", lr=2e-3)


QAT = [
    Row("train(a student whose weights hold NaN)", lambda c: fit(poisoned(student())), ValueError,
        r"the student's model\.norm\.weight holds NaN or inf before training.*not the learning rate"),
    Row("train(a teacher whose weights hold NaN)", lambda c: fit(student(), teacher=poisoned(make_llama())),
        ValueError, r"the teacher's model\.norm\.weight holds NaN or inf before training"),
    Row("train(no windows)", lambda c: fit(student(), torch.zeros(0, 16, dtype=torch.long)), DataError,
        r"no training windows \(shape \(0, 16\)\)"),
    Row("train(fewer windows than batch_size)", lambda c: fit(student(), windows(3), batch_size=4), DataError,
        r"3 windows, fewer than batch_size 4"),
    Row("train(windows of one token)", lambda c: fit(student(), windows(8, 1)), DataError,
        r"windows of 1 token have no next token"),
    Row("train(token ids the model's vocabulary lacks)", lambda c: fit(student(), windows(high=1000)), DataError,
        r"but the model's embedding has 256 rows: the windows were made with another tokenizer"),
    Row("train(windows longer than the model's positions)", lambda c: fit(student(), windows(8, 300)), DataError,
        r"seq_len 300 is longer than the model's 256 positions"),
    Row("train(float windows)", lambda c: fit(student(), windows().float()), DataError,
        r"2-D tensor of token ids .*torch\.float32"),
    Row("train(a checkpoint directory that is a file)", lambda c: fit(student(), checkpoint=c.file("x", "ck")),
        FileExistsError, r"ck is a file, not a checkpoint directory", after=unchanged("ck=x")),
    Row("train(a checkpoint directory holding other files)", lambda c: fit(
        student(), checkpoint=user_directory(c)), FileExistsError, r"work exists and holds no training checkpoint",
        after=unchanged("work/paper.tex=x")),
    Row("train(a truncated checkpoint)", lambda c: (fit(student(), checkpoint=c.tmp / "ck"),
                                                    truncate(c.tmp / "ck" / "train_state.pt"),
                                                    fit(student(), checkpoint=c.tmp / "ck")),
        ArtifactError, r"train_state\.pt: unreadable training checkpoint"),
    Row("train(resume with another TrainConfig)", _other_config_checkpoint, ValueError,
        r"ck: checkpoint was written with a different TrainConfig"),
    Row("train(a forward pass that gives NaN)", lambda c: fit(_forward_gives_nan(student())), FloatingPointError,
        r"loss nan at step 0 .*before any update, so not the learning rate"),
    Row("train(gradients that are always NaN)", lambda c: fit(_nan_gradients(student()), steps=12),
        FloatingPointError, r"9 steps in a row .*non-finite gradient.*the learning rate is not the cause"),
]

# --- exports ------------------------------------------------------------------------------------------------


def _mismatch_row(label: str, change: dict[str, Any], key: str) -> Row:
    def run(c: Case) -> Any:
        model = loaded_artifact(c)
        source = source_gguf(c.tmp / "source.gguf", model.config, **change)
        return export_gguf(model, c.tmp / "m.gguf", metadata_from=source)
    return Row(f"export_gguf(metadata_from a model of another {label})", run, ExportError,
               rf"{key}.*nothing was written", after=absent("m.gguf"))


def _tokenizer_dir(c: Case, spec: dict[str, Any]) -> Path:
    (c.tmp / "tok").mkdir()
    (c.tmp / "tok" / "tokenizer.json").write_text(json.dumps({"model": spec}))
    return c.tmp / "tok"


def _biased(model: torch.nn.Module) -> torch.nn.Module:
    layer = model.model.layers[0].mlp.up_proj
    layer.bias = torch.nn.Parameter(torch.ones(layer.out_features))
    return model


def _rotated() -> torch.nn.Module:
    model = make_llama(hidden=64)
    quantize(model, QuantConfig(mode="absmean", rotation="hadamard"), calibration=windows(4, 16), quiet=True)
    return model


EXPORTS = [
    _mismatch_row("block count", {"num_hidden_layers": 30}, r"llama\.block_count is 30 there"),
    _mismatch_row("embedding width", {"hidden_size": 576}, r"llama\.embedding_length is 576 there"),
    _mismatch_row("vocabulary", {"vocab_size": 49152}, r"tokenizer\.ggml\.tokens holds 49152 tokens"),
    _mismatch_row("head count", {"num_attention_heads": 9}, r"llama\.attention\.head_count is 9 there"),
    _mismatch_row("KV head count", {"num_key_value_heads": 3}, r"llama\.attention\.head_count_kv is 3 there"),
    Row("export_gguf(metadata_from a file that does not exist)", lambda c: export_gguf(
        quantized(), c.tmp / "m.gguf", metadata_from=c.tmp / "none.gguf"), FileNotFoundError,
        r"none\.gguf: no such file", after=absent("m.gguf")),
    Row("export_gguf(metadata_from a file that is not a GGUF)", lambda c: export_gguf(
        quantized(), c.tmp / "m.gguf", metadata_from=c.file("text", "src.gguf")), ExportError,
        r"src\.gguf: not a readable GGUF file", after=absent("m.gguf")),
    Row("export_gguf(metadata_from a non-Llama GGUF)", lambda c: export_gguf(
        quantized(), c.tmp / "m.gguf", metadata_from=source_gguf(c.tmp / "g.gguf", make_llama().config,
                                                                 architecture="gpt2")),
        ExportError, r"metadata of a gpt2 model, this one is llama: give the GGUF this model came from",
        after=absent("m.gguf")),
    Row("export_gguf(metadata_from a Qwen2 GGUF, a Llama model)", lambda c: export_gguf(
        quantized(), c.tmp / "m.gguf", metadata_from=source_gguf(c.tmp / "g.gguf", make_llama().config,
                                                                 architecture="qwen2")),
        ExportError, r"metadata of a qwen2 model, this one is llama", after=absent("m.gguf")),
    Row("export_gguf(out is the metadata_from file)", lambda c: export_gguf(
        quantized(), c.tmp / "s.gguf", metadata_from=source_gguf(c.tmp / "s.gguf", make_llama().config)),
        ExportError, r"s\.gguf is also the metadata_from file"),
    Row("export_gguf(a GPT-2)", lambda c: export_gguf(quantized("gpt2"), c.tmp / "m.gguf", tokenizer_dir=c.tmp),
        ExportError, r"supports the architectures \('llama', 'qwen2'\) \(Llama, Qwen2\), got 'gpt2'",
        after=absent("m.gguf")),
    Row("export_gguf(a model that was not quantized)", lambda c: export_gguf(make_llama(), c.tmp / "m.gguf"),
        ExportError, r"has no ternary layers \(quantize it first"),
    Row("export_gguf(no tokenizer.json and no metadata_from)", lambda c: export_gguf(
        quantized(), c.tmp / "m.gguf", tokenizer_dir=c.tmp / "missing"), ExportError,
        r"needs metadata_from .* or a directory with tokenizer\.json", after=absent("m.gguf")),
    Row("export_gguf(a WordLevel tokenizer)", lambda c: export_gguf(
        quantized(), c.tmp / "m.gguf", tokenizer_dir=_tokenizer_dir(c, {"type": "WordLevel", "vocab": {}})),
        ExportError, r"tokenizer type 'WordLevel'; GGUF export writes BPE tokenizers only", after=absent("m.gguf")),
    Row("export_gguf(a tokenizer larger than the vocabulary)", lambda c: export_gguf(
        quantized(), c.tmp / "m.gguf", tokenizer_dir=_tokenizer_dir(
            c, {"type": "BPE", "vocab": {f"t{i}": i for i in range(300)}, "merges": []})),
        ExportError, r"300 tokens, more than the model's vocab_size 256", after=absent("m.gguf")),
    Row("export_gguf(fallback='q4_0')", lambda c: export_gguf(quantized(), c.tmp / "m.gguf", fallback="q4_0"),
        ExportError, r"fallback must be one of"),
    Row("export_gguf(ternary_type='q2_k')", lambda c: export_gguf(quantized(), c.tmp / "m.gguf",
                                                                  ternary_type="q2_k"),
        ExportError, r"ternary_type must be one of"),
    Row("export_gguf(a layer with a bias llama.cpp's Llama cannot hold)", lambda c: export_gguf(
        _biased(quantized()), c.tmp / "m.gguf", tokenizer_dir=c.tmp), ExportError,
        r"model\.layers\.0\.mlp\.up_proj has a bias", after=absent("m.gguf")),
    Row("export_hf(group scales BitLinear cannot hold)", lambda c: export_hf(quantized(), c.tmp / "hf"), ExportError,
        r"cannot be transformers BitLinear layers exactly.*scales", after=absent("hf")),
    Row("export_hf(a rotated model)", lambda c: export_hf(_rotated(), c.tmp / "hf"), ExportError,
        r"rotates its residual stream", after=absent("hf")),
    Row("export_hf(a model that was not quantized)", lambda c: export_hf(make_llama(), c.tmp / "hf"), ExportError,
        r"has no ternary layers"),
]



# --- the CLI (written against cli.py of this commit) ---------------------------------------------------------


def _train_cli(c: Case, *flags: str) -> int:
    """``atq train`` on a small text with ``flags``: each bad one is refused before any model loads."""
    return cli("train", "--model", c.model_dir(), "--data", c.file("the quick brown fox\n" * 100), "--windows", "4",
               "--seq-len", "8", "--steps", "1", "--out", c.tmp / "out", "--quiet", "--device", "cpu", *flags)


# atq train's data and loss flags with a bad value (each after --data FILE, which it may replace), and the error
BAD_TRAIN_FLAGS = [
    (["--data", "mix"], r"--data mix needs --generated-fraction F in \[0, 1\]"),
    (["--data", "mix", "--generated-fraction", "1.5"], r"--generated-fraction must be in \[0, 1\], got 1\.5"),
    (["--generated-fraction", "0.5"], r"--generated-fraction F goes with --data mix"),
    (["--data", "mix+generated", "--generated-fraction", "0.5"], r".*--data mix, which stands alone"),
    (["--data", "generated", "--greedy-tokens", "-1"], r"--greedy-tokens must be an integer >= 0, got -1"),
    (["--data", "generated", "--temperature", "0"], r"--temperature must be a finite number > 0, got 0\.0"),
    (["--data", "generated", "--top-p", "0"], r"--top-p must be in \(0, 1\], got 0\.0"),
    (["--data", "generated", "--top-p", "1.5"], r"--top-p must be in \(0, 1\], got 1\.5"),
    (["--data", "generated", "--first-token", "bos"], r"--first-token must be one of \('model', 'uniform'\), got 'bos'"),
    (["--data", "generated", "--prompts-from-calibration", "-1"], r"--prompts-from-calibration must be an integer >= 0"),
    (["--temperature", "0.7"], r"--temperature shapes generated text, but --data .*data\.txt generates none"),
    (["--data", "mix", "--generated-fraction", "0", "--greedy-tokens", "3"], r"--greedy-tokens shapes generated text"),
    (["--data", "mix", "--generated-fraction", "0.5", "--calibration", "missing.txt"],
     r"cannot resolve data source 'missing\.txt'"),
    (["--loss", "mse"], r"TrainConfig\.loss must be one of \('kl', 'cakld'\), got 'mse'"),
    (["--confidence", "0.5"], r"--confidence is CAKLD's γ, but --loss is kl: give --loss cakld"),
    (["--loss", "cakld", "--confidence", "high"], r"--confidence must be a number in \[0, 1\] or data, got 'high'"),
    (["--loss", "cakld", "--confidence", "1.5"], r"TrainConfig\.confidence must be None or in \[0, 1\], got 1\.5"),
    (["--loss", "cakld", "--no-teacher"], r"--loss cakld is a distillation loss, but --no-teacher trains without"),
]


CLI_ROWS = [
    Row("atq quantize --group-size 0", lambda c: cli("quantize", "--model", c.model_dir(), "--group-size", "0",
                                                     "--out", c.tmp / "out", "--quiet"),
        CliExit, r"^exit 2: atq quantize: error: .*QuantConfig\.group_size must be an integer >= 1, got 0",
        after=absent("out"), cli=True),
    Row("atq quantize --include '('", lambda c: cli("quantize", "--model", c.model_dir(), "--include", "(",
                                                    "--out", c.tmp / "out", "--quiet"),
        CliExit, r"^exit 2: atq quantize: error: .*include", cli=True),
    Row("atq quantize --out DIR holding the user's files", lambda c: cli(
        "quantize", "--model", c.model_dir(), "--out", user_directory(c), "--quiet"),
        CliExit, r"^exit 2: atq quantize: error: .*work exists and is not something this command writes",
        after=unchanged("work/paper.tex=x"), cli=True),
    Row("atq quantize --out the source checkpoint", lambda c: cli(
        "quantize", "--model", c.model_dir(), "--out", c.tmp / "model", "--quiet"),
        CliExit, r"^exit 2: atq quantize: error: .*model exists and is not something", after=source_config_intact,
        cli=True),
    Row("atq eval --seq-len past the model's positions", lambda c: cli(
        "eval", "--model", c.model_dir(), "--data", c.file("the quick brown fox " * 200), "--seq-len", "300",
        "--quiet", "--device", "cpu"),
        CliExit, r"^exit 2: atq eval: error: .*seq_len 300 is longer than the model's 256 positions", cli=True),
    Row("atq eval --data a file that is not UTF-8", lambda c: cli(
        "eval", "--model", c.model_dir(), "--data", c.file(b"\xff\xfe text"), "--seq-len", "64", "--quiet",
        "--device", "cpu"),
        CliExit, r"^exit 2: atq eval: error: .*data\.txt: not UTF-8 text", cli=True),
    Row("atq eval --model a path that does not exist", lambda c: cli(
        "eval", "--model", c.tmp / "no-such-dir", "--quiet", "--device", "cpu"),
        CliExit, r"^exit 2: atq eval: error: .*no-such-dir", cli=True),
    Row("atq eval --model smollm2 with a corrupted cached file", lambda c: (fake_smollm2_cache(c), cli(
        "eval", "--model", "smollm2", "--quiet", "--device", "cpu")),
        CliExit, r"^exit 2: atq eval: error: .*its sha256 is not SmolLM2's.*delete it", cli=True),
    Row("atq train --steps 0", lambda c: cli("train", "--model", c.model_dir(), "--data", c.file("the fox " * 300),
                                             "--steps", "0", "--out", c.tmp / "out", "--quiet", "--device", "cpu"),
        CliExit, r"^exit 2: atq train: error: TrainConfig\.steps must be an integer >= 1, got 0",
        after=absent("out", "out.ckpt"), cli=True),
    Row("atq train --windows 2 --batch-size 8", lambda c: cli(
        "train", "--model", c.model_dir(), "--data", c.file("the quick brown fox " * 300), "--windows", "2",
        "--seq-len", "16", "--out", c.tmp / "out", "--quiet", "--device", "cpu"),
        CliExit, r"^exit 2: atq train: error: .*2 windows, fewer than batch_size 8", after=absent("out", "out.ckpt"),
        cli=True),
] + [Row(f"atq train {' '.join(flags)}", lambda c, flags=flags: _train_cli(c, *flags), CliExit,
         "^exit 2: atq train: error: " + match, after=absent("out", "out.ckpt"), cli=True)
       for flags, match in BAD_TRAIN_FLAGS] + [
    Row("atq export --model a plain HF checkpoint", lambda c: cli(
        "export", "--model", c.model_dir(), "--format", "hf", "--out", c.tmp / "hf"),
        CliExit, r"^exit 2: atq export: error: .*is not an ATQ artifact", after=absent("hf"), cli=True),
    Row("atq export --format gguf --metadata-from another model's GGUF", lambda c: cli(
        "export", "--model", c.artifact(), "--format", "gguf", "--out", c.tmp / "m.gguf",
        "--metadata-from", source_gguf(c.tmp / "s.gguf", make_llama().config, num_hidden_layers=30)),
        CliExit, r"^exit 2: atq export: error: .*llama\.block_count is 30 there", after=absent("m.gguf"), cli=True),
    Row("atq export --format hf --out the artifact itself", lambda c: cli(
        "export", "--model", c.artifact(), "--format", "hf", "--dequantize", "--out", c.tmp / "artifact"),
        CliExit, r"^exit 2: atq export: error: .*artifact exists and is not something", cli=True),
]

ROWS: list[Row] = CONFIGS + SOURCES + DATA + ARTIFACTS + SAVES + QAT + EXPORTS + CLI_ROWS
