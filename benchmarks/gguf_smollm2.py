"""GGUF export of a ternary SmolLM2, checked in llama.cpp (llama-cpp-python): text, perplexity, CPU speed.

    pip install llama-cpp-python   # a benchmark extra: it compiles llama.cpp (~13 min on 2 cores)
    python benchmarks/gguf_smollm2.py [--init ARTIFACT] [--out results/gguf_smollm2.json]
    python benchmarks/gguf_smollm2.py --init ARTIFACT --n-gpu-layers 99 --device cuda --out F   # llama.cpp on a GPU

The model: ``--init``, an ATQ artifact (the best one-plane recipe's, made on a GPU by artifact_sizes.py), or
else quantized here on the CPU by a short one-plane recipe of the same shape (groups of 64, Hadamard rotation,
calibrated on WikiText-2 *validation*, block reconstruction and end-to-end tuning, fewer windows and steps).
Groups of 64 along SmolLM2's 576- and 1536-wide rows are exactly llama.cpp's Q2_0 blocks, so every ternary layer
is written as Q2_0 (2.25 bits), the embedding as Q8_0, with the bundled GGUF's metadata and tokenizer. Then, on
the same token windows of WikiText-2 test: ATQ's PyTorch perplexity vs llama.cpp's (computed from its logits)
for that file and for the same weights written all-F16 (which separates the format from llama.cpp's 8-bit
activations in its Q2_0 dot products), generation tokens/s on the CPU for both, and a greedy sample.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from atq import QuantConfig, load_model, load_quantized, smollm2
from atq.data import load_text, token_windows
from atq.evaluate import evaluate_windows, llama_cpp_perplexity
from atq.export.gguf import export_gguf
from atq.files import write_json
from atq.measure import measure_recipe

CPU_CONFIG = QuantConfig(granularity="group", group_size=64, rotation="hadamard", calibration="wikitext2_valid",
                         calibration_windows=8, calibration_seq_len=512, reconstruct_steps=16, end_to_end_steps=16)


def generation_speed(llm, prompt: str, tokens: int = 64) -> tuple[float, str]:
    llm.reset()
    start = time.perf_counter()
    out = llm(prompt, max_tokens=tokens, temperature=0.0)
    seconds = time.perf_counter() - start
    return out["usage"]["completion_tokens"] / seconds, out["choices"][0]["text"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/gguf_smollm2.json")
    parser.add_argument("--init", default=None, help="an ATQ artifact to export (default: quantize here)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-gpu-layers", type=int, default=0, help="llama.cpp layers on the GPU (0: its CPU backend)")
    parser.add_argument("--device", default="cpu", help="where ATQ evaluates the model")
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("gguf_smollm2: needs llama-cpp-python (pip install llama-cpp-python)", file=sys.stderr)
        return 2

    fp_model, tokenizer = load_model("smollm2")
    windows = token_windows(tokenizer, load_text("wikitext2"), args.seq_len, args.windows)
    if args.init:
        model = load_quantized(args.init, device=args.device, dtype=torch.float32)  # computes in fp32, as llama.cpp
        ppl_atq, quant_seconds = evaluate_windows(model, windows)["ppl"], None
        model.to("cpu")
    else:
        measured = measure_recipe(fp_model, CPU_CONFIG, windows, tokenizer=tokenizer, device="cpu", keep_model=True)
        model, ppl_atq, quant_seconds = measured["model"], measured["ppl"], measured["quant_seconds"]
    del fp_model
    result = {"model": "SmolLM2-135M-Instruct", "init": args.init, "config": model.atq_config.to_dict(),
              "llama_cpp_backend": "CUDA" if args.n_gpu_layers else "CPU", "atq_device": args.device,
              "windows": len(windows), "seq_len": args.seq_len, "quant_seconds_cpu": quant_seconds,
              "ppl_atq": ppl_atq, "files": {}}
    prompt = "The capital of France is"
    with tempfile.TemporaryDirectory() as tmp:
        for label, ternary_type, embedding in [("ternary", "auto", "q8_0"), ("f16 reference", "f16", "f16")]:
            path = Path(tmp) / f"{ternary_type}.gguf"
            report = export_gguf(model, path, metadata_from=smollm2(), ternary_type=ternary_type, embedding=embedding)
            llm = Llama(str(path), n_ctx=args.seq_len, logits_all=True, n_threads=args.threads,
                        n_gpu_layers=args.n_gpu_layers, verbose=False)
            speed, text = generation_speed(llm, prompt)
            entry = {"bytes": report["bytes"], "bits_per_ternary_weight": report["bits_per_ternary_weight"],
                     "tensor_types": dict(sorted(Counter(report["tensors"].values()).items())),
                     "fallback": len(report["fallback"]), "verified_exact": report["verified_exact"],
                     "tensors": len(report["tensors"]), "tokens_per_s": speed,
                     "sample": prompt + text}
            entry["ppl_llama_cpp"] = llama_cpp_perplexity(llm, windows)
            entry["ppl_rel_diff"] = abs(entry["ppl_llama_cpp"] - ppl_atq) / ppl_atq
            if ternary_type == "auto":
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
