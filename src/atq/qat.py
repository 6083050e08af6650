"""Quantization-aware training: ternary linear layers with a straight-through estimator, trained with AdamW
(warm-up + cosine), gradient clipping and accumulation, optional logit distillation from the FP teacher, and
atomic checkpoints that resume to the same next-step loss as an uninterrupted run.

Batches are a pure function of (seed, step): a permutation per epoch drawn from a generator seeded by
(seed, epoch). A resumed run therefore needs no data-loader state beyond the step counter.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import QuantConfig
from .layers import PackedTernaryLinear, TernaryLinear
from .surgery import linear_weight, select_linear_layers, set_module

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    temperature: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")


def prepare_qat(model: nn.Module, config: QuantConfig) -> list[str]:
    """Replace the selected linear layers by TernaryLinear (latent FP weights, STE), in place.

    A model loaded from a PTQ artifact is trained from its ternary layers: their dequantized weights become
    the latent weights, so training starts where post-training quantization ended.
    """
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedTernaryLinear)}
    layers = packed or select_linear_layers(model, config)
    for name, module in layers.items():
        weight = module.dequantize(torch.float32) if name in packed else linear_weight(module).detach()
        set_module(model, name, TernaryLinear(weight, getattr(module, "bias", None), config).to(weight.device))
    model.atq_config = config
    return list(layers)


def to_packed(model: nn.Module) -> list[dict[str, Any]]:
    """Freeze a QAT model for inference: every TernaryLinear becomes a PackedTernaryLinear."""
    names = [name for name, module in model.named_modules() if isinstance(module, TernaryLinear)]
    for name in names:
        set_module(model, name, model.get_submodule(name).to_packed())
    model.atq_report = [{"name": n, "precision": "ternary"} for n in names]
    return model.atq_report


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero at ``config.steps``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def batch_indices(step: int, micro: int, n_windows: int, config: TrainConfig) -> torch.Tensor:
    """Window indices of micro-batch ``micro`` of ``step``: deterministic in (seed, step), so resumable."""
    per_step = config.batch_size * config.grad_accum
    start = step * per_step + micro * config.batch_size
    positions = torch.arange(start, start + config.batch_size)
    epochs, offsets = positions // n_windows, positions % n_windows
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(config.seed * 100003 + epoch))
        mask = epochs == epoch
        out[mask] = order[offsets[mask]]
    return out


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened distributions, scaled by T² (Hinton et al.)."""
    vocab = student_logits.shape[-1]
    student = F.log_softmax(student_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.float().reshape(-1, vocab) / temperature, dim=-1)
    return F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2


def _step_loss(student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=batch.is_cuda):
        logits = student(input_ids=batch).logits
        if teacher is None:
            return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        with torch.no_grad():
            target = teacher(input_ids=batch).logits
    return distillation_loss(logits, target, config.temperature)


def train(
    student: nn.Module,
    windows: torch.Tensor,
    config: TrainConfig,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    quiet: bool = False,
) -> list[dict[str, float]]:
    """Train ``student`` (after ``prepare_qat``) on token ``windows``; resumes from ``checkpoint_dir`` if it
    holds a checkpoint. Returns the per-step log (step, loss, lr)."""
    from .io import load_checkpoint, save_checkpoint

    device = next(student.parameters()).device
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    start, history = 0, []
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "train_state.pt").is_file():
        state = load_checkpoint(checkpoint_dir, student, optimizer)
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint_dir}: checkpoint was written with a different TrainConfig")
        start, history = state["step"], state["history"]
    if teacher is not None:
        teacher.eval()
    student.train()
    bar = tqdm(range(start, config.steps), desc="qat", disable=quiet, unit="step", initial=start, total=config.steps)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in range(config.grad_accum):
            batch = windows[batch_indices(step, micro, len(windows), config)].to(device)
            loss = _step_loss(student, teacher, batch, config) / config.grad_accum
            loss.backward()
            total += float(loss.detach())
        if config.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        optimizer.step()
        history.append({"step": step, "loss": total, "lr": optimizer.param_groups[0]["lr"]})
        bar.set_postfix(loss=f"{total:.4f}")
        done = step + 1
        if checkpoint_dir is not None and config.checkpoint_every and (
            done % config.checkpoint_every == 0 or done == config.steps
        ):
            save_checkpoint(checkpoint_dir, student, optimizer,
                            {"step": done, "history": history, "config": asdict(config)})
    student.eval()
    return history
