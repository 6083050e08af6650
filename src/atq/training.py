"""``atq train``: quantization-aware training from the command line, on one process or under torchrun (data
parallel, or sharded with ``--shard``): the FP model is the teacher, the student starts from it or from a PTQ
artifact (``--init``), the data is text, generated text or a mix, and the result is an ATQ artifact."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from .config import COMPILE_MODES, QuantConfig
from .files import check_replaceable
from .io import is_artifact
from .models import resolve_device
from .stats import key_value_table


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    t = commands.add_parser("train", help="quantization-aware training with distillation from the FP model")
    t.add_argument("--model", default="smollm2", help="the FP model (teacher; student too without --init)")
    t.add_argument("--init", default=None, help="start from this PTQ artifact directory")
    t.add_argument("--data", default="generated",
                   help="wikitext2_valid, a text file, or generated (data-free); join sources with +, e.g. "
                        "generated+wikitext2_valid (--windows from each); or mix: --windows windows in all, the share "
                        "--generated-fraction of them generated, the rest cut from --calibration (repeated as needed)")
    t.add_argument("--windows", type=int, default=256,
                   help="training windows per source (generated, or cut from the text); with --data mix, in all")
    t.add_argument("--calibration", default="wikitext2_valid",
                   help="the calibration text (a name or a file) of --data mix and --prompts-from-calibration")
    t.add_argument("--generated-fraction", type=float, default=None, metavar="F",
                   help="with --data mix: the share of generated windows, from 0 (the calibration text only, "
                        "repeated) to 1 (generated only)")
    _add_sampling_flags(t)
    t.add_argument("--loss", default="kl", help="the distillation loss: kl (logit KL(teacher || student)) or "
                   "cakld (BitDistiller's confidence-aware KL: both directions, weighted by the teacher's confidence)")
    t.add_argument("--confidence", default=None, metavar="GAMMA|data",
                   help="with --loss cakld: the teacher confidence γ in [0, 1], or data: estimated once on the "
                        "training windows before training (BitDistiller); default: estimated on each micro-batch")
    t.add_argument("--seq-len", type=int, default=512)
    t.add_argument("--steps", type=int, default=200)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--warmup-steps", type=int, default=10)
    t.add_argument("--no-teacher", action="store_true", help="plain next-token loss, no distillation")
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--minutes", type=float, default=None,
                   help="stop after this much training time (with a checkpoint; run again to continue)")
    t.add_argument("--learned-scales", action="store_true", help="LSQ-learned scales instead of recomputed ones")
    t.add_argument("--dead-zone-bias", action="store_true", help="Tequila: zero-coded weights feed a bias")
    t.add_argument("--hidden-weight", type=float, default=0.0, help="weight of the hidden-state MSE term")
    t.add_argument("--compile", nargs="?", const="blocks", default="off", choices=COMPILE_MODES,
                   help="torch.compile each decoder block (bare --compile; seconds to compile) or the whole model "
                        "(minutes); student, teacher and loss")
    t.add_argument("--cache", default=None,
                   help="token cache for generated data (default OUT.tokens.safetensors), reused across runs")
    t.add_argument("--out", required=True, help="artifact directory; checkpoints go to OUT.ckpt")
    t.add_argument("--shard", action="store_true",
                   help="under torchrun with N >= 2 processes: split weights, gradients and optimizer state over "
                        "them (FSDP2) for a model whose training state does not fit one GPU; without it each "
                        "process holds the whole model (data parallel, faster where it fits)")
    t.add_argument("--device", default="auto")
    t.add_argument("--quiet", action="store_true")


def _add_sampling_flags(t: argparse.ArgumentParser) -> None:
    """The flags of ``data.generated_windows``' sampling keywords (defaults: ``data.SAMPLING``) and its prompts."""
    from .data import SAMPLING

    t.add_argument("--greedy-tokens", type=int, default=SAMPLING["greedy_tokens"], metavar="K",
                   help="generated text: the first K new tokens of each window greedy, then sampled (LLM-QAT)")
    t.add_argument("--temperature", type=float, default=SAMPLING["temperature"],
                   help="generated text: the sampling temperature (BitDistiller 0.7), not the distillation's")
    t.add_argument("--top-p", type=float, default=SAMPLING["top_p"],
                   help="generated text: sample from the smallest set of tokens holding this much probability")
    t.add_argument("--first-token", default=SAMPLING["first_token"],
                   help="generated text without prompts: the first token drawn from the model after BOS (model) "
                        "or uniformly over the vocabulary (uniform, LLM-QAT)")
    t.add_argument("--prompts-from-calibration", type=int, default=0, metavar="N",
                   help="generated text continues the first N tokens of paragraphs of --calibration, one a window, "
                        "spread over the text (0: no prompts)")


def _check_flags(args: argparse.Namespace) -> list[str]:
    """The sources of ``--data``, after refusing (ValueError naming the flag and what it accepts, before any model
    loads) a bad value or a flag that would change nothing: a sampling flag where nothing is generated, a
    confidence without CAKLD, a distillation loss without a teacher."""
    from .checks import first_error, integer
    from .data import FRACTION, SAMPLING, SAMPLING_CHECKS

    sources = args.data.split("+")
    flags = {**SAMPLING_CHECKS, "prompts_from_calibration": integer(0), "generated_fraction": FRACTION}
    values = {name: getattr(args, name) for name in flags}
    if sources != ["mix"]:
        if "mix" in sources or args.generated_fraction is not None:
            raise ValueError("--generated-fraction F goes with --data mix, which stands alone (it mixes --calibration "
                             "text with generated text); join other sources with + and without mix")
        flags.pop("generated_fraction")
    elif args.generated_fraction is None:
        raise ValueError("--data mix needs --generated-fraction F in [0, 1], the share of generated windows")
    if (error := first_error(values, flags, lambda name: "--" + name.replace("_", "-"))) is not None:
        raise ValueError(error)
    generating = "generated" in sources or (sources == ["mix"] and args.generated_fraction > 0)
    changed = [name for name in [*SAMPLING, "prompts_from_calibration"]
               if values[name] != {**SAMPLING, "prompts_from_calibration": 0}[name]]
    if changed and not generating:
        raise ValueError(f"--{changed[0].replace('_', '-')} shapes generated text, but --data {args.data} "
                         "generates none: use --data generated or mix with --generated-fraction > 0")
    if args.confidence is not None and args.loss != "cakld":
        raise ValueError(f"--confidence is CAKLD's γ, but --loss is {args.loss}: give --loss cakld")
    if args.no_teacher and args.loss != "kl":
        raise ValueError(f"--loss {args.loss} is a distillation loss, but --no-teacher trains without a teacher")
    return sources


def _confidence(value: str | None) -> float | None:
    """``--confidence`` as ``TrainConfig.confidence``: a number, or None (per micro-batch; ``data`` is estimated
    later, once the windows exist)."""
    if value is None or value == "data":
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"--confidence must be a number in [0, 1] or data, got {value!r}") from None


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import check_directory
    from .data import load_text
    from .qat import TrainConfig

    sources = _check_flags(args)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         warmup_steps=args.warmup_steps, checkpoint_every=args.checkpoint_every,
                         hidden_weight=args.hidden_weight, compile=args.compile, loss=args.loss,
                         confidence=_confidence(args.confidence))
    if args.shard:
        from .distributed import check_shardable

        check_shardable(int(os.environ.get("WORLD_SIZE", "1")))
    texts = {source: load_text(source) for source in _text_sources(args, sources)}  # fail before loading models
    check_directory(f"{args.out}.ckpt")
    check_replaceable(Path(args.out), is_artifact)
    rank, device = init_distributed(args.device)
    try:
        code = _train(args, config, sources, texts, rank, device)
    except BaseException:
        leave_distributed(wait=False)
        raise
    leave_distributed(wait=True)
    return code


def _train(args: argparse.Namespace, config, sources: list[str], texts: dict, rank: int, device: str) -> int:
    """The rest of ``cmd_train``, once this process has joined the process group (if any)."""
    from .models import load_model
    from .qat import train

    teacher, tokenizer = load_model(args.model, device=device)
    student = _student(args, teacher, device)
    windows = _windows(args, sources, texts, teacher, tokenizer, rank)
    if args.confidence == "data":
        from .qat import teacher_confidence

        config = dataclasses.replace(config, confidence=teacher_confidence(teacher, windows, config.batch_size,
                                                                           temperature=config.temperature))
    if args.shard:
        from .distributed import shard
        from .surgery import decoder_blocks

        shard(student, decoder_blocks(student)[1])
    history = train(student, windows, config, teacher=None if args.no_teacher else teacher,
                    checkpoint_dir=f"{args.out}.ckpt", quiet=args.quiet,
                    max_seconds=None if args.minutes is None else args.minutes * 60,
                    log_path=f"{args.out}.log.json")
    done = history[-1]["step"] + 1
    if done < config.steps:
        if rank == 0:
            print(f"atq train: time budget spent at step {done}/{config.steps}; checkpoint in {args.out}.ckpt, "
                  "run the same command again to continue")
        return 0
    _save(args, student, teacher, tokenizer, rank)
    if rank == 0:
        rates = sorted(h["tokens_per_s"] for h in history)
        loss = config.loss + ("" if config.confidence is None else f" (confidence {config.confidence})")
        print(key_value_table([("steps", str(config.steps)), ("windows", f"{len(windows)}x{args.seq_len}"),
                               ("distillation", "none" if args.no_teacher else loss),
                               ("loss first / last", f"{history[0]['loss']:.4f} / {history[-1]['loss']:.4f}"),
                               ("tokens/s (median)", f"{rates[len(rates) // 2]:,.0f}"),
                               ("artifact", args.out), ("log", f"{args.out}.log.json")]))
    return 0


def _student(args: argparse.Namespace, teacher: nn.Module, device: str) -> nn.Module:
    """The model to train: the PTQ artifact of ``--init`` (its ternary layers are the start) or a copy of the
    FP teacher, with TernaryLinear layers swapped in."""
    from .models import load_model
    from .qat import prepare_qat

    student = load_model(args.init, device=device)[0] if args.init else copy.deepcopy(teacher).to(device)
    prepare_qat(student, getattr(student, "atq_config", None) or QuantConfig(),
                learned_scales=args.learned_scales, dead_zone_bias=args.dead_zone_bias)
    return student


def _text_sources(args: argparse.Namespace, sources: list[str]) -> list[str]:
    """The texts the data needs: the named sources, and the calibration text where the mix takes windows of it or
    prompts come from it."""
    texts = [source for source in sources if source not in ("generated", "mix")]
    mixes_text = sources == ["mix"] and args.generated_fraction < 1
    return list(dict.fromkeys(texts + [args.calibration] * (mixes_text or args.prompts_from_calibration > 0)))


def _windows(args: argparse.Namespace, sources: list[str], texts: dict[str, str], teacher: nn.Module, tokenizer,
             rank: int) -> torch.Tensor:
    """The training windows: of every source, concatenated (``train`` reshuffles every epoch), or the mix."""
    from .data import mixed_windows, token_windows

    if sources == ["mix"]:
        n_generated = round(args.generated_fraction * args.windows)  # mixed_windows' share
        generated = _generated(args, texts, teacher, tokenizer, rank, n_generated) if n_generated else None
        calibration = (token_windows(tokenizer, texts[args.calibration], args.seq_len)
                       if n_generated < args.windows else torch.zeros(0, args.seq_len, dtype=torch.long))
        generated = calibration[:0] if generated is None else generated.to(torch.long)
        return mixed_windows(calibration, generated, args.generated_fraction, args.windows)
    parts = [_generated(args, texts, teacher, tokenizer, rank, args.windows) if source == "generated"
             else token_windows(tokenizer, texts[source], args.seq_len, args.windows) for source in sources]
    return torch.cat([part.to(torch.long) for part in parts])


def _generated(args: argparse.Namespace, texts: dict[str, str], teacher: nn.Module, tokenizer, rank: int,
               count: int) -> torch.Tensor:
    """``count`` windows sampled from the teacher as the sampling flags say, through the token cache: one process
    samples, the others read the cache it writes."""
    from .data import SAMPLING, cached_generated_windows, text_prompts
    from .distributed import barrier, rank_and_world

    prompts = (text_prompts(tokenizer, texts[args.calibration], count, args.prompts_from_calibration)
               if args.prompts_from_calibration else None)
    sampling = {name: getattr(args, name) for name in SAMPLING}

    def generate(quiet: bool) -> torch.Tensor:
        return cached_generated_windows(teacher, tokenizer, count, args.seq_len, args.cache or
                                        f"{args.out}.tokens.safetensors", quiet=quiet, prompts=prompts, **sampling)

    windows = generate(args.quiet) if rank == 0 else None
    barrier(rank_and_world()[1])
    return generate(True) if windows is None else windows


def _save(args: argparse.Namespace, student: nn.Module, teacher: nn.Module, tokenizer, rank: int) -> None:
    """Freeze the trained student and save it (rank 0). A sharded student is first gathered whole into a fresh
    unsharded copy in CPU memory, since freezing packs each layer's whole weight."""
    from .io import save_quantized
    from .qat import to_packed

    if args.shard:
        from .distributed import full_state_dict

        state = full_state_dict(student)  # every process takes part
        if rank == 0:
            student = _student(args, teacher, "cpu")
            student.load_state_dict(state)
    if rank == 0:
        to_packed(student)
        save_quantized(student, args.out, tokenizer=tokenizer)


def leave_distributed(wait: bool) -> None:
    """Leave the process group: a barrier when ``wait`` (rank 0 may still be saving; a failed process skips it),
    then destroy it. Left to interpreter exit, gloo's threads die in no set order and a process can abort
    ("terminate called without an active exception", SIGABRT, seen in CI)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def init_distributed(device: str) -> tuple[int, str]:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU)
    and return (rank, this process's device); otherwise (0, the usual device)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, resolve_device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), f"cuda:{local}" if use_cuda else "cpu"

