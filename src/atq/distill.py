"""The QAT losses: KL distillation from the FP teacher's logits (its gradient computed in the forward): the plain
forward KL or BitDistiller's confidence-aware mix of both directions (CAKLD); an optional MSE between hidden
states; and next-token cross-entropy when there is no teacher."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from .qat import TrainConfig


class _DistillationKL(torch.autograd.Function):
    """(1 - w)·KL(teacher || student) + w·KL(student || teacher) whose forward also computes its gradient.

    The forward KL's gradient is T·(softmax(s/T) - softmax(t/T))/rows; the reverse KL's is T·p_s·(log p_s -
    log p_t - KL_row(s || t))/rows. Autograd through two log_softmax calls would re-read the logits (or keep fp32
    log-probabilities) for a backward of its own; here the backward is one multiply of a gradient saved in the
    logits' dtype (what autograd hands back anyway), and under torch.compile the forward fuses into a pass or two
    over the two logit tensors. The price is one logits-sized tensor kept alive until the backward. Throughput and
    peak memory with and without it: results/qat_throughput_h100.json (``rows`` against ``rows_before_fused_kl``).
    ``weight`` None is the plain logit KL (w = 0, the reverse term never computed); ``"confidence"`` is w = the
    mean over the rows of the teacher's top probability (CAKLD's γ, per micro-batch); a number is w itself.
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float,
                weight: float | str | None) -> torch.Tensor:
        scaled_s, scaled_t = student.float() / temperature, teacher.float() / temperature
        log_s = scaled_s - torch.logsumexp(scaled_s, dim=-1, keepdim=True)
        log_t = scaled_t - torch.logsumexp(scaled_t, dim=-1, keepdim=True)
        p_s, p_t, rows = log_s.exp(), log_t.exp(), student.shape[0]
        loss, grad = (p_t * (log_t - log_s)).sum(), p_s - p_t
        if weight is not None:
            gamma = p_t.amax(dim=-1).mean() if weight == "confidence" else weight
            ratio = log_s - log_t
            reverse = (p_s * ratio).sum(dim=-1, keepdim=True)  # KL(student || teacher) of each row
            loss = (1 - gamma) * loss + gamma * reverse.sum()
            grad = (1 - gamma) * grad + gamma * p_s * (ratio - reverse)
        ctx.save_for_backward((grad * (temperature / rows)).to(student.dtype))
        return loss * (temperature**2 / rows)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, mean over positions, scaled by T² (Hinton
    et al.); the teacher gets no gradient."""
    vocab = student_logits.shape[-1]
    return _DistillationKL.apply(student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab),
                                 temperature, None)


def confidence_aware_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                          confidence: float | None = None) -> torch.Tensor:
    """BitDistiller's confidence-aware KL (CAKLD): γ·KL(student || teacher) + (1 - γ)·KL(teacher || student),
    on temperature-softened distributions, mean over positions, scaled by T²; the teacher gets no gradient.

    γ is the teacher's confidence, the mean over tokens of its top probability: a confident teacher (γ near 1)
    gets the mode-seeking reverse KL, an unsure one the mean-seeking forward KL, which spreads the student over
    every token the teacher finds plausible. The weighting is BitDistiller's code (``cakld_loss`` in
    train/mytrainer.py: ``mean_prob * reverse_kl + (1 - mean_prob) * forward_kl``, its ``reverse_kl`` being
    KL(student || teacher)); γ = 0 is ``distillation_loss``. BitDistiller estimates γ once, on its training data
    before training (``teacher_confidence`` here); ``confidence=None`` estimates it on each micro-batch instead
    (detached: γ is a weight, not something to train), which needs no pass over the data and no state to resume.
    """
    vocab = student_logits.shape[-1]
    return _DistillationKL.apply(student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab),
                                 temperature, "confidence" if confidence is None else float(confidence))


@torch.no_grad()
def teacher_confidence(teacher: nn.Module, windows: torch.Tensor, batch_size: int = 8, max_batches: int = 20,
                       temperature: float = 1.0) -> float:
    """CAKLD's γ estimated once, as BitDistiller does before training: the mean over the tokens of the first
    ``max_batches`` batches of ``windows`` of the teacher's top probability (at ``temperature``, as the loss sees
    it). Rounded to 4 decimals, so that a resumed run, which estimates it again, finds the same TrainConfig."""
    device = next(teacher.parameters()).device
    total, count = 0.0, 0
    for start in range(0, min(len(windows), batch_size * max_batches), batch_size):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = teacher(input_ids=windows[start : start + batch_size].to(device), use_cache=False).logits
        top = torch.softmax(logits.float() / temperature, dim=-1).amax(dim=-1)
        total, count = total + float(top.sum()), count + top.numel()
    return round(total / count, 4)


@functools.cache
def _compiled(loss: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``loss`` through torch.compile, wrapped once per process and loss (compiled at its first call)."""
    return torch.compile(loss)


def step_loss(student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The loss of one micro-batch of token windows: distillation from ``teacher`` (plus ``config.hidden_weight``
    times the mean hidden-state MSE), or next-token cross-entropy without one. ``student`` and ``teacher`` are
    what ``compilation.compiled`` yields for ``config.compile``, and the distillation loss is compiled with them.
    """
    hidden = config.hidden_weight > 0 and teacher is not None
    kl, extra = (distillation_loss, ()) if config.loss == "kl" else (confidence_aware_loss, (config.confidence,))
    kl = kl if config.compile == "off" else _compiled(kl)
    # no KV cache: nothing is generated, and the cache's per-layer bookkeeping breaks compiled blocks apart
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.is_cuda):
        output = student(input_ids=batch, output_hidden_states=hidden, use_cache=False)
        logits = output.logits
        if teacher is None:
            return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        with torch.no_grad():
            target = teacher(input_ids=batch, output_hidden_states=hidden, use_cache=False)
    loss = kl(logits, target.logits, config.temperature, *extra)
    if hidden:
        pairs = list(zip(output.hidden_states[1:], target.hidden_states[1:]))
        loss = loss + config.hidden_weight * sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / len(pairs)
    return loss
