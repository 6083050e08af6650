"""Text sources and token windows.

A source is a name (``wikitext2`` = WikiText-2 raw test split, ``wikitext2_valid`` = validation split, for
calibration) or a path to a text file. Names resolve from ``$ATQ_DATA_DIR`` first (offline machines), then
through ``datasets`` when it is installed and online.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# name -> (file in $ATQ_DATA_DIR, datasets split). The test text is joined exactly as the GPTQ protocol does.
DATASETS = {
    "wikitext2": ("wikitext2_test.txt", "test"),
    "wikitext2_valid": ("wikitext2_valid_tokenized.txt", "validation"),
}


class DataError(ValueError):
    """A data source that cannot be resolved, or text too short for what was asked."""


def load_text(source: str | os.PathLike) -> str:
    """The text of a named dataset or a file; raises DataError saying how to provide it."""
    name = str(source)
    if name in DATASETS:
        text = _named_text(name)
    else:
        path = Path(name)
        if not path.is_file():
            raise DataError(
                f"cannot resolve data source {name!r}: not a known name ({', '.join(DATASETS)}) "
                "and not an existing file"
            )
        text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"data source {name!r} is empty (or only whitespace): give a file with text in it")
    return text


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start}: {error.reason}); save it as UTF-8 "
                        "(e.g. iconv -t utf-8) or give another file") from error


def _named_text(name: str) -> str:
    filename, split = DATASETS[name]
    data_dir = os.environ.get("ATQ_DATA_DIR")
    if data_dir:
        path = Path(data_dir) / filename
        if path.is_file():
            return _read_utf8(path)
        raise DataError(f"{name}: ATQ_DATA_DIR is set but {path} does not exist")
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(
            f"cannot resolve {name!r}: set ATQ_DATA_DIR to a folder holding {filename}, "
            "or install `datasets` (pip install 'atq[data]') on a machine that can reach the hub"
        ) from None
    try:
        rows = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)["text"]
    except Exception as error:  # network, hub or cache failures all mean the same to the user
        raise DataError(
            f"cannot load {name!r} through datasets ({type(error).__name__}: {error}); "
            f"set ATQ_DATA_DIR to a folder holding {filename}"
        ) from error
    return "\n\n".join(rows)


def opening_token(tokenizer) -> int | None:
    """The BOS id when the tokenizer opens every sequence with it (Gemma; GGUF ``tokenizer.ggml.add_bos_token``,
    which transformers maps to ``add_bos_token``), else None (SmolLM2, GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    return bos if bos is not None and getattr(tokenizer, "add_bos_token", False) else None


def _text_ids(tokenizer, text: str, bos: int | None) -> torch.Tensor:
    """The text's token ids; without the opening BOS when ``bos`` is given (it is added per window), also for a
    plain callable tokenizer that takes no ``add_special_tokens``."""
    if bos is None:
        return tokenizer(text, return_tensors="pt").input_ids[0]
    try:
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    except TypeError:
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        return ids[1:] if len(ids) and int(ids[0]) == bos else ids


def token_windows(tokenizer, text: str, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Tokenize ``text`` once and cut it into non-overlapping windows (n, seq_len); the tail is dropped.

    Where the tokenizer opens sequences with BOS, every window opens with it and holds seq_len - 1 tokens of
    text: such a model (Gemma 3) reads a window without one as a broken input (WikiText-2 FP perplexity 61.5
    instead of 23.9 on Gemma 3 270M, 4 x 512 tokens), and llama.cpp's perplexity gives each chunk a BOS too."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    if max_windows is not None and max_windows < 1:
        raise DataError(f"max_windows must be >= 1 or None, got {max_windows}")
    bos = opening_token(tokenizer)
    ids = _text_ids(tokenizer, text, bos)
    width = seq_len - (bos is not None)
    n_windows = ids.numel() // width
    if n_windows == 0:
        raise DataError(f"text has {ids.numel()} tokens, fewer than one window of {seq_len}: give more text or a "
                        "smaller seq_len")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * width].reshape(n_windows, width)
    return windows if bos is None else torch.cat([torch.full((n_windows, 1), bos, dtype=windows.dtype), windows], 1)


def max_positions(model) -> int | None:
    """The longest sequence ``model`` has positions for (``max_position_embeddings``; GPT-2's ``n_positions``)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_seq_len(model, seq_len: int, what: str) -> None:
    """Raise DataError naming both numbers when windows of ``seq_len`` are longer than the model's positions:
    past them GPT-2 has no position embedding (an IndexError) and RoPE models extrapolate to a silently
    different number."""
    limit = max_positions(model)
    if limit is not None and seq_len > limit:
        raise DataError(f"{what}: seq_len {seq_len} is longer than the model's {limit} positions "
                        f"(max_position_embeddings {limit}); use seq_len <= {limit}")


def check_windows(windows: torch.Tensor, model, batch_size: int, what: str) -> None:
    """Raise DataError saying what is wrong with training ``windows`` (n, seq_len) for ``model``: none at all,
    fewer than one batch, windows with nothing to predict, ids the embedding does not have, too long."""
    if windows.ndim != 2 or windows.is_floating_point() or windows.is_complex():
        raise DataError(f"{what}: windows must be a 2-D tensor of token ids (windows, seq_len), "
                        f"got shape {tuple(windows.shape)} of {windows.dtype}")
    count, seq_len = windows.shape
    if count == 0:
        raise DataError(f"{what}: no training windows (shape {tuple(windows.shape)}): the data gave none; give "
                        "more text, more windows, or a shorter seq_len")
    if count < batch_size:
        raise DataError(f"{what}: {count} windows, fewer than batch_size {batch_size}: every batch would repeat "
                        "windows; give more data (more text or windows) or a smaller batch_size")
    if seq_len < 2:
        raise DataError(f"{what}: windows of {seq_len} token have no next token to predict; seq_len must be >= 2")
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embedding, "num_embeddings", None)
    if vocab is not None and (int(windows.max()) >= vocab or int(windows.min()) < 0):
        raise DataError(f"{what}: token ids from {int(windows.min())} to {int(windows.max())}, but the model's "
                        f"embedding has {vocab} rows: the windows were made with another tokenizer")
    check_seq_len(model, seq_len, what)


@torch.no_grad()
def generated_windows(
    model, tokenizer, n_windows: int, seq_len: int, batch_size: int = 32, seed: int = 0, quiet: bool = False
) -> torch.Tensor:
    """Data-free calibration text: windows sampled from the model itself (LLM-QAT).

    Each sequence starts from a random token drawn from the model's own next-token distribution after BOS (or
    uniformly when the tokenizer has no BOS) and is sampled at temperature 1 with the KV cache.
    """
    from tqdm.auto import tqdm

    if n_windows < 1 or seq_len < 2:
        raise DataError(f"generated data needs n_windows >= 1 and seq_len >= 2, got {n_windows} and {seq_len}")
    device = next(model.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    vocab = model.get_input_embeddings().weight.shape[0]
    bos = getattr(tokenizer, "bos_token_id", None)
    windows = []
    for start in tqdm(range(0, n_windows, batch_size), desc="generate", disable=quiet, unit="batch"):
        count = min(batch_size, n_windows - start)
        if bos is not None:
            probs = torch.softmax(model(torch.full((1, 1), bos, device=device)).logits[0, -1].float(), -1).cpu()
            first = torch.multinomial(probs, count, replacement=True, generator=generator)
        else:
            first = torch.randint(vocab, (count,), generator=generator)
        torch.manual_seed(int(torch.randint(2**31 - 1, (1,), generator=generator)))
        tokens = model.generate(
            first.unsqueeze(1).to(device), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
            max_new_tokens=seq_len - 1, min_new_tokens=seq_len - 1, pad_token_id=0,
        )
        windows.append(tokens[:, :seq_len].cpu())
    return torch.cat(windows)


def cached_generated_windows(
    model, tokenizer, n_windows: int, seq_len: int, cache: str | os.PathLike, batch_size: int = 32,
    seed: int = 0, quiet: bool = False,
) -> torch.Tensor:
    """``generated_windows`` written once to ``cache`` (safetensors, int32 tokens) and read back afterwards.

    Sampling is the slow part of data-free training and every resumed segment or extra process needs the same
    windows: the file records (windows, length, seed, model), so a cache made for other settings is regenerated,
    never silently reused. The write is atomic (``io.atomic_file``): a killed run leaves no half file.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    from .files import atomic_file

    path = Path(cache)
    source = str(getattr(getattr(model, "config", None), "_name_or_path", "")) or type(model).__name__
    meta = {"windows": str(n_windows), "seq_len": str(seq_len), "seed": str(seed), "model": source}
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                stored = handle.metadata() or {}
            if stored == meta:
                return load_file(str(path))["tokens"].long()
            log.info("%s was generated with %s, not %s: regenerating", path, stored, meta)
        except (SafetensorError, OSError) as error:
            log.warning("%s is unreadable (%s): regenerating", path, error)
    tokens = generated_windows(model, tokenizer, n_windows, seq_len, batch_size, seed, quiet)
    with atomic_file(path) as tmp:
        save_file({"tokens": tokens.to(torch.int32).contiguous()}, str(tmp), metadata=meta)
    return tokens
