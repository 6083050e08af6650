"""End-to-end decode speed: packed ternary vs bf16 in transformers, batch 1 and 16 -> results/decode_<gpu>.json.

    python benchmarks/decode.py [--shape llama3-8b] [--new-tokens 128] [--compile] [--modes eager graph compiled compiled-cd]
                                [--variants bf16 ternary ternary-q8 reference]
                                [--gguf PATH] [--out results/decode_<gpu>.json] [--merge]

Greedy decoding with a static KV cache after a 32-token prompt; one step is one forward of one token per sequence.
tokens/s counts new tokens of all sequences; peak GPU memory is for the model alone (its weights + what the run
allocates: cache, graph pool, activations). Each model is timed stepping eagerly from Python and replaying one CUDA
graph per step (the graph holds every kernel of a forward, so Python and launch costs vanish: how a serving loop
runs small models); ``--compile`` adds the step compiled by ``torch.compile`` (inductor fuses the norms, rotary
embeddings and activations around the matmuls; the Triton product is one opaque operator) inside the graph.
``compiled-cd`` compiles with inductor's coordinate-descent tuning (each reduction's tiles tuned; a batch-1 matmul
becomes one reduction, so the Q8_0 head reads int8). ``--modes`` times only those step modes, ``--variants`` only
those models; with ``--merge`` the model's rows not timed again stay (an 8B model's
compiled rows fit one 10-minute device call, not all of its rows).

Models: the FP model in bf16; the ternary model (groups of 64, weight-only, data-free: speed does not depend on
quality) with the Triton kernels, and on small models also with the torch reference kernel (unpack then matmul).
``--shape`` builds a Llama of that shape with random weights (benchmarks/random_llama.py) instead of SmolLM2.
``--gguf PATH`` also exports the ternary model to a GGUF (every layer Q2_0, embedding and head Q8_0), so that
llama.cpp runs the very same weights (benchmarks/llama_cpp_decode.py adds its rows to the same JSON).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from cards import device_name, results_path
from random_llama import SHAPES, random_llama
from transformers import StaticCache

from atq import QuantConfig, load_model, quantize, smollm2
from atq.embedding import quantize_embeddings
from atq.export.gguf import export_gguf
from atq.files import write_json
from atq.stats import markdown_table

PROMPT = 32
WARMUP = 3
BATCHES = (1, 16)
MODES = ("eager", "graph", "compiled", "compiled-cd")
VARIANTS = ("bf16", "ternary", "ternary-q8", "reference")


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


@torch.no_grad()
def decode(model, batch: int, new_tokens: int, mode: str) -> dict:
    """Tokens/s of ``new_tokens`` timed steps (``mode``: eager, graph, or compiled + graph); peak GiB = the
    model's own weights + the most this run allocated on top (KV cache, graph pool, activations): both models
    stay resident, so the device-wide peak would count both."""
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
    options = {"coordinate_descent_tuning": True} if mode == "compiled-cd" else None
    forward = torch.compile(model, dynamic=False, options=options) if mode.startswith("compiled") else model

    def step() -> None:
        out = forward(token, past_key_values=cache, cache_position=position, use_cache=True).logits
        token.copy_(out[:, -1:].argmax(-1))
        position.add_(1)

    run = step
    if mode != "eager":
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(WARMUP):  # the compiled step compiles here, outside the capture
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


def byte_tokenizer_dir(directory: Path) -> Path:
    """A byte-level BPE ``tokenizer.json`` (256 byte tokens and one merge: llama.cpp refuses a BPE vocabulary without
    merges) for a random-weight model's GGUF: llama.cpp needs a vocabulary to load a file, and the export pads it
    to the model's vocab_size."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    vocab = {chr(b if b in printable else next(extra)): b for b in range(256)} | {"!!": 256}
    spec = {"model": {"type": "BPE", "vocab": vocab, "merges": ["! !"]}}
    (directory / "tokenizer.json").write_text(json.dumps(spec))
    return directory


def build_models(args: argparse.Namespace):
    """(name, bf16 FP model, ternary copy, GGUF metadata source or tokenizer directory)."""
    if args.shape:
        fp = random_llama(args.shape, "cuda").to(torch.bfloat16).eval()
        name, metadata = f"{args.shape} (random weights)", {"tokenizer_dir": byte_tokenizer_dir(Path(args.tmp))}
    else:
        fp, _ = load_model("smollm2", dtype=torch.bfloat16, device="cuda")
        name, metadata = "SmolLM2-135M-Instruct", {"metadata_from": smollm2()}
    ternary = copy.deepcopy(fp)
    quantize(ternary, QuantConfig(group_size=64), quiet=True)
    return name, fp, ternary, metadata


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None, help="a random Llama of this shape")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--compile", action="store_true", help="also time the torch.compile'd step")
    parser.add_argument("--gguf", default=None, help="export the ternary model here (Q2_0) for llama.cpp")
    parser.add_argument("--out", default=None, help="default: results/decode_<gpu>.json")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=None,
                        help="step modes to time (default: eager and graph, and compiled with --compile)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="models to time (default: all; the torch reference kernel on small models only)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the other models' entries of --out, and this model's rows not timed again")
    args = parser.parse_args()
    args.modes = tuple(args.modes or ("eager", "graph") + (("compiled",) if args.compile else ()))
    if not torch.cuda.is_available():
        print("decode: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 0
    args.out = args.out or results_path("decode")
    results = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).exists() else {}
    with tempfile.TemporaryDirectory() as args.tmp:
        name, fp, ternary, metadata = build_models(args)
        earlier = results.get(name, {})
        if (earlier.get("device"), earlier.get("new_tokens")) != (device_name(), args.new_tokens):
            earlier = {}  # rows of another card or length are not merged into this one's
        results[name] = entry = earlier | {  # llama_cpp_decode.py's rows and an earlier export stay
            "device": device_name(), "new_tokens": args.new_tokens,
            "rows": earlier.get("rows", [])}
        if args.gguf:  # first: llama.cpp's rows need the file even if the timings below are cut short
            start = time.perf_counter()
            report = export_gguf(ternary, args.gguf, embedding="q8_0", **metadata)
            entry["gguf"] = {"path": args.gguf, "bytes": report["bytes"], "verified_exact": report["verified_exact"],
                             "bits_per_ternary_weight": report["bits_per_ternary_weight"],
                             "fallback": len(report["fallback"]), "export_seconds": time.perf_counter() - start}
            print(entry["gguf"], file=sys.stderr, flush=True)
        def record(row: dict) -> None:  # a row timed again replaces the earlier one; the others stay
            key = lambda r: (r["model"], r["mode"], r["batch"])
            entry["rows"] = [r for r in entry["rows"] if key(r) != key(row)] + [row]
            write_json(args.out, results)

        measure(args, fp, ternary, record)
        print(table(name, entry["rows"]), flush=True)
    return 0


def q8_head(ternary):
    """A copy of the ternary model with the embedding and LM head in Q8_0 blocks: the very weights of the GGUF
    export (llama.cpp reads 8.5 bits a weight of the head where bf16 reads 16: a third of an 8B model's bytes a
    step). Compiled with coordinate-descent tuning, inductor turns the batch-1 head into one reduction that reads
    the int8 codes and scales directly (its matrix-vector decomposition); without it the head dequantizes to bf16
    first."""
    model = copy.deepcopy(ternary)
    quantize_embeddings(model, "q8_0")
    return model


def measure(args: argparse.Namespace, fp, ternary, record) -> list[dict]:
    """Every (model, step mode, batch) row; ``record`` gets each row as it is measured (written at once, so a run cut
    short keeps what it timed)."""
    small = args.shape is None or args.shape == "tiny"
    chosen = args.variants or [v for v in VARIANTS if small or v != "reference"]
    variants = [(label, model(), kernel) for key, label, model, kernel in (
        ("bf16", "bf16", lambda: fp, "reference"),
        ("ternary", "ternary, Triton", lambda: ternary, "triton"),
        ("ternary-q8", "ternary, Triton, Q8_0 embedding + head", lambda: q8_head(ternary), "triton"),
        ("reference", "ternary, torch reference", lambda: ternary, "reference")) if key in chosen]
    rows = []
    for label, model, kernel in variants:
        os.environ["ATQ_KERNEL"] = kernel
        for mode in [m for m in args.modes if kernel == "triton" or label == "bf16" or not m.startswith("compiled")]:
            for batch in BATCHES:
                row = {"model": label, "batch": batch, "mode": mode}
                try:
                    row |= decode(model, batch, args.new_tokens, mode)
                except Exception as error:  # noqa: BLE001 - a variant that cannot run (a compiler error) is reported
                    row["error"] = f"{type(error).__name__}: {error}"[:300]
                rows.append(row)
                record(row)
                print(rows[-1], file=sys.stderr, flush=True)
    os.environ.pop("ATQ_KERNEL")
    return rows


def table(name: str, rows: list[dict]) -> str:
    cells = [[r["model"], r["mode"], str(r["batch"]), f"{r['tokens_per_s']:,.0f}", f"{r['ms_per_step']:.2f}",
              f"{r['peak_gib']:.2f}"] if "error" not in r else [r["model"], r["mode"], str(r["batch"]), r["error"], "", ""]
             for r in rows]
    return f"{name}\n\n" + markdown_table(["model", "step", "batch", "tokens/s", "ms/step", "peak GiB"], cells,
                                          numeric_from=2)


if __name__ == "__main__":
    sys.exit(main())
