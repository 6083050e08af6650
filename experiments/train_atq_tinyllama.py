"""QAT of TinyLlama-1.1B-Chat with distillation from its FP self: a thin wrapper over `atq train`.

    python experiments/train_atq_tinyllama.py --out out/tinyllama-qat [any other `atq train` option]

Defaults: the hub model `TinyLlama/TinyLlama-1.1B-Chat-v1.0` (needs the hub or a local copy: pass --model
DIR), data-free (text the model generates, cached next to --out), learned scales. Every option of
`atq train --help` passes through; for several GPUs run it under `torchrun --nproc_per_node N`.
"""

from __future__ import annotations

import sys

from atq.cli import main
from atq.flags import with_defaults

DEFAULTS = ["--model", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "--data", "generated", "--learned-scales"]


def argv(extra: list[str]) -> list[str]:
    return with_defaults("train", DEFAULTS, extra)


if __name__ == "__main__":
    sys.exit(main(argv(sys.argv[1:])))
