"""GGUF export of a ternary SmolLM2, checked in llama.cpp (llama-cpp-python): text, perplexity, CPU speed.

    pip install llama-cpp-python   # a benchmark extra: it compiles llama.cpp (~13 min on 2 cores)
    python benchmarks/gguf_smollm2.py [--out results/gguf_smollm2.json]

Quantizes SmolLM2 with per-row scales, calibrated with GPTQ compensation on WikiText-2 *validation* windows (on
the CPU, a few minutes): per-row scales are what TQ2_0 holds exactly where rows are whole 256-blocks (the
1536-wide down projections); the 576-wide layers fall back to Q8_0 (see atq.export.gguf). Then exports it with
the bundled GGUF's metadata and tokenizer, and compares, on the same token windows of WikiText-2 test:
ATQ's PyTorch perplexity vs llama.cpp's (computed from its logits) for the exported file and for the same
weights written all-F16 (which separates the format from llama.cpp's 8-bit activations in TQ2_0/Q8_0 dot
products), generation tokens/s on the CPU for both, and a greedy sample.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from atq import QuantConfig, load_model, smollm2
from atq.data import load_text, token_windows
from atq.export.gguf import export_gguf
from atq.files import write_json
from atq.measure import measure_recipe

CONFIG = QuantConfig(granularity="row", calibration="wikitext2_valid", calibration_windows=64,
                     calibration_seq_len=512)


def llama_cpp_perplexity(llm, windows: torch.Tensor) -> float:
    """exp(mean over windows of the mean next-token NLL), from llama.cpp's logits for the same token ids."""
    losses = []
    for window in windows.tolist():
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        losses.append(-logp[np.arange(len(window) - 1), window[1:]].mean())
    return math.exp(float(np.mean(losses)))


def generation_speed(llm, prompt: str, tokens: int = 64) -> tuple[float, str]:
    llm.reset()
    start = time.perf_counter()
    out = llm(prompt, max_tokens=tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    return out["usage"]["completion_tokens"] / seconds, out["choices"][0]["text"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/gguf_smollm2.json")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("gguf_smollm2: needs llama-cpp-python (pip install llama-cpp-python)", file=sys.stderr)
        return 2

    fp_model, tokenizer = load_model("smollm2")
    windows = token_windows(tokenizer, load_text("wikitext2"), args.seq_len, args.windows)
    measured = measure_recipe(fp_model, CONFIG, windows, tokenizer=tokenizer, device="cpu", keep_model=True)
    model, ppl_atq = measured["model"], measured["ppl"]
    del fp_model
    result = {"model": "SmolLM2-135M-Instruct", "config": CONFIG.to_dict(), "windows": len(windows),
              "seq_len": args.seq_len, "quant_seconds_cpu": measured["quant_seconds"], "ppl_atq": ppl_atq,
              "files": {}}
    prompt = "The capital of France is"
    with tempfile.TemporaryDirectory() as tmp:
        for label, ternary_type in [("ternary", "tq2_0"), ("f16 reference", "f16")]:
            path = Path(tmp) / f"{ternary_type}.gguf"
            report = export_gguf(model, path, metadata_from=smollm2(), ternary_type=ternary_type)
            llm = Llama(str(path), n_ctx=args.seq_len, logits_all=True, n_threads=args.threads, verbose=False)
            speed, text = generation_speed(llm, prompt)
            entry = {"bytes": report["bytes"], "bits_per_ternary_weight": report["bits_per_ternary_weight"],
                     "tensor_types": sorted(set(report["tensors"].values())), "fallback": len(report["fallback"]),
                     "tensors": len(report["tensors"]), "tokens_per_s_cpu": speed,
                     "sample": prompt + text}
            entry["ppl_llama_cpp"] = llama_cpp_perplexity(llm, windows)
            entry["ppl_rel_diff"] = abs(entry["ppl_llama_cpp"] - ppl_atq) / ppl_atq
            entry["tq2_0_tensors"] = sum(v == "TQ2_0" for v in report["tensors"].values())
            if ternary_type == "tq2_0":
                result["ppl_llama_cpp"], result["ppl_rel_diff"] = entry["ppl_llama_cpp"], entry["ppl_rel_diff"]
            result["files"][label] = entry
            print(label, entry, file=sys.stderr, flush=True)
            del llm
    write_json(args.out, result)
    print(f"ATQ perplexity {ppl_atq:.3f}, llama.cpp {result['ppl_llama_cpp']:.3f} "
          f"(relative difference {result['ppl_rel_diff']:.4%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
