"""Ablation: sparsity target x mixed precision x method, on SmolLM2 (or any model source).

    python experiments/ablation.py --model smollm2 --max-batches 16 [--out results/ablation_smollm2.json]

Methods: the seed preset, weight-only mse, calibrated (sparsity mode, no compensation), calibrated with GPTQ
compensation, and two trit-planes (calibrated + compensation). Methods without a sparsity knob (seed, mse,
2 planes) run once per mixed-precision setting. Mixed precision keeps the top fraction of layers by the gradient
sensitivity score in floating point. ``--max-batches`` caps the evaluation windows (and the calibration windows)
so the grid fits a GPU session; the JSON records what was used. ``--shard I/N`` runs a slice of the grid so
several processes can share one GPU; ``--combine a.json b.json ... --out all.json`` merges their reports. Writes PNG plots next to the JSON: perplexity vs
sparsity per method, and perplexity vs bits per weight (the Pareto view).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from atq import QuantConfig, load_model
from atq.data import load_text, token_windows
from atq.evaluate import evaluate_windows
from atq.files import write_json
from atq.measure import measure_recipe
from atq.sensitivity import most_sensitive
from atq.stats import markdown_table

# the measured keys of a row, in the order results/ablation_smollm2.json has them
MEASURED = ("ppl", "sparsity", "bits_per_weight", "bits_per_linear_weight", "quant_seconds", "config")


def methods(calibration: str) -> dict[str, tuple[QuantConfig, bool]]:
    """name -> (config, whether the sparsity target applies)."""
    calibrated = QuantConfig(mode="sparsity", calibration=calibration, granularity="group", group_size=64)
    return {
        "seed preset": (QuantConfig.seed(), False),
        "mse": (QuantConfig(mode="mse"), False),
        "calibrated": (calibrated.replace(compensation=False), True),
        "calibrated + compensation": (calibrated, True),
        "2 planes": (calibrated.replace(mode="mse", planes=2), False),
    }


def fp_exclusions(model, config: QuantConfig, windows: torch.Tensor, fraction: float) -> tuple[str, ...]:
    """Exact-name exclude patterns for the most sensitive ``fraction`` of layers (scored on ``windows``).

    Not ``QuantConfig(fp_fraction=...)``: the grid keeps one FP set per (method, fraction), scored with the
    method's base config on ``--score-windows`` windows, and applies it to data-free methods too; the library's
    mixed precision scores each run's own config on up to 16 calibration windows and always calibrates.
    """
    if fraction == 0:
        return ()
    kept, _ = most_sensitive(model, config, windows, fraction, "gradient")
    return tuple(f"^{re.escape(name)}$" for name in sorted(kept))


def jobs(args: argparse.Namespace) -> list[tuple[str, float, float | None]]:
    """Every (method, FP fraction, sparsity target) of the grid, in report order."""
    return [(name, fraction, target)
            for name, (_, has_sparsity) in methods(args.calibration).items()
            for fraction in args.fp_fractions
            for target in (args.sparsities if has_sparsity else [None])]


def run(args: argparse.Namespace) -> dict:
    """Run this shard's jobs (every ``count``-th job from ``index``, so shards can share one GPU as separate
    processes: the calibrated runs are bound by kernel launches, not by the device)."""
    index, count = (int(part) for part in args.shard.split("/"))
    fp_model, tokenizer = load_model(args.model, device="cpu")
    eval_windows = token_windows(tokenizer, load_text(args.data), args.seq_len, args.max_batches)
    calib_windows = token_windows(tokenizer, load_text(args.calibration), args.seq_len, args.max_batches)
    fp_ppl = evaluate_windows(fp_model.to(args.device), eval_windows, quiet=True)["ppl"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    rows: list[dict] = []
    report = {"model": args.model, "device": device, "seq_len": args.seq_len, "windows": len(eval_windows),
              "calibration_windows": len(calib_windows), "fp_ppl": fp_ppl, "rows": rows}
    configs, exclusions = methods(args.calibration), {}
    done = {_job(row) for path in args.skip for row in json.loads(Path(path).read_text())["rows"]}
    for name, fraction, target in [job for job in jobs(args) if job not in done][index::count]:
        base = configs[name][0]
        if (name, fraction) not in exclusions:
            exclusions[name, fraction] = fp_exclusions(fp_model, base, calib_windows[: args.score_windows], fraction)
        config = base.replace(exclude=exclusions[name, fraction])
        if config.calibration:
            config = config.replace(calibration_windows=len(calib_windows), calibration_seq_len=args.seq_len)
        if target is not None:
            config = config.replace(sparsity=target)
        measured = measure_recipe(fp_model, config, eval_windows, device=args.device,
                                  calibration=calib_windows if config.calibration else None)
        rows.append({"method": name, "sparsity_target": target, "fp_fraction": fraction,
                     **{key: measured[key] for key in MEASURED}})
        print(f"{name:28s} fp {fraction:.1f} sparsity {target} -> ppl {rows[-1]['ppl']:.4g}", file=sys.stderr)
        write_json(args.out, report)  # after every row: a run cut short keeps what it measured
    return report


def _job(row: dict) -> tuple[str, float, float | None]:
    return row["method"], row["fp_fraction"], row["sparsity_target"]


def combine(paths: list[str], args: argparse.Namespace) -> dict:
    """One report from shard reports, rows in grid order (a missing job is simply absent)."""
    reports = [json.loads(Path(p).read_text()) for p in paths]
    by_job = {_job(r): r for rep in reports for r in rep["rows"]}
    return reports[0] | {"rows": [by_job[job] for job in jobs(args) if job in by_job]}


def plot(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        points = sorted((r["sparsity"], r["ppl"]) for r in report["rows"] if r["method"] == method and r["fp_fraction"] == 0)
        axis.plot(*zip(*points), marker="o", label=method)
    axis.axhline(report["fp_ppl"], color="black", linestyle="--", label="FP")
    axis.set(xlabel="achieved sparsity", ylabel="perplexity (log)", yscale="log", title="perplexity vs sparsity")
    axis.legend(fontsize=8)
    paths.append(out.with_name(out.stem + "_sparsity.png"))
    figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(r["method"] for r in report["rows"]):
        points = [(r["bits_per_linear_weight"], r["ppl"]) for r in report["rows"] if r["method"] == method]
        axis.scatter(*zip(*points), label=method, s=18)
    axis.axhline(report["fp_ppl"], color="black", linestyle="--", label="FP")
    axis.set(xlabel="bits per decoder weight (FP layers at 16)", ylabel="perplexity (log)", yscale="log",
             title="perplexity vs bits per weight")
    axis.legend(fontsize=8)
    paths.append(out.with_name(out.stem + "_pareto.png"))
    figure.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def table(report: dict) -> str:
    """Perplexity per (method, FP fraction) row and sparsity-target column, with bits per decoder weight."""
    rows = report["rows"]
    targets = sorted({r["sparsity_target"] for r in rows if r["sparsity_target"] is not None})
    header = ["method", "FP layers", "bits/weight (decoder)", *[f"sparsity {t:.1f}" for t in targets], "no target"]
    cells = []
    for method, fraction in dict.fromkeys((r["method"], r["fp_fraction"]) for r in rows):
        by_target = {r["sparsity_target"]: r for r in rows if (r["method"], r["fp_fraction"]) == (method, fraction)}
        bits = next(iter(by_target.values()))["bits_per_linear_weight"]
        values = [f"{by_target[t]['ppl']:,.1f}" if t in by_target else "" for t in targets + [None]]
        cells.append([method, f"{fraction:.0%}", f"{bits:.2f}", *values])
    return markdown_table(header, cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--calibration", default="wikitext2_valid")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--max-batches", type=int, default=16, help="evaluation and calibration windows")
    parser.add_argument("--score-windows", type=int, default=4, help="windows for the sensitivity scores")
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--fp-fractions", type=float, nargs="+", default=[0.0, 0.1, 0.2, 0.3])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/ablation_smollm2.json")
    parser.add_argument("--shard", default="0/1", help="I/N: run every N-th job of the grid from job I")
    parser.add_argument("--skip", nargs="+", default=[], help="reports whose jobs are not run again")
    parser.add_argument("--combine", nargs="+", default=None,
                        help="shard reports to merge into --out (nothing is run)")
    args = parser.parse_args(argv)
    report = combine(args.combine, args) if args.combine else run(args)
    out = Path(args.out)
    if args.combine:
        write_json(out, report)
    for path in plot(report, out):
        print(f"wrote {path}", file=sys.stderr)
    print(table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
