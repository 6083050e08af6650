"""Atomic writes and checksums: the file-level guarantees every writer in ATQ shares (artifacts, checkpoints,
JSON results, exports).

- A reader never sees half a file or half a directory: everything is written into a fresh hidden sibling,
  fsynced, and published by one atomic rename (a directory that already exists is swapped with the new one in a
  single ``renameat2(RENAME_EXCHANGE)``), so a kill at any instant leaves the old version or the new one.
- Nothing a user owns is replaced unless the caller says it may be (``may_replace``); a directory that is
  neither empty nor recognised is refused with an error naming it.
- A kill leaves at most a hidden ``.NAME.atq-tmp-PID-*`` sibling; the next write next to it removes those whose
  process is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

_TMP = ".atq-tmp-"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):  # files before the directories that hold them
        _fsync(path)
    _fsync(root)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` that killed writers left (their process is gone)."""
    removed = []
    for leftover in path.parent.glob(f".{path.name}{_TMP}*"):
        pid = leftover.name.removeprefix(f".{path.name}{_TMP}").split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
            removed.append(leftover)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def check_replaceable(path: Path, may_replace: Callable[[Path], bool]) -> None:
    """Raise FileExistsError naming ``path`` unless a write may put a directory there (callers check early, before
    slow work, and atomic_directory checks again)."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()) and not may_replace(path):
        raise FileExistsError(f"{path} exists and is not something this command writes; refusing to replace it. "
                              "Choose a new or empty directory, or ask to overwrite it (--overwrite).")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; give a directory path (nothing was written)")


def _publish(tmp: Path, directory: Path) -> None:
    if directory.exists() and any(directory.iterdir()):
        if not _exchange(tmp, directory):  # no atomic exchange here: the old copy is out of the way briefly
            os.replace(directory, tmp.with_name(tmp.name + "-old"))
            os.replace(tmp, directory)
            tmp = tmp.with_name(tmp.name + "-old")
        shutil.rmtree(tmp, ignore_errors=True)  # the old version, now at the temporary name
    else:
        if directory.exists():
            directory.rmdir()
        os.rename(tmp, directory)
    _fsync(directory.parent)


@contextlib.contextmanager
def atomic_directory(directory: str | os.PathLike,
                     may_replace: Callable[[Path], bool] = lambda path: False) -> Iterator[Path]:
    """Yield a fresh hidden sibling of ``directory`` to write into; on success it is fsynced and published at
    ``directory`` in one atomic step, replacing what is there only if ``may_replace(directory)``; on an error
    it is removed and ``directory`` is untouched. Checked before anything is written."""
    directory = Path(directory)
    check_replaceable(directory, may_replace)
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(error.errno, f"{directory}: cannot write there ({error.strerror})") from error
    remove_leftovers(directory)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}{_TMP}{os.getpid()}-", dir=directory.parent))
    except OSError as error:
        raise OSError(error.errno, f"{directory}: cannot write there ({error.strerror})") from error
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on success it is fsynced and renamed to ``path``, on any
    error it is removed: readers never see half a file, and a failed write leaves nothing behind."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; give a file path (nothing was written)")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = path.with_name(f".{path.name}{_TMP}{os.getpid()}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike, data: Any) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
