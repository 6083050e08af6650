"""Which card a benchmark ran on: the name every results JSON records, and the per-card results file.

Timings are per card (an H100's and an H200's differ by up to 1.4x on memory-bound work), so a benchmark that
times writes ``results/<stem>_<card>.json`` for the card it ran on, and records the card's full name in it.
"""

from __future__ import annotations

import re

import torch

from atq.flags import device_description

CARDS = ("h200", "h100", "a100", "l40s")


def device_name(device: str = "cuda") -> str:
    """The GPU's name for a run on ``device`` ("cuda", "cuda:1", ...), else "cpu" (also for "cuda" on a machine
    without one: a benchmark's default device names the GPU it hopes for)."""
    return device_description(device if torch.cuda.is_available() else "cpu")


def results_path(stem: str) -> str:
    """results/<stem>_<card>.json for the GPU this runs on (h100, h200, ...; "cpu" without one)."""
    name = device_name()
    card = next((short for short in CARDS if short in name.lower()), None)
    return f"results/{stem}_{card or re.sub(r'[^a-z0-9]+', '_', name.lower())}.json"
