"""Training checkpoints: the model's latent weights, the optimizer and the loop's state in one torch file, or,
for a sharded (FSDP2) run, in torch.distributed.checkpoint's per-process files beside it.

Written with the same temp-dir-and-swap as artifacts, so a run killed mid-write keeps its previous checkpoint;
read back with ``weights_only=True`` (no arbitrary unpickling).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import barrier, broadcast_object, is_sharded, rank_and_world
from .files import atomic_directory
from .io import ArtifactError

TRAIN_STATE = "train_state.pt"


def has_checkpoint(directory: str | os.PathLike) -> bool:
    return (Path(directory) / TRAIN_STATE).is_file()


def check_directory(directory: str | os.PathLike) -> None:
    """Raise FileExistsError where ``directory`` cannot take checkpoints (a file, or a directory holding
    something else): ``train`` calls it before its first step, not at its first checkpoint."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} is a file, not a checkpoint directory; give another path "
                              "(nothing was written)")
    if directory.is_dir() and any(directory.iterdir()) and not has_checkpoint(directory):
        raise FileExistsError(f"{directory} exists and holds no training checkpoint; refusing to write into it. "
                              "Choose a new or empty directory")


def save_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Atomic training checkpoint: model (latent weights), optimizer and ``state`` (step, log, config). Every
    process calls it: unsharded, rank 0 writes one torch file; sharded (FSDP2), each process writes its shards
    through torch.distributed.checkpoint into the directory rank 0 publishes once all are written."""
    directory = Path(directory)
    rank, world = rank_and_world()
    if is_sharded(model):
        _save_sharded(directory, model, optimizer, state, rank, world)
    elif rank == 0:
        with atomic_directory(directory, has_checkpoint) as tmp:  # replaces only an earlier checkpoint
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
                       tmp / TRAIN_STATE)
    return directory


def _save_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                  rank: int, world: int) -> None:
    from torch.distributed.checkpoint import save
    from torch.distributed.checkpoint.state_dict import get_state_dict

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_directory(directory, has_checkpoint)) if rank == 0 else None
        tmp = Path(broadcast_object(None if tmp is None else str(tmp)))
        model_state, optimizer_state = get_state_dict(model, optimizer)
        save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        if rank == 0:
            torch.save({"state": state, "sharded_over": world}, tmp / TRAIN_STATE)
        barrier(world)  # every shard is on disk before rank 0 publishes the directory
    barrier(world)  # published before any process goes on


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint into ``model`` and ``optimizer`` (every process calls it); returns the ``state`` it was
    saved with. A sharded checkpoint resumes a sharded model only, and the other way round."""
    path = Path(directory) / TRAIN_STATE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files all mean one thing to the user
        raise ArtifactError(f"{path}: unreadable training checkpoint ({error})") from error
    sharded_over = saved.get("sharded_over")
    if (sharded_over is not None) != is_sharded(model):
        written = f"by a sharded run over {sharded_over} processes" if sharded_over else "by an unsharded run"
        raise ArtifactError(f"{directory}: the checkpoint was written {written}; resume it the same way "
                            f"({'with' if sharded_over else 'without'} --shard), or train into a new directory")
    if sharded_over is None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
    else:
        _load_sharded(Path(directory), model, optimizer)
    return saved["state"]


def _load_sharded(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """torch.distributed.checkpoint reads each process's shards (any process count: it re-shards on load)."""
    from torch.distributed.checkpoint import load
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    try:
        load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=directory)
    except Exception as error:
        raise ArtifactError(f"{directory}: unreadable sharded training checkpoint ({error})") from error
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state)


def same_config(saved: dict[str, Any], config: Any) -> bool:
    """Whether a checkpoint's saved config (a dataclass's ``asdict``) is ``config``'s; a field added to the class
    since the checkpoint was written counts as its default, so older checkpoints resume as the run they were."""
    defaults = {f.name: f.default for f in dataclasses.fields(config) if f.default is not dataclasses.MISSING}
    return {**defaults, **saved} == dataclasses.asdict(config)
