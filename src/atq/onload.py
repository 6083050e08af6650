"""Sequential onloading: a model held in CPU memory, calibrated with one decoder block at a time on the GPU.

Calibrated PTQ only ever works on one block (its Hessians, its GPTQ solve, its reconstruction) and on the
activations that flow between blocks, so the GPU needs one block, those activations and the Hessians, not the
model: the parts outside the blocks (embedding, rotary tables, final norm, head) come to the GPU to compute the
first block's inputs, then each block comes, is quantized, and goes back. This is how GPTQModel and
llm-compressor quantize models larger than the GPU. Parameters keep their identity when moved (tied weights stay
tied), and the arithmetic is the same as with the whole model on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

HEADROOM = 0.8  # the share of free GPU memory the whole model may take before blocks are onloaded instead


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def check_device(device: str | int | torch.device) -> torch.device:
    """``device`` as a torch.device that can hold a model here, or a ValueError naming it and the fix (before
    anything is changed: a model moved to ``meta`` would lose its weights)."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device {device!r} is not a device name ({error}); give 'cpu', 'cuda' or 'cuda:N'") from error
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: quantization runs on 'cpu' or 'cuda' ('meta' holds no values)")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: no CUDA GPU is visible here; give 'cpu' (or device='auto' in the CLI)")
    if parsed.type == "cuda" and (parsed.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return parsed


def check_onload(calibrated: bool, end_to_end: bool) -> None:
    """Refuse what onloading cannot do (callers check before the model changes): it moves blocks for calibration,
    so it needs calibration data, and end-to-end tuning trains all blocks at once."""
    if not calibrated:
        raise ValueError("onload brings decoder blocks to the device one at a time for calibration, and this "
                         "quantization has no calibration data: drop onload, or give calibration")
    if end_to_end:
        raise ValueError("end-to-end tuning trains the whole model at once, so it cannot run one block at a time: "
                         "quantize with end_to_end=None (end_to_end_steps=0) when the model does not fit the GPU")


def same_device(a: torch.device, b: torch.device) -> bool:
    """``cuda`` and ``cuda:0`` name the same device when the current device is 0; so do ``cpu`` and ``cpu:0``."""
    def index(d: torch.device) -> int:
        return d.index if d.index is not None else (torch.cuda.current_device() if d.type == "cuda" else 0)

    return a.type == b.type and index(a) == index(b)


def fits(model: nn.Module, device: torch.device) -> bool:
    """Whether ``model`` fits on ``device`` whole, leaving room for activations: on a GPU, at most HEADROOM of its
    free memory; anything fits on the CPU."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return tensor_bytes(model) <= HEADROOM * free


def outside(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The modules of ``model`` that hold tensors of their own and are not inside a decoder block (embedding,
    norms, rotary tables, head, a stream rotation)."""
    inside = {id(m) for block in blocks for m in block.modules()}
    return [m for m in model.modules() if id(m) not in inside
            and any(True for _ in [*m.parameters(recurse=False), *m.buffers(recurse=False)])]


@contextlib.contextmanager
def onloaded(modules: list[nn.Module], device: torch.device, home: torch.device, whole: bool) -> Iterator[None]:
    """``modules`` on ``device`` for the duration, then back on ``home`` (also what was created inside them
    meanwhile, such as packed layers replacing linear ones). ``whole``: move each module with its children (a
    decoder block); otherwise only its own tensors (the parts outside the blocks)."""
    def move(target: torch.device) -> None:
        for module in modules:
            module._apply(lambda t: t.to(target), recurse=whole)

    move(device)
    try:
        yield
    finally:
        move(home)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the next block gets the memory this one held
