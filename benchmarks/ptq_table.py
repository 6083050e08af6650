"""Post-training ternarisation table for SmolLM2-135M-Instruct on the full WikiText-2 test split.

    python benchmarks/ptq_table.py [--model smollm2] [--out results/ptq_smollm2.json] [--max-windows N]
                                   [--only TEXT ...] [--set FIELD=VALUE ...] [--merge] [--save DIR]
                                   [--fp-from EARLIER.json]

Rows: FP32, the seed preset, per-row and per-group(64) scales at 50% sparsity, MSE-optimal thresholds, then the
calibrated recipes (GPTQ compensation, block reconstruction, trit-planes, mixed precision, Hadamard rotation,
end-to-end tuning). ``--set`` runs variants of the selected methods with config fields overridden.
Each row: perplexity (GPTQ protocol, 2048-token windows), bits per ternary weight including fp16 scales, the
size of the saved artifact, and the time ``quantize`` took. Uses the GPU when one is present. ``--save`` keeps the
artifact of the one method run (for exports and llama.cpp checks of the very model the row measured).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import torch
from cards import device_name

from atq import QuantConfig, load_model, save_quantized
from atq.data import load_text, token_windows
from atq.embedding import quantize_embeddings
from atq.files import write_json
from atq.measure import fp_reference, measure_recipe
from atq.stats import markdown_table

METHODS: list[tuple[str, QuantConfig]] = [
    ("seed preset (tensor, 0.7 std)", QuantConfig.seed()),
    ("row, sparsity 0.5", QuantConfig(mode="sparsity", sparsity=0.5, granularity="row")),
    ("group 64, sparsity 0.5", QuantConfig(mode="sparsity", sparsity=0.5, granularity="group", group_size=64)),
    ("row, mse", QuantConfig(mode="mse", granularity="row")),
    ("group 64, mse", QuantConfig(mode="mse", granularity="group", group_size=64)),
]
CALIBRATED = QuantConfig(calibration="wikitext2_valid", granularity="group", group_size=64)
METHODS += [
    ("group 64, calibrated, no compensation", CALIBRATED.replace(compensation=False)),
    ("group 64, calibrated + compensation", CALIBRATED),
    ("group 64, calibrated + compensation + block reconstruction", CALIBRATED.replace(reconstruct_steps=96)),
    ("group 64, 2 planes, calibrated + compensation", CALIBRATED.replace(planes=2)),
    ("group 128, 2 planes base-3, calibrated + compensation + block reconstruction",
     CALIBRATED.replace(planes=2, packing="base3", group_size=128, reconstruct_steps=256)),
    ("group 64, calibrated + compensation + block reconstruction, 20% layers FP",
     CALIBRATED.replace(reconstruct_steps=96, fp_fraction=0.2)),
    ("group 64, calibrated + compensation + block reconstruction, fast (64 windows, 64 steps)",
     CALIBRATED.replace(reconstruct_steps=64, calibration_windows=64)),
    ("group 64, calibrated + compensation + block reconstruction of scales and latent weights",
     CALIBRATED.replace(reconstruct_steps=96, reconstruct_weight_lr=1e-5)),
    ("group 128, 2 planes base-3, reconstruction of scales and latent weights (lr 1e-5)",
     CALIBRATED.replace(planes=2, packing="base3", group_size=128, reconstruct_steps=256,
                        reconstruct_weight_lr=1e-5)),
    ("group 128, 2 planes base-3, reconstruction of scales and latent weights (lr 5e-5)",
     CALIBRATED.replace(planes=2, packing="base3", group_size=128, reconstruct_steps=256,
                        reconstruct_weight_lr=5e-5)),
    ("group 128, 2 planes base-3, Hadamard rotation, calibrated + compensation + block reconstruction",
     CALIBRATED.replace(planes=2, packing="base3", group_size=128, reconstruct_steps=256, rotation="hadamard")),
    ("group 96, 2 planes base-3, Hadamard rotation, calibrated + compensation + block reconstruction",
     CALIBRATED.replace(planes=2, packing="base3", group_size=96, reconstruct_steps=256, rotation="hadamard")),
    ("group 64, Hadamard rotation, calibrated + compensation + block reconstruction",
     CALIBRATED.replace(reconstruct_steps=96, rotation="hadamard")),
    ("group 96, 2 planes base-3, Hadamard rotation, calibrated + compensation + block reconstruction + end-to-end",
     CALIBRATED.replace(planes=2, packing="base3", group_size=96, reconstruct_steps=256, rotation="hadamard",
                        end_to_end_steps=128)),
    ("group 128, 2 planes base-3, Hadamard rotation, calibrated + compensation + block reconstruction + end-to-end",
     CALIBRATED.replace(planes=2, packing="base3", group_size=128, reconstruct_steps=256, rotation="hadamard",
                        end_to_end_steps=128)),
    (("group 128, 2 planes base-3, Hadamard rotation, calibrated + compensation + block reconstruction + end-to-end, "
      "fast (64 windows, 64 + 64 steps)"),
     CALIBRATED.replace(planes=2, packing="base3", group_size=128, reconstruct_steps=64, rotation="hadamard",
                        end_to_end_steps=64, calibration_windows=64)),
    ("group 64, Hadamard rotation, calibrated + compensation + block reconstruction + end-to-end",
     CALIBRATED.replace(reconstruct_steps=96, rotation="hadamard", end_to_end_steps=128)),
    # the best recipes without the rotation: where a runtime must run the model without hooks (a rotated
    # Gemma rotates each post-norm's output at run time), and what Gemma 3 270M was first measured with
    ("group 64, calibrated + compensation + block reconstruction + end-to-end",
     CALIBRATED.replace(reconstruct_steps=96, end_to_end_steps=128)),
    ("group 128, 2 planes base-3, calibrated + compensation + block reconstruction + end-to-end",
     CALIBRATED.replace(planes=2, packing="base3", group_size=128, reconstruct_steps=256, end_to_end_steps=128)),
]

# the keys of a quantized row, in the order results/ptq_smollm2.json has them
ROW_KEYS = ("config", "ppl", "bits_per_weight", "artifact_bytes", "quant_seconds", "token_accuracy", "sparsity",
            "bits_per_linear_weight")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-windows", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/ptq_smollm2.json")
    parser.add_argument("--calibration-windows", type=int, default=None, help="override calibration windows")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only methods whose name contains one of these texts")
    parser.add_argument("--exact", action="store_true", help="--only names whole method names")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                        help="override QuantConfig fields of the methods run (values parsed as JSON, else text); "
                             "the overrides are appended to each method's name")
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of methods not run now from an existing --out file (the whole table "
                             "takes longer than one 10-minute device call)")
    parser.add_argument("--fp-from", default=None, metavar="FILE",
                        help="take the FP32 row from this earlier results file instead of evaluating the FP model "
                             "again (its windows must be these: checked by their sha256)")
    parser.add_argument("--save", default=None, metavar="DIR", help="save the artifact of the one method run")
    parser.add_argument("--save-embedding", default="fp", choices=("fp", "q8_0", "q4_0"),
                        help="store the saved artifact's embedding (and tied head) so (the row measured it as is)")
    args = parser.parse_args()

    selected = selected_methods(args)  # before loading anything: a bad --set fails at once
    if args.save and len(selected) != 1:
        raise SystemExit(f"--save keeps one artifact: select exactly one method (--only ... --exact), got {len(selected)}")
    fp_model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    windows = token_windows(tokenizer, load_text(args.data), args.seq_len, args.max_windows)
    card = device_name(args.device)

    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    fp = earlier_fp(args.fp_from, digest) if args.fp_from else fp_reference(fp_model, windows, args.device)
    report = {"model": args.model if args.model != "smollm2" else "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
              "device": card, "seq_len": args.seq_len, "windows": int(windows.shape[0]),
              "windows_sha256": digest, "fp_ppl": fp["ppl"]}
    previous = json.loads(Path(args.out).read_text())["rows"] if args.merge and Path(args.out).exists() else []
    rows = [{"method": "FP32", "config": {"dtype": "float32"}, "ppl": fp["ppl"], "bits_per_weight": 32.0,
             "artifact_bytes": fp["artifact_bytes"], "quant_seconds": 0.0, "token_accuracy": fp["token_accuracy"]}]
    print(f"FP32: ppl {fp['ppl']:.3f}", file=sys.stderr)

    for method, config in selected:
        measured = measure_recipe(fp_model, config, windows, tokenizer=tokenizer, device=args.device,
                                  keep_model=bool(args.save))
        if args.save:
            model = measured.pop("model")
            quantize_embeddings(model, args.save_embedding)
            model.atq_config = model.atq_config.replace(embedding=args.save_embedding)
            save_quantized(model, args.save, tokenizer=tokenizer)
        rows.append({"method": method, **{key: measured[key] for key in ROW_KEYS}, "device": card})
        print(f"{method}: ppl {measured['ppl']:.4g} ({measured['quant_seconds']:.1f} s)", file=sys.stderr)
        write_json(args.out, report | {"rows": merged(rows, previous)})  # a run cut short keeps what it measured
    print(table(report | {"rows": merged(rows, previous)}))
    return 0


def earlier_fp(path: str, digest: str) -> dict:
    """The FP32 row of an earlier run on the very same windows (the FP model's perplexity does not change between
    runs; evaluating it again costs a minute of GPU time per run on a 1.5B model)."""
    report = json.loads(Path(path).read_text())
    if report.get("windows_sha256") != digest:
        raise SystemExit(f"--fp-from {path}: its windows are not these (sha256 {report.get('windows_sha256')} vs "
                         f"{digest}): evaluate the FP model (drop --fp-from)")
    row = next(row for row in report["rows"] if row["method"] == "FP32")
    return {"ppl": row["ppl"], "artifact_bytes": row["artifact_bytes"], "token_accuracy": row["token_accuracy"]}


def selected_methods(args: argparse.Namespace) -> list[tuple[str, QuantConfig]]:
    """(name, config) of the methods to run: ``--only`` filters, ``--calibration-windows`` and ``--set``
    override fields (a ``--set`` variant's name carries its overrides)."""
    overrides = dict(_assignment(text) for text in args.set)
    selected = []
    for method, config in METHODS:
        if args.only and not any(text == method if args.exact else text in method for text in args.only):
            continue
        try:
            if args.calibration_windows and config.calibration:
                config = config.replace(calibration_windows=args.calibration_windows)
            if overrides:
                config = config.replace(**overrides)
                method = f"{method} [{', '.join(args.set)}]"
        except (TypeError, ValueError) as error:
            raise SystemExit(f"--set / --calibration-windows on {method!r}: {error}") from error
        selected.append((method, config))
    return selected


def _assignment(text: str) -> tuple[str, object]:
    field, sep, value = text.partition("=")
    if not sep:
        raise SystemExit(f"--set expects FIELD=VALUE, got {text!r}")
    try:
        return field, json.loads(value)
    except json.JSONDecodeError:
        return field, value


def merged(rows: list[dict], previous: list[dict]) -> list[dict]:
    """Rows measured now, plus earlier rows of the other methods, in the order of METHODS."""
    by_method = {row["method"]: row for row in previous} | {row["method"]: row for row in rows}
    order = ["FP32"] + [method for method, _ in METHODS]
    known = [by_method[m] for m in order if m in by_method]
    return known + [row for m, row in by_method.items() if m not in order]  # --set variants, after the table


def table(report: dict) -> str:
    """The markdown table of a report, under a line naming the data and the device."""
    header = ["method", "perplexity", "bits/weight (ternary layers, with scales)",
              "bits/weight (all decoder linears)", "artifact MiB", "quantize s"]
    cells = [[row["method"], f"{row['ppl']:,.2f}", f"{row['bits_per_weight']:.2f}",
              f"{row.get('bits_per_linear_weight', row['bits_per_weight']):.2f}",
              f"{row['artifact_bytes'] / 2**20:.1f}", f"{row['quant_seconds']:.1f}"] for row in report["rows"]]
    title = (f"{report['model']}, WikiText-2 test, {report['windows']} windows x {report['seq_len']} tokens, "
             f"{report['device']}")
    return f"{title}\n\n{markdown_table(header, cells)}"


if __name__ == "__main__":
    sys.exit(main())
