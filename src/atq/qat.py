"""Quantization-aware training: ternary linear layers with a straight-through estimator, trained with AdamW
(warm-up + cosine), gradient clipping and accumulation, optional logit distillation from the FP teacher, and
atomic checkpoints that resume to the same next-step loss as an uninterrupted run.

Batches are a pure function of (seed, step): a permutation per epoch drawn from a generator seeded by
(seed, epoch). A resumed run therefore needs no data-loader state beyond the step counter.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import COMPILE_MODES, QuantConfig
from .layers import PackedTernaryLinear, TernaryLinear
from .surgery import linear_weight, select_linear_layers, set_module

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
    decoder block on its own (the blocks share one compiled graph, so compiling takes seconds rather than the
    minutes a whole 30-layer graph takes, and every resumed segment pays it again), ``"model"`` the whole
    model; ``True``/``False`` mean ``"blocks"``/``"off"``."""

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

    def __post_init__(self) -> None:
        if isinstance(self.compile, bool):
            object.__setattr__(self, "compile", "blocks" if self.compile else "off")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"TrainConfig.compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        for name in ("steps", "batch_size", "grad_accum"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"TrainConfig.hidden_weight must be >= 0, got {self.hidden_weight!r}")


def prepare_qat(
    model: nn.Module, config: QuantConfig, learned_scales: bool = False, dead_zone_bias: bool = False
) -> list[str]:
    """Replace the selected linear layers by TernaryLinear (latent FP weights, STE), in place.

    A model loaded from a PTQ artifact is trained from its ternary layers: their dequantized weights become
    the latent weights, so training starts where post-training quantization ended (with learned scales, at the
    artifact's own scales: the dequantized weights re-fit to them exactly). See TernaryLinear for the options.
    """
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


class _DistillationKL(torch.autograd.Function):
    """KL(teacher || student) whose forward also computes its gradient, T·(softmax(s/T) - softmax(t/T))/rows.

    Autograd through two log_softmax calls re-reads the logits (or keeps fp32 log-probabilities) for a backward
    of its own; over SmolLM2's 49,152-word vocabulary that loss took 14% of a compiled QAT step on the H100. Here
    the backward is one multiply of a saved gradient in the logits' dtype (what autograd would hand back anyway),
    under torch.compile the forward is a fused pass or two over the two logit tensors, and the price is that one
    logits-sized tensor stays alive until the backward (at 64 x 512 tokens: loss kernels about 19 -> 10 ms a
    step and +3 GiB peak, results/qat_throughput_h100.json and the README).
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


def _step_loss(student: nn.Module, teacher: nn.Module | None, batch: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The loss of one micro-batch; ``student`` and ``teacher`` are what ``_compiled`` yields for
    ``config.compile``, and the distillation loss is compiled with them."""
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


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The members of the model's ModuleLists whose members are all of one class: its decoder blocks."""
    blocks = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            blocks.extend(module)
    return blocks


@contextmanager
def _compiled(model: nn.Module | None, mode: str) -> Iterator[nn.Module | None]:
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


def _world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, (0, 1) otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _average_gradients(params: list[nn.Parameter], world: int) -> None:
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


def train(
    student: nn.Module,
    windows: torch.Tensor,
    config: TrainConfig,
    teacher: nn.Module | None = None,
    checkpoint_dir: str | Path | None = None,
    quiet: bool = False,
    max_seconds: float | None = None,
    on_step: Callable[[int, float], None] | None = None,
    log_path: str | Path | None = None,
) -> list[dict[str, float]]:
    """Train ``student`` (after ``prepare_qat``) on token ``windows``; resumes from ``checkpoint_dir`` if it
    holds a checkpoint. Returns the per-step log (step, loss, lr, tokens, seconds, tokens_per_s).

    ``max_seconds`` stops early (with a checkpoint) once that much training time has passed in this call: the
    schedule still spans ``config.steps``, so a later call resumes it. ``on_step(steps_done, train_seconds)``
    runs after every step, outside the timed region (evaluations for a curve). ``log_path`` gets the log as
    JSON at every checkpoint and at the end. Under torch.distributed (initialised by the caller, e.g. torchrun)
    gradients are averaged over processes and only rank 0 writes files.
    """
    from .files import write_json
    from .io import load_checkpoint, save_checkpoint

    rank, world = _world()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the {world} processes")
    device = next(student.parameters()).device
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda" or None)
    start, history, trained = 0, [], 0.0
    if checkpoint_dir is not None and (Path(checkpoint_dir) / "train_state.pt").is_file():
        state = load_checkpoint(checkpoint_dir, student, optimizer)
        if state["config"] != asdict(config):
            raise ValueError(f"{checkpoint_dir}: checkpoint was written with a different TrainConfig")
        start, history = state["step"], state["history"]
        trained = history[-1]["seconds"] if history else 0.0
        torch.set_rng_state(state["rng"])
    if teacher is not None:
        teacher.eval()
    student.train()
    def checkpoint(done: int) -> None:
        if rank == 0:
            if checkpoint_dir is not None:
                save_checkpoint(checkpoint_dir, student, optimizer, {
                    "step": done, "history": history, "config": asdict(config), "rng": torch.get_rng_state()})
            if log_path is not None:
                write_json(log_path, {"config": asdict(config), "world_size": world, "history": history})
        if world > 1:
            import torch.distributed as dist

            dist.barrier()

    tokens_per_step = config.batch_size * config.grad_accum * windows.shape[1]
    bar = tqdm(range(start, config.steps), desc="qat", disable=quiet or rank != 0, unit="step", initial=start,
               total=config.steps)
    began, skipped = time.perf_counter(), 0
    with _compiled(student, config.compile) as forward, _compiled(teacher, config.compile) as teacher_forward:
        for step in bar:
            tick = time.perf_counter()
            lr = learning_rate(step, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            total = torch.zeros((), device=device)
            for micro in range(config.grad_accum):
                batch = windows[batch_indices(step, micro, len(windows), config)[rank::world]].to(device)
                loss = _step_loss(forward, teacher_forward, batch, config) / config.grad_accum
                loss.backward()
                total += loss.detach()
            if world > 1:
                import torch.distributed as dist

                _average_gradients(params, world)
                dist.all_reduce(total)
                total /= world
            if config.grad_clip:
                norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            else:
                norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            value, norm = torch.stack([total, norm.to(total.dtype)]).tolist()  # synchronises: the time is real
            if not math.isfinite(value):
                # the weights are broken (the step before was finite): stop before a checkpoint could save them
                raise FloatingPointError(
                    f"QAT diverged: loss {value} at step {step} (lr {lr:.3g}); the last checkpoint"
                    f"{'' if checkpoint_dir is None else f' in {checkpoint_dir}'} is kept; lower the learning rate")
            skipped = skipped + 1 if not math.isfinite(norm) else 0
            if skipped > MAX_SKIPPED_STEPS:
                raise FloatingPointError(
                    f"QAT diverged: {skipped} steps in a row up to step {step} had a non-finite gradient (lr {lr:.3g});"
                    " lower the learning rate")
            if skipped:
                log.warning("step %d: gradient norm %s, step skipped", step, norm)
            else:
                optimizer.step()
            elapsed = time.perf_counter() - tick
            trained += elapsed
            done = step + 1
            history.append({"step": step, "loss": value, "lr": lr, "grad_norm": norm, "skipped": bool(skipped),
                            "tokens": done * tokens_per_step, "seconds": trained,
                            "tokens_per_s": tokens_per_step / max(elapsed, 1e-9)})
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{history[-1]['tokens_per_s']:,.0f}")
            out_of_time = max_seconds is not None and time.perf_counter() - began >= max_seconds
            if (config.checkpoint_every and done % config.checkpoint_every == 0) or done == config.steps or out_of_time:
                checkpoint(done)
            if on_step is not None:
                on_step(done, trained)
            if out_of_time:
                log.info("stopping after %d steps: time budget of %.0f s spent", done, max_seconds)
                break
    student.eval()
    return history
