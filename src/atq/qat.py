"""Quantization-aware training: ternary linear layers with a straight-through estimator, trained with AdamW
(warm-up + cosine), gradient clipping and accumulation, optional logit distillation from the FP teacher, and
atomic checkpoints that resume to the same next-step loss as an uninterrupted run.

Batches are a pure function of (seed, step): a permutation per epoch drawn from a generator seeded by
(seed, epoch). A resumed run therefore needs no data-loader state beyond the step counter.

The loop is here; losses: distill.py, torch.compile: compilation.py, torch.distributed (data parallel, FSDP2):
distributed.py, files: checkpoint.py."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import checkpoint
from .checks import choice, first_error, integer, real
from .compilation import compiled
from .config import COMPILE_MODES, QuantConfig
from .data import check_windows
from .distill import confidence_aware_loss, distillation_loss, step_loss, teacher_confidence
from .distributed import average, average_gradients, barrier, full_value, is_sharded, rank_and_world
from .files import write_json
from .layers import PackedTernaryLinear, TernaryLinear
from .surgery import linear_weight, select_linear_layers, set_module

__all__ = ["MAX_SKIPPED_STEPS", "TrainConfig", "batch_indices", "compiled", "confidence_aware_loss",
           "distillation_loss", "learning_rate", "prepare_qat", "step_loss", "teacher_confidence", "to_packed", "train"]

log = logging.getLogger(__name__)

# Consecutive steps with a non-finite gradient that are skipped before training gives up (a bf16 overflow is a
# passing event, like a skipped step under a loss scaler; many in a row mean the weights are broken).
MAX_SKIPPED_STEPS = 8


@dataclass(frozen=True)
class TrainConfig:
    """One training run. ``batch_size`` windows per micro-batch (the *global* micro-batch: under torch.distributed
    each of the W processes takes every W-th window of it), ``grad_accum`` micro-batches per step.
    ``hidden_weight`` > 0 adds that times the mean MSE between student and teacher hidden states to the logit
    KL. ``compile`` runs student, teacher and loss through ``torch.compile``: ``"blocks"`` compiles each
    decoder block on its own (the blocks share one compiled graph, so compile time does not grow with depth,
    and every resumed segment pays it again), ``"model"`` the whole model; ``True``/``False`` mean
    ``"blocks"``/``"off"``. ``loss``: ``"kl"`` the logit KL(teacher || student), ``"cakld"`` BitDistiller's
    confidence-aware KL (``distill.confidence_aware_loss``) with γ = ``confidence``, or estimated per micro-batch
    when None (``distill.teacher_confidence`` estimates it once, as BitDistiller does)."""

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
    hidden_weight: float = 0.0
    compile: str = "off"
    loss: str = "kl"
    confidence: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):
            object.__setattr__(self, "compile", "blocks" if self.compile else "off")
        if (error := first_error(asdict(self), _TRAIN_CHECKS, lambda name: f"TrainConfig.{name}")) is not None:
            raise ValueError(error)
        if self.confidence is not None and self.loss != "cakld":
            raise ValueError(f"TrainConfig.confidence is CAKLD's γ, but loss is {self.loss!r}: give loss='cakld'")


_TRAIN_CHECKS = {  # each field's range (checks.py: the messages read like QuantConfig's)
    "steps": integer(1), "batch_size": integer(1), "grad_accum": integer(1), "lr": real(0, strict=True),
    "warmup_steps": integer(0), "weight_decay": real(0), "grad_clip": real(0)._replace(
        allowed="a finite number >= 0 (0: no clipping)"), "temperature": real(0, strict=True),
    "seed": integer(0), "checkpoint_every": integer(0), "hidden_weight": real(0), "compile": choice(COMPILE_MODES),
    "loss": choice(("kl", "cakld")), "confidence": real(0, 1, closed=True, optional=True)}


def prepare_qat(
    model: nn.Module, config: QuantConfig, learned_scales: bool = False, dead_zone_bias: bool = False
) -> list[str]:
    """Replace the selected linear layers by TernaryLinear (latent FP weights, STE), in place.

    A model loaded from a PTQ artifact is trained from its ternary layers: their dequantized weights become
    the latent weights, so training starts where post-training quantization ended (with learned scales, at the
    artifact's own scales: the dequantized weights re-fit to them exactly). See TernaryLinear for the options."""
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedTernaryLinear)}
    layers = packed or select_linear_layers(model, config)
    for name, module in layers.items():
        if name in packed:
            layer = TernaryLinear(module.ternary(), module.bias, config, rounding="lsq" if learned_scales else "rule",
                                  dead_zone_bias=dead_zone_bias)
        else:
            layer = TernaryLinear.from_weight(linear_weight(module).detach(), getattr(module, "bias", None), config,
                                              learned_scales, dead_zone_bias)
        set_module(model, name, layer.to(module.packed.device if name in packed else module.weight.device))
    model.atq_config = config
    return list(layers)


def to_packed(model: nn.Module) -> list[dict[str, Any]]:
    """Freeze a QAT model for inference: every TernaryLinear becomes its PackedTernaryLinear (``freeze``)."""
    names = [name for name, module in model.named_modules() if isinstance(module, TernaryLinear)]
    for name in names:
        set_module(model, name, model.get_submodule(name).freeze())
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


def _non_finite(model: nn.Module | None) -> str | None:
    """The name of the first floating-point parameter or buffer of ``model`` that holds NaN or inf."""
    for name, tensor in [] if model is None else [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point() and not bool(full_value(torch.isfinite(tensor).all())):
            return name
    return None


class _Run:
    """One ``train`` call's state: the optimizer, the log, the skipped-step count; what a checkpoint saves."""

    def __init__(self, student: nn.Module, config: TrainConfig, checkpoint_dir: str | Path | None,
                 log_path: str | Path | None) -> None:
        self.rank, self.world = rank_and_world()
        self.sharded = is_sharded(student)
        if checkpoint_dir is not None:
            checkpoint.check_directory(checkpoint_dir)
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} must be divisible by the {self.world} processes")
        self.student, self.config, self.checkpoint_dir, self.log_path = student, config, checkpoint_dir, log_path
        self.device = next(student.parameters()).device
        self.params = [p for p in student.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                           fused=self.device.type == "cuda" and not self.sharded or None)
        self.start, self.history, self.trained, self.skipped = 0, [], 0.0, 0
        if checkpoint_dir is not None and checkpoint.has_checkpoint(checkpoint_dir):
            self._resume()

    def _resume(self) -> None:
        state = checkpoint.load_checkpoint(self.checkpoint_dir, self.student, self.optimizer)
        if not checkpoint.same_config(state["config"], self.config):
            raise ValueError(f"{self.checkpoint_dir}: checkpoint was written with a different TrainConfig")
        self.start, self.history = state["step"], state["history"]
        self.trained = self.history[-1]["seconds"] if self.history else 0.0
        torch.set_rng_state(state["rng"])

    def step(self, step: int, forward: nn.Module, teacher: nn.Module | None, windows: torch.Tensor) -> dict:
        """Train one step (skipped if its gradient is not finite); returns its row of the log."""
        tick, config = time.perf_counter(), self.config
        lr = learning_rate(step, config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        value, norm = self._gradients(step, forward, teacher, windows)
        self._check_finite(step, lr, value, norm)
        if self.skipped:
            log.warning("step %d: gradient norm %s, step skipped", step, norm)
        else:
            self.optimizer.step()
        elapsed = time.perf_counter() - tick
        self.trained += elapsed
        tokens_per_step = config.batch_size * config.grad_accum * windows.shape[1]
        self.history.append({"step": step, "loss": value, "lr": lr, "grad_norm": norm, "skipped": bool(self.skipped),
                             "tokens": (step + 1) * tokens_per_step, "seconds": self.trained,
                             "tokens_per_s": tokens_per_step / max(elapsed, 1e-9)})
        return self.history[-1]

    def _gradients(self, step: int, forward: nn.Module, teacher: nn.Module | None,
                   windows: torch.Tensor) -> tuple[float, float]:
        """Accumulate the gradient of ``step``'s global batch and clip it; returns (loss, gradient norm)."""
        config, params = self.config, self.params
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for micro in range(config.grad_accum):
            batch = windows[batch_indices(step, micro, len(windows), config)[self.rank :: self.world]]
            loss = step_loss(forward, teacher, batch.to(self.device), config) / config.grad_accum
            loss.backward()
            total += loss.detach()
        if self.world > 1:
            if not self.sharded:  # FSDP2 reduce-scatters the gradients itself
                average_gradients(params, self.world)
            average(total, self.world)
        if config.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        value, norm = torch.stack([total, full_value(norm).to(total.dtype)]).tolist()  # synchronises: the time is real
        return value, norm

    def _check_finite(self, step: int, lr: float, value: float, norm: float) -> None:
        if not math.isfinite(value):
            # stop before a checkpoint could save broken weights (the step before was finite)
            where = "" if self.checkpoint_dir is None else f" in {self.checkpoint_dir}"
            raise FloatingPointError(f"QAT diverged: loss {value} at step {step} (lr {lr:.3g}): {self._cause(step)}; "
                                     f"the last checkpoint{where} is kept")
        self.skipped = self.skipped + 1 if not math.isfinite(norm) else 0
        if self.skipped > MAX_SKIPPED_STEPS:
            raise FloatingPointError(
                f"QAT diverged: {self.skipped} steps in a row up to step {step} had a non-finite gradient"
                f" (lr {lr:.3g}); skipped steps leave the weights unchanged, so the learning rate is not the cause: "
                "the backward pass overflows or a layer's gradient is NaN on these batches; train in float32 "
                "(or bfloat16 rather than float16)")

    def _cause(self, step: int) -> str:
        """What a non-finite loss at ``step`` says about its cause."""
        broken = _non_finite(self.student)
        if broken is not None:
            return (f"the student's {broken} turned non-finite after step {step - 1}; lower the learning rate "
                    "or clip gradients harder (grad_clip)")
        if step == self.start:
            return ("at the first step of this run, before any update, so not the learning rate: the forward "
                    "pass overflows on this batch (float16?); train in float32 or bfloat16")
        return ("the weights are finite, so the forward pass overflowed on this batch (float16?); train in "
                "float32 or bfloat16, or lower the learning rate")

    def save(self, done: int) -> None:
        """Checkpoint after ``done`` steps (every process: a sharded save is collective) and write the log
        (rank 0); the other processes wait for it."""
        config = asdict(self.config)
        if self.checkpoint_dir is not None:
            checkpoint.save_checkpoint(self.checkpoint_dir, self.student, self.optimizer, {
                "step": done, "history": self.history, "config": config, "rng": torch.get_rng_state()})
        if self.rank == 0 and self.log_path is not None:
            write_json(self.log_path, {"config": config, "world_size": self.world, "history": self.history})
        barrier(self.world)


def train(
    student: nn.Module, windows: torch.Tensor, config: TrainConfig, teacher: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None, quiet: bool = False, max_seconds: float | None = None,
    on_step: Callable[[int, float], None] | None = None, log_path: str | Path | None = None,
) -> list[dict[str, float]]:
    """Train ``student`` (after ``prepare_qat``) on token ``windows``; resumes from ``checkpoint_dir`` if it
    holds a checkpoint. Returns the per-step log (step, loss, lr, tokens, seconds, tokens_per_s).

    ``max_seconds`` stops early (with a checkpoint) once that much training time has passed in this call: the
    schedule still spans ``config.steps``, so a later call resumes it. ``on_step(steps_done, train_seconds)``
    runs after every step, outside the timed region (evaluations for a curve). ``log_path`` gets the log as
    JSON at every checkpoint and at the end. Under torch.distributed (initialised by the caller, e.g. torchrun)
    gradients are averaged over processes (by FSDP2 where ``distributed.shard`` split the student) and only
    rank 0 writes files, except a sharded checkpoint's per-process files."""
    check_windows(windows, student, config.batch_size, "train")
    run = _Run(student, config, checkpoint_dir, log_path)
    for role, model in (("student", student), ("teacher", teacher)):
        if (broken := _non_finite(model)) is not None:
            raise ValueError(f"train: the {role}'s {broken} holds NaN or inf before training: the model (or its "
                             "checkpoint) is broken, not the learning rate; load it again from its source")
    if teacher is not None:
        teacher.eval()
    student.train()
    bar = tqdm(range(run.start, config.steps), desc="qat", disable=quiet or run.rank != 0, unit="step",
               initial=run.start, total=config.steps)
    began = time.perf_counter()
    with compiled(student, config.compile) as forward, compiled(teacher, config.compile) as teacher_forward:
        for step in bar:
            row = run.step(step, forward, teacher_forward, windows)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            done = step + 1
            out_of_time = max_seconds is not None and time.perf_counter() - began >= max_seconds
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps or out_of_time:
                run.save(done)
            if on_step is not None:
                on_step(done, run.trained)
            if out_of_time:
                log.info("stopping after %d steps: time budget of %.0f s spent", done, max_seconds)
                break
    student.eval()
    return run.history
