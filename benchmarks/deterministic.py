"""Run a benchmark script with PyTorch's deterministic algorithms, so that two runs of one code on one GPU give one
number and two versions of the code can be compared without run-to-run noise.

    python benchmarks/deterministic.py SCRIPT [ARGS ...]

Sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` (cuBLAS's condition for reproducible results) before CUDA starts and
``torch.use_deterministic_algorithms(True, warn_only=True)`` (an operation without a deterministic version warns
instead of stopping), then runs SCRIPT as ``__main__`` with ARGS. It imports nothing of ATQ, so it runs an older
source tree too (results/refactor_regression_h200.json).
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.use_deterministic_algorithms(True, warn_only=True)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
