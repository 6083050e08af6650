"""Run a benchmark script with PyTorch's deterministic algorithms, so that two runs of one code on one GPU give one
number and two versions of the code can be compared without run-to-run noise.

    python benchmarks/deterministic.py [--method NAME] SCRIPT [ARGS ...]

Sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's condition for reproducible results) before CUDA starts and
``torch.use_deterministic_algorithms(True, warn_only=True)`` (an operation without a deterministic version warns
instead of stopping), then runs SCRIPT as ``__main__`` with ARGS. ``--method`` keeps only the entry of SCRIPT's
``METHODS`` named NAME whole (ptq_table.py's ``--only`` of older trees matches parts of names, so a recipe and its
"fast" variant would both run). It imports nothing of ATQ, so it runs an older source tree too
(results/refactor_regression_h200.json):

    python benchmarks/deterministic.py --method "group 64, ..." OLD_TREE/benchmarks/ptq_table.py --model smollm2
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    args = sys.argv[1:]
    method = None
    if args[:1] == ["--method"] and len(args) >= 2:
        method, args = args[1], args[2:]
    if not args:
        raise SystemExit(__doc__)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    script = args[0]
    sys.argv = args
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    if method is None:
        runpy.run_path(script, run_name="__main__")
        return
    module = runpy.run_path(script)  # defines METHODS and main without running it
    kept = [entry for entry in module["METHODS"] if entry[0] == method]
    if len(kept) != 1:
        raise SystemExit(f"--method {method!r}: {len(kept)} entries of {script}'s METHODS have that name")
    module["METHODS"][:] = kept
    sys.exit(module["main"]())


if __name__ == "__main__":
    main()
