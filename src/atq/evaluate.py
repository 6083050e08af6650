"""Perplexity with the GPTQ protocol, and token-level top-1 accuracy.

Protocol: tokenize the whole text once, cut non-overlapping windows of ``seq_len``, take each window's mean
next-token NLL, and report exp(mean over windows). Losses are computed in float32 whatever the model dtype.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import DataError, check_seq_len, load_text, token_windows


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def evaluate_windows(model: nn.Module, windows: torch.Tensor, batch_size: int = 1, quiet: bool = False) -> dict:
    """Mean NLL per window -> perplexity, plus top-1 next-token accuracy over all predicted tokens."""
    if windows.ndim != 2 or len(windows) == 0 or windows.shape[1] < 2:
        raise DataError(f"evaluate: windows must be (n >= 1, seq_len >= 2) token ids, got shape {tuple(windows.shape)}")
    check_seq_len(model, windows.shape[1], "evaluate")
    device = _device_of(model)
    window_losses, correct, predicted = [], 0, 0
    for start in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=quiet, unit="batch"):
        batch = windows[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        targets = batch[:, 1:]
        # Flat (tokens, vocab) layout: torch's (N, C, L) cross-entropy path is measurably less precise on CPU.
        losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        window_losses.append(losses.view_as(targets).double().mean(dim=1).cpu())
        correct += int((logits.argmax(dim=-1) == targets).sum())
        predicted += targets.numel()
    nll = float(torch.cat(window_losses).mean())
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "token_accuracy": correct / predicted,
        "windows": len(windows),
        "tokens": int(windows.numel()),
    }


def evaluate(
    model: nn.Module,
    tokenizer,
    source: str | os.PathLike = "wikitext2",
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    quiet: bool = False,
) -> dict:
    check_seq_len(model, seq_len, "evaluate")  # before reading and tokenizing the text
    windows = token_windows(tokenizer, load_text(source), seq_len, max_windows)
    return evaluate_windows(model, windows, batch_size=batch_size, quiet=quiet) | {"seq_len": seq_len}


def perplexity(
    model: nn.Module,
    tokenizer,
    source: str | os.PathLike = "wikitext2",
    seq_len: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 1,
    quiet: bool = False,
) -> float:
    """WikiText-2 (or any text) perplexity of ``model`` under the GPTQ protocol."""
    return evaluate(model, tokenizer, source, seq_len, max_windows, batch_size, quiet)["ppl"]


def llama_cpp_perplexity(llm, windows: torch.Tensor) -> float:
    """The same perplexity as ``evaluate_windows``, from llama.cpp's logits for the same token ids: ``llm`` is a
    ``llama_cpp.Llama`` opened with ``logits_all=True`` and ``n_ctx`` at least the window length. For comparing a
    GGUF in llama.cpp with the model in ATQ on identical tokens (benchmarks/gguf_smollm2.py, fp_vs_llama_cpp.py)."""
    import numpy as np

    losses = []
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        losses.append(-logp[np.arange(len(window) - 1), window[1:]].mean())
    return math.exp(float(np.mean(losses)))
