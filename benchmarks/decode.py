"""End-to-end decode speed: packed ternary SmolLM2 vs bf16, batch 1 and 16 -> results/decode_h100.json.

    python benchmarks/decode.py [--new-tokens 128] [--out results/decode_h100.json]

Greedy ``generate`` with the KV cache from a 32-token prompt; tokens/s counts new tokens of all sequences, and
peak GPU memory is ``torch.cuda.max_memory_allocated`` over the run. Variants: the FP model in bf16; the ternary
model (groups of 64, weight-only: speed does not depend on quality) with the torch reference kernel (unpack then
matmul, every step); the same with the Triton kernel (``ATQ_KERNEL=triton``). Non-ternary parts run in bf16.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch

from atq import QuantConfig, load_model, quantize
from atq.bench import markdown_table
from atq.io import write_json


def decode(model, batch: int, new_tokens: int) -> dict:
    prompt = torch.randint(0, model.config.vocab_size, (batch, 32), generator=torch.Generator().manual_seed(0))
    prompt = prompt.cuda()
    model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up (and kernel compiles)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": batch * new_tokens / seconds, "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default="results/decode_h100.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("decode: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 0
    fp, _ = load_model("smollm2", dtype=torch.bfloat16, device="cuda")
    ternary = copy.deepcopy(fp)
    quantize(ternary, QuantConfig(group_size=64), quiet=True)
    rows = []
    for label, model, kernel in [("bf16", fp, "reference"), ("ternary, torch reference", ternary, "reference"),
                                 ("ternary, Triton", ternary, "triton")]:
        os.environ["ATQ_KERNEL"] = kernel
        for batch in (1, 16):
            rows.append({"model": label, "batch": batch, **decode(model, batch, args.new_tokens)})
            print(rows[-1], file=sys.stderr, flush=True)
    write_json(args.out, {"device": torch.cuda.get_device_name(), "new_tokens": args.new_tokens, "rows": rows})
    print(markdown_table(["model", "batch", "tokens/s", "peak GiB"],
                         [[r["model"], str(r["batch"]), f"{r['tokens_per_s']:,.0f}", f"{r['peak_gib']:.2f}"]
                          for r in rows], numeric_from=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
