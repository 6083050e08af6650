"""Post-training ternarisation table for SmolLM2-135M-Instruct on the full WikiText-2 test split.

    python benchmarks/ptq_table.py [--model smollm2] [--out results/ptq_smollm2.json] [--max-windows N]

Rows: FP32, the seed preset, per-row and per-group(64) scales at 50% sparsity, and MSE-optimal thresholds.
Each row: perplexity (GPTQ protocol, 2048-token windows), bits per ternary weight including fp16 scales, the
size of the saved artifact, and the time ``quantize`` took. Uses the GPU when one is present.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from atq import QuantConfig, load_model, quantize, save_quantized
from atq.bench import directory_bytes, model_stats
from atq.data import load_text, token_windows
from atq.evaluate import evaluate_windows
from atq.io import unique_state_dict

METHODS: list[tuple[str, QuantConfig]] = [
    ("seed preset (tensor, 0.7 std)", QuantConfig.seed()),
    ("row, sparsity 0.5", QuantConfig(mode="sparsity", sparsity=0.5, granularity="row")),
    ("group 64, sparsity 0.5", QuantConfig(mode="sparsity", sparsity=0.5, granularity="group", group_size=64)),
    ("row, mse", QuantConfig(mode="mse", granularity="row")),
    ("group 64, mse", QuantConfig(mode="mse", granularity="group", group_size=64)),
]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/ptq_smollm2.json")
    args = parser.parse_args()

    fp_model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    windows = token_windows(tokenizer, load_text(args.data), args.seq_len, args.max_windows)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"

    fp_result = evaluate_windows(fp_model.to(args.device), windows, quiet=True)
    fp_model.to("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        save_file(unique_state_dict(fp_model)[0], f"{tmp}/model.safetensors")
        fp_bytes = directory_bytes(tmp)
    rows = [{"method": "FP32", "config": {"dtype": "float32"}, "ppl": fp_result["ppl"], "bits_per_weight": 32.0,
             "artifact_bytes": fp_bytes, "quant_seconds": 0.0, "token_accuracy": fp_result["token_accuracy"]}]
    print(f"FP32: ppl {fp_result['ppl']:.3f}", file=sys.stderr)

    for method, config in METHODS:
        model = copy.deepcopy(fp_model).to(args.device)
        _sync(args.device)
        start = time.perf_counter()
        quantize(model, config, quiet=True)
        _sync(args.device)
        seconds = time.perf_counter() - start
        result = evaluate_windows(model, windows, quiet=True)
        with tempfile.TemporaryDirectory() as tmp:
            artifact_bytes = directory_bytes(save_quantized(model, Path(tmp) / "artifact"))
        stats = model_stats(model)
        rows.append({
            "method": method, "config": config.to_dict() | {"calibration": None, "planes": 1},
            "ppl": result["ppl"], "bits_per_weight": stats["bits_per_weight"], "artifact_bytes": artifact_bytes,
            "quant_seconds": seconds, "token_accuracy": result["token_accuracy"], "sparsity": stats["sparsity"],
        })
        print(f"{method}: ppl {result['ppl']:.4g} ({seconds:.1f} s)", file=sys.stderr)
        del model

    report = {"model": args.model if args.model != "smollm2" else "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
              "device": device_name, "seq_len": args.seq_len, "windows": int(windows.shape[0]),
              "fp_ppl": fp_result["ppl"], "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(markdown_table(report))
    return 0


def markdown_table(report: dict) -> str:
    lines = [
        f"SmolLM2-135M-Instruct, WikiText-2 test, {report['windows']} windows x {report['seq_len']} tokens, "
        f"{report['device']}",
        "",
        "| method | perplexity | bits/weight (ternary layers, with scales) | artifact MiB | quantize s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for row in report["rows"]:
        lines.append(f"| {row['method']} | {row['ppl']:,.2f} | {row['bits_per_weight']:.2f} | "
                     f"{row['artifact_bytes'] / 2**20:.1f} | {row['quant_seconds']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
