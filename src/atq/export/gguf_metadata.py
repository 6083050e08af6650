"""The GGUF file's metadata: the ``<arch>.*`` keys that describe the model (``llama.*``, ``qwen2.*``), and its
tokenizer.

Written from the HF config and a BPE ``tokenizer.json``, or copied from a source GGUF (``metadata_from``). A copy
is checked first: its architecture must be the model's, every ``<arch>.*`` key the source holds must agree with the model's config (and its token list
with the vocabulary), or the export stops with the keys that differ: llama.cpp trusts the metadata over the
tensors, so a file that contradicts its tensors fails to load or computes something else.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


class ExportError(ValueError):
    """A model or layout that the target format cannot hold as asked."""


ARCHITECTURES = ("llama", "qwen2")  # HF model_type = llama.cpp architecture name; both read the same keys


def architecture(config: Any) -> str:
    """The GGUF architecture of ``config`` (its HF ``model_type``), or an ExportError naming those supported."""
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        raise ExportError(f"GGUF export supports the architectures {ARCHITECTURES} (Llama, Qwen2), got {kind!r}")
    return kind


def llama_metadata(config: Any) -> dict[str, tuple[float, str]]:
    """The ``<arch>.*`` keys that describe ``config`` (llama.cpp's Llama and Qwen2 read the same ones, under their
    architecture's prefix): key -> (value, the config field it comes from)."""
    arch = architecture(config)
    heads = config.num_attention_heads
    rope = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    head_dim = getattr(config, "head_dim", None)
    return {
        f"{arch}.context_length": (config.max_position_embeddings, "max_position_embeddings"),
        f"{arch}.embedding_length": (config.hidden_size, "hidden_size"),
        f"{arch}.block_count": (config.num_hidden_layers, "num_hidden_layers"),
        f"{arch}.feed_forward_length": (config.intermediate_size, "intermediate_size"),
        f"{arch}.attention.head_count": (heads, "num_attention_heads"),
        f"{arch}.attention.head_count_kv": (config.num_key_value_heads, "num_key_value_heads"),
        f"{arch}.rope.dimension_count": (head_dim or config.hidden_size // heads, "head_dim"),
        f"{arch}.attention.layer_norm_rms_epsilon": (float(config.rms_norm_eps), "rms_norm_eps"),
        f"{arch}.rope.freq_base": (float(rope or 10000.0), "rope_theta"),
        f"{arch}.vocab_size": (config.vocab_size, "vocab_size"),
    }


def _agree(stored: Any, expected: float) -> bool:
    if isinstance(expected, float):  # GGUF stores float32
        return isinstance(stored, (int, float)) and math.isclose(stored, expected, rel_tol=1e-6)
    return stored == expected


def open_source(source: str | os.PathLike, config: Any, out: str | os.PathLike) -> Any:
    """A reader of the source GGUF after checking that its metadata describes the model of ``config``;
    raises ExportError naming every key that differs, before anything is written."""
    import gguf

    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"metadata_from {source}: no such file (give the GGUF to copy metadata from)")
    if Path(out).resolve() == path.resolve():
        raise ExportError(f"{out} is also the metadata_from file: the export would replace its own source; "
                          "write to another path")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as error:
        hint = (" — it holds tensor types the gguf package does not know, such as the Q2_0 blocks ATQ exports: "
                "give the GGUF the model came from" if "GGMLQuantizationType" in str(error) else "")
        raise ExportError(f"metadata_from {source}: not a readable GGUF file ({error}){hint}") from error
    source_arch = reader.fields.get("general.architecture")
    if source_arch is None or source_arch.contents() != architecture(config):
        raise ExportError(f"metadata_from {source}: metadata of a "
                          f"{source_arch.contents() if source_arch else 'no general.architecture'} model, this one is "
                          f"{architecture(config)}: give the GGUF this model came from")
    wrong = [f"{key} is {reader.fields[key].contents()} there, the model's {field} is {value}"
             for key, (value, field) in llama_metadata(config).items()
             if key in reader.fields and not _agree(reader.fields[key].contents(), value)]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.data) != config.vocab_size:
        wrong.append(f"tokenizer.ggml.tokens holds {len(tokens.data)} tokens, the model's vocab_size is "
                     f"{config.vocab_size}")
    if wrong:
        raise ExportError(f"metadata_from {source} describes another model: {'; '.join(wrong)}. Give the GGUF of "
                          "this model's architecture, or leave metadata_from out (metadata from the model's config "
                          "and tokenizer.json); nothing was written")
    return reader


def copy_metadata(writer: Any, reader: Any, config: Any) -> None:
    """Every key of the source except the ones this file sets itself (architecture, file type); the model's
    ``<arch>.*`` keys the source lacks are added from ``config``."""
    import gguf

    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    _add_llama_keys(writer, config, skip=set(reader.fields))


def _add_llama_keys(writer: Any, config: Any, skip: set[str] = frozenset()) -> None:
    for key, (value, _) in llama_metadata(config).items():
        if key not in skip:
            writer.add_float32(key, value) if isinstance(value, float) else writer.add_uint32(key, value)


def write_metadata(writer: Any, config: Any, tokenizer_dir: str | os.PathLike | None) -> None:
    """``<arch>.*`` keys from the HF config; a BPE tokenizer (vocab + merges) from ``tokenizer.json``."""
    import gguf

    path = Path(tokenizer_dir or "") / "tokenizer.json"
    if tokenizer_dir is None or not path.is_file():
        raise ExportError("GGUF export needs metadata_from (a source GGUF) or a directory with tokenizer.json")
    spec = json.loads(path.read_text())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"{path}: tokenizer type {model.get('type')!r}; GGUF export writes BPE tokenizers only "
                          "(pass metadata_from=<source .gguf> to copy one)")
    if len(model["vocab"]) > config.vocab_size:
        raise ExportError(f"{path}: {len(model['vocab'])} tokens, more than the model's vocab_size "
                          f"{config.vocab_size}: the tokenizer belongs to another model")
    _add_llama_keys(writer, config)
    vocab = sorted(model["vocab"].items(), key=lambda item: item[1])
    tokens = [token for token, _ in vocab] + [f"[PAD{i}]" for i in range(config.vocab_size - len(vocab))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    writer.add_token_merges(merges)
    for attribute, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
        if getattr(config, attribute, None) is not None:
            add(int(getattr(config, attribute)))
