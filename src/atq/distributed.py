"""torch.distributed for QAT, data parallel: every process holds the whole model, takes every W-th window of the
global micro-batch and steps with the gradient averaged over the W processes. Without an initialised process
group everything here is a no-op for one process."""

from __future__ import annotations

import torch
from torch import nn


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def average_gradients(params: list[nn.Parameter], world: int) -> None:
    """All-reduce the gradients as one flat buffer and divide by the world size: every process then steps
    with the gradient of the global batch (each process's loss is the mean over an equal share of it)."""
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()


def average(tensor: torch.Tensor, world: int) -> None:
    """Replace ``tensor`` by its mean over the processes, in place."""
    import torch.distributed as dist

    dist.all_reduce(tensor)
    tensor /= world


def barrier(world: int) -> None:
    """Wait for every process (rank 0 writes files; the others must not run ahead of a checkpoint)."""
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
