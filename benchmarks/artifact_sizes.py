"""What a user takes home: artifact bytes and perplexity of the best one-plane and two-plane SmolLM2 recipes, with
the embedding (and its tied head) stored in bf16, in Q8_0 or in Q4_0 blocks.

    python benchmarks/artifact_sizes.py [--model smollm2] [--out results/artifact_smollm2.json] [--max-windows N]
                                        [--only TEXT ...] [--set FIELD=VALUE ...]
    python benchmarks/artifact_sizes.py --sizes-only --out results/artifact_smollm2_sizes.json   # CPU, bytes only

Per recipe it quantizes once (``measure.measure_recipe``: ``ppl`` is the in-memory FP32 model's perplexity, the
recipe's own number as in results/ptq_smollm2.json), then for each embedding storage saves the artifact (FP parts in bf16,
the default), splits its bytes (``stats.artifact_breakdown``: ternary codes, ternary scales, embedding blocks, FP
tensors, tokenizer, the rest) and evaluates the artifact as ``atq.load_quantized`` gives it back. WikiText-2 test,
2048-token windows. ``--set`` overrides config fields of every recipe (quick checks on small models).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from cards import device_name
from ptq_table import METHODS  # the recipes, named as in results/ptq_smollm2.json

from atq import load_model, load_quantized, save_quantized
from atq.data import load_text, token_windows
from atq.embedding import quantize_embeddings
from atq.evaluate import evaluate_windows
from atq.files import write_json
from atq.measure import fp_reference, measure_recipe
from atq.stats import artifact_breakdown, markdown_table

RECIPES = {
    "best one plane": "group 64, Hadamard rotation, calibrated + compensation + block reconstruction + end-to-end",
    "best two planes": ("group 128, 2 planes base-3, Hadamard rotation, calibrated + compensation + block "
                        "reconstruction + end-to-end"),
}
EMBEDDINGS = ("fp", "q8_0", "q4_0")


def measure_embeddings(model, config, tokenizer, windows, device: str) -> list[dict]:
    """One row per embedding storage of the quantized ``model``: bytes by part and the loaded artifact's ppl
    (None without ``windows``)."""
    rows = []
    for kind in EMBEDDINGS:
        variant = copy.deepcopy(model)
        quantize_embeddings(variant, kind)
        variant.atq_config = config.replace(embedding=kind)
        with tempfile.TemporaryDirectory() as tmp:
            directory = save_quantized(variant, Path(tmp) / "artifact", tokenizer=tokenizer)
            result = {"ppl": None, "token_accuracy": None} if windows is None else evaluate_windows(
                load_quantized(directory, device=device), windows, quiet=True)
            rows.append({"embedding": kind, "bytes": artifact_breakdown(directory), "ppl_artifact": result["ppl"],
                         "token_accuracy_artifact": result["token_accuracy"]})
        del variant
        print(f"  {kind}: {rows[-1]['bytes']['total'] / 1e6:.1f} MB, ppl {rows[-1]['ppl_artifact']}", file=sys.stderr)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="results/artifact_smollm2.json")
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--only", nargs="+", default=None, help="recipes whose name contains one of these")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes-only", action="store_true",
                        help="bytes only, on the CPU in a minute: each recipe's shapes quantized data-free (no "
                             "calibration, no evaluation); the artifact records the full recipe")
    args = parser.parse_args()
    if args.sizes_only:
        return sizes_only(args)
    overrides = {k: json.loads(v) if v[:1].isdigit() or v in ("true", "false") else v
                 for k, _, v in (text.partition("=") for text in args.set)}
    configs = {name: dict(METHODS)[method].replace(**overrides) for name, method in RECIPES.items()
               if not args.only or any(text in name for text in args.only)}
    fp_model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    windows = token_windows(tokenizer, load_text("wikitext2"), 2048, args.max_windows)
    card = device_name(args.device)
    report = {"model": args.model, "device": card, "seq_len": 2048, "windows": int(windows.shape[0]),
              "fp": fp_reference(fp_model, windows, args.device), "rows": []}
    for name, config in configs.items():
        measured = measure_recipe(fp_model, config, windows, tokenizer=tokenizer, device=args.device, keep_model=True)
        model = measured.pop("model")
        print(f"{name}: ppl {measured['ppl']:.3f} in {measured['quant_seconds']:.1f} s", file=sys.stderr)
        report["rows"].append({"recipe": name, "method": RECIPES[name], **measured,
                               "embeddings": measure_embeddings(model, config, tokenizer, windows, args.device)})
        del model
        write_json(args.out, report)  # a run cut short keeps what it measured
    print(markdown_table(*table(report)))
    return 0


def sizes_only(args: argparse.Namespace) -> int:
    """The artifact bytes of every recipe and embedding storage: they depend on the shapes, not on the values."""
    from atq import quantize

    fp_model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    report = {"model": args.model, "note": "bytes only: shapes quantized data-free, full recipe recorded", "rows": []}
    for name, method in RECIPES.items():
        config = dict(METHODS)[method]
        model = copy.deepcopy(fp_model)
        quantize(model, config.replace(calibration=None, reconstruct_steps=0, end_to_end_steps=0), quiet=True)
        model.atq_config = config
        report["rows"].append({"recipe": name, "method": method, "quant_seconds": None,
                               "embeddings": measure_embeddings(model, config, tokenizer, None, "cpu")})
    write_json(args.out, report)
    return 0


def table(report: dict) -> tuple[list[str], list[list[str]]]:
    header = ["recipe", "embedding", "artifact MB", "ternary codes + scales MB", "embedding MB", "tokenizer MB",
              "perplexity (artifact)", "vs bf16 embedding", "quantize s"]
    rows = []
    for row in report["rows"]:
        base = row["embeddings"][0]["ppl_artifact"]
        for entry in row["embeddings"]:
            parts, ppl = entry["bytes"], entry["ppl_artifact"]
            embedding = parts["embedding"] or parts["fp_tensors"]
            rows.append([row["recipe"], entry["embedding"], f"{parts['total'] / 1e6:.1f}",
                         f"{(parts['ternary_codes'] + parts['ternary_scales']) / 1e6:.1f}", f"{embedding / 1e6:.1f}",
                         f"{parts['tokenizer'] / 1e6:.1f}", "-" if ppl is None else f"{ppl:.2f}",
                         "-" if ppl is None else f"{100 * (ppl / base - 1):+.2f}%",
                         "-" if row["quant_seconds"] is None else f"{row['quant_seconds']:.0f}"])
    return header, rows


if __name__ == "__main__":
    sys.exit(main())
