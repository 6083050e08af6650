"""Calibrated PTQ at scale: a Llama-3-8B-shaped model (random weights: the shape is what costs time and memory),
all 32 blocks, fp32 during calibration (the artifact's FP parts are bf16), with the whole model on the GPU and with sequential onloading (the model in CPU
memory, one block at a time on the GPU); one Llama-3-70B-shaped block timed the same way and the whole model
projected -> results/scale_<gpu>.json.

    python benchmarks/scale.py [--runs 8b-gpu 8b-onload 70b-block] [--windows 128 --seq-len 2048] [--out FILE]
    python benchmarks/scale.py --shape tiny --windows 4 --seq-len 64 --runs 8b-onload   # smoke test, any machine

Each run is written when it ends; runs of an earlier call on the same card and settings stay in --out unless run
again (the three runs need not fit one device call).

The recipe: groups of 64, GPTQ compensation and block reconstruction (``--reconstruct-steps``, default 96); end-to-end
tuning is a separate stage that needs the whole model (not run here). Calibration windows are random tokens (their
content does not change the cost). Peak GPU memory from torch, peak CPU memory from the process's max RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from cards import device_name, results_path
from random_llama import SHAPES, random_llama

from atq import QuantConfig, quantize
from atq.files import write_json


def run(name: str, shape: str, layers: int | None, home: str, args: argparse.Namespace) -> dict:
    """Quantize one model (built in ``home`` memory) with the work on the GPU; seconds and peak memories."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = random_llama(shape, home, layers)  # fp32: calibration computes in fp32 (artifacts store bf16 FP parts)
    windows = torch.randint(0, SHAPES[shape]["vocab_size"], (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(group_size=64, reconstruct_steps=args.reconstruct_steps)  # calibration: the windows given
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    quantize(model, config, calibration=windows, quiet=False, device=device, onload=home == "cpu")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"run": name, "blocks": layers or SHAPES[shape]["num_hidden_layers"], "model_in": home, "seconds": seconds,
           "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
           "cpu_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    print(row, file=sys.stderr, flush=True)
    del model
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=["8b-gpu", "8b-onload", "70b-block"],
                        choices=["8b-gpu", "8b-onload", "70b-block"])
    parser.add_argument("--shape", choices=["real", "tiny"], default="real", help="tiny: a smoke test of the script")
    parser.add_argument("--windows", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--reconstruct-steps", type=int, default=96)
    parser.add_argument("--out", default=None, help="default: results/scale_<gpu>.json")
    args = parser.parse_args()
    args.out = args.out or results_path("scale")
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    big = "tiny" if args.shape == "tiny" else "llama3-8b"
    huge = "tiny" if args.shape == "tiny" else "llama3-70b"
    header = {"device": device_name(), "windows": args.windows, "seq_len": args.seq_len,
              "reconstruct_steps": args.reconstruct_steps, "shape": args.shape}
    earlier = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    same = all(earlier.get(key) == value for key, value in header.items())
    rows = [row for row in earlier.get("rows", []) if row["run"] not in args.runs] if same else []
    for name in args.runs:  # each run is written as soon as it ends: a call cut short keeps the runs before
        if name == "8b-gpu":
            row = run(name, big, None, gpu, args)
        elif name == "8b-onload":
            row = run(name, big, None, "cpu", args)
        else:  # one block of the 70B shape (embedding and head included once), projected to all of its blocks
            row = run(name, huge, 1, "cpu", args)
            row["projected_seconds_all_blocks"] = row["seconds"] * SHAPES[huge]["num_hidden_layers"]
        rows.append(row)
        write_json(args.out, header | {"rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
