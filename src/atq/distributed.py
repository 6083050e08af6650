"""torch.distributed for QAT. Data parallel: every process holds the whole model, takes every W-th window of the
global micro-batch and steps with the gradient averaged over the W processes. Sharded (FSDP2, ``shard``): the
same batches and the same averaged gradient, with weights, gradients and optimizer state split over the
processes. Without an initialised process group everything here is a no-op for one process."""

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


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model``'s parameters are FSDP2 shards (DTensors) rather than whole tensors."""
    import torch.distributed as dist

    if not dist.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """The whole value of a DTensor (a collective: every process must call it), a plain tensor as it is."""
    import torch.distributed as dist

    if not dist.is_available():
        return tensor
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def check_shardable(world: int) -> None:
    """Refuse sharding over fewer than two processes, before any model is loaded where the caller can."""
    if world < 2:
        raise ValueError("sharded training needs at least two processes (torchrun --nproc_per_node N, N >= 2); "
                         "one process trains the whole model without sharding: drop --shard")


def shard(model: nn.Module, blocks: list[nn.Module]) -> None:
    """FSDP2 (``fully_shard``): each decoder block, then the rest of ``model``, has its parameters split over the
    processes and gathered only for its own forward and backward. Weights, gradients and AdamW state per GPU
    then shrink to about 1/W, which is what lets a model whose training state exceeds one GPU train at all.
    Parameters stay fp32 (no mixed-precision policy): the numbers are those of data parallel, only the memory
    changes. Gradients are reduce-scattered as means, like ``average_gradients``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    _, world = rank_and_world()
    check_shardable(world)
    mesh = init_device_mesh(next(model.parameters()).device.type, (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)


def broadcast_object(value: object) -> object:
    """Rank 0's ``value`` on every process (the checkpoint's temporary directory, chosen by rank 0)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole state on rank 0, in CPU memory (an empty dict on the other processes): what
    freezing and saving the trained model needs. A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
