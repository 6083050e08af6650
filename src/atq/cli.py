"""``atq quantize | train | eval | export | generate``: a thin layer over the Python API (quantize's config flags
are generated from QuantConfig's keywords in flags.py, generate lives in generate.py; the other options map to
arguments of the API)."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from . import flags
from .config import COMPILE_MODES, QuantConfig
from .files import check_replaceable, write_json
from .flags import AUTO, DTYPES, config_from_args, device_description, preset_name
from .flags import resolve_device as _device
from .generate import add_generate_parser, cmd_generate
from .io import is_artifact
from .stats import directory_bytes, model_stats


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atq", description="Adaptive ternary quantization of causal LMs")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (flags.add_quantize_parser, _add_train, _add_export, _add_eval, add_generate_parser):
        add(commands)
    return parser


def _add_train(commands: argparse._SubParsersAction) -> None:
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
    t.add_argument("--device", default="auto")
    t.add_argument("--quiet", action="store_true")


def _add_export(commands: argparse._SubParsersAction) -> None:
    x = commands.add_parser("export", help="write an artifact in a format other runtimes load")
    x.add_argument("--model", required=True, help="ATQ artifact directory")
    x.add_argument("--format", choices=["gguf", "hf"], required=True,
                   help="gguf: llama.cpp (TQ2_0/TQ1_0); hf: transformers' BitNet checkpoint")
    x.add_argument("--out", required=True, help="output file (gguf) or directory (hf)")
    x.add_argument("--overwrite", action="store_true", help="hf: replace a non-empty --out directory")
    x.add_argument("--metadata-from", default=None,
                   help="gguf: copy metadata and tokenizer from this GGUF ('smollm2': the bundled one)")
    x.add_argument("--ternary-type", choices=["tq2_0", "tq1_0"], default="tq2_0")
    x.add_argument("--fallback", choices=["q8_0", "f16"], default="q8_0",
                   help="gguf type of ternary tensors that TQ blocks cannot hold exactly")
    x.add_argument("--dequantize", action="store_true",
                   help="hf: write plain FP safetensors when the layout is not BitNet's (no compression)")


def _add_eval(commands: argparse._SubParsersAction) -> None:
    e = commands.add_parser("eval", help="perplexity and token accuracy of a model or artifact")
    e.add_argument("--model", required=True, help="artifact dir, hub id, local dir, .gguf, or smollm2")
    e.add_argument("--dtype", choices=DTYPES, default="float32")
    e.add_argument("--json", default=None, help="also write the result to this JSON file")
    flags.add_eval_options(e)


def _eval(model, tokenizer, args: argparse.Namespace) -> dict:
    from .evaluate import evaluate

    return evaluate(model, tokenizer, args.data, seq_len=args.seq_len, max_windows=args.max_windows,
                    batch_size=args.batch_size, quiet=args.quiet)


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(["| what | value |", "| --- | --- |"] + [f"| {k:<{width}} | {v} |" for k, v in rows])


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import load_model, quantize, save_quantized

    started = time.perf_counter()
    config, preset, device = config_from_args(args), preset_name(args), _device(args.device)  # validate first
    flags.require_texts(config, args.data if args.eval else None)  # before minutes spent on the model
    name = device_description(device)
    print(f"atq quantize: preset {preset}{' (auto)' if args.preset == AUTO else ''}, device {device}"
          f"{f' ({name})' if name != device else ''}", flush=True)
    out = Path(args.out or f"out/{Path(args.model).stem}-atq")
    check_replaceable(out, lambda path: args.overwrite or is_artifact(path))  # before minutes of work
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=device)
    config = flags.preset_for_model(config, model, args)
    before = _eval(model, tokenizer, args) if args.eval else None  # ends on a host sync (the loss's float())
    start = time.perf_counter()
    report = quantize(model, config, tokenizer=tokenizer, quiet=args.quiet)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)  # the interval covers the kernels quantize queued
    seconds = time.perf_counter() - start
    save_quantized(model, out, tokenizer=tokenizer, overwrite=args.overwrite)
    stats = model_stats(model)
    del model  # evaluate the saved artifact, loaded as `atq eval` loads it: the numbers describe what was written
    after = _eval(load_model(str(out), dtype=DTYPES[args.dtype], device=device)[0], tokenizer, args
                  ) if args.eval else None
    record = {"ppl_fp": before and before["ppl"], "ppl_ternary": after and after["ppl"],
              "windows": after and after["windows"], "quantize_seconds": seconds,
              "bits_per_weight": stats["bits_per_weight"], "artifact_bytes": directory_bytes(out),
              "recipe": {"preset": preset, "config": config.to_dict()}, "device": name,
              "model": args.model, "artifact": str(out), "data": str(args.data) if args.eval else None,
              "seq_len": args.seq_len if args.eval else None, "total_seconds": time.perf_counter() - started}
    print(_table(_quantize_rows(args, report, stats, record, before, after)))
    if args.json:
        write_json(args.json, record)
    return 0


def _quantize_rows(args, report, stats, record, before, after) -> list[tuple[str, str]]:
    errors = [r["rel_error"] for r in report if r["precision"] == "ternary"]
    stages = {k: v for k, v in record["recipe"]["config"].items() if v not in ([], None)}  # the stages that run
    ratios = stats["compression_ratio"], stats["compression_ratio_fp16"]
    rows = [("model", args.model), ("preset", record["recipe"]["preset"]), ("config", json.dumps(stages)),
            ("ternary layers", f"{stats['ternary_layers']} of {len(report)} linear"),
            ("bits per weight (ternary, with scales)", f"{stats['bits_per_weight']:.3f}"),
            ("bits per weight (all decoder linears, FP at 16)", f"{stats['bits_per_linear_weight']:.3f}"),
            ("sparsity", f"{stats['sparsity']:.3f}"),
            ("mean relative error ||W-Ŵ||/||W||", f"{sum(errors) / len(errors):.4f}"),
            ("compression vs FP32 / FP16", f"{ratios[0]:.2f}x / {ratios[1]:.2f}x"),
            ("artifact", f"{record['artifact']} ({record['artifact_bytes'] / 2**20:.1f} MiB)"),
            ("quantize time", f"{record['quantize_seconds']:.1f} s")]
    if before and after:
        accuracy = f"{before['token_accuracy']:.4f} / {after['token_accuracy']:.4f}"
        rows += [(f"perplexity FP ({args.data}, {before['windows']}x{args.seq_len})", f"{before['ppl']:.2f}"),
                 ("perplexity ternary (the saved artifact)", f"{after['ppl']:.2f}"),
                 ("token accuracy FP / ternary", accuracy)]
    return rows + [("total time", f"{record['total_seconds']:.1f} s")]


def cmd_eval(args: argparse.Namespace) -> int:
    from .models import load_model

    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device=_device(args.device))
    result = _eval(model, tokenizer, args)
    print(_table([("model", args.model), ("data", str(args.data)), ("windows", f"{result['windows']}x{args.seq_len}"),
                  ("perplexity", f"{result['ppl']:.3f}"), ("token accuracy", f"{result['token_accuracy']:.4f}")]))
    if args.json:
        write_json(args.json, result | {"model": args.model, "data": str(args.data)})
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .checkpoint import check_directory
    from .data import cached_generated_windows, load_text, token_windows
    from .io import save_quantized
    from .models import load_model
    from .qat import TrainConfig, prepare_qat, to_packed, train

    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         warmup_steps=args.warmup_steps, checkpoint_every=args.checkpoint_every,
                         hidden_weight=args.hidden_weight, compile=args.compile)
    sources = args.data.split("+")
    texts = {source: load_text(source) for source in sources if source != "generated"}  # fail before loading models
    check_directory(f"{args.out}.ckpt")
    check_replaceable(Path(args.out), is_artifact)
    rank, device = _init_distributed(args.device)
    teacher, tokenizer = load_model(args.model, device=device)
    student = load_model(args.init, device=device)[0] if args.init else copy.deepcopy(teacher)
    parts = []
    for source in sources:
        if source == "generated":
            cache = args.cache or f"{args.out}.tokens.safetensors"
            if rank == 0:  # one process samples; the others read the cache it writes
                parts.append(cached_generated_windows(teacher, tokenizer, args.windows, args.seq_len, cache,
                                                      quiet=args.quiet))
            _barrier()
            if rank != 0:
                parts.append(cached_generated_windows(teacher, tokenizer, args.windows, args.seq_len, cache,
                                                      quiet=True))
        else:
            parts.append(token_windows(tokenizer, texts[source], args.seq_len, args.windows))
    windows = torch.cat([part.to(torch.long) for part in parts])  # train() reshuffles every epoch
    prepare_qat(student, getattr(student, "atq_config", None) or QuantConfig(),
                learned_scales=args.learned_scales, dead_zone_bias=args.dead_zone_bias)
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
    if rank == 0:
        to_packed(student)
        save_quantized(student, args.out, tokenizer=tokenizer)
        rates = sorted(h["tokens_per_s"] for h in history)
        print(_table([("steps", str(config.steps)), ("windows", f"{len(windows)}x{args.seq_len}"),
                      ("loss first / last", f"{history[0]['loss']:.4f} / {history[-1]['loss']:.4f}"),
                      ("tokens/s (median)", f"{rates[len(rates) // 2]:,.0f}"),
                      ("artifact", args.out), ("log", f"{args.out}.log.json")]))
    return 0


def _init_distributed(device: str) -> tuple[int, str]:
    """Under torchrun / accelerate launch (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo on CPU)
    and return (rank, this process's device); otherwise (0, the usual device)."""
    import os

    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, _device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device != "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return dist.get_rank(), f"cuda:{local}" if use_cuda else "cpu"


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def cmd_export(args: argparse.Namespace) -> int:
    from .models import load_model

    model, tokenizer = load_model(args.model)
    if not hasattr(model, "atq_config"):
        raise ValueError(f"{args.model} is not an ATQ artifact (quantize it with `atq quantize` first)")
    if args.format == "gguf":
        from .export.gguf import export_gguf
        from .models import smollm2

        source = str(smollm2()) if args.metadata_from == "smollm2" else args.metadata_from
        report = export_gguf(model, args.out, metadata_from=source, tokenizer_dir=args.model,
                             ternary_type=args.ternary_type, fallback=args.fallback)
        types = Counter(report["tensors"].values())
        exact = sum(1 for v in report["tensors"].values() if v.startswith("TQ"))
        print(_table([("file", f"{report['path']} ({report['bytes'] / 2**20:.1f} MiB)"),
                      ("tensor types", ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))),
                      ("ternary layers that fell back", f"{len(report['fallback'])} of {len(report['fallback']) + exact}"),
                      ("bits per ternary weight", f"{report['bits_per_ternary_weight']:.3f}")]))
        return 0
    from .export.hf import export_hf

    report = export_hf(model, args.out, dequantize=args.dequantize, tokenizer=tokenizer, overwrite=args.overwrite)
    print(_table([(k, str(v)) for k, v in report.items()]))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return {"quantize": cmd_quantize, "eval": cmd_eval, "train": cmd_train, "export": cmd_export,
                "generate": cmd_generate}[args.command](args)
    except (ValueError, TypeError, OSError, ImportError, RuntimeError, FloatingPointError) as error:
        print(f"atq {args.command}: error: {error}", file=sys.stderr)  # one line; exit 2 as argparse's errors
        return 2


if __name__ == "__main__":
    sys.exit(main())
