"""End-to-end decode speed: packed ternary SmolLM2 vs bf16, batch 1 and 16 -> results/decode_h100.json.

    python benchmarks/decode.py [--new-tokens 128] [--out results/decode_h100.json]

Greedy decoding with a static KV cache after a 32-token prompt; one step is one forward of one token per sequence.
tokens/s counts new tokens of all sequences; peak GPU memory is for the model alone (its weights + what the run
allocates: cache, graph pool, activations). Each model is timed twice: stepping eagerly from Python, and replaying
one CUDA graph per step (the graph holds every kernel of a forward, so Python and launch costs vanish; this is how a
serving loop runs small models). Variants: the FP model in bf16; the ternary model (groups of 64, weight-only: speed does not
depend on quality) with the torch reference kernel (unpack then matmul, every step); the same with the Triton
kernels (``ATQ_KERNEL=triton``). Non-ternary parts (embeddings, norms, attention, head) run in bf16 in all.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time

import torch
from transformers import StaticCache

from atq import QuantConfig, load_model, quantize
from atq.files import write_json
from atq.stats import markdown_table

PROMPT = 32
WARMUP = 3


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def decode(model, batch: int, new_tokens: int, graphed: bool) -> dict:
    """Tokens/s of the timed steps; peak GiB = the model's own weights + the most this run allocated on top
    (KV cache, graph pool, activations): both models stay resident, so the device-wide peak would count both."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (batch, PROMPT), generator=generator).to(device)
    model(prompt)  # first calls of these shapes autotune the Triton kernels (with a 256 MB scratch): not counted
    model(prompt[:, :1])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    cache = StaticCache(config=model.config, max_cache_len=PROMPT + new_tokens + 2 * WARMUP + 2)
    logits = model(prompt, past_key_values=cache, cache_position=torch.arange(PROMPT, device=device)).logits
    token = logits[:, -1:].argmax(-1)
    position = torch.tensor([PROMPT], device=device)

    def step() -> None:
        out = model(token, past_key_values=cache, cache_position=position, use_cache=True).logits
        token.copy_(out[:, -1:].argmax(-1))
        position.add_(1)

    run = step
    if graphed:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        run = graph.replay
    for _ in range(WARMUP):
        run()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(new_tokens):
        run()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    weights = model_bytes(model)
    return {"tokens_per_s": batch * new_tokens / seconds, "ms_per_step": 1e3 * seconds / new_tokens,
            "peak_gib": (weights + torch.cuda.max_memory_allocated() - before) / 2**30, "weights_gib": weights / 2**30}


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
        for graphed in (False, True):
            for batch in (1, 16):
                row = {"model": label, "batch": batch, "cuda_graph": graphed}
                try:
                    row |= decode(model, batch, args.new_tokens, graphed)
                except (RuntimeError, ValueError, TypeError) as error:  # a variant that cannot run is reported, not fatal to the others
                    row["error"] = f"{type(error).__name__}: {error}"[:300]
                rows.append(row)
                print(rows[-1], file=sys.stderr, flush=True)
    write_json(args.out, {"device": torch.cuda.get_device_name(), "new_tokens": args.new_tokens, "rows": rows})
    print(markdown_table(["model", "CUDA graph", "batch", "tokens/s", "ms/step", "peak GiB"],
                         [[r["model"], "yes" if r["cuda_graph"] else "no", str(r["batch"]),
                           f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:.2f}", f"{r['peak_gib']:.2f}"]
                          if "error" not in r else [r["model"], str(r["cuda_graph"]), str(r["batch"]), r["error"], "", ""]
                          for r in rows], numeric_from=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
