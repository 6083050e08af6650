"""QAT throughput on SmolLM2-135M: tokens/s of student forward+backward + teacher forward, and where time goes.

    python benchmarks/qat_throughput.py [--out results/qat_throughput_h100.json]

Random token windows (512 tokens), teacher in bf16, student latent weights fp32 under bf16 autocast, 12 steps
per setting (median of steps 4-12): learned vs recomputed scales, micro-batch 32 vs 64 windows, eager vs
``torch.compile`` (whose compile time is reported separately). Then a profiler table of two eager steps.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

from atq import QuantConfig, load_model
from atq.bench import markdown_table
from atq.io import write_json
from atq.qat import TrainConfig, _step_loss, prepare_qat, train

SETTINGS = [("learned", {"learned_scales": True}, 32, False), ("recomputed", {}, 32, False),
            ("learned bs64", {"learned_scales": True}, 64, False), ("compiled learned", {"learned_scales": True}, 32, True)]


def median_rate(history: list[dict]) -> float:
    rates = sorted(h["tokens_per_s"] for h in history)
    return rates[len(rates) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default="results/qat_throughput_h100.json")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("qat_throughput: needs a CUDA GPU (bf16 autocast, torch.compile); nothing measured", file=sys.stderr)
        return 0
    fp, _ = load_model(args.model, device="cuda")
    teacher = copy.deepcopy(fp).to(torch.bfloat16)
    data = torch.randint(0, fp.config.vocab_size, (512, 512), generator=torch.Generator().manual_seed(0))
    rows = []
    for label, options, batch, compiled in SETTINGS:
        student = copy.deepcopy(fp)
        prepare_qat(student, QuantConfig(), **options)
        start = time.perf_counter()
        steps = 25 if compiled else 12
        history = train(student, data, TrainConfig(steps=steps, batch_size=batch, compile=compiled), teacher=teacher,
                        quiet=True)
        rows.append({"setting": label, "batch_windows": batch, "seq_len": 512, "compile": compiled,
                     "tokens_per_s": median_rate(history[11 if compiled else 3 :]),
                     "first_step_s": history[0]["seconds"], "wall_s": time.perf_counter() - start,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(rows[-1], file=sys.stderr, flush=True)
        del student
        torch.cuda.empty_cache()
    student = copy.deepcopy(fp)
    prepare_qat(student, QuantConfig(), learned_scales=True)
    student.train()
    batch = data[:32].cuda()
    for _ in range(2):
        _step_loss(student, teacher, batch, TrainConfig(steps=1)).backward()
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            _step_loss(student, teacher, batch, TrainConfig(steps=1)).backward()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    cpu_ms = sum(e.self_cpu_time_total for e in averages) / 1e3
    cuda_ms = sum(getattr(e, "self_device_time_total", 0) for e in averages) / 1e3
    print(averages.table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    write_json(args.out, {"device": torch.cuda.get_device_name(), "model": args.model, "rows": rows,
                          "profile_two_eager_steps": {"self_cpu_ms": cpu_ms, "self_cuda_ms": cuda_ms}})
    print(markdown_table(
        ["setting", "windows x 512", "compile", "tokens/s", "first step s", "peak GiB"],
        [[r["setting"], str(r["batch_windows"]), str(r["compile"]), f"{r['tokens_per_s']:,.0f}",
          f"{r['first_step_s']:.1f}", f"{r['peak_gib']:.1f}"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
