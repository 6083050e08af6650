"""Data-free QAT of SmolLM2-135M-Instruct: variants, throughput, perplexity curve -> results/qat_smollm2.json.

    python benchmarks/qat_smollm2.py --minutes 20 --segment-minutes 9 --workdir out/qat-bench [--out FILE]

No outside text: the training windows are sampled from the FP model (cached in the workdir), the PTQ starting
point is calibrated on those same generated windows, and only the evaluation reads WikiText-2 test. With
``--mix-valid N``, N windows of WikiText-2 validation text join the training data (the PTQ start stays
generated-only), for the issue's run "with validation text mixed in".

A device call lasts at most 10 minutes, so the run is made of segments: each invocation with the same
``--workdir`` continues where the last stopped (token cache, PTQ init artifact, training checkpoint and the
curve so far live there). The first invocation also runs the variant comparison: recomputed scales, learned
(LSQ) scales, learned scales + dead-zone bias (Tequila), each trained ``--compare-seconds`` from the same PTQ
init, and continues the main run with the best. The last segment packs the model, evaluates the full test split
and writes ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from cards import device_name

from atq import QuantConfig, load_model, load_quantized, save_quantized
from atq.config import COMPILE_MODES, ROTATIONS
from atq.data import cached_generated_windows, load_text, token_windows
from atq.evaluate import evaluate_windows
from atq.files import write_json
from atq.measure import measure_recipe
from atq.qat import TrainConfig, prepare_qat, to_packed, train
from atq.stats import model_stats

PTQ_INIT = QuantConfig(granularity="group", group_size=64, reconstruct_steps=64)
# name -> (prepare_qat options, learning rate relative to --lr)
VARIANTS = {
    "recomputed scales": ({}, 1.0),
    "learned scales (LSQ)": ({"learned_scales": True}, 1.0),
    "learned scales + dead-zone bias": ({"learned_scales": True, "dead_zone_bias": True}, 1.0),
    "recomputed scales, 3x lr": ({}, 3.0),
}


def student_from(init_dir: Path, variant: str, device: str) -> torch.nn.Module:
    student = load_quantized(init_dir).to(device)
    prepare_qat(student, student.atq_config, **VARIANTS[variant][0])
    return student


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--workdir", default="out/qat-bench")
    parser.add_argument("--out", default="results/qat_smollm2.json")
    parser.add_argument("--minutes", type=float, default=20.0, help="total training time of the main run")
    parser.add_argument("--segment-minutes", type=float, default=9.0, help="training time of this invocation")
    parser.add_argument("--compare-seconds", type=float, default=40.0, help="training time of each variant")
    parser.add_argument("--variant", choices=list(VARIANTS), default=None,
                        help="run only this variant's --compare-seconds probe (default: compare all, continue with the best)")
    parser.add_argument("--ptq-rotation", choices=ROTATIONS, default=PTQ_INIT.rotation,
                        help="rotation of the PTQ start (QuantConfig.rotation)")
    parser.add_argument("--ptq-end-to-end-steps", type=int, default=0,
                        help="end-to-end tuning steps of the PTQ start (on the generated windows)")
    parser.add_argument("--windows", type=int, default=8192, help="generated training windows")
    parser.add_argument("--mix-valid", type=int, default=0,
                        help="also train on this many WikiText-2 *validation* windows (the issue's mixed run; "
                             "use another --workdir and --out, e.g. results/qat_smollm2_mixed.json)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--compile", choices=COMPILE_MODES, default="blocks" if torch.cuda.is_available() else "off",
                        help="TrainConfig.compile of the main run (the probes run eager)")
    parser.add_argument("--steps", type=int, default=None,
                        help="steps of the main run (default: --minutes at the probe's rate); with --variant, "
                             "no probe runs")
    parser.add_argument("--curve-every", type=float, default=1.5, help="minutes between curve points")
    parser.add_argument("--curve-windows", type=int, default=40, help="test windows per curve point")
    parser.add_argument("--max-windows", type=int, default=None, help="test windows of the final evaluation")
    parser.add_argument("--test-seq-len", type=int, default=2048)
    parser.add_argument("--finish", action="store_true",
                        help="pack, evaluate and write --out after this segment even if the schedule has steps left")
    parser.add_argument("--generate-batch", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    ptq_init = PTQ_INIT.replace(rotation=args.ptq_rotation, end_to_end_steps=args.ptq_end_to_end_steps)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    meta_path = work / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    fp_model, tokenizer = load_model(args.model, device=args.device)
    test = token_windows(tokenizer, load_text("wikitext2"), args.test_seq_len, args.max_windows)
    curve_test = test[: args.curve_windows]
    teacher = copy.deepcopy(fp_model).to(torch.bfloat16) if args.device.startswith("cuda") else fp_model
    started = time.perf_counter()
    data = cached_generated_windows(teacher, tokenizer, args.windows, args.seq_len, work / "tokens.safetensors",
                                    batch_size=args.generate_batch)
    generate_seconds = time.perf_counter() - started
    source = f"generated {args.windows} x {args.seq_len}"
    if args.mix_valid:  # train() reshuffles every epoch, so appending is mixing
        valid = token_windows(tokenizer, load_text("wikitext2_valid"), args.seq_len, args.mix_valid)
        data = torch.cat([data.to(torch.long), valid])
        source += f" + WikiText-2 validation {len(valid)} x {args.seq_len}"

    def ppl(model, windows) -> float:
        # eager even inside the compiled run (curve points): other shapes and no_grad would only recompile
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            return evaluate_windows(model, windows, quiet=True)["ppl"]

    init_dir = work / "ptq"
    if not meta:
        ptq = measure_recipe(fp_model, ptq_init, test, calibration=data[:256],  # generated text, never WikiText
                             device=args.device, keep_model=True)
        save_quantized(ptq["model"], init_dir, tokenizer=tokenizer)
        ptq_seconds = ptq["quant_seconds"]
        meta = {"fp_ppl": ppl(fp_model, test), "ppl_start": ptq["ppl"], "ptq_seconds": ptq_seconds,
                "generate_seconds": generate_seconds, "ppl_start_curve": ppl(ptq["model"], curve_test)}
        del ptq
        print(f"PTQ init: ppl {meta['ppl_start']:.2f} (FP {meta['fp_ppl']:.2f}), {ptq_seconds:.1f} s", file=sys.stderr)
        variants = {}
        for name, (_, factor) in VARIANTS.items():
            if args.variant is not None and name != args.variant:
                continue  # no comparison: the chosen variant's run alone measures the rate that plans the steps
            if args.variant is not None and args.steps is not None:
                variants[name] = {"lr": args.lr * factor}  # nothing to compare, nothing to plan
                continue
            student = student_from(init_dir, name, args.device)
            plan = TrainConfig(steps=100_000, batch_size=args.batch_size, lr=args.lr * factor, warmup_steps=50)
            history = train(student, data, plan, teacher=teacher, quiet=True, max_seconds=args.compare_seconds)
            rates = sorted(h["tokens_per_s"] for h in history[5:]) or [history[-1]["tokens_per_s"]]
            variants[name] = {"lr": plan.lr, "steps": len(history), "seconds": history[-1]["seconds"],
                              "tokens_per_s": rates[len(rates) // 2], "loss_end": history[-1]["loss"],
                              "ppl": ppl(student, curve_test)}
            print(f"{name}: {variants[name]}", file=sys.stderr)
            del student
        best = min(variants, key=lambda n: variants[n].get("ppl", 0.0))
        rate = variants[best].get("tokens_per_s")
        steps = args.steps or int(args.minutes * 60 * rate / (args.batch_size * args.seq_len))
        meta |= {"variants": variants, "variant": best, "steps": steps, "tokens_per_s_probe": rate,
                 "curve": [[0.0, meta["ppl_start_curve"]]]}
        write_json(meta_path, meta)

    config = TrainConfig(steps=meta["steps"], batch_size=args.batch_size, lr=meta["variants"][meta["variant"]]["lr"],
                         warmup_steps=50, checkpoint_every=500, compile=args.compile)
    student = student_from(init_dir, meta["variant"], args.device)
    next_point = [meta["curve"][-1][0] + args.curve_every]

    def on_step(done: int, seconds: float) -> None:
        if seconds / 60 >= next_point[0] and done < config.steps:
            student.eval()
            meta["curve"].append([seconds / 60, ppl(student, curve_test)])
            student.train()
            next_point[0] += args.curve_every
            write_json(meta_path, meta)
            print(f"curve: {meta['curve'][-1]}", file=sys.stderr)

    history = train(student, data, config, teacher=teacher, checkpoint_dir=work / "ckpt", quiet=True,
                    max_seconds=args.segment_minutes * 60, on_step=on_step, log_path=work / "train_log.json")
    done = history[-1]["step"] + 1
    print(f"segment ends at step {done}/{config.steps}, {history[-1]['seconds'] / 60:.2f} min", file=sys.stderr)
    if done < config.steps and not args.finish:
        return 0

    minutes = history[-1]["seconds"] / 60
    rates = sorted(h["tokens_per_s"] for h in history[10:] or history)  # past the compile and warm-up
    to_packed(student)
    save_quantized(student, work / "final", tokenizer=tokenizer)
    stats = model_stats(student)
    ppl_end = ppl(student, test)
    meta["curve"].append([minutes, ppl(student, curve_test)])
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)",
        "device": device_name(args.device),
        "minutes": minutes, "steps": done, "planned_steps": config.steps, "tokens": history[-1]["tokens"], "tokens_per_s": rates[len(rates) // 2],
        "ppl_start": meta["ppl_start"], "ppl_end": ppl_end, "fp_ppl": meta["fp_ppl"],
        "bits_per_weight": stats["bits_per_weight"], "curve": meta["curve"],
        "curve_windows": len(curve_test), "eval_windows": len(test),
        "variants": meta["variants"], "variant": meta["variant"],
        "generate_seconds": meta["generate_seconds"], "ptq_seconds": meta["ptq_seconds"],
        "config": {"train": asdict(config),
                   "ptq_init": ptq_init.to_dict(), "data": source,
                   "teacher": "FP model (bf16)", "loss": "logit KL, T=1"},
    }
    write_json(args.out, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("config", "curve")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
