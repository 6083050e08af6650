"""Ternary matmul kernel vs cuBLAS bf16 on the GPU -> results/kernels_h100.json.

    python benchmarks/matmul_speed.py [--out results/kernels_h100.json] [--iters 50] [--shapes 4096x4096,...]

Shapes (out x in): 4096x4096, 14336x4096, 4096x14336 and SmolLM2's 576x576, 1536x576, 576x1536; batch 1, 8, 64,
512; groups of 64 with fp16 scales; bf16 activations.

Timing: CUDA events around the replay of a CUDA graph of calls, divided by the number of calls, median over
``--iters`` replays. The graph removes Python's launch overhead from both sides (a decode loop under CUDA graphs
sees the same), and its calls cycle through enough copies of the weights (>= 256 MiB in all) that the 50 MB L2
cannot serve them, so each call reads its weights from HBM, as consecutive layers of a model do.
Bandwidth: bytes the ternary kernel must move (packed codes + scales + activations + output) over its time,
against the measured device-to-device copy bandwidth (1 GiB tensor copy, bytes read + written). Batch-1 rows also
time the fp32-arithmetic GEMV (``f16x2=False``) to show what the packed-half path buys. Each row records the tile
configuration the autotuner chose (``config``); the JSON is rewritten after every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from atq.files import write_json
from atq.stats import markdown_table

SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (576, 576), (1536, 576), (576, 1536)]
BATCHES = [1, 8, 64, 512]


ROTATION_BYTES = 256 * 2**20  # weights cycled through per graph: five times the H100's L2


def timed(fn, iters: int) -> float:
    """Median seconds of ``fn`` over ``iters`` runs, CUDA events around each."""
    for _ in range(3):
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


def graph_timed(calls: list, iters: int) -> float:
    """Median seconds per call of a CUDA graph that runs every function in ``calls`` once (already warmed up)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return timed(graph.replay, iters) / len(calls)


def copies(tensors: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """Enough clones of ``tensors`` (at least 4) that together they overflow the L2 cache."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    return [[t.clone() for t in tensors] for _ in range(max(4, -(-ROTATION_BYTES // size)))]


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write)."""
    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    return 2 * source.numel() / timed(source.clone, 10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/kernels_h100.json")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="out x in, comma-separated")
    args = parser.parse_args()
    shapes = [tuple(int(side) for side in shape.split("x")) for shape in args.shapes.split(",")]
    if not torch.cuda.is_available():
        print("kernels: needs a CUDA GPU; nothing measured", file=sys.stderr)
        return 0
    from atq.kernels import triton as kernels
    from atq.kernels.triton import ternary_matmul
    from atq.packing import pack

    copy_bw = copy_bandwidth()
    rows = []
    for out_features, in_features in shapes:
        codes = torch.randint(-1, 2, (out_features, in_features), dtype=torch.int8, device="cuda")
        packed = pack(codes)
        scales = (torch.rand(out_features, in_features // 64, device="cuda") + 0.5).half()
        dense = (codes.to(torch.bfloat16) * scales.repeat_interleave(64, 1).to(torch.bfloat16)).contiguous()
        ternary_copies, dense_copies = copies([packed, scales]), copies([dense])
        for batch in BATCHES:
            x = torch.randn(batch, in_features, device="cuda", dtype=torch.bfloat16)
            expected = x.double() @ dense.double().T
            row = {"shape": f"{out_features}x{in_features}", "batch": batch}
            variants = {"ternary": {}, "ternary_fp32": {"f16x2": False}} if batch == 1 else {"ternary": {}}
            for name, options in variants.items():
                got = ternary_matmul(x, packed, scales, 64, in_features, **options)  # also autotunes the shape
                row[f"{name}_rel_error"] = float((got.double() - expected).norm() / expected.norm())
                if name == "ternary":  # the configuration the autotuner chose for the default path
                    tuner = kernels._gemv if batch <= kernels.GEMV_MAX_ROWS else kernels._gemm
                    row["config"] = {**tuner.best_config.kwargs, "num_warps": tuner.best_config.num_warps,
                                     "num_stages": tuner.best_config.num_stages}
                row[f"{name}_us"] = 1e6 * graph_timed(
                    [lambda x=x, p=p, s=s, k=in_features, o=options: ternary_matmul(x, p, s, 64, k, **o)
                     for p, s in ternary_copies], args.iters)
            row["bf16_us"] = 1e6 * graph_timed([lambda x=x, w=w: torch.matmul(x, w.T) for (w,) in dense_copies],
                                               args.iters)
            seconds = row["ternary_us"] / 1e6
            moved = packed.numel() + 2 * scales.numel() + 2 * x.numel() + 2 * batch * out_features
            row |= {"speedup": row["bf16_us"] / row["ternary_us"], "rel_error": row["ternary_rel_error"],
                    "bandwidth_gbs": moved / seconds / 1e9, "bandwidth_fraction": moved / seconds / copy_bw}
            rows.append(row)
            print(rows[-1], file=sys.stderr, flush=True)
            write_json(args.out, {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbs": copy_bw / 1e9,
                                  "group_size": 64, "timing": "CUDA graph per call, weights rotated past L2",
                                  "rows": rows})
        del ternary_copies, dense_copies
    print(f"device-to-device copy: {copy_bw / 1e9:,.0f} GB/s")
    print(markdown_table(
        ["shape", "batch", "ternary us", "fp32-GEMV us", "bf16 us", "speedup", "bandwidth GB/s", "of copy",
         "rel err"],
        [[r["shape"], str(r["batch"]), f"{r['ternary_us']:.1f}",
          f"{r['ternary_fp32_us']:.1f}" if "ternary_fp32_us" in r else "", f"{r['bf16_us']:.1f}",
          f"{r['speedup']:.2f}", f"{r['bandwidth_gbs']:,.0f}", f"{r['bandwidth_fraction']:.0%}",
          f"{r['rel_error']:.1e}"] for r in rows]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
