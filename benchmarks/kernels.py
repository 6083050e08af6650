"""Ternary matmul kernel vs cuBLAS bf16 on the GPU -> results/kernels_h100.json.

    python benchmarks/kernels.py [--out results/kernels_h100.json] [--iters 50]

Shapes (out x in): 4096x4096, 14336x4096, 4096x14336 and SmolLM2's 576x576, 1536x576, 576x1536; batch 1, 8, 64,
512; groups of 64 with fp16 scales. Median of CUDA-event timings. Bandwidth: bytes the ternary kernel must move
(packed codes + scales + activations + output) over its time, against the measured device-to-device copy
bandwidth (1 GiB tensor copy, bytes read + written).
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from atq.bench import markdown_table
from atq.io import write_json

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (576, 576), (1536, 576), (576, 1536)]
BATCHES = [1, 8, 64, 512]


def timed(fn, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` runs, CUDA events around each."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    return 2 * source.numel() / timed(source.clone, 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/kernels_h100.json")
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("kernels: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 0
    from atq.kernels.triton import ternary_matmul
    from atq.packing import pack

    copy_bw = copy_bandwidth()
    rows = []
    for out_features, in_features in SHAPES:
        codes = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8, device="cuda")
        packed = pack(codes)
        scales = (torch.rand(out_features, in_features // 64, device="cuda") + 0.5).half()
        dense = (codes.to(torch.bfloat16) * scales.repeat_interleave(64, 1).to(torch.bfloat16)).contiguous()
        for batch in BATCHES:
            x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)
            got = ternary_matmul(x, packed, scales, 64, in_features)
            error = float((got.float() - x.float() @ dense.float().T).norm() / (x.float() @ dense.float().T).norm())
            t_ternary = timed(lambda x=x, p=packed, s=scales, k=in_features: ternary_matmul(x, p, s, 64, k),
                              args.iters)
            t_bf16 = timed(lambda x=x, w=dense: torch.matmul(x, w.T), args.iters)
            moved = packed.numel() + 2 * scales.numel() + 2 * x.numel() + 2 * batch * out_features
            rows.append({"shape": f"{out_features}x{in_features}", "batch": batch, "ternary_us": t_ternary * 1e6,
                         "bf16_us": t_bf16 * 1e6, "speedup": t_bf16 / t_ternary, "rel_error": error,
                         "bandwidth_gbs": moved / t_ternary / 1e9, "bandwidth_fraction": moved / t_ternary / copy_bw})
            print(rows[-1], file=sys.stderr, flush=True)
    write_json(args.out, {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": copy_bw / 1e9,
                          "group_size": 64, "rows": rows})
    print(f"device-to-device copy: {copy_bw / 1e9:,.0f} GB/s")
    print(markdown_table(
        ["shape", "batch", "ternary us", "bf16 us", "speedup", "bandwidth GB/s", "of copy"],
        [[r["shape"], str(r["batch"]), f"{r['ternary_us']:.1f}", f"{r['bf16_us']:.1f}", f"{r['speedup']:.2f}",
          f"{r['bandwidth_gbs']:,.0f}", f"{r['bandwidth_fraction']:.0%}"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
