"""QAT on several GPUs: data-parallel scaling on SmolLM2 and FSDP2-sharded training of a Llama-3-8B-shaped model
-> results/qat_multigpu.json.

    python benchmarks/qat_multigpu.py all --model $ATQ_TEST_GGUF --out results/qat_multigpu.json

``all`` launches the runs below through torchrun, one after the other, and merges their JSON with any earlier
runs' in ``--workdir`` (``--runs fsdp`` now, ``--runs dp`` in a later call, for instance):

- ``dp``: the SmolLM2 QAT recipe (learned scales, logit KL from the bf16 FP teacher, ``compile="blocks"``) on
  WikiText-2 *validation* windows of 512 tokens, the same global batch (64 windows) and data order on 1 and on 2
  GPUs: median tokens/s over the steps after the compile, and the largest relative difference between the two
  loss curves over the first ``--dp-steps`` steps.
- ``fsdp``: a Llama-3-8B-shaped model (random weights: the shape is what costs memory), every linear layer of its
  32 blocks ternary (learned scales), fp32 latent weights and AdamW state, bf16 autocast, activation
  checkpointing, a bf16 teacher replicated on each GPU; sharded over 2 GPUs, and the same unsharded on 1 GPU
  (which is expected to run out of memory: its training state alone is ~16 bytes a parameter, 128 GB).
  Steps/s, tokens/s and peak GPU memory per process.

Each run is also a command of its own (``torchrun --nproc_per_node N benchmarks/qat_multigpu.py dp|fsdp ...``).
On a machine without two CUDA GPUs ``all`` says so and measures nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from random_llama import SHAPES, random_llama

from atq import QuantConfig, load_model
from atq.data import load_text, token_windows
from atq.distributed import rank_and_world, shard
from atq.files import write_json
from atq.qat import TrainConfig, prepare_qat, train
from atq.stats import markdown_table
from atq.surgery import decoder_blocks


def _init() -> tuple[int, int, str]:
    """Join torchrun's process group: NCCL on GPUs, gloo on a CPU (the ``--shape tiny`` smoke test)."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    rank, world = rank_and_world()
    return rank, world, f"cuda:{local}" if cuda else "cpu"


def _memory(world: int) -> list[dict[str, float]]:
    """Peak GPU memory (allocated, reserved) and peak CPU resident memory of every process, in GiB."""
    cuda = torch.cuda.is_available()
    mine = {"gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
            "gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
            "cpu_peak_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if world == 1:
        return [mine]
    import torch.distributed as dist

    every: list = [None] * world
    dist.all_gather_object(every, mine)
    return every


def _rates(history: list[dict], skip: int) -> dict[str, float]:
    """Median tokens/s and steps/s over the steps after the first ``skip`` (compile, allocator warm-up)."""
    rates = sorted(h["tokens_per_s"] for h in history[skip:])
    per_step = history[0]["tokens"] / (history[0]["step"] + 1)
    return {"tokens_per_s": rates[len(rates) // 2], "steps_per_s": rates[len(rates) // 2] / per_step}


def run_dp(args: argparse.Namespace) -> dict:
    rank, world, device = _init()
    teacher, tokenizer = load_model(args.model, device=device)
    student = copy.deepcopy(teacher)
    teacher = teacher.to(torch.bfloat16)
    prepare_qat(student, QuantConfig(group_size=64), learned_scales=True)
    windows = token_windows(tokenizer, load_text("wikitext2_valid"), 512)
    config = TrainConfig(steps=args.dp_steps, batch_size=args.dp_batch, lr=1e-4, warmup_steps=10, compile="blocks")
    history = train(student, windows, config, teacher=teacher, quiet=rank != 0)
    return {"world": world, "config": asdict(config),
            "windows": list(windows.shape), "losses": [h["loss"] for h in history],
            **_rates(history, skip=20), "memory": _memory(world)}


def run_fsdp(args: argparse.Namespace) -> dict:
    rank, world, device = _init()
    started, row = time.perf_counter(), {"world": world, "sharded": not args.no_shard, "shape": args.shape,
                                         "seq_len": args.seq_len, "global_batch": args.batch_size}
    try:
        student = random_llama(args.shape, device)
        row["parameters"] = sum(p.numel() for p in student.parameters())
        teacher = copy.deepcopy(student).to(torch.bfloat16).eval() if not args.no_teacher else None
        prepare_qat(student, QuantConfig(group_size=64), learned_scales=True)
        # activations recomputed block by block in the backward: what lets the 8B shape's batch fit
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not args.no_shard:
            shard(student, decoder_blocks(student)[1])
        row["build_s"] = time.perf_counter() - started
        windows = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.batch_size * args.fsdp_steps, args.seq_len),
                                generator=torch.Generator().manual_seed(0))
        history = train(student, windows, TrainConfig(steps=args.fsdp_steps, batch_size=args.batch_size, lr=1e-5),
                        teacher=teacher, quiet=rank != 0)
        row |= {"losses": [h["loss"] for h in history], "step_seconds": [
            h["seconds"] - (history[i - 1]["seconds"] if i else 0) for i, h in enumerate(history)],
            **_rates(history, skip=1)}
    except torch.cuda.OutOfMemoryError as error:
        row["error"] = f"out of GPU memory: {str(error).splitlines()[0]}"
    row["memory"] = _memory(world)
    return row


def _torchrun(gpus: int, mode: str, args: argparse.Namespace, out: Path, extra: list[str]) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(gpus), "--master_port",
               str(29600 + gpus), __file__, mode, "--model", args.model, "--dp-steps", str(args.dp_steps),
               "--dp-batch", str(args.dp_batch),
               "--fsdp-steps", str(args.fsdp_steps), "--seq-len", str(args.seq_len), "--batch-size",
               str(args.batch_size), "--shape", args.shape, "--out", str(out), *extra]
    print("+", " ".join(command), file=sys.stderr, flush=True)
    started = time.perf_counter()
    result = subprocess.run(command, check=False)
    row = json.loads(out.read_text()) if out.is_file() else {"error": f"exit status {result.returncode}"}
    return row | {"command": " ".join(["torchrun", "--nproc_per_node", str(gpus), *command[7:]]),
                  "wall_s": time.perf_counter() - started}


def run_all(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        print("qat_multigpu: needs two CUDA GPUs; nothing measured", file=sys.stderr)
        return 0
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    runs = {"dp1": (1, "dp", []), "dp2": (2, "dp", []), "fsdp2": (2, "fsdp", []), "fsdp1": (1, "fsdp", ["--no-shard"])}
    for name in [n for n in runs if n in args.runs or n.rstrip("12") in args.runs]:
        write_json(work / f"{name}.run.json", _torchrun(*runs[name][:2], args, work / f"{name}.json", runs[name][2]))
    done = {n: json.loads((work / f"{n}.run.json").read_text()) for n in runs if (work / f"{n}.run.json").is_file()}
    dp = {n: done[f"dp{n}"] for n in (1, 2) if f"dp{n}" in done}
    fsdp = {label: done[n] for n, label in [("fsdp2", "2 GPUs, sharded"), ("fsdp1", "1 GPU, unsharded")] if n in done}
    one, two = dp.get(1, {}).get("losses", []), dp.get(2, {}).get("losses", [])
    diffs = [abs(a - b) / abs(a) for a, b in zip(one, two)]
    rates = [dp.get(n, {}).get("tokens_per_s") for n in (1, 2)]
    summary = {"dp_speedup": rates[1] / rates[0] if all(rates) else None,
               "dp_loss_max_rel_diff": max(diffs) if diffs else None, "dp_steps_compared": len(diffs)}
    write_json(args.out, {"device": torch.cuda.get_device_name(), "gpus": torch.cuda.device_count(),
                          "torch": torch.__version__, "summary": summary, "data_parallel": dp, "fsdp": fsdp})
    print(json.dumps(summary, indent=1))
    print(markdown_table(["run", "tokens/s", "steps/s", "peak GPU GiB per process", "note"], [
        [f"dp SmolLM2, {n} GPU", f"{r.get('tokens_per_s', 0):,.0f}", f"{r.get('steps_per_s', 0):.2f}",
         ", ".join(f"{m['gpu_peak_gib']:.1f}" for m in r.get("memory", [])), r.get("error", "")]
        for n, r in dp.items()] + [
        [f"8B shape, {name}", f"{r.get('tokens_per_s', 0):,.0f}", f"{r.get('steps_per_s', 0):.3f}",
         ", ".join(f"{m['gpu_peak_gib']:.1f}" for m in r.get("memory", [])), r.get("error", "")]
        for name, r in fsdp.items()]))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["all", "dp", "fsdp"])
    parser.add_argument("--model", default="smollm2", help="the dp runs' model")
    parser.add_argument("--dp-steps", type=int, default=200)
    parser.add_argument("--dp-batch", type=int, default=64, help="dp global micro-batch, windows of 512 tokens")
    parser.add_argument("--fsdp-steps", type=int, default=6)
    parser.add_argument("--seq-len", type=int, default=2048, help="fsdp windows")
    parser.add_argument("--batch-size", type=int, default=4, help="fsdp global micro-batch, windows")
    parser.add_argument("--shape", choices=["llama3-8b", "tiny"], default="llama3-8b",
                        help="fsdp model shape (tiny: a CPU smoke test of this script)")
    parser.add_argument("--no-shard", action="store_true", help="fsdp: train the whole model on each process")
    parser.add_argument("--no-teacher", action="store_true", help="fsdp: next-token loss, no teacher")
    parser.add_argument("--runs", nargs="+", choices=["dp", "fsdp", "dp1", "dp2", "fsdp1", "fsdp2"],
                        default=["dp", "fsdp"],
                        help="all: which runs to make now; the JSON merges every run found in --workdir")
    parser.add_argument("--workdir", default="out/qat-multigpu")
    parser.add_argument("--out", default="results/qat_multigpu.json")
    args = parser.parse_args()
    if args.mode == "all":
        return run_all(args)
    row = (run_dp if args.mode == "dp" else run_fsdp)(args)
    if rank_and_world()[0] == 0:
        write_json(args.out, row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
