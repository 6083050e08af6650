"""torch.compile for training: each decoder block compiled in place (or the whole model), uncompiled on exit."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .surgery import decoder_blocks

log = logging.getLogger(__name__)


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The model's decoder blocks (surgery.decoder_blocks), or none: then the whole model is compiled."""
    try:
        return decoder_blocks(model)[1]
    except ValueError:
        return []


@contextmanager
def compiled(model: nn.Module | None, mode: str) -> Iterator[nn.Module | None]:
    """``model`` to call under ``mode`` (see TrainConfig.compile). Blocks are compiled in place, which keeps the
    state_dict keys of checkpoints unchanged, and are uncompiled on exit: evaluation and packing afterwards see
    the plain model (other shapes, swapped layers) without recompiling."""
    if model is None or mode == "off":
        yield model
        return
    import torch._inductor.config as inductor

    blocks = _blocks(model) if mode == "blocks" else []
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
