"""``atq train``: quantization-aware training from the command line, on one process or under torchrun (data
parallel, or sharded with ``--shard``): the FP model is the teacher, the student starts from it or from a PTQ
artifact (``--init``), the data is text, generated text or a mix, and the result is an ATQ artifact."""

from __future__ import annotations

import argparse
import copy
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
                   help="wikitext2_valid, a text file, or generated (data-free); mix sources with +, e.g. "
                        "generated+wikitext2_valid")
    t.add_argument("--windows", type=int, default=256,
                   help="training windows per source (generated, or cut from the text)")
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



def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import check_directory
    from .data import load_text
    from .models import load_model
    from .qat import TrainConfig, train

    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         warmup_steps=args.warmup_steps, checkpoint_every=args.checkpoint_every,
                         hidden_weight=args.hidden_weight, compile=args.compile)
    if args.shard:
        from .distributed import check_shardable

        check_shardable(int(os.environ.get("WORLD_SIZE", "1")))
    sources = args.data.split("+")
    texts = {source: load_text(source) for source in sources if source != "generated"}  # fail before loading models
    check_directory(f"{args.out}.ckpt")
    check_replaceable(Path(args.out), is_artifact)
    rank, device = init_distributed(args.device)
    teacher, tokenizer = load_model(args.model, device=device)
    student = _student(args, teacher, device)
    windows = _windows(args, sources, texts, teacher, tokenizer, rank)
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
        print(key_value_table([("steps", str(config.steps)), ("windows", f"{len(windows)}x{args.seq_len}"),
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


def _windows(args: argparse.Namespace, sources: list[str], texts: dict[str, str], teacher: nn.Module, tokenizer,
             rank: int) -> torch.Tensor:
    """The training windows of every source, concatenated (``train`` reshuffles every epoch)."""
    from .data import cached_generated_windows, token_windows
    from .distributed import barrier, rank_and_world

    world = rank_and_world()[1]
    parts = []
    for source in sources:
        if source == "generated":
            cache = args.cache or f"{args.out}.tokens.safetensors"
            if rank == 0:  # one process samples; the others read the cache it writes
                parts.append(cached_generated_windows(teacher, tokenizer, args.windows, args.seq_len, cache,
                                                      quiet=args.quiet))
            barrier(world)
            if rank != 0:
                parts.append(cached_generated_windows(teacher, tokenizer, args.windows, args.seq_len, cache,
                                                      quiet=True))
        else:
            parts.append(token_windows(tokenizer, texts[source], args.seq_len, args.windows))
    return torch.cat([part.to(torch.long) for part in parts])


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

