"""llama.cpp's own low-bit quantizer on the same FP weights, beside ATQ's exports -> results/peers_<model>.json.

    python benchmarks/peers.py --llama-cpp BIN_DIR [--model smollm2|qwen2.5-coder-1.5b] [--windows 16]
                               [--atq LABEL=FILE.gguf|ARTIFACT ...] [--types Q2_K IQ2_XS IQ2_XXS Q2_0]
                               [--imatrix FILE] [--work DIR] [--out FILE] [--merge]

The FP weights are the bundled model's GGUF (SmolLM2: Q4_1; Qwen2.5-Coder-1.5B: Q4_K_M; what ATQ's FP model is,
dequantized), written as F16 by ``llama-quantize``.
``llama-imatrix`` computes an importance matrix over the calibration text ATQ calibrates on (WikiText-2
*validation*, 128 x 2048 tokens); ``llama-quantize --imatrix`` writes each type (where a tensor's rows do not fit
a type's 256-wide blocks, llama.cpp falls back tensor by tensor: the file's types are counted). Every file —
those, the F16 reference and ATQ's exports (``--atq``) — is scored twice on the same WikiText-2 test windows:
by ATQ's evaluation loop (the file's weights dequantized into the HF model, export/gguf_weights.py), and by
llama.cpp itself through llama-cpp-python (its logits for the same token ids), with its size and bits per weight
as written. Needs a llama.cpp build (../shared/tools/llama_cpp_src.sh) and a GPU for speed (runs on a CPU).
``--types`` with no type skips llama.cpp's quantizer; ``--merge`` keeps the rows of --out for files not scored now
(one device call can then add ATQ's artifacts to the llama.cpp rows of an earlier one, on the same windows).
``--imatrix`` takes an importance matrix computed earlier (by ``llama_cpp_tools.importance_matrix`` on a GPU, where
it takes seconds, not the half hour of a 2-core CPU) instead of computing it. ``--work`` keeps the F16 file, the
matrix and llama.cpp's files in DIR and reuses those already there (one step can write them while ATQ quantizes).
"""

from __future__ import annotations

import argparse
import copy
import faulthandler
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import llama_cpp_tools
import torch
from cards import device_name

from atq import load_model, load_quantized
from atq.bundled import BUNDLES
from atq.data import load_text, token_windows
from atq.evaluate import evaluate_windows, llama_cpp_perplexity
from atq.export.gguf import export_gguf
from atq.export.gguf_read import read_gguf
from atq.export.gguf_weights import load_gguf_weights
from atq.files import write_json
from atq.models import resolve_source
from atq.stats import markdown_table

CALIBRATION_CHUNKS = 128  # ATQ's calibration: 128 windows of 2048 tokens of the validation text
OUT = {"smollm2": "results/peers_smollm2.json", "qwen2.5-coder-1.5b": "results/peers_qwen25_coder_1p5b.json"}
F16 = "F16 (the FP weights)"
LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def file_stats(path: Path) -> dict:
    """Bytes, tensor types and bits per weight as written: over all tensors, and over the decoder linears' weights
    (Qwen2's q/k/v biases, F32, count in the first only)."""
    _, tensors = read_gguf(path)
    types = Counter(llama_cpp_type(t.ggml_type) for t in tensors.values())
    linear = [t for name, t in tensors.items() if name.split(".")[-2] in LINEARS and name.endswith(".weight")]
    weights = lambda ts: sum(int(torch.tensor(t.shape).prod()) for t in ts)
    return {"bytes": path.stat().st_size, "tensor_types": dict(sorted(types.items())),
            "bits_per_weight": 8 * sum(t.data.size for t in tensors.values()) / weights(tensors.values()),
            "bits_per_linear_weight": 8 * sum(t.data.size for t in linear) / weights(linear),
            "linear_types": dict(sorted(Counter(llama_cpp_type(t.ggml_type) for t in linear).items()))}


def llama_cpp_type(kind: int) -> str:
    import gguf

    return "Q2_0" if kind == 42 else gguf.GGMLQuantizationType(kind).name


def score(path: Path, fp_model, windows: torch.Tensor, device: str) -> dict:
    """ATQ's loop (weights dequantized into a copy of the FP model) and llama.cpp's, on the same windows."""
    model = copy.deepcopy(fp_model)
    load_gguf_weights(model, path)
    result = {"ppl_atq": evaluate_windows(model.to(device), windows, quiet=True)["ppl"]}
    del model
    llama_cpp = _isolated(_llama_cpp_score, path, windows)
    if "llama_cpp_error" in llama_cpp and device.startswith("cuda"):  # the same build on the CPU, recorded as such
        crashed = llama_cpp["llama_cpp_error"]
        llama_cpp = _isolated(_llama_cpp_score, path, windows, env={"CUDA_VISIBLE_DEVICES": ""})
        llama_cpp |= {"llama_cpp_device": "cpu", "llama_cpp_gpu_error": crashed}
    return result | llama_cpp


def _llama_cpp_score(path: Path, windows: torch.Tensor) -> dict:
    """llama.cpp's perplexity of ``path`` on ``windows`` through llama-cpp-python (on its GPU when it has one)."""
    try:
        from llama_cpp import Llama

        llm = Llama(str(path), n_ctx=windows.shape[1], logits_all=True, n_gpu_layers=-1, n_threads=os.cpu_count(),
                    verbose=False)
        return {"ppl_llama_cpp": llama_cpp_perplexity(llm, windows)}
    except (ImportError, OSError, ValueError, RuntimeError) as error:  # reported: the ATQ loop's number stands
        return {"llama_cpp_error": f"{type(error).__name__}: {error}"[:300]}


def _child(queue: multiprocessing.Queue, env: dict[str, str], function: Callable[..., dict], *args: object) -> None:
    os.environ.update(env)
    faulthandler.enable()  # a crash prints the Python stack it happened under to the log
    queue.put(function(*args))


def _isolated(function: Callable[..., dict], *args: object, env: dict[str, str] | None = None) -> dict:
    """``function(*args)`` in a child process with ``env`` added to its environment: a crash inside llama.cpp (a
    segfault of llama-cpp-python over a CUDA build, seen on an H100) becomes an error row instead of ending the run
    and every row measured before it."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, env or {}, function, *args))
    child.start()
    child.join()
    if child.exitcode != 0:
        return {"llama_cpp_error": f"llama-cpp-python's process ended with exit code {child.exitcode}"}
    return queue.get()


def write(args: argparse.Namespace, previous: dict, rows: list[dict], windows: int, imatrix_seconds: float | None,
          calibration: Path) -> None:
    """--out with the rows scored so far, after --merge's earlier rows of files not scored now."""
    scored = {row["file"] for row in rows}
    merged = [row for row in previous.get("rows", []) if row["file"] not in scored] + rows
    calibration_note = f"{calibration.name}, {args.chunks} x 2048 tokens" if args.types else previous.get("calibration")
    write_json(args.out, {"model": BUNDLES[args.model].title, "windows": windows, "seq_len": 2048,
                          "calibration": calibration_note, "imatrix_seconds": imatrix_seconds, "rows": merged})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp", required=True, metavar="BIN_DIR", help="llama.cpp's build/bin")
    parser.add_argument("--model", default="smollm2", choices=sorted(OUT), help="the bundled model")
    parser.add_argument("--atq", nargs="*", default=[], metavar="LABEL=PATH",
                        help="ATQ exports (.gguf) or artifacts (exported here: Q2_0 where exact, Q8_0 embedding)")
    parser.add_argument("--types", nargs="*", default=["Q2_K", "IQ2_XS", "IQ2_XXS", "Q2_0"])
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=CALIBRATION_CHUNKS, help="imatrix chunks of 2048 tokens")
    parser.add_argument("--imatrix", default=None, metavar="FILE",
                        help="an importance matrix of the same calibration text computed earlier")
    parser.add_argument("--work", default=None, metavar="DIR", help="keep (and reuse) llama.cpp's files here")
    parser.add_argument("--out", default=None, help="default: results/peers_<model>.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--merge", action="store_true", help="keep --out's rows of files not scored now")
    args = parser.parse_args()
    args.out = args.out or OUT[args.model]
    previous = json.loads(Path(args.out).read_text()) if args.merge and Path(args.out).exists() else {}
    atq_files = dict(text.split("=", 1) for text in args.atq)
    source = Path(resolve_source(args.model))
    fp_model, tokenizer = load_model(args.model, dtype=torch.float32, device="cpu")
    windows = token_windows(tokenizer, load_text("wikitext2"), 2048, args.windows)
    calibration = Path(os.environ.get("ATQ_DATA_DIR", "../shared/data")) / "wikitext2_valid_tokenized.txt"
    if previous and previous.get("windows") != len(windows):
        raise SystemExit(f"--merge: {args.out} was scored on {previous.get('windows')} windows, not {len(windows)}")
    rows = []
    card = device_name(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        f16 = work / "f16.gguf"
        if not f16.is_file():
            llama_cpp_tools.quantize(args.llama_cpp, source, f16, "F16")
        imatrix = Path(args.imatrix) if args.imatrix else work / "imatrix.gguf"
        imatrix_seconds = previous.get("imatrix_seconds")  # None for a matrix computed elsewhere (--imatrix)
        if args.types and not args.imatrix and not imatrix.is_file():
            start = time.perf_counter()
            llama_cpp_tools.importance_matrix(args.llama_cpp, f16, calibration, imatrix, args.chunks)
            imatrix_seconds = time.perf_counter() - start
        scored_before = {row["file"] for row in previous.get("rows", [])}
        files = {F16: f16} if args.types or F16 not in scored_before else {}  # the reference, scored once
        exported = {}
        for kind in args.types:
            files[f"llama.cpp {kind}, imatrix"] = work / f"{kind}.gguf"
            if not files[f"llama.cpp {kind}, imatrix"].is_file():
                llama_cpp_tools.quantize(args.llama_cpp, f16, files[f"llama.cpp {kind}, imatrix"], kind,
                                         imatrix=imatrix)
        for label, path in atq_files.items():
            files[label] = Path(path)
            if files[label].is_dir():  # an artifact: exported as `atq export --format gguf` would
                files[label] = work / f"atq{len(files)}.gguf"
                report = export_gguf(load_quantized(path), files[label], metadata_from=source, embedding="q8_0")
                exported[label] = {"artifact": str(path), "fallback_tensors": len(report["fallback"])}
        for label, path in files.items():
            rows.append({"file": label, **file_stats(path), **score(path, fp_model, windows, args.device),
                         **exported.get(label, {}), "device": card})
            print(rows[-1], file=sys.stderr, flush=True)
            write(args, previous, rows, len(windows), imatrix_seconds, calibration)  # each row as it is scored
    print(markdown_table(["file", "linear types", "bits/weight (all)", "bits/linear weight", "MB", "ppl ATQ loop",
                          "ppl llama.cpp"],
                         [[r["file"], ", ".join(f"{n} {k}" for k, n in r["linear_types"].items()),
                           f"{r['bits_per_weight']:.2f}", f"{r['bits_per_linear_weight']:.2f}", f"{r['bytes'] / 1e6:.1f}",
                           f"{r['ppl_atq']:.2f}", f"{r.get('ppl_llama_cpp', float('nan')):.2f}"] for r in rows],
                         numeric_from=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
