"""QAT throughput on SmolLM2-135M: tokens/s of student forward+backward + teacher forward, and where time goes.

    python benchmarks/qat_throughput.py [--settings NAME,NAME] [--profile SETTING] [--out FILE]

Random token windows (512 tokens), teacher in bf16, student latent weights fp32 under bf16 autocast, 12 steps
per eager setting (median of steps 4-12), 25 per compiled one (median of steps 12-25; the first step's time,
which holds the compile, is reported separately): learned vs recomputed scales, micro-batch 32 vs 64 windows,
eager vs ``torch.compile`` of each decoder block ("blocks") or of the whole model ("model", much slower to
compile). Then a profiler table of two steps of ``--profile``'s setting.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from atq import QuantConfig, load_model
from atq.files import write_json
from atq.qat import TrainConfig, compiled, prepare_qat, step_loss, train
from atq.stats import markdown_table

# name -> (prepare_qat options, micro-batch windows, TrainConfig.compile)
SETTINGS = {
    "learned": ({"learned_scales": True}, 32, "off"),
    "recomputed": ({}, 32, "off"),
    "learned bs64": ({"learned_scales": True}, 64, "off"),
    "compiled learned": ({"learned_scales": True}, 32, "model"),
    "blocks learned": ({"learned_scales": True}, 32, "blocks"),
    "blocks learned bs64": ({"learned_scales": True}, 64, "blocks"),
    "blocks learned bs128": ({"learned_scales": True}, 128, "blocks"),
}


def median_rate(history: list[dict]) -> float:
    rates = sorted(h["tokens_per_s"] for h in history)
    return rates[len(rates) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="results/qat_throughput_h100.json")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names from: " + ", ".join(SETTINGS))
    parser.add_argument("--profile", default="learned", choices=list(SETTINGS), help="setting of the profiled steps")
    args = parser.parse_args()
    names = args.settings.split(",")
    if unknown := set(names) - set(SETTINGS):
        parser.error(f"unknown settings {sorted(unknown)}")
    if not torch.cuda.is_available():
        print("qat_throughput: needs a CUDA GPU (bf16 autocast, torch.compile); nothing measured", file=sys.stderr)
        return 0
    fp, _ = load_model(args.model, device="cuda")
    teacher = copy.deepcopy(fp).to(torch.bfloat16)
    data = torch.randint(0, fp.config.vocab_size, (512, 512), generator=torch.Generator().manual_seed(0))
    rows = []
    for label in names:
        options, batch, mode = SETTINGS[label]
        student = copy.deepcopy(fp)
        prepare_qat(student, QuantConfig(), **options)
        start = time.perf_counter()
        steps = 12 if mode == "off" else 25
        torch.cuda.reset_peak_memory_stats()
        row = {"setting": label, "batch_windows": batch, "seq_len": 512, "compile": mode}
        try:
            history = train(student, data, TrainConfig(steps=steps, batch_size=batch, compile=mode),
                            teacher=teacher, quiet=True)
            row |= {"tokens_per_s": median_rate(history[3 if mode == "off" else 11 :]),
                    "first_step_s": history[0]["seconds"]}
        except torch.cuda.OutOfMemoryError:
            row |= {"tokens_per_s": None, "first_step_s": None, "error": "out of GPU memory"}
        rows.append(row | {"wall_s": time.perf_counter() - start, "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(rows[-1], file=sys.stderr, flush=True)
        del student
        torch.cuda.empty_cache()
    options, batch_windows, mode = SETTINGS[args.profile]
    student = copy.deepcopy(fp)
    prepare_qat(student, QuantConfig(), **options)
    student.train()
    batch = data[:batch_windows].cuda()
    config = TrainConfig(steps=1, compile=mode)
    from torch.profiler import ProfilerActivity, profile

    with compiled(student, mode) as forward, compiled(teacher, mode) as teacher_forward:
        for _ in range(3):
            step_loss(forward, teacher_forward, batch, config).backward()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step_loss(forward, teacher_forward, batch, config).backward()
            torch.cuda.synchronize()
    averages = prof.key_averages()
    cpu_ms = sum(e.self_cpu_time_total for e in averages) / 1e3
    cuda_ms = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1e3
    print(averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    write_json(args.out, {"device": torch.cuda.get_device_name(), "model": args.model, "rows": rows,
                          "profile_two_steps": {"setting": args.profile, "self_cpu_ms": cpu_ms,
                                                "self_cuda_ms": cuda_ms}})
    print(markdown_table(
        ["setting", "windows x 512", "compile", "tokens/s", "first step s", "peak GiB"],
        [[r["setting"], str(r["batch_windows"]), str(r["compile"]),
          f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else r["error"],
          f"{r['first_step_s']:.1f}" if r["first_step_s"] else "", f"{r['peak_gib']:.1f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
