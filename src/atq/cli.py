"""``atq quantize | train | eval | export | generate``: a thin layer over the Python API (quantize's config flags
are generated from QuantConfig's keywords in flags.py, train lives in training.py, generate in generate.py; the
other options map to arguments of the API)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from . import flags
from .files import check_replaceable, write_json
from .flags import AUTO, DTYPES, config_from_args, device_description, preset_name
from .generate import add_generate_parser, cmd_generate
from .io import is_artifact
from .models import resolve_device as _device
from .stats import directory_bytes, key_value_table, model_stats
from .training import add_train_parser, cmd_train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="atq", description="Adaptive ternary quantization of causal LMs")
    commands = parser.add_subparsers(dest="command", required=True)
    for add in (flags.add_quantize_parser, add_train_parser, _add_export, _add_eval, add_generate_parser):
        add(commands)
    return parser


def _add_export(commands: argparse._SubParsersAction) -> None:
    x = commands.add_parser("export", help="write an artifact in a format other runtimes load")
    x.add_argument("--model", required=True, help="ATQ artifact directory")
    x.add_argument("--format", choices=["gguf", "hf"], required=True,
                   help="gguf: llama.cpp (Q2_0/TQ2_0, exact); hf: transformers' BitNet checkpoint")
    x.add_argument("--out", required=True, help="output file (gguf) or directory (hf)")
    x.add_argument("--overwrite", action="store_true", help="hf: replace a non-empty --out directory")
    x.add_argument("--metadata-from", default=None,
                   help="gguf: copy metadata and tokenizer from this GGUF ('smollm2': the bundled one)")
    x.add_argument("--ternary-type", choices=["auto", "q2_0", "tq2_0", "tq1_0"], default="auto",
                   help="gguf: auto = per layer the smallest exact type (TQ2_0, else Q2_0)")
    x.add_argument("--fallback", choices=["q8_0", "f16"], default="q8_0",
                   help="gguf type of ternary tensors that no exact type holds (reported)")
    x.add_argument("--embedding", choices=["q8_0", "f16"], default=None,
                   help="gguf: embedding and head type (default: as the artifact stores them)")
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
    print(key_value_table(_quantize_rows(args, report, stats, record, before, after)))
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
    print(key_value_table([("model", args.model), ("data", str(args.data)), ("windows", f"{result['windows']}x{args.seq_len}"),
                  ("perplexity", f"{result['ppl']:.3f}"), ("token accuracy", f"{result['token_accuracy']:.4f}")]))
    if args.json:
        write_json(args.json, result | {"model": args.model, "data": str(args.data)})
    return 0


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
                             ternary_type=args.ternary_type, fallback=args.fallback, embedding=args.embedding)
        types = Counter(report["tensors"].values())
        exact = report["verified_exact"]
        print(key_value_table([("file", f"{report['path']} ({report['bytes'] / 2**20:.1f} MiB)"),
                      ("tensor types", ", ".join(f"{k} x{v}" for k, v in sorted(types.items()))),
                      ("ternary layers exact (checked) / fell back", f"{exact} / {len(report['fallback'])}"),
                      ("bits per ternary weight", f"{report['bits_per_ternary_weight']:.3f}")]))
        return 0
    from .export.hf import export_hf

    report = export_hf(model, args.out, dequantize=args.dequantize, tokenizer=tokenizer, overwrite=args.overwrite)
    print(key_value_table([(k, str(v)) for k, v in report.items()]))
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
