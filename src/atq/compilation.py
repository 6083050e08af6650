"""torch.compile for training: each decoder block compiled in place (or the whole model), uncompiled on exit."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger(__name__)


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the model's ModuleLists whose members are all of one class: its decoder blocks.

    Not ``surgery.decoder_blocks``: that one asks for blocks holding ``nn.Linear``/``Conv1D`` layers, and a model
    prepared for QAT holds TernaryLinear layers instead.
    """
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            blocks.extend(module)
    return blocks


@contextmanager
def compiled(model: nn.Module | None, mode: str) -> Iterator[nn.Module | None]:
    """``model`` to call under ``mode`` (see TrainConfig.compile). Blocks are compiled in place, which keeps the
    state_dict keys of checkpoints unchanged, and are uncompiled on exit: evaluation and packing afterwards see
    the plain model (other shapes, swapped layers) without recompiling."""
    if model is None or mode == "off":
        yield model
        return
    import torch._inductor.config as inductor

    blocks = _repeated_blocks(model) if mode == "blocks" else []
    if mode == "blocks" and not blocks:
        log.info("%s has no repeated blocks: compiling the whole model", type(model).__name__)
    for block in blocks:
        block.compile()
    # Inductor drops a float -> fp16 -> float round trip unless told not to; the forward must see the fp16
    # scales the artifact will hold (layers.TernaryLinear), or the compiled run trains a slightly different model.
    try:
        with inductor.patch(emulate_precision_casts=True):
            yield model if blocks else torch.compile(model)
    finally:
        for block in blocks:
            block._compiled_call_impl = None  # what nn.Module.compile set; None is the uncompiled call
