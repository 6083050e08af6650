"""SmolLM2 with the bitnet preset -> transformers BitNet checkpoint -> perplexity in plain transformers.

    python benchmarks/hf_export_smollm2.py [--windows 8] [--out results/hf_export_smollm2.json]

Quantizes SmolLM2 with ``QuantConfig.bitnet()`` (per-tensor absmean, int8 activations; weight-only: calibrated
PTQ needs row or group scales), saves the ATQ artifact, exports it with ``export_hf`` and loads the export with
``AutoModelForCausalLM.from_pretrained`` in a fresh subprocess that never imports ATQ. Reports both perplexities
on the same WikiText-2 test windows, and the sizes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from atq import QuantConfig, load_model, save_quantized
from atq.data import load_text, token_windows
from atq.export.hf import export_hf
from atq.files import write_json
from atq.measure import measure_recipe
from atq.stats import directory_bytes

PLAIN_TRANSFORMERS = """
import json, sys, torch, torch.nn.functional as F
from transformers import AutoModelForCausalLM
assert "atq" not in sys.modules
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
windows = torch.load(sys.argv[2])
losses = []
with torch.no_grad():
    for w in windows:
        logits = model(w[None]).logits[0, :-1].float()
        losses.append(float(F.cross_entropy(logits, w[1:])))
kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__})
print(json.dumps({"losses": losses, "linear_classes": kinds}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--out", default="results/hf_export_smollm2.json")
    args = parser.parse_args()
    fp_model, tokenizer = load_model("smollm2")
    windows = token_windows(tokenizer, load_text("wikitext2"), args.seq_len, args.windows)
    atq = measure_recipe(fp_model, QuantConfig.bitnet(), windows, device="cpu", keep_model=True)
    model = atq["model"]
    del fp_model
    with tempfile.TemporaryDirectory() as tmp:
        save_quantized(model, Path(tmp) / "atq", tokenizer=tokenizer)
        report = export_hf(model, Path(tmp) / "hf", tokenizer=tokenizer)
        torch.save(windows, Path(tmp) / "windows.pt")
        run = subprocess.run([sys.executable, "-c", PLAIN_TRANSFORMERS, str(Path(tmp) / "hf"),
                              str(Path(tmp) / "windows.pt")], capture_output=True, text=True, check=True)
        plain = json.loads(run.stdout.strip().splitlines()[-1])
        sizes = {"atq_artifact_bytes": directory_bytes(Path(tmp) / "atq"), "hf_export_bytes": report["bytes"]}
    ppl_hf = float(torch.tensor(plain["losses"], dtype=torch.float64).mean().exp())
    result = {"model": "SmolLM2-135M-Instruct", "config": QuantConfig.bitnet().to_dict(), "windows": len(windows),
              "seq_len": args.seq_len, "ppl_atq": atq["ppl"], "ppl_transformers": ppl_hf,
              "ppl_rel_diff": abs(ppl_hf - atq["ppl"]) / atq["ppl"], "linear_classes": plain["linear_classes"],
              **sizes}
    write_json(args.out, result)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
