"""The QAT losses: KL distillation from the FP teacher's logits (its gradient computed in the forward), an
optional MSE between hidden states, and next-token cross-entropy when there is no teacher."""

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
    """KL(teacher || student) whose forward also computes its gradient, T·(softmax(s/T) - softmax(t/T))/rows.

    Autograd through two log_softmax calls would re-read the logits (or keep fp32 log-probabilities) for a
    backward of its own; here the backward is one multiply of a gradient saved in the logits' dtype (what autograd
    hands back anyway), and under torch.compile the forward fuses into a pass or two over the two logit tensors.
    The price is one logits-sized tensor kept alive until the backward. Throughput and peak memory with and
    without it: results/qat_throughput_h100.json (``rows`` against ``rows_before_fused_kl``).
    """

    @staticmethod
    def forward(ctx, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        scaled_s, scaled_t = student.float() / temperature, teacher.float() / temperature
        log_s = scaled_s - torch.logsumexp(scaled_s, dim=-1, keepdim=True)
        log_t = scaled_t - torch.logsumexp(scaled_t, dim=-1, keepdim=True)
        p_t, rows = log_t.exp(), student.shape[0]
        ctx.save_for_backward(((log_s.exp() - p_t) * (temperature / rows)).to(student.dtype))
        return (p_t * (log_t - log_s)).sum() * (temperature**2 / rows)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, mean over positions, scaled by T² (Hinton
    et al.); the teacher gets no gradient."""
    vocab = student_logits.shape[-1]
    return _DistillationKL.apply(student_logits.reshape(-1, vocab), teacher_logits.detach().reshape(-1, vocab),
                                 temperature)


@functools.cache
def _compiled_distillation_loss() -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    """``distillation_loss`` through torch.compile, wrapped once per process (compiled at its first call)."""
    return torch.compile(distillation_loss)


def step_loss(student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The loss of one micro-batch of token windows: distillation from ``teacher`` (plus ``config.hidden_weight``
    times the mean hidden-state MSE), or next-token cross-entropy without one. ``student`` and ``teacher`` are
    what ``compilation.compiled`` yields for ``config.compile``, and the distillation loss is compiled with them.
    """
    hidden = config.hidden_weight > 0 and teacher is not None
    kl = distillation_loss if config.compile == "off" else _compiled_distillation_loss()
    # no KV cache: nothing is generated, and the cache's per-layer bookkeeping breaks compiled blocks apart
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.is_cuda):
        output = student(input_ids=batch, output_hidden_states=hidden, use_cache=False)
        logits = output.logits
        if teacher is None:
            return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        with torch.no_grad():
            target = teacher(input_ids=batch, output_hidden_states=hidden, use_cache=False)
    loss = kl(logits, target.logits, config.temperature)
    if hidden:
        pairs = list(zip(output.hidden_states[1:], target.hidden_states[1:]))
        loss = loss + config.hidden_weight * sum(F.mse_loss(s.float(), t.float()) for s, t in pairs) / len(pairs)
    return loss
