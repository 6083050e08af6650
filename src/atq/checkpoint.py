"""Training checkpoints: the model's latent weights, the optimizer and the loop's state in one torch file.

Written with the same temp-dir-and-swap as artifacts, so a run killed mid-write keeps its previous checkpoint;
read back with ``weights_only=True`` (no arbitrary unpickling).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

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
    """Atomic training checkpoint: model (latent weights), optimizer and ``state`` (step, log, config)."""
    directory = Path(directory)
    with atomic_directory(directory, has_checkpoint) as tmp:  # replaces only an earlier checkpoint
        torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "state": state},
                   tmp / TRAIN_STATE)
    return directory


def load_checkpoint(directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint into ``model`` and ``optimizer``; returns the ``state`` it was saved with."""
    path = Path(directory) / TRAIN_STATE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files all mean one thing to the user
        raise ArtifactError(f"{path}: unreadable training checkpoint ({error})") from error
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return saved["state"]
