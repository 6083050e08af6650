"""Calibrated PTQ at scale: a Llama-3-8B-shaped model (random weights: the shape is what costs time and memory),
all 32 blocks, fp32 during calibration (the artifact's FP parts are bf16), with the whole model on the GPU and with sequential onloading (the model in CPU
memory, one block at a time on the GPU); one Llama-3-70B-shaped block timed the same way and the whole model
projected -> results/scale_h200.json.

    python benchmarks/scale.py [--runs 8b-gpu 8b-onload 70b-block] [--windows 128 --seq-len 2048] [--out FILE]
    python benchmarks/scale.py --shape tiny --windows 4 --seq-len 64 --runs 8b-onload   # smoke test, any machine

The recipe: groups of 64, GPTQ compensation and block reconstruction (``--reconstruct-steps``, default 96); end-to-end
tuning is a separate stage that needs the whole model (not run here). Calibration windows are random tokens (their
content does not change the cost). Peak GPU memory from torch, peak CPU memory from the process's max RSS.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

import torch

from atq import QuantConfig, quantize
from atq.files import write_json

SHAPES = {
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
            "num_key_value_heads": 8, "vocab_size": 128256},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512},
}


def _model(shape: dict, layers: int | None, device: str) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, "num_hidden_layers": layers or shape["num_hidden_layers"]},
                         max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(config)  # fp32: calibration computes in fp32 (an artifact stores FP parts in bf16)


def run(name: str, shape: dict, layers: int | None, home: str, args: argparse.Namespace) -> dict:
    """Quantize one model (built in ``home`` memory) with the work on the GPU; seconds and peak memories."""
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = _model(shape, layers, home)
    windows = torch.randint(0, shape["vocab_size"], (args.windows, args.seq_len), generator=torch.Generator().manual_seed(0))
    config = QuantConfig(group_size=64, reconstruct_steps=args.reconstruct_steps)  # calibration: the windows given
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    quantize(model, config, calibration=windows, quiet=False, device=device, onload=home == "cpu")
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    row = {"run": name, "blocks": layers or shape["num_hidden_layers"], "model_in": home, "seconds": seconds,
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
    parser.add_argument("--out", default="results/scale_h200.json")
    args = parser.parse_args()
    gpu = "cuda" if torch.cuda.is_available() else "cpu"
    big = SHAPES["tiny"] if args.shape == "tiny" else SHAPES["8b"]
    huge = SHAPES["tiny"] if args.shape == "tiny" else SHAPES["70b"]
    rows = []
    for name in args.runs:
        if name == "8b-gpu":
            rows.append(run(name, big, None, gpu, args))
        elif name == "8b-onload":
            rows.append(run(name, big, None, "cpu", args))
        else:  # one block of the 70B shape (embedding and head included once), projected to all of its blocks
            row = run(name, huge, 1, "cpu", args)
            row["projected_seconds_all_blocks"] = row["seconds"] * huge["num_hidden_layers"]
            rows.append(row)
    write_json(args.out, {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                          "windows": args.windows, "seq_len": args.seq_len,
                          "reconstruct_steps": args.reconstruct_steps, "shape": args.shape, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
