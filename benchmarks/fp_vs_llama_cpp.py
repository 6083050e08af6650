"""FP perplexity of a bundled model in ATQ (transformers' GGUF reader) against llama.cpp's on the same token ids.

    pip install llama-cpp-python   # a benchmark extra (it compiles llama.cpp, ~13 min on 2 cores)
    python benchmarks/fp_vs_llama_cpp.py --model gemma3-270m [--windows 4 --seq-len 512] [--out FILE]

Before a model's quantized numbers mean anything, its FP numbers must: transformers dequantizes the GGUF and runs
its own implementation of the architecture, llama.cpp runs the file as its authors meant. Both get the same
WikiText-2 test windows, built by ATQ's protocol (``atq.data.token_windows``: where the tokenizer asks for BOS,
every window opens with it), and the same windows without BOS for the record; llama.cpp's perplexity is computed
from its logits exactly as ATQ's (mean NLL of every next token of a window, then exp of the mean over windows).
"""

from __future__ import annotations

import argparse
import sys

from atq import load_model
from atq.data import load_text, opening_token, token_windows
from atq.evaluate import evaluate_windows, llama_cpp_perplexity
from atq.files import write_json
from atq.models import resolve_source


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default results/fp_vs_llama_cpp_<model>.json")
    args = parser.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("fp_vs_llama_cpp: needs llama-cpp-python (pip install llama-cpp-python)", file=sys.stderr)
        return 2
    path = resolve_source(args.model)
    model, tokenizer = load_model(args.model)
    text = load_text("wikitext2")
    protocol = token_windows(tokenizer, text, args.seq_len, args.windows)
    plain = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    plain = plain[: args.windows * args.seq_len].reshape(args.windows, args.seq_len)
    llm = Llama(path, n_ctx=args.seq_len, logits_all=True, n_threads=args.threads, verbose=False)
    rows = {}
    for label, windows in [("windows as ATQ builds them", protocol), ("no BOS in any window", plain)]:
        atq_ppl = evaluate_windows(model, windows, quiet=True)["ppl"]
        cpp_ppl = llama_cpp_perplexity(llm, windows)
        rows[label] = {"ppl_atq": atq_ppl, "ppl_llama_cpp": cpp_ppl, "rel_diff": abs(atq_ppl - cpp_ppl) / cpp_ppl}
        print(label, rows[label], flush=True)
    write_json(args.out or f"results/fp_vs_llama_cpp_{args.model}.json", {
        "model": args.model, "file": path.rsplit("/", 1)[-1], "architecture": model.config.model_type,
        "bos_opens_windows": opening_token(tokenizer) is not None, "windows": args.windows, "seq_len": args.seq_len,
        "data": "WikiText-2 test", "llama_cpp": "llama-cpp-python 0.3.36, CPU", "rows": rows,
        "command": f"python benchmarks/fp_vs_llama_cpp.py --model {args.model} --windows {args.windows} "
                   f"--seq-len {args.seq_len}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
