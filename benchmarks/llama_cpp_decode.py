"""llama.cpp's decode speed on the GPU for GGUF files, added to a decode JSON of benchmarks/decode.py.

    python benchmarks/llama_cpp_decode.py --llama-cpp BIN_DIR --model NAME --file LABEL=FILE.gguf [...]
                                          [--new-tokens 128] [--out results/decode_<gpu>.json]

NAME is the model's entry in --out (as decode.py wrote it: "SmolLM2-135M-Instruct", "llama3-8b (random
weights)"); each file gets llama-bench's batch-1 rate and llama-batched-bench's rates at batch 1 and 16
(llama_cpp_tools.decode_speed), every layer offloaded to the GPU. The files are decode.py's ``--gguf`` export
(the very weights its ternary rows ran) and, for reference, other types of the same model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import llama_cpp_tools
from cards import results_path

from atq.files import write_json
from atq.stats import markdown_table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", required=True, metavar="BIN_DIR")
    parser.add_argument("--model", required=True, help="the model's entry in --out")
    parser.add_argument("--file", nargs="+", required=True, metavar="LABEL=FILE")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--out", default=None, help="default: results/decode_<gpu>.json")
    args = parser.parse_args()
    args.out = args.out or results_path("decode")
    results = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    entry = results.setdefault(args.model, {})
    rows = []
    for label, path in (text.split("=", 1) for text in args.file):
        try:
            measured = llama_cpp_tools.decode_speed(args.llama_cpp, path, args.new_tokens)
        except (RuntimeError, OSError) as error:  # one file that fails is reported, the others still run
            measured = [{"error": f"{type(error).__name__}: {error}"[:600]}]
        rows += [{"file": label, "bytes": Path(path).stat().st_size, **row} for row in measured]
        print(rows[-1], file=sys.stderr, flush=True)
    entry["llama_cpp"] = rows
    write_json(args.out, results)
    print(markdown_table(["file", "tool", "batch", "tokens/s", "ms/step"],
                         [[r["file"], r.get("tool", ""), str(r.get("batch", "")), f"{r['tokens_per_s']:,.0f}",
                           f"{r['ms_per_step']:.2f}"] if "error" not in r else [r["file"], r["error"], "", "", ""]
                          for r in rows], numeric_from=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
