"""Read a GGUF file's tensor table and raw tensor bytes, whatever the tensor types.

The gguf package's reader refuses tensor types it does not know (0.19.0 does not know Q2_0), and the export must
read back what it wrote to check it. The format (llama.cpp's docs/gguf.md): magic ``GGUF``, version, tensor and
key-value counts; the key-values; per tensor its name, dims (innermost first), type and offset; then the data,
aligned to ``general.alignment`` (default 32), each offset counted from the data's start.
"""

from __future__ import annotations

import os
import struct
from typing import IO, NamedTuple

import numpy as np

from .q2_0 import BLOCK, BLOCK_BYTES, GGML_TYPE

# value type -> struct format of a scalar (8: string, 9: array are read apart)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class GGUFTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy order: rows first (the file stores the innermost dimension first)
    ggml_type: int
    offset: int  # where its bytes start in the file
    data: np.ndarray  # the tensor's raw bytes (uint8)


def _sizes() -> dict[int, tuple[int, int]]:
    """ggml type -> (weights per block, bytes per block): the gguf package's table, plus Q2_0, which it lacks."""
    from gguf.constants import GGML_QUANT_SIZES

    return {int(kind): size for kind, size in GGML_QUANT_SIZES.items()} | {GGML_TYPE: (BLOCK, BLOCK_BYTES)}


def _read(handle: IO[bytes], fmt: str) -> object:
    size = struct.calcsize("<" + fmt)
    raw = handle.read(size)
    if len(raw) != size:
        raise ValueError("truncated GGUF file")
    return struct.unpack("<" + fmt, raw)[0]


def _string(handle: IO[bytes]) -> str:
    length = _read(handle, "Q")
    raw = handle.read(length)
    if len(raw) != length:
        raise ValueError("truncated GGUF file")
    return raw.decode("utf-8")


def _value(handle: IO[bytes], kind: int) -> object:
    if kind == 8:
        return _string(handle)
    if kind == 9:
        inner, count = _read(handle, "I"), _read(handle, "Q")
        return [_value(handle, inner) for _ in range(count)]
    if kind not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {kind}")
    return _read(handle, _SCALARS[kind])


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, object], dict[str, GGUFTensor]]:
    """(metadata, tensors by name) of the GGUF file at ``path``; tensor bytes are memory-mapped."""
    with open(path, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        try:
            return _parse(path, handle)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error


def _parse(path: str | os.PathLike, handle: IO[bytes]) -> tuple[dict[str, object], dict[str, GGUFTensor]]:
    """read_gguf past the magic; ValueErrors name what is wrong, read_gguf adds the path."""
    _read(handle, "I")  # version
    n_tensors, n_kv = _read(handle, "Q"), _read(handle, "Q")
    metadata = {}
    for _ in range(n_kv):
        key = _string(handle)
        metadata[key] = _value(handle, _read(handle, "I"))
    infos = []
    for _ in range(n_tensors):
        name = _string(handle)
        dims = [_read(handle, "Q") for _ in range(_read(handle, "I"))]
        infos.append((name, tuple(reversed(dims)), _read(handle, "I"), _read(handle, "Q")))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-handle.tell() // alignment) * alignment
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    sizes = _sizes()
    tensors = {}
    for name, shape, kind, offset in infos:
        if kind not in sizes:
            raise ValueError(f"tensor {name} has ggml type {kind}, which this reader does not size")
        block, block_bytes = sizes[kind]
        nbytes = int(np.prod(shape)) // block * block_bytes
        if start + offset + nbytes > raw.size:
            raise ValueError(f"truncated GGUF file: tensor {name} ends past the end of the file")
        tensors[name] = GGUFTensor(name, shape, kind, start + offset, raw[start + offset : start + offset + nbytes])
    return metadata, tensors
