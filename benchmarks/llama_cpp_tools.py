"""llama.cpp's own programs, run from the benchmarks: its decode benchmarks and its quantizer.

The programs come from a llama.cpp build (``../shared/tools/llama_cpp_src.sh`` packs the source that
llama-cpp-python 0.3.36 vendors; its header gives the CUDA build). ``bin_dir`` holds the programs and their shared
libraries (``build/bin``). Every call checks the program's exit status and returns what it printed.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from atq.files import atomic_file


def run(bin_dir: str | os.PathLike, program: str, *args: object, timeout: float = 600) -> str:
    """Run ``program`` of ``bin_dir`` with ``args``; what it printed (stdout, then stderr: llama.cpp's LOG writes
    some results to either), or a RuntimeError with the end of its output."""
    path = Path(bin_dir) / program
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such llama.cpp program (build it: ../shared/tools/llama_cpp_src.sh)")
    env = os.environ | {"LD_LIBRARY_PATH": f"{bin_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    done = subprocess.run([str(path), *map(str, args)], check=False, capture_output=True, text=True, timeout=timeout,
                          env=env)
    if done.returncode:
        raise RuntimeError(f"{program} {' '.join(map(str, args))} exited {done.returncode}: "
                           f"{(done.stdout + done.stderr)[-1500:]}")
    return done.stdout + "\n" + done.stderr


def _jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def decode_speed(bin_dir: str | os.PathLike, gguf: str | os.PathLike, new_tokens: int = 128,
                 batches: tuple[int, ...] = (1, 16), prompt: int = 32) -> list[dict]:
    """llama.cpp's decode tokens/s for ``gguf`` fully on the GPU: batch 1 from ``llama-bench`` (its tg test, 3
    repetitions) and every batch from ``llama-batched-bench`` (``batches`` sequences of ``prompt`` tokens, then
    ``new_tokens`` each; S_TG counts the new tokens of all sequences)."""
    rows = []
    for line in _jsonl(run(bin_dir, "llama-bench", "-m", gguf, "-ngl", 99, "-p", 0, "-n", new_tokens, "-r", 3,
                           "-o", "jsonl")):
        rows.append({"tool": "llama-bench", "batch": 1, "tokens_per_s": line["avg_ts"],
                     "ms_per_step": 1e3 / line["avg_ts"], "stdev_tokens_per_s": line.get("stddev_ts")})
    context = max(batches) * (prompt + new_tokens) + 64
    for line in _jsonl(run(bin_dir, "llama-batched-bench", "-m", gguf, "-ngl", 99, "-c", context, "-npp", prompt,
                           "-ntg", new_tokens, "-npl", ",".join(map(str, batches)), "--output-format", "jsonl")):
        rows.append({"tool": "llama-batched-bench", "batch": line["pl"], "tokens_per_s": line["speed_tg"],
                     "ms_per_step": 1e3 * line["t_tg"] / new_tokens})
    return rows


def quantize(bin_dir: str | os.PathLike, source: str | os.PathLike, out: str | os.PathLike, kind: str,
             imatrix: str | os.PathLike | None = None) -> str:
    """``llama-quantize`` ``source`` to type ``kind`` (requantizing a quantized source where needed), with an
    importance matrix if given; returns its log (which lists each tensor's type, fallbacks included)."""
    with atomic_file(out) as part:  # renamed once complete: a cut-short run leaves no file that looks finished
        return run(bin_dir, "llama-quantize", "--allow-requantize", *(["--imatrix", imatrix] if imatrix else []),
                   source, part, kind)


def importance_matrix(bin_dir: str | os.PathLike, gguf: str | os.PathLike, text: str | os.PathLike,
                      out: str | os.PathLike, chunks: int, context: int = 2048, timeout: float = 7200) -> str:
    """``llama-imatrix`` of ``gguf`` over the first ``chunks`` x ``context`` tokens of the text file ``text`` (on a
    2-core CPU 128 chunks of SmolLM2 take about half an hour; on a GPU seconds)."""
    # renamed once complete, like atomic_file's, but ending in .gguf: llama-imatrix picks its format by the suffix
    part = Path(f"{out}.part.gguf")
    log = run(bin_dir, "llama-imatrix", "-m", gguf, "-f", text, "-o", part, "-c", context, "--chunks", chunks,
              "-ngl", 99, timeout=timeout)
    os.replace(part, out)
    return log
